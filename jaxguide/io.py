"""Analysis files: ensemble -> CF/easygems-annotated xarray Dataset, atomic writes, reads.

Layout of a written analysis (HEALPix):

- dims ``(member, time, pixel)``; one float32 data variable per channel in PHYSICAL
  units (``x * scale + center``) and HEALPix NEST pixel order;
- coordinates ``lat(pixel)`` / ``lon(pixel)``: pixel centres, degrees_north / east
  (lon in [0, 360));
- grid-mapping variable ``crs`` with ``grid_mapping_name = "healpix"``,
  ``refinement_level`` (log2 nside), ``indexing_scheme = "nested"`` (CF HEALPix
  proposal) and the easygems attributes cBottle writes, ``healpix_nside`` and
  ``healpix_order = "nest"``; every data variable has ``grid_mapping = "crs"``;
- 3-D channels (``T850`` ...) carry ``level`` / ``level_units = "hPa"`` attributes
  (one file mixes levels, so a shared scalar coordinate would be wrong);
- optional prior ensemble mean per channel, ``<channel>_prior_mean (time, pixel)``;
- global provenance attributes (see :data:`REQUIRED_PROVENANCE`) plus
  ``jaxguide_version``, ``creation_time`` (UTC, ISO 8601) and ``Conventions``.

With ``regrid_latlon`` the data are instead on a regular grid, dims
``(member, time, lat, lon)``, without the HEALPix grid mapping, sampled with the
observation operator's scheme (:mod:`jaxguide.grid_sampling`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr

from jaxguide import __version__, healpix
from jaxguide.grid_sampling import LatLonGrid, regrid_to_latlon

logger = logging.getLogger(__name__)

CONVENTIONS = "CF-1.11"
REQUIRED_PROVENANCE: tuple[str, ...] = (
    "method",
    "sigma_y",
    "guidance_scale",
    "steps",
    "seed",
    "model_sha256",
    "n_obs",
    "command",
)
PRIOR_SUFFIX = "_prior_mean"


@dataclass(frozen=True)
class ChannelInfo:
    """Metadata of one cBottle channel (``level`` in hPa for 3-D fields)."""

    name: str
    units: str | None
    long_name: str
    standard_name: str | None = None
    level: float | None = None


# variable -> (units, CF standard_name or None, long name)
_SURFACE: dict[str, tuple[str, str | None, str]] = {
    "tas": ("K", "air_temperature", "near-surface (2 m) air temperature"),
    "uas": ("m s-1", "eastward_wind", "eastward near-surface (10 m) wind"),
    "vas": ("m s-1", "northward_wind", "northward near-surface (10 m) wind"),
    "pres_msl": ("Pa", "air_pressure_at_mean_sea_level", "mean sea level pressure"),
    "rlut": ("W m-2", "toa_outgoing_longwave_flux", "top-of-atmosphere outgoing longwave radiation"),
    "rsut": ("W m-2", "toa_outgoing_shortwave_flux", "top-of-atmosphere outgoing shortwave radiation"),
    "rsds": ("W m-2", "surface_downwelling_shortwave_flux_in_air", "surface downwelling shortwave radiation"),
    "pr": ("kg m-2 s-1", "precipitation_flux", "precipitation"),
    "sst": ("K", "sea_surface_temperature", "sea surface temperature"),
    "sic": ("1", "sea_ice_area_fraction", "sea ice concentration"),
    "cllvi": ("kg m-2", "atmosphere_mass_content_of_cloud_liquid_water", "liquid water path"),
    "clivi": ("kg m-2", "atmosphere_mass_content_of_cloud_ice", "ice water path"),
    "tcwv": ("kg m-2", "atmosphere_mass_content_of_water_vapor", "total column water vapour"),
    "skt": ("K", "surface_temperature", "skin temperature"),
    "sp": ("Pa", "surface_air_pressure", "surface pressure"),
    "2d": ("K", "dew_point_temperature", "2 m dew point temperature"),
}
_LEVELS: dict[str, tuple[str, str | None, str]] = {
    "T": ("K", "air_temperature", "air temperature"),
    "U": ("m s-1", "eastward_wind", "eastward wind"),
    "V": ("m s-1", "northward_wind", "northward wind"),
    "Z": ("m2 s-2", "geopotential", "geopotential"),
    "Q": ("kg kg-1", "specific_humidity", "specific humidity"),
}


def channel_info(name: str) -> ChannelInfo:
    """Units / standard_name of a cBottle channel name (``"T850"``, ``"tas"``, ...).

    Unknown names get ``units=None`` (reported by :func:`check_cf`)."""
    if name in _SURFACE:
        units, std, long = _SURFACE[name]
        return ChannelInfo(name, units, long, std)
    m = re.fullmatch(r"([TUVZQ])(\d+)", name)
    if m and m.group(1) in _LEVELS:
        units, std, long = _LEVELS[m.group(1)]
        lev = float(m.group(2))
        return ChannelInfo(name, units, f"{long} at {m.group(2)} hPa", std, lev)
    return ChannelInfo(name, None, name)


# --------------------------------------------------------------------------------------
# Dataset construction


def _attr_value(v: Any):
    if v is None:
        return "none"
    if isinstance(v, bool | np.bool_):
        return int(v)
    if isinstance(v, str | int | float | np.integer | np.floating):
        return v
    if isinstance(v, Sequence | np.ndarray) and all(isinstance(e, int | float | np.integer | np.floating) for e in v):
        return np.asarray(v)
    return str(v)


def _variable_attrs(info: ChannelInfo, grid_mapping: bool) -> dict[str, Any]:
    attrs: dict[str, Any] = {"long_name": info.long_name}
    if info.units is not None:
        attrs["units"] = info.units
    else:
        logger.warning("channel %r is not in the channel table: no units written", info.name)
    if info.standard_name:
        attrs["standard_name"] = info.standard_name
    if info.level is not None:
        attrs["level"] = info.level
        attrs["level_units"] = "hPa"
    if grid_mapping:
        attrs["grid_mapping"] = "crs"
    return attrs


def _physical(x: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(..., C, T, npix) normalised -> physical, float32."""
    return (x.astype(np.float64) * scale[:, None, None] + center[:, None, None]).astype(np.float32)


def analysis_to_dataset(
    ensemble,
    *,
    channels: Sequence[str],
    center: Sequence[float],
    scale: Sequence[float],
    times: Sequence[Any],
    provenance: Mapping[str, Any],
    prior=None,
    regrid_latlon: LatLonGrid | None = None,
) -> xr.Dataset:
    """Analysis ensemble -> Dataset (see the module docstring for the layout).

    Args:
      ensemble: (M, C, T, npix) normalised, network ("net") pixel order.
      channels, center, scale: per channel (C,), from the checkpoint's batch_info.
      times: (T,) datetimes (anything ``numpy.datetime64`` accepts).
      provenance: must contain :data:`REQUIRED_PROVENANCE`; more keys are kept.
      prior: optional prior ensemble (Mp, C, T, npix) normalised net order; its mean
        is stored as ``<channel>_prior_mean``.
      regrid_latlon: put the data on this regular grid instead of HEALPix.
    """
    x = np.asarray(ensemble)
    if x.ndim != 4:
        raise ValueError(f"ensemble must be (M, C, T, npix), got shape {x.shape}")
    m, c, t, npix = x.shape
    nside = healpix.nside_of_npix(npix)
    center = np.asarray(center, np.float64)
    scale = np.asarray(scale, np.float64)
    if len(channels) != c or center.shape != (c,) or scale.shape != (c,):
        raise ValueError(f"channels/center/scale must have length C={c}, got {len(channels)}, {center.shape}, {scale.shape}")
    times = np.asarray([np.datetime64(v, "ns") for v in times])
    if times.shape != (t,):
        raise ValueError(f"times must have length T={t}, got {times.shape}")
    missing = [k for k in REQUIRED_PROVENANCE if k not in provenance]
    if missing:
        raise ValueError(f"provenance is missing {missing}")

    phys = healpix.reorder(_physical(x, center, scale), "net", "nest", axis=-1)
    prior_mean = None
    if prior is not None:
        p = np.asarray(prior)
        if p.ndim != 4 or p.shape[1:] != x.shape[1:]:
            raise ValueError(f"prior must be (Mp, {c}, {t}, {npix}), got shape {p.shape}")
        prior_mean = healpix.reorder(_physical(p, center, scale).mean(axis=0), "net", "nest", axis=-1)

    attrs: dict[str, Any] = {
        "Conventions": CONVENTIONS,
        "title": "jaxguide score-based data assimilation analysis (cBottle prior)",
        "source": f"jaxguide {__version__}",
        "history": f"{_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} {provenance['command']}",
    }
    attrs.update({k: _attr_value(v) for k, v in provenance.items()})
    attrs["jaxguide_version"] = __version__
    attrs["creation_time"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    attrs["n_members"] = m
    if prior is not None:
        attrs["n_prior_members"] = int(np.asarray(prior).shape[0])

    coords: dict[str, Any] = {
        "member": ("member", np.arange(m, dtype=np.int32), {"long_name": "ensemble member"}),
        "time": ("time", times, {"standard_name": "time", "axis": "T"}),
    }
    infos = [channel_info(ch) for ch in channels]

    if regrid_latlon is not None:
        lat, lon = regrid_latlon.coords()
        coords["lat"] = ("lat", lat, {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"})
        coords["lon"] = ("lon", lon, {"units": "degrees_east", "standard_name": "longitude", "axis": "X"})
        data_vars = {
            info.name: (("member", "time", "lat", "lon"), regrid_to_latlon(phys[:, i], regrid_latlon), _variable_attrs(info, False))
            for i, info in enumerate(infos)
        }
        if prior_mean is not None:
            for i, info in enumerate(infos):
                a = _variable_attrs(info, False)
                a["long_name"] = "prior ensemble mean of " + a["long_name"]
                data_vars[info.name + PRIOR_SUFFIX] = (("time", "lat", "lon"), regrid_to_latlon(prior_mean[i], regrid_latlon), a)
        attrs["regridding"] = f"HEALPix nside {nside} NEST -> {regrid_latlon.nlat}x{regrid_latlon.nlon} lat/lon, {regrid_latlon.method}"
        return xr.Dataset(data_vars, coords=coords, attrs=attrs)

    lon, lat = healpix.lonlat(nside, "nest")
    coords["pixel"] = ("pixel", np.arange(npix, dtype=np.int64), {"long_name": "HEALPix pixel index (nested)"})
    coords["lat"] = ("pixel", np.array(lat), {"units": "degrees_north", "standard_name": "latitude"})
    coords["lon"] = ("pixel", np.array(lon), {"units": "degrees_east", "standard_name": "longitude"})
    crs = xr.DataArray(
        np.int32(0),
        attrs={
            "grid_mapping_name": "healpix",
            "refinement_level": int(np.log2(nside)),
            "indexing_scheme": "nested",
            "healpix_nside": int(nside),
            "healpix_order": "nest",
        },
    )
    data_vars = {"crs": crs}
    for i, info in enumerate(infos):
        data_vars[info.name] = (("member", "time", "pixel"), phys[:, i], _variable_attrs(info, True))
    if prior_mean is not None:
        for i, info in enumerate(infos):
            a = _variable_attrs(info, True)
            a["long_name"] = "prior ensemble mean of " + a["long_name"]
            data_vars[info.name + PRIOR_SUFFIX] = (("time", "pixel"), prior_mean[i], a)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def channel_variables(ds: xr.Dataset) -> list[str]:
    """Names of the analysis channels (data variables with a member dimension)."""
    return [name for name, v in ds.data_vars.items() if "member" in v.dims]


# --------------------------------------------------------------------------------------
# CF check


def check_cf(ds: xr.Dataset) -> list[str]:
    """Problems with the CF / HEALPix / provenance metadata of an analysis (empty = ok)."""
    problems: list[str] = []
    conv = str(ds.attrs.get("Conventions", ""))
    if not conv.startswith("CF-"):
        problems.append(f"global attribute Conventions is {conv!r}, expected 'CF-x.y'")
    for key in REQUIRED_PROVENANCE + ("jaxguide_version", "creation_time"):
        if key not in ds.attrs:
            problems.append(f"missing provenance attribute {key!r}")
    for name, std, units in (("lat", "latitude", "degrees_north"), ("lon", "longitude", "degrees_east")):
        if name not in ds.coords:
            problems.append(f"missing coordinate {name!r}")
            continue
        a = ds[name].attrs
        if a.get("units") != units:
            problems.append(f"{name}: units {a.get('units')!r}, expected {units!r}")
        if a.get("standard_name") != std:
            problems.append(f"{name}: standard_name {a.get('standard_name')!r}, expected {std!r}")
    if "lat" in ds.coords and np.any(np.abs(ds["lat"].values) > 90):
        problems.append("lat: values outside [-90, 90]")
    if "time" in ds.coords and not np.issubdtype(ds["time"].dtype, np.datetime64) and "since" not in str(ds["time"].attrs.get("units", "")):
        problems.append("time: not a datetime and no 'units = <unit> since <date>'")
    channels = channel_variables(ds)
    if not channels:
        problems.append("no data variable with a member dimension")
    for name, var in ds.data_vars.items():
        if name == "crs":
            continue
        a = var.attrs
        if not a.get("units"):
            problems.append(f"{name}: no units")
        if not (a.get("long_name") or a.get("standard_name")):
            problems.append(f"{name}: neither long_name nor standard_name")
        base = name[: -len(PRIOR_SUFFIX)] if name.endswith(PRIOR_SUFFIX) else name
        info = channel_info(base)
        if info.units is not None and a.get("units") not in (None, info.units):
            problems.append(f"{name}: units {a.get('units')!r}, expected {info.units!r}")
        if info.standard_name and a.get("standard_name") not in (None, info.standard_name):
            problems.append(f"{name}: standard_name {a.get('standard_name')!r}, expected {info.standard_name!r}")
        if "pixel" in var.dims:
            gm = a.get("grid_mapping")
            if gm is None:
                problems.append(f"{name}: on HEALPix pixels but no grid_mapping attribute")
            elif gm not in ds.variables:
                problems.append(f"{name}: grid_mapping {gm!r} is not a variable")
    if "pixel" in ds.dims:
        problems += _check_healpix(ds)
    return problems


def _check_healpix(ds: xr.Dataset) -> list[str]:
    problems: list[str] = []
    if "crs" not in ds.variables:
        return ["no grid mapping variable 'crs'"]
    a = ds["crs"].attrs
    npix = ds.sizes["pixel"]
    try:
        nside = healpix.nside_of_npix(npix)
    except ValueError as e:
        return [str(e)]
    expected = {
        "grid_mapping_name": "healpix",
        "refinement_level": int(np.log2(nside)),
        "indexing_scheme": "nested",
        "healpix_nside": nside,
        "healpix_order": "nest",
    }
    for k, v in expected.items():
        got = a.get(k)
        if isinstance(got, np.generic):
            got = got.item()
        if got != v:
            problems.append(f"crs: {k} = {got!r}, expected {v!r}")
    if "lat" in ds.coords and "lon" in ds.coords and ds["lat"].dims == ("pixel",):
        lon, lat = healpix.lonlat(nside, "nest")
        if not (np.allclose(ds["lat"].values, lat, atol=1e-6) and np.allclose(ds["lon"].values, lon, atol=1e-6)):
            problems.append("lat/lon are not the NEST pixel centres")
    return problems


# --------------------------------------------------------------------------------------
# atomic write / read

Format = Literal["netcdf", "zarr"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# Hidden temporaries beside a target are named ``.{target}.{host}-{pid}.{random}.tmp``
# (and ``.{target}.{host}-{pid}.old`` for a zarr store moved aside), so that the next
# write of the same target can tell a crashed writer's leftovers (same host, process
# gone) from a writer that is still running (kept). Leftovers of jaxguide versions
# before this naming (``.{target}.{random}.tmp``) are removed once an hour old.
_LEGACY_STALE_SECONDS = 3600.0


def _writer_tag() -> str:
    import socket

    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: never guess
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but not ours, or cannot tell: keep its files
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporaries of ``path`` left by writers that died (killed,
    crashed) on this host; returns what was removed. Temporaries of live processes and
    of other hosts (a shared filesystem) are kept."""
    import time

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    name = re.escape(path.name)
    tagged = re.compile(rf"^\.{name}\.([A-Za-z0-9_]+)-(\d+)\.(?:[a-z0-9_]{{8}}\.tmp|old)$")
    legacy = re.compile(rf"^\.{name}\.(?:[a-z0-9_]{{8}}\.tmp|old-\d+)$")
    host = _writer_tag().rsplit("-", 1)[0]
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = tagged.match(entry.name)
        if m:
            stale = m.group(1) == host and not _pid_alive(int(m.group(2)))
        elif legacy.match(entry.name):
            try:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > _LEGACY_STALE_SECONDS
            except OSError:
                stale = False
        else:
            continue
        if stale:
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    if removed:
        logger.warning("removed %d temporary file(s) of %s left by an interrupted earlier run: %s",
                       len(removed), path, [p.name for p in removed])
    return removed


def temp_beside(path: str | os.PathLike, *, directory: bool) -> Path:
    """A new hidden temporary (file or directory) beside ``path``, after removing the
    stale ones of crashed earlier writers of the same target. The caller renames it
    onto ``path`` or removes it."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    remove_stale_temporaries(path)
    prefix = f".{path.name}.{_writer_tag()}."
    try:
        if directory:
            return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
    except OSError as e:
        raise PermissionError(f"cannot create files in output directory {str(parent)!r}: {e.strerror}") from None
    os.close(fd)
    return Path(tmp)


def _require_zarr() -> None:
    try:
        import zarr  # noqa: F401
    except ImportError:
        raise ValueError("the zarr format needs the 'zarr' package (tested with zarr==3.1.6)") from None


def write_dataset(ds: xr.Dataset, path: str | os.PathLike, *, format: Format = "netcdf", overwrite: bool = False) -> Path:
    """Write ``ds`` atomically: to a hidden temporary in the same directory, then
    ``os.replace``. The destination either does not exist or is complete.

    Raises FileExistsError (exists and not ``overwrite``), FileNotFoundError (no such
    directory), PermissionError (directory not writable), ValueError (bad format).
    Overwriting a zarr directory moves the old one aside first (a crash in that short
    window leaves no destination rather than a partial one). Temporaries left by a
    killed earlier write of the same ``path`` are removed (:func:`remove_stale_temporaries`).
    """
    if format not in ("netcdf", "zarr"):
        raise ValueError(f"unknown format {format!r}; expected 'netcdf' or 'zarr'")
    if format == "zarr":
        _require_zarr()
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {str(parent)!r} is not writable")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists (pass overwrite=True to replace it)")
    tmp = temp_beside(path, directory=True)
    target = tmp / path.name
    try:
        if format == "netcdf":
            ds.to_netcdf(target, engine="netcdf4", format="NETCDF4")
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            ds.to_zarr(target, mode="w", consolidated=False)
        if format == "zarr" and path.exists():
            old = parent / f".{path.name}.{_writer_tag()}.old"
            os.replace(path, old)
            os.replace(target, path)
            _remove(old)
        else:
            os.replace(target, path)
        logger.info("wrote %s (%s)", path, format)
    finally:
        _remove(tmp)
    return path


def read_analysis(path: str | os.PathLike) -> xr.Dataset:
    """Read an analysis written by :func:`write_dataset` into memory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such analysis file: {str(path)!r}")
    if path.is_dir():
        _require_zarr()
        ds = xr.open_zarr(path, consolidated=False)
    else:
        ds = xr.open_dataset(path, engine="netcdf4")
    with ds:
        loaded = ds.load()
    if not channel_variables(loaded):
        raise ValueError(f"{str(path)!r} has no data variable with a member dimension; not an analysis")
    return loaded


def check_writable_dir(directory: str | os.PathLike) -> Path:
    """``directory`` if a file can be created in it; else FileNotFoundError /
    PermissionError naming it (checked before long work, so it fails early)."""
    directory = Path(directory) if str(directory) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"output directory {str(directory)!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".jaxguide-probe.", dir=directory)
    except OSError as e:
        raise PermissionError(f"cannot create files in output directory {str(directory)!r}: {e.strerror}") from None
    os.close(fd)
    os.unlink(probe)
    return directory


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a hidden temporary file beside ``path``, then rename it to
    ``path``: the destination is either absent, the old file, or complete. Temporaries
    that killed earlier writes of ``path`` left behind are removed first
    (:func:`remove_stale_temporaries`).

    Raises FileNotFoundError (no such directory), PermissionError (not writable).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {str(parent)!r} does not exist")
    tmp = temp_beside(path, directory=False)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (see :func:`atomic_write`); non-JSON
    numbers (NumPy scalars) are written as floats."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=float)
            fh.write("\n")

    return atomic_write(path, write)
