"""MMPS's fixed-count CG stays differentiable after it has converged.

Regression test: when sigma_y^2 dominates the MMPS system (small sigma, large assumed
observation error) CG converges in one or two iterations; the remaining iterations used
to divide by ``p^T A p ~ 0`` and the reverse pass returned NaN (found by
examples/learn_sigma_y.py when sigma_y started 5x too large).

The gradients are not only finite but right: they match central finite differences of
the same function evaluated in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.model import gaussian

from jaxguide.diffusion import guidance

SIGMAS = (0.01, 0.5, 5.0)
LOG_SY = float(np.log(1.5))


def _loss(dtype, cg_unroll=True):
    """f(log sigma_y, sigma) = |MMPS denoiser(x, sigma)|^2 with 16 CG iterations, in ``dtype``."""
    prior = gaussian.make_prior(4, [0.0, 0.0], [1.0, 0.5], [[1.0, 0.3], [0.3, 1.0]], 3000.0)
    rng = np.random.default_rng(0)
    A, _ = gaussian.point_observations(prior.shape, rng.integers(0, 2, 20), rng.choice(192, 20, replace=False))
    y = jnp.asarray(rng.standard_normal(20), dtype)
    x = jnp.asarray(rng.standard_normal(prior.shape), dtype)

    def f(log_sy, sigma):
        den = guidance.MMPS(cg_iters=16, cg_unroll=cg_unroll)(prior.denoiser, guidance.Observations(A, y, jnp.exp(log_sy)))
        return jnp.sum(den(x, sigma) ** 2)

    return f


def _fd_reference() -> dict:
    """d f / d(log sigma_y) and d f / d sigma at (LOG_SY, sigma) for each sigma: central
    differences of f in float64, relative step 1e-5 (truncation ~1e-10, round-off
    ~eps64 |f| / h ~1e-10 relative: measured agreement with float64 autodiff <= 1.2e-7).
    f is evaluated with the CG iterations as a loop (``cg_unroll=False``: the same
    arithmetic, test_guidance.test_cg_loop_equals_unrolled; 4x faster to compile)."""
    with jax.enable_x64(True):
        f = jax.jit(_loss(jnp.float64, cg_unroll=False))
        out = {}
        for sigma in SIGMAS:
            p = (LOG_SY, sigma)
            for i in range(2):
                h = 1e-5 * abs(p[i])
                up, down = list(p), list(p)
                up[i] += h
                down[i] -= h
                out[sigma, i] = (float(f(*up)) - float(f(*down))) / (2 * h)
    return out


def test_mmps_gradient_finite_after_cg_convergence():
    """float32 (the regime of the NaN), default unrolled CG: finite, and equal to the
    float64 finite differences within 2e-5 relative. Measured (CPU): <= 4.3e-6, the
    largest for the smallest derivative (d/d log sigma_y = 1e-3 at sigma = 0.01; the
    others <= 1.1e-6): float32 round-off of a 20-observation solve. A dropped gradient
    path is far outside (a constant sigma_y in the CG matvec: 100 %; the CG step lengths
    alpha held constant in the reverse pass: 1e-4 at sigma = 5)."""
    f = _loss(jnp.float32)
    fd = _fd_reference()
    for sigma in SIGMAS:
        val, grad = jax.value_and_grad(f, argnums=(0, 1))(jnp.log(jnp.float32(1.5)), jnp.float32(sigma))
        assert np.isfinite(float(val)) and np.isfinite(float(grad[0])) and np.isfinite(float(grad[1])), (sigma, val, grad)
        for i in range(2):
            g, want = float(grad[i]), fd[sigma, i]
            assert abs(g - want) <= 2e-5 * abs(want), (sigma, ("log sigma_y", "sigma")[i], g, want)
