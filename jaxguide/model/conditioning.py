"""Conditioning inputs of cBottle: calendar, dataset label and the monthly-SST condition.

Everything follows cBottle's AMIP inference path (``dataset_3d._encode_amip`` and
``AmipSSTLoader``), re-derived here in NumPy:

* calendar: timestamps are truncated to whole seconds (``as_cftime``), then
  ``second_of_day`` = seconds since 00:00 and ``day_of_year`` = days since Jan 1 00:00,
  **0-based and fractional**, both float32 (N, 1);
* label: one-hot of length 1024, index = position in cBottle's ``LABELS`` (icon 0, era5 1);
* SST: input4MIPs ``tosbcs`` (deg C, monthly, lat/lon) linearly interpolated in time
  between the monthly values (xarray ``interp(method="linear")`` semantics, in the
  file's own calendar), + 273.15 K, bilinear regrid to HEALPix pixel centres with
  periodic longitude (earth2grid ``LatLonGrid.get_bilinear_regridder_to``: a stencil
  with any NaN, or a pixel poleward of the outermost grid latitude, gives NaN), then
  ``encode_sst``: NaN (land / missing) -> 290 K, ``(sst - 287.6897) / 15.5862``.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Sequence

import cftime
import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.grid import healpix
from jaxguide.io.times import parse_time
from jaxguide.model.config import LABELS, MAX_CLASSES  # cBottle: one-hot index 0 = ICON, 1 = ERA5

logger = logging.getLogger(__name__)

SST_LAND_FILL_VALUE = 290.0  # K
SST_MEAN = 287.6897  # K
SST_SCALE = 15.5862  # K
KELVIN_OFFSET = 273.15


class SSTTimeError(ValueError):
    """A requested time outside the SST data's time range."""


# --------------------------------------------------------------------------------------
# Calendar


def _fields(t) -> tuple[int, int, int, int, int, int]:
    """(year, month, day, hour, minute, second), UTC, fractional seconds truncated."""
    if isinstance(t, (str, np.datetime64, datetime.datetime)) or not hasattr(t, "year"):
        t = parse_time(t)  # ISO 8601 text or datetime-like -> UTC (cftime objects pass as they are)
    return int(t.year), int(t.month), int(t.day), int(t.hour), int(t.minute), int(t.second)


def calendar_inputs(times: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """cBottle's ``(second_of_day, day_of_year)`` for timestamps, each (N, 1) float32.

    ``times``: ISO 8601 text (:mod:`jaxguide.io.times`), or datetime / cftime objects
    (Gregorian calendar; tz-aware times are converted to UTC). ``day_of_year`` is
    0-based and fractional: 2000-02-29 12:30 -> 59.5208.
    """
    if isinstance(times, (str, np.datetime64, pd.Timestamp, datetime.datetime, cftime.datetime)):
        times = [times]
    sod, doy = [], []
    for t in times:
        y, mo, d, h, mi, s = _fields(t)
        seconds = h * 3600 + mi * 60 + s
        days = (datetime.date(y, mo, d) - datetime.date(y, 1, 1)).days
        sod.append(float(seconds))
        # (time - Jan 1) / 1 day, as Python's exact timedelta division does
        doy.append((days * 86400 + seconds) / 86400)
    return (
        np.asarray(sod, dtype=np.float64).astype(np.float32).reshape(-1, 1),
        np.asarray(doy, dtype=np.float64).astype(np.float32).reshape(-1, 1),
    )


def frame_times(window_start, time_length: int, time_step_hours: float) -> pd.DatetimeIndex:
    """The T frame times of a video window: ``window_start + k * time_step``, k = 0..T-1.

    The video model never sees the spacing except through each frame's calendar; the
    checkpoint's ``batch_info.json`` ``time_step`` (hours) gives it (cBottle's
    ``Checkpoint.read_batch_info`` drops it: read it from the json).
    """
    if time_length < 1:
        raise ValueError(f"time_length must be >= 1, got {time_length}")
    if not time_step_hours > 0:
        raise ValueError(f"the frame time step must be positive, got {time_step_hours} h")
    start = pd.Timestamp(window_start)
    return pd.DatetimeIndex([start + pd.Timedelta(hours=float(time_step_hours) * k) for k in range(time_length)])


def frame_calendar_inputs(window_start, time_length: int, time_step_hours: float) -> tuple[np.ndarray, np.ndarray]:
    """``(second_of_day, day_of_year)`` per frame of a window, each (1, T) float32 (cBottle's video batch)."""
    sod, doy = calendar_inputs(list(frame_times(window_start, time_length, time_step_hours)))
    return sod.reshape(1, -1), doy.reshape(1, -1)


def frame_condition(target: np.ndarray, keep: np.ndarray, sst: np.ndarray | None) -> np.ndarray:
    """The video model's condition ``[target * mask, SST, mask]`` (cBottle's ``FrameMasker``).

    Args:
      target: (..., C, T, npix) normalised frames, network order; only the kept frames
        matter (the others are multiplied by 0; NaN stays NaN as in cBottle, and the
        network turns it into 0). Leading axes (members) are kept.
      keep: (T,) bool, True on the frames given to the model (conditioning frames).
      sst: encoded SST, (T, npix) per frame or (npix,) for all frames (``encode_sst``),
        or None for a model without the SST channel (``[target * mask, mask]``).
    Returns (..., C + 2, T, npix) float32 (C + 1 without SST); a bare (C, T, npix)
    target gives (1, C + 2, T, npix) (cBottle's batch of one).
    """
    target = np.asarray(target, np.float32)
    bare = target.ndim == 3
    if bare:
        target = target[None]
    *lead, c, t, npix = target.shape
    mask = np.asarray(keep, bool).reshape(-1)
    if mask.shape != (t,):
        raise ValueError(f"keep has {mask.size} entries for {t} frames")
    m = np.broadcast_to(mask.astype(np.float32)[:, None], (*lead, 1, t, npix))
    parts = [target * m]
    if sst is not None:
        parts.append(np.broadcast_to(np.asarray(sst, np.float32), (t, npix))[None] * np.ones((*lead, 1, 1, 1), np.float32))
    parts.append(m)
    return np.concatenate(parts, axis=-3).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class KnownFrames:
    """Frames of a video window given to the model (as cBottle's ``VideoAutoregression``
    inserts them): values on the ``keep`` frames, normalised units, network order.

    values: (C, T, npix) for every member, or (M, C, T, npix) one per member (e.g. the
      last frames of each member's previous window in a chained run); entries on frames
      not kept are ignored.
    keep: (T,) bool.
    """

    values: np.ndarray
    keep: np.ndarray

    def __post_init__(self):
        v = np.asarray(self.values, np.float32)
        keep = np.asarray(self.keep, bool).reshape(-1)
        if v.ndim not in (3, 4) or v.shape[-2] != keep.size:
            raise ValueError(f"known frames must be (C, T, npix) or (M, C, T, npix) with T = {keep.size} "
                             f"(the keep mask), got {v.shape}")
        if not np.all(np.isfinite(v[..., keep, :])):
            raise ValueError("known frames have NaN or infinite values on the kept frames")
        object.__setattr__(self, "values", v)
        object.__setattr__(self, "keep", keep)

    @property
    def per_member(self) -> bool:
        return self.values.ndim == 4


def window_conditioning(window, *, channels: int, nside: int = 64, condition_channels: int = 0,
                        known: KnownFrames | None = None, sst_path=None, sst_offset: float = 0.0,
                        sst_data: xr.Dataset | None = None) -> dict[str, np.ndarray]:
    """The conditioning pytree of a video cBottle for one :class:`~jaxguide.model.window.FrameWindow`.

    ``{"second_of_day": (T,), "day_of_year": (T,), "condition": (C + 2, T, npix)}``
    float32, net order: calendar per frame and ``[known * mask, SST, mask]``
    (:func:`frame_condition`; no SST channel when ``condition_channels == C + 1``; mask 0
    everywhere without ``known`` frames: the model generates every frame). With
    per-member ``known`` frames every leaf gets a leading member axis (M, ...).
    SST per frame from ``sst_path`` / ``sst_data`` as :func:`assemble`.
    """
    t = window.length
    sod, doy = calendar_inputs(list(window.times))
    cond: dict[str, np.ndarray] = {"second_of_day": sod.reshape(t), "day_of_year": doy.reshape(t)}
    if condition_channels not in (channels + 1, channels + 2):
        raise ValueError(f"a video model's condition has {channels} + 2 channels (frames, SST, mask) or {channels} + 1 "
                         f"(frames, mask); this one has {condition_channels}")
    sst = None
    if condition_channels == channels + 2:
        if sst_data is None:
            if sst_path is None:
                raise ValueError("this model is conditioned on sea-surface temperature: pass --sst FILE "
                                 "(an input4MIPs/AMIP 'tosbcs' NetCDF covering the window)")
            sst_data = read_amip_sst(sst_path)
        sst = np.stack([sst_at(sst_data, ti, nside=nside, offset=sst_offset).reshape(-1) for ti in window.times])
    elif sst_path is not None or sst_data is not None:
        logger.warning("the model has no SST condition channel; ignoring the SST input %s", sst_path or "")
    npix = 12 * nside**2
    if known is None:
        known = KnownFrames(np.zeros((channels, t, npix), np.float32), np.zeros(t, bool))
    if known.values.shape[-3:] != (channels, t, npix):
        raise ValueError(f"known frames must be ({channels}, {t}, {npix}) per member, got {known.values.shape}")
    cond["condition"] = frame_condition(known.values, known.keep, sst)
    if known.per_member:
        m = known.values.shape[0]
        cond["second_of_day"] = np.broadcast_to(cond["second_of_day"], (m, t)).copy()
        cond["day_of_year"] = np.broadcast_to(cond["day_of_year"], (m, t)).copy()
    else:
        cond["condition"] = cond["condition"][0]
    return cond


# --------------------------------------------------------------------------------------
# Labels


def label_index(name: str) -> int:
    """cBottle's dataset label index (``"icon"`` 0, ``"era5"`` 1), case-insensitive."""
    key = str(name).lower()
    if key not in LABELS:
        raise ValueError(f"unknown dataset label {name!r}; valid labels: {list(LABELS)}")
    return LABELS.index(key)


def label_one_hot(name: str, label_dim: int = MAX_CLASSES) -> np.ndarray:
    """One-hot class label (label_dim,) float32 for a dataset name."""
    idx = label_index(name)
    if label_dim <= idx:
        raise ValueError(f"label_dim {label_dim} too small for label index {idx}")
    out = np.zeros(label_dim, dtype=np.float32)
    out[idx] = 1.0
    return out


# --------------------------------------------------------------------------------------
# SST


def encode_sst(sst_k: np.ndarray, is_land: np.ndarray | None = None) -> np.ndarray:
    """cBottle's SST condition: land (``is_land`` or NaN) -> 290 K, then standardise.

    sst_k: (..., npix) sea-surface temperature in K. Returns float32, same shape.
    """
    sst_k = np.asarray(sst_k, dtype=np.float64)
    land = np.isnan(sst_k) if is_land is None else np.asarray(is_land, bool)
    filled = np.where(land, SST_LAND_FILL_VALUE, sst_k)
    return ((filled - SST_MEAN) / SST_SCALE).astype(np.float32)


def read_amip_sst(path: str | os.PathLike, variable: str = "tosbcs") -> xr.Dataset:
    """Load an input4MIPs SST file (``tosbcs``, deg C, monthly, lat/lon) into memory.

    Times are kept undecoded (numbers with ``units``/``calendar`` attributes) so that
    any CF calendar (standard, noleap, 360_day, ...) interpolates in its own calendar.
    Coordinates are renamed to ``time, lat, lon``; lon is sorted into increasing order.
    """
    path = os.fspath(path)
    what = f"SST file {path!r}"
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} is a directory; expected an AMIP tosbcs NetCDF file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such SST file: {path!r}")
    try:
        with xr.open_dataset(path, decode_times=False, engine="netcdf4") as raw:
            ds = raw.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} is not a NetCDF file ({e}); expected the input4MIPs AMIP tosbcs NetCDF "
                         "(see jaxguide.model.sst, or write a synthetic one with `jaxguide synthetic-sst`)") from None
    ds = ds.rename({k: v for k, v in {"latitude": "lat", "longitude": "lon"}.items() if k in ds.variables})
    if variable not in ds:
        raise ValueError(f"{what} has no variable {variable!r} (found {list(ds.data_vars)}); expected the "
                         "input4MIPs AMIP tosbcs NetCDF (see jaxguide.model.sst)")
    missing = [d for d in ("time", "lat", "lon") if d not in ds[variable].dims]
    if missing:
        raise ValueError(f"{what}: {variable} lacks dimensions {missing} (has {ds[variable].dims})")
    if "units" not in ds["time"].attrs:
        raise ValueError(f"{what}: time has no CF 'units' attribute")
    ds["time"].attrs.setdefault("calendar", "standard")
    ds = ds[[variable]].transpose("time", "lat", "lon")
    ds = ds.assign_coords(lon=np.asarray(ds["lon"].values, np.float64) % 360.0).sortby("lon")
    ds.attrs["sst_variable"] = variable
    return ds


def _time_number(ds: xr.Dataset, time) -> float:
    """``time`` in the units/calendar of ``ds.time`` (a float)."""
    units = ds["time"].attrs["units"]
    cal = ds["time"].attrs.get("calendar", "standard")
    y, mo, d, h, mi, s = _fields(time)
    try:
        ct = cftime.datetime(y, mo, d, h, mi, s, calendar=cal)
    except ValueError as e:
        raise SSTTimeError(f"{time} does not exist in the SST file's {cal!r} calendar: {e}") from e
    return float(cftime.date2num(ct, units, calendar=cal))


def sst_kelvin_latlon(ds: xr.Dataset, time) -> np.ndarray:
    """SST (nlat, nlon) in K at ``time``, linear in time between the monthly values."""
    var = ds.attrs.get("sst_variable", "tosbcs")
    tnum = np.asarray(ds["time"].values, dtype=np.float64)
    if tnum.size == 0:
        raise SSTTimeError("the SST data has no time steps")
    q = _time_number(ds, time)
    if not (tnum[0] <= q <= tnum[-1]):
        units = ds["time"].attrs["units"]
        cal = ds["time"].attrs.get("calendar", "standard")
        first, last = cftime.num2date([tnum[0], tnum[-1]], units, calendar=cal)
        raise SSTTimeError(f"time {time} is outside the SST data ({first} .. {last})")
    i = int(np.clip(np.searchsorted(tnum, q, side="right") - 1, 0, max(tnum.size - 2, 0)))
    data = ds[var].values
    if tnum.size == 1:
        field = data[0].astype(np.float64)
    else:
        w = (q - tnum[i]) / (tnum[i + 1] - tnum[i])
        field = (1 - w) * data[i].astype(np.float64) + w * data[i + 1].astype(np.float64)
    units = str(ds[var].attrs.get("units", "degC")).strip()
    if units not in ("K", "k", "kelvin", "Kelvin"):
        field = field + KELVIN_OFFSET
    return field


def regrid_latlon_to_healpix(
    field: np.ndarray, lat: np.ndarray, lon: np.ndarray, nside: int = 64, order: healpix.Order = "net"
) -> np.ndarray:
    """Bilinear regrid (..., nlat, nlon) -> (..., npix) at pixel centres, earth2grid style.

    Longitude periodic; lat ascending or descending. Pixels poleward of the outermost
    grid latitude, and stencils touching a NaN, give NaN (as earth2grid does).
    """
    from jaxguide.observations.era5 import bilinear_latlon

    plon, plat = healpix.lonlat(nside, order)
    return bilinear_latlon(field, lat, lon, plat, plon, outside="nan")


def sst_kelvin_at(ds: xr.Dataset, time, nside: int = 64, order: healpix.Order = "net") -> np.ndarray:
    """SST (npix,) float64 in K on HEALPix at ``time``; NaN where missing (land)."""
    field = sst_kelvin_latlon(ds, time)
    return regrid_latlon_to_healpix(field, ds["lat"].values, ds["lon"].values, nside, order)


def sst_at(ds: xr.Dataset, time, nside: int = 64, offset: float = 0.0) -> np.ndarray:
    """Encoded SST condition (1, 1, 1, npix) float32 (batch, channel, time, pixel), net order.

    ``offset`` (K) is added to the ocean SST before encoding (cBottle's ``sst_offset``,
    for warming experiments); land stays at 290 K.
    """
    return encode_sst(sst_kelvin_at(ds, time, nside, "net") + offset)[None, None, None, :]


def land_mask_from_sst(sst_k: np.ndarray) -> np.ndarray:
    """Where the SST condition is missing (NaN): cBottle treats these pixels as land."""
    return np.isnan(np.asarray(sst_k))


# --------------------------------------------------------------------------------------
# Assembly


def assemble(time, *, nside: int = 64, sst_channels: int = 0, sst_path=None, sst_offset: float = 0.0,
             sst_data: xr.Dataset | None = None) -> dict[str, np.ndarray]:
    """The conditioning pytree of cBottle for one analysis time.

    Returns ``{"second_of_day": (1, 1), "day_of_year": (1, 1)}`` float32, plus
    ``"condition"``: the encoded AMIP SST (1, 1, 1, npix) net order when the model has
    ``sst_channels > 0`` (then ``sst_path`` (an input4MIPs ``tosbcs`` NetCDF) or an
    already read ``sst_data`` is required). Same structure and shapes for every time, so
    one compiled program serves them all. ``sst_offset`` (K) as in :func:`sst_at`.
    """
    sod, doy = calendar_inputs([time])
    cond = {"second_of_day": sod.reshape(1, 1), "day_of_year": doy.reshape(1, 1)}
    if sst_channels > 0:
        if sst_data is None:
            if sst_path is None:
                raise ValueError(
                    "this model is conditioned on sea-surface temperature: pass --sst FILE "
                    "(an input4MIPs/AMIP 'tosbcs' NetCDF covering the analysis time)"
                )
            sst_data = read_amip_sst(sst_path)  # names a missing file, a directory, a non-NetCDF file
        cond["condition"] = sst_at(sst_data, time, nside=nside, offset=sst_offset)
    elif sst_path is not None or sst_data is not None:
        logger.warning("the model has no condition channel; ignoring the SST input %s", sst_path or "")
    return cond
