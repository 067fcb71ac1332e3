"""The linear point-observation operator A and what it needs: channel indices,
normalised values, spatial and temporal interpolation stencils.

:func:`normalise` converts value/sigma to the network's normalised units with the
checkpoint's per-channel ``center``/``scale``; :func:`build_operator` turns the
locations into :class:`PointObservationOperator`, a gather + weighted sum over
network-order pixels (a :func:`jaxguide.grid.latlon.stencil`) that is linear and
jit/vmap/grad friendly. Row ``i`` of the table is element ``i`` of ``A(x)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxguide.grid import latlon as grid_sampling
from jaxguide.model import units
from jaxguide.observations.errors import MissingColumnsError, UnknownVariableError, unknown_variable_message


def channel_index(variables: Sequence[str], channels: Sequence[str]) -> np.ndarray:
    """Index of each variable name in ``channels`` (int32); unknown names raise."""
    channels = list(channels)
    lookup = {c: i for i, c in enumerate(channels)}
    unknown = [v for v in variables if v not in lookup]
    if unknown:
        raise UnknownVariableError(unknown_variable_message(unknown, channels), {"unknown_variable": len(unknown)})
    return np.array([lookup[v] for v in variables], dtype=np.int32)


def normalise(
    table: pd.DataFrame, channels: Sequence[str], center: Sequence[float], scale: Sequence[float]
) -> pd.DataFrame:
    """Add ``value_n = (value - center[c]) / scale[c]`` and ``sigma_n = sigma / scale[c]``.

    ``center``/``scale`` are the checkpoint's per-channel values (batch_info), in the
    physical units of the table, aligned with ``channels``.
    """
    center = np.asarray(center, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    if center.shape != (len(channels),) or scale.shape != (len(channels),):
        raise ValueError(f"center/scale must have shape ({len(channels)},), got {center.shape}, {scale.shape}")
    idx = channel_index(table["variable"].tolist(), channels)
    out = table.copy()
    out["value_n"] = units.normalise(out["value"].to_numpy(np.float64), center, scale, channel=idx)
    out["sigma_n"] = units.normalise(out["sigma"].to_numpy(np.float64), 0.0, scale, channel=idx)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class PointObservationOperator:
    """Linear point-observation operator ``A``: state -> observed values.

    Arrays (pytree leaves), K stencil entries per observation:
      channel: (n,) int32, channel index of each observation.
      pixel: (n, K) int32, network-order pixels of the interpolation stencil.
      weight: (n, K) float32, interpolation weights (rows sum to 1; 0 for padding rows).
      frame: (n, K) int32 frame of each entry, or None (every entry in frame 0, states
        (C, 1, npix)). Video windows use K = 8: the 4 pixels in the frames before and
        after the observation time, weights = spatial x linear-in-time weights.
    """

    channel: jax.Array
    pixel: jax.Array
    weight: jax.Array
    frame: jax.Array | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (C, T, npix) one member's state in net order -> (n,) in x's units."""
        if x.ndim != 3 or (self.frame is None and x.shape[1] != 1):
            raise ValueError(f"expected a state of shape (C, {'1' if self.frame is None else 'T'}, npix), got {x.shape}")
        frame = 0 if self.frame is None else self.frame
        vals = x[self.channel[:, None], frame, self.pixel]  # (n, K)
        return jnp.sum(vals * self.weight.astype(vals.dtype), axis=-1)

    @property
    def num_obs(self) -> int:
        return self.channel.shape[0]

    def dense(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The operator as a dense (n_obs, C*T*npix) float64 matrix on flattened (C, T, npix) states."""
        _, t, npix = shape
        ch = np.asarray(self.channel, np.int64)
        pix = np.asarray(self.pixel, np.int64)
        fr = np.zeros_like(pix) if self.frame is None else np.asarray(self.frame, np.int64)
        if fr.size and fr.max() >= t:
            raise ValueError(f"the operator reads frame {fr.max()} of a state with {t} frames")
        H = np.zeros((ch.size, int(np.prod(shape))))
        np.add.at(H, (np.arange(ch.size)[:, None], (ch[:, None] * t + fr) * npix + pix), np.asarray(self.weight, np.float64))
        return H


jax.tree_util.register_dataclass(
    PointObservationOperator, data_fields=["channel", "pixel", "weight", "frame"], meta_fields=[]
)


def time_stencil(position, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation in time: fractional frame positions (n,) -> frames (n, 2) int32
    and weights (n, 2) float64 (the frames before and after; weight 0 on the second when
    the time is a frame time). Positions must lie in [0, n_frames - 1]."""
    pos = np.asarray(position, np.float64).reshape(-1)
    if n_frames < 1 or pos.size and not (np.all(pos >= 0) and np.all(pos <= n_frames - 1)):
        raise ValueError(f"frame positions must lie in [0, {n_frames - 1}]")
    if n_frames == 1:
        return np.zeros((pos.size, 2), np.int32), np.stack([np.ones_like(pos), np.zeros_like(pos)], 1)
    f0 = np.minimum(np.floor(pos), n_frames - 2)
    w1 = pos - f0
    return np.stack([f0, f0 + 1], 1).astype(np.int32), np.stack([1.0 - w1, w1], 1)


def build_operator(
    table_or_arrays: pd.DataFrame | Mapping,
    channels: Sequence[str],
    nside: int = 64,
    method: grid_sampling.Method = "bilinear",
    as_numpy: bool = False,
    frame_position=None,
    n_frames: int = 1,
) -> PointObservationOperator:
    """Operator for the rows of a table (or a mapping with ``lat``, ``lon``, ``variable``).

    ``variable`` holds channel names, or integer channel indices in a mapping.
    Row order is kept: element ``i`` of ``A(x)`` is row ``i``. ``method`` is a
    :mod:`jaxguide.grid.latlon` scheme: "bilinear" (HEALPix interpolation) or
    "nearest" (the containing pixel); ``jaxguide evaluate`` samples with the same one.
    ``as_numpy``: NumPy leaves instead of JAX arrays. ``frame_position`` (n,): each
    row's fractional frame index in a window of ``n_frames`` frames
    (:meth:`jaxguide.model.window.FrameWindow.position`): the operator then reads (C, T, npix)
    states, linear in time between the two nearest frames (:func:`time_stencil`).
    """
    src = table_or_arrays
    missing = [k for k in ("lat", "lon", "variable") if k not in src]
    if missing:
        raise MissingColumnsError(f"observation locations lack {missing}")
    lat = np.asarray(src["lat"], dtype=np.float64)
    lon = np.asarray(src["lon"], dtype=np.float64)
    var = np.asarray(src["variable"])
    if var.dtype.kind in "iu":
        if var.size and (var.min() < 0 or var.max() >= len(channels)):
            raise UnknownVariableError(f"channel indices must be in [0, {len(channels)}), got {var.min()}..{var.max()}")
        ch = var.astype(np.int32)
    else:
        ch = channel_index([str(v) for v in var], channels)
    if not (lat.shape == lon.shape == ch.shape and lat.ndim == 1):
        raise ValueError(f"lat, lon, variable must be 1-D of equal length, got {lat.shape}, {lon.shape}, {ch.shape}")
    pix, w = grid_sampling.stencil(nside, lon, lat, method, "net")
    frame = None
    if frame_position is not None:
        frames, tw = time_stencil(frame_position, n_frames)
        if frames.shape[0] != ch.shape[0]:
            raise ValueError(f"frame_position has {frames.shape[0]} entries for {ch.shape[0]} observations")
        k = pix.shape[1]
        frame = np.repeat(frames, k, axis=1)  # (n, 2K): the K pixels in each of the two frames
        pix = np.concatenate([pix, pix], axis=1)
        w = np.concatenate([w * tw[:, :1], w * tw[:, 1:]], axis=1)
    pix, w = pix.astype(np.int32), w.astype(np.float32)
    if as_numpy:
        return PointObservationOperator(ch, pix, w, frame)
    return PointObservationOperator(jnp.asarray(ch), jnp.asarray(pix), jnp.asarray(w),
                                    None if frame is None else jnp.asarray(frame))
