"""The SST file the SST-conditioned cBottle models need, and a synthetic one to try them.

cBottle conditions on the monthly AMIP sea-surface temperature of input4MIPs
(PCMDI-AMIP, e.g. ``tosbcs_input4MIPs_SSTsAndSeaIce_CMIP_PCMDI-AMIP-1-1-9_gn_187001-202212.nc``).
What :func:`jaxguide.model.conditioning.read_amip_sst` reads:

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

import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.io.files import atomic_write
from jaxguide.io.times import parse_time

SST_VARIABLE = "tosbcs"
SST_TIME_UNITS = "days since 1870-01-01"
SYNTHETIC_TITLE = "SYNTHETIC sea-surface temperature in the AMIP tosbcs layout (not observed data)"


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
    import cftime

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
