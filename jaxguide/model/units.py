"""The one normalise / unnormalise pair: physical units <-> the network's units.

cBottle's network state is normalised per channel with the checkpoint's batch_info:
``x_n = (x - center[c]) / scale[c]``; an error std (or any difference) only scales:
``sigma_n = sigma / scale[c]``. Every module converts through these functions.

``center``/``scale`` are (C,) arrays aligned with the model's channels. The channel of
each value is either an axis of ``x`` (``axis``, default -3 as in (C, 1, npix) and
(M, C, 1, npix)) or given per value by an index array ``channel`` broadcast against the
last axis of ``x`` (e.g. point observations). Results are float64 NumPy.
"""

from __future__ import annotations

import numpy as np


def _per_channel(v, x, channel, axis: int) -> np.ndarray:
    v = np.asarray(v, np.float64)
    if v.ndim == 0:
        return v
    if channel is not None:
        return v[np.asarray(channel)]
    shape = [1] * np.ndim(x)
    shape[axis] = v.shape[0]
    if np.shape(x)[axis] != v.shape[0]:
        raise ValueError(f"{v.shape[0]} channels in center/scale but axis {axis} of x has {np.shape(x)[axis]}")
    return v.reshape(shape)


def normalise(x, center, scale, *, channel=None, axis: int = -3) -> np.ndarray:
    """Physical -> normalised: ``(x - center) / scale`` per channel."""
    x = np.asarray(x, np.float64)
    return (x - _per_channel(center, x, channel, axis)) / _per_channel(scale, x, channel, axis)


def unnormalise(x, center, scale, *, channel=None, axis: int = -3) -> np.ndarray:
    """Normalised -> physical: ``x * scale + center`` per channel."""
    x = np.asarray(x, np.float64)
    return x * _per_channel(scale, x, channel, axis) + _per_channel(center, x, channel, axis)
