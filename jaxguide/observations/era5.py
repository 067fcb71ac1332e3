"""ERA5 pressure-level temperature: reading CDS/cfgrib files, point observations, HEALPix regrid.

:func:`read_era5_temperature` reads the layouts users have:

* CDS NetCDF, current: dims ``valid_time, pressure_level, latitude, longitude``
  (float32, latitude descending), sometimes several NetCDF files zipped together (one
  per stream; only files holding ``t`` are used);
* CDS NetCDF, legacy: dims ``time, level, latitude, longitude``, int16 packed with
  ``scale_factor``/``add_offset`` and ``_FillValue`` (decoded by xarray's CF masking);
  with recent data an extra ``expver`` dimension (ERA5 / ERA5T, each field in one of
  them) that is merged;
* cfgrib-written NetCDF and GRIB itself (GRIB needs the optional extra
  ``pip install 'jaxguide[grib]'``, i.e. cfgrib + eccodes): dims
  ``[number,] time, [step,] isobaricInhPa, latitude, longitude`` with a ``valid_time``
  coordinate over ``time`` (or ``time x step``). The observation time is
  ``valid_time`` (= ``time + step``), so forecast-type files (step != 0) are placed
  at the time they are valid, not at their initialisation time;
* ensembles (a ``number`` dimension with more than one member, e.g. ERA5's EDA): one
  member is chosen with ``member=`` (the member's ``number`` value); without it the
  file is refused (:class:`ERA5FormatError` naming the dimension).

The result is one layout: Dataset with ``t`` (K, float64) on dims
``(time, level, lat, lon)``, ``level`` in hPa (int), ``lat`` ASCENDING, ``lon`` in
[0, 360) ascending, ``time`` datetime64[ns] (UTC, the valid time).
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.grid import healpix
from jaxguide.grid.latlon import bilinear_latlon
from jaxguide.observations.strategies import sample_locations
from jaxguide.observations.table import make_table, parse_time

logger = logging.getLogger(__name__)

_LEVEL_NAMES = ("pressure_level", "isobaricInhPa", "level", "plev")
_LAT_NAMES = ("latitude", "lat")
_LON_NAMES = ("longitude", "lon")
_MEMBER_DIM = "number"
_KELVIN = ("k", "kelvin", "degk", "deg_k")


class ERA5FormatError(ValueError):
    """A file that is not ERA5 pressure-level temperature in a known layout."""


def _first(names: Sequence[str], ds: xr.Dataset) -> str | None:
    return next((n for n in names if n in ds.variables or n in ds.dims), None)


def _select_member(t: xr.DataArray, name: str, member: int | None) -> xr.DataArray:
    """The member ``member`` (a value of ``number``) of an ensemble file."""
    if _MEMBER_DIM in t.dims:
        numbers = np.asarray(t[_MEMBER_DIM].values) if _MEMBER_DIM in t.coords else np.arange(t.sizes[_MEMBER_DIM])
        if member is None:
            if t.sizes[_MEMBER_DIM] == 1:
                return t.isel({_MEMBER_DIM: 0})
            raise ERA5FormatError(
                f"{name}: 't' holds an ensemble of {numbers.size} members (dimension {_MEMBER_DIM!r}, "
                f"numbers {numbers.min()}..{numbers.max()}); choose one with member=N "
                f"(command line: --member N)"
            )
        hit = np.flatnonzero(numbers == member)
        if hit.size != 1:
            raise ERA5FormatError(
                f"{name}: no ensemble member number {member} (dimension {_MEMBER_DIM!r} holds "
                f"{numbers.tolist()})"
            )
        return t.isel({_MEMBER_DIM: int(hit[0])})
    if member is not None:
        if _MEMBER_DIM in t.coords and t[_MEMBER_DIM].ndim == 0 and int(t[_MEMBER_DIM]) == member:
            return t  # one member of an ensemble, saved alone
        have = f"only member {int(t[_MEMBER_DIM])}" if _MEMBER_DIM in t.coords and t[_MEMBER_DIM].ndim == 0 else (
            f"no ensemble dimension {_MEMBER_DIM!r}")
        raise ERA5FormatError(f"{name}: member={member} was asked for, but the file has {have}")
    return t


def _valid_times(t: xr.DataArray, name: str) -> xr.DataArray:
    """Put ``t`` on one ``time`` dimension holding the VALID time (``time + step``).

    CDS NetCDF: ``valid_time`` is the dimension. cfgrib: ``time`` (initialisation) is
    the dimension, with ``step`` (scalar or a second dimension) and ``valid_time``
    (over ``time`` or ``time x step``); forecasts are flattened to one axis of valid
    times, which must be distinct."""
    if "valid_time" in t.dims:
        if "time" in t.dims or "step" in t.dims:
            raise ERA5FormatError(f"{name}: 't' has 'valid_time' and 'time'/'step' dimensions (dims {t.dims}); "
                                  f"expected one time dimension")
        return t.drop_vars([c for c in ("time", "step") if c in t.coords]).rename({"valid_time": "time"})
    if "time" not in t.dims:  # one time: a scalar coordinate
        if "time" in t.coords:
            t = t.expand_dims("time")
        elif "valid_time" in t.coords:
            return t.expand_dims("valid_time").drop_vars([c for c in ("step",) if c in t.coords]).rename(
                {"valid_time": "time"})
        else:
            raise ERA5FormatError(f"{name}: 't' has no time (dims {t.dims}); expected a 'time' or "
                                  f"'valid_time' dimension or coordinate")
    if "valid_time" in t.coords:
        valid = t["valid_time"]
    elif "step" in t.coords:
        valid = t["time"] + t["step"]
    else:
        valid = t["time"]
    axes = ("time", "step") if "step" in t.dims else ("time",)
    if not set(valid.dims) <= set(axes):
        raise ERA5FormatError(f"{name}: 'valid_time' has dims {valid.dims}; expected {axes}")
    valid = xr.broadcast(valid, *(t[d] for d in axes))[0].transpose(*axes).values.ravel()
    other = [d for d in t.dims if d not in axes]
    t = t.transpose(*axes, *other)
    shape = (-1, *t.shape[len(axes):])
    coords = {d: (d, t[d].values, t[d].attrs) for d in other if d in t.coords}
    out = xr.DataArray(np.asarray(t.values).reshape(shape), dims=("time", *other),
                       coords={**coords, "time": valid}, attrs=t.attrs)
    times = pd.DatetimeIndex(valid)
    if times.has_duplicates:
        dup = times[times.duplicated()]
        raise ERA5FormatError(f"{name}: {len(dup)} fields are valid at a time another field is valid at "
                              f"(first {dup[0]}; valid_time = time + step); expected one field per valid time")
    return out


def _merge_expver(t: xr.DataArray, name: str) -> xr.DataArray:
    """ERA5 with ERA5T (legacy CDS: an ``expver`` dimension, 1 = ERA5, 5 = ERA5T, each
    field present in exactly one of them, NaN in the other): one field per time."""
    t = t.load()
    finite = np.isfinite(t)
    if bool((finite.sum("expver") > 1).any()):
        raise ERA5FormatError(f"{name}: 't' has values in more than one 'expver' (ERA5 and ERA5T) at the "
                              f"same time; expected each field in one of them")
    merged = t.where(finite, 0.0).sum("expver", keep_attrs=True)
    return merged.where(finite.any("expver"))


def _normalise_one(ds: xr.Dataset, name: str, member: int | None = None) -> xr.Dataset:
    """One file's ``t`` in the module's layout; ERA5FormatError naming ``name`` otherwise."""
    t = ds["t"]
    units = str(t.attrs.get("units", "K")).strip().lower()
    if units not in _KELVIN:
        raise ERA5FormatError(f"{name}: 't' has units {t.attrs.get('units')!r}; expected K")
    level = _first(_LEVEL_NAMES, ds)
    lat, lon = _first(_LAT_NAMES, ds), _first(_LON_NAMES, ds)
    if lat is None or lon is None or lat not in t.dims or lon not in t.dims:
        raise ERA5FormatError(f"{name}: 't' is not on a latitude/longitude grid (dims {t.dims}); "
                              f"expected dimensions latitude and longitude")
    if level is None:
        raise ERA5FormatError(f"{name}: 't' has no pressure level (dims {t.dims}); expected one of "
                              f"{list(_LEVEL_NAMES)} as a dimension or coordinate")
    if level not in t.dims:  # a single-level request may drop the level dim
        t = t.expand_dims(level)
    t = _select_member(t, name, member)
    if "expver" in t.dims and t.sizes["expver"] > 1:
        t = _merge_expver(t, name)
    t = t.rename({level: "level", lat: "lat", lon: "lon"})
    t = _valid_times(t, name)
    extra = [d for d in t.dims if d not in ("time", "level", "lat", "lon")]
    for d in extra:  # e.g. a length-1 'expver' dimension
        if t.sizes[d] != 1:
            raise ERA5FormatError(f"{name}: unexpected dimension {d!r} of size {t.sizes[d]} "
                                  f"(expected time, level, latitude, longitude and optionally number/step)")
        t = t.isel({d: 0})
    t = t.transpose("time", "level", "lat", "lon").load().astype(np.float64)
    keep = {"time", "level", "lat", "lon"}
    t = t.drop_vars([c for c in t.coords if c not in keep])
    level_attrs = dict(ds[level].attrs) if level in ds.variables else {}
    t.attrs = {"units": "K", "long_name": "temperature"}
    lev = np.asarray(t["level"].values, dtype=np.float64)
    if str(level_attrs.get("units", "hPa")).strip() == "Pa":
        lev = lev / 100.0
    try:
        times = pd.to_datetime(np.asarray(t["time"].values)).astype("datetime64[ns]")
    except (TypeError, ValueError) as e:
        raise ERA5FormatError(f"{name}: times could not be read as dates ({e})") from None
    out = t.to_dataset(name="t")
    out = out.assign_coords(
        time=times,
        level=lev.round().astype(np.int64),
        lat=np.asarray(out["lat"].values, np.float64),
        lon=np.asarray(out["lon"].values, np.float64) % 360.0,
    )
    return out.sortby(["lat", "lon", "level", "time"])


def _expand(paths) -> tuple[list[Path], tempfile.TemporaryDirectory | None]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files, tmp = [], None
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"no such ERA5 file: {str(p)!r}")
        if zipfile.is_zipfile(p):
            tmp = tmp or tempfile.TemporaryDirectory(prefix="jaxguide-era5-")
            with zipfile.ZipFile(p) as z:
                for m in z.namelist():
                    if m.endswith((".nc", ".nc4", ".grib", ".grib2", ".grb", ".grb2")) and not m.startswith("__MACOSX"):
                        target = Path(tmp.name) / f"{len(files)}_{Path(m).name}"
                        target.write_bytes(z.read(m))
                        files.append(target)
        else:
            files.append(p)
    return files, tmp


def _is_grib(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head == b"GRIB" or path.suffix.lower() in (".grib", ".grib2", ".grb", ".grb2")


def _open(path: Path) -> xr.Dataset:
    """Open a NetCDF or GRIB file lazily; ERA5FormatError naming the file when neither."""
    if _is_grib(path):
        try:
            import cfgrib  # noqa: F401
        except ImportError:
            raise ERA5FormatError(
                f"{path}: a GRIB file; reading GRIB needs cfgrib and eccodes: pip install 'jaxguide[grib]'"
            ) from None
        try:  # temperature on pressure levels only: other messages would make cfgrib fail to build one cube
            return xr.open_dataset(path, engine="cfgrib", backend_kwargs={
                "indexpath": "", "filter_by_keys": {"shortName": "t", "typeOfLevel": "isobaricInhPa"}})
        except Exception as e:  # cfgrib raises assorted errors on files it cannot map to one cube
            raise ERA5FormatError(f"{path}: cannot read as GRIB temperature on pressure levels ({type(e).__name__}: {e})") from None
    try:
        return xr.open_dataset(path, engine="netcdf4", mask_and_scale=True, decode_times=True)
    except (OSError, ValueError) as e:
        raise ERA5FormatError(
            f"{path}: not a readable NetCDF or GRIB file (expected ERA5 pressure-level temperature from the CDS "
            f"or cfgrib; {' '.join(str(e).split())})"
        ) from None


def read_era5_temperature(
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, member: int | None = None
) -> xr.Dataset:
    """Read ERA5 pressure-level temperature (NetCDF or GRIB files, several files or CDS zips).

    Files without ``t`` (other streams of a CDS download) are skipped; pieces are
    combined along time/level (overlapping values must agree). ``member``: the
    ``number`` value of the member to read from an ensemble file (required when a file
    holds more than one). Returns the normalised layout described in the module
    docstring, loaded into memory. Raises FileNotFoundError, ERA5FormatError (naming
    the file and what was expected).
    """
    files, tmp = _expand(paths)
    try:
        parts = []
        for f in files:
            with _open(f) as raw:
                if "t" not in raw.data_vars:
                    logger.info("%s: no temperature 't' (variables %s), skipped", f, list(raw.data_vars))
                    continue
                parts.append(_normalise_one(raw, str(f), member))
    finally:
        if tmp is not None:
            tmp.cleanup()
    if not parts:
        raise ERA5FormatError(f"no ERA5 temperature variable 't' in {[str(f) for f in files]}")
    if len(parts) == 1:
        ds = parts[0]
    else:
        try:
            ds = xr.combine_by_coords(parts, compat="no_conflicts", join="outer")
        except (ValueError, xr.MergeError) as e:
            raise ERA5FormatError(f"the files {[str(f) for f in files]} do not combine into one field "
                                  f"({' '.join(str(e).split())})") from None
    return ds.sortby(["time", "level"])


# --------------------------------------------------------------------------------------
# Observations and HEALPix


def era5_to_healpix(ds: xr.Dataset, nside: int = 64, order: healpix.Order = "net") -> xr.DataArray:
    """Regrid ``t`` to HEALPix pixel centres: DataArray (time, level, pixel), K, float64."""
    plon, plat = healpix.lonlat(nside, order)
    vals = bilinear_latlon(ds["t"].values, ds["lat"].values, ds["lon"].values, plat, plon, outside="clamp")
    return xr.DataArray(
        vals,
        dims=("time", "level", "pixel"),
        coords={"time": ds["time"].values, "level": ds["level"].values},
        attrs={"units": "K", "nside": nside, "order": order},
        name="t",
    )


def era5_to_observations(
    ds: xr.Dataset,
    levels: Sequence[int] = (850, 500, 300),
    points: pd.DataFrame | Mapping | None = None,
    *,
    strategy: str | None = None,
    count: int | None = None,
    rng: np.random.Generator | None = None,
    sigma: float | Mapping[str, float] = 1.0,
    times: Sequence | None = None,
    noise: bool = False,
) -> pd.DataFrame:
    """Point observations of ERA5 temperature, channel names ``T{level}``, values in K.

    Locations: ``points`` (``lat``, ``lon`` in degrees), or ``strategy`` ("random" or
    "uniform", see :func:`jaxguide.observations.strategies.sample_locations`) with ``count`` and an
    explicit NumPy ``rng``. Every location is observed at every time in ``times``
    (default: all of ``ds.time``) and every level. Values are bilinear in lat/lon;
    ``sigma`` (K, scalar or per variable) fills the sigma column, and with
    ``noise=True`` Gaussian noise of that std is added (needs ``rng``).
    """
    if (points is None) == (strategy is None):
        raise ValueError("give exactly one of points= or strategy=")
    if points is None:
        if count is None or rng is None:
            raise ValueError("strategy= needs count= and an explicit rng= (numpy Generator)")
        lon, lat = sample_locations(strategy, count, rng)
    else:
        lat = np.asarray(points["lat"], np.float64)
        lon = np.asarray(points["lon"], np.float64)
    if noise and rng is None:
        raise ValueError("noise=True needs an explicit rng= (numpy Generator)")
    levels = [int(lv) for lv in levels]
    missing = [lv for lv in levels if lv not in set(ds["level"].values.tolist())]
    if missing:
        raise ValueError(f"levels {missing} not in the data; available: {ds['level'].values.tolist()}")
    sel = ds["t"].sel(level=levels)
    if times is not None:
        try:
            want = pd.DatetimeIndex([parse_time(t) for t in times])
        except (TypeError, ValueError) as e:
            raise ValueError(f"times must be dates (ISO 8601, UTC): {e}") from None
        have = pd.DatetimeIndex(ds["time"].values)
        absent = want[~want.isin(have)]
        if len(absent):
            raise ValueError(f"times {[t.isoformat() for t in absent]} are not in the ERA5 data "
                             f"({len(have)} valid times, {have.min().isoformat()} .. {have.max().isoformat()})")
        sel = sel.sel(time=want)
    vals = bilinear_latlon(sel.values, ds["lat"].values, ds["lon"].values, lat, lon, outside="clamp")
    nt, nl, m = vals.shape
    names = [f"T{lv}" for lv in levels]
    var = np.broadcast_to(np.array(names)[None, :, None], vals.shape).ravel()
    sig = np.array([sigma[n] if isinstance(sigma, Mapping) else float(sigma) for n in names], np.float64)
    sig = np.broadcast_to(sig[None, :, None], vals.shape).ravel()
    value = vals.ravel()
    if noise:
        value = value + sig * rng.standard_normal(value.shape)
    return make_table(
        time=np.broadcast_to(sel["time"].values[:, None, None], vals.shape).ravel(),
        lat=np.broadcast_to(lat[None, None, :], vals.shape).ravel(),
        lon=np.broadcast_to(lon[None, None, :], vals.shape).ravel() % 360.0,
        variable=var,
        value=value,
        sigma=sig,
    )
