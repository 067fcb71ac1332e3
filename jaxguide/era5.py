"""ERA5 pressure-level temperature: reading CDS NetCDF, point observations, HEALPix regrid.

The Copernicus data store delivers two layouts, both handled by
:func:`read_era5_temperature`:

* current: dims ``valid_time, pressure_level, latitude, longitude`` (float32,
  latitude descending), sometimes several NetCDF files zipped together (one per
  stream; only files holding ``t`` are used);
* legacy: dims ``time, level, latitude, longitude``, int16 packed with
  ``scale_factor``/``add_offset`` and ``_FillValue`` (decoded by xarray's CF masking).

The result is one layout: Dataset with ``t`` (K, float64) on dims
``(time, level, lat, lon)``, ``level`` in hPa (int), ``lat`` ASCENDING, ``lon`` in
[0, 360) ascending, ``time`` datetime64[ns] (UTC).
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import xarray as xr

from jaxguide import healpix
from jaxguide.observations import make_table

logger = logging.getLogger(__name__)

_RENAME = {
    "valid_time": "time",
    "pressure_level": "level",
    "isobaricInhPa": "level",
    "latitude": "lat",
    "longitude": "lon",
}


class ERA5FormatError(ValueError):
    """A file that is not ERA5 pressure-level temperature in a known layout."""


def _normalise_one(ds: xr.Dataset, name: str) -> xr.Dataset:
    ds = ds.rename({k: v for k, v in _RENAME.items() if k in ds.variables or k in ds.dims})
    t = ds["t"]
    if "level" not in t.dims:  # a single-level request may drop the level dim
        if "level" in ds.coords:
            t = t.expand_dims("level")
        else:
            raise ERA5FormatError(f"{name}: 't' has no pressure level dimension (dims {t.dims})")
    if "time" not in t.dims:
        if "time" in ds.coords:
            t = t.expand_dims("time")
        else:
            raise ERA5FormatError(f"{name}: 't' has no time dimension (dims {t.dims})")
    missing = {"time", "level", "lat", "lon"} - set(t.dims)
    if missing:
        raise ERA5FormatError(f"{name}: 't' lacks dimensions {sorted(missing)} (dims {t.dims})")
    extra = [d for d in t.dims if d not in ("time", "level", "lat", "lon")]
    for d in extra:  # e.g. a length-1 ensemble 'number' dimension
        if t.sizes[d] != 1:
            raise ERA5FormatError(f"{name}: unexpected dimension {d!r} of size {t.sizes[d]}")
        t = t.isel({d: 0})
    t = t.transpose("time", "level", "lat", "lon").astype(np.float64)
    keep = {"time", "level", "lat", "lon"}
    t = t.drop_vars([c for c in t.coords if c not in keep])
    t.attrs = {"units": "K", "long_name": "temperature"}
    level = np.asarray(t["level"].values, dtype=np.float64)
    if str(t["level"].attrs.get("units", "hPa")).strip() == "Pa":
        level = level / 100.0
    out = t.to_dataset(name="t")
    out = out.assign_coords(
        time=pd.to_datetime(out["time"].values).astype("datetime64[ns]"),
        level=level.round().astype(np.int64),
        lat=np.asarray(out["lat"].values, np.float64),
        lon=np.asarray(out["lon"].values, np.float64) % 360.0,
    )
    return out.sortby(["lat", "lon", "level", "time"])


def _expand(paths) -> tuple[list[Path], tempfile.TemporaryDirectory | None]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files, tmp = [], None
    for p in map(Path, paths):
        if zipfile.is_zipfile(p):
            tmp = tmp or tempfile.TemporaryDirectory(prefix="jaxguide-era5-")
            with zipfile.ZipFile(p) as z:
                for m in z.namelist():
                    if m.endswith((".nc", ".nc4")) and not m.startswith("__MACOSX"):
                        target = Path(tmp.name) / f"{len(files)}_{Path(m).name}"
                        target.write_bytes(z.read(m))
                        files.append(target)
        else:
            files.append(p)
    return files, tmp


def read_era5_temperature(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> xr.Dataset:
    """Read ERA5 pressure-level temperature (one file, several files or CDS zips).

    Files without ``t`` (other streams of a CDS download) are skipped; pieces are
    combined along time/level (overlapping values must agree). Returns the
    normalised layout described in the module docstring, loaded into memory.
    """
    files, tmp = _expand(paths)
    try:
        parts = []
        for f in files:
            with xr.open_dataset(f, mask_and_scale=True, decode_times=True) as raw:
                if "t" not in raw.data_vars:
                    logger.info("%s: no temperature 't' (variables %s), skipped", f, list(raw.data_vars))
                    continue
                parts.append(_normalise_one(raw.load(), str(f)))
    finally:
        if tmp is not None:
            tmp.cleanup()
    if not parts:
        raise ERA5FormatError(f"no ERA5 temperature variable 't' in {[str(f) for f in files]}")
    ds = parts[0] if len(parts) == 1 else xr.combine_by_coords(parts, compat="no_conflicts", join="outer")
    return ds.sortby(["time", "level"])


# --------------------------------------------------------------------------------------
# Bilinear interpolation on a regular lat/lon grid


def bilinear_latlon(
    field: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    qlat: np.ndarray,
    qlon: np.ndarray,
    outside: Literal["nan", "clamp"] = "clamp",
) -> np.ndarray:
    """Bilinear interpolation of a global lat/lon field at points, periodic in lon.

    Args:
      field: (..., nlat, nlon); lat (nlat,) ascending or descending; lon (nlon,)
        covering the globe (any start; sorted internally).
      qlat, qlon: (m,) degrees.
      outside: latitudes poleward of the outermost grid row: ``"clamp"`` uses the
        outermost row, ``"nan"`` gives NaN (earth2grid). A NaN anywhere in a point's
        4-point stencil gives NaN (even at zero weight, as earth2grid's weighted sum).
    Returns:
      (..., m) float64.
    """
    field = np.asarray(field, dtype=np.float64)
    lat = np.asarray(lat, np.float64)
    lon = np.asarray(lon, np.float64) % 360.0
    qlat = np.asarray(qlat, np.float64).ravel()
    qlon = np.asarray(qlon, np.float64).ravel()
    if lat[0] > lat[-1]:
        lat, field = lat[::-1], field[..., ::-1, :]
    order = np.argsort(lon, kind="stable")
    lon, field = lon[order], field[..., order]
    nlat, nlon = lat.size, lon.size
    if nlat < 2 or nlon < 2:
        raise ValueError(f"need at least a 2 x 2 grid, got {nlat} x {nlon}")
    step = np.diff(np.append(lon, lon[0] + 360.0))
    if not np.allclose(step, step[0], rtol=0, atol=1e-3 * abs(step[0])) or step[0] <= 0:
        raise ValueError("longitudes must be a global, evenly spaced grid (regional grids are not supported)")
    lon_ext = np.concatenate([lon, [lon[0] + 360.0]])
    field = np.concatenate([field, field[..., :1]], axis=-1)

    ql = (qlon - lon[0]) % 360.0 + lon[0]
    i0 = np.clip(np.searchsorted(lon_ext, ql, side="right") - 1, 0, nlon - 1)
    wx = (ql - lon_ext[i0]) / (lon_ext[i0 + 1] - lon_ext[i0])

    if outside == "clamp":
        qy = np.clip(qlat, lat[0], lat[-1])
        valid = np.ones(qy.shape, bool)
    elif outside == "nan":
        qy = qlat
        jl = np.searchsorted(lat, qy, side="right") - 1
        valid = (jl >= 0) & (jl <= nlat - 2)
    else:
        raise ValueError(f"outside must be 'nan' or 'clamp', got {outside!r}")
    j0 = np.clip(np.searchsorted(lat, qy, side="right") - 1, 0, nlat - 2)
    wy = np.clip((qy - lat[j0]) / (lat[j0 + 1] - lat[j0]), 0.0, 1.0)

    f00 = field[..., j0, i0]
    f01 = field[..., j0, i0 + 1]
    f10 = field[..., j0 + 1, i0]
    f11 = field[..., j0 + 1, i0 + 1]
    out = (1 - wy) * ((1 - wx) * f00 + wx * f01) + wy * ((1 - wx) * f10 + wx * f11)
    nan_in_stencil = np.isnan(f00) | np.isnan(f01) | np.isnan(f10) | np.isnan(f11)
    return np.where(valid & ~nan_in_stencil, out, np.nan)


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
    "uniform", see :func:`jaxguide.strategies.sample_locations`) with ``count`` and an
    explicit NumPy ``rng``. Every location is observed at every time in ``times``
    (default: all of ``ds.time``) and every level. Values are bilinear in lat/lon;
    ``sigma`` (K, scalar or per variable) fills the sigma column, and with
    ``noise=True`` Gaussian noise of that std is added (needs ``rng``).
    """
    if (points is None) == (strategy is None):
        raise ValueError("give exactly one of points= or strategy=")
    if points is None:
        from jaxguide.strategies import sample_locations

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
        sel = sel.sel(time=pd.to_datetime(list(times)))
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
