"""Ensemble verification metrics at observation points (pure NumPy, float64).

Every function takes the ensemble sampled at the observations, ``ens`` of shape
``(M, n)`` (M members, n observations), and the observed values ``obs`` of shape
``(n,)`` in the same units (NumPy or JAX arrays; computed in NumPy float64).

Definitions (M members, x_i member values, y observation):

- RMSE: root mean square over observations of ``mean_i x_i - y``.
- spread: ``sqrt(mean_n var_i(x))`` with the unbiased (M - 1) variance.
- spread-skill ratio: ``sqrt((M + 1) / M) * spread / RMSE``; 1 for a calibrated
  ensemble (the factor accounts for the finite ensemble's mean error).
- CRPS: the ensemble CRPS in kernel (energy) form,
  ``mean_i |x_i - y| - 1 / (2 M^2) sum_ij |x_i - x_j|`` (``fair=False``, the CRPS of
  the empirical distribution), or the *fair* (unbiased) version with
  ``1 / (2 M (M - 1))`` in the second term (``fair=True``, the default), whose
  expectation is the CRPS of the distribution the members are drawn from.
- rank histogram: counts (M + 1 bins) of the observation's rank among the members;
  ties are broken uniformly at random with an explicit seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _check(ens, obs) -> tuple[np.ndarray, np.ndarray]:
    ens = np.asarray(ens, dtype=np.float64)
    obs = np.asarray(obs, dtype=np.float64)
    if ens.ndim != 2:
        raise ValueError(f"ensemble at observations must be (M, n), got shape {ens.shape}")
    if obs.shape != (ens.shape[1],):
        raise ValueError(f"observations must be (n,) = ({ens.shape[1]},), got shape {obs.shape}")
    if ens.shape[1] == 0:
        raise ValueError("no observations")
    return ens, obs


def rmse(ens, obs) -> float:
    """RMSE of the ensemble mean at the observations (units of obs)."""
    ens, obs = _check(ens, obs)
    return float(np.sqrt(np.mean((ens.mean(axis=0) - obs) ** 2)))


def bias(ens, obs) -> float:
    """Mean of (ensemble mean - observation)."""
    ens, obs = _check(ens, obs)
    return float(np.mean(ens.mean(axis=0) - obs))


def spread(ens) -> float:
    """sqrt of the mean (over observations) unbiased ensemble variance; needs M >= 2."""
    ens = np.asarray(ens, dtype=np.float64)
    if ens.ndim != 2 or ens.shape[0] < 2:
        raise ValueError(f"spread needs an (M >= 2, n) ensemble, got shape {ens.shape}")
    return float(np.sqrt(np.mean(ens.var(axis=0, ddof=1))))


def spread_skill_ratio(ens, obs) -> float:
    """``sqrt((M + 1) / M) * spread / RMSE`` (1 = calibrated; inf if RMSE is 0)."""
    ens, obs = _check(ens, obs)
    m = ens.shape[0]
    err = rmse(ens, obs)
    s = spread(ens)
    if err == 0.0:
        return float("inf") if s > 0 else float("nan")
    return float(np.sqrt((m + 1) / m) * s / err)


def crps_ensemble(ens, obs, *, fair: bool = True) -> np.ndarray:
    """CRPS per observation, shape (n,). Kernel form, O(M log M) per observation.

    ``fair=True``: unbiased ("fair") CRPS, second term divided by ``2 M (M - 1)``;
    ``fair=False``: CRPS of the empirical distribution, divided by ``2 M^2``.
    """
    ens, obs = _check(ens, obs)
    m = ens.shape[0]
    if fair and m < 2:
        raise ValueError("the fair CRPS needs at least 2 members")
    skill = np.mean(np.abs(ens - obs[None, :]), axis=0)
    xs = np.sort(ens, axis=0)
    # sum_{i,j} |x_i - x_j| = 2 * sum_i (2 i - M + 1) x_(i), i = 0..M-1 (sorted)
    weights = (2.0 * np.arange(m) - m + 1.0)[:, None]
    pair_sum = 2.0 * np.sum(weights * xs, axis=0)
    denom = 2.0 * m * (m - 1) if fair else 2.0 * m * m
    return skill - pair_sum / denom


def rank_histogram(ens, obs, *, seed: int) -> np.ndarray:
    """Counts (M + 1,) int64 of the observation's rank among the members.

    Rank r = number of members below the observation plus a uniform random integer
    in [0, number of members equal to it] (random tie-breaking, ``seed`` explicit).
    """
    ens, obs = _check(ens, obs)
    m = ens.shape[0]
    below = np.sum(ens < obs[None, :], axis=0)
    ties = np.sum(ens == obs[None, :], axis=0)
    rng = np.random.default_rng(seed)
    ranks = below + rng.integers(0, ties + 1)
    return np.bincount(ranks, minlength=m + 1).astype(np.int64)


def summarize(ens, obs, obs_sigma=None, *, seed: int = 0) -> dict[str, Any]:
    """All metrics as a JSON-friendly dict.

    With ``obs_sigma`` (scalar or (n,), observation-error standard deviation), the
    spread-skill ratio is also given with the observation error added to the
    ensemble variance, ``sqrt((M+1)/M spread^2 + mean sigma^2) / RMSE``
    (``spread_skill_obs``), the consistent comparison against
    noisy observations.
    """
    ens, obs = _check(ens, obs)
    m, n = ens.shape
    out: dict[str, Any] = {
        "n_obs": int(n),
        "n_members": int(m),
        "rmse": rmse(ens, obs),
        "bias": bias(ens, obs),
        "crps": float(np.mean(crps_ensemble(ens, obs, fair=m >= 2))),
        "crps_form": "fair" if m >= 2 else "standard",
        "rank_histogram": rank_histogram(ens, obs, seed=seed).tolist(),
    }
    if m >= 2:
        out["spread"] = spread(ens)
        out["spread_skill"] = spread_skill_ratio(ens, obs)
    if obs_sigma is not None and m >= 2:
        sig = np.broadcast_to(np.asarray(obs_sigma, dtype=np.float64), (n,))
        # E[(mean - y)^2] = (M + 1) / M * var_ens + sigma_y^2 for a calibrated ensemble
        expected = np.sqrt((m + 1) / m * out["spread"] ** 2 + np.mean(sig**2))
        out["spread_skill_obs"] = float(expected / out["rmse"]) if out["rmse"] > 0 else float("inf")
    return out
