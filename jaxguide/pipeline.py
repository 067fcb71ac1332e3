"""Assimilation end to end: model + observations + time -> analysis ensemble on disk.

This is what ``jaxguide assimilate`` runs, as orchestration only: the stages live in
their modules, a Python user composes them the same way.

Stages: the model (a converted cBottle directory, a loaded
:class:`~jaxguide.model.CBottleModel` or any :class:`~jaxguide.denoiser.DenoiserModel`,
e.g. :class:`~jaxguide.gaussian.GaussianModel`) -> the observation table, validated,
normalised, located and padded (:func:`jaxguide.observations.prepare`) -> the model's
conditioning for the analysis time (calendar, AMIP SST: ``model.conditioning``) -> the
guidance method (:mod:`jaxguide.guidance`, from the settings) -> the guided ensemble and
the unguided prior ensemble (:func:`jaxguide.guided.guided_denoiser` run by an
:class:`~jaxguide.ensemble.EnsembleSampler`) -> CF NetCDF/zarr, written atomically.

Compiling: a :class:`Session` owns the compiled ensemble programs of one model; its
calls pass parameters, conditioning, method hyperparameters and observations as
arguments, and observation counts are padded to a power of two
(:func:`jaxguide.observations.bucket_size`), so a series of analyses (new times, new
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

from jaxguide import guidance, units
from jaxguide.denoiser import CBottleDenoiser, DenoiserModel, check_model
from jaxguide.ensemble import EnsembleSampler, resolve_devices
from jaxguide.guided import guided_denoiser
from jaxguide.grid_sampling import LatLonGrid
from jaxguide.io import check_writable_dir, write_dataset
from jaxguide.model import CBottleModel, load_model
from jaxguide.observations import PreparedObservations, parse_time, prepare, read_observations
from jaxguide.schema import analysis_to_dataset, describe_sigma_y

logger = logging.getLogger(__name__)

# cBottle's sampler defaults (CBottle3d): 18 Heun steps from sigma 200 down to 0.02.
CBOTTLE_SAMPLER = {"num_steps": 18, "sigma_min": 0.02, "sigma_max": 200.0, "rho": 7.0}


@dataclasses.dataclass(frozen=True)
class AssimilationSettings:
    """Options of one assimilation run (defaults: MMPS, cBottle's sampler).

    method: a method name (:data:`jaxguide.guidance.METHODS`), configured by the
      options below, or a :mod:`jaxguide.guidance` method object (then those options
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
      activations (``network.call_block``; cBottle models): peak memory of a guided step
      ~1/3 (see benchmarks/remat_memory.py) for ~1 extra network forward per VJP.
    check_plausibility: refuse observations more than 8 climatological scales from the
      model's center (a unit mistake; see ``observations.check_plausible``).
    pad_observations: pad observation counts to :func:`~jaxguide.observations.bucket_size`
      (one compiled program for all counts in a bucket; padding rows change nothing).
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
        (:class:`~jaxguide.guidance.GuidanceInputError`), not silently ignored."""
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
        command: str = "jaxguide.pipeline.assimilate",
        progress: Callable[[str, int, int], None] | None = None,
        on_event: Callable[[str, Mapping[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """See :func:`assimilate`."""
        t_start = _time.perf_counter()
        settings.check()
        method = settings.guidance_method()
        time = utc_naive(time)
        out = Path(out)
        fmt = output_format(out)
        _check_output(out, overwrite)

        def event(name: str, **info) -> None:
            logger.info("%s %s", name, info)
            if on_event is not None:
                on_event(name, info)

        dm, fn = self.model_for(settings)
        table = obs if isinstance(obs, pd.DataFrame) else read_observations(obs)
        prepared = prepare(
            table, dm.channels, dm.center, dm.scale, time=time, window_hours=settings.window_hours,
            drop_bad=settings.drop_bad, sigma_y=settings.sigma_y, nside=dm.nside,
            interpolation=settings.interpolation, pad_to="bucket" if settings.pad_observations else None,
            check_plausibility=settings.check_plausibility,
        )
        prepared.obs.check()  # value checks on concrete arrays (inside the program they are traced)
        event("observations", n_obs=prepared.n_obs, dropped=dict(prepared.dropped))
        cond = dm.conditioning(time, sst_path=sst, sst_offset=settings.sst_offset)
        devs = self.devices

        key_analysis, key_prior = jax.random.split(jax.random.key(settings.seed))
        stages = [("analysis", method, settings.members, key_analysis)]
        if settings.n_prior > 0:
            stages.append(("prior", None, settings.n_prior, key_prior))
        per_run = denoiser_calls(settings)

        def runs_of(n_members: int) -> int:
            # host callbacks: once per denoiser evaluation, on every device and for every chunk
            per_device = -(-n_members // len(devs))
            return len(devs) * (1 if settings.chunk_size is None else -(-per_device // settings.chunk_size))

        calls = [
            self.programs.prepare(fn, key, dm.member_shape, n, sampler_kwargs=settings.sampler_kwargs(), devices=devs,
                                  chunk_size=settings.chunk_size,
                                  operands=(dm.params, cond, m, None if m is None else prepared.obs))
            for _, m, n, key in stages
        ]
        # both programs compile at once (XLA runs without the GIL in worker threads): on
        # 2 cores the pair takes about as long as the larger one alone
        for stage, _, n, _ in stages:
            event("compiling", stage=stage, members=n, calls=per_run * runs_of(n))
        t0 = _time.perf_counter()
        compile_s = self.programs.compile_many(calls)
        seconds_compile = _time.perf_counter() - t0

        def run(call, stage, n_members, c_s):
            total = per_run * runs_of(n_members)
            done = [0]

            def count(k):
                done[0] = min(done[0] + k, total)
                if progress is not None:
                    progress(stage, done[0], total)

            self._progress = count
            event("sampling", stage=stage, compile_s=round(c_s, 2))
            t0 = _time.perf_counter()
            try:
                ens = jax.block_until_ready(self.programs.run(call))
                jax.effects_barrier()
            finally:
                self._progress = None
            if not bool(np.all(np.isfinite(np.asarray(ens)))):
                raise FloatingPointError(
                    f"the {stage} ensemble has non-finite values (method {settings.method_name!r}, guidance scale "
                    f"{settings.guidance_scale}); lower --guidance-scale or use --method mmps/sda"
                )
            if progress is not None and not self.report_progress:
                progress(stage, total, total)  # no per-call reports: the stage's end
            seconds = _time.perf_counter() - t0
            event("sampled", stage=stage, seconds=round(seconds, 2))
            return ens, seconds

        analysis, t_analysis = run(calls[0], "analysis", settings.members, compile_s[0])
        prior, t_prior = None, 0.0
        if settings.n_prior > 0:
            prior, t_prior = run(calls[1], "prior", settings.n_prior, compile_s[1])

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
        provenance = run_provenance(settings, dm, command, n_obs=prepared.n_obs,
                                    observations_dropped=sum(prepared.dropped.values()))
        ds = analysis_to_dataset(
            np.asarray(analysis),
            channels=list(dm.channels),
            center=dm.center,
            scale=dm.scale,
            times=[time],
            provenance=provenance,
            prior=None if prior is None else np.asarray(prior),
            regrid_latlon=regrid,
        )
        event("writing", path=str(out))
        write_dataset(ds, out, format=fmt, overwrite=overwrite)
        event("written", path=str(out))
        summary["seconds_total"] = _time.perf_counter() - t_start
        return summary


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
    command: str = "jaxguide.pipeline.assimilate",
    progress: Callable[[str, int, int], None] | None = None,
    devices: Sequence[Any] | None = None,
    session: Session | None = None,
    on_event: Callable[[str, Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Sample a posterior ensemble for ``time`` given ``obs`` and write it to ``out``.

    Args:
      model: converted model directory (``jaxguide convert``), a loaded model, or any
        :class:`~jaxguide.denoiser.DenoiserModel`.
      obs: observation table path (CSV/Parquet/NetCDF, see :mod:`jaxguide.observations`)
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
        the start of compiling until this stage's program was ready}, "sampled" {stage,
        seconds}, then "writing" {path}, "written" {path}.
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
                              overwrite=overwrite, command=command, progress=progress, on_event=on_event)


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
