"""The options of an assimilation run and the run's inputs, each defined once.

:class:`AssimilationSettings`: how to assimilate (method, ensemble, sampler, observation
handling; what a campaign stores and compares). :class:`AnalysisInputs`: what one
analysis reads and writes (observations, output, time, SST, grid, reporting), the
keywords that :func:`jaxguide.assimilation.pipeline.assimilate` and
:meth:`jaxguide.assimilation.session.Session.assimilate` take.

The seed rule (:data:`SEED_RULE`, one for every entry point): the random key of a run
at time ``t`` is :func:`time_key` ``(seed, t)`` = ``fold_in(key(seed), unix seconds of
t)``, split into the analysis and prior keys (:func:`run_keys`). A single-time analysis
uses its time, a campaign each of its times, a video run each window's first frame; so
the same (seed, time) gives the same members whatever the entry point, and a loop over
times never reuses noise.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.diffusion import guidance
from jaxguide.grid.latlon import LatLonGrid
from jaxguide.io import times as io_times

# cBottle's sampler defaults (CBottle3d): 18 Heun steps from sigma 200 down to 0.02.
CBOTTLE_SAMPLER = {"num_steps": 18, "sigma_min": 0.02, "sigma_max": 200.0, "rho": 7.0}


# a denoised estimate or sampled state this many climatological scales (normalised units)
# from the model's center is a diverged run (finite or not), never weather
DIVERGED = 1e3


def is_diverged(ensemble: np.ndarray) -> bool:
    """A sampled ensemble (normalised units) that is not weather: a non-finite value, or
    one beyond :data:`DIVERGED` (the sampler's ``stop_above`` makes a stopped member NaN)."""
    return not bool(np.all(np.isfinite(ensemble))) or float(np.max(np.abs(ensemble))) > DIVERGED


@dataclasses.dataclass(frozen=True)
class AssimilationSettings:
    """Options of one assimilation run (defaults: MMPS, cBottle's sampler).

    method: a method name (:data:`jaxguide.diffusion.guidance.METHODS`), configured by the
      options below, or a :mod:`jaxguide.diffusion.guidance` method object (then those options
      must stay at their defaults: the object carries its own).
    sigma_y: observation-error std override in physical units, one value for every
      observation or a mapping variable -> value; None keeps the table's ``sigma``.
    guidance_scale: multiplies the guidance step of every method but replacement
      (1 = the method as derived). Regression's and DPS's per-observation weight is
      capped at one full correction per call (``guidance.Regression``'s ``cap``), so
      that no scale diverges; regression's 1 is then the seed's sigma_y^2 step.
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
    pad_observations: pad observation counts to :func:`~jaxguide.observations.prepare.bucket_size`
      (one compiled program for all counts in a bucket; padding rows change nothing).
    conditioning_frames: video models: frames each chained window takes from the end of
      the previous one (cBottle's ``VideoAutoregression.step_forward``; 0 = independent
      windows).
    time_matching: video models: ``"linear"`` interpolates an observation between two
      frames linearly in time; ``"exact"`` refuses it (``ObservationTimeError``).
    smoother: video models: sample the whole run (``time`` .. ``end``) as one trajectory
      of overlapping windows (:class:`jaxguide.model.trajectory.TrajectoryModel`), so that
      every frame is conditioned on every observation (a smoother); False chains windows,
      each conditioned on the previous one (a filter, cBottle's autoregression).
    overlap: the smoother's frames shared by neighbouring windows (None: T // 2).
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
    smoother: bool = False
    overlap: int | None = None

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
        if self.smoother and self.conditioning_frames != 1:
            raise ValueError("conditioning_frames (--conditioning-frames) is the filter chain's; the smoother's "
                             "windows share overlap (--overlap) frames")
        if self.overlap is not None and not self.smoother:
            raise ValueError("overlap (--overlap) is the smoother's: give smoother=True (--smoother) too")
        if self.overlap is not None and self.overlap < 1:
            raise ValueError(f"the smoother's overlap must be >= 1 frame, got {self.overlap}")

    @property
    def method_name(self) -> str:
        return self.method if isinstance(self.method, str) else type(self.method).name

    @property
    def n_prior(self) -> int:
        return self.members if self.prior_members is None else self.prior_members

    def sampler_kwargs(self) -> dict[str, Any]:
        """The EDM sampler's options; a run whose denoised estimate leaves :data:`DIVERGED`
        stops at that denoiser call (NaN members, reported as diverged by the caller)."""
        return {"num_steps": self.steps, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho,
                "stop_above": DIVERGED}

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


SEED_RULE = "fold_in(key(seed), unix seconds of the time), split into analysis and prior keys"


def time_key(seed: int, time) -> jax.Array:
    """The random key of a run at ``time`` (:data:`SEED_RULE`): ``fold_in`` of its Unix
    second (floored; as two 32-bit halves, so times before 1970 and after 2106 work) into
    ``key(seed)``. Depends only on (seed, time): not on the entry point, the processing
    order, the process split or resumes."""
    t = io_times.parse_time(time, "time")
    s = (t.as_unit("ns").value // 1_000_000_000) & 0xFFFF_FFFF_FFFF_FFFF  # two's complement before 1970
    key = jax.random.key(int(seed))
    key = jax.random.fold_in(key, np.uint32(s >> 32))
    return jax.random.fold_in(key, np.uint32(s & 0xFFFF_FFFF))


def run_keys(seed: int, time) -> tuple[jax.Array, jax.Array]:
    """(analysis key, prior key) of a run, or a video window, starting at ``time``:
    ``split(time_key(seed, time))``."""
    key_analysis, key_prior = jax.random.split(time_key(seed, time))
    return key_analysis, key_prior


def denoiser_calls(settings: AssimilationSettings) -> int:
    """Denoiser evaluations per trajectory: Heun's 2 per step but the last."""
    return 2 * settings.steps - 1


@dataclasses.dataclass(frozen=True)
class AnalysisInputs:
    """What one analysis reads and writes: the keywords of
    :func:`jaxguide.assimilation.pipeline.assimilate` (see its Args) but the model,
    ``devices`` and ``session``.

    obs: observation table path or DataFrame (physical units); out: ``.nc`` or ``.zarr``;
    time: the analysis time, or a video run's first frame (UTC); end: a video run's last
    frame (None: one window); condition: a video run's known frames (file or Dataset);
    sst: AMIP SST file; regrid: also write the analysis on this lat-lon grid;
    progress: ``progress(stage, done, total)`` in denoiser calls; on_event:
    ``on_event(name, info)`` at each stage of the run.
    """

    obs: str | os.PathLike | pd.DataFrame
    out: str | os.PathLike
    _: dataclasses.KW_ONLY
    time: Any
    settings: AssimilationSettings = AssimilationSettings()
    sst: str | os.PathLike | None = None
    regrid: LatLonGrid | None = None
    overwrite: bool = False
    command: str = "jaxguide.assimilation.pipeline.assimilate"
    progress: Callable[[str, int, int], None] | None = None
    on_event: Callable[[str, Mapping[str, Any]], None] | None = None
    end: Any = None
    condition: str | os.PathLike | xr.Dataset | None = None
