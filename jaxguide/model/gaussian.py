"""Gaussian random-field prior on the HEALPix sphere: exact denoiser and exact posterior.

Why: with a Gaussian prior N(mu, Sigma) and a linear observation operator everything a
guided sampler approximates is available in closed form (the denoiser, the Tweedie
covariance, the Kalman posterior), so tests and benchmarks can measure guidance errors
against the truth instead of against another approximation.

State layout: ``(C, T, npix)`` (channel, frame, pixel), pixels in "net" order (any order
works: the covariance is built from the pixel coordinates of the chosen order). T = 1
is a single-time state; T > 1 a video window of T frames.

Covariance: ``Sigma = (S R S) kron K_time kron K`` with S = diag(channel stds), R the
(C, C) channel correlation, K_time the (T, T) unit-variance correlation of the frames
(:func:`time_correlation`: ``exp(-|lag| / tau)`` by default, the AR(1) /
Ornstein-Uhlenbeck process, for which the exact posterior is the Kalman smoother's)
and K a spatial kernel of chord distance (unit variance, plus a small nugget that keeps
it numerically positive definite). All three factors are stored by their
eigendecompositions, so ``Sigma = Q diag(lam) Q^T`` with ``Q = Qc kron Qt kron Qk``,
``lam = lc x lt x lk``, and applying any spectral function of Sigma costs two
(C T, npix) x (npix, npix) matmuls plus two small (C, C) and (T, T) contractions.
For T = 1, K_time = [[1]] and the time contractions are the identity (same code).

Dtype follows the inputs: float32 by default, float64 when x64 is enabled.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.grid import healpix
from jaxguide.model.window import FrameWindow

EARTH_RADIUS_KM = 6371.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianPrior:
    """N(mu, Sigma) on (C, T, npix) states; a pytree (pass it to jit as an argument).

    Fields:
      mu: (C, T, npix) mean.
      chan_vecs, chan_vals: (C, C), (C,) eigendecomposition of S R S.
      space_vecs, space_vals: (npix, r), (r,) leading eigenpairs of K (r = npix: all).
      space_floor: () variance of K on the complement of the r modes (0 when r = npix).
      time_vecs, time_vals: (T, T), (T,) eigendecomposition of K_time (default
        [[1]], [1]: a single time).
    """

    mu: jnp.ndarray
    chan_vecs: jnp.ndarray
    chan_vals: jnp.ndarray
    space_vecs: jnp.ndarray
    space_vals: jnp.ndarray
    space_floor: jnp.ndarray
    time_vecs: jnp.ndarray = dataclasses.field(default_factory=lambda: np.ones((1, 1)))
    time_vals: jnp.ndarray = dataclasses.field(default_factory=lambda: np.ones(1))

    def __post_init__(self):
        # checked only for arrays: pytree transformations rebuild the class with other leaves
        leaves = (self.mu, self.time_vecs, self.time_vals)
        if not all(isinstance(a, (np.ndarray, jax.Array)) for a in leaves) or np.ndim(self.mu) != 3:
            return
        t = np.shape(self.mu)[1]
        if (np.shape(self.time_vecs) != (t, t) or np.shape(self.time_vals) != (t,)):
            raise ValueError(f"a prior on {t} frames needs a ({t}, {t}) time factor, got time_vecs "
                             f"{np.shape(self.time_vecs)} and time_vals {np.shape(self.time_vals)}")

    # ---- spectral helpers -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mu.shape)

    def _parts(self, dtype):
        c = lambda a: jnp.asarray(a).astype(dtype)  # noqa: E731
        lct = c(self.chan_vals)[:, None] * c(self.time_vals)[None, :]  # (C, T)
        lam = jnp.maximum(lct[:, :, None] * c(self.space_vals)[None, None, :], 0.0)  # (C, T, r)
        lam_floor = jnp.maximum(lct * c(self.space_floor), 0.0)  # (C, T)
        return c(self.chan_vecs), c(self.time_vecs), c(self.space_vecs), lam, lam_floor

    def _spectral(self, z, f, dtype):
        """Apply ``f(Sigma)`` to z of shape (..., C, T, npix): two (npix, r) matmuls.

        ``f(Sigma) = (Qc kron Qt) [Qk (f(lam) - f(lam_floor)) Qk^T + f(lam_floor) I]
        (Qc kron Qt)^T``, with lam (C, T, r) and lam_floor (C, T).
        """
        qc, qt, qk, lam, lam_floor = self._parts(dtype)
        f_floor = f(lam_floor)[:, :, None]
        zc = jnp.einsum("ca,tb,...ctp->...abp", qc, qt, z)
        coef = zc @ qk
        out = (coef * (f(lam) - f_floor)) @ qk.T + f_floor * zc
        return jnp.einsum("ca,tb,...abp->...ctp", qc, qt, out)

    def apply_cov(self, z: jnp.ndarray) -> jnp.ndarray:
        """Sigma z for z of shape (..., C, T, npix)."""
        return self._spectral(z, lambda lam: lam, z.dtype)

    # ---- denoiser ---------------------------------------------------------------------
    def denoiser(self, x: jnp.ndarray, sigma, cond=None) -> jnp.ndarray:
        """Exact E[x | x_t = x] = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu).

        x: (..., C, T, npix); sigma: scalar (same units as x); cond: ignored (the
        denoiser contract of :mod:`jaxguide.diffusion.guidance`). Two matmuls.
        """
        dt = x.dtype
        mu = jnp.asarray(self.mu).astype(dt)
        s2 = jnp.asarray(sigma, dt) ** 2
        return mu + self._spectral(x - mu, lambda lam: lam / (lam + s2), dt)

    def sample(self, key: jax.Array, n: int, dtype=None) -> jnp.ndarray:
        """n independent prior draws, (n, C, T, npix)."""
        dt = jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype
        eps = jax.random.normal(key, (n, *self.shape), dt)
        return jnp.asarray(self.mu).astype(dt) + self._spectral(eps, jnp.sqrt, dt)

    def _space_dense(self) -> np.ndarray:
        qk = np.asarray(self.space_vecs, np.float64)
        fl = float(self.space_floor)
        sk = (qk * np.maximum(np.asarray(self.space_vals, np.float64), 0.0)) @ qk.T
        return sk + fl * (np.eye(qk.shape[0]) - qk @ qk.T)

    def _small_dense(self, vecs, vals) -> np.ndarray:
        q = np.asarray(vecs, np.float64)
        return (q * np.asarray(vals, np.float64)) @ q.T

    def time_cov(self) -> np.ndarray:
        """K_time as a dense (T, T) float64 NumPy matrix."""
        return self._small_dense(self.time_vecs, self.time_vals)

    def std(self) -> np.ndarray:
        """Prior pointwise std, (C, T, npix), float64 NumPy."""
        vc = np.diag(self._small_dense(self.chan_vecs, self.chan_vals))
        vt = np.diag(self.time_cov())
        vk = np.diag(self._space_dense())
        return np.sqrt(vc[:, None, None] * vt[None, :, None] * vk[None, None, :])

    def dense_cov(self) -> np.ndarray:
        """Sigma as a dense (C*T*npix, C*T*npix) float64 NumPy matrix (flattened (C, T, npix))."""
        sc = self._small_dense(self.chan_vecs, self.chan_vals)
        return np.kron(np.kron(sc, self.time_cov()), self._space_dense())

    # ---- exact posteriors -------------------------------------------------------------
    def posterior(self, H, y, sigma_y) -> tuple[np.ndarray, np.ndarray]:
        """Kalman update for y = H x + eta, eta ~ N(0, diag(sigma_y^2)).

        H: (n_obs, C*T*npix) dense; y: (n_obs,); sigma_y: scalar or (n_obs,).
        Returns (mean (C, T, npix), covariance (C*T*npix, C*T*npix)), float64 NumPy.
        With T > 1 this is the fixed-interval (Kalman / RTS) smoother of the window:
        every frame is conditioned on the observations of every frame.
        """
        H = np.asarray(H, np.float64)
        y = np.asarray(y, np.float64)
        r = np.broadcast_to(np.asarray(sigma_y, np.float64) ** 2, y.shape)
        sig = self.dense_cov()
        mu = np.asarray(self.mu, np.float64).reshape(-1)
        sht = sig @ H.T
        s = H @ sht + np.diag(r)
        k = np.linalg.solve(s, sht.T).T
        mean = mu + k @ (y - H @ mu)
        cov = sig - k @ sht.T
        return mean.reshape(self.shape), 0.5 * (cov + cov.T)

    def posterior_denoiser(self, H, y, sigma_y) -> Callable:
        """Exact E[x | x_t, y] for x_t = x + sigma eps and y = H x + eta.

        Kalman update of the Tweedie posterior N(D(x_t), P), P = Cov[x | x_t] =
        Q diag(lam sigma^2 / (lam + sigma^2)) Q^T, with the observation y.
        Returns ``(x_t (C, T, npix), sigma, cond=None) -> (C, T, npix)``; H (n_obs, C*T*npix).
        """

        def den(x, sigma, cond=None):
            dt = x.dtype
            Hj = jnp.asarray(H).astype(dt)
            yj = jnp.asarray(y).astype(dt)
            r = jnp.broadcast_to(jnp.asarray(sigma_y).astype(dt) ** 2, yj.shape)
            s2 = jnp.asarray(sigma, dt) ** 2
            m = self.denoiser(x, sigma)
            pht = self._spectral(Hj.reshape(-1, *self.shape), lambda lam: lam * s2 / (lam + s2), dt)
            pht = pht.reshape(Hj.shape[0], -1).T  # (N, n_obs)
            s = Hj @ pht + jnp.diag(r)
            v = jnp.linalg.solve(s, yj - Hj @ m.reshape(-1))
            return m + (pht @ v).reshape(m.shape)

        return den


def kernel_matrix(nside: int, length_scale_km: float, order: str = "net") -> np.ndarray:
    """Unit-variance squared-exponential correlation (npix, npix) of chord distance, float64.

    Chord-distance kernels are restrictions of kernels positive definite in R^3, hence
    positive definite on the sphere.
    """
    lon, lat = healpix.lonlat(nside, order)
    lo, la = np.deg2rad(lon), np.deg2rad(lat)
    p = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], -1)
    d2 = np.maximum(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1), 0.0)
    d = np.sqrt(d2) * EARTH_RADIUS_KM / length_scale_km
    return np.exp(-0.5 * d**2)


TIME_KERNELS: tuple[str, ...] = ("exponential", "squared_exponential")


def time_correlation(time_length: int, time_step_hours: float = 6.0, correlation_hours: float = 24.0,
                     kernel: str = "exponential") -> np.ndarray:
    """Unit-variance correlation (T, T) of T frames ``time_step_hours`` apart, float64.

    kernel "exponential": ``exp(-|lag| / correlation_hours)``, the AR(1) (discrete
    Ornstein-Uhlenbeck) process: Markov in time, so the exact posterior of a window is
    the Kalman (RTS) smoother's; "squared_exponential": ``exp(-lag^2 / (2
    correlation_hours^2))`` (smooth in time). ``correlation_hours = 0``: independent
    frames (the identity; a control with no information flow between frames).
    """
    if int(time_length) != time_length or time_length < 1:
        raise ValueError(f"time_length must be a whole number >= 1, got {time_length}")
    if not (np.isfinite(time_step_hours) and time_step_hours > 0):
        raise ValueError(f"time_step_hours must be > 0, got {time_step_hours}")
    if not (np.isfinite(correlation_hours) and correlation_hours >= 0):
        raise ValueError(f"correlation_hours must be >= 0, got {correlation_hours}")
    if kernel not in TIME_KERNELS:
        raise ValueError(f"unknown time kernel {kernel!r}; expected one of {TIME_KERNELS}")
    lag = np.abs(np.subtract.outer(np.arange(int(time_length)), np.arange(int(time_length)))) * float(time_step_hours)
    if correlation_hours == 0:
        return np.eye(int(time_length))
    if kernel == "exponential":
        return np.exp(-lag / correlation_hours)
    return np.exp(-0.5 * (lag / correlation_hours) ** 2)


def time_factor(time_length: int = 1, time_step_hours: float = 6.0, correlation_hours: float = 24.0,
                kernel: str = "exponential") -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition (vecs (T, T), vals (T,), decreasing) of :func:`time_correlation`;
    exactly ``([[1]], [1])`` for T = 1. Raises ValueError when it is not positive definite
    (a squared-exponential kernel much longer than the window is numerically singular)."""
    K = time_correlation(time_length, time_step_hours, correlation_hours, kernel)
    if K.shape == (1, 1):
        return np.ones((1, 1)), np.ones(1)
    lt, qt = np.linalg.eigh(K)
    if lt.min() <= 1e-10 * lt.max():
        raise ValueError(f"the {kernel} time correlation of {time_length} frames {time_step_hours:g} h apart with "
                         f"correlation time {correlation_hours:g} h is numerically singular; shorten it")
    return np.ascontiguousarray(qt[:, ::-1]), lt[::-1].copy()


def make_prior(
    nside: int,
    channel_means,
    channel_stds,
    channel_corr,
    length_scale_km: float,
    *,
    nugget: float = 1e-6,
    max_modes: int | None = None,
    order: str = "net",
    time_length: int = 1,
    time_step_hours: float = 6.0,
    correlation_hours: float = 24.0,
    time_kernel: str = "exponential",
) -> GaussianPrior:
    """Build a :class:`GaussianPrior` (C channels, constant mean per channel).

    channel_means, channel_stds: (C,) in the state's units; channel_corr: (C, C)
    correlation matrix; length_scale_km: squared-exponential kernel correlation length (km, Earth radius
    6371 km); nugget: added to the kernel's diagonal (relative, keeps it positive
    definite). max_modes: keep only the r leading spatial eigenpairs and give the
    orthogonal complement the constant variance ``space_floor`` = mean of the dropped
    eigenvalues (a valid covariance with the same trace; the denoiser then costs two
    (npix, r) matmuls instead of (npix, npix)). time_length T (frames), time_step_hours,
    correlation_hours, time_kernel: the time factor (:func:`time_factor`); the defaults
    give T = 1. Leaves are float64 NumPy (converted to the input dtype at use).
    """
    means = np.asarray(channel_means, np.float64)
    stds = np.asarray(channel_stds, np.float64)
    corr = np.asarray(channel_corr, np.float64)
    C = means.shape[0]
    if stds.shape != (C,) or corr.shape != (C, C):
        raise ValueError("channel_stds must be (C,) and channel_corr (C, C)")
    if np.any(stds <= 0) or not np.allclose(corr, corr.T) or not np.allclose(np.diag(corr), 1.0):
        raise ValueError("channel_stds must be > 0; channel_corr symmetric with unit diagonal")
    lc, qc = np.linalg.eigh(stds[:, None] * corr * stds[None, :])
    if lc.min() <= 0:
        raise ValueError("channel_corr must be positive definite")
    qt, lt = time_factor(time_length, time_step_hours, correlation_hours, time_kernel)
    K = kernel_matrix(nside, length_scale_km, order)
    K[np.diag_indices_from(K)] += nugget
    lk, qk = np.linalg.eigh(K)
    npix = K.shape[0]
    lk, qk = np.maximum(lk[::-1], 0.0), qk[:, ::-1]  # decreasing
    floor = 0.0
    if max_modes is not None and max_modes < npix:
        if max_modes < 1:
            raise ValueError(f"max_modes must be >= 1, got {max_modes}")
        floor = float(lk[max_modes:].mean())
        lk, qk = lk[:max_modes], qk[:, :max_modes]
    mu = np.broadcast_to(means[:, None, None], (C, lt.size, npix)).copy()
    return GaussianPrior(mu=mu, chan_vecs=qc, chan_vals=lc, space_vecs=np.ascontiguousarray(qk),
                         space_vals=lk.copy(), space_floor=np.asarray(floor), time_vecs=qt, time_vals=lt)


def point_observations(shape, channels, pixels, frames=None) -> tuple[Callable, np.ndarray]:
    """Point-observation operator on (C, T, npix) states (frame 0 unless ``frames`` (n,)).

    Returns (A, H): ``A(x) = x[channels, frames, pixels]`` (n_obs,) and the same operator
    as a dense (n_obs, C*T*npix) float64 matrix for the exact posterior.
    """
    C, T, npix = shape
    ch = np.asarray(channels, np.int64)
    px = np.asarray(pixels, np.int64)
    fr = np.zeros_like(ch) if frames is None else np.asarray(frames, np.int64)
    if fr.shape != ch.shape or (fr.size and (fr.min() < 0 or fr.max() >= T)):
        raise ValueError(f"frames must be (n_obs,) in [0, {T})")
    H = np.zeros((ch.size, C * T * npix))
    H[np.arange(ch.size), (ch * T + fr) * npix + px] = 1.0
    cj, fj, pj = jnp.asarray(ch), jnp.asarray(fr), jnp.asarray(px)

    def A(x):
        return x[cj, fj, pj]

    return A, H


# --------------------------------------------------------------------------------------
# spherical-harmonic prior and cheap exact marginals (no dense (N, N) matrices)


def harmonic_basis(nside: int, length_scale_km: float, lmax: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Leading spatial modes of the squared-exponential chord-distance kernel, analytically.

    Why: :func:`make_prior` diagonalises the dense (npix, npix) kernel, ~10 s at
    nside 16 on two cores; the kernel is isotropic, so its eigenfunctions are the
    spherical harmonics and its eigenvalues are known in closed form. With
    ``kappa = (R / length)^2``, ``exp(-d_chord^2 / (2 length^2)) = sum_l 4 pi a_l
    sum_m Y_lm Y_lm`` with ``a_l = exp(-kappa) i_l(kappa)`` (modified spherical Bessel),
    so the pixel-sampled kernel has eigenvalue ``npix a_l`` for each of the 2l + 1 modes
    of degree l.

    Returns (vecs (npix, (lmax+1)^2) orthonormal columns in net order, vals (same
    count,), floor): the real harmonics of degree <= lmax sampled at the pixel centres
    and orthonormalised (symmetric, i.e. the nearest orthonormal set; pixel sums are
    only nearly orthogonal), and the constant variance of the complement that keeps
    the total variance npix (unit variance per pixel). ``vecs diag(vals) vecs^T +
    floor (I - vecs vecs^T)`` is then a valid covariance within ~0.3% (Frobenius) of the
    dense kernel at nside 16, 1200 km, lmax 19.
    """
    from scipy import special

    lon, lat = healpix.lonlat(nside, "net")
    theta, phi = np.deg2rad(90.0 - np.asarray(lat, np.float64)), np.deg2rad(np.asarray(lon, np.float64))
    kappa = (EARTH_RADIUS_KM / length_scale_km) ** 2
    npix = theta.size
    cols, vals = [], []
    for ell in range(lmax + 1):
        a = np.sqrt(np.pi / (2.0 * kappa)) * special.ive(ell + 0.5, kappa)  # exp(-kappa) i_l(kappa)
        for m in range(ell + 1):
            y = special.sph_harm_y(ell, m, theta, phi)
            cols += [y.real] if m == 0 else [np.sqrt(2.0) * y.real, np.sqrt(2.0) * y.imag]
            vals += [a] if m == 0 else [a, a]
    Y = np.stack(cols, axis=1) * np.sqrt(4.0 * np.pi / npix)
    w, v = np.linalg.eigh(Y.T @ Y)
    vecs = Y @ (v / np.sqrt(w)) @ v.T
    vals = npix * np.asarray(vals)
    if vals.size >= npix:
        raise ValueError(f"lmax={lmax} gives {vals.size} modes, more than the {npix} pixels of nside {nside}")
    floor = float((npix - vals.sum()) / (npix - vals.size))
    if not floor > 0:
        raise ValueError(f"no variance left for the complement (lmax={lmax}, length {length_scale_km} km)")
    return vecs, vals, floor


def harmonic_prior(nside: int, mean, channel_stds, channel_corr, length_scale_km: float, lmax: int, *,
                   time_length: int = 1, time_step_hours: float = 6.0, correlation_hours: float = 24.0,
                   time_kernel: str = "exponential") -> GaussianPrior:
    """``(S R S) kron K_time kron K`` with K from :func:`harmonic_basis` (no dense kernel)
    and K_time from :func:`time_factor` (defaults: T = 1, K_time = [[1]]), mean ``mean``
    (C, npix) (the same in every frame) or (C, T, npix), net order. Same units as
    ``mean`` and ``channel_stds``."""
    stds = np.asarray(channel_stds, np.float64)
    corr = np.asarray(channel_corr, np.float64)
    lc, qc = np.linalg.eigh(stds[:, None] * corr * stds[None, :])
    if lc.min() <= 0:
        raise ValueError("channel_corr must be positive definite")
    qt, lt = time_factor(time_length, time_step_hours, correlation_hours, time_kernel)
    vecs, vals, floor = harmonic_basis(nside, length_scale_km, lmax)
    mu = np.asarray(mean, np.float64)
    C, T, npix = stds.size, lt.size, vecs.shape[0]
    if mu.shape == (C, npix):
        mu = np.broadcast_to(mu[:, None, :], (C, T, npix)).copy()
    elif mu.shape != (C, T, npix):
        raise ValueError(f"mean must be (C, npix) = {(C, npix)} or (C, T, npix) = {(C, T, npix)}, got {mu.shape}")
    return GaussianPrior(mu=mu, chan_vecs=qc, chan_vals=lc, space_vecs=vecs, space_vals=vals,
                         space_floor=np.asarray(floor), time_vecs=qt, time_vals=lt)


def pointwise_std(prior: GaussianPrior) -> np.ndarray:
    """Prior pointwise std (C, T, npix) float64, = ``prior.std()`` without its dense
    (npix, npix) spatial matrix (O(npix r) instead of O(npix^2 r))."""
    qc = np.asarray(prior.chan_vecs, np.float64)
    qt = np.asarray(prior.time_vecs, np.float64)
    qk = np.asarray(prior.space_vecs, np.float64)
    vc = (qc**2) @ np.asarray(prior.chan_vals, np.float64)
    vt = (qt**2) @ np.asarray(prior.time_vals, np.float64)
    q2 = qk**2
    vk = q2 @ np.maximum(np.asarray(prior.space_vals, np.float64), 0.0) + float(prior.space_floor) * (1.0 - q2.sum(1))
    return np.sqrt(vc[:, None, None] * vt[None, :, None] * vk[None, None, :])


def kalman_marginals(prior: GaussianPrior, H: np.ndarray, y, sigma_y) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior mean and pointwise std, each (C, T, npix) float64.

    Same update as :meth:`GaussianPrior.posterior` (for T > 1 the Kalman smoother of the
    window) but without the dense (N, N) covariance (N = C T npix; C npix = 9216 at nside 16): Sigma H^T comes from the prior's spectral form
    (float32), the (n_obs, n_obs) solve is float64.
    """
    H = np.asarray(H, np.float64)
    y = np.asarray(y, np.float64)
    n = H.shape[0]
    r = np.broadcast_to(np.asarray(sigma_y, np.float64) ** 2, y.shape)
    rows = jnp.asarray(H.reshape(n, *prior.shape), jnp.float32)
    sht = np.asarray(prior.apply_cov(rows), np.float64).reshape(n, -1).T  # (N, n)
    mu = np.asarray(prior.mu, np.float64).reshape(-1)
    s = H @ sht
    s = 0.5 * (s + s.T) + np.diag(r)
    mean = mu + sht @ np.linalg.solve(s, y - H @ mu)
    var = pointwise_std(prior).reshape(-1) ** 2 - np.sum(sht * np.linalg.solve(s, sht.T).T, axis=1)
    return mean.reshape(prior.shape), np.sqrt(np.maximum(var, 0.0)).reshape(prior.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianModel:
    """A :class:`GaussianPrior` as a :class:`jaxguide.model.denoiser.DenoiserModel`.

    The prior lives in normalised units on a HEALPix grid (pixels in "net" order);
    ``center``/``scale`` (C,) give the physical units, ``channels`` the names. Its
    ``params`` is the prior itself (a pytree, so it is a traced argument of compiled
    programs), ``denoise`` the exact E[x | x_t]; there is no conditioning (an empty
    dict). With it the whole pipeline (observation tables, normalisation, operator,
    guidance, sampler, output file) can be checked against the exact Kalman posterior.
    A prior on T > 1 frames is a video model of windows of T frames
    ``time_step_hours`` apart (:meth:`window`, :meth:`window_conditioning`), exact
    against the Kalman smoother.
    """

    prior: GaussianPrior
    channels: tuple[str, ...]
    center: np.ndarray
    scale: np.ndarray
    nside: int
    time_step_hours: float = 6.0

    def __post_init__(self):
        C, T, npix = self.prior.shape
        if (C, npix) != (len(self.channels), 12 * self.nside**2) or T < 1:
            raise ValueError(f"prior shape {self.prior.shape} does not match {len(self.channels)} channels, nside {self.nside}")
        if not (np.isfinite(self.time_step_hours) and self.time_step_hours > 0):
            raise ValueError(f"time_step_hours must be > 0, got {self.time_step_hours}")
        object.__setattr__(self, "center", np.asarray(self.center, np.float64))
        object.__setattr__(self, "scale", np.asarray(self.scale, np.float64))

    @property
    def member_shape(self) -> tuple[int, int, int]:
        return self.prior.shape

    @property
    def time_length(self) -> int:
        return self.prior.shape[1]

    @property
    def params(self) -> GaussianPrior:
        return self.prior

    def denoise(self, params: GaussianPrior, x, sigma, cond=None):
        if cond and "keep" in cond:
            params = given_frames(params, cond["known"], cond["keep"])
        return params.denoiser(x, sigma)

    def window(self, start) -> FrameWindow:
        """The frames of one window starting at ``start`` (T = 1: a single time)."""
        return FrameWindow(start, self.time_step_hours, self.time_length)

    def conditioning(self, time, *, sst_path=None, sst_offset: float = 0.0) -> dict:
        return {}

    def window_conditioning(self, window: FrameWindow, *, known=None, sst_path=None, sst_offset: float = 0.0,
                            sst_data=None) -> dict:
        """Known frames as ``{"known": (C, T, npix), "keep": (T,)}`` (a leading member axis
        on both when ``known`` is per member; :func:`given_frames` conditions the prior on
        them exactly), ``{}`` without; after checking that ``window`` fits the prior's frames."""
        if window.length != self.time_length:
            raise ValueError(f"the window has {window.length} frames; this model samples {self.time_length}")
        if not np.isclose(window.time_step_hours, self.time_step_hours):
            raise ValueError(f"the window's frames are {window.time_step_hours:g} h apart; this model's are "
                             f"{self.time_step_hours:g} h")
        if known is None:
            return {}
        values = np.asarray(known.values, np.float32)
        if values.shape[-3:] != self.member_shape:
            raise ValueError(f"known frames must be {self.member_shape} per member, got {values.shape}")
        keep = np.asarray(known.keep, np.float32)
        if values.ndim == 4:
            keep = np.broadcast_to(keep, (values.shape[0], keep.size)).copy()
        return {"known": values, "keep": keep}


def given_frames(prior: GaussianPrior, known: jnp.ndarray, keep: jnp.ndarray) -> GaussianPrior:
    """The prior conditioned exactly on whole frames: ``x[:, k] = known[:, k]`` where ``keep``.

    With Sigma = Sc kron K_time kron Ks, conditioning on all channels and pixels of frames
    k only changes the time factor and the mean: K' = K - K[:, k] K_kk^-1 K[k, :] (zero on
    the known frames) and mu' = mu + (K[:, k] K_kk^-1) (known - mu)_k along the time axis
    (= known on the known frames). known: (C, T, npix); keep: (T,) 0/1 (traceable: the
    (T, T) algebra and its eigendecomposition run inside the program). Returns a prior on
    the same states whose denoiser is exact for the conditional.
    """
    dt = jnp.result_type(jnp.asarray(prior.mu).dtype, jnp.float32)
    qt = jnp.asarray(prior.time_vecs, dt)
    K = (qt * jnp.asarray(prior.time_vals, dt)) @ qt.T
    m = jnp.asarray(keep, dt)
    # K_kk^-1 embedded in T x T: solve on diag(m) K diag(m) + diag(1 - m) (identity on unknown frames)
    a = m[:, None] * K * m[None, :] + jnp.diag(1.0 - m)
    gain = (K * m[None, :]) @ jnp.linalg.solve(a, jnp.diag(m))  # K[:, k] K_kk^-1, zero columns elsewhere
    k_cond = K - gain @ K
    k_cond = 0.5 * (k_cond + k_cond.T) * ((1.0 - m)[:, None] * (1.0 - m)[None, :])  # exact zeros on known frames
    vals, vecs = jnp.linalg.eigh(k_cond)
    mu = jnp.asarray(prior.mu, dt)
    mu = mu + jnp.einsum("ts,csp->ctp", gain, jnp.asarray(known, dt) - mu)
    return dataclasses.replace(prior, mu=mu, time_vecs=vecs, time_vals=jnp.maximum(vals, 0.0))
