"""The AMIP sea-surface temperature that SST-conditioned cBottle models read: reading the
file, interpolating it in time and to HEALPix, encoding it; and a synthetic file to try them.

What cBottle does (``AmipSSTLoader``), re-derived here in NumPy: input4MIPs ``tosbcs``
(deg C, monthly, lat/lon) linearly interpolated in time between the monthly values
(xarray ``interp(method="linear")`` semantics, in the file's own calendar), + 273.15 K,
bilinear regrid to HEALPix pixel centres with periodic longitude (earth2grid
``LatLonGrid.get_bilinear_regridder_to``: a stencil with any NaN, or a pixel poleward of
the outermost grid latitude, gives NaN), then :func:`encode_sst`: NaN (land / missing)
-> 290 K, ``(sst - 287.6897) / 15.5862``.

cBottle conditions on the monthly AMIP sea-surface temperature of input4MIPs
(PCMDI-AMIP, e.g. ``tosbcs_input4MIPs_SSTsAndSeaIce_CMIP_PCMDI-AMIP-1-1-9_gn_187001-202212.nc``).
What :func:`read_amip_sst` reads:

- a NetCDF file with a variable ``tosbcs`` (other names via ``variable=``),
  dims ``(time, lat, lon)`` (``latitude``/``longitude`` are renamed);
- units ``degC`` (``K`` is accepted and recognised); NaN over land is fine (cBottle
  fills land with 290 K);
- ``time``: numbers with CF ``units`` (``days since 1870-01-01``) and ``calendar``
  (any CF calendar; ``standard`` if absent), one value per month at mid-month; the
  analysis time must lie between two of them (linear interpolation in time);
- ``lat``/``lon`` in degrees, any regular grid (1 degree in the AMIP file), lon
  either -180..180 or 0..360.

:func:`write_synthetic_sst` writes a file with exactly that layout from a smooth
zonal climatology (not observed data; its ``title``, ``source`` and ``comment``
attributes say so), so a user can run a real-shaped assimilation without a download.
"""

from __future__ import annotations

import os
from pathlib import Path

import cftime
import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.grid import healpix
from jaxguide.grid.latlon import bilinear_latlon
from jaxguide.io.files import atomic_write
from jaxguide.io.times import parse_time
from jaxguide.model.calendar import time_fields

SST_LAND_FILL_VALUE = 290.0  # K
SST_MEAN = 287.6897  # K
SST_SCALE = 15.5862  # K
KELVIN_OFFSET = 273.15

SST_VARIABLE = "tosbcs"
SST_TIME_UNITS = "days since 1870-01-01"
SYNTHETIC_TITLE = "SYNTHETIC sea-surface temperature in the AMIP tosbcs layout (not observed data)"


# what a sea-surface temperature can be (deg C): sea water freezes near -1.9 deg C; the
# warmest open ocean is near 35 deg C. Values outside are fill values or another unit.
SST_PLAUSIBLE_DEGC = (-5.0, 50.0)


class SSTTimeError(ValueError):
    """A requested time outside the SST data's time range."""


class SSTValueError(ValueError):
    """SST values that cannot be sea-surface temperatures: infinite, implausible (an
    unmasked fill value, a wrong unit), or no ocean at all at the requested time."""


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
    ds.attrs["jaxguide_sst_source"] = what
    return ds


def _time_number(ds: xr.Dataset, time) -> float:
    """``time`` in the units/calendar of ``ds.time`` (a float)."""
    units = ds["time"].attrs["units"]
    cal = ds["time"].attrs.get("calendar", "standard")
    y, mo, d, h, mi, s = time_fields(time)
    try:
        ct = cftime.datetime(y, mo, d, h, mi, s, calendar=cal)
    except ValueError as e:
        raise SSTTimeError(f"{time} does not exist in the SST file's {cal!r} calendar: {e}") from e
    return float(cftime.date2num(ct, units, calendar=cal))


def check_sst_covers(ds: xr.Dataset, times) -> None:
    """Raise :class:`SSTTimeError` naming the times of ``times`` outside the SST data
    (a campaign checks all its times before it starts, not when it reaches them)."""
    tnum = np.asarray(ds["time"].values, dtype=np.float64)
    if tnum.size == 0:
        raise SSTTimeError("the SST data has no time steps")
    outside = [t for t in times if not (tnum[0] <= _time_number(ds, t) <= tnum[-1])]
    if outside:
        units = ds["time"].attrs["units"]
        cal = ds["time"].attrs.get("calendar", "standard")
        first, last = cftime.num2date([tnum[0], tnum[-1]], units, calendar=cal)
        source = ds.attrs.get("jaxguide_sst_source")
        span = f"the SST data ({first} .. {last}{', ' + source if source else ''})"
        listed = ", ".join(str(t) for t in outside[:5]) + (" ..." if len(outside) > 5 else "")
        raise SSTTimeError(f"time {listed} is outside {span}" if len(outside) == 1
                           else f"{len(outside)} times are outside {span}: {listed}")


def sst_kelvin_latlon(ds: xr.Dataset, time) -> np.ndarray:
    """SST (nlat, nlon) in K at ``time``, linear in time between the monthly values.

    Raises :class:`SSTTimeError` outside the data, :class:`SSTValueError` when a month
    used holds values that cannot be SST (:func:`check_sst_values`)."""
    var = ds.attrs.get("sst_variable", "tosbcs")
    check_sst_covers(ds, [time])
    tnum = np.asarray(ds["time"].values, dtype=np.float64)
    q = _time_number(ds, time)
    i = int(np.clip(np.searchsorted(tnum, q, side="right") - 1, 0, max(tnum.size - 2, 0)))
    used = [i] if tnum.size == 1 else [i, i + 1]
    data = ds[var].values
    offset = 0.0 if str(ds[var].attrs.get("units", "degC")).strip() in ("K", "k", "kelvin", "Kelvin") else KELVIN_OFFSET
    what = ds.attrs.get("jaxguide_sst_source", "the SST data")
    units, cal = ds["time"].attrs["units"], ds["time"].attrs.get("calendar", "standard")
    for j in used:  # both months of the interpolation (a weight 0 times Inf would be NaN: land)
        check_sst_values(data[j].astype(np.float64) + offset,
                         f"{cftime.num2date(tnum[j], units, calendar=cal)} (used for {time})", what=what)
    if tnum.size == 1:
        field = data[0].astype(np.float64)
    else:
        w = (q - tnum[i]) / (tnum[i + 1] - tnum[i])
        field = (1 - w) * data[i].astype(np.float64) + w * data[i + 1].astype(np.float64)
    return field + offset


def check_sst_values(field_k: np.ndarray, time, what: str = "the SST data") -> None:
    """Refuse a time's SST field (any shape, K) that cannot be sea-surface temperature.

    NaN is land or missing (cBottle fills it with 290 K); +-Inf, values outside
    :data:`SST_PLAUSIBLE_DEGC`, or a field with no finite value at all raise
    :class:`SSTValueError` naming the time, the count and the range found.
    """
    field_k = np.asarray(field_k, np.float64)
    if np.isinf(field_k).any():
        raise SSTValueError(f"{what} has {int(np.isinf(field_k).sum())} infinite value(s) at {time}")
    finite = field_k[np.isfinite(field_k)]
    if finite.size == 0:
        raise SSTValueError(f"{what} has no finite value at {time} (all NaN: no ocean)")
    lo, hi = (v + KELVIN_OFFSET for v in SST_PLAUSIBLE_DEGC)
    bad = (finite < lo) | (finite > hi)
    if bad.any():
        raise SSTValueError(
            f"{what} has {int(bad.sum())} value(s) outside {SST_PLAUSIBLE_DEGC[0]:g}..{SST_PLAUSIBLE_DEGC[1]:g} deg C "
            f"at {time} (range {finite.min() - KELVIN_OFFSET:.4g}..{finite.max() - KELVIN_OFFSET:.4g} deg C): an "
            "unmasked fill value, or units other than the file's 'units' attribute says")


def regrid_latlon_to_healpix(
    field: np.ndarray, lat: np.ndarray, lon: np.ndarray, nside: int = 64, order: healpix.Order = "net"
) -> np.ndarray:
    """Bilinear regrid (..., nlat, nlon) -> (..., npix) at pixel centres, earth2grid style.

    Longitude periodic; lat ascending or descending. Pixels poleward of the outermost
    grid latitude, and stencils touching a NaN, give NaN (as earth2grid does).
    """
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
# A synthetic file


def synthetic_sst_field(lat_deg: np.ndarray, lon_deg: np.ndarray, month: int) -> np.ndarray:
    """(nlat, nlon) deg C: a zonal climatology (28 C at the equator, -1.8 C floor) whose
    warmest latitude follows the sun by +-5 degrees over the year, plus a weak wave 2."""
    shift = 5.0 * np.cos(2 * np.pi * (month - 8) / 12.0)  # warmest in northern summer
    la = np.radians(np.asarray(lat_deg, np.float64) - shift)[:, None]
    lo = np.radians(np.asarray(lon_deg, np.float64))[None, :]
    field = 28.0 - 30.0 * np.sin(la) ** 2 + 0.5 * np.cos(2 * lo) * np.cos(la) ** 2
    return np.maximum(field, -1.8)


def write_synthetic_sst(
    path: str | os.PathLike,
    start,
    end,
    *,
    resolution_deg: float = 1.0,
    calendar: str = "standard",
) -> Path:
    """Write a synthetic monthly ``tosbcs`` file covering ``start`` .. ``end`` (ISO 8601
    times or timestamps), with one mid-month value before and after so that every time
    in between can be interpolated. Written atomically; returns the path.

    The grid is regular with ``resolution_deg`` spacing (cell centres, lon 0..360);
    values are deg C (float32). The metadata names the file as synthetic.
    """


    t0, t1 = parse_time(start, "start"), parse_time(end, "end")
    if t1 < t0:
        raise ValueError(f"end {t1} is before start {t0}")
    if not 0 < resolution_deg <= 10:
        raise ValueError(f"resolution_deg must be in (0, 10], got {resolution_deg}")
    first = (t0 - pd.DateOffset(months=1)).replace(day=15, hour=0, minute=0, second=0, microsecond=0, nanosecond=0)
    if t0.day >= 15:  # t0 is after its own mid-month: that month's value brackets it from below
        first = t0.replace(day=15, hour=0, minute=0, second=0, microsecond=0, nanosecond=0)
    months = [first]
    while months[-1] < t1:
        months.append(months[-1] + pd.DateOffset(months=1))
    n = round(180.0 / resolution_deg)
    lat = -90.0 + (np.arange(n) + 0.5) * (180.0 / n)
    lon = (np.arange(2 * n) + 0.5) * (360.0 / (2 * n))
    data = np.stack([synthetic_sst_field(lat, lon, m.month) for m in months]).astype(np.float32)
    tnum = cftime.date2num([cftime.datetime(m.year, m.month, 15, calendar=calendar) for m in months],
                           SST_TIME_UNITS, calendar=calendar)
    ds = xr.Dataset(
        {SST_VARIABLE: (("time", "lat", "lon"), data, {
            "units": "degC", "standard_name": "sea_surface_temperature",
            "long_name": "synthetic sea surface temperature (zonal climatology, not observed)"})},
        coords={
            "time": ("time", np.asarray(tnum, np.float64), {"units": SST_TIME_UNITS, "calendar": calendar,
                                                           "standard_name": "time", "axis": "T"}),
            "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"}),
            "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude", "axis": "X"}),
        },
        attrs={
            "title": SYNTHETIC_TITLE,
            "source": "jaxguide.model.sst.write_synthetic_sst",
            "synthetic": 1,
            "comment": ("Synthetic: a smooth zonal climatology for trying jaxguide; use the input4MIPs "
                        "PCMDI-AMIP tosbcs file for real analyses."),
            "Conventions": "CF-1.13",
        },
    )
    encoding = {k: {"_FillValue": None} for k in ("time", "lat", "lon")}
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding))
