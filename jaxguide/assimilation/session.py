"""A session: one model and its compiled ensemble programs, reused by every analysis.

Compiling: a :class:`Session` owns the compiled ensemble programs of one model; its
calls pass parameters, conditioning, method hyperparameters and observations as
arguments, and observation counts are padded to a power of two
(:func:`jaxguide.observations.prepare.bucket_size`), so a series of analyses (new times, new
observations, a count in the same bucket, a new ``guidance_scale``) compiles once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax.numpy as jnp

from jaxguide.assimilation.analysis import run_analysis
from jaxguide.assimilation.settings import AnalysisInputs, AssimilationSettings
from jaxguide.diffusion.ensemble import EnsembleSampler, resolve_devices
from jaxguide.diffusion.guided import guided_denoiser
from jaxguide.model.checkpoint import CBottleModel, load_model
from jaxguide.model.denoiser import CBottleDenoiser, DenoiserModel, check_model
from jaxguide.model.trajectory import TrajectoryModel

logger = logging.getLogger(__name__)


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

    ``report_progress`` (default False): the programs call back to the host at every
    denoiser evaluation, so that ``progress`` of :meth:`assimilate` counts them as they
    run. A host callback syncs the host at every call, and JAX's persistent compilation
    cache does not store programs with host callbacks: turn it on only for a live
    progress bar with the cache off (the CLI does so with ``--no-cache``). Without it
    ``progress`` only hears each stage's end. Fixed per session, so passing ``progress``
    or not never changes (or recompiles) a program.
    """

    def __init__(self, model, *, devices: Sequence[Any] | None = None, report_progress: bool = False):
        self.source = model
        self.report_progress = bool(report_progress)
        self._model = load_model(model) if isinstance(model, (str, os.PathLike)) else model
        self.devices = resolve_devices(devices)
        self.programs = EnsembleSampler()
        self._fns: dict[tuple, tuple[DenoiserModel, Callable]] = {}
        self._progress: Callable[[int], None] | None = None

    @property
    def model(self):
        """The model as loaded (``source`` itself unless that was a directory)."""
        return self._model

    def _on_call(self, _sigma) -> None:
        # the compiled programs call this stable method; the current run's counter is swapped in
        if self._progress is not None:
            self._progress(1)

    @contextlib.contextmanager
    def reporting_to(self, count: Callable[[int], None]) -> Iterator[None]:
        """Within the block, the programs' denoiser calls are counted by ``count(k)``
        (with ``report_progress``; the programs themselves do not change)."""
        self._progress = count
        try:
            yield
        finally:
            self._progress = None

    def model_for(self, settings: AssimilationSettings, trajectory_frames: int | None = None
                  ) -> tuple[DenoiserModel, Callable]:
        """The denoiser model and its guided function (built once per label / dtype / remat).
        ``trajectory_frames``: a video model as the smoother's denoiser of that many frames
        (:class:`~jaxguide.model.trajectory.TrajectoryModel`, ``settings.overlap``)."""
        key = (settings.label, settings.bf16, settings.remat)
        on_call = self._on_call if self.report_progress else None
        if key not in self._fns:
            dm = as_denoiser_model(self._model, label=settings.label, bf16=settings.bf16, remat=settings.remat)
            self._fns[key] = (dm, guided_denoiser(dm, on_call=on_call))
        if trajectory_frames is None:
            return self._fns[key]
        tkey = (*key, "trajectory", trajectory_frames, settings.overlap)
        if tkey not in self._fns:
            tm = TrajectoryModel(self._fns[key][0], trajectory_frames, settings.overlap)
            self._fns[tkey] = (tm, guided_denoiser(tm, on_call=on_call))
        return self._fns[tkey]

    def assimilate(self, obs, out, **inputs) -> dict[str, Any]:
        """See :func:`jaxguide.assimilation.pipeline.assimilate`; the keywords are the fields of
        :class:`~jaxguide.assimilation.settings.AnalysisInputs` (``time`` required)."""
        return run_analysis(self, AnalysisInputs(obs, out, **inputs))
