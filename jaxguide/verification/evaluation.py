"""Verification of an analysis file: scores at observations and against a truth field.

What ``jaxguide evaluate`` runs (the CLI only parses and prints). The ensemble is read
at each observation with the SAME operator ``assimilate`` used, recorded in the
file's global attribute :data:`OPERATOR_ATTR` (``"bilinear"`` or ``"nearest"``, see
:mod:`jaxguide.grid.latlon`); files written before that attribute existed are read
bilinearly (the default operator) and a note is logged.

Observations are noisy, so the scores at observations use the predictive ensemble
(members + N(0, sigma^2), seeded) with the sigma the analysis assumed: its recorded
``--sigma-y`` override (attribute ``sigma_y``), else the table's sigma; scores against a
truth field use the members as they are (see :func:`jaxguide.verification.metrics.summarize`).

Only analysed times are scored: a campaign store's pending and skipped times (its
``completed`` flag) are left out and reported, and observations farther than a time
tolerance from every analysed time (default: the analysis' observation window,
attribute ``observation_window_hours``, else 3 h) are left out and counted. A truth
field is matched by time, nside and pixel order (:func:`truth_metrics`).

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
from jaxguide.assimilation.dataset import PRIOR_SUFFIX, channel_variables, describe_sigma_y
from jaxguide.campaign.store import ANALYSED, PENDING
from jaxguide.io.times import epoch_ns
from jaxguide.observations.errors import TimeFormatError
from jaxguide.observations.operator import time_stencil
from jaxguide.observations.table import read_observations
from jaxguide.observations.validation import override_sigma
from jaxguide.verification.truth import truth_metrics

logger = logging.getLogger(__name__)

OPERATOR_ATTR = "observation_operator"
DEFAULT_OPERATOR = "bilinear"
TIME_ATTR = "time_interpolation"
# the file's TIME_ATTR -> how evaluate reads it in time
TIME_RULES = {"linear": "linear", "exact": "nearest"}
WINDOW_ATTR = "observation_window_hours"
# observations farther than this from every analysed time are not scored, when the
# analysis records no observation window (WINDOW_ATTR)
DEFAULT_TIME_TOLERANCE_HOURS = 3.0
SIGMA_FROM_TABLE = describe_sigma_y(None)  # "observation table"


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
    time_tolerance_hours: observations farther than this from every analysed time were
      left out (``skipped[set]["time_tolerance"]``); None under the linear time rule.
    sigma: the observation-error standard deviation of the scores: ``{"source":
      "observation table"}`` (each row's sigma) or ``{"source": "analysis sigma_y",
      "sigma_y": ...}`` (the analysis' ``--sigma-y`` override).
    times: for a campaign store (a ``completed`` flag per time): ``n_times``,
      ``n_analysed``, ``n_not_analysed``, ``pending`` (ISO times) and ``skipped`` (ISO
      time -> reason); only the analysed times are scored. Empty for other files.
    """

    metrics: dict[str, dict[str, dict[str, Any]]]
    operator: str
    skipped: dict[str, dict[str, Any]]
    samples: dict[str, dict[str, AtObservations]]
    time_rule: str = "single"
    per_frame: dict[str, dict[str, dict[str, dict[str, Any]]]] = dataclasses.field(default_factory=dict)
    time_tolerance_hours: float | None = None
    sigma: dict[str, str] = dataclasses.field(default_factory=lambda: {"source": SIGMA_FROM_TABLE})
    times: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self, analysis: str | os.PathLike | None = None) -> dict[str, Any]:
        """JSON-friendly dict: analysis path, operator, skipped observations, time
        tolerance, sigma source, metrics; for a campaign store the times not analysed; for
        an analysis with several times also the time rule and the per-frame metrics."""
        out = {
            "analysis": None if analysis is None else str(analysis),
            "observation_operator": self.operator,
            "skipped": self.skipped,
            "time_tolerance_hours": self.time_tolerance_hours,
            "sigma": self.sigma,
            "metrics": self.metrics,
        }
        if self.times:
            out["times"] = self.times
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


def analysed_times(ds: xr.Dataset) -> tuple[xr.Dataset, dict[str, Any]]:
    """``ds`` at its analysed times only, and what was left out.

    A campaign store has a ``completed`` flag per time (pending, analysed, skipped;
    :mod:`jaxguide.campaign.store`): its pending and skipped times hold NaN and are never
    scored. Returns the dataset without them (and without the status variables) and
    ``{"n_times", "n_analysed", "n_not_analysed", "pending": [ISO], "skipped": {ISO:
    reason}}``; other files come back as they are, with ``{}``. No analysed time raises
    ValueError.
    """
    if "completed" not in ds.variables:
        return ds, {}
    flag = np.asarray(ds["completed"].values).astype(np.int64).reshape(-1)
    iso = [pd.Timestamp(t).isoformat() for t in ds["time"].values]
    reasons = (np.asarray(ds["skipped_reason"].values, dtype=object).reshape(-1) if "skipped_reason" in ds.variables
               else np.full(flag.size, "", dtype=object))
    done = flag == ANALYSED
    info = {
        "n_times": int(flag.size),
        "n_analysed": int(done.sum()),
        "n_not_analysed": int((~done).sum()),
        "pending": [iso[i] for i in np.flatnonzero(flag == PENDING)],
        "skipped": {iso[i]: str(reasons[i]) for i in np.flatnonzero(~done & (flag != PENDING))},
    }
    if not done.any():
        raise ValueError(f"no analysed time: {flag.size} of {flag.size} times are pending or skipped "
                         f"({len(info['pending'])} pending, {len(info['skipped'])} skipped); nothing to score")
    out = ds.isel(time=np.flatnonzero(done)).drop_vars([v for v in ("completed", "skipped_reason") if v in ds.variables])
    if info["n_not_analysed"]:
        logger.info("scoring %d analysed times of %d (pending: %d, skipped: %d)", info["n_analysed"], flag.size,
                    len(info["pending"]), len(info["skipped"]))
    return out, info


def time_tolerance(ds: xr.Dataset, hours: float | None = None) -> float:
    """Hours from the nearest analysed time beyond which observations are not scored:
    ``hours`` if given, else the analysis' observation window (its :data:`WINDOW_ATTR`,
    +- hours), else :data:`DEFAULT_TIME_TOLERANCE_HOURS`."""
    if hours is not None:
        hours = float(hours)
        if not (np.isfinite(hours) and hours >= 0):
            raise ValueError(f"time_tolerance_hours must be finite and >= 0, got {hours}")
        return hours
    recorded = ds.attrs.get(WINDOW_ATTR)
    try:
        value = float(recorded)
    except (TypeError, ValueError):
        return DEFAULT_TIME_TOLERANCE_HOURS
    return value if np.isfinite(value) and value >= 0 else DEFAULT_TIME_TOLERANCE_HOURS


def far_from_times(ds_times, obs_times, hours: float) -> np.ndarray:
    """(n,) bool: observations farther than ``hours`` from every time of ``ds_times``."""
    d = np.sort(epoch_ns(ds_times, error=TimeFormatError))
    t = epoch_ns(obs_times, error=TimeFormatError)
    i = np.searchsorted(d, t)
    before = np.abs(t - d[np.clip(i - 1, 0, d.size - 1)])
    after = np.abs(d[np.clip(i, 0, d.size - 1)] - t)
    return np.minimum(before, after) > int(round(hours * 3_600_000_000_000))


def analysis_sigma_y(ds: xr.Dataset) -> float | dict[str, float] | None:
    """The ``--sigma-y`` override the analysis recorded (its ``sigma_y`` attribute, as
    :func:`jaxguide.assimilation.dataset.describe_sigma_y` writes it): a value for every
    row, a mapping variable -> value, or None (the table's sigma: "observation table",
    no attribute, or a text that is neither, which is logged)."""
    raw = ds.attrs.get("sigma_y")
    if raw is None or str(raw).strip() == SIGMA_FROM_TABLE:
        return None
    text = str(raw).strip()
    try:
        value = float(text)
        if np.isfinite(value) and value > 0:
            return value
    except ValueError:
        try:
            pairs = [part.split("=") for part in text.split(",")]
            mapping = {k.strip(): float(v) for k, v in pairs}
            if mapping and all(k and np.isfinite(v) and v > 0 for k, v in mapping.items()):
                return mapping
        except ValueError:
            pass
    logger.warning("the analysis' sigma_y attribute %r is not a value or a mapping: scoring with the table's sigma", text)
    return None


def with_analysis_sigma(table: pd.DataFrame, sigma_y: float | Mapping[str, float] | None) -> pd.DataFrame:
    """``table`` with the analysis' sigma override applied (variables a mapping does not
    name keep the table's sigma)."""
    if sigma_y is None:
        return table
    if isinstance(sigma_y, Mapping):
        present = set(table["variable"])
        sigma_y = {k: v for k, v in sigma_y.items() if k in present}
        if not sigma_y:
            return table
    return override_sigma(table, sigma_y)


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


def evaluate(
    analysis: str | os.PathLike | xr.Dataset,
    observations: Mapping[str, str | os.PathLike | pd.DataFrame],
    *,
    truth: str | os.PathLike | xr.Dataset | None = None,
    seed: int = 0,
    variogram: bool = True,
    time_tolerance_hours: float | None = None,
) -> Evaluation:
    """Score an analysis at sets of observations (and against a truth field).

    Only analysed times are scored: a campaign store's pending and skipped times
    (:func:`analysed_times`) are left out and reported in ``Evaluation.times``.
    Observations are scored with the analysis' own ``--sigma-y`` override where it
    recorded one (:func:`analysis_sigma_y`), else with the table's sigma
    (``Evaluation.sigma`` says which).

    Args:
      analysis: file written by ``jaxguide assimilate`` or ``jaxguide campaign`` (or its
        Dataset).
      observations: set name -> table path or DataFrame, e.g. ``{"assimilated": ...,
        "held_out": ...}``; observations of variables the analysis lacks are left out
        (counted in ``skipped`` and logged); a set with none left raises ValueError.
      truth: optional truth fields (see :func:`truth_metrics`), scored as set "truth".
      seed: seeds the observation-noise draws and the rank histograms' tie-breaking.
      variogram: also give the variogram score at observations (p = 0.5).
      time_tolerance_hours: observations farther than this from every analysed time are
        left out (``skipped[set]["time_tolerance"]``); None: the analysis' observation
        window, else :data:`DEFAULT_TIME_TOLERANCE_HOURS` (:func:`time_tolerance`).
        Not used under the linear time rule (observations between the first and last
        frame are read between the two frames around them; others are left out).
    """
    ds = analysis if isinstance(analysis, xr.Dataset) else read_analysis(analysis)
    ds, times_info = analysed_times(ds)
    method = observation_operator(ds)
    rule = time_rule(ds)
    tolerance = None if rule == "linear" else time_tolerance(ds, time_tolerance_hours)
    sigma_y = analysis_sigma_y(ds)
    sigma_info = ({"source": SIGMA_FROM_TABLE} if sigma_y is None
                  else {"source": "analysis sigma_y", "sigma_y": describe_sigma_y(sigma_y)})
    ds_times = ds["time"].values
    results: dict[str, dict[str, dict[str, Any]]] = {}
    samples: dict[str, dict[str, AtObservations]] = {}
    skipped: dict[str, dict[str, Any]] = {}
    per_frame: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for name, src in observations.items():
        table = src if isinstance(src, pd.DataFrame) else read_verification_observations(src)
        table = with_analysis_sigma(table, sigma_y)
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
        if tolerance is not None:
            far = far_from_times(ds_times, table["time"], tolerance)
            if far.any():
                reason = f"farther than {tolerance:g} h from every analysed time"
                if times_info.get("n_not_analysed"):
                    reason += " (times not analysed, pending or skipped, are not scored)"
                skipped.setdefault(name, {})["time_tolerance"] = {"n_obs": int(far.sum()), "tolerance_hours": tolerance,
                                                                  "reason": reason}
                logger.info("%s: left out %d observations %s", name, int(far.sum()), reason)
                if far.all():
                    raise ValueError(f"none of the {far.size} {name} observations lies within {tolerance:g} h of an "
                                     f"analysed time ({pd.Timestamp(ds_times.min()).isoformat()} .. "
                                     f"{pd.Timestamp(ds_times.max()).isoformat()}, {ds_times.size} times); widen it "
                                     "with time_tolerance_hours (--time-tolerance-hours) or check the times")
                table = table.loc[~far]
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
                      per_frame=per_frame, time_tolerance_hours=tolerance, sigma=sigma_info, times=times_info)


def write_plots(result: Evaluation, analysis: xr.Dataset, plots_dir: str | os.PathLike) -> list[Path]:
    """PNG maps per variable (first analysed time, valid time in the title: ensemble mean,
    increment vs the prior mean, spread, assimilated and held-out observation locations)
    and a rank histogram per set and variable,
    into ``plots_dir`` (created if missing; its parent must exist)."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(exist_ok=True)
    written = []
    ds, _ = analysed_times(analysis)  # the first analysed time (a campaign's pending times are NaN)
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
