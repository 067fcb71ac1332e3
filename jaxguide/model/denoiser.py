"""The denoiser contract and cBottle's model behind it.

Contract (what :mod:`jaxguide.diffusion.guidance`, the ensemble programs and
:func:`jaxguide.assimilation.pipeline.assimilate` use): a :class:`DenoiserModel` exposes its channel
names, normalisation (center/scale, physical units), HEALPix grid (nside, member shape,
pixels in "net" order) and parameters, a pure ``denoise(params, x, sigma, cond) ->
x0_hat`` for one member, and ``conditioning(time, ...) -> cond`` (a pytree of arrays
with the same structure for every time). :class:`CBottleDenoiser` is cBottle's model
in that form; :class:`jaxguide.model.gaussian.GaussianModel` is the exact Gaussian prior in it.

A member's state is ``(C, T, npix)``: channels, frames (T = 1 for single-time models,
``time_length`` for a video model's window), pixels in the network's order, normalised
units. ``vmap`` over members for ensembles. Video models also give
``time_step_hours``, ``window(start)`` and ``window_conditioning(window, known=...)``
(the per-frame calendar and known frames, see :mod:`jaxguide.model.window`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.grid import healpix
from jaxguide.model import conditioning as conditioning_lib
from jaxguide.model import units
from jaxguide.model.checkpoint import CBottleModel
from jaxguide.model.config import NPIX, NSIDE
from jaxguide.model.inputs import Conditioning
from jaxguide.model.labels import label_one_hot
from jaxguide.model.window import FrameWindow

Denoiser = Callable[..., jax.Array]  # (x, sigma, cond) -> x0_hat

# Channels the ERA5 label never trained on: cBottle fills them from an ICON-label pass.
ERA5_MISSING_CHANNELS = ("rlut", "rsut", "rsds")


@runtime_checkable
class DenoiserModel(Protocol):
    """What the pipeline needs of a model (see the module doc)."""

    channels: tuple[str, ...]
    center: np.ndarray  # (C,) physical units
    scale: np.ndarray  # (C,) physical units
    nside: int
    member_shape: tuple[int, int, int]  # (C, T, 12 nside^2); T = 1 for single-time models
    params: Any

    def denoise(self, params, x: jax.Array, sigma, cond) -> jax.Array: ...

    def conditioning(self, time, *, sst_path=None, sst_offset: float = 0.0) -> Any: ...


def check_model(model) -> None:
    """Raise TypeError naming what a would-be :class:`DenoiserModel` lacks."""
    missing = [n for n in ("channels", "center", "scale", "nside", "member_shape", "params", "denoise",
                           "conditioning") if not hasattr(model, n)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a denoiser model: it lacks {missing} "
                        "(see jaxguide.model.denoiser.DenoiserModel)")
    shape = tuple(model.member_shape)
    if len(shape) != 3 or shape[0] != len(model.channels) or shape[1] < 1 or shape[2] != 12 * model.nside**2:
        raise ValueError(f"member_shape {shape} is not (C={len(model.channels)}, T, 12 nside^2) at nside {model.nside}")
    if np.shape(model.center) != (len(model.channels),) or np.shape(model.scale) != (len(model.channels),):
        raise ValueError("center and scale must have one value per channel")


def channel_mask(channels: tuple[str, ...], label: str) -> np.ndarray:
    """(C,) bool: channels the label's network pass provides (all but rlut/rsut/rsds for ERA5)."""
    if label.lower() == "era5":
        return np.array([c not in ERA5_MISSING_CHANNELS for c in channels])
    return np.ones(len(channels), bool)


@dataclasses.dataclass(frozen=True, eq=False)
class CBottleDenoiser:
    """cBottle's model as a :class:`DenoiserModel`, sampling as ``CBottle3d`` does.

    With the ERA5 label, channels ERA5 lacks (rlut, rsut, rsds) come from a second pass
    with the ICON label: ``D = where(mask, net(where(mask, x, 0), ERA5), net(x, ICON))``
    (two network evaluations, run as one batch of two); otherwise one pass.
    ``compute_dtype``: the network's dtype (bfloat16 for ``--bf16``); D is returned in
    x's dtype. ``remat``: recompute each U-Net block in reverse mode (less memory for the
    guidance VJPs, see :func:`jaxguide.model.layers.call_block`). ``label``, ``compute_dtype`` and
    ``remat`` are static (part of compiled programs). Video models (time_length T > 1) take
    members of T frames; T = 1 is the image model.
    """

    model: CBottleModel
    label: str = "era5"
    compute_dtype: Any = jnp.float32
    remat: bool = False

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.model.channels)

    @property
    def center(self) -> np.ndarray:
        return self._norm("center")

    @property
    def scale(self) -> np.ndarray:
        return self._norm("scales")

    def _norm(self, name) -> np.ndarray:
        v = getattr(self.model.batch_info, name)
        if v is None:
            raise ValueError(f"the model's batch_info has no {name}; cannot convert to physical units")
        return np.asarray(v, np.float64)

    nside: int = dataclasses.field(default=NSIDE, init=False)

    @property
    def member_shape(self) -> tuple[int, int, int]:
        return (self.model.config.out_channels, self.model.config.time_length, NPIX)

    @property
    def params(self):
        return self.model.params

    @property
    def metadata(self) -> dict:
        return self.model.metadata

    @property
    def time_step_hours(self) -> float:
        """Hours between a video model's frames (``batch_info.json`` ``time_step``)."""
        return self.model.batch_info.time_step_hours

    def window(self, start) -> FrameWindow:
        """The frames of one window starting at ``start`` (T = 1 for the image model)."""
        return FrameWindow(start, self.time_step_hours, self.model.config.time_length)

    def conditioning(self, time, *, sst_path: str | os.PathLike | None = None, sst_offset: float = 0.0):
        """Calendar inputs and (for SST-conditioned models) the AMIP SST at ``time``; for a
        video model, of the window starting at ``time`` with no known frames."""
        if self.model.config.time_length > 1:
            return self.window_conditioning(self.window(time), sst_path=sst_path, sst_offset=sst_offset)
        return conditioning_lib.assemble(time, nside=NSIDE, sst_channels=self.model.config.condition_channels,
                                         sst_path=sst_path, sst_offset=sst_offset)

    def window_conditioning(self, window: FrameWindow, *, known: conditioning_lib.KnownFrames | None = None,
                            sst_path: str | os.PathLike | None = None, sst_offset: float = 0.0, sst_data=None):
        """A video model's conditioning of ``window`` (see
        :func:`jaxguide.model.conditioning.window_conditioning`): per-frame calendar and
        ``[known * mask, SST, mask]``; every leaf has a leading member axis when ``known``
        is per member."""
        cfg = self.model.config
        if cfg.time_length == 1:
            raise ValueError("window_conditioning is for video models (time_length > 1); use conditioning(time)")
        if window.length != cfg.time_length:
            raise ValueError(f"the window has {window.length} frames; this model samples {cfg.time_length}")
        if not np.isclose(window.time_step_hours, self.time_step_hours):
            raise ValueError(f"the window's frames are {window.time_step_hours:g} h apart; this model's are "
                             f"{self.time_step_hours:g} h")
        return conditioning_lib.window_conditioning(
            window, channels=cfg.out_channels, nside=NSIDE, condition_channels=cfg.condition_channels, known=known,
            sst_path=sst_path, sst_offset=sst_offset, sst_data=sst_data)

    def denoise(self, params, x: jax.Array, sigma, cond) -> jax.Array:
        """x (C, T, npix), sigma scalar, cond from :meth:`conditioning` -> (C, T, npix).

        cond: ``second_of_day``/``day_of_year`` per frame ((T,) or scalars for T = 1) and,
        for conditioned models, ``condition`` (condition_channels, T, npix): the encoded SST
        (image model) or ``[target * mask, SST, mask]`` per frame (video model).
        """
        cfg = self.model.config
        frames = cfg.time_length
        if cfg.label_dim == 0:
            labels_main = labels_fill = None
            mask = np.ones(cfg.out_channels, bool)
        else:
            labels_main = label_one_hot(self.label, cfg.label_dim)[None]
            labels_fill = label_one_hot("icon", cfg.label_dim)[None]
            mask = channel_mask(self.channels, self.label)
        two_pass = not mask.all()
        sst = cond.get("condition")
        net_cond = Conditioning(
            second_of_day=jnp.asarray(cond["second_of_day"], jnp.float32).reshape(1, frames),
            day_of_year=jnp.asarray(cond["day_of_year"], jnp.float32).reshape(1, frames),
            class_labels=labels_main,
            condition=None if sst is None else jnp.asarray(sst, jnp.float32).reshape(1, -1, frames, np.shape(sst)[-1]),
        )
        options = dict(compute_dtype=self.compute_dtype, remat=self.remat)
        if two_pass:
            # both passes as one batch of two: one copy of the network in the compiled graph
            mask_b = jnp.asarray(mask)[:, None, None]
            xb = jnp.stack([jnp.where(mask_b, x, 0), x])
            both = dataclasses.replace(net_cond, class_labels=np.concatenate([labels_main, labels_fill]))
            d = self.model.apply(params, xb, sigma, cond=both, **options)
            out = jnp.where(mask_b, d[0], d[1])
        else:
            out = self.model.apply(params, x[None], sigma, cond=net_cond, **options)[0]
        return out.astype(x.dtype)


def make_denoiser(
    model: CBottleModel,
    *,
    condition: jax.Array | None,
    second_of_day,
    day_of_year,
    label: str = "era5",
    params=None,
    compute_dtype=jnp.float32,
    remat: bool = False,
) -> Denoiser:
    """``D(x, sigma, cond=None)`` of one member with this conditioning bound (``cond`` ignored).

    Shorthand for :class:`CBottleDenoiser` when the conditioning is fixed. condition:
    (1, condition_channels, T, npix) (encoded SST, or ``[target * mask, SST, mask]`` per
    frame for video models) or None; second_of_day, day_of_year: per frame, (T,) or
    (1, T) (scalars for T = 1); params: the expert parameters (default ``model.params``;
    pass them to differentiate); remat: see :class:`CBottleDenoiser`.
    """
    den = CBottleDenoiser(model, label, compute_dtype, remat)
    cond = {"second_of_day": second_of_day, "day_of_year": day_of_year}
    if condition is not None:
        cond["condition"] = condition

    def denoise(x, sigma, _cond=None):
        return den.denoise(model.params if params is None else params, x, sigma, cond)

    return denoise


def postprocess(x, center, scale) -> np.ndarray:
    """Network state (..., C, T, npix) normalised, net order -> physical units, NEST order (float64)."""
    return units.unnormalise(healpix.reorder(np.asarray(x, np.float64), "net", "nest"), center, scale)
