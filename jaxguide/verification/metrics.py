"""Ensemble verification metrics at observation points (NumPy, float64).

Every function takes the ensemble sampled at the observations, ``ens`` of shape
``(M, n)`` (M members, n observations), and the observed values ``obs`` of shape
``(n,)`` in the same units (NumPy or JAX arrays; computed in NumPy float64). Non-finite
members or observations (NaN/Inf) are refused with a ValueError, never scored.

Definitions (M members, x_i member values, y observation):

- RMSE: root mean square over observations of ``mean_i x_i - y``.
- spread: ``sqrt(mean_n var_i(x))`` with the unbiased (M - 1) variance.
- spread-skill ratio: ``sqrt((M + 1) / M) * spread / RMSE``; 1 for a calibrated
  ensemble (the factor accounts for the finite ensemble's mean error). Against noisy
  observations (:func:`summarize` with ``obs_sigma``) the observation-error variance
  is added: ``sqrt((M + 1) / M * spread^2 + mean sigma_o^2) / RMSE``.
- CRPS: the ensemble CRPS (``scoringrules.crps_ensemble``), either *fair* (unbiased,
  ``fair=True``, the default; ``1 / (2 M (M - 1))`` in the kernel form's second term),
  whose expectation is the CRPS of the distribution the members are drawn from, or the
  CRPS of the empirical distribution (``fair=False``, ``1 / (2 M^2)``).
- energy score (multivariate, over the n observations as one vector):
  ``mean_i ||x_i - y|| - 1 / (2 M (M - 1)) sum_ij ||x_i - x_j||`` (fair) or with
  ``1 / (2 M^2)`` (``fair=False``); Euclidean norm. It rewards the right correlations
  between observed points, which the univariate scores cannot see.
- variogram score of order p (Scheuerer and Hamill 2015):
  ``sum_kl w_kl (|y_k - y_l|^p - mean_i |x_ik - x_il|^p)^2`` over ordered pairs.
- rank histogram: counts (M + 1 bins) of the observation's rank among the members;
  ties are broken uniformly at random with an explicit seed.

Noisy observations: an observation is ``y = truth + e`` with ``e ~ N(0, sigma_o^2)``. A
perfect ensemble of the truth is then NOT a sample of y's distribution: its rank
histogram is U-shaped and its CRPS is too high. :func:`summarize` with ``obs_sigma``
therefore scores the *predictive* ensemble ``x_i + e_i``, ``e_i ~ N(0, sigma_o^2)``
drawn with an explicit seed (:func:`perturb`), for the rank histogram, CRPS, energy and
variogram scores; RMSE, bias and spread stay those of the ensemble itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Above this many observations the O(n^2 M) variogram score is skipped (reported None).
VARIOGRAM_MAX_N = 10_000


def _check(ens, obs) -> tuple[np.ndarray, np.ndarray]:
    ens = np.asarray(ens, dtype=np.float64)
    obs = np.asarray(obs, dtype=np.float64)
    if ens.ndim != 2:
        raise ValueError(f"ensemble at observations must be (M, n), got shape {ens.shape}")
    if obs.shape != (ens.shape[1],):
        raise ValueError(f"observations must be (n,) = ({ens.shape[1]},), got shape {obs.shape}")
    if ens.shape[1] == 0:
        raise ValueError("no observations")
    _check_finite(ens)
    bad = ~np.isfinite(obs)
    if bad.any():
        raise ValueError(f"the observations have {int(bad.sum())} non-finite value(s) (NaN/Inf) of {obs.size}")
    return ens, obs


def _check_finite(ens: np.ndarray) -> None:
    """Refuse NaN/Inf members (an unanalysed campaign time, a diverged run): never scored."""
    bad = ~np.isfinite(ens)
    if bad.any():
        raise ValueError(f"the ensemble has {int(bad.sum())} non-finite values (NaN/Inf) at {int(bad.any(axis=0).sum())} "
                         f"of {ens.shape[1]} observations; an unanalysed (pending or skipped) time or a diverged run "
                         "cannot be scored")


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, int | np.integer):
        return np.random.default_rng(int(seed))
    raise TypeError(f"seed must be an int or a numpy Generator, got {type(seed).__name__}")


def perturb(ens, obs_sigma, seed: int | np.random.Generator) -> np.ndarray:
    """Predictive ensemble for noisy observations: ``ens + sigma * N(0, 1)``.

    Args:
      ens: (M, n) ensemble at the observations.
      obs_sigma: scalar or (n,) observation-error standard deviation, same units.
      seed: int seed or ``numpy.random.Generator`` (the draws are deterministic in it).
    Returns (M, n) float64.
    """
    ens = np.asarray(ens, dtype=np.float64)
    sig = np.asarray(obs_sigma, dtype=np.float64)
    if ens.ndim != 2:
        raise ValueError(f"ensemble at observations must be (M, n), got shape {ens.shape}")
    if sig.ndim > 1 or sig.size not in (1, ens.shape[1]):
        raise ValueError(f"obs_sigma must be a scalar or ({ens.shape[1]},), got shape {sig.shape}")
    sig = np.broadcast_to(sig.reshape(-1), (ens.shape[1],))
    if np.any(~(sig >= 0) | ~np.isfinite(sig)):
        raise ValueError("obs_sigma must be finite and >= 0")
    return ens + sig[None, :] * _rng(seed).standard_normal(ens.shape)


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
    _check_finite(ens)
    return float(np.sqrt(np.mean(ens.var(axis=0, ddof=1))))


def spread_skill_ratio(ens, obs, obs_sigma=None) -> float:
    """``sqrt((M + 1) / M * spread^2 + mean sigma_o^2) / RMSE`` (1 = calibrated; inf if
    RMSE is 0). ``obs_sigma`` None (or 0): observations without error."""
    ens, obs = _check(ens, obs)
    m, n = ens.shape
    err = rmse(ens, obs)
    s = spread(ens)
    noise = 0.0 if obs_sigma is None else float(np.mean(np.broadcast_to(np.asarray(obs_sigma, np.float64), (n,)) ** 2))
    expected = np.sqrt((m + 1) / m * s**2 + noise)  # E[(mean - y)^2] of a calibrated ensemble
    if err == 0.0:
        return float("inf") if expected > 0 else float("nan")
    return float(expected / err)


def crps_ensemble(ens, obs, *, fair: bool = True) -> np.ndarray:
    """CRPS per observation, shape (n,), with ``scoringrules`` (O(M log M) estimators).

    ``fair=True``: unbiased ("fair") CRPS (scoringrules' "pwm" estimator, equal to the
    kernel form with ``2 M (M - 1)``); ``fair=False``: CRPS of the empirical
    distribution ("qd", equal to the kernel form with ``2 M^2``).
    """
    import scoringrules

    ens, obs = _check(ens, obs)
    if fair and ens.shape[0] < 2:
        raise ValueError("the fair CRPS needs at least 2 members")
    out = scoringrules.crps_ensemble(obs, ens, m_axis=0, estimator="pwm" if fair else "qd", backend="numpy")
    return np.asarray(out, dtype=np.float64)


def energy_score(ens, obs, *, fair: bool = True) -> float:
    """Energy score of the ensemble for the observation vector (all n points as one
    vector; Euclidean norm). Lower is better; units of obs.

    ``fair=True`` (needs M >= 2) is unbiased for the score of the distribution the
    members come from. Memory O(M n) (pairs are accumulated one member at a time).
    """
    ens, obs = _check(ens, obs)
    m = ens.shape[0]
    if fair and m < 2:
        raise ValueError("the fair energy score needs at least 2 members")
    skill = np.mean(np.linalg.norm(ens - obs[None, :], axis=1))
    pairs = sum(float(np.sum(np.linalg.norm(ens[i + 1 :] - ens[i], axis=1))) for i in range(m - 1))  # i < j
    denom = m * (m - 1) if fair else m * m
    return float(skill - pairs / denom)  # 2 * pairs / (2 * denom)


def variogram_score(ens, obs, *, p: float = 0.5, weights=None, chunk: int = 256) -> float:
    """Variogram score of order ``p`` over all ordered pairs of observations.

    ``weights``: (n, n) pair weights, default 1. Cost O(n^2 M) time, O(chunk n M) memory.
    Lower is better; units of obs^(2p).
    """
    ens, obs = _check(ens, obs)
    n = obs.shape[0]
    if not p > 0:
        raise ValueError(f"the variogram order p must be > 0, got {p}")
    if weights is not None:
        weights = np.asarray(weights, np.float64)
        if weights.shape != (n, n):
            raise ValueError(f"weights must be ({n}, {n}), got {weights.shape}")
    total = 0.0
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        v_obs = np.abs(obs[sl, None] - obs[None, :]) ** p  # (k, n)
        v_ens = np.mean(np.abs(ens[:, sl, None] - ens[:, None, :]) ** p, axis=0)  # (k, n)
        d = (v_obs - v_ens) ** 2
        total += float(np.sum(d if weights is None else weights[sl] * d))
    return total


def rank_histogram(ens, obs, *, seed: int | np.random.Generator) -> np.ndarray:
    """Counts (M + 1,) int64 of the observation's rank among the members.

    Rank r = number of members below the observation plus a uniform random integer
    in [0, number of members equal to it] (random tie-breaking, ``seed`` explicit).
    For noisy observations rank the predictive ensemble (:func:`perturb`).
    """
    ens, obs = _check(ens, obs)
    m = ens.shape[0]
    below = np.sum(ens < obs[None, :], axis=0)
    ties = np.sum(ens == obs[None, :], axis=0)
    ranks = below + _rng(seed).integers(0, ties + 1)
    return np.bincount(ranks, minlength=m + 1).astype(np.int64)


def summarize(ens, obs, obs_sigma=None, *, seed: int = 0, variogram: bool = False, variogram_p: float = 0.5) -> dict[str, Any]:
    """All metrics as a JSON-friendly dict.

    Args:
      ens: (M, n) ensemble at the observations; obs: (n,).
      obs_sigma: scalar or (n,) observation-error standard deviation. When given, the
        rank histogram, CRPS, energy and variogram scores use the predictive ensemble
        ``ens + N(0, obs_sigma^2)`` (drawn from ``seed``), and ``spread_skill_obs``
        includes the observation error. None: the observations are exact (a truth).
      seed: seeds the perturbation and the rank histogram's tie-breaking.
      variogram: also give the variogram score (skipped, None, above
        :data:`VARIOGRAM_MAX_N` observations: its cost is O(n^2 M)).
    Keys: n_obs, n_members, rmse, bias, crps, crps_form ("fair" | "standard"),
    energy_score, energy_score_form, rank_histogram, obs_noise_in_scores; with M >= 2
    spread and spread_skill (without the observation error); with obs_sigma and M >= 2
    spread_skill_obs; with ``variogram`` variogram_score and variogram_p.
    """
    ens, obs = _check(ens, obs)
    m, n = ens.shape
    rng = np.random.default_rng(seed)
    scored = ens if obs_sigma is None else perturb(ens, obs_sigma, rng)
    form = "fair" if m >= 2 else "standard"
    out: dict[str, Any] = {
        "n_obs": int(n),
        "n_members": int(m),
        "rmse": rmse(ens, obs),
        "bias": bias(ens, obs),
        "crps": float(np.mean(crps_ensemble(scored, obs, fair=m >= 2))),
        "crps_form": form,
        "energy_score": energy_score(scored, obs, fair=m >= 2),
        "energy_score_form": form,
        "rank_histogram": rank_histogram(scored, obs, seed=rng).tolist(),
        "obs_noise_in_scores": obs_sigma is not None,
    }
    if variogram:
        out["variogram_p"] = float(variogram_p)
        out["variogram_score"] = variogram_score(scored, obs, p=variogram_p) if n <= VARIOGRAM_MAX_N else None
    if m >= 2:
        out["spread"] = spread(ens)
        out["spread_skill"] = spread_skill_ratio(ens, obs)
        if obs_sigma is not None:
            out["spread_skill_obs"] = spread_skill_ratio(ens, obs, obs_sigma)
    return out
