"""The embeddings of cBottle's U-Net: the calendar (local time of day and year fraction per
pixel and frame), the EDM noise-level embedding, and the longitude shift of local time.

Every step is float32 and rounded as PyTorch rounds it (see
:func:`jaxguide.model.layers.divide_ieee`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.grid import healpix
from jaxguide.model.config import CALENDAR_EMBED_CHANNELS, NSIDE
from jaxguide.model.layers import divide_ieee


@functools.lru_cache(maxsize=None)
def lon_shift_seconds() -> np.ndarray:
    """``floor(lon * 86400 / 360)`` per network pixel, evaluated in float32 as cBottle does.

    (In float64 it differs at 380 of 49152 pixels, which moves D by ~5e-4 x RMS.)
    """
    lon = healpix.lonlat(NSIDE, "net")[0].astype(np.float32)
    shift = np.floor_divide(lon * np.float32(86400), np.float32(360)).astype(np.float32)
    shift.setflags(write=False)
    return shift


def _frequency_features(t: jax.Array, count: int) -> jax.Array:
    """[cos(2 pi k t), sin(2 pi k t)] for k = 1..count, 2 pi k formed in float32."""
    freqs = np.float32(2 * math.pi) * np.arange(1, count + 1, dtype=np.float32)
    arg = t[..., None] * freqs
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def calendar_embedding(
    second_of_day: jax.Array, day_of_year: jax.Array, *, legacy: bool, count: int = CALENDAR_EMBED_CHANNELS
) -> jax.Array:
    """cBottle's CalendarEmbedding, per frame. (B, T) seconds / fractional 0-based days -> (B, T, X, 4*count).

    Channels: cos/sin of local time of day (k = 1..count), then cos/sin of the year fraction.
    ``legacy=True`` reproduces the sign error of the released image checkpoints
    (``second_of_day - lon_shift``); ``False`` (cBottle's training default, the video model) adds it.
    Every step is float32 and rounded as PyTorch rounds it (see :func:`divide_ieee`).
    """
    shift = jnp.asarray(lon_shift_seconds())
    sod = jnp.asarray(second_of_day).astype(jnp.float32)[..., None]  # (B, T, 1), float32 as cBottle
    doy = jnp.asarray(day_of_year).astype(jnp.float32)  # (B, T)
    local = jnp.remainder(sod - shift if legacy else sod + shift, jnp.float32(86400))  # (B, T, X)
    day = _frequency_features(divide_ieee(local, 86400.0), count)  # (B, T, X, 2c)
    year_fraction = jnp.remainder(divide_ieee(doy, 365.25), jnp.float32(1))
    year = _frequency_features(year_fraction, count)  # (B, T, 2c)
    year = jnp.broadcast_to(year[:, :, None, :], day.shape)
    return jnp.concatenate([day, year], axis=-1)


def noise_embedding(c_noise: jax.Array, channels: int) -> jax.Array:
    """EDM positional embedding (endpoint form), halves swapped to [sin, cos]. (B,) -> (B, channels)."""
    half = channels // 2
    freqs = np.arange(half, dtype=np.float32) / np.float32(half - 1)
    freqs = np.float32(1 / 10000) ** freqs
    arg = c_noise[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=1)
