"""Guidance for data assimilation as transforms of a denoiser.

A guidance method is a frozen dataclass of its hyperparameters (swirl-dynamics'
``Transform`` style). Calling it on a denoiser and the observations returns the guided
denoiser, with the same signature::

    guided = MMPS(cg_iters=3)(denoise_fn, Observations(A, y, sigma_y))
    x0_hat = guided(x, sigma, cond)        # as denoise_fn(x, sigma, cond)

Denoiser contract: ``denoise_fn(x, sigma, cond) -> x0_hat`` for one member, ``x`` the
noisy state (any shape, e.g. (C, 1, npix) normalised), ``sigma`` a scalar, ``cond`` a
pytree of conditioning inputs (calendar, SST, ...; None when there is none). The guided
function takes ``cond`` too (default None), so ``lambda x, s: guided(x, s, cond)`` is
what the sampler (:func:`jaxguide.diffusion.sampler.sample`) runs; it never knows the method.

All methods have the form (see ``docs/guidance.md``)::

    D_y(x_t, sigma) = D + sigma^2 grad_{x_t} log N(y; A(D), Sigma_y + A V_t A^T)

and differ in the covariance ``V_t`` of x given x_t (0 for regression/DPS, gamma sigma^2 I
for SDA, r^2 I for PiGDM, the exact Tweedie ``sigma^2 J`` for MMPS, J = dD/dx_t).

Methods and observations are pytrees: array hyperparameters (``scale``, ``gamma``,
``data_std``) and the observation arrays are leaves (traceable: pass them through
``jit`` as arguments, differentiate with respect to them); the rest (``cg_iters``,
``solver``, ``cg_unroll``, ``norm_matching``, ``no_network_grad``) is static, part of
the compiled program.

Costs are per call of the guided denoiser: "forward" = one network evaluation, "VJP" =
one vector-Jacobian product through the network (~2 forwards). The network forward is
shared by the prior and the guidance term (``jax.vjp`` returns both). A is assumed cheap.

Value checks (NaN in y, sigma_y <= 0, gamma < 0) run when the values are concrete, i.e.
when the guided denoiser is built outside ``jit``; shape checks also run at trace time
inside ``jit`` (shapes are static). Failures raise :class:`GuidanceInputError`.

Padding: an observation whose operator row is zero (e.g. a
:class:`~jaxguide.observations.operator.PointObservationOperator` row with zero weights), with
y = 0 and any sigma_y > 0, contributes exactly nothing to any method (its residual and
its row of ``A'`` are zero, so CG/GMRES never leave the subspace of the real rows);
:func:`jaxguide.observations.prepare.pad` uses this so that different observation counts share
one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxguide.diffusion.solvers import cg, gmres

Cond = Any  # pytree of conditioning inputs, or None
Denoiser = Callable[..., jax.Array]  # (x, sigma, cond) -> x0_hat
Operator = Callable[[jax.Array], jax.Array]  # x -> (n_obs,)

SOLVERS = ("cg", "gmres")


class GuidanceInputError(ValueError):
    """Invalid observations, error model, operator or option for a guidance method."""


@struct.dataclass
class Observations:
    """``y = A(x) + eta``, ``eta ~ N(0, Sigma_y)``, ``Sigma_y = diag(sigma_y^2) + U U^T``.

    Fields (all pytree leaves):
      A: differentiable ``x -> (n_obs,)`` (linear or not; linearised at D). A registered
        pytree (e.g. :class:`~jaxguide.observations.operator.PointObservationOperator`) can be
        passed through ``jit`` as an argument; a plain function only closed over.
      y: (n_obs,) observations, in the units A returns.
      sigma_y: scalar or (n_obs,) observation-error std (same units as y).
      cov_factor: optional U (n_obs, r): low-rank correlated errors (solved with
        Woodbury, an r x r solve).
    """

    A: Any
    y: Any
    sigma_y: Any
    cov_factor: Any = None

    @property
    def num_obs(self) -> int:
        return int(jnp.shape(self.y)[0])

    def check(self) -> None:
        """Shapes always; values when concrete (see the module doc)."""
        _validate(self.y, self.sigma_y, self.cov_factor)


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
            raise GuidanceInputError(f"cov_factor must be (n_obs={y_shape[0]}, r), got {u_shape}")
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


def _check_nonneg(name: str, value) -> None:
    v = _concrete(value)
    if v is not None and not (np.all(np.isfinite(v)) and np.all(v >= 0)):
        raise GuidanceInputError(f"{name} must be finite and >= 0, got {v}")


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


def _linearise(den, A, y, x, sigma, with_vjp=True):
    """One network forward (+ its VJP closure) and A linearised at D; ``den(x, sigma)``.

    Returns D, den_vjp (u -> J^T u, or None), A(D), A_jvp (z -> A' z), A_T (w -> A'^T w).
    """
    if with_vjp:
        D, vjp = jax.vjp(lambda z: den(z, sigma), x)
        den_vjp = lambda u: vjp(u.astype(D.dtype))[0]  # noqa: E731
    else:
        D, den_vjp = den(x, sigma), None
    ad, a_jvp = jax.linearize(A, D)
    _check_obs_shape(ad, y)
    a_t_raw = jax.linear_transpose(a_jvp, D)
    a_t = lambda w: a_t_raw(w.astype(ad.dtype))[0]  # noqa: E731
    return D, den_vjp, ad, a_jvp, a_t


def _cast(obs: Observations, dtype):
    y = jnp.asarray(obs.y).astype(dtype)
    sy = jnp.asarray(obs.sigma_y).astype(dtype)
    U = None if obs.cov_factor is None else jnp.asarray(obs.cov_factor).astype(dtype)
    return y, sy, U


# --------------------------------------------------------------------------------------
# methods


class Method:
    """Base of the guidance methods: ``method(denoise_fn, obs) -> guided_fn``.

    Subclasses are ``flax.struct`` dataclasses (frozen, pytrees) and implement
    ``_guide(den, obs, x, sigma)`` with ``den(x, sigma)`` the denoiser with its
    conditioning bound.
    """

    name: ClassVar[str] = ""

    def check(self) -> None:
        """Option checks (values when concrete); raise :class:`GuidanceInputError`."""

    def __call__(self, denoise_fn: Denoiser, obs: Observations) -> Denoiser:
        if not isinstance(obs, Observations):
            raise GuidanceInputError(f"obs must be guidance.Observations, got {type(obs).__name__}")
        obs.check()
        self.check()

        def guided(x, sigma, cond: Cond = None):
            return self._guide(lambda z, s: denoise_fn(z, s, cond), obs, x, sigma)

        return guided

    def _guide(self, den, obs: Observations, x, sigma):  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The hyperparameters as plain Python values (for provenance; arrays as lists)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            c = _concrete(v)
            out[f.name] = v if isinstance(v, (bool, int, str)) or c is None else c.tolist()
        return out


@struct.dataclass
class Regression(Method):
    """Regression guidance (the seed's / cBottle's ``guidance_fn``).

    ``L = 1/2 (A(D) - y)^T Sigma_y^-1 (A(D) - y)`` (= ``||A(D) - y||^2 / (2 sigma_y^2)``
    for diagonal errors), ``D_y = D - scale * dL/dx_t`` with the gradient through the
    network (``dL/dx_t = J^T A'^T Sigma_y^-1 (A(D) - y)``).

    ``scale`` is a free knob in normalised units^2 (cBottle uses ``sigma_y^2`` = one full
    correction per call when J ~ I); it does not shrink with sigma, which is why this is
    over-confident at high noise. ``norm_matching``: rescale the step to the norm of
    ``(x_t - D) / sigma`` times sigma (classifier-guidance style), ``D - scale sigma
    ||score||/||g|| g``. ``no_network_grad``: take the gradient w.r.t. D only (J = I):
    cheap and biased.

    ``cap`` (default True): each observation's weight ``scale / sigma_y^2`` is capped at 1,
    i.e. the step uses ``min(scale, sigma_y^2)`` per observation: at most one full
    correction per call (the seed's ``sigma_y^2`` convention), so no scale can make the
    misfit grow (with J ~ I each call multiplies it by ``1 - min(scale, sigma_y^2) /
    sigma_y^2`` in [0, 1); uncapped it diverges for scale > 2 sigma_y^2, e.g. scale 1 on
    cBottle, 100-400 x sigma_y^2). The default ``scale=1`` is thus the seed's convention
    for any sigma_y; a scale below sigma_y^2 is used as given. ``cap=False``: the raw
    formula (not with ``norm_matching``, whose step norm is set by the score).

    Cost: 1 forward + 1 VJP (``no_network_grad``: 1 forward).
    """

    name: ClassVar[str] = "regression"
    scale: Any = 1.0
    norm_matching: bool = struct.field(pytree_node=False, default=False)
    no_network_grad: bool = struct.field(pytree_node=False, default=False)
    cap: bool = struct.field(pytree_node=False, default=True)

    def check(self) -> None:
        _check_nonneg("scale", self.scale)

    def _guide(self, den, obs, x, sigma):
        return _regression(den, obs, x, sigma, self.scale, self.norm_matching, self.no_network_grad, self.cap)


def _regression(den, obs, x, sigma, scale, norm_matching=False, no_network_grad=False, cap=False):
    D, den_vjp, ad, _, a_t = _linearise(den, obs.A, obs.y, x, sigma, not no_network_grad)
    yy, sy, U = _cast(obs, D.dtype)
    w = _obs_cov_solve(ad - yy, sy, U, 0.0)
    scale = jnp.asarray(scale, D.dtype)
    if cap and not norm_matching:
        # per observation min(scale, sigma_y^2): at most one full correction per call
        w, scale = jnp.minimum(scale, jnp.broadcast_to(sy**2, w.shape)) * w, jnp.ones((), D.dtype)
    g = a_t(w)
    if not no_network_grad:
        g = den_vjp(g)
    step = scale * g
    if norm_matching:
        gn = jnp.linalg.norm(g)
        sn = jnp.linalg.norm((x - D) / sigma)
        ok = gn > 0
        step = step * jnp.where(ok, sigma * sn / jnp.where(ok, gn, 1.0), 0.0)
    return D - step


@struct.dataclass
class DPS(Method):
    """DPS: ``D_y = D + sigma^2 scale grad_{x_t} log N(y; A(D), Sigma_y)`` (V_t = 0).

    Relation to :class:`Regression`: identical with the regression scale set to
    ``scale * sigma^2`` at each noise level (DPS's step shrinks with sigma; the seed's
    regression scale is constant). ``scale = 1`` is the Tweedie-consistent weight with
    V_t = 0; it equals :class:`SDA` with ``gamma = 0``.

    ``cap`` (default True): as :class:`Regression`'s, the per-observation weight ``scale
    sigma^2 / sigma_y^2`` is capped at 1 (at most one full correction per call). Uncapped,
    at large sigma the step is ~ s_d^2 / sigma_y^2 (100-400 on cBottle) times the misfit
    and overshoots; capped, DPS is unchanged once ``scale sigma^2 <= sigma_y^2``.
    ``cap=False``: the raw formula.

    Cost: 1 forward + 1 VJP.
    """

    name: ClassVar[str] = "dps"
    scale: Any = 1.0
    cap: bool = struct.field(pytree_node=False, default=True)

    def check(self) -> None:
        _check_nonneg("scale", self.scale)

    def _guide(self, den, obs, x, sigma):
        return _regression(den, obs, x, sigma, jnp.asarray(self.scale) * sigma**2, cap=self.cap)


def _isotropic(den, obs, x, sigma, var_fn, scale):
    """``D + scale sigma^2 J^T A'^T (Sigma_y + v(sigma) I)^-1 (y - A(D))``.

    Uses A A^T ~ I in ``Sigma_y + A V_t A^T`` with V_t = v I (exact for point selection).
    """
    D, den_vjp, ad, _, a_t = _linearise(den, obs.A, obs.y, x, sigma)
    yy, sy, U = _cast(obs, D.dtype)
    v = _obs_cov_solve(yy - ad, sy, U, var_fn(jnp.asarray(sigma, D.dtype)))
    return D + jnp.asarray(scale, D.dtype) * sigma**2 * den_vjp(a_t(v))


@struct.dataclass
class SDA(Method):
    """SDA (Rozet & Louppe 2023): V_t = gamma sigma^2 I, i.e. the residual is divided by
    ``sigma_y^2 + gamma sigma^2``: ``D_y = D + scale sigma^2 J^T A'^T (Sigma_y +
    gamma sigma^2 I)^-1 (y - A(D))``, A' = dA/dx at D. The ``gamma sigma^2 I`` term is in
    observation space, as in the paper (= A V_t A^T for point selection);
    :func:`gaussian_evidence` with ``scale=0`` is the evidence whose gradient this is, for
    any operator. gamma ~ 1e-3..3e-2.

    Cost: 1 forward + 1 VJP.
    """

    name: ClassVar[str] = "sda"
    gamma: Any = 1e-2
    scale: Any = 1.0

    def check(self) -> None:
        _check_nonneg("gamma", self.gamma)
        _check_nonneg("scale", self.scale)

    def _guide(self, den, obs, x, sigma):
        return _isotropic(den, obs, x, sigma, lambda s: self.gamma * s**2, self.scale)


@struct.dataclass
class PiGDM(Method):
    """PiGDM (Song et al. 2023): V_t = r^2 I, ``r^2 = sigma^2 s_d^2 / (sigma^2 + s_d^2)``
    (the posterior variance of a N(0, s_d^2) prior), s_d = ``data_std`` (1 after
    normalisation). As in :class:`SDA`, A A^T is taken as I.

    Cost: 1 forward + 1 VJP.
    """

    name: ClassVar[str] = "pigdm"
    data_std: Any = 1.0
    scale: Any = 1.0

    def check(self) -> None:
        _check_nonneg("data_std", self.data_std)
        _check_nonneg("scale", self.scale)

    def _guide(self, den, obs, x, sigma):
        sd2 = self.data_std**2
        return _isotropic(den, obs, x, sigma, lambda s: s**2 * sd2 / (s**2 + sd2), self.scale)


@struct.dataclass
class MMPS(Method):
    """MMPS (Rozet et al. 2024): exact Tweedie covariance V_t = sigma^2 J.

    Solves ``(Sigma_y + sigma^2 A' J A'^T) v = y - A(D)`` matrix-free with ``cg_iters``
    iterations of CG (or ``solver="gmres"``: J is only nearly symmetric for a learned
    network), then ``D_y = D + scale sigma^2 J^T A'^T v``. J v is taken as J^T v (J
    symmetric for an exact denoiser), so every matvec is one VJP through the network.
    Exact (for a converged solve) when the prior is Gaussian and A linear:
    D_y = E[x | x_t, y]. ``cg_unroll=False`` keeps the CG iterations as a loop (smaller
    program, slower VJPs on CPU).

    Cost: 1 forward + (cg_iters + 1) VJPs.
    """

    name: ClassVar[str] = "mmps"
    cg_iters: int = struct.field(pytree_node=False, default=3)
    solver: str = struct.field(pytree_node=False, default="cg")
    scale: Any = 1.0
    cg_unroll: bool = struct.field(pytree_node=False, default=True)

    def check(self) -> None:
        it = self.cg_iters
        if isinstance(it, bool) or not isinstance(it, (int, np.integer)) or it < 1:
            raise GuidanceInputError(f"cg_iters must be an integer >= 1, got {it!r}")
        if self.solver not in SOLVERS:
            raise GuidanceInputError(f"unknown solver {self.solver!r}; expected one of {SOLVERS}")
        _check_nonneg("scale", self.scale)

    def _guide(self, den, obs, x, sigma):
        solve = functools.partial(cg, unroll=self.cg_unroll) if self.solver == "cg" else gmres
        D, den_vjp, ad, a_jvp, a_t = _linearise(den, obs.A, obs.y, x, sigma)
        yy, sy, U = _cast(obs, D.dtype)
        s2 = jnp.asarray(sigma, D.dtype) ** 2

        def matvec(w):
            return _obs_cov_matvec(w, sy, U) + s2 * a_jvp(den_vjp(a_t(w))).astype(w.dtype)

        v = solve(matvec, yy - ad, int(self.cg_iters))
        return D + jnp.asarray(self.scale, D.dtype) * s2 * den_vjp(a_t(v))


@struct.dataclass
class Replacement(Method):
    """Infill baseline (cBottle-style): put y into the denoised estimate.

    ``D_y = D + A^T (y - A D)`` with A^T from the VJP of A. This overwrites the observed
    values exactly only when A is a selection (rows are distinct unit vectors); for
    interpolating operators it is an approximation. sigma_y is ignored (checked only).

    Cost: 1 forward.
    """

    name: ClassVar[str] = "replacement"

    def _guide(self, den, obs, x, sigma):
        D = den(x, sigma)
        ad, a_vjp = jax.vjp(obs.A, D)
        _check_obs_shape(ad, obs.y)
        return D + a_vjp(jnp.asarray(obs.y).astype(ad.dtype) - ad)[0]


REGISTRY: dict[str, type[Method]] = {
    cls.name: cls for cls in (Regression, DPS, SDA, PiGDM, MMPS, Replacement)}
METHODS: tuple[str, ...] = tuple(REGISTRY)


def option_names(name: str) -> tuple[str, ...]:
    """The hyperparameters of method ``name``."""
    return tuple(f.name for f in dataclasses.fields(_cls(name)))


def _cls(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise GuidanceInputError(f"unknown guidance method {name!r}; valid: {', '.join(METHODS)}")
    return REGISTRY[name]


def make(name: str, **options) -> Method:
    """Method by name (one of :data:`METHODS`) with the given hyperparameters.

    An option the method does not have is an error (it would otherwise be ignored)."""
    cls = _cls(name)
    unknown = sorted(set(options) - set(option_names(name)))
    if unknown:
        raise GuidanceInputError(
            f"method {name!r} has no option(s) {unknown}; its options: {list(option_names(name))}")
    method = cls(**options)
    method.check()
    return method


# --------------------------------------------------------------------------------------
# evidence


def gaussian_evidence(denoise_fn: Denoiser, obs: Observations, x_t, sigma, cond: Cond = None, *,
                      scale=1.0, gamma=0.0):
    """Log-evidence ``log N(y; A(D(x_t)), C)`` with
    ``C = Sigma_y + sigma^2 (scale A' J A'^T + gamma I)``.

    scale = 1, gamma = 0 is the Tweedie (MMPS) approximation of log p(y | x_t), exact for
    a Gaussian prior and linear A; scale inflates the Tweedie term and gamma adds
    :class:`SDA`'s term, ``gamma sigma^2 I`` in observation space exactly as SDA divides
    the residual by ``sigma_y^2 + gamma sigma^2`` (so with scale = 0 the gradient of this
    evidence is SDA's guidance, for any operator; a gamma tuned here is the gamma SDA uses). Differentiable w.r.t. sigma_y, scale, gamma (for tuning them by
    maximum likelihood) and anything the denoiser closes over. (Padded observations,
    see the module doc, each add the constant ``log N(0; 0, sigma_y^2)``.)

    Cost: 1 forward + n_obs VJPs (A' J A'^T built column by column with a vmap of VJPs)
    and an n_obs^3 Cholesky: for small n_obs (up to a few thousand).
    """
    obs.check()
    den = lambda z, s: denoise_fn(z, s, cond)  # noqa: E731
    D, den_vjp, ad, a_jvp, a_t = _linearise(den, obs.A, obs.y, x_t, sigma)
    yy, sy, U = _cast(obs, D.dtype)
    n = yy.shape[0]
    eye = jnp.eye(n, dtype=D.dtype)
    at_rows = jax.vmap(a_t)(eye)  # (n, *x.shape): A'^T e_i
    ajat = jax.vmap(lambda u: a_jvp(den_vjp(u)))(at_rows)
    s2 = jnp.asarray(sigma, D.dtype) ** 2
    cov = (_obs_cov_dense(sy, U, n, D.dtype)
           + s2 * (jnp.asarray(scale, D.dtype) * 0.5 * (ajat + ajat.T) + jnp.asarray(gamma, D.dtype) * eye))
    chol = jnp.linalg.cholesky(cov)
    z = jax.scipy.linalg.solve_triangular(chol, yy - ad, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))
    return -0.5 * (jnp.vdot(z, z) + logdet + n * jnp.log(2.0 * jnp.pi))
