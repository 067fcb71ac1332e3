from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import require_module
from jaxguide.verification import metrics


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


# --------------------------------------------------------------------------------------
# noisy observations, energy and variogram scores


def _perfect_posterior_case(rng, m, n, s=1.0, sigma_o=1.0):
    """Members and truth exchangeable draws of N(0, s^2) per point; y = truth + N(0, sigma_o^2)."""
    truth = rng.normal(0.0, s, size=n)
    ens = rng.normal(0.0, s, size=(m, n))
    y = truth + rng.normal(0.0, sigma_o, size=n)
    return ens, y


def test_rank_histogram_with_observation_noise_is_flat():
    """A perfect posterior ranked against noisy observations: flat once the members carry
    the observation noise (summarize with obs_sigma), U-shaped without it (the old
    summarize ranked the bare members: this test failed on it)."""
    rng = np.random.default_rng(11)
    m, n = 9, 20000
    ens, y = _perfect_posterior_case(rng, m, n)
    expected = n / (m + 1)
    chi2_crit = 27.88  # chi^2, 9 dof, p = 0.001
    flat = np.asarray(metrics.summarize(ens, y, obs_sigma=1.0, seed=0)["rank_histogram"])
    assert flat.sum() == n
    assert np.sum((flat - expected) ** 2 / expected) < chi2_crit
    bare = metrics.rank_histogram(ens, y, seed=0)
    assert np.sum((bare - expected) ** 2 / expected) > 20 * chi2_crit  # measured 2264 at this seed
    assert min(bare[0], bare[-1]) > 1.5 * expected > 2 * bare[m // 2]  # U shape
    # deterministic in the seed, different for another seed
    again = metrics.summarize(ens, y, obs_sigma=1.0, seed=0)["rank_histogram"]
    assert again == flat.tolist() and metrics.summarize(ens, y, obs_sigma=1.0, seed=1)["rank_histogram"] != again


def test_crps_with_observation_noise_matches_gaussian_closed_form():
    """Perfect N(mu, s^2) ensemble, y ~ N(mu, s^2 + sigma_o^2): the CRPS summarize reports
    is the CRPS of the predictive N(mu, s^2 + sigma_o^2), per observation, for large M."""
    rng = np.random.default_rng(12)
    mu, s, sigma_o, m = 0.5, 1.2, 0.9, 4000
    y = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 2.5, 4.0])
    ens = rng.normal(mu, s, size=(m, 1)) * np.ones((1, y.size))
    got = metrics.crps_ensemble(metrics.perturb(ens, sigma_o, 0), y)
    np.testing.assert_allclose(got, _gauss_crps(mu, math.hypot(s, sigma_o), y), rtol=0.03, atol=0.01)
    # and through summarize, averaged over many observations of a sharp posterior
    s = 0.3
    ens, yy = _perfect_posterior_case(rng, 200, 5000, s, sigma_o)
    got_mean = metrics.summarize(ens + mu, yy + mu, obs_sigma=sigma_o, seed=3)["crps"]
    want_mean = _gauss_crps(mu, math.hypot(s, sigma_o), yy + mu).mean()
    assert abs(got_mean - want_mean) < 0.01
    bare_mean = float(metrics.crps_ensemble(ens, yy).mean())  # what the old summarize reported
    assert bare_mean - want_mean > 0.05


def test_crps_uses_scoringrules_and_matches_brute_force():
    sr = require_module("scoringrules")  # a dependency: fails under CI=true if missing
    rng = np.random.default_rng(13)
    ens = rng.normal(size=(6, 40))
    y = rng.normal(size=40)
    np.testing.assert_allclose(metrics.crps_ensemble(ens, y), sr.crps_ensemble(y, ens.T, estimator="fair", backend="numpy"), atol=1e-12)


def test_energy_score_closed_form_and_bias():
    """E[ES] of a perfect N(0, s^2 I_d) ensemble (fair estimator) is
    s * Gamma((d + 1) / 2) / Gamma(d / 2) (half the mean distance between two draws);
    a biased ensemble scores worse; in 1-D the energy score is the CRPS."""
    rng = np.random.default_rng(14)
    d, m, reps, s = 16, 8, 3000, 1.3
    want = s * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    perfect, biased = [], []
    for _ in range(reps):
        ens = rng.normal(0, s, size=(m, d))
        y = rng.normal(0, s, size=d)
        perfect.append(metrics.energy_score(ens, y))
        biased.append(metrics.energy_score(ens + 0.5 * s, y))
    perfect, biased = np.array(perfect), np.array(biased)
    se = perfect.std() / math.sqrt(reps)
    assert abs(perfect.mean() - want) < 4 * se, (perfect.mean(), want, se)
    assert biased.mean() - perfect.mean() > 10 * se
    ens, y = rng.normal(size=(7, 1)), rng.normal(size=1)
    for fair in (True, False):
        assert metrics.energy_score(ens, y, fair=fair) == pytest.approx(float(metrics.crps_ensemble(ens, y, fair=fair)[0]), abs=1e-12)


def test_energy_score_with_observation_noise_closed_form():
    """With noisy observations the predictive ensemble is N(0, (s^2 + sigma_o^2) I): summarize's
    energy score has expectation sqrt(s^2 + sigma_o^2) Gamma((d+1)/2) / Gamma(d/2)."""
    rng = np.random.default_rng(15)
    d, m, reps, s, sigma_o = 12, 6, 2000, 1.0, 0.8
    want = math.hypot(s, sigma_o) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    got = np.array([
        metrics.summarize(*_perfect_posterior_case(rng, m, d, s, sigma_o), obs_sigma=sigma_o, seed=i)["energy_score"]
        for i in range(reps)
    ])
    assert abs(got.mean() - want) < 4 * got.std() / math.sqrt(reps)


def test_energy_and_variogram_scores_match_scoringrules():
    sr = require_module("scoringrules")  # a dependency: fails under CI=true if missing
    rng = np.random.default_rng(16)
    ens = rng.normal(size=(5, 30))
    y = rng.normal(size=30)
    assert metrics.energy_score(ens, y, fair=True) == pytest.approx(float(sr.es_ensemble(y, ens, estimator="fair", backend="numpy")), rel=1e-12)
    assert metrics.energy_score(ens, y, fair=False) == pytest.approx(float(sr.es_ensemble(y, ens, estimator="nrg", backend="numpy")), rel=1e-12)
    w = rng.uniform(size=(30, 30))
    for p in (0.5, 1.0):
        want = float(sr.vs_ensemble(y, ens, w=np.ones((30, 30)), p=p, backend="numpy"))
        assert metrics.variogram_score(ens, y, p=p, chunk=7) == pytest.approx(want, rel=1e-12)
        want_w = float(sr.vs_ensemble(y, ens, w=w, p=p, backend="numpy"))
        assert metrics.variogram_score(ens, y, p=p, weights=w, chunk=64) == pytest.approx(want_w, rel=1e-12)


def test_variogram_score_sees_correlation():
    """Members with the right correlation between points beat members with none, at the
    same marginals (which CRPS cannot tell apart)."""
    rng = np.random.default_rng(17)
    n, m, reps = 10, 20, 300
    c = 0.9 * np.ones((n, n)) + 0.1 * np.eye(n)
    L = np.linalg.cholesky(c)
    right, wrong = [], []
    for _ in range(reps):
        y = L @ rng.normal(size=n)
        right.append(metrics.variogram_score((L @ rng.normal(size=(n, m))).T, y))
        wrong.append(metrics.variogram_score(rng.normal(size=(m, n)), y))
    assert np.mean(right) < 0.5 * np.mean(wrong)


def test_spread_skill_ensemble_size_correction_and_obs_noise():
    """sqrt((M+1)/M) spread / RMSE is 1 for small calibrated ensembles (not sqrt(M/(M+1)));
    with noisy observations, the version with sigma_o is 1."""
    rng = np.random.default_rng(18)
    m, n = 3, 100000
    ens, y = _perfect_posterior_case(rng, m, n, 1.0, 0.7)
    s = metrics.summarize(ens, y, obs_sigma=0.7, seed=0)
    assert abs(s["spread_skill_obs"] - 1) < 0.02
    assert s["spread_skill"] < 0.9
    truth = rng.normal(size=n)
    ens = rng.normal(size=(m, n))
    assert abs(metrics.spread_skill_ratio(ens, truth) - 1) < 0.02
    assert metrics.spread_skill_ratio(ens, y, obs_sigma=0.7) == pytest.approx(metrics.summarize(ens, y, 0.7)["spread_skill_obs"])


def test_perturb_and_summarize_keys():
    rng = np.random.default_rng(19)
    ens = rng.normal(size=(4, 50))
    a = metrics.perturb(ens, np.full(50, 2.0), 5)
    np.testing.assert_array_equal(a, metrics.perturb(ens, 2.0, np.random.default_rng(5)))
    assert 1.5 < np.std(a - ens) < 2.5
    np.testing.assert_array_equal(metrics.perturb(ens, 0.0, 1), ens)
    with pytest.raises(ValueError):
        metrics.perturb(ens, np.ones(3), 0)
    with pytest.raises(ValueError):
        metrics.perturb(ens, -1.0, 0)
    s = metrics.summarize(ens, rng.normal(size=50), obs_sigma=0.5, variogram=True)
    assert s["obs_noise_in_scores"] and s["energy_score"] > 0 and s["variogram_score"] > 0 and s["variogram_p"] == 0.5
    t = metrics.summarize(ens, rng.normal(size=50))
    assert not t["obs_noise_in_scores"] and "variogram_score" not in t and "spread_skill_obs" not in t


def test_non_finite_input_is_refused():
    """Issue 21 (3): NaN members (a pending or skipped campaign time) were scored: NaN
    RMSE/CRPS, and rank_histogram put them at rank 0. Every metric now refuses them."""
    rng = np.random.default_rng(9)
    ens, obs = rng.normal(size=(4, 20)), rng.normal(size=20)
    nan_ens = ens.copy()
    nan_ens[:, 3:5] = np.nan
    for fn in (metrics.rmse, metrics.bias, metrics.crps_ensemble, metrics.energy_score, metrics.variogram_score,
               metrics.spread_skill_ratio):
        with pytest.raises(ValueError, match=r"ensemble has 8 non-finite values \(NaN/Inf\) at 2 of 20 observations"):
            fn(nan_ens, obs)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.rank_histogram(nan_ens, obs, seed=0)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.summarize(nan_ens, obs, obs_sigma=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.spread(nan_ens)
    inf_obs = obs.copy()
    inf_obs[0] = np.inf
    with pytest.raises(ValueError, match=r"observations have 1 non-finite value"):
        metrics.summarize(ens, inf_obs)
    with pytest.raises(ValueError, match="obs_sigma must be finite"):
        metrics.perturb(ens, np.inf, 0)
