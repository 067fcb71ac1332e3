"""cBottle's EDM preconditioning (sigma_data = 0.5) around the U-Net:
``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, ...)``.

Public layout: cBottle's ``(batch, channel, time, pixel)`` in the network's pixel order
(``healpix`` order "net"), normalised units; the U-Net runs channels-last inside.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.model.config import NPIX, SIGMA_DATA
from jaxguide.model.inputs import Conditioning, ForwardOptions
from jaxguide.model.layers import accum_dtype
from jaxguide.model.unet import CBottleUNet


def edm_coefficients(sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """c_skip, c_out, c_in, c_noise for sigma (B,) in sigma's dtype (sigma_data = 0.5)."""
    s = sigma
    sd2 = np.float32(SIGMA_DATA**2)
    c_skip = sd2 / (s * s + sd2)
    c_out = s * np.float32(SIGMA_DATA) / jnp.sqrt(s * s + sd2)
    c_in = 1 / jnp.sqrt(sd2 + s * s)
    c_noise = jnp.log(s) / 4
    return c_skip, c_out, c_in, c_noise


def precond_forward(
    model: CBottleUNet,
    x: jax.Array,
    sigma: jax.Array,
    cond: Conditioning,
    options: ForwardOptions = ForwardOptions(),
    *,
    return_intermediates: bool = False,
):
    """cBottle's EDMPrecond: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, ...).

    Args (cBottle layout, network pixel order, normalised units; T = the model's time_length,
    1 for the image model):
      x: (B, C, T, X) noisy state.  sigma: scalar or (B,) noise level (one per window).
      cond: the :class:`~jaxguide.model.inputs.Conditioning`: class_labels (B, label_dim)
        one-hot (or None: zeros, as cBottle); condition (B, condition_channels, T, X): the
        encoded SST (image model), or for the video model ``[target * mask (C), SST (1),
        mask (1)]`` per frame, NaN becomes 0; second_of_day, day_of_year (B, T) float32 per
        frame (:func:`jaxguide.model.calendar.calendar_inputs`).
      options: the static :class:`~jaxguide.model.inputs.ForwardOptions` (compute_dtype,
        remat: a VJP through D keeps ~one block's activations instead of all, for one
        extra forward; scan_blocks: see :meth:`CBottleUNet.__call__`).
    Returns D: (B, C, T, X) in ``accum_dtype(options.compute_dtype)`` (and the U-Net's
    activations with the EDM coefficients, with ``return_intermediates``).
    """
    cfg = model.config
    acc = accum_dtype(options.compute_dtype)
    x = jnp.asarray(x).astype(acc)
    b, c, t, npix = x.shape
    if c != cfg.out_channels or t != cfg.time_length or npix != NPIX:
        raise ValueError(
            f"x has shape {x.shape}; this model expects (batch, {cfg.out_channels}, {cfg.time_length}, {NPIX}) "
            "(batch, channel, time, pixel in the network's HEALPix order)"
        )
    sigma = jnp.broadcast_to(jnp.asarray(sigma).astype(acc).reshape(-1), (b,))
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
    parts = [jnp.transpose(c_in[:, None, None, None] * x, (0, 2, 3, 1))]  # (B, T, X, C)
    if cfg.condition_channels:
        if cond.condition is None:
            raise ValueError(
                f"this model needs a condition with {cfg.condition_channels} channel(s) "
                + ("(target * mask, SST, mask)" if cfg.is_video else "(the SST)")
            )
        condition = jnp.nan_to_num(jnp.asarray(cond.condition).astype(acc), nan=0.0)
        want = (b, cfg.condition_channels, t, npix)
        try:
            if np.broadcast_shapes(condition.shape, want) != want:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"condition has shape {condition.shape}; this model expects "
                f"(batch, {cfg.condition_channels}, {cfg.time_length}, {NPIX}) (batch, channel, time, pixel)"
            ) from None
        condition = jnp.broadcast_to(condition, want)
        parts.append(jnp.transpose(condition, (0, 2, 3, 1)))
    if cfg.label_dim:
        labels = jnp.zeros((1, cfg.label_dim), jnp.float32) if cond.class_labels is None else cond.class_labels
        labels = jnp.asarray(labels).astype(acc).reshape(-1, cfg.label_dim)
    else:
        labels = None
    sod = jnp.broadcast_to(jnp.asarray(cond.second_of_day, jnp.float32).reshape(-1, t), (b, t))
    doy = jnp.broadcast_to(jnp.asarray(cond.day_of_year, jnp.float32).reshape(-1, t), (b, t))
    # the U-Net sees the calendar and labels; the condition is part of its input now
    net_cond = dataclasses.replace(cond, second_of_day=sod, day_of_year=doy, class_labels=labels, condition=None)
    out = model(jnp.concatenate(parts, axis=-1), c_noise, net_cond, options, return_intermediates=return_intermediates)
    f, acts = out if return_intermediates else (out, None)
    f = jnp.transpose(f, (0, 3, 1, 2))  # (B, C, T, X)
    d = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * f
    if return_intermediates:
        acts.update(F=f, c_skip=c_skip, c_out=c_out, c_in=c_in, c_noise=c_noise)
        return d, acts
    return d
