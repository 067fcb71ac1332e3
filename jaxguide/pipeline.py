"""Assimilation end to end: model + observations + time -> analysis ensemble on disk.

This is what ``jaxguide assimilate`` runs. Each stage is a small function so that a
Python user can take the pieces (``observation_inputs``, ``conditioning_for``,
``guided_denoiser_fn``, ``observation_rmse``) and compose them differently, e.g. to jit
and reuse one compiled ensemble program across many times.

Stages: load the converted model -> read and validate the observation table (named
errors, nothing silently dropped) -> normalise it with the checkpoint's center/scale and
build the point operator ``A`` -> conditioning for the analysis time (calendar, AMIP SST,
dataset label) -> guided denoiser (any method of :mod:`jaxguide.guidance`) -> ensemble
(one jitted, vmapped program; sharded over devices when there are several) -> prior
(unguided) ensemble for the summary and the increment -> CF NetCDF/zarr, written
atomically.
"""

from __future__ import annotations

import contextlib
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

from jaxguide import guidance
from jaxguide.conditioning import calendar_inputs, read_amip_sst, sst_at
from jaxguide.denoiser import make_denoiser
from jaxguide.ensemble import resolve_devices, sample_ensemble
from jaxguide.grid_sampling import LatLonGrid
from jaxguide.io import check_writable_dir, write_dataset
from jaxguide.model import CBottleModel, load_model
from jaxguide.network import NPIX, NSIDE
from jaxguide.schema import analysis_to_dataset, describe_sigma_y
from jaxguide.observations import (
    PointObservationOperator,
    build_operator,
    check_plausible,
    normalise,
    parse_time,
    read_observations,
    validate_observations,
)

logger = logging.getLogger(__name__)

# cBottle's sampler defaults (CBottle3d): 18 Heun steps from sigma 200 down to 0.02.
CBOTTLE_SAMPLER = {"num_steps": 18, "sigma_min": 0.02, "sigma_max": 200.0, "rho": 7.0}


@dataclasses.dataclass(frozen=True)
class AssimilationSettings:
    """Options of one assimilation run (defaults: MMPS, cBottle's sampler).

    sigma_y: observation-error std override in physical units, one value for every
      observation or a mapping variable -> value; None keeps the table's ``sigma``.
    guidance_scale: multiplies the guidance step of every method (1 = the method as
      derived; the seed's regression guidance is usually stable only far below 1).
    cg_iters: MMPS solver iterations (cost: cg_iters + 1 VJPs per denoiser call).
    window_hours: observations within +- this many hours of the analysis time are
      assimilated; rows outside it (and any other bad row) are an error unless
      ``drop_bad`` (then they are dropped and counted in the summary).
    prior_members: size of the unguided ensemble used for the prior observation RMSE
      and the stored prior mean; 0 skips it.
    bf16: evaluate the network in bfloat16 (guidance algebra stays float32).
    remat: recompute each U-Net block in the guidance VJPs instead of keeping its
      activations (``network.call_block``): peak memory of a guided step ~1/3 (see
      benchmarks/remat_memory.py) for ~1 extra network forward per VJP.
    check_plausibility: refuse observations more than 8 climatological scales from the
      model's center (a unit mistake; see ``observations.check_plausible``).
    """

    method: str = "mmps"
    members: int = 8
    steps: int = CBOTTLE_SAMPLER["num_steps"]
    sigma_min: float = CBOTTLE_SAMPLER["sigma_min"]
    sigma_max: float = CBOTTLE_SAMPLER["sigma_max"]
    rho: float = CBOTTLE_SAMPLER["rho"]
    seed: int = 0
    sigma_y: float | Mapping[str, float] | None = None
    guidance_scale: float = 1.0
    cg_iters: int = 3
    label: str = "era5"
    interpolation: str = "bilinear"
    window_hours: float = 3.0
    drop_bad: bool = False
    prior_members: int | None = None  # None: same as members
    bf16: bool = False
    remat: bool = False
    chunk_size: int | None = None
    sst_offset: float = 0.0
    check_plausibility: bool = True

    def check(self) -> None:
        if self.method not in guidance.METHODS:
            raise guidance.GuidanceInputError(
                f"unknown guidance method {self.method!r}; valid: {', '.join(guidance.METHODS)}"
            )
        if self.members < 1:
            raise ValueError(f"members must be >= 1, got {self.members}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2, got {self.steps}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.cg_iters < 1:
            raise ValueError(f"cg_iters must be >= 1, got {self.cg_iters}")
        if not self.guidance_scale >= 0 or not np.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be finite and >= 0, got {self.guidance_scale}")
        if self.window_hours < 0:
            raise ValueError(f"window_hours must be >= 0, got {self.window_hours}")
        if self.interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"unknown interpolation {self.interpolation!r}; expected 'bilinear' or 'nearest'")
        if self.prior_members is not None and self.prior_members < 0:
            raise ValueError(f"prior_members must be >= 0, got {self.prior_members}")

    @property
    def n_prior(self) -> int:
        return self.members if self.prior_members is None else self.prior_members

    def sampler_kwargs(self) -> dict[str, Any]:
        return {"num_steps": self.steps, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho}

    def guidance_options(self) -> dict[str, Any]:
        """Method options; regression keeps the seed's semantics (step = scale * grad L)."""
        if self.method == "replacement":
            return {}
        opts: dict[str, Any] = {"scale": self.guidance_scale}
        if self.method == "mmps":
            opts["cg_iters"] = self.cg_iters
        return opts


# --------------------------------------------------------------------------------------
# observations


@dataclasses.dataclass(frozen=True)
class ObservationInputs:
    """The assimilated observations in the network's units.

    A: point operator on one member's state (C, 1, npix), net order.
    y, sigma_y: (n,) float32 normalised value and error std (per observation).
    table: the clean table (physical units, with value_n / sigma_n columns), row i = y[i].
    dropped: rows rejected per reason (only with drop_bad).
    """

    A: PointObservationOperator
    y: jax.Array
    sigma_y: jax.Array
    table: pd.DataFrame
    dropped: dict[str, int]


def _override_sigma(table: pd.DataFrame, sigma_y) -> pd.DataFrame:
    if sigma_y is None:
        return table
    out = table.copy()
    if isinstance(sigma_y, Mapping):
        unknown = sorted(set(sigma_y) - set(out["variable"]))
        if unknown:
            raise ValueError(f"--sigma-y names variables with no observations: {unknown}")
        for var, val in sigma_y.items():
            out.loc[out["variable"] == var, "sigma"] = float(val)
    else:
        out["sigma"] = float(sigma_y)
    bad = ~(out["sigma"].to_numpy(np.float64) > 0)
    if bad.any():
        raise ValueError(f"sigma_y must be > 0, got {sigma_y}")
    return out


def observation_inputs(
    table: pd.DataFrame,
    model: CBottleModel,
    analysis_time,
    *,
    window_hours: float = 3.0,
    drop_bad: bool = False,
    sigma_y=None,
    interpolation: str = "bilinear",
    check_plausibility: bool = True,
) -> ObservationInputs:
    """Validate, normalise and locate a table for one analysis time (see module doc)."""
    info = model.batch_info
    if info.center is None or info.scales is None:
        raise ValueError("the model's batch_info has no center/scales; cannot normalise observations")
    t = utc_naive(analysis_time)
    window = (t - pd.Timedelta(hours=window_hours), t + pd.Timedelta(hours=window_hours))
    clean, dropped = validate_observations(table, model.channels, time_window=window, drop_bad=drop_bad)
    clean = _override_sigma(clean, sigma_y)
    if check_plausibility:
        check_plausible(clean, model.channels, info.center, info.scales)
    norm = normalise(clean, model.channels, info.center, info.scales)
    A = build_operator(norm, model.channels, nside=NSIDE, method=interpolation)
    return ObservationInputs(
        A=A,
        y=jnp.asarray(norm["value_n"].to_numpy(np.float32)),
        sigma_y=jnp.asarray(norm["sigma_n"].to_numpy(np.float32)),
        table=norm,
        dropped=dict(dropped),
    )


# --------------------------------------------------------------------------------------
# conditioning and the denoiser


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """Network inputs for one time: SST condition (1, 1, 1, npix) or None; calendar scalars."""

    condition: np.ndarray | None
    second_of_day: np.ndarray
    day_of_year: np.ndarray


def conditioning_for(model: CBottleModel, analysis_time, *, sst_path=None, sst_offset: float = 0.0) -> Conditioning:
    """Calendar inputs and (for models with a condition channel) the AMIP SST at the time."""
    sod, doy = calendar_inputs([analysis_time])
    cond = None
    if model.config.condition_channels > 0:
        if sst_path is None:
            raise ValueError(
                "this model is conditioned on sea-surface temperature: pass --sst FILE "
                "(an input4MIPs/AMIP 'tosbcs' NetCDF covering the analysis time)"
            )
        sst_path = Path(sst_path)  # read_amip_sst names a missing file, a directory, a non-NetCDF file
        cond = sst_at(read_amip_sst(sst_path), analysis_time, nside=NSIDE, offset=sst_offset)
    elif sst_path is not None:
        logger.warning("the model has no condition channel; ignoring the SST file %s", sst_path)
    return Conditioning(cond, np.asarray(sod, np.float32), np.asarray(doy, np.float32))


def guided_denoiser_fn(
    model: CBottleModel,
    method: str | None,
    *,
    label: str = "era5",
    options: Mapping[str, Any] | None = None,
    compute_dtype=jnp.float32,
    remat: bool = False,
    on_call: Callable[[jax.Array], None] | None = None,
) -> Callable:
    """``fn(x, sigma, params, condition, second_of_day, day_of_year, A, y, sigma_y)``.

    Everything that changes between runs (parameters, conditioning, observations) is an
    argument, so one compiled ensemble program serves new times and observations.
    ``method=None`` is the unguided prior (A, y, sigma_y ignored). ``remat``: the network
    recomputes each U-Net block in the guidance VJPs (less memory). ``on_call(sigma)``
    runs on the host at each evaluation (progress reporting).
    """
    options = dict(options or {})

    def fn(x, sigma, params, condition, second_of_day, day_of_year, A, y, sigma_y):
        if on_call is not None:
            jax.debug.callback(on_call, sigma)
        den = make_denoiser(
            model,
            condition=condition,
            second_of_day=second_of_day,
            day_of_year=day_of_year,
            label=label,
            params=params,
            compute_dtype=compute_dtype,
            remat=remat,
        )
        if method is not None:
            den = guidance.apply(method, den, A, y, sigma_y, **options)
        return den(x, sigma)

    return fn


def utc_naive(t) -> pd.Timestamp:
    """A timestamp in UTC without timezone (naive input is taken as UTC); text must be
    ISO 8601 (``observations.parse_time``)."""
    return parse_time(t, "analysis time")


def denoiser_calls(settings: AssimilationSettings) -> int:
    """Denoiser evaluations per trajectory: Heun's 2 per step but the last."""
    return 2 * settings.steps - 1


# --------------------------------------------------------------------------------------
# summaries


def observation_rmse(ensemble: jax.Array, obs: ObservationInputs, scale: Sequence[float]) -> dict[str, dict[str, float]]:
    """Per variable: RMSE (physical units) of the ensemble mean at the observations and the
    ensemble spread there. ensemble: (M, C, 1, npix) normalised, net order."""
    vals = np.asarray(jax.vmap(obs.A)(jnp.asarray(ensemble)), np.float64)  # (M, n)
    s = np.asarray(scale, np.float64)[obs.A.channel]
    phys = vals * s  # center cancels in the differences below
    y = obs.table["value_n"].to_numpy(np.float64) * s
    out = {}
    for var, rows in obs.table.groupby("variable", sort=True):
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


def assimilate(
    model: str | os.PathLike | CBottleModel,
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
    on_event: Callable[[str, Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Sample a posterior ensemble for ``time`` given ``obs`` and write it to ``out``.

    Args:
      model: converted model directory (``jaxguide convert``) or a loaded model.
      obs: observation table path (CSV/Parquet/NetCDF, see :mod:`jaxguide.observations`)
        or a DataFrame; physical units.
      out: ``.nc`` (NetCDF4) or ``.zarr``; written atomically.
      time: analysis time (UTC).
      sst: AMIP SST file, required when the model is SST-conditioned.
      progress: ``progress(stage, done, total)``; stage "analysis" or "prior", counted
        in denoiser calls (times devices and chunks when the members are split). It
        is fed by a host callback in the compiled program, and JAX does not store
        programs with host callbacks in its persistent compilation cache: pass it
        only when the cache is off (the CLI does so with ``--no-cache``).
      on_event: ``on_event(name, info)`` at each stage of the run, as it happens (also
        logged at INFO): "loading" {model}, "observations" {n_obs, dropped}, "compiling"
        {stage, members, calls} (the first run of a configuration compiles; later ones
        load it from JAX's cache), "sampling" {stage, compile_s}, "sampled" {stage,
        seconds}, "writing" {path}, "written" {path}.
    Returns a JSON-friendly summary: observation counts, RMSE at the observations of
    the prior and analysis ensemble means (per variable, physical units), timings.
    """
    t_start = _time.perf_counter()
    settings.check()
    time = utc_naive(time)
    out = Path(out)
    fmt = output_format(out)
    _check_output(out, overwrite)

    def event(name: str, **info) -> None:
        logger.info("%s %s", name, info)
        if on_event is not None:
            on_event(name, info)

    if not isinstance(model, CBottleModel):
        event("loading", model=str(model))
        model = load_model(model)
    table = obs if isinstance(obs, pd.DataFrame) else read_observations(obs)
    oi = observation_inputs(
        table,
        model,
        time,
        window_hours=settings.window_hours,
        drop_bad=settings.drop_bad,
        sigma_y=settings.sigma_y,
        interpolation=settings.interpolation,
        check_plausibility=settings.check_plausibility,
    )
    event("observations", n_obs=int(oi.y.shape[0]), dropped=dict(oi.dropped))
    cond = conditioning_for(model, time, sst_path=sst, sst_offset=settings.sst_offset)
    member_shape = (model.config.out_channels, 1, NPIX)
    devs = resolve_devices(devices)
    operands = (model.params, cond.condition, cond.second_of_day, cond.day_of_year, oi.A, oi.y, oi.sigma_y)

    def run(method, n_members, key, stage):
        # host callbacks: once per denoiser evaluation, on every device and for every chunk
        per_device = -(-n_members // len(devs))
        runs = len(devs) * (1 if settings.chunk_size is None else -(-per_device // settings.chunk_size))
        per_run = denoiser_calls(settings)
        calls = [0]

        def on_call(_sigma):
            calls[0] = min(calls[0] + 1, per_run * runs)
            if progress is not None:
                progress(stage, calls[0], per_run * runs)

        fn = guided_denoiser_fn(
            model,
            method,
            label=settings.label,
            options=settings.guidance_options(),
            compute_dtype=jnp.bfloat16 if settings.bf16 else jnp.float32,
            remat=settings.remat,
            on_call=on_call if progress is not None else None,
        )
        event("compiling", stage=stage, members=n_members, calls=per_run * runs)
        t0 = _time.perf_counter()
        with _compile_clock(lambda s: event("sampling", stage=stage, compile_s=round(s, 2))) as compile_s:
            ens = sample_ensemble(
                fn,
                key,
                member_shape,
                n_members,
                sampler_kwargs=settings.sampler_kwargs(),
                devices=devs,
                chunk_size=settings.chunk_size,
                operands=operands,
            )
            ens = jax.block_until_ready(ens)
            jax.effects_barrier()
        if not bool(jnp.all(jnp.isfinite(ens))):
            raise FloatingPointError(
                f"the {stage} ensemble has non-finite values (method {method!r}, guidance scale "
                f"{settings.guidance_scale}); lower --guidance-scale or use --method mmps/sda"
            )
        seconds = _time.perf_counter() - t0
        event("sampled", stage=stage, seconds=round(seconds, 2))
        return ens, seconds, compile_s[0]

    key_analysis, key_prior = jax.random.split(jax.random.key(settings.seed))
    analysis, t_analysis, c_analysis = run(settings.method, settings.members, key_analysis, "analysis")
    prior, t_prior, c_prior = None, 0.0, 0.0
    if settings.n_prior > 0:
        prior, t_prior, c_prior = run(None, settings.n_prior, key_prior, "prior")

    scale = model.batch_info.scales
    summary: dict[str, Any] = {
        "output": str(out),
        "time": str(utc_naive(time)),
        "method": settings.method,
        "members": settings.members,
        "prior_members": settings.n_prior,
        "steps": settings.steps,
        "n_obs": int(oi.y.shape[0]),
        "dropped": oi.dropped,
        "analysis": observation_rmse(analysis, oi, scale),
        "prior": observation_rmse(prior, oi, scale) if prior is not None else None,
        "seconds_analysis": t_analysis,
        "seconds_prior": t_prior,
        "seconds_compile": c_analysis + c_prior,
    }
    provenance = {
        "method": settings.method,
        "sigma_y": describe_sigma_y(settings.sigma_y),
        "guidance_scale": settings.guidance_scale,
        "steps": settings.steps,
        "seed": settings.seed,
        "model_sha256": _model_sha256(model),
        "n_obs": int(oi.y.shape[0]),
        "command": command,
        "sigma_min": settings.sigma_min,
        "sigma_max": settings.sigma_max,
        "label": settings.label,
        "observation_window_hours": settings.window_hours,
        "observations_dropped": sum(oi.dropped.values()),
        "observation_operator": settings.interpolation,  # jaxguide evaluate samples with the same scheme
    }
    if settings.method == "mmps":
        provenance["cg_iters"] = settings.cg_iters
    if settings.bf16:
        provenance["network_dtype"] = "bfloat16"
    ds = analysis_to_dataset(
        np.asarray(analysis),
        channels=model.channels,
        center=model.batch_info.center,
        scale=scale,
        times=[utc_naive(time)],
        provenance=provenance,
        prior=None if prior is None else np.asarray(prior),
        regrid_latlon=regrid,
    )
    event("writing", path=str(out))
    write_dataset(ds, out, format=fmt, overwrite=overwrite)
    event("written", path=str(out))
    summary["seconds_total"] = _time.perf_counter() - t_start
    return summary


# the name of the jitted ensemble program (jaxguide.ensemble): its compilation ends the
# "compiling" stage
_PROGRAM_NAME = "program"


@contextlib.contextmanager
def _compile_clock(on_program_compiled: Callable[[float], None] | None = None):
    """Yields ``[seconds]``: JAX tracing + lowering + XLA compilation (or persistent-cache
    loading) time spent inside the block, from ``jax.monitoring`` events (no host
    callback, so the program stays cacheable). ``on_program_compiled(seconds)`` runs
    when the ensemble program is compiled, before it executes."""
    from jax._src import dispatch

    events = {dispatch.JAXPR_TRACE_EVENT, dispatch.JAXPR_TO_MLIR_MODULE_EVENT, dispatch.BACKEND_COMPILE_EVENT}
    total = [0.0]

    def listener(name: str, duration: float, **kw) -> None:
        if name in events:
            total[0] += duration
            fun = kw.get("fun_name")
            if name == dispatch.BACKEND_COMPILE_EVENT and fun in (_PROGRAM_NAME, f"jit({_PROGRAM_NAME})") \
                    and on_program_compiled:
                on_program_compiled(total[0])

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _model_sha256(model: CBottleModel) -> str:
    """sha256 of the source checkpoint(s) the model was converted from (comma separated)."""
    sources = model.metadata.get("sources", [])
    return ",".join(s["sha256"] for s in sources) if sources else "unknown"
