"""A video model as a denoiser of whole trajectories: overlapping windows, composed.

A video cBottle denoises windows of T frames. A trajectory of L > T frames is covered
by J overlapping windows (stride ``T - overlap``, the last one ending on frame L-1);
at every denoiser call all J windows are denoised at once (one batch) and each frame's
estimate is the weighted mean of the estimates of the windows that hold it, weight
``min(k + 1, T - k)`` at the window's frame k (a tent: a frame counts most in the
window where it is most central, where the window sees most of its neighbours). The
result is an ordinary :class:`~jaxguide.model.denoiser.DenoiserModel` of members
``(C, L, npix)``: every guidance method conditions every frame on every observation of
the trajectory, and guidance information travels between windows through their
overlaps over the sampler's steps (Rozet & Louppe 2023, score-based data assimilation).
That makes a smoother (an observation late in the run changes the early frames), where
a chain of windows each conditioned on the previous one is a filter.

Why the tent: on the Gaussian AR(1) process (tests/test_smoother.py, ``benchmarks/smoother.py``)
the composite of exact window denoisers is closer to the exact trajectory denoiser with
tent weights than with equal weights at every noise level and overlap; taking each frame
from its most central window alone (``"central"``) is closer at small and medium noise
and farther at large noise with overlaps up to T/2, and the two give the same posterior
through MMPS within Monte Carlo error. What the composite cannot do is see beyond a
window: information from observations reaches the frames one window away only in part
(measured in tests/test_smoother.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.model.conditioning import KnownFrames
from jaxguide.model.window import FrameWindow, WindowError

WEIGHTINGS = ("tent", "central", "uniform")


def window_starts(length: int, window: int, overlap: int) -> tuple[int, ...]:
    """First frames of the windows of T = ``window`` frames covering ``length`` frames,
    ``window - overlap`` apart, the last one moved back to end on the last frame (so it
    may overlap its neighbour by more). Raises :class:`WindowError` for
    ``length < window`` or ``overlap`` outside [1, window)."""
    if length < window:
        raise WindowError(f"a trajectory of {length} frames is shorter than one window ({window} frames)")
    if not 1 <= overlap < window:
        raise WindowError(f"the windows' overlap must be in [1, {window}) frames, got {overlap}")
    stride = window - overlap
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return tuple(starts)


def frame_weights(window: int, weighting: str = "tent") -> np.ndarray:
    """(T,) weight of a window's frame k in the frames' means: ``"tent"`` min(k+1, T-k),
    ``"uniform"`` 1; ``"central"`` is the tent, used as a choice (see
    :func:`combination_matrix`)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    k = np.arange(window)
    return np.ones(window) if weighting == "uniform" else np.minimum(k + 1, window - k).astype(np.float64)


def combination_matrix(length: int, window: int, starts: tuple[int, ...], weighting: str = "tent") -> np.ndarray:
    """(L, J*T) float64: frame l of the composite = sum over windows j and their frames k
    of ``M[l, j*T + k]`` x window j's estimate of its frame k; rows sum to 1.
    ``"central"`` takes each frame from the one window where its tent weight is
    largest (the earlier window on ties)."""
    w = frame_weights(window, weighting)
    m = np.zeros((length, len(starts) * window))
    for j, s in enumerate(starts):
        m[s + np.arange(window), j * window + np.arange(window)] = w
    if weighting == "central":
        best = np.argmax(m, axis=1)  # first maximum: the earlier window
        m = np.zeros_like(m)
        m[np.arange(length), best] = 1.0
    return m / m.sum(axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True, eq=False)
class TrajectoryModel:
    """``inner`` (a video :class:`~jaxguide.model.denoiser.DenoiserModel` of T frames) as
    a denoiser of ``length`` frames (see the module doc); ``overlap``: frames shared by
    neighbouring windows (default T // 2). Members ``(C, length, npix)``; the
    conditioning of a trajectory is its windows' conditionings stacked on a leading
    window axis (after the member axis when per member), built by
    :meth:`window_conditioning`."""

    inner: Any
    length: int
    overlap: int | None = None
    weighting: str = "tent"

    def __post_init__(self):
        t = self.inner.member_shape[1]
        if t < 2:
            raise WindowError("a trajectory of windows needs a video model (time_length > 1)")
        if self.overlap is None:
            object.__setattr__(self, "overlap", max(1, t // 2))
        frame_weights(t, self.weighting)  # names an unknown weighting
        starts = window_starts(int(self.length), t, int(self.overlap))
        object.__setattr__(self, "_starts", starts)
        object.__setattr__(self, "_combine", combination_matrix(int(self.length), t, starts, self.weighting))

    # ---- what the pipeline reads of a model
    channels = property(lambda self: self.inner.channels)
    center = property(lambda self: self.inner.center)
    scale = property(lambda self: self.inner.scale)
    nside = property(lambda self: self.inner.nside)
    params = property(lambda self: self.inner.params)
    time_step_hours = property(lambda self: self.inner.time_step_hours)
    metadata = property(lambda self: getattr(self.inner, "metadata", {}))

    @property
    def window_length(self) -> int:
        """T, the frames of one window of the inner model."""
        return self.inner.member_shape[1]

    @property
    def starts(self) -> tuple[int, ...]:
        """First frame of each window, (J,)."""
        return self._starts

    @property
    def member_shape(self) -> tuple[int, int, int]:
        c, _, npix = self.inner.member_shape
        return (c, int(self.length), npix)

    def window(self, start) -> FrameWindow:
        """The trajectory's frames from ``start``."""
        return FrameWindow(start, self.time_step_hours, int(self.length))

    def windows(self, trajectory: FrameWindow) -> list[FrameWindow]:
        """The inner windows of ``trajectory`` (its frames' times)."""
        return [FrameWindow(trajectory.start + s * trajectory.step, trajectory.time_step_hours, self.window_length)
                for s in self.starts]

    def conditioning(self, time, *, sst_path=None, sst_offset: float = 0.0):
        return self.window_conditioning(self.window(time), sst_path=sst_path, sst_offset=sst_offset)

    def window_conditioning(self, window: FrameWindow, *, known: KnownFrames | None = None, sst_path=None,
                            sst_offset: float = 0.0, sst_data=None) -> dict:
        """Every window's conditioning (calendar, SST, known frames from ``known``, a
        trajectory's frames (M, C, L, npix) or (C, L, npix)) stacked on a window axis:
        leaves (J, ...), or (M, J, ...) when ``known`` is per member."""
        if window.length != self.length:
            raise WindowError(f"the trajectory has {window.length} frames; this model samples {self.length}")
        parts = []
        for s, w in zip(self.starts, self.windows(window)):
            part = None
            if known is not None:
                part = KnownFrames(np.asarray(known.values)[..., s:s + self.window_length, :],
                                   np.asarray(known.keep)[s:s + self.window_length])
            parts.append(self.inner.window_conditioning(w, known=part, sst_path=sst_path, sst_offset=sst_offset,
                                                        sst_data=sst_data))
        axis = 1 if known is not None and known.per_member else 0
        return jax.tree.map(lambda *leaves: np.stack(leaves, axis=axis), *parts)

    def denoise(self, params, x, sigma, cond=None):
        """x (C, L, npix) -> the composite estimate (C, L, npix): J windows denoised as one
        batch, then combined frame by frame (:func:`combination_matrix`)."""
        t = self.window_length
        idx = np.asarray(self.starts)[:, None] + np.arange(t)[None, :]  # (J, T)
        xw = jnp.moveaxis(x[:, idx], 1, 0)  # (J, C, T, npix)
        cond = {} if cond is None else cond
        dw = jax.vmap(lambda xj, cj: self.inner.denoise(params, xj, sigma, cj or None))(xw, cond)
        dw = jnp.moveaxis(dw, 0, 1).reshape(x.shape[0], -1, x.shape[-1])  # (C, J*T, npix)
        return jnp.einsum("lk,ckp->clp", jnp.asarray(self._combine, dw.dtype), dw).astype(x.dtype)
