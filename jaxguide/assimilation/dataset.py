"""The analysis dataset: which variables, coordinates and CF attributes an analysis
file holds (file writing is :mod:`jaxguide.io.files`).

Layout of an analysis on the HEALPix grid (``Conventions = "CF-1.13"``, the first CF
version that defines the HEALPix grid mapping):

- dims ``(member, time, pixel)``; one float32 data variable per channel in PHYSICAL
  units (``x * scale + center``) and HEALPix NEST pixel order;
- ``member``: ``standard_name = "realization"`` (the ensemble axis);
- ``pixel``: the HEALPix cell index (``standard_name = "healpix_index"``); the same
  index again as the auxiliary coordinate ``cell_ids(pixel)`` with exactly xdggs'
  cell-id attributes ``grid_name = "healpix"``, ``level`` (log2 nside) and
  ``indexing_scheme = "nested"``, so ``xdggs.decode(ds)`` works;
- auxiliary coordinates ``lat(pixel)`` / ``lon(pixel)``: pixel centres,
  degrees_north / east (lon in [0, 360));
- grid-mapping variable ``crs``: ``grid_mapping_name = "healpix"``,
  ``refinement_level`` (log2 nside), ``indexing_scheme = "nested"`` (CF-1.13), plus the
  easygems attributes cBottle writes, ``healpix_nside`` and ``healpix_order = "nest"``;
  every data variable has ``grid_mapping = "crs"``;
- vertical scalar coordinates: pressure-level channels (``T850``) reference a scalar
  ``plev850`` (``air_pressure``, 85000 Pa); 2 m and 10 m fields (``tas``, ``uas``)
  reference ``height2m`` / ``height10m`` (``height``, m); each variable lists its own in
  its ``coordinates`` attribute (one file mixes levels);
- optional prior ensemble mean per channel, ``<channel>_prior_mean (time, pixel)``,
  with ``cell_methods = "realization: mean"``;
- no ``_FillValue`` on coordinates; data variables zlib-compressed in NetCDF
  (:func:`jaxguide.io.files.write_dataset`);
- global provenance attributes (see :data:`REQUIRED_PROVENANCE`; ``sigma_y`` is always
  a string) plus ``jaxguide_version``, ``creation_time`` (UTC, ISO 8601), ``Conventions``.

With ``regrid_latlon`` the data are instead on a regular grid, dims
``(member, time, lat, lon)``, without the HEALPix grid mapping.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from jaxguide import __version__

from jaxguide.grid import healpix
from jaxguide.model import units as _units
from jaxguide.grid.latlon import LatLonGrid, regrid_to_latlon
from jaxguide.model.channels import ChannelInfo, channel_info

logger = logging.getLogger(__name__)

CONVENTIONS = "CF-1.13"
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
# xdggs cell-id attributes of the ``cell_ids`` coordinate (plus ``level`` = log2 nside)
XDGGS_ATTRS: dict[str, Any] = {"grid_name": "healpix", "indexing_scheme": "nested"}


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


def describe_sigma_y(sigma_y) -> str:
    """The ``sigma_y`` provenance attribute, always a string: ``"1"`` (one value for all,
    physical units), ``"T850=1, T500=0.8"`` (per variable), ``"observation table"``
    (None: each row's ``sigma``) or any other string as given."""
    if sigma_y is None:
        return "observation table"
    if isinstance(sigma_y, str):
        return sigma_y
    if isinstance(sigma_y, Mapping):
        return ", ".join(f"{k}={float(v):g}" for k, v in sigma_y.items())
    return f"{float(sigma_y):g}"


def _variable_attrs(info: ChannelInfo, grid_mapping: bool) -> dict[str, Any]:
    attrs: dict[str, Any] = {"long_name": info.long_name}
    if info.units is not None:
        attrs["units"] = info.units
    else:
        logger.warning("channel %r is not in the channel table: no units written", info.name)
    if info.standard_name:
        attrs["standard_name"] = info.standard_name
    if grid_mapping:
        attrs["grid_mapping"] = "crs"
    return attrs


def _coordinates(info: ChannelInfo, horizontal: str) -> str:
    """The CF ``coordinates`` attribute: the channel's vertical scalar coordinate, if any,
    and the auxiliary horizontal coordinates."""
    vert = info.vertical
    return " ".join(([vert[0]] if vert else []) + ([horizontal] if horizontal else []))


def _physical(x: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(..., C, T, npix) normalised -> physical, float32."""
    return _units.unnormalise(x, center, scale).astype(np.float32)


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
    attrs["sigma_y"] = describe_sigma_y(provenance["sigma_y"])
    attrs["jaxguide_version"] = __version__
    attrs["creation_time"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    attrs["n_members"] = m
    if prior is not None:
        attrs["n_prior_members"] = int(np.asarray(prior).shape[0])

    coords: dict[str, Any] = {
        "member": ("member", np.arange(m, dtype=np.int32), {"standard_name": "realization", "long_name": "ensemble member"}),
        "time": ("time", times, {"standard_name": "time", "axis": "T"}),
    }
    infos = [channel_info(ch) for ch in channels]
    for info in infos:
        if info.vertical is not None:
            name, value, vattrs = info.vertical
            coords[name] = ((), np.float64(value), vattrs)

    healpix_grid = regrid_latlon is None
    if healpix_grid:
        dims, horizontal = ("pixel",), "lat lon cell_ids"
        lon, lat = healpix.lonlat(nside, "nest")
        level = int(np.log2(nside))
        coords["pixel"] = ("pixel", np.arange(npix, dtype=np.int64), {
            "standard_name": "healpix_index", "long_name": "HEALPix cell index (nested)", "units": "1"})
        # xdggs' cell ids (its default name): exactly its grid attributes, since xdggs passes
        # every attribute of this variable to its grid constructor; xdggs.decode(ds) works
        coords["cell_ids"] = ("pixel", np.arange(npix, dtype=np.int64), dict(XDGGS_ATTRS, level=level))
        coords["lat"] = ("pixel", np.array(lat), {"units": "degrees_north", "standard_name": "latitude"})
        coords["lon"] = ("pixel", np.array(lon), {"units": "degrees_east", "standard_name": "longitude"})

        def horizontal_field(a):
            return a
    else:
        dims, horizontal = ("lat", "lon"), ""
        lat, lon = regrid_latlon.coords()
        coords["lat"] = ("lat", lat, {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"})
        coords["lon"] = ("lon", lon, {"units": "degrees_east", "standard_name": "longitude", "axis": "X"})
        attrs["regridding"] = (f"HEALPix nside {nside} NEST -> {regrid_latlon.nlat}x{regrid_latlon.nlon} lat/lon, "
                               f"{regrid_latlon.method}")

        def horizontal_field(a):
            return regrid_to_latlon(a, regrid_latlon)

    data_vars: dict[str, Any] = {}
    if healpix_grid:
        data_vars["crs"] = xr.DataArray(np.int32(0), attrs={
            "grid_mapping_name": "healpix",
            "refinement_level": level,
            "indexing_scheme": "nested",
            "healpix_nside": int(nside),
            "healpix_order": "nest",
        })
    for i, info in enumerate(infos):
        data_vars[info.name] = (("member", "time", *dims), horizontal_field(phys[:, i]), _variable_attrs(info, healpix_grid))
    if prior_mean is not None:
        for i, info in enumerate(infos):
            a = _variable_attrs(info, healpix_grid)
            a["long_name"] = "prior ensemble mean of " + a["long_name"]
            a["cell_methods"] = "realization: mean"
            data_vars[info.name + PRIOR_SUFFIX] = (("time", *dims), horizontal_field(prior_mean[i]), a)
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    # each variable names its own coordinates (xarray would attach every scalar coordinate
    # to every variable); the grid-mapping container gets none
    for i, info in enumerate(infos):
        for name in (info.name, info.name + PRIOR_SUFFIX):
            if name in ds:
                ds[name].encoding["coordinates"] = _coordinates(info, horizontal)
    if "crs" in ds:
        ds["crs"].encoding["coordinates"] = None
    return ds


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
    conv = re.fullmatch(r"CF-(\d+)\.(\d+)", str(ds.attrs.get("Conventions", "")).strip())
    if conv and (int(conv.group(1)), int(conv.group(2))) < (1, 13):
        problems.append(f"Conventions {ds.attrs['Conventions']!r}: the HEALPix grid mapping needs CF-1.13 or later")
    if "crs" not in ds.variables:
        return problems + ["no grid mapping variable 'crs'"]
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

