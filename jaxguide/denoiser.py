"""From a loaded cBottle model to the ``denoiser(x, sigma) -> x0_hat`` that guidance and
the sampler use, with the conditioning bound (time, SST, dataset label) and cBottle's
ERA5 channel masking; plus the post-processing to NEST order and physical units.

A member's state is ``(C, T, npix)``: channels, frames (T = the model's time_length, 1
for the image model), pixels in the network's order, normalised units. ``vmap`` over
members for ensembles.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide import healpix
from jaxguide.conditioning import label_one_hot
from jaxguide.model import CBottleModel

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]

# Channels the ERA5 label never trained on: cBottle fills them from an ICON-label pass.
ERA5_MISSING_CHANNELS = ("rlut", "rsut", "rsds")


def channel_mask(channels: tuple[str, ...], label: str) -> np.ndarray:
    """(C,) bool: channels the label's network pass provides (all but rlut/rsut/rsds for ERA5)."""
    if label.lower() == "era5":
        return np.array([c not in ERA5_MISSING_CHANNELS for c in channels])
    return np.ones(len(channels), bool)


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
    """A denoiser for one member, as cBottle's ``CBottle3d`` samples.

    With the ERA5 label, channels ERA5 lacks (rlut, rsut, rsds) come from a second pass
    with the ICON label: ``D = where(mask, net(where(mask, x, 0), ERA5), net(x, ICON))``
    (two network evaluations, run as one batch of two); otherwise one pass.

    Args:
      condition: (1, condition_channels, T, npix): the encoded SST (image model), or
        ``[target * mask, SST, mask]`` per frame (video model); None for models without it.
      second_of_day, day_of_year: per frame, (T,) or (1, T) float32 (scalars for T = 1).
      params: the expert parameters (default: ``model.params``); pass them explicitly to
        differentiate with respect to them.
      compute_dtype: precision of the network's convolutions and matmuls (bfloat16 for speed).
      remat: recompute each U-Net block in reverse mode (less memory for guidance VJPs).
    Returns ``denoiser(x (C, T, npix), sigma scalar) -> (C, T, npix)`` in x's dtype.
    """
    if model.config.label_dim == 0:
        labels_main = labels_fill = None
        mask = np.ones(model.config.out_channels, bool)
    else:
        labels_main = label_one_hot(label, model.config.label_dim)[None]
        labels_fill = label_one_hot("icon", model.config.label_dim)[None]
        mask = channel_mask(model.channels, label)
    two_pass = not mask.all()
    labels_both = None if labels_main is None else np.concatenate([labels_main, labels_fill])
    mask_b = jnp.asarray(mask)[None, :, None, None]
    # --- video (T frames): per-frame calendar and condition; T = 1 is the image model
    frames = model.config.time_length
    sod = jnp.asarray(second_of_day, jnp.float32).reshape(1, frames)
    doy = jnp.asarray(day_of_year, jnp.float32).reshape(1, frames)
    cond = None if condition is None else jnp.asarray(condition, jnp.float32).reshape(1, -1, frames, healpix_npix(condition))
    # ---

    def denoise(x: jax.Array, sigma) -> jax.Array:
        p = model.params if params is None else params
        kw = dict(condition=cond, second_of_day=sod, day_of_year=doy, compute_dtype=compute_dtype, remat=remat)
        if two_pass:
            # both passes as one batch of two: one copy of the network in the compiled graph
            xb = jnp.stack([jnp.where(mask_b[0], x, 0), x])
            d = model.apply(p, xb, sigma, class_labels=labels_both, **kw)
            out = jnp.where(mask_b[0], d[0], d[1])
        else:
            out = model.apply(p, x[None], sigma, class_labels=labels_main, **kw)[0]
        return out.astype(x.dtype)

    return denoise


def healpix_npix(a) -> int:
    return int(np.shape(a)[-1])


def postprocess(x, center, scale) -> np.ndarray:
    """Network state (..., C, T, npix) normalised, net order -> physical units, NEST order (float64)."""
    x = np.asarray(x, np.float64)
    x = healpix.reorder(x, "net", "nest")
    c = np.asarray(center, np.float64)[:, None, None]
    s = np.asarray(scale, np.float64)[:, None, None]
    return x * s + c


def normalise(x_phys_nest, center, scale) -> np.ndarray:
    """Inverse of :func:`postprocess`: physical units, NEST -> normalised, net order (float32)."""
    x = np.asarray(x_phys_nest, np.float64)
    c = np.asarray(center, np.float64)[:, None, None]
    s = np.asarray(scale, np.float64)[:, None, None]
    return healpix.reorder((x - c) / s, "nest", "net").astype(np.float32)
