"""Synthetic observations drawn from a truth field (observing-system experiments).

Randomness is always an explicit ``numpy.random.Generator`` (or an int seed turned
into one with ``np.random.default_rng``); nothing reads global state.

Units: the truth is ``(C, 1, npix)`` in network pixel order. If ``center`` and
``scale`` are given it is taken as NORMALISED (network units) and de-normalised with
``x * scale + center``; otherwise it is taken as already in PHYSICAL units. The
observation values, and ``sigma``, are always physical (K for temperatures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd

from jaxguide.grid import latlon as grid_sampling, healpix

from jaxguide.model import units
from jaxguide.observations.operator import channel_index
from jaxguide.observations.table import make_table, parse_time

STRATEGIES: tuple[str, ...] = ("random", "uniform", "land_only")
_GOLDEN_ANGLE_DEG = 180.0 * (3.0 - np.sqrt(5.0))


def _rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def random_points(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points uniform on the sphere: (lon in [0, 360), lat), degrees."""
    lon = rng.uniform(0.0, 360.0, count)
    lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, count)))
    return lon, lat


def fibonacci_points(count: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fibonacci lattice: ``count`` near-equal-area points; a random lon rotation if rng."""
    i = np.arange(count, dtype=np.float64)
    lat = np.degrees(np.arcsin(1.0 - 2.0 * (i + 0.5) / count))
    offset = 0.0 if rng is None else rng.uniform(0.0, 360.0)
    lon = (i * _GOLDEN_ANGLE_DEG + offset) % 360.0
    return lon, lat


def land_points(
    count: int, rng: np.random.Generator, land_mask: np.ndarray, *, max_draws: int = 10_000_000
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points uniform over the land pixels (rejection sampling).

    land_mask: (npix,) bool in NET order (True = land), any nside.
    """
    land_mask = np.asarray(land_mask, bool)
    nside = healpix.nside_of_npix(land_mask.size)
    frac = land_mask.mean()
    if frac == 0:
        raise ValueError("land mask has no land pixels")
    lons, lats, drawn = [], [], 0
    need = count
    while need > 0:
        batch = int(min(max(2 * need / frac, 64), max_draws))
        lon, lat = random_points(batch, rng)
        drawn += batch
        keep = land_mask[grid_sampling.ang2pix(nside, lon, lat, "net")]
        lons.append(lon[keep][:need])
        lats.append(lat[keep][:need])
        need -= int(min(keep.sum(), need))
        if drawn > max_draws and need > 0:
            raise RuntimeError(f"could not draw {count} land points in {max_draws} draws")
    return np.concatenate(lons), np.concatenate(lats)


def sample_locations(
    strategy: Literal["random", "uniform", "land_only"],
    count: int,
    rng: np.random.Generator | int,
    *,
    land_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Observation locations (lon in [0, 360), lat), degrees, each (count,)."""
    rng = _rng(rng)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if strategy == "random":
        return random_points(count, rng)
    if strategy == "uniform":
        return fibonacci_points(count, rng)
    if strategy == "land_only":
        if land_mask is None:
            raise ValueError("land_only needs land_mask= (or sst= in sample_observations)")
        return land_points(count, rng, land_mask)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def sample_observations(
    truth: np.ndarray,
    channels: Sequence[str],
    variables: Sequence[str],
    *,
    time,
    strategy: Literal["random", "uniform", "land_only"] = "random",
    count: int,
    rng: np.random.Generator | int,
    sigma: float | Mapping[str, float],
    holdout_fraction: float = 0.0,
    land_mask: np.ndarray | None = None,
    sst: np.ndarray | None = None,
    center: Sequence[float] | None = None,
    scale: Sequence[float] | None = None,
    method: Literal["bilinear", "nearest"] = "bilinear",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Draw noisy observations of ``truth``: ``(assimilated_table, heldout_table)``.

    Args:
      truth: (C, 1, npix) net order; normalised if center/scale are given, else physical.
      channels: the C channel names of ``truth``; variables: names to observe.
      time: timestamp written to the ``time`` column.
      count: number of LOCATIONS; every location observes every variable.
      rng: numpy Generator (or int seed); draws locations, then noise, then the split.
      sigma: noise std in physical units, scalar or per variable.
      holdout_fraction: share of locations (rounded) put in the held-out table.
      land_mask / sst: for ``land_only``: (npix,) bool net order, or a physical SST
        on the same grid whose NaN (missing) pixels are land.
    Values are ``A(truth_physical) + sigma * N(0, 1)``.
    """
    rng = _rng(rng)
    truth = np.asarray(truth, dtype=np.float64)
    if truth.ndim != 3 or truth.shape[1] != 1 or truth.shape[0] != len(channels):
        raise ValueError(f"truth must be (C={len(channels)}, 1, npix), got {truth.shape}")
    if (center is None) != (scale is None):
        raise ValueError("give both center and scale (normalised truth) or neither (physical truth)")
    if center is not None:
        truth = units.unnormalise(truth, center, scale)
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    nside = healpix.nside_of_npix(truth.shape[-1])
    ch = channel_index(list(variables), channels)
    if strategy == "land_only" and land_mask is None and sst is not None:
        land_mask = np.isnan(np.asarray(sst))
    lon, lat = sample_locations(strategy, count, rng, land_mask=land_mask)

    pix, w = grid_sampling.stencil(nside, lon, lat, method, "net")
    vals = (truth[ch[:, None, None], 0, pix[None]] * w[None].astype(np.float64)).sum(-1)  # (V, count)
    sig = np.array([sigma[v] if isinstance(sigma, Mapping) else float(sigma) for v in variables], np.float64)
    if np.any(~(sig > 0)):
        raise ValueError(f"sigma must be > 0, got {sig}")
    vals = vals + sig[:, None] * rng.standard_normal(vals.shape)

    n_hold = int(round(holdout_fraction * count))
    held = np.zeros(count, bool)
    held[rng.permutation(count)[:n_hold]] = True

    def table(mask):
        v = len(variables)
        return make_table(
            time=parse_time(time),
            lat=np.tile(lat[mask], v),
            lon=np.tile(lon[mask], v),
            variable=np.repeat(np.asarray(variables, dtype=object), mask.sum()),
            value=vals[:, mask].ravel(),
            sigma=np.repeat(sig, mask.sum()),
        )

    return table(~held), table(held)
