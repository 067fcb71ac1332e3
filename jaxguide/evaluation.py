"""Verification of an analysis file: scores at observations and against a truth field.

What ``jaxguide evaluate`` runs (the CLI only parses and prints). The ensemble is read
at each observation with the SAME operator ``assimilate`` used, recorded in the
file's global attribute :data:`OPERATOR_ATTR` (``"bilinear"`` or ``"nearest"``, see
:mod:`jaxguide.grid_sampling`); files written before that attribute existed are read
bilinearly (the default operator) and a note is logged.

Observations are noisy, so the scores at observations use the predictive ensemble
(members + N(0, sigma^2) with the table's sigma, seeded); scores against a truth field
use the members as they are (see :func:`jaxguide.metrics.summarize`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from jaxguide import grid_sampling, healpix, metrics
from jaxguide.io import read_analysis
from jaxguide.schema import PRIOR_SUFFIX, channel_variables
from jaxguide.observations import read_observations

logger = logging.getLogger(__name__)

OPERATOR_ATTR = "observation_operator"
DEFAULT_OPERATOR = "bilinear"


@dataclasses.dataclass(frozen=True)
class AtObservations:
    """One variable's ensemble read at its observations (physical units).

    ensemble: (M, n); value, sigma, lon, lat: (n,) the observations, in table order.
    """

    ensemble: np.ndarray
    value: np.ndarray
    sigma: np.ndarray
    lon: np.ndarray
    lat: np.ndarray


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Result of :func:`evaluate`.

    metrics: set ("assimilated", "held_out", "truth") -> variable -> the dict of
      :func:`jaxguide.metrics.summarize`.
    operator: the sampling scheme used at the observations.
    skipped: set -> {"variables": [...], "n_obs": count} of observations whose variable
      the analysis lacks (left out).
    samples: set -> variable -> :class:`AtObservations` (for plots or further scores).
    """

    metrics: dict[str, dict[str, dict[str, Any]]]
    operator: str
    skipped: dict[str, dict[str, Any]]
    samples: dict[str, dict[str, AtObservations]]

    def to_json(self, analysis: str | os.PathLike | None = None) -> dict[str, Any]:
        """JSON-friendly dict: analysis path, operator, skipped observations, metrics."""
        return {
            "analysis": None if analysis is None else str(analysis),
            "observation_operator": self.operator,
            "skipped": self.skipped,
            "metrics": self.metrics,
        }


def observation_operator(ds: xr.Dataset) -> str:
    """The sampling scheme ``assimilate`` used for ``ds`` (its :data:`OPERATOR_ATTR`).

    Files without the attribute (older versions) get :data:`DEFAULT_OPERATOR`, with a
    logged note; an unknown value raises ValueError.
    """
    method = ds.attrs.get(OPERATOR_ATTR)
    if method is None:
        logger.warning(
            "the analysis has no %r attribute (written by an older jaxguide): reading it with the default %r operator",
            OPERATOR_ATTR,
            DEFAULT_OPERATOR,
        )
        return DEFAULT_OPERATOR
    method = str(method)
    if method not in grid_sampling.METHODS:
        raise ValueError(f"the analysis' {OPERATOR_ATTR} is {method!r}; expected one of {', '.join(grid_sampling.METHODS)}")
    return method


def read_verification_observations(path: str | os.PathLike) -> pd.DataFrame:
    """Observation table for verification (CSV, Parquet or NetCDF; columns
    :data:`jaxguide.observations.COLUMNS`, physical units). Every row must be usable:
    a row with a missing time, a latitude outside [-90, 90], a non-finite lon/value or a
    sigma <= 0 raises ValueError with the counts per column."""
    table = read_observations(path)
    if len(table) == 0:
        raise ValueError(f"observation file {str(path)!r} has no observations")
    bad = {
        "time": int(table["time"].isna().sum()),
        "lat": int((~(np.abs(table["lat"]) <= 90)).sum()),
        "lon": int((~np.isfinite(table["lon"])).sum()),
        "value": int((~np.isfinite(table["value"])).sum()),
        "sigma": int((~(table["sigma"] > 0)).sum()),
    }
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise ValueError(f"observation file {str(path)!r} has unusable rows (column: count) {bad}")
    return table


def _time_index(ds_times: np.ndarray, obs_times) -> np.ndarray:
    """Index of the analysis time nearest to each observation time."""
    if ds_times.size == 1:
        return np.zeros(len(obs_times), dtype=np.int64)
    t = np.asarray(obs_times, dtype="datetime64[ns]").astype(np.int64)
    d = np.asarray(ds_times, dtype="datetime64[ns]").astype(np.int64)
    return np.argmin(np.abs(t[:, None] - d[None, :]), axis=1)


def ensemble_at_observations(ds: xr.Dataset, table: pd.DataFrame, method: str | None = None) -> dict[str, AtObservations]:
    """Per variable of the table that the analysis has: its ensemble at the observations.

    Args:
      ds: analysis on HEALPix NEST pixels (dims member, time, pixel).
      table: observation table (physical units); rows of other variables are ignored.
      method: sampling scheme; None reads it from ``ds`` (:func:`observation_operator`).
    """
    if "pixel" not in ds.dims:
        raise ValueError("evaluate needs an analysis on the HEALPix grid (dimension 'pixel'), not a regridded one")
    method = observation_operator(ds) if method is None else grid_sampling.check_method(method)
    table = table.reset_index(drop=True)
    nside = healpix.nside_of_npix(ds.sizes["pixel"])
    channels = set(channel_variables(ds))
    lon = table["lon"].to_numpy(np.float64)
    lat = table["lat"].to_numpy(np.float64)
    pix, w = grid_sampling.stencil(nside, lon, lat, method, "nest")  # (n, 4)
    tidx = _time_index(ds["time"].values, table["time"])
    out = {}
    for var, rows in table.groupby("variable", sort=True):
        if var not in channels:
            continue
        pos = rows.index.to_numpy()  # positions: the index is 0..n-1
        field = ds[var].transpose("member", "time", "pixel").values.astype(np.float64)  # (M, T, npix)
        vals = np.sum(field[:, tidx[pos][:, None], pix[pos]] * w[pos][None], axis=-1)  # (M, n)
        out[str(var)] = AtObservations(
            ensemble=vals,
            value=rows["value"].to_numpy(np.float64),
            sigma=rows["sigma"].to_numpy(np.float64),
            lon=lon[pos],
            lat=lat[pos],
        )
    return out


def truth_metrics(ds: xr.Dataset, truth: str | os.PathLike | xr.Dataset, *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per shared variable: :func:`jaxguide.metrics.summarize` of the whole field against
    the truth (exact, no observation noise). ``truth``: a file or Dataset with the
    analysis' variables on the same (time, pixel) grid (a ``member`` dim takes member 0)."""
    label = "the truth" if isinstance(truth, xr.Dataset) else f"truth file {str(truth)!r}"
    if not isinstance(truth, xr.Dataset):
        if not Path(truth).exists():
            raise FileNotFoundError(f"no such truth file: {str(truth)!r}")
        with xr.open_dataset(truth) as t:
            truth = t.load()
    out = {}
    for var in channel_variables(ds):
        if var not in truth:
            continue
        tv = truth[var]
        if "member" in tv.dims:
            tv = tv.isel(member=0)
        tv = tv.transpose("time", "pixel").values
        ev = ds[var].transpose("member", "time", "pixel").values
        if tv.shape != ev.shape[1:]:
            raise ValueError(f"truth {var} has shape {tv.shape}, analysis {ev.shape[1:]}")
        out[var] = metrics.summarize(ev.reshape(ev.shape[0], -1), tv.reshape(-1), seed=seed)
    if not out:
        raise ValueError(f"{label} shares no variable with the analysis")
    return out


def evaluate(
    analysis: str | os.PathLike | xr.Dataset,
    observations: Mapping[str, str | os.PathLike | pd.DataFrame],
    *,
    truth: str | os.PathLike | xr.Dataset | None = None,
    seed: int = 0,
    variogram: bool = True,
) -> Evaluation:
    """Score an analysis at sets of observations (and against a truth field).

    Args:
      analysis: file written by ``jaxguide assimilate`` (or its Dataset).
      observations: set name -> table path or DataFrame, e.g. ``{"assimilated": ...,
        "held_out": ...}``; observations of variables the analysis lacks are left out
        (counted in ``skipped`` and logged); a set with none left raises ValueError.
      truth: optional truth fields (see :func:`truth_metrics`), scored as set "truth".
      seed: seeds the observation-noise draws and the rank histograms' tie-breaking.
      variogram: also give the variogram score at observations (p = 0.5).
    """
    ds = analysis if isinstance(analysis, xr.Dataset) else read_analysis(analysis)
    method = observation_operator(ds)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    samples: dict[str, dict[str, AtObservations]] = {}
    skipped: dict[str, dict[str, Any]] = {}
    for name, src in observations.items():
        table = src if isinstance(src, pd.DataFrame) else read_verification_observations(src)
        per_var = ensemble_at_observations(ds, table, method)
        if not per_var:
            raise ValueError(f"none of the {name} observation variables {sorted(set(table['variable']))} is in the analysis")
        left_out = sorted(set(table["variable"]) - set(per_var))
        if left_out:
            n_skip = int(table["variable"].isin(left_out).sum())
            skipped[name] = {"variables": left_out, "n_obs": n_skip}
            logger.info("%s: left out %d observations of variables not in the analysis: %s", name, n_skip, left_out)
        samples[name] = per_var
        results[name] = {
            var: metrics.summarize(a.ensemble, a.value, obs_sigma=a.sigma, seed=seed, variogram=variogram)
            for var, a in per_var.items()
        }
    if truth is not None:
        results["truth"] = truth_metrics(ds, truth, seed=seed)
    return Evaluation(metrics=results, operator=method, skipped=skipped, samples=samples)


def write_plots(result: Evaluation, analysis: xr.Dataset, plots_dir: str | os.PathLike) -> list[Path]:
    """PNG maps per variable (first time, valid time in the title: ensemble mean,
    increment vs the prior mean, spread, assimilated and held-out observation locations)
    and a rank histogram per set and variable,
    into ``plots_dir`` (created if missing; its parent must exist)."""
    from jaxguide import plots

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(exist_ok=True)
    written = []
    ds = analysis
    for var in sorted({v for per in result.samples.values() for v in per}):
        assim = result.samples.get("assimilated", {}).get(var)
        held = result.samples.get("held_out", {}).get(var)
        prior_name = var + PRIOR_SUFFIX
        prior = ds[prior_name].isel(time=0).values if prior_name in ds else None
        written.append(
            plots.plot_maps(
                plots_dir / f"{var}_maps.png",
                ds[var].isel(time=0).transpose("member", "pixel").values,
                order="nest",
                prior=prior,
                obs_lon=None if assim is None else assim.lon,
                obs_lat=None if assim is None else assim.lat,
                held_out_lon=None if held is None else held.lon,
                held_out_lat=None if held is None else held.lat,
                name=var,
                units=str(ds[var].attrs.get("units", "")),
                valid_time=ds["time"].values[0],
            )
        )
    for set_name, per_var in result.metrics.items():
        for var, s in per_var.items():
            title = f"{var} ({set_name}{', members + obs. noise' if s.get('obs_noise_in_scores') else ''})"
            written.append(plots.plot_rank_histogram(plots_dir / f"{var}_{set_name}_rank.png", s["rank_histogram"], title=title))
    return written
