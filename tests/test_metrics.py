from __future__ import annotations

import math

import numpy as np
import pytest

from jaxguide import metrics


def _brute_crps(ens, obs, fair):
    m = ens.shape[0]
    skill = np.mean(np.abs(ens - obs), axis=0)
    pairs = np.abs(ens[:, None, :] - ens[None, :, :]).sum(axis=(0, 1))
    return skill - pairs / (2 * m * (m - 1) if fair else 2 * m * m)


def _gauss_crps(mu, sigma, y):
    from scipy.stats import norm

    z = (y - mu) / sigma
    return sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / math.sqrt(math.pi))


def test_crps_matches_brute_force():
    rng = np.random.default_rng(0)
    ens = rng.normal(size=(7, 50))
    ens[3, :5] = ens[1, :5]  # ties
    obs = rng.normal(size=50)
    for fair in (True, False):
        np.testing.assert_allclose(metrics.crps_ensemble(ens, obs, fair=fair), _brute_crps(ens, obs, fair), rtol=1e-12, atol=1e-12)


def test_crps_gaussian_closed_form():
    rng = np.random.default_rng(1)
    mu, sigma = 0.3, 1.7
    y = np.array([-2.0, 0.0, 0.3, 1.5, 4.0])
    ens = rng.normal(mu, sigma, size=(4000, 1)) * np.ones((1, y.size))
    got = metrics.crps_ensemble(ens, y, fair=True)
    np.testing.assert_allclose(got, _gauss_crps(mu, sigma, y), rtol=0.03, atol=0.01)


def test_fair_crps_unbiased_for_small_ensembles():
    rng = np.random.default_rng(2)
    y = rng.normal(size=20000)
    ens = rng.normal(size=(3, y.size))
    exact = _gauss_crps(0.0, 1.0, y).mean()
    fair = metrics.crps_ensemble(ens, y, fair=True).mean()
    standard = metrics.crps_ensemble(ens, y, fair=False).mean()
    assert abs(fair - exact) < 0.01
    assert standard - exact > 0.05  # the empirical-distribution CRPS is biased high for M=3


def test_rmse_spread_simple_values():
    ens = np.array([[1.0, 2.0], [3.0, 4.0]])
    obs = np.array([1.0, 1.0])
    assert metrics.rmse(ens, obs) == pytest.approx(math.sqrt((1 + 4) / 2))
    assert metrics.spread(ens) == pytest.approx(math.sqrt(2.0))  # var ddof=1 of (1,3) is 2
    assert metrics.spread_skill_ratio(ens, obs) == pytest.approx(math.sqrt(1.5) * math.sqrt(2) / math.sqrt(2.5))


def test_spread_skill_calibrated_near_one_and_detects_underdispersion():
    rng = np.random.default_rng(3)
    m, n = 10, 20000
    truth = rng.normal(size=n)  # obs and members are exchangeable draws
    ens = rng.normal(size=(m, n))
    r = metrics.spread_skill_ratio(ens, truth)
    assert abs(r - 1.0) < 0.03  # MC error ~ 1/sqrt(2n) ~ 0.005
    assert metrics.spread_skill_ratio(0.5 * ens, truth) < 0.7


def test_rank_histogram_flat_and_ties():
    rng = np.random.default_rng(4)
    m, n = 9, 50000
    ens = rng.normal(size=(m, n))
    obs = rng.normal(size=n)
    counts = metrics.rank_histogram(ens, obs, seed=0)
    assert counts.shape == (m + 1,) and counts.sum() == n
    expected = n / (m + 1)
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 30  # chi2 with 9 dof: p(>30) ~ 4e-4
    # biased ensemble: observation mostly above all members
    high = metrics.rank_histogram(ens, obs + 3.0, seed=0)
    assert high[-1] > 0.5 * n
    # full ties: uniform via random tie-breaking, deterministic in the seed
    same = np.zeros((4, 10000))
    c1 = metrics.rank_histogram(same, np.zeros(10000), seed=5)
    np.testing.assert_array_equal(c1, metrics.rank_histogram(same, np.zeros(10000), seed=5))
    assert c1.min() > 1700


def test_summarize_and_errors():
    rng = np.random.default_rng(6)
    ens = rng.normal(size=(8, 300))
    obs = rng.normal(size=300) * np.sqrt(1 + 0.5**2)  # truth + obs error 0.5
    s = metrics.summarize(ens, obs, obs_sigma=0.5, seed=1)
    for key in ("rmse", "crps", "spread", "spread_skill", "spread_skill_obs", "rank_histogram", "n_obs"):
        assert key in s
    assert s["n_obs"] == 300 and len(s["rank_histogram"]) == 9
    assert s["spread_skill"] < s["spread_skill_obs"]
    assert abs(s["spread_skill_obs"] - 1) < 0.15
    with pytest.raises(ValueError):
        metrics.summarize(ens, obs[:10])
    with pytest.raises(ValueError):
        metrics.rmse(ens[:, :0], obs[:0])
