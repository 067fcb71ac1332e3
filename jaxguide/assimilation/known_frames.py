"""Known frames of a video window read from a NetCDF file (a previous analysis, a state).

What ``jaxguide assimilate --condition FILE`` reads: a dataset on the model's HEALPix
grid (dimension ``pixel`` of 12 nside^2 cells in NEST order, as ``jaxguide assimilate``
writes, optionally a ``member`` dimension) with one variable per model channel in
physical units. Its times that coincide with frames of the first window become the
window's known frames, given to the model through its condition channels (cBottle's
``FrameMasker``); the others are not used (logged). A file with M members conditions
member ``i`` of the ensemble on member ``i mod M``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.grid import healpix

from jaxguide.model import units
from jaxguide.model.conditioning import KnownFrames
from jaxguide.assimilation.dataset import PRIOR_SUFFIX
from jaxguide.model.window import FrameWindow

logger = logging.getLogger(__name__)

# channels cBottle's ERA5 frames lack (NaN in its condition, 0 after the network's nan_to_num)
MAY_BE_MISSING = ("rlut", "rsut", "rsds")


class ConditioningFileError(ValueError):
    """A conditioning file that does not fit the model: grid, channels, times or values."""


def _open(source: str | os.PathLike | xr.Dataset) -> tuple[xr.Dataset, str]:
    if isinstance(source, xr.Dataset):
        return source, "the conditioning dataset"
    path = Path(source)
    what = f"conditioning file {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"no such conditioning file: {str(path)!r}")
    try:
        with xr.open_dataset(path) as ds:
            return ds.load(), what
    except (OSError, ValueError) as e:
        raise ConditioningFileError(f"{what} is not a readable NetCDF file ({e})") from None


def read_known_frames(
    source: str | os.PathLike | xr.Dataset,
    window: FrameWindow,
    *,
    channels: Sequence[str],
    center: Sequence[float],
    scale: Sequence[float],
    nside: int,
    members: int,
) -> tuple[KnownFrames, list[pd.Timestamp]]:
    """Known frames of ``window`` from a file; returns ``(known, times used)``.

    known.values: (M, C, T, npix) normalised, network order, one per ensemble member
    (``members`` of them; member i from the file's member ``i mod M_file``), zero on the
    frames not given. Raises :class:`ConditioningFileError` naming the problem: not
    HEALPix (a lat/lon file), another nside, missing channels, no time on the window's
    frames, a time inside the window but between its frames, NaN values.
    """
    ds, what = _open(source)
    npix = 12 * nside**2
    if "pixel" not in ds.dims:
        grid = "a lat/lon grid" if {"lat", "lon"} <= set(ds.dims) else f"dimensions {dict(ds.sizes)}"
        raise ConditioningFileError(
            f"{what} is on {grid}; known frames must be on the model's HEALPix grid (dimension 'pixel', "
            f"{npix} cells, nside {nside}, NEST order, as jaxguide assimilate writes)")
    if ds.sizes["pixel"] != npix:
        got = ds.sizes["pixel"]
        try:
            side = f"nside {healpix.nside_of_npix(got)}"
        except ValueError:
            side = "not a HEALPix grid"
        raise ConditioningFileError(f"{what} has {got} pixels ({side}); the model's grid is nside {nside} ({npix} pixels)")
    order = str(ds["crs"].attrs.get("healpix_order", "nest")).lower() if "crs" in ds else "nest"
    if order not in ("nest", "nested"):
        raise ConditioningFileError(f"{what} is in HEALPix {order!r} order; expected NEST (as jaxguide writes)")
    channels = list(channels)
    missing = [c for c in channels if c not in ds.data_vars]
    fatal = [c for c in missing if c not in MAY_BE_MISSING]
    if fatal:
        have = sorted(v for v in ds.data_vars if not str(v).endswith(PRIOR_SUFFIX) and "pixel" in ds[v].dims)
        raise ConditioningFileError(f"{what} lacks the model's channel(s) {fatal} (it has {have})")
    if missing:
        logger.warning("%s lacks %s; they are given as 0 (normalised), as cBottle does for ERA5 frames", what, missing)
    if "time" not in ds.coords:
        raise ConditioningFileError(f"{what} has no time coordinate")
    file_times = pd.DatetimeIndex(pd.to_datetime(np.atleast_1d(ds["time"].values)))
    pos = window.position(file_times.values)
    inside = (pos >= -1e-9) & (pos <= window.length - 1 + 1e-9)
    on_frame = inside & (np.abs(pos - np.round(pos)) * window.time_step_hours * 3600.0 <= 0.5)
    if (inside & ~on_frame).any():
        bad = file_times[inside & ~on_frame][0]
        raise ConditioningFileError(
            f"{what} has time {bad}, inside the window but between its frames ({window.time_step_hours:g} h apart "
            f"from {window.start}); known frames must be at frame times")
    if not on_frame.any():
        raise ConditioningFileError(
            f"none of the times of {what} ({file_times[0]} .. {file_times[-1]}) is a frame of the window "
            f"{window.start} .. {window.end}; choose the window start (--time) on one of them")
    used = [t for t, ok in zip(file_times, on_frame) if ok]
    frame_of = np.round(pos[on_frame]).astype(int)
    unused = int((~on_frame).sum())
    if unused:
        logger.info("%s: %d of its %d times are outside the window and not used", what, unused, len(file_times))

    n_file = ds.sizes.get("member", 1)
    center = np.asarray(center, np.float64)
    scale = np.asarray(scale, np.float64)
    values = np.zeros((members, len(channels), window.length, npix), np.float32)
    tidx = np.flatnonzero(on_frame)
    for c, name in enumerate(channels):
        if name in missing:
            continue
        v = ds[name]
        extra = set(v.dims) - {"member", "time", "pixel"}
        if extra:
            raise ConditioningFileError(f"{what}: {name} has unexpected dimensions {sorted(extra)}")
        v = v.expand_dims("member") if "member" not in v.dims else v
        if "time" not in v.dims:
            raise ConditioningFileError(f"{what}: {name} has no time dimension")
        a = v.transpose("member", "time", "pixel").values[:, tidx].astype(np.float64)  # (M_file, k, npix) NEST
        bad = ~np.isfinite(a)
        if bad.any():
            at = ", ".join(used[k].isoformat() for k in np.flatnonzero(bad.any(axis=(0, 2))))
            raise ConditioningFileError(f"{what}: {name} has NaN or infinite values ({int(bad.sum())}) at {at}; "
                                        "known frames must be complete fields")
        a = healpix.reorder(units.normalise(a, center[c], scale[c]), "nest", "net", axis=-1)
        for i in range(members):
            values[i, c][frame_of] = a[i % n_file]
    keep = np.zeros(window.length, bool)
    keep[frame_of] = True
    return KnownFrames(values, keep), used
