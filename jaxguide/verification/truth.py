"""An analysis against a truth field (e.g. the truth of an observing-system experiment):
scores at every pixel, after checking that the truth is on the analysis' grid (nside,
pixel order, pixel index or centres) and holds its analysis times.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.assimilation.dataset import channel_variables
from jaxguide.grid import healpix
from jaxguide.verification import metrics


def _declared_order(truth: xr.Dataset) -> str | None:
    """The pixel order a truth file declares (crs ``healpix_order`` / ``indexing_scheme``,
    or the cell ids' ``indexing_scheme``), normalised to "nest" / "ring"; None if none."""
    for name, keys in (("crs", ("healpix_order", "indexing_scheme")), ("cell_ids", ("indexing_scheme",))):
        if name in truth.variables:
            for key in keys:
                value = truth[name].attrs.get(key)
                if value is not None:
                    value = str(value).lower()
                    return {"nested": "nest"}.get(value, value)
    return None


def _check_truth_grid(ds: xr.Dataset, truth: xr.Dataset, label: str) -> None:
    """The truth must be on the analysis' pixels: same nside, NEST order (declared, and
    the same pixel index and centres where both files carry them)."""
    if "pixel" not in truth.dims:
        raise ValueError(f"{label} has no 'pixel' dimension (dims {tuple(truth.dims)}); it must be on the analysis' "
                         "HEALPix grid (NEST pixels)")
    n_truth, n_ana = truth.sizes["pixel"], ds.sizes["pixel"]
    if n_truth != n_ana:
        try:
            nside = f"nside {healpix.nside_of_npix(n_truth)} ({n_truth} pixels)"
        except ValueError:
            nside = f"{n_truth} pixels (not a HEALPix map)"
        raise ValueError(f"{label} has {nside}, the analysis nside {healpix.nside_of_npix(n_ana)} ({n_ana} pixels)")
    order = _declared_order(truth)
    if order is not None and order != "nest":
        raise ValueError(f"{label} is in {order.upper()} pixel order, the analysis in NEST; reorder it "
                         "(jaxguide.grid.healpix.reorder)")
    for name in ("pixel", "cell_ids"):
        if name in truth.coords and name in ds.coords and truth[name].dims == ("pixel",):
            if not np.array_equal(truth[name].values, ds[name].values):
                raise ValueError(f"{label}'s pixel order differs from the analysis' (its {name!r} coordinate is not "
                                 "the analysis' NEST pixel index)")
    for name in ("lat", "lon"):
        if name in truth.coords and name in ds.coords and truth[name].dims == ("pixel",) == ds[name].dims:
            diff = np.abs(np.asarray(truth[name].values, np.float64) - np.asarray(ds[name].values, np.float64))
            if name == "lon":
                diff = np.minimum(diff % 360.0, 360.0 - diff % 360.0)
            if not np.all(diff <= 1e-6):
                raise ValueError(f"{label}'s pixel order differs from the analysis': its pixel centres ({name}) are not "
                                 "the analysis' NEST pixel centres")


def _truth_at_times(ds: xr.Dataset, truth: xr.Dataset, label: str) -> xr.Dataset:
    """The truth at the analysis' times (every one must be there)."""
    if "time" not in truth.dims:
        raise ValueError(f"{label} has no 'time' dimension (dims {tuple(truth.dims)})")
    if "time" not in truth.coords:
        if truth.sizes["time"] != ds.sizes["time"]:
            raise ValueError(f"{label} has {truth.sizes['time']} times and no time coordinate, the analysis "
                             f"{ds.sizes['time']} times")
        return truth
    have = pd.DatetimeIndex(truth["time"].values)
    want = pd.DatetimeIndex(ds["time"].values)
    missing = want.difference(have)
    if len(missing):
        span = f"{have.min().isoformat()} .. {have.max().isoformat()}" if len(have) else "none"
        raise ValueError(f"{label} has no field at the analysis time(s) {[t.isoformat() for t in missing[:3]]}"
                         f"{' ...' if len(missing) > 3 else ''} (it has {len(have)} times: {span})")
    if have.has_duplicates:
        raise ValueError(f"{label} has duplicate times")
    return truth.sel(time=want.to_numpy())


def truth_metrics(ds: xr.Dataset, truth: str | os.PathLike | xr.Dataset, *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per shared variable: :func:`jaxguide.verification.metrics.summarize` of the whole field against
    the truth (exact, no observation noise). ``truth``: a file or Dataset with the
    analysis' variables on the same pixels (a ``member`` dim takes member 0), checked:
    the same nside, NEST order (a declared RING order, or a different ``pixel`` /
    ``cell_ids`` index or different pixel centres, is named), a field at each of the
    analysis' times (matched by time; extra truth times are ignored)."""
    label = "the truth" if isinstance(truth, xr.Dataset) else f"truth file {str(truth)!r}"
    if not isinstance(truth, xr.Dataset):
        if not Path(truth).exists():
            raise FileNotFoundError(f"no such truth file: {str(truth)!r}")
        with xr.open_dataset(truth) as t:
            truth = t.load()
    shared = [var for var in channel_variables(ds) if var in truth]
    if not shared:
        raise ValueError(f"{label} shares no variable with the analysis")
    _check_truth_grid(ds, truth, label)
    truth = _truth_at_times(ds, truth, label)
    out = {}
    for var in shared:
        tv = truth[var]
        if "member" in tv.dims:
            tv = tv.isel(member=0)
        tv = tv.transpose("time", "pixel").values
        ev = ds[var].transpose("member", "time", "pixel").values
        if tv.shape != ev.shape[1:]:
            raise ValueError(f"truth {var} has shape {tv.shape}, analysis {ev.shape[1:]}")
        out[var] = metrics.summarize(ev.reshape(ev.shape[0], -1), tv.reshape(-1), seed=seed)
    return out
