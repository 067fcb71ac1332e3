"""What a network evaluation takes besides the noisy state and sigma: the conditioning
inputs as ONE pytree (:class:`Conditioning`, traced arrays) and the static options
(:class:`ForwardOptions`, part of the compiled program).

Built once by the public entry (``CBottleModel.apply``) and passed down unchanged through
the mixture of experts, the EDM preconditioning and the U-Net.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Conditioning:
    """cBottle's conditioning inputs (a pytree: jit/vmap/grad see its arrays as leaves).

    Shapes in cBottle's layout (T = the model's time_length, 1 for the image model):
      second_of_day, day_of_year: (B, T) float32 per frame, or broadcastable ((1, T), (T,),
        scalars for T = 1) (:func:`jaxguide.model.calendar.calendar_inputs`).
      class_labels: (B, label_dim) one-hot, or None (zeros, as cBottle).
      condition: (B, condition_channels, T, npix): the encoded SST (image model) or
        ``[target * mask, SST, mask]`` per frame (video model); None for a model without.
    """

    second_of_day: Any
    day_of_year: Any
    class_labels: Any = None
    condition: Any = None


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """Static options of a network evaluation (hashable; a new value compiles a new program).

    compute_dtype: precision of convolutions and matmuls (float32 default; bfloat16 for
      speed; float64 for gradient checks); norms, softmax and the EDM algebra run in
      ``accum_dtype(compute_dtype)``.
    remat: rematerialise each U-Net block in reverse mode
      (:func:`jaxguide.model.layers.call_block`).
    scan_blocks: one ``lax.scan`` per run of identical blocks (None: the default of
      :data:`jaxguide.model.unet.SCAN_BLOCKS`, unrolled for bfloat16).
    """

    compute_dtype: Any = jnp.float32
    remat: bool = False
    scan_blocks: bool | None = None
