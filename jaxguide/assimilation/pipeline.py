"""Assimilation end to end: model + observations + time -> analysis ensemble on disk.

This is what ``jaxguide assimilate`` runs, as orchestration only: the stages live in
their modules, a Python user composes them the same way.

Stages: the model (a converted cBottle directory, a loaded
:class:`~jaxguide.model.checkpoint.CBottleModel` or any :class:`~jaxguide.model.denoiser.DenoiserModel`,
e.g. :class:`~jaxguide.model.gaussian.GaussianModel`) -> the observation table, validated,
normalised, located and padded (:func:`jaxguide.observations.table.prepare`) -> the model's
conditioning for the analysis time (calendar, AMIP SST: ``model.conditioning``) -> the
guidance method (:mod:`jaxguide.diffusion.guidance`, from the settings) -> the guided ensemble and
the unguided prior ensemble (:func:`jaxguide.diffusion.guided.guided_denoiser` run by an
:class:`~jaxguide.diffusion.ensemble.EnsembleSampler`) -> CF NetCDF/zarr, written atomically.

Video models (T > 1 frames per member) run the same stages on windows: the
observations are placed in frames (``prepare(window=...)``), the run from ``time`` to
``end`` is a chain of windows (:mod:`jaxguide.model.window`), each conditioned per member on
the last frames of the previous one (``window_conditioning``; the conditioning is a
per-member operand of the one compiled program), and the file holds the trajectory.

Compiling: a :class:`Session` owns the compiled ensemble programs of one model; its
calls pass parameters, conditioning, method hyperparameters and observations as
arguments, and observation counts are padded to a power of two
(:func:`jaxguide.observations.table.bucket_size`), so a series of analyses (new times, new
observations, a count in the same bucket, a new ``guidance_scale``) compiles once.
:func:`assimilate` without a session builds a fresh one (compiles every call).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time as _time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.diffusion import guidance

from jaxguide.model import units
from jaxguide.model.denoiser import CBottleDenoiser, DenoiserModel, check_model
from jaxguide.diffusion.ensemble import EnsembleSampler, resolve_devices
from jaxguide.diffusion.guided import guided_denoiser
from jaxguide.grid.latlon import LatLonGrid
from jaxguide.io.files import check_writable_dir, write_dataset
from jaxguide.model.checkpoint import CBottleModel, load_model
from jaxguide.model.conditioning import KnownFrames
from jaxguide.model.sst import read_amip_sst
from jaxguide.diffusion.guidance import Observations
from jaxguide.assimilation.known_frames import read_known_frames
from jaxguide.observations.table import (PreparedObservations, bucket_size, build_operator, pad, parse_time, prepare,
                                   read_observations)
from jaxguide.assimilation.dataset import analysis_to_dataset, describe_sigma_y
from jaxguide.model.window import FrameWindow, WindowError, chain, trajectory_times

logger = logging.getLogger(__name__)

# cBottle's sampler defaults (CBottle3d): 18 Heun steps from sigma 200 down to 0.02.
CBOTTLE_SAMPLER = {"num_steps": 18, "sigma_min": 0.02, "sigma_max": 200.0, "rho": 7.0}


@dataclasses.dataclass(frozen=True)
class AssimilationSettings:
    """Options of one assimilation run (defaults: MMPS, cBottle's sampler).

    method: a method name (:data:`jaxguide.diffusion.guidance.METHODS`), configured by the
      options below, or a :mod:`jaxguide.diffusion.guidance` method object (then those options
      must stay at their defaults: the object carries its own).
    sigma_y: observation-error std override in physical units, one value for every
      observation or a mapping variable -> value; None keeps the table's ``sigma``.
    guidance_scale: multiplies the guidance step of every method but replacement
      (1 = the method as derived; regression is usually stable only far below 1).
    cg_iters, solver: MMPS solver iterations (cost: cg_iters + 1 VJPs per denoiser
      call; None = the method's default, 3) and ``"cg"`` / ``"gmres"``.
    gamma: SDA's V_t = gamma sigma^2 (None = its default 1e-2).
    norm_matching: regression's step rescaled to the score's norm.
    window_hours: observations within +- this many hours of the analysis time are
      assimilated; rows outside it (and any other bad row) are an error unless
      ``drop_bad`` (then they are dropped and counted in the summary).
    prior_members: size of the unguided ensemble used for the prior observation RMSE
      and the stored prior mean; 0 skips it.
    bf16: evaluate the cBottle network in bfloat16 (guidance algebra stays float32).
    remat: recompute each U-Net block in the guidance VJPs instead of keeping its
      activations (``layers.call_block``; cBottle models): peak memory of a guided step
      ~1/3 (see benchmarks/remat_memory.py) for ~1 extra network forward per VJP.
    check_plausibility: refuse observations more than 8 climatological scales from the
      model's center (a unit mistake; see ``observations.check_plausible``).
    pad_observations: pad observation counts to :func:`~jaxguide.observations.table.bucket_size`
      (one compiled program for all counts in a bucket; padding rows change nothing).
    conditioning_frames: video models: frames each chained window takes from the end of
      the previous one (cBottle's ``VideoAutoregression.step_forward``; 0 = independent
      windows).
    time_matching: video models: ``"linear"`` interpolates an observation between two
      frames linearly in time; ``"exact"`` refuses it (``ObservationTimeError``).
    """

    method: str | guidance.Method = "mmps"
    members: int = 8
    steps: int = CBOTTLE_SAMPLER["num_steps"]
    sigma_min: float = CBOTTLE_SAMPLER["sigma_min"]
    sigma_max: float = CBOTTLE_SAMPLER["sigma_max"]
    rho: float = CBOTTLE_SAMPLER["rho"]
    seed: int = 0
    sigma_y: float | Mapping[str, float] | None = None
    guidance_scale: float = 1.0
    cg_iters: int | None = None
    solver: str | None = None
    gamma: float | None = None
    norm_matching: bool = False
    label: str = "era5"
    interpolation: str = "bilinear"
    window_hours: float = 3.0
    drop_bad: bool = False
    prior_members: int | None = None  # None: same as members
    bf16: bool = False
    remat: bool = False
    chunk_size: int | None = None
    sst_offset: float = 0.0
    pad_observations: bool = True
    check_plausibility: bool = True
    conditioning_frames: int = 1
    time_matching: str = "linear"

    def check(self) -> None:
        self.guidance_method()  # names, options and their values
        if self.members < 1:
            raise ValueError(f"members must be >= 1, got {self.members}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2, got {self.steps}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not self.guidance_scale >= 0 or not np.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be finite and >= 0, got {self.guidance_scale}")
        if self.window_hours < 0:
            raise ValueError(f"window_hours must be >= 0, got {self.window_hours}")
        if self.interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"unknown interpolation {self.interpolation!r}; expected 'bilinear' or 'nearest'")
        if self.prior_members is not None and self.prior_members < 0:
            raise ValueError(f"prior_members must be >= 0, got {self.prior_members}")
        if self.conditioning_frames < 0:
            raise ValueError(f"conditioning_frames must be >= 0, got {self.conditioning_frames}")
        if self.time_matching not in ("linear", "exact"):
            raise ValueError(f"unknown time matching {self.time_matching!r}; expected 'linear' or 'exact'")

    @property
    def method_name(self) -> str:
        return self.method if isinstance(self.method, str) else type(self.method).name

    @property
    def n_prior(self) -> int:
        return self.members if self.prior_members is None else self.prior_members

    def sampler_kwargs(self) -> dict[str, Any]:
        return {"num_steps": self.steps, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho}

    def guidance_method(self) -> guidance.Method:
        """The method object; an option the method does not have is an error
        (:class:`~jaxguide.diffusion.guidance.GuidanceInputError`), not silently ignored."""
        given = {"cg_iters": self.cg_iters, "solver": self.solver, "gamma": self.gamma,
                 "norm_matching": self.norm_matching or None}
        given = {k: v for k, v in given.items() if v is not None}
        if isinstance(self.method, guidance.Method):
            if given or self.guidance_scale != 1.0:
                raise guidance.GuidanceInputError(
                    f"settings options {sorted(given) + (['guidance_scale'] if self.guidance_scale != 1.0 else [])} "
                    "do not apply to a method object; set them on the object")
            self.method.check()
            return self.method
        if self.method != "replacement":
            given["scale"] = self.guidance_scale
        return guidance.make(self.method, **given)


def utc_naive(t) -> pd.Timestamp:
    """A timestamp in UTC without timezone (naive input is taken as UTC); text must be
    ISO 8601 (``observations.parse_time``)."""
    return parse_time(t, "analysis time")


def denoiser_calls(settings: AssimilationSettings) -> int:
    """Denoiser evaluations per trajectory: Heun's 2 per step but the last."""
    return 2 * settings.steps - 1


# --------------------------------------------------------------------------------------
# summaries


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
    return "zarr" if path.suffix == ".zarr" else "netcdf"


# --------------------------------------------------------------------------------------
# the whole run


def as_denoiser_model(model, *, label: str = "era5", bf16: bool = False, remat: bool = False) -> DenoiserModel:
    """A converted model directory, a :class:`CBottleModel` or a :class:`DenoiserModel`."""
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if isinstance(model, CBottleModel):
        return CBottleDenoiser(model, label, jnp.bfloat16 if bf16 else jnp.float32, remat)
    check_model(model)
    for flag, on in (("bf16", bf16), ("remat", remat)):
        if on:
            logger.warning("%s applies to cBottle models only; %s runs as it is", flag, type(model).__name__)
    return model


class Session:
    """One model and its compiled ensemble programs, reused by every :meth:`assimilate`.

    ``model``: as :func:`as_denoiser_model` takes it (loaded once). The programs (one per
    method configuration, member count, sampler settings, devices, chunking) and the
    model live as long as this object; nothing is cached module-wide.

    ``report_progress``: the programs call back to the host at every denoiser evaluation,
    so that ``progress`` of :meth:`assimilate` counts them as they run. JAX's persistent
    compilation cache does not store programs with host callbacks: with the cache on
    (the CLI's default), make the session with ``report_progress=False``; ``progress``
    then only hears each stage's end. Fixed per session, so passing ``progress`` or not
    never changes (or recompiles) a program.
    """

    def __init__(self, model, *, devices: Sequence[Any] | None = None, report_progress: bool = True):
        self.source = model
        self.report_progress = bool(report_progress)
        self._model = load_model(model) if isinstance(model, (str, os.PathLike)) else model
        self.devices = resolve_devices(devices)
        self.programs = EnsembleSampler()
        self._fns: dict[tuple, tuple[DenoiserModel, Callable]] = {}
        self._progress: Callable[[int], None] | None = None

    def _on_call(self, _sigma) -> None:
        # the compiled programs call this stable method; the current run's counter is swapped in
        if self._progress is not None:
            self._progress(1)

    def model_for(self, settings: AssimilationSettings) -> tuple[DenoiserModel, Callable]:
        """The denoiser model and its guided function (built once per label / dtype / remat)."""
        key = (settings.label, settings.bf16, settings.remat)
        if key not in self._fns:
            dm = as_denoiser_model(self._model, label=settings.label, bf16=settings.bf16, remat=settings.remat)
            self._fns[key] = (dm, guided_denoiser(dm, on_call=self._on_call if self.report_progress else None))
        return self._fns[key]

    def assimilate(
        self,
        obs: str | os.PathLike | pd.DataFrame,
        out: str | os.PathLike,
        *,
        time,
        settings: AssimilationSettings = AssimilationSettings(),
        sst: str | os.PathLike | None = None,
        regrid: LatLonGrid | None = None,
        overwrite: bool = False,
        command: str = "jaxguide.assimilation.pipeline.assimilate",
        progress: Callable[[str, int, int], None] | None = None,
        on_event: Callable[[str, Mapping[str, Any]], None] | None = None,
        end=None,
        condition: str | os.PathLike | xr.Dataset | None = None,
    ) -> dict[str, Any]:
        """See :func:`assimilate`."""
        t_start = _time.perf_counter()
        settings.check()
        method = settings.guidance_method()
        time = utc_naive(time)
        out = Path(out)
        _check_output(out, overwrite)

        def event(name: str, **info) -> None:
            logger.info("%s %s", name, info)
            if on_event is not None:
                on_event(name, info)

        dm, fn = self.model_for(settings)
        video = dm.member_shape[1] > 1
        if not video and (end is not None or condition is not None):
            raise ValueError("end (--end) and condition (--condition) are for video models (time_length > 1); "
                             "this model samples one time: run one analysis per time (--times) instead")
        defaults = AssimilationSettings()
        if not video and (settings.time_matching != defaults.time_matching
                          or settings.conditioning_frames != defaults.conditioning_frames):
            raise ValueError("time_matching (--time-matching) and conditioning_frames (--conditioning-frames) are for "
                             "video models (time_length > 1); this model samples one time")
        if video and settings.window_hours != defaults.window_hours:
            raise ValueError("window_hours (--window-hours) is for single-time models; a video run assimilates every "
                             "observation between its first frame (--time) and its last (--end)")
        table = obs if isinstance(obs, pd.DataFrame) else read_observations(obs)
        prep_kw = dict(drop_bad=settings.drop_bad, sigma_y=settings.sigma_y, nside=dm.nside,
                       interpolation=settings.interpolation, check_plausibility=settings.check_plausibility)
        if not video:
            prepared = prepare(table, dm.channels, dm.center, dm.scale, time=time, window_hours=settings.window_hours,
                               pad_to="bucket" if settings.pad_observations else None, **prep_kw)
            prepared.obs.check()  # value checks on concrete arrays (inside the program they are traced)
            event("observations", n_obs=prepared.n_obs, dropped=dict(prepared.dropped))
            cond = dm.conditioning(time, sst_path=sst, sst_offset=settings.sst_offset)
            plan = [_WindowPlan(None, cond, prepared.obs, None)]
            times = [time]
            extra: dict[str, Any] = {}
        else:
            plan, prepared, times, extra = self._plan_windows(dm, table, time, end, condition, settings, sst, prep_kw,
                                                              event)

        key_analysis, key_prior = jax.random.split(jax.random.key(settings.seed))
        stages = [("analysis", method, settings.members, key_analysis)]
        if settings.n_prior > 0:
            stages.append(("prior", None, settings.n_prior, key_prior))
        devs = self.devices
        per_run = denoiser_calls(settings)
        per_member = (False, True, False, False) if video else None

        def runs_of(n_members: int) -> int:
            # host callbacks: once per denoiser evaluation, on every device and for every chunk
            per_device = -(-n_members // len(devs))
            return len(devs) * (1 if settings.chunk_size is None else -(-per_device // settings.chunk_size))

        def call_of(stage_index: int, k: int, known):
            stage, m, n, key = stages[stage_index]
            w = plan[k]
            cond = w.cond if not video else w.cond(stage, n, known)
            return self.programs.prepare(
                fn, key if k == 0 else jax.random.fold_in(key, k), dm.member_shape, n,
                sampler_kwargs=settings.sampler_kwargs(), devices=devs, chunk_size=settings.chunk_size,
                operands=(dm.params, cond, m, None if m is None else w.obs), per_member=per_member)

        first_calls = [call_of(i, 0, None) for i in range(len(stages))]
        # both programs compile at once (XLA runs without the GIL in worker threads): on
        # 2 cores the pair takes about as long as the larger one alone; every later
        # window has the same shapes and runs these programs
        for stage, _, n, _ in stages:
            event("compiling", stage=stage, members=n, calls=per_run * runs_of(n) * len(plan))
        t0 = _time.perf_counter()
        compile_s = self.programs.compile_many(first_calls)
        seconds_compile = _time.perf_counter() - t0

        def run(stage_index: int) -> tuple[np.ndarray, float]:
            stage, _, n_members, _ = stages[stage_index]
            total = per_run * runs_of(n_members) * len(plan)
            done = [0]

            def count(k):
                done[0] = min(done[0] + k, total)
                if progress is not None:
                    progress(stage, done[0], total)

            self._progress = count
            event("sampling", stage=stage, compile_s=round(compile_s[stage_index], 2))
            t0 = _time.perf_counter()
            pieces, previous = [], None
            try:
                for k in range(len(plan)):
                    if video and len(plan) > 1:
                        event("window", stage=stage, index=k, of=len(plan), start=plan[k].window.start.isoformat())
                    call = first_calls[stage_index] if k == 0 else call_of(stage_index, k, previous)
                    ens = np.asarray(jax.block_until_ready(self.programs.run(call)))
                    jax.effects_barrier()
                    if not bool(np.all(np.isfinite(ens))):
                        raise FloatingPointError(
                            f"the {stage} ensemble has non-finite values (method {settings.method_name!r}, guidance "
                            f"scale {settings.guidance_scale}); lower --guidance-scale or use --method mmps/sda")
                    pieces.append(ens if k == 0 else ens[:, :, settings.conditioning_frames:])
                    previous = ens
            finally:
                self._progress = None
            if progress is not None and not self.report_progress:
                progress(stage, total, total)  # no per-call reports: the stage's end
            seconds = _time.perf_counter() - t0
            event("sampled", stage=stage, seconds=round(seconds, 2))
            return np.concatenate(pieces, axis=2)[:, :, :len(times)], seconds

        analysis, t_analysis = run(0)
        prior, t_prior = None, 0.0
        if settings.n_prior > 0:
            prior, t_prior = run(1)

        summary: dict[str, Any] = {
            "output": str(out),
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
        provenance = run_provenance(settings, dm, command, n_obs=prepared.n_obs,
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
            regrid_latlon=regrid,
        )
        event("writing", path=str(out))
        write_dataset(ds, out, format=output_format(out), overwrite=overwrite)
        event("written", path=str(out))
        summary["seconds_total"] = _time.perf_counter() - t_start
        return summary

    def _plan_windows(self, dm, table, start, end, condition, settings, sst, prep_kw, event):
        """A video run as a chain of windows: their observations (one padded size for all,
        so one program serves every window) and their conditioning (a function of the
        stage, its member count and the previous window's ensemble)."""
        frames = dm.member_shape[1]
        step = float(dm.time_step_hours)
        overlap = settings.conditioning_frames
        first = FrameWindow(start, step, frames)
        end = first.end if end is None else utc_naive(end)
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

            plan.append(_WindowPlan(w, cond_of, obs_k, int(len(rows))))
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


@dataclasses.dataclass(frozen=True)
class _WindowPlan:
    """One window of a run: its frames (None for an image model), its conditioning (a
    pytree, or for video models ``cond(stage, n_members, previous_ensemble)``), its padded
    observations and their count."""

    window: FrameWindow | None
    cond: Any
    obs: Observations
    n_obs: int | None


def assimilate(
    model: str | os.PathLike | CBottleModel | DenoiserModel,
    obs: str | os.PathLike | pd.DataFrame,
    out: str | os.PathLike,
    *,
    time,
    settings: AssimilationSettings = AssimilationSettings(),
    sst: str | os.PathLike | None = None,
    regrid: LatLonGrid | None = None,
    overwrite: bool = False,
    command: str = "jaxguide.assimilation.pipeline.assimilate",
    progress: Callable[[str, int, int], None] | None = None,
    devices: Sequence[Any] | None = None,
    session: Session | None = None,
    on_event: Callable[[str, Mapping[str, Any]], None] | None = None,
    end=None,
    condition: str | os.PathLike | xr.Dataset | None = None,
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

    Args:
      model: converted model directory (``jaxguide convert``), a loaded model, or any
        :class:`~jaxguide.model.denoiser.DenoiserModel`.
      obs: observation table path (CSV/Parquet/NetCDF, see :mod:`jaxguide.observations.table`)
        or a DataFrame; physical units.
      out: ``.nc`` (NetCDF4) or ``.zarr``; written atomically.
      time: analysis time (UTC).
      sst: AMIP SST file, required when the model is SST-conditioned.
      progress: ``progress(stage, done, total)``; stage "analysis" or "prior", counted
        in denoiser calls (times devices and chunks when the members are split). It
        is fed by a host callback in the compiled program (see :class:`Session`'s
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
    if session is None:
        if isinstance(model, (str, os.PathLike)):
            logger.info("loading %s", model)
            if on_event is not None:
                on_event("loading", {"model": str(model)})
        session = Session(model, devices=devices, report_progress=progress is not None)
    elif model is not session.source and model is not session._model:
        raise ValueError("session was created for another model: pass the model it holds (session.source)")
    return session.assimilate(obs, out, time=time, settings=settings, sst=sst, regrid=regrid,
                              overwrite=overwrite, command=command, progress=progress, on_event=on_event,
                              end=end, condition=condition)


def run_provenance(settings: AssimilationSettings, model, command: str, **specific) -> dict[str, Any]:
    """The provenance attributes of an analysis (method and its options, sigma_y, sampler,
    seed, model checksum, command), plus the run's ``specific`` entries."""
    method = settings.guidance_method()
    prov = {
        "method": settings.method_name,
        "sigma_y": describe_sigma_y(settings.sigma_y),
        "guidance_scale": float(np.asarray(getattr(method, "scale", 1.0))),
        "steps": settings.steps,
        "seed": settings.seed,
        "model_sha256": _model_sha256(model),
        "command": command,
        "sigma_min": settings.sigma_min,
        "sigma_max": settings.sigma_max,
        "label": settings.label,
        "observation_window_hours": settings.window_hours,
        "observation_operator": settings.interpolation,  # jaxguide evaluate samples with the same scheme
        **specific,
    }
    for k, v in method.options().items():
        if k != "scale":
            prov[k] = str(v).lower() if isinstance(v, bool) else v
    if settings.bf16:
        prov["network_dtype"] = "bfloat16"
    return prov


def _model_sha256(model) -> str:
    """sha256 of the source checkpoint(s) the model was converted from (comma separated)."""
    sources = (getattr(model, "metadata", None) or {}).get("sources", [])
    return ",".join(s["sha256"] for s in sources) if sources else "unknown"
