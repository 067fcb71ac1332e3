"""An analysis as a plan of windows, and running it: the stages (analysis, prior) sampled
window after window with one compiled program each.

An image model's plan is one window (its conditioning and padded observations). A video
model's run from ``time`` to ``end`` is a chain of windows (:func:`jaxguide.model.window.chain`),
each conditioned per member on the last ``conditioning_frames`` frames of the previous one;
every window's observations are padded to one size, so one program serves every window.
"""

from __future__ import annotations

import dataclasses
import os
import time as _time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.assimilation.known_frames import read_known_frames
from jaxguide.assimilation.settings import DIVERGED, AssimilationSettings, denoiser_calls, is_diverged
from jaxguide.diffusion.guidance import Method, Observations
from jaxguide.model.conditioning import KnownFrames, read_amip_sst
from jaxguide.model.window import FrameWindow, WindowError, chain, trajectory_times
from jaxguide.observations.prepare import PreparedObservations, bucket_size, pad, prepare
from jaxguide.observations.operator import build_operator

Event = Callable[..., None]  # event(name, **info)

@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """One window of a run: its frames (None for an image model), its conditioning (a
    pytree, or for video models ``cond(stage, n_members, previous_ensemble)``), its padded
    observations and their count."""

    window: FrameWindow | None
    cond: Any
    obs: Observations
    n_obs: int | None


@dataclasses.dataclass(frozen=True)
class Stage:
    """One ensemble of a run: ``name`` "analysis" (guided by ``method``) or "prior"
    (``method`` None, unguided), its member count and its random keys, one per window
    of the plan (:func:`jaxguide.assimilation.settings.run_keys` of the window's first
    frame)."""

    name: str
    method: Method | None
    members: int
    keys: Sequence[jax.Array]


def trajectory_frames(dm, start: pd.Timestamp, end: pd.Timestamp | None) -> int:
    """Frames of a video run from ``start`` to ``end`` (None: one window), at least one
    window's; :class:`~jaxguide.model.window.WindowError` when ``end`` is before ``start``
    or off the model's time steps."""
    frames = dm.member_shape[1]
    if end is None:
        return frames
    step = float(dm.time_step_hours)
    chain(start, end, time_step_hours=step, length=frames, overlap=0)  # checks the end
    return max(frames, int(round((end - start) / pd.Timedelta(hours=step))) + 1)


def smoother_provenance(tm) -> dict[str, Any]:
    """The provenance entries of a smoother run (a
    :class:`~jaxguide.model.trajectory.TrajectoryModel` ``tm``)."""
    return {"smoother": f"{len(tm.starts)} overlapping windows, {tm.weighting}-weighted",
            "frames_per_window": tm.window_length, "n_windows": len(tm.starts), "smoother_overlap": tm.overlap,
            "smoother_window_starts": ",".join(map(str, tm.starts))}


def plan_windows(dm, table: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp | None,
                 condition: str | os.PathLike | xr.Dataset | None, settings: AssimilationSettings, sst,
                 prep_kw: Mapping[str, Any], event: Event
                 ) -> tuple[list[WindowPlan], PreparedObservations, list[pd.Timestamp], dict[str, Any]]:
    """A video run as a chain of windows: their observations (one padded size for all,
    so one program serves every window) and their conditioning (a function of the
    stage, its member count and the previous window's ensemble). ``end``: the last
    frame (parsed; None = one window). Returns the plan, the whole run's prepared
    observations, the trajectory's times and the run's provenance entries."""
    frames = dm.member_shape[1]
    step = float(dm.time_step_hours)
    overlap = settings.conditioning_frames
    first = FrameWindow(start, step, frames)
    end = first.end if end is None else end
    windows = chain(first.start, end, time_step_hours=step, length=frames, overlap=overlap)
    times = [t for t in trajectory_times(windows, overlap) if t <= end]
    run = FrameWindow(first.start, step, len(times))
    # the whole run's observations (validated once; operator on the trajectory for the summary)
    prepared = prepare(table, dm.channels, dm.center, dm.scale, window=run, time_matching=settings.time_matching,
                       **prep_kw)
    position = prepared.table["frame_position"].to_numpy(np.float64)
    stride = frames - overlap
    which = np.maximum(0, np.ceil((position - (frames - 1)) / stride - 1e-9)).astype(int)
    uncovered = position < which * stride - 1e-9
    if uncovered.any():
        t = prepared.table["time"][uncovered].iloc[0]
        raise WindowError(
            f"{int(uncovered.sum())} observations (e.g. at {t}) fall between two windows that share no frame "
            f"(conditioning_frames 0); give 1 or more conditioning frames (--conditioning-frames) or drop them")
    counts = np.bincount(which, minlength=len(windows))
    size = int(counts.max())
    if settings.pad_observations:
        size = bucket_size(size)
    rows_of = [prepared.table.loc[which == k] for k in range(len(windows))]
    event("observations", n_obs=prepared.n_obs, dropped=dict(prepared.dropped),
          per_window=[int(c) for c in counts])

    sst_data = read_amip_sst(sst) if sst is not None else None
    n_members = max(settings.members, settings.n_prior)
    known0, used = None, []
    if condition is not None:
        known0, used = read_known_frames(condition, first, channels=dm.channels, center=dm.center,
                                         scale=dm.scale, nside=dm.nside, members=n_members)
        event("known_frames", times=[str(t) for t in used])
    npix = dm.member_shape[2]
    plan = []
    for k, (w, rows) in enumerate(zip(windows, rows_of)):
        A = build_operator(rows, dm.channels, nside=dm.nside, method=settings.interpolation, as_numpy=True,
                           frame_position=position[which == k] - k * stride, n_frames=frames)
        obs_k = pad(Observations(A=A, y=rows["value_n"].to_numpy(np.float32),
                                 sigma_y=rows["sigma_n"].to_numpy(np.float32)), size)
        if len(rows):
            obs_k.check()  # value checks on concrete arrays (inside the program they are traced)

        def cond_of(stage, n, previous, w=w, k=k):
            if k == 0:
                known = known0 if known0 is not None else KnownFrames(
                    np.zeros((n_members, len(dm.channels), frames, npix), np.float32), np.zeros(frames, bool))
                known = KnownFrames(known.values[:n], known.keep)
            else:
                keep = np.arange(frames) < overlap
                values = np.zeros((n, len(dm.channels), frames, npix), np.float32)
                values[:, :, :overlap] = previous[:, :, frames - overlap:]
                known = KnownFrames(values, keep)
            return dm.window_conditioning(w, known=known, sst_data=sst_data, sst_offset=settings.sst_offset)

        plan.append(WindowPlan(w, cond_of, obs_k, int(len(rows))))
    extra = {
        "window_start": str(first.start),
        "time_step_hours": step,
        "frames_per_window": frames,
        "conditioning_frames": overlap,
        "n_windows": len(windows),
        "time_interpolation": settings.time_matching,
    }
    if condition is not None:
        extra["condition_file"] = str(condition) if not isinstance(condition, xr.Dataset) else "dataset"
        extra["condition_times"] = ",".join(str(t) for t in used)
    return plan, prepared, times, extra


def run_windows(session, fn: Callable, dm, plan: list[WindowPlan], stages: list[Stage],
                settings: AssimilationSettings, *, n_times: int,
                progress: Callable[[str, int, int], None] | None, event: Event
                ) -> tuple[list[tuple[np.ndarray, float]], float]:
    """Compile every stage's program (concurrently), then sample each stage window after
    window, each later window conditioned on the previous one's ensemble.

    session: the :class:`~jaxguide.assimilation.session.Session` whose programs, devices
    and progress reports are used; fn: its guided function of ``dm``. Returns per stage
    (its ensemble (M, C, n_times, npix) normalised, net order; seconds sampling) and the
    seconds compiling.
    """
    video = dm.member_shape[1] > 1
    devs = session.devices
    per_run = denoiser_calls(settings)
    per_member = (False, True, False, False) if video else None

    def runs_of(n_members: int) -> int:
        # host callbacks: once per denoiser evaluation, on every device and for every chunk
        per_device = -(-n_members // len(devs))
        return len(devs) * (1 if settings.chunk_size is None else -(-per_device // settings.chunk_size))

    def call_of(stage_index: int, k: int, known):
        st = stages[stage_index]
        w = plan[k]
        cond = w.cond if not video else w.cond(st.name, st.members, known)
        return session.programs.prepare(
            fn, st.keys[k], dm.member_shape, st.members,
            sampler_kwargs=settings.sampler_kwargs(), devices=devs, chunk_size=settings.chunk_size,
            operands=(dm.params, cond, st.method, None if st.method is None else w.obs), per_member=per_member)

    first_calls = [call_of(i, 0, None) for i in range(len(stages))]
    # both programs compile at once (XLA runs without the GIL in worker threads): on
    # 2 cores the pair takes about as long as the larger one alone; every later
    # window has the same shapes and runs these programs
    for st in stages:
        event("compiling", stage=st.name, members=st.members, calls=per_run * runs_of(st.members) * len(plan))
    t0 = _time.perf_counter()
    compile_s = session.programs.compile_many(first_calls)
    seconds_compile = _time.perf_counter() - t0

    def run(stage_index: int) -> tuple[np.ndarray, float]:
        stage, n_members = stages[stage_index].name, stages[stage_index].members
        total = per_run * runs_of(n_members) * len(plan)
        done = [0]

        def count(k):
            done[0] = min(done[0] + k, total)
            if progress is not None:
                progress(stage, done[0], total)

        event("sampling", stage=stage, compile_s=round(compile_s[stage_index], 2))
        t0 = _time.perf_counter()
        pieces, previous = [], None
        with session.reporting_to(count):
            for k in range(len(plan)):
                if video and len(plan) > 1:
                    event("window", stage=stage, index=k, of=len(plan), start=plan[k].window.start.isoformat())
                call = first_calls[stage_index] if k == 0 else call_of(stage_index, k, previous)
                ens = np.asarray(jax.block_until_ready(session.programs.run(call)))
                jax.effects_barrier()
                if is_diverged(ens):
                    finite = bool(np.all(np.isfinite(ens)))
                    what = "non-finite values" if not finite else (
                        f"values {float(np.max(np.abs(ens))):.3g} climatological scales from the mean")
                    where = f" in window {k + 1} of {len(plan)}" if len(plan) > 1 else ""
                    raise FloatingPointError(
                        f"the {stage} ensemble diverged{where}: {what} (method {settings.method_name!r}, guidance "
                        f"scale {settings.guidance_scale}; the sampler stops at the first denoiser call that leaves "
                        f"{DIVERGED:g} scales); lower --guidance-scale or use --method mmps/sda")
                pieces.append(ens if k == 0 else ens[:, :, settings.conditioning_frames:])
                previous = ens
        if progress is not None and not session.report_progress:
            progress(stage, total, total)  # no per-call reports: the stage's end
        seconds = _time.perf_counter() - t0
        event("sampled", stage=stage, seconds=round(seconds, 2))
        return np.concatenate(pieces, axis=2)[:, :, :n_times], seconds

    return [run(i) for i in range(len(stages))], seconds_compile
