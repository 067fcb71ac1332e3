"""The exact Gaussian test on the sphere: MMPS is exact for a Gaussian prior and linear
point observations, and the EDM sampler with it samples the Kalman posterior.

Problem (nside 8, 3 correlated channels, squared-exponential kernel, 2000 km, 128
spatial modes + floor): 24 point observations at pixels >= 3500 km apart, sigma_y =
0.2 prior std. The exact prior denoiser plays the network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxguide.model import gaussian

from jaxguide.diffusion import guidance, sampler

from jaxguide.grid import healpix

NSIDE = 8
N_OBS = 24
SIGMA_MAX = 800.0  # the mean contraction sqrt(lam_max / (lam_max + sigma_max^2)) is < 1e-2


def _problem():
    prior = gaussian.make_prior(
        NSIDE, [0.0, 0.0, 0.0], [1.0, 0.7, 0.5],
        [[1.0, 0.6, 0.3], [0.6, 1.0, 0.5], [0.3, 0.5, 1.0]], 2000.0, max_modes=128)
    rng = np.random.default_rng(0)
    lon, lat = np.deg2rad(healpix.lonlat(NSIDE))
    p = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)
    chosen: list[int] = []
    for i in rng.permutation(p.shape[0]):
        if all(np.linalg.norm(p[i] - p[j]) * gaussian.EARTH_RADIUS_KM >= 3500 for j in chosen):
            chosen.append(int(i))
        if len(chosen) == N_OBS:
            break
    assert len(chosen) == N_OBS
    px = np.array(chosen)
    ch = rng.integers(0, 3, N_OBS)
    A, H = gaussian.point_observations(prior.shape, ch, px)
    sigma_y = 0.2 * prior.std()[ch, 0, px]
    with jax.enable_x64(True):
        truth = np.asarray(prior.sample(jax.random.PRNGKey(1), 1, jnp.float64)[0])
    y = H @ truth.reshape(-1) + sigma_y * rng.standard_normal(N_OBS)
    return prior, A, H, y, sigma_y, truth


@pytest.fixture(scope="module")
def problem():
    return _problem()


@pytest.mark.parametrize("solver,iters", [("cg", N_OBS), ("gmres", N_OBS - 1)])
def test_mmps_equals_exact_posterior_denoiser(problem, solver, iters):
    prior, A, H, y, sigma_y, truth = problem
    with jax.enable_x64(True):
        exact = jax.jit(prior.posterior_denoiser(H, y, sigma_y))
        guided = jax.jit(guidance.MMPS(cg_iters=iters, solver=solver)(prior.denoiser, guidance.Observations(A, y, sigma_y)))
        for i, s in enumerate([0.02, 0.3, 1.0, 5.0, 80.0]):
            x_t = truth + s * np.asarray(jax.random.normal(jax.random.PRNGKey(i), truth.shape, jnp.float64))
            a, b = np.asarray(guided(x_t, s)), np.asarray(exact(x_t, s))
            # the guidance term alone must be right, not just D: compare the updates
            upd = b - np.asarray(prior.denoiser(jnp.asarray(x_t), s))
            rel = np.linalg.norm(a - b) / np.linalg.norm(b)
            assert rel < 1e-4, (s, rel)  # tolerance 1e-4 relative (converged solve)
            assert np.linalg.norm(a - b) < 1e-4 * np.linalg.norm(upd), s


def test_mmps_without_network_jacobian_is_not_exact(problem):
    """Control: the test above can fail. DPS (V_t = 0) misses the posterior at sigma = 5."""
    prior, A, H, y, sigma_y, truth = problem
    with jax.enable_x64(True):
        x_t = truth + 5.0 * np.asarray(jax.random.normal(jax.random.PRNGKey(0), truth.shape, jnp.float64))
        b = np.asarray(prior.posterior_denoiser(H, y, sigma_y)(x_t, 5.0))
        a = np.asarray(guidance.DPS()(prior.denoiser, guidance.Observations(A, y, sigma_y))(jnp.asarray(x_t), 5.0))
        assert np.linalg.norm(a - b) / np.linalg.norm(b) > 1e-2


def test_ensemble_matches_kalman_posterior(problem):
    """1024 members, 32 Heun steps, MMPS with 4 CG iterations (float32).

    Monte-Carlo error of the mean: RMS over pixels of (post std / prior std) / sqrt(1024)
    ~ 0.028 vs the bound 0.05; of the spread ratio: ~ 1/sqrt(2 * 1024) = 0.022 per
    pixel, much less averaged, vs the bound 0.1.
    """
    prior, A, H, y, sigma_y, _ = problem
    post_mean, post_cov = prior.posterior(H, y, sigma_y)
    post_std = np.sqrt(np.diag(post_cov)).reshape(prior.shape)
    prior_std = prior.std()
    members = 1024

    @jax.jit
    def ensemble(keys, prior, y):
        den = guidance.MMPS(cg_iters=4)(prior.denoiser, guidance.Observations(A, y, sigma_y))
        run = lambda k: sampler.sample(den, k, prior.shape, num_steps=32, sigma_min=0.002,  # noqa: E731
                                       sigma_max=SIGMA_MAX)
        return jax.vmap(run)(keys)

    ens = np.asarray(ensemble(jax.random.split(jax.random.PRNGKey(7), members), prior,
                              jnp.asarray(y, jnp.float32)), np.float64)
    assert ens.shape == (members, *prior.shape)
    mean_err = np.sqrt(np.mean(((ens.mean(0) - post_mean) / prior_std) ** 2))
    spread = np.mean(ens.std(0, ddof=1) / post_std)
    # expected mean error from Monte-Carlo alone, for the report
    mc = np.sqrt(np.mean((post_std / prior_std) ** 2) / members)
    print(f"ensemble mean error {mean_err:.4f} prior-std RMS (MC {mc:.4f}); spread ratio {spread:.4f}")
    assert mean_err < 0.05
    assert 0.9 <= spread <= 1.1
    # The observations must matter (the test would pass for the prior otherwise):
    prior_err = np.sqrt(np.mean(((np.asarray(prior.mu) - post_mean) / prior_std) ** 2))
    assert prior_err > 3 * mean_err
