"""Verification of an analysis file: scores at observations and against a truth field.

What ``jaxguide evaluate`` runs (the CLI only parses and prints). The ensemble is read
at each observation with the SAME operator ``assimilate`` used, recorded in the
file's global attribute :data:`OPERATOR_ATTR` (``"bilinear"`` or ``"nearest"``, see
:mod:`jaxguide.grid.latlon`); files written before that attribute existed are read
bilinearly (the default operator) and a note is logged.

Observations are noisy, so the scores at observations use the predictive ensemble
(members + N(0, sigma^2) with the table's sigma, seeded); scores against a truth field
use the members as they are (see :func:`jaxguide.verification.metrics.summarize`).

Trajectories (a video model's run, dims (member, time, pixel) with several frame times)
are read in time with the SAME rule ``assimilate`` used, recorded in the global
attribute :data:`TIME_ATTR`: ``"linear"`` interpolates linearly in time between the
two frames around each observation (the operator's frame stencil,
:func:`jaxguide.observations.operator.time_stencil`); ``"exact"``, no attribute (older files,
campaign stores) or one time only take the nearest time, as before. Under the linear
rule an observation outside the file's first..last time cannot be read:
:func:`ensemble_at_observations` raises ValueError, :func:`evaluate` leaves it out and
counts it in ``skipped[set]["outside_time"]``. Files with several times also get
per-frame scores: each observation is assigned to its nearest frame (a tie to the
earlier one) and each frame's observations are summarised per variable.
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

from jaxguide.grid import latlon as grid_sampling, healpix

from jaxguide.verification import metrics, plots
from jaxguide.io.files import read_analysis
from jaxguide.assimilation.dataset import PRIOR_SUFFIX, channel_variables
from jaxguide.io.times import epoch_ns
from jaxguide.observations.errors import TimeFormatError
from jaxguide.observations.operator import time_stencil
from jaxguide.observations.table import read_observations

logger = logging.getLogger(__name__)

OPERATOR_ATTR = "observation_operator"
DEFAULT_OPERATOR = "bilinear"
TIME_ATTR = "time_interpolation"
# the file's TIME_ATTR -> how evaluate reads it in time
TIME_RULES = {"linear": "linear", "exact": "nearest"}


@dataclasses.dataclass(frozen=True)
class AtObservations:
    """One variable's ensemble read at its observations (physical units).

    ensemble: (M, n); value, sigma, lon, lat: (n,) the observations, in table order.
    time: (n,) datetime64[ns] observation times and frame: (n,) int64 index of the
      nearest analysis time (a tie: the earlier), when the analysis has several times.
    """

    ensemble: np.ndarray
    value: np.ndarray
    sigma: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    time: np.ndarray | None = None
    frame: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Result of :func:`evaluate`.

    metrics: set ("assimilated", "held_out", "truth") -> variable -> the dict of
      :func:`jaxguide.verification.metrics.summarize`.
    operator: the sampling scheme used at the observations.
    skipped: set -> {"variables": [...], "n_obs": count} of observations whose variable
      the analysis lacks, and/or "outside_time": {"n_obs", "first", "last"} (linear time
      rule: observations outside the analysis times first..last); left out.
    samples: set -> variable -> :class:`AtObservations` (for plots or further scores).
    time_rule: how the ensemble was read in time: "single" (one analysis time),
      "linear" or "nearest" (see the module docstring).
    per_frame: set -> frame time (ISO 8601) -> variable -> the dict of
      :func:`jaxguide.verification.metrics.summarize` of the observations nearest that frame (frames
      without observations are absent); empty for a single analysis time.
    """

    metrics: dict[str, dict[str, dict[str, Any]]]
    operator: str
    skipped: dict[str, dict[str, Any]]
    samples: dict[str, dict[str, AtObservations]]
    time_rule: str = "single"
    per_frame: dict[str, dict[str, dict[str, dict[str, Any]]]] = dataclasses.field(default_factory=dict)

    def to_json(self, analysis: str | os.PathLike | None = None) -> dict[str, Any]:
        """JSON-friendly dict: analysis path, operator, skipped observations, metrics;
        for an analysis with several times also the time rule and the per-frame metrics."""
        out = {
            "analysis": None if analysis is None else str(analysis),
            "observation_operator": self.operator,
            "skipped": self.skipped,
            "metrics": self.metrics,
        }
        if self.time_rule != "single":
            out["time_interpolation"] = self.time_rule
            out["per_frame"] = self.per_frame
        return out


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
    :data:`jaxguide.observations.table.COLUMNS`, physical units). Every row must be usable:
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


def time_rule(ds: xr.Dataset) -> str:
    """How ``ds`` is read in time: "single" (one time), "linear" (its :data:`TIME_ATTR`
    is "linear") or "nearest" ("exact", or no attribute: older files, campaign stores).
    An unknown value raises ValueError."""
    if ds.sizes.get("time", 1) == 1:
        return "single"
    value = ds.attrs.get(TIME_ATTR)
    if value is None:
        return "nearest"
    if str(value) not in TIME_RULES:
        raise ValueError(f"the analysis' {TIME_ATTR} is {str(value)!r}; expected one of {', '.join(TIME_RULES)}")
    return TIME_RULES[str(value)]


def _time_index(ds_times: np.ndarray, obs_times) -> np.ndarray:
    """Index of the analysis time nearest to each observation time (a tie: the earlier)."""
    if ds_times.size == 1:
        return np.zeros(len(obs_times), dtype=np.int64)
    t = epoch_ns(obs_times, error=TimeFormatError)
    d = epoch_ns(ds_times, error=TimeFormatError)
    return np.argmin(np.abs(t[:, None] - d[None, :]), axis=1)


def outside_times(ds: xr.Dataset, obs_times, rule: str | None = None) -> np.ndarray:
    """(n,) bool: observations the linear time rule cannot read (before the analysis'
    first time or after its last); all False for the other rules."""
    rule = time_rule(ds) if rule is None else rule
    if rule != "linear":
        return np.zeros(len(obs_times), dtype=bool)
    t = epoch_ns(obs_times, error=TimeFormatError)
    d = epoch_ns(ds["time"].values, error=TimeFormatError)
    return (t < d.min()) | (t > d.max())


def _time_weights(ds_times: np.ndarray, obs_times, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Frames (n, 2) and weights (n, 2) that read each observation in time: the two
    analysis times around it, linearly (``rule == "linear"``), or the nearest one."""
    n = len(obs_times)
    if rule != "linear":
        idx = _time_index(ds_times, obs_times)
        return np.stack([idx, idx], 1), np.stack([np.ones(n), np.zeros(n)], 1)
    d = epoch_ns(ds_times, error=TimeFormatError)
    if np.any(np.diff(d) <= 0):
        raise ValueError("the analysis times are not increasing; cannot interpolate in time")
    t = epoch_ns(obs_times, error=TimeFormatError)
    # fractional index, piecewise linear in time (offsets from the first time: exact in float64)
    position = np.interp((t - d[0]).astype(np.float64), (d - d[0]).astype(np.float64), np.arange(d.size, dtype=np.float64))
    frames, weights = time_stencil(position, d.size)
    return frames.astype(np.int64), weights


def ensemble_at_observations(
    ds: xr.Dataset, table: pd.DataFrame, method: str | None = None, rule: str | None = None
) -> dict[str, AtObservations]:
    """Per variable of the table that the analysis has: its ensemble at the observations.

    Args:
      ds: analysis on HEALPix NEST pixels (dims member, time, pixel).
      table: observation table (physical units); rows of other variables are ignored.
      method: sampling scheme; None reads it from ``ds`` (:func:`observation_operator`).
      rule: time rule ("single", "linear", "nearest"); None reads it from ``ds``
        (:func:`time_rule`). Under "linear" an observation outside the analysis times
        raises ValueError (:func:`evaluate` leaves such rows out first).
    """
    if "pixel" not in ds.dims:
        raise ValueError("evaluate needs an analysis on the HEALPix grid (dimension 'pixel'), not a regridded one")
    method = observation_operator(ds) if method is None else grid_sampling.check_method(method)
    rule = time_rule(ds) if rule is None else rule
    table = table.reset_index(drop=True)
    nside = healpix.nside_of_npix(ds.sizes["pixel"])
    channels = set(channel_variables(ds))
    ds_times = ds["time"].values
    known = table["variable"].isin(channels).to_numpy()
    outside = outside_times(ds, table["time"], rule) & known
    if outside.any():
        first, last = (pd.Timestamp(t).isoformat() for t in (ds_times.min(), ds_times.max()))
        raise ValueError(f"{int(outside.sum())} observations lie outside the analysis times {first} to {last} "
                         f"(e.g. {table['time'][outside].iloc[0]}); the ensemble is interpolated in time only between them")
    lon = table["lon"].to_numpy(np.float64)
    lat = table["lat"].to_numpy(np.float64)
    pix, w = grid_sampling.stencil(nside, lon, lat, method, "nest")  # (n, 4)
    several = ds_times.size > 1
    if several:
        frames, tw = _time_weights(ds_times, table["time"], "nearest" if rule == "single" else rule)  # (n, 2)
        nearest = _time_index(ds_times, table["time"])
        obs_ns = epoch_ns(table["time"], error=TimeFormatError).astype("datetime64[ns]")
    else:
        frames, tw = np.zeros((len(table), 2), np.int64), np.tile([1.0, 0.0], (len(table), 1))
    out = {}
    for var, rows in table.groupby("variable", sort=True):
        if var not in channels:
            continue
        pos = rows.index.to_numpy()  # positions: the index is 0..n-1
        field = ds[var].transpose("member", "time", "pixel").values.astype(np.float64)  # (M, T, npix)
        vals = sum(
            tw[pos, k][None, :] * np.sum(field[:, frames[pos, k][:, None], pix[pos]] * w[pos][None], axis=-1)
            for k in range(2) if several or k == 0
        )  # (M, n)
        out[str(var)] = AtObservations(
            ensemble=vals,
            value=rows["value"].to_numpy(np.float64),
            sigma=rows["sigma"].to_numpy(np.float64),
            lon=lon[pos],
            lat=lat[pos],
            time=obs_ns[pos] if several else None,
            frame=nearest[pos] if several else None,
        )
    return out


def per_frame_metrics(
    ds_times: np.ndarray, per_var: Mapping[str, AtObservations], *, seed: int = 0, variogram: bool = True
) -> dict[str, dict[str, dict[str, Any]]]:
    """Frame time (ISO 8601) -> variable -> :func:`jaxguide.verification.metrics.summarize` of the
    observations whose nearest analysis time is that frame (``AtObservations.frame``);
    frames without observations are absent. Frames in time order."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for k, t in enumerate(np.asarray(ds_times)):
        entry = {}
        for var, a in per_var.items():
            sel = a.frame == k
            if sel.any():
                entry[var] = metrics.summarize(a.ensemble[:, sel], a.value[sel], obs_sigma=a.sigma[sel], seed=seed,
                                               variogram=variogram)
        if entry:
            out[pd.Timestamp(t).isoformat()] = entry
    return out


def truth_metrics(ds: xr.Dataset, truth: str | os.PathLike | xr.Dataset, *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per shared variable: :func:`jaxguide.verification.metrics.summarize` of the whole field against
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
    rule = time_rule(ds)
    ds_times = ds["time"].values
    results: dict[str, dict[str, dict[str, Any]]] = {}
    samples: dict[str, dict[str, AtObservations]] = {}
    skipped: dict[str, dict[str, Any]] = {}
    per_frame: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for name, src in observations.items():
        table = src if isinstance(src, pd.DataFrame) else read_verification_observations(src)
        variables = sorted(set(table["variable"]))
        outside = outside_times(ds, table["time"], rule)
        if outside.any():
            first, last = (pd.Timestamp(t).isoformat() for t in (ds_times.min(), ds_times.max()))
            skipped.setdefault(name, {})["outside_time"] = {"n_obs": int(outside.sum()), "first": first, "last": last}
            logger.info("%s: left out %d observations outside the analysis times %s to %s", name, int(outside.sum()),
                        first, last)
            table = table.loc[~outside]
            if len(table) == 0:
                raise ValueError(f"none of the {int(outside.size)} {name} observations lies within the analysis times "
                                 f"{first} to {last}")
        per_var = ensemble_at_observations(ds, table, method, rule)
        if not per_var:
            raise ValueError(f"none of the {name} observation variables {variables} is in the analysis")
        left_out = sorted(set(table["variable"]) - set(per_var))
        if left_out:
            n_skip = int(table["variable"].isin(left_out).sum())
            skipped.setdefault(name, {}).update({"variables": left_out, "n_obs": n_skip})
            logger.info("%s: left out %d observations of variables not in the analysis: %s", name, n_skip, left_out)
        samples[name] = per_var
        results[name] = {
            var: metrics.summarize(a.ensemble, a.value, obs_sigma=a.sigma, seed=seed, variogram=variogram)
            for var, a in per_var.items()
        }
        if rule != "single":
            per_frame[name] = per_frame_metrics(ds_times, per_var, seed=seed, variogram=variogram)
    if truth is not None:
        results["truth"] = truth_metrics(ds, truth, seed=seed)
    return Evaluation(metrics=results, operator=method, skipped=skipped, samples=samples, time_rule=rule,
                      per_frame=per_frame)


def write_plots(result: Evaluation, analysis: xr.Dataset, plots_dir: str | os.PathLike) -> list[Path]:
    """PNG maps per variable (first time, valid time in the title: ensemble mean,
    increment vs the prior mean, spread, assimilated and held-out observation locations)
    and a rank histogram per set and variable,
    into ``plots_dir`` (created if missing; its parent must exist)."""
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
