"""One analysis on a session's compiled programs: the time and output checked, the
observations prepared, the window plan run (:mod:`jaxguide.assimilation.windows`), the
summary (observation RMSE of the analysis and prior ensembles), the provenance and the
file, written atomically.
"""

from __future__ import annotations

import logging
import time as _time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.assimilation.dataset import analysis_to_dataset
from jaxguide.assimilation.provenance import run_provenance
from jaxguide.assimilation.settings import AnalysisInputs, AssimilationSettings, run_keys
from jaxguide.assimilation.windows import (Stage, WindowPlan, plan_windows, run_windows, smoother_provenance,
                                           trajectory_frames)
from jaxguide.io.files import check_writable_dir, write_dataset
from jaxguide.model import units
from jaxguide.observations.prepare import PreparedObservations, prepare
from jaxguide.observations.sources import analysis_table
from jaxguide.observations.table import parse_time

logger = logging.getLogger(__name__)


def utc_naive(t) -> pd.Timestamp:
    """A timestamp in UTC without timezone (naive input is taken as UTC); text must be
    ISO 8601 (``observations.parse_time``)."""
    return parse_time(t, "analysis time")


def observation_rmse(ensemble, prepared: PreparedObservations, scale) -> dict[str, dict[str, float]]:
    """Per variable: RMSE (physical units) of the ensemble mean at the observations and the
    ensemble spread there. ensemble: (M, C, 1, npix) normalised, net order."""
    n = prepared.n_obs
    vals = np.asarray(jax.vmap(prepared.obs.A)(jnp.asarray(ensemble)), np.float64)[:, :n]  # (M, n)
    ch = np.asarray(prepared.obs.A.channel)[:n]
    # differences only: the center cancels
    phys = units.unnormalise(vals, 0.0, scale, channel=ch)
    y = units.unnormalise(prepared.table["value_n"].to_numpy(np.float64), 0.0, scale, channel=ch)
    out = {}
    for var, rows in prepared.table.groupby("variable", sort=True):
        i = rows.index.to_numpy()
        err = phys[:, i].mean(0) - y[i]
        entry = {"n_obs": int(i.size), "rmse": float(np.sqrt(np.mean(err**2)))}
        if phys.shape[0] > 1:
            entry["spread"] = float(np.sqrt(np.mean(phys[:, i].var(0, ddof=1))))
        out[str(var)] = entry
    return out


def _check_output(out: Path, overwrite: bool) -> None:
    """Fail before the expensive work if the output cannot be written."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {str(out)!r} exists (pass --overwrite to replace it)")
    if output_format(out) == "netcdf" and out.is_dir():
        raise IsADirectoryError(f"output {str(out)!r} is a directory; the analysis is a file (e.g. analysis.nc)")
    if output_format(out) == "zarr" and out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {str(out)!r} is a file; a .zarr analysis is a directory")
    check_writable_dir(out.parent)


def output_format(path: Path) -> str:
    """The analysis file's format: ``"zarr"`` for a ``.zarr`` path, else ``"netcdf"``."""
    return "zarr" if path.suffix == ".zarr" else "netcdf"


def run_analysis(session, inputs: AnalysisInputs) -> dict[str, Any]:
    """Run one analysis (see :func:`jaxguide.assimilation.pipeline.assimilate`) with the
    programs of ``session`` (a :class:`~jaxguide.assimilation.session.Session`), write it
    to ``inputs.out``; returns the summary."""
    t_start = _time.perf_counter()
    if inputs.out is None:
        raise ValueError("no output path: pass out=... (analysis_dataset returns the analysis in memory)")
    inputs.settings.check()  # the options and the time first, then the output (as the CLI reports them)
    utc_naive(inputs.time)
    out = Path(inputs.out)
    _check_output(out, inputs.overwrite)
    ds, summary = analysis_dataset(session, inputs)
    _event(inputs.on_event, "writing", path=str(out))
    write_dataset(ds, out, format=output_format(out), overwrite=inputs.overwrite)
    _event(inputs.on_event, "written", path=str(out))
    summary["seconds_total"] = _time.perf_counter() - t_start
    return summary


def _event(on_event, name: str, **info) -> None:
    """Log a stage of the run (INFO) and pass it to the caller's ``on_event``."""
    logger.info("%s %s", name, info)
    if on_event is not None:
        on_event(name, info)


def analysis_dataset(session, inputs: AnalysisInputs) -> tuple[xr.Dataset, dict[str, Any]]:
    """One analysis in memory: (the analysis Dataset in the CF layout of
    :mod:`jaxguide.assimilation.dataset`, the summary). What :func:`run_analysis` writes,
    and what ``jaxguide.earth2studio.CBottleDA`` returns: one path for both. ``inputs.out``
    is not written (may be None; it is recorded in the summary)."""
    t_start = _time.perf_counter()
    settings = inputs.settings
    settings.check()
    method = settings.guidance_method()
    time = utc_naive(inputs.time)

    def event(name: str, **info) -> None:
        _event(inputs.on_event, name, **info)

    dm, fn = session.model_for(settings)
    video = dm.member_shape[1] > 1
    if not video and (inputs.end is not None or inputs.condition is not None):
        raise ValueError("end (--end) and condition (--condition) are for video models (time_length > 1); "
                         "this model samples one time: run one analysis per time (--times) instead")
    defaults = AssimilationSettings()
    if not video and (settings.time_matching != defaults.time_matching
                      or settings.conditioning_frames != defaults.conditioning_frames):
        raise ValueError("time_matching (--time-matching) and conditioning_frames (--conditioning-frames) are for "
                         "video models (time_length > 1); this model samples one time")
    if not video and settings.smoother:
        raise ValueError("smoother (--smoother) is for video models (time_length > 1); this model samples one time")
    if video and settings.window_hours != defaults.window_hours:
        raise ValueError("window_hours (--window-hours) is for single-time models; a video run assimilates every "
                         "observation between its first frame (--time) and its last (--end)")
    obs = inputs.obs
    table = analysis_table(obs, sigma_y=settings.sigma_y)
    prep_kw = dict(drop_bad=settings.drop_bad, sigma_y=settings.sigma_y, nside=dm.nside,
                   interpolation=settings.interpolation, check_plausibility=settings.check_plausibility)
    if not video:
        prepared = prepare(table, dm.channels, dm.center, dm.scale, time=time, window_hours=settings.window_hours,
                           pad_to="bucket" if settings.pad_observations else None, **prep_kw)
        prepared.obs.check()  # value checks on concrete arrays (inside the program they are traced)
        event("observations", n_obs=prepared.n_obs, dropped=dict(prepared.dropped))
        cond = dm.conditioning(time, sst_path=inputs.sst, sst_offset=settings.sst_offset)
        plan = [WindowPlan(None, cond, prepared.obs, None)]
        times = [time]
        extra: dict[str, Any] = {}
    else:
        end = None if inputs.end is None else utc_naive(inputs.end)
        if settings.smoother:  # the whole run is one trajectory: a model of that many frames
            dm, fn = session.model_for(settings, trajectory_frames=trajectory_frames(dm, time, end))
            event("smoother", frames=dm.member_shape[1], windows=len(dm.starts), frames_per_window=dm.window_length,
                  overlap=dm.overlap)
        plan, prepared, times, extra = plan_windows(dm, table, time, end, inputs.condition, settings, inputs.sst,
                                                    prep_kw, event)
        if settings.smoother:
            extra.pop("conditioning_frames")
            extra.update(smoother_provenance(dm))

    # the seed rule (SEED_RULE): each window's keys from its first frame's time
    keys = [run_keys(settings.seed, time if w.window is None else w.window.start) for w in plan]
    stages = [Stage("analysis", method, settings.members, [k[0] for k in keys])]
    if settings.n_prior > 0:
        stages.append(Stage("prior", None, settings.n_prior, [k[1] for k in keys]))
    sampled, seconds_compile = run_windows(session, fn, dm, plan, stages, settings, n_times=len(times),
                                           progress=inputs.progress, event=event)
    analysis, t_analysis = sampled[0]
    prior, t_prior = sampled[1] if len(sampled) > 1 else (None, 0.0)

    summary: dict[str, Any] = {
        "output": None if inputs.out is None else str(inputs.out),
        "time": str(time),
        "method": settings.method_name,
        "members": settings.members,
        "prior_members": settings.n_prior,
        "steps": settings.steps,
        "n_obs": prepared.n_obs,
        "dropped": prepared.dropped,
        "analysis": observation_rmse(analysis, prepared, dm.scale),
        "prior": observation_rmse(prior, prepared, dm.scale) if prior is not None else None,
        "seconds_analysis": t_analysis,
        "seconds_prior": t_prior,
        "seconds_compile": seconds_compile,  # wall time of compiling both programs (concurrently)
    }
    if video:
        summary.update(frames=[str(t) for t in times], windows=extra["n_windows"])
    provenance = run_provenance(settings, dm, inputs.command, n_obs=prepared.n_obs,
                                observations_dropped=sum(prepared.dropped.values()), **extra)
    if video:
        provenance.pop("observation_window_hours")
    ds = analysis_to_dataset(
        analysis,
        channels=list(dm.channels),
        center=dm.center,
        scale=dm.scale,
        times=times,
        provenance=provenance,
        prior=prior,
        regrid_latlon=inputs.regrid,
    )
    summary["seconds_total"] = _time.perf_counter() - t_start
    return ds, summary
