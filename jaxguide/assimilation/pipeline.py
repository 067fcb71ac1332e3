"""Assimilation end to end: model + observations + time -> analysis ensemble on disk.

This is what ``jaxguide assimilate`` runs, as orchestration only: the stages live in
their modules, a Python user composes them the same way.

Stages: the model (a converted cBottle directory, a loaded
:class:`~jaxguide.model.checkpoint.CBottleModel` or any :class:`~jaxguide.model.denoiser.DenoiserModel`,
e.g. :class:`~jaxguide.model.gaussian.GaussianModel`) -> the observation table, validated,
normalised, located and padded (:func:`jaxguide.observations.prepare.prepare`) -> the model's
conditioning for the analysis time (calendar, AMIP SST: ``model.conditioning``) -> the
guidance method (:mod:`jaxguide.diffusion.guidance`, from the settings) -> the guided ensemble and
the unguided prior ensemble (:func:`jaxguide.diffusion.guided.guided_denoiser` run by an
:class:`~jaxguide.diffusion.ensemble.EnsembleSampler`) -> CF NetCDF/zarr, written atomically.

Video models (T > 1 frames per member) run the same stages on windows: the
observations are placed in frames (``prepare(window=...)``), the run from ``time`` to
``end`` is a chain of windows (:mod:`jaxguide.model.window`), each conditioned per member on
the last frames of the previous one (``window_conditioning``; the conditioning is a
per-member operand of the one compiled program), and the file holds the trajectory.

Compiling: a :class:`~jaxguide.assimilation.session.Session` owns the compiled ensemble
programs of one model, so a series of analyses compiles once; :func:`assimilate`
without a session builds a fresh one (compiles every call).

Modules: :mod:`~jaxguide.assimilation.settings` (the options and the run's inputs),
:mod:`~jaxguide.assimilation.session` (the programs), :mod:`~jaxguide.assimilation.analysis`
(one analysis: checks, observations, summary, file), :mod:`~jaxguide.assimilation.windows`
(the window plan and its runs), :mod:`~jaxguide.assimilation.provenance`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from jaxguide.assimilation.analysis import run_analysis
from jaxguide.assimilation.session import Session
from jaxguide.assimilation.settings import AnalysisInputs
from jaxguide.model.checkpoint import CBottleModel
from jaxguide.model.denoiser import DenoiserModel

logger = logging.getLogger(__name__)


def assimilate(
    model: str | os.PathLike | CBottleModel | DenoiserModel,
    obs: str | os.PathLike | pd.DataFrame,
    out: str | os.PathLike,
    *,
    devices: Sequence[Any] | None = None,
    session: Session | None = None,
    **inputs,
) -> dict[str, Any]:
    """Sample a posterior ensemble for ``time`` given ``obs`` and write it to ``out``.

    Video models (``member_shape[1] = T > 1``, frames ``time_step_hours`` apart) sample
    trajectories: ``time`` is the first frame, ``end`` the last (default: one window,
    ``time + (T-1) step``; it must be a whole number of steps after ``time``,
    :class:`~jaxguide.model.window.WindowError`). A run longer than a window is a chain of
    windows (:func:`jaxguide.model.window.chain`), each conditioned, member by member, on the
    last ``settings.conditioning_frames`` frames of the previous one (as cBottle's video
    autoregression, but for the whole ensemble at once); observations anywhere in
    [time, end] are placed in their frames (``settings.time_matching``) and assimilated in
    the first window that holds them. ``condition``: a NetCDF file (or Dataset) whose
    times on the first window's frames become known frames
    (:func:`jaxguide.assimilation.known_frames.read_known_frames`). The file has dims (member, time,
    pixel) with the frame times.

    Args (``inputs``: the fields of :class:`~jaxguide.assimilation.settings.AnalysisInputs`
    after ``obs`` and ``out``, by keyword; ``time`` required):
      model: converted model directory (``jaxguide convert``), a loaded model, or any
        :class:`~jaxguide.model.denoiser.DenoiserModel`.
      obs: observation table path (CSV/Parquet/NetCDF, see :mod:`jaxguide.observations.table`)
        or a DataFrame; physical units.
      out: ``.nc`` (NetCDF4) or ``.zarr``; written atomically.
      time: analysis time (UTC).
      sst: AMIP SST file, required when the model is SST-conditioned.
      progress: ``progress(stage, done, total)``; stage "analysis" or "prior", counted
        in denoiser calls (times devices and chunks when the members are split). It
        is fed by a host callback in the compiled program (see :class:`~jaxguide.assimilation.session.Session`'s
        ``report_progress``), and JAX does not store programs with host callbacks in
        its persistent compilation cache: pass it only when the cache is off (the CLI
        does so with ``--no-cache``).
      on_event: ``on_event(name, info)`` at each stage of the run, as it happens (also
        logged at INFO): "loading" {model}, "observations" {n_obs, dropped}, "compiling"
        {stage, members, calls} for every stage first (the analysis and prior programs
        compile concurrently; the first run of a configuration compiles, later ones load
        it from JAX's cache), then per stage "sampling" {stage, compile_s: seconds from
        the start of compiling until this stage's program was ready}, for chained video
        runs "window" {stage, index, of, start} before each window, "sampled" {stage,
        seconds}, then "writing" {path}, "written" {path}. Video runs also report
        "observations" with ``per_window`` counts and "known_frames" {times}.
      session: a :class:`Session` for ``model`` whose compiled programs are reused
        (pass the same one to every call of a series); default a fresh one.
    Returns a JSON-friendly summary: observation counts, RMSE at the observations of
    the prior and analysis ensemble means (per variable, physical units), timings:
    ``seconds_compile`` (wall time of compiling both programs, concurrently),
    ``seconds_analysis`` / ``seconds_prior`` (running each), ``seconds_total``.
    """
    run = AnalysisInputs(obs, out, **inputs)
    if session is None:
        if isinstance(model, (str, os.PathLike)):
            logger.info("loading %s", model)
            if run.on_event is not None:
                run.on_event("loading", {"model": str(model)})
        session = Session(model, devices=devices, report_progress=run.progress is not None)
    elif model is not session.source and model is not session.model:
        raise ValueError("session was created for another model: pass the model it holds (session.source)")
    return run_analysis(session, run)
