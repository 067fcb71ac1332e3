"""MMPS's fixed-count CG stays differentiable after it has converged.

Regression test: when sigma_y^2 dominates the MMPS system (small sigma, large assumed
observation error) CG converges in one or two iterations; the remaining iterations used
to divide by ``p^T A p ~ 0`` and the reverse pass returned NaN (found by
examples/learn_sigma_y.py when sigma_y started 5x too large).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.model import gaussian

from jaxguide.diffusion import guidance


def test_mmps_gradient_finite_after_cg_convergence():
    prior = gaussian.make_prior(4, [0.0, 0.0], [1.0, 0.5], [[1.0, 0.3], [0.3, 1.0]], 3000.0)
    rng = np.random.default_rng(0)
    A, _ = gaussian.point_observations(prior.shape, rng.integers(0, 2, 20), rng.choice(192, 20, replace=False))
    y = jnp.asarray(rng.standard_normal(20), jnp.float32)
    x = jnp.asarray(rng.standard_normal(prior.shape), jnp.float32)

    def f(log_sy, sigma):
        den = guidance.MMPS(cg_iters=16)(prior.denoiser, guidance.Observations(A, y, jnp.exp(log_sy)))
        return jnp.sum(den(x, sigma) ** 2)

    for sigma in (0.01, 0.5, 5.0):
        val, grad = jax.value_and_grad(f)(jnp.log(jnp.float32(1.5)), jnp.float32(sigma))
        assert np.isfinite(float(val)) and np.isfinite(float(grad)), (sigma, val, grad)
