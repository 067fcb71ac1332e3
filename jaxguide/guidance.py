"""Guidance for data assimilation as transforms of a denoiser.

Every method takes a denoiser ``D(x_t, sigma) -> x0_hat`` and observations
``y = A(x) + eta``, ``eta ~ N(0, Sigma_y)``, and returns a guided denoiser with the same
signature; the sampler (:func:`jaxguide.sampler.sample`) never knows which one it runs.
All of them have the form (see ``docs/guidance.md``)::

    D_y(x_t, sigma) = D + sigma^2 grad_{x_t} log N(y; A(D), Sigma_y + A V_t A^T)

and differ in the covariance ``V_t`` of x given x_t (0 for regression/DPS, gamma sigma^2 I
for SDA, r^2 I for PiGDM, the exact Tweedie ``sigma^2 J`` for MMPS, J = dD/dx_t).

Inputs, shared by all methods:
  A: differentiable ``x -> (n_obs,)`` (linear or not; linearised at D).
  y: (n_obs,) observations, in the units A returns.
  sigma_y: scalar or (n_obs,) observation-error std (same units as y).
  obs_cov_factor: optional U (n_obs, r): Sigma_y = diag(sigma_y^2) + U U^T (low-rank
    correlated errors; solved with Woodbury, an r x r solve).

Costs are per call of the guided denoiser: "forward" = one network evaluation, "VJP" =
one vector-Jacobian product through the network (~2 forwards). The network forward is
shared by the prior and the guidance term (``jax.vjp`` returns both). A is assumed cheap.

Value checks (NaN in y, sigma_y <= 0) run when the arrays are concrete, i.e. when the
guided denoiser is built outside ``jit``; shape checks also run at trace time inside
``jit`` (shapes are static). Failures raise :class:`GuidanceInputError`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Denoiser = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
Operator = Callable[[jnp.ndarray], jnp.ndarray]

METHODS = ("regression", "dps", "sda", "pigdm", "mmps", "replacement")
SOLVERS = ("cg", "gmres")


class GuidanceInputError(ValueError):
    """Invalid observations, error model, operator or option for a guidance method."""


# --------------------------------------------------------------------------------------
# validation


def _concrete(a):
    """NumPy value of ``a``, or None when it is a tracer (inside jit/vmap/grad)."""
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _validate(y, sigma_y, obs_cov_factor=None) -> None:
    y_shape = jnp.shape(y)
    if len(y_shape) != 1:
        raise GuidanceInputError(f"y must be 1-D (n_obs,), got shape {y_shape}")
    s_shape = jnp.shape(sigma_y)
    if s_shape not in ((), y_shape):
        raise GuidanceInputError(f"sigma_y must be a scalar or shape {y_shape}, got {s_shape}")
    if obs_cov_factor is not None:
        u_shape = jnp.shape(obs_cov_factor)
        if len(u_shape) != 2 or u_shape[0] != y_shape[0]:
            raise GuidanceInputError(f"obs_cov_factor must be (n_obs={y_shape[0]}, r), got {u_shape}")
    yv = _concrete(y)
    if yv is not None and not np.all(np.isfinite(yv)):
        raise GuidanceInputError(f"y contains {int(np.sum(~np.isfinite(yv)))} NaN/inf values")
    sv = _concrete(sigma_y)
    if sv is not None and not (np.all(np.isfinite(sv)) and np.all(sv > 0)):
        raise GuidanceInputError(f"sigma_y must be finite and > 0, got min {np.min(sv)}")


def _check_obs_shape(ad, y) -> None:
    if jnp.shape(ad) != jnp.shape(y):
        raise GuidanceInputError(
            f"A(x) has shape {jnp.shape(ad)} but y has shape {jnp.shape(y)}")


# --------------------------------------------------------------------------------------
# shared pieces


def _obs_cov_solve(r, sigma_y, U, c):
    """Solve (diag(sigma_y^2 + c) + U U^T) v = r; r (n_obs,), c scalar >= 0."""
    d = jnp.broadcast_to(sigma_y**2, r.shape) + c
    if U is None:
        return r / d
    U = U.astype(r.dtype)
    dr, du = r / d, U / d[:, None]
    small = jnp.eye(U.shape[1], dtype=r.dtype) + U.T @ du
    return dr - du @ jnp.linalg.solve(small, U.T @ dr)


def _obs_cov_matvec(w, sigma_y, U):
    out = jnp.broadcast_to(sigma_y**2, w.shape) * w
    if U is not None:
        U = U.astype(w.dtype)
        out = out + U @ (U.T @ w)
    return out


def _obs_cov_dense(sigma_y, U, n, dtype):
    c = jnp.diag(jnp.broadcast_to(jnp.asarray(sigma_y, dtype) ** 2, (n,)))
    if U is not None:
        U = jnp.asarray(U).astype(dtype)
        c = c + U @ U.T
    return c


def _linearise(denoiser, A, y, x, sigma, with_vjp=True):
    """One network forward (+ its VJP closure) and A linearised at D.

    Returns D, den_vjp (u -> J^T u, or None), A(D), A_jvp (z -> A' z), A_T (w -> A'^T w).
    """
    if with_vjp:
        D, vjp = jax.vjp(lambda z: denoiser(z, sigma), x)
        den_vjp = lambda u: vjp(u.astype(D.dtype))[0]  # noqa: E731
    else:
        D, den_vjp = denoiser(x, sigma), None
    ad, a_jvp = jax.linearize(A, D)
    _check_obs_shape(ad, y)
    a_t_raw = jax.linear_transpose(a_jvp, D)
    a_t = lambda w: a_t_raw(w.astype(ad.dtype))[0]  # noqa: E731
    return D, den_vjp, ad, a_jvp, a_t


def _cast(y, sigma_y, U, dtype):
    y = jnp.asarray(y).astype(dtype)
    sy = jnp.asarray(sigma_y).astype(dtype)
    U = None if U is None else jnp.asarray(U).astype(dtype)
    return y, sy, U


# --------------------------------------------------------------------------------------
# methods


def regression(
    denoiser: Denoiser,
    A: Operator,
    y,
    sigma_y,
    *,
    scale=1.0,
    norm_matching: bool = False,
    no_network_grad: bool = False,
    obs_cov_factor=None,
) -> Denoiser:
    """Regression guidance (the seed's / cBottle's ``guidance_fn``).

    ``L = 1/2 (A(D) - y)^T Sigma_y^-1 (A(D) - y)`` (= ``||A(D) - y||^2 / (2 sigma_y^2)``
    for diagonal errors), ``D_y = D - scale * dL/dx_t`` with the gradient through the
    network (``dL/dx_t = J^T A'^T Sigma_y^-1 (A(D) - y)``).

    ``scale`` is a free knob (cBottle uses ``sigma_y^2`` = one full correction per call
    when J ~ I); it does not shrink with sigma, which is why this is over-confident at
    high noise. ``norm_matching``: rescale the step to the norm of ``(x_t - D) / sigma``
    times sigma (classifier-guidance style), ``D - scale sigma ||score||/||g|| g``.
    ``no_network_grad``: take the gradient w.r.t. D only (J = I): cheap and biased.

    Cost: 1 forward + 1 VJP (``no_network_grad``: 1 forward).
    """
    _validate(y, sigma_y, obs_cov_factor)

    def guided(x, sigma):
        D, den_vjp, ad, _, a_t = _linearise(denoiser, A, y, x, sigma, not no_network_grad)
        yy, sy, U = _cast(y, sigma_y, obs_cov_factor, D.dtype)
        g = a_t(_obs_cov_solve(ad - yy, sy, U, 0.0))
        if not no_network_grad:
            g = den_vjp(g)
        step = jnp.asarray(scale, D.dtype) * g
        if norm_matching:
            gn = jnp.linalg.norm(g)
            sn = jnp.linalg.norm((x - D) / sigma)
            ok = gn > 0
            step = step * jnp.where(ok, sigma * sn / jnp.where(ok, gn, 1.0), 0.0)
        return D - step

    return guided


def dps(denoiser: Denoiser, A: Operator, y, sigma_y, *, scale=1.0, obs_cov_factor=None) -> Denoiser:
    """DPS: ``D_y = D + sigma^2 scale grad_{x_t} log N(y; A(D), Sigma_y)`` (V_t = 0).

    Relation to :func:`regression`: identical with the regression scale set to
    ``scale * sigma^2`` at each noise level (DPS's step shrinks with sigma; the seed's
    regression scale is constant). ``scale = 1`` is the Tweedie-consistent weight with
    V_t = 0; it equals :func:`sda` with ``gamma = 0``.

    Cost: 1 forward + 1 VJP.
    """
    _validate(y, sigma_y, obs_cov_factor)

    def guided(x, sigma):
        return regression(denoiser, A, y, sigma_y, scale=jnp.asarray(scale) * sigma**2,
                          obs_cov_factor=obs_cov_factor)(x, sigma)

    return guided


def _isotropic(denoiser, A, y, sigma_y, var_fn, scale, obs_cov_factor) -> Denoiser:
    """``D + scale sigma^2 J^T A'^T (Sigma_y + v(sigma) I)^-1 (y - A(D))``.

    Uses A A^T ~ I in ``Sigma_y + A V_t A^T`` with V_t = v I (exact for point selection).
    """

    def guided(x, sigma):
        D, den_vjp, ad, _, a_t = _linearise(denoiser, A, y, x, sigma)
        yy, sy, U = _cast(y, sigma_y, obs_cov_factor, D.dtype)
        v = _obs_cov_solve(yy - ad, sy, U, var_fn(jnp.asarray(sigma, D.dtype)))
        return D + jnp.asarray(scale, D.dtype) * sigma**2 * den_vjp(a_t(v))

    return guided


def sda(denoiser: Denoiser, A: Operator, y, sigma_y, *, gamma=1e-2, scale=1.0,
        obs_cov_factor=None) -> Denoiser:
    """SDA (Rozet & Louppe 2023): V_t = gamma sigma^2 I, i.e. the residual is divided by
    ``sigma_y^2 + gamma sigma^2``: ``D_y = D + scale sigma^2 J^T A'^T (Sigma_y +
    gamma sigma^2 I)^-1 (y - A(D))``, A' = dA/dx at D. A A^T is taken as I (exact for
    point selection). gamma ~ 1e-3..3e-2.

    Cost: 1 forward + 1 VJP.
    """
    _validate(y, sigma_y, obs_cov_factor)
    g = _concrete(gamma)
    if g is not None and not (np.isfinite(g) and g >= 0):
        raise GuidanceInputError(f"gamma must be finite and >= 0, got {g}")
    return _isotropic(denoiser, A, y, sigma_y, lambda s: gamma * s**2, scale, obs_cov_factor)


def pigdm(denoiser: Denoiser, A: Operator, y, sigma_y, *, data_std=1.0, scale=1.0,
          obs_cov_factor=None) -> Denoiser:
    """PiGDM (Song et al. 2023): V_t = r^2 I, ``r^2 = sigma^2 s_d^2 / (sigma^2 + s_d^2)``
    (the posterior variance of a N(0, s_d^2) prior), s_d = data std (1 after
    normalisation). As in :func:`sda`, A A^T is taken as I.

    Cost: 1 forward + 1 VJP.
    """
    _validate(y, sigma_y, obs_cov_factor)
    sd2 = data_std**2
    return _isotropic(denoiser, A, y, sigma_y, lambda s: s**2 * sd2 / (s**2 + sd2), scale,
                      obs_cov_factor)


def _cg(matvec, b, iters, unroll=True):
    """``iters`` conjugate-gradient iterations from 0 (fixed count: one program, and
    reverse-differentiable).

    ``unroll=True`` traces the iterations one after another instead of as a loop: on
    XLA:CPU the loop made the VJPs inside it ~3x slower (benchmarks/README.md).

    Once the residual is at round-off (``|r|^2 <= eps^2 |b|^2``) the iterate is frozen:
    continuing would divide by ``p^T A p ~ |r|^2`` -> 0, which the forward pass survives
    but whose derivative (``rs / pap^2``) overflows to inf/NaN in the reverse pass (seen
    when sigma_y^2 dominates the system, e.g. at small sigma, where CG converges in 1-2
    iterations)."""
    rs0 = jnp.vdot(b, b)
    tol = jnp.finfo(b.dtype).eps ** 2 * rs0

    def body(_, st):
        x, r, p, rs = st
        active = rs > tol
        ap = matvec(p)
        pap = jnp.vdot(p, ap)
        ok = active & (pap > 0)
        alpha = jnp.where(ok, rs / jnp.where(ok, pap, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = jnp.where(ok, jnp.vdot(r, r), rs)
        beta = jnp.where(ok, rs_new / jnp.where(ok, rs, 1.0), 0.0)
        return x, r, r + beta * p, rs_new

    state = (jnp.zeros_like(b), b, b, rs0)
    if not unroll:
        return jax.lax.fori_loop(0, iters, body, state)[0]
    # a Python loop, not fori_loop(unroll=True): that one keeps a while loop when
    # iters == 1 (measured 4.1x instead of 2.8x an unguided call at k = 1)
    for i in range(iters):
        state = body(i, state)
    return state[0]


def _gmres(matvec, b, iters):
    """``iters`` GMRES iterations from 0, no restart (Arnoldi with modified Gram-Schmidt,
    unrolled; the small least-squares problem solved by ``lstsq``)."""
    beta = jnp.linalg.norm(b)
    tiny = jnp.finfo(b.dtype).tiny
    vs = [b / jnp.maximum(beta, tiny)]
    h = jnp.zeros((iters + 1, iters), b.dtype)
    for j in range(iters):
        w = matvec(vs[j])
        for i in range(j + 1):
            hij = jnp.vdot(vs[i], w)
            h = h.at[i, j].set(hij)
            w = w - hij * vs[i]
        hn = jnp.linalg.norm(w)
        h = h.at[j + 1, j].set(hn)
        vs.append(w / jnp.maximum(hn, tiny))
    e1 = jnp.zeros(iters + 1, b.dtype).at[0].set(beta)
    c = jnp.linalg.lstsq(h, e1)[0]
    return jnp.stack(vs[:iters], axis=1) @ c


def mmps(denoiser: Denoiser, A: Operator, y, sigma_y, *, cg_iters: int = 5, solver: str = "cg",
         scale=1.0, obs_cov_factor=None, cg_unroll: bool = True) -> Denoiser:
    """MMPS (Rozet et al. 2024): exact Tweedie covariance V_t = sigma^2 J.

    Solves ``(Sigma_y + sigma^2 A' J A'^T) v = y - A(D)`` matrix-free with ``cg_iters``
    iterations of CG (or GMRES: J is only nearly symmetric for a learned network), then
    ``D_y = D + scale sigma^2 J^T A'^T v``. J v is taken as J^T v (J symmetric for an
    exact denoiser), so every matvec is one VJP through the network. Exact (for a
    converged solve) when the prior is Gaussian and A linear: D_y = E[x | x_t, y].
    ``cg_unroll=False`` keeps the CG iterations as a loop (smaller program, slower VJPs
    on CPU).

    Cost: 1 forward + (cg_iters + 1) VJPs.
    """
    _validate(y, sigma_y, obs_cov_factor)
    if isinstance(cg_iters, bool) or not isinstance(cg_iters, (int, np.integer)) or cg_iters < 1:
        raise GuidanceInputError(f"cg_iters must be an integer >= 1, got {cg_iters!r}")
    if solver not in SOLVERS:
        raise GuidanceInputError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    solve = functools.partial(_cg, unroll=cg_unroll) if solver == "cg" else _gmres

    def guided(x, sigma):
        D, den_vjp, ad, a_jvp, a_t = _linearise(denoiser, A, y, x, sigma)
        yy, sy, U = _cast(y, sigma_y, obs_cov_factor, D.dtype)
        s2 = jnp.asarray(sigma, D.dtype) ** 2

        def matvec(w):
            return _obs_cov_matvec(w, sy, U) + s2 * a_jvp(den_vjp(a_t(w))).astype(w.dtype)

        v = solve(matvec, yy - ad, int(cg_iters))
        return D + jnp.asarray(scale, D.dtype) * s2 * den_vjp(a_t(v))

    return guided


def replacement(denoiser: Denoiser, A: Operator, y, sigma_y=None, *, mask_fn=None) -> Denoiser:
    """Infill baseline (cBottle-style): put y into the denoised estimate.

    ``D_y = D + A^T (y - A D)`` with A^T from the VJP of A. This overwrites the observed
    values exactly only when A is a selection (rows are distinct unit vectors); for
    interpolating operators it is an approximation. ``mask_fn(D) -> bool`` (broadcastable
    to D) optionally restricts the update to a mask. sigma_y is ignored (checked only).

    Cost: 1 forward.
    """
    _validate(y, 1.0 if sigma_y is None else sigma_y)

    def guided(x, sigma):
        D = denoiser(x, sigma)
        ad, a_vjp = jax.vjp(A, D)
        _check_obs_shape(ad, y)
        upd = D + a_vjp(jnp.asarray(y).astype(ad.dtype) - ad)[0]
        if mask_fn is not None:
            upd = jnp.where(mask_fn(D), upd, D)
        return upd

    return guided


_DISPATCH = {"regression": regression, "dps": dps, "sda": sda, "pigdm": pigdm, "mmps": mmps,
             "replacement": replacement}


def apply(method: str, denoiser: Denoiser, A: Operator, y, sigma_y, **options) -> Denoiser:
    """Guided denoiser by method name (one of :data:`METHODS`)."""
    if method not in _DISPATCH:
        raise GuidanceInputError(f"unknown guidance method {method!r}; valid: {', '.join(METHODS)}")
    return _DISPATCH[method](denoiser, A, y, sigma_y, **options)


# --------------------------------------------------------------------------------------
# evidence


def gaussian_evidence(denoiser: Denoiser, A: Operator, y, sigma_y, x_t, sigma, *, scale=1.0,
                      gamma=0.0, obs_cov_factor=None):
    """Log-evidence ``log N(y; A(D(x_t)), C)`` with
    ``C = Sigma_y + sigma^2 (scale A' J A'^T + gamma A' A'^T)``.

    scale = 1, gamma = 0 is the Tweedie (MMPS) approximation of log p(y | x_t), exact for
    a Gaussian prior and linear A; scale inflates the Tweedie term and gamma adds the
    SDA-style term. Differentiable w.r.t. sigma_y, scale, gamma (for tuning them by
    maximum likelihood) and anything the denoiser closes over.

    Cost: 1 forward + n_obs VJPs (A' J A'^T built column by column with a vmap of VJPs)
    and an n_obs^3 Cholesky: for small n_obs (up to a few thousand).
    """
    _validate(y, sigma_y, obs_cov_factor)
    D, den_vjp, ad, a_jvp, a_t = _linearise(denoiser, A, y, x_t, sigma)
    yy, sy, U = _cast(y, sigma_y, obs_cov_factor, D.dtype)
    n = yy.shape[0]
    eye = jnp.eye(n, dtype=D.dtype)
    at_rows = jax.vmap(a_t)(eye)  # (n, *x.shape): A'^T e_i
    ajat = jax.vmap(lambda u: a_jvp(den_vjp(u)))(at_rows)
    aat = jax.vmap(a_jvp)(at_rows)
    s2 = jnp.asarray(sigma, D.dtype) ** 2
    cov = (_obs_cov_dense(sy, U, n, D.dtype)
           + s2 * (jnp.asarray(scale, D.dtype) * 0.5 * (ajat + ajat.T)
                   + jnp.asarray(gamma, D.dtype) * 0.5 * (aat + aat.T)))
    chol = jnp.linalg.cholesky(cov)
    z = jax.scipy.linalg.solve_triangular(chol, yy - ad, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))
    return -0.5 * (jnp.vdot(z, z) + logdet + n * jnp.log(2.0 * jnp.pi))
