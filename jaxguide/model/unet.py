"""cBottle's HEALPix U-Net (``unet_hpx64``: SongUNet on HEALPix level 6) in Flax NNX.

The image model (``SongUNetHPX64``, time_length 1) and the video model
(``SongUNetHPX64Video``, time_length T > 1) in one code path: the block layout of the
encoder and decoder as cBottle names them, runs of identical blocks as one ``lax.scan``
each, and :class:`CBottleUNet`, the raw network F (the EDM preconditioning around it is
:mod:`jaxguide.model.precond`). Activations are channels-last ``(batch, time, pixel,
channel)``, pixels in the network's HEALPix order ("net").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxguide.model.config import (
    ATTN_RESOLUTIONS,
    CALENDAR_EMBED_CHANNELS,
    CHANNEL_MULT,
    CHANNEL_MULT_EMB,
    NPIX,
    NSIDE,
    NUM_BLOCKS,
    ModelConfig,
)
from jaxguide.model.embedding import calendar_embedding, noise_embedding
from jaxguide.model.inputs import Conditioning, ForwardOptions
from jaxguide.model.layers import GroupNorm, HealpixConv, Linear, UNetBlock, accum_dtype, call_block

# Default of ``ForwardOptions.scan_blocks`` (None): runs of identical U-Net blocks as one
# ``lax.scan`` each (see scan_run); False unrolls every block (the former program).
SCAN_BLOCKS = True


class BlockSpec(NamedTuple):
    """One entry of the U-Net: cBottle's module name, widths, resampling and attention."""

    name: str
    cin: int
    cout: int
    resample: str | None
    attention: bool  # spatial attention (the 8x8 level)
    temporal: bool  # temporal attention (video model only)


def encoder_layout(config: ModelConfig) -> list[BlockSpec]:
    """Every encoder entry, in cBottle's order (temporal attention in every block of the video model)."""
    mc = config.model_channels
    cout = config.out_channels + config.condition_channels + 4 * CALENDAR_EMBED_CHANNELS
    video = config.is_video
    layout = []
    for level, mult in enumerate(CHANNEL_MULT):
        res = NSIDE >> level
        if level == 0:
            layout.append(BlockSpec(f"{res}x{res}_conv_embed", cout, mc, None, False, False))
            cout = mc
        else:
            layout.append(BlockSpec(f"{res}x{res}_down", cout, cout, "down", False, False))
        for idx in range(NUM_BLOCKS):
            cin, cout = cout, mc * mult
            layout.append(BlockSpec(f"{res}x{res}_block{idx}", cin, cout, None, res in ATTN_RESOLUTIONS, video))
    return layout


def decoder_layout(config: ModelConfig) -> list[BlockSpec]:
    """Every decoder block, in cBottle's order (video: temporal attention in ``in0``, the
    ``_up`` blocks and the last block of each level)."""
    mc = config.model_channels
    video = config.is_video
    skips = [spec.cout for spec in encoder_layout(config)]
    cout = skips[-1]
    layout = []
    for level in reversed(range(len(CHANNEL_MULT))):
        mult = CHANNEL_MULT[level]
        res = NSIDE >> level
        if level == len(CHANNEL_MULT) - 1:
            layout.append(BlockSpec(f"{res}x{res}_in0", cout, cout, None, True, video))
            layout.append(BlockSpec(f"{res}x{res}_in1", cout, cout, None, False, False))
        else:
            layout.append(BlockSpec(f"{res}x{res}_up", cout, cout, "up", False, video))
        for idx in range(NUM_BLOCKS + 1):
            cin, cout = cout + skips.pop(), mc * mult
            last = idx == NUM_BLOCKS
            layout.append(BlockSpec(f"{res}x{res}_block{idx}", cin, cout, None, last and res in ATTN_RESOLUTIONS, last and video))
    return layout


def takes_skip(name: str) -> bool:
    """Whether the decoder entry ``name`` concatenates an encoder skip to its input
    (every decoder block but ``in0``, ``in1`` and the ``_up`` blocks)."""
    return not (name.endswith("_in0") or name.endswith("_in1") or name.endswith("_up"))


def decoder_skip_channels(config: ModelConfig) -> list[int]:
    """Channels of the skip each decoder entry pops (0: none), in ``decoder_layout`` order.

    The skips are the encoder entries' outputs, popped last first, as ``decoder_layout``
    pops them to size the blocks' inputs.
    """
    skips = [spec.cout for spec in encoder_layout(config)]
    return [skips.pop() if takes_skip(spec.name) else 0 for spec in decoder_layout(config)]


def encoder_scan_keys(config: ModelConfig) -> list[tuple | None]:
    """Per encoder entry, what an encoder block must share with its neighbours to be
    scanned with them, or None for an entry that is never scanned.

    A block can be a scan step when its output has its input's shape (no resampling,
    cin == cout): the carry of the scan. Blocks with equal keys are built with equal
    arguments (widths, attention, temporal attention), so have equal structure.
    """
    return [
        None if spec.name.endswith("_conv_embed") or spec.resample is not None or spec.cin != spec.cout
        else (spec.cin, spec.cout, spec.attention, spec.temporal)
        for spec in encoder_layout(config)
    ]


def decoder_scan_keys(config: ModelConfig) -> list[tuple | None]:
    """Per decoder entry, its scan key (see :func:`encoder_scan_keys`), or None.

    A decoder block is a scan step when it pops a skip and, fed ``concat(h, skip)``,
    returns h's shape (cin - skip == cout, no resampling); the key includes the skip's
    channel count, so the skips of one run have one shape and stack as the scan's xs.
    """
    return [
        None if skip == 0 or spec.resample is not None or spec.cin - skip != spec.cout
        else (spec.cin, spec.cout, spec.attention, spec.temporal, skip)
        for spec, skip in zip(decoder_layout(config), decoder_skip_channels(config))
    ]


def scan_runs(keys: list) -> list[tuple[int, int]]:
    """Split ``range(len(keys))`` into maximal runs of consecutive equal keys (None: a run
    of one). Returns ``[(start, stop), ...]`` covering every index once, in order."""
    runs: list[tuple[int, int]] = []
    for i, key in enumerate(keys):
        if runs and key is not None and keys[runs[-1][0]] == key:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def stack_states(blocks: list[nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """The blocks' common graph definition and their states stacked on a new leading axis.

    Raises ValueError when the blocks differ in structure. Each leaf: (n, *shape).
    """
    graphdefs, states = zip(*(nnx.split(block) for block in blocks))
    if any(g != graphdefs[0] for g in graphdefs[1:]):
        raise ValueError("blocks of one scan run must have the same structure")
    return graphdefs[0], jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def scan_run(
    blocks: list[UNetBlock], h: jax.Array, emb: jax.Array, skips: jax.Array | None = None, *, remat: bool,
    collect: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """Blocks of identical structure applied in turn, as ONE ``lax.scan`` over their parameters.

    h: (B, T, X, C) -> (B, T, X, C) after the last block; also returns every block's
    output, (n, B, T, X, C) (the encoder's skip connections; None unless ``collect``). With ``skips``
    (n, B, T, X, Cs) (decoder), block i sees ``concat(h, skips[i])``.

    XLA then compiles one block per run instead of one per block ("scan over layers").
    The parameters stay stored per block (converter, checkpoints and parameter names
    unchanged) and are stacked here, inside the traced call: one copy of the scanned
    blocks' parameters per network call, negligible next to the forward pass it feeds
    (e.g. ~0.27 GB for the released model, whose forward is ~1 TFLOP). ``remat`` is
    applied per step (:func:`call_block`), so it acts per block as in the unrolled net.
    """
    graphdef, stacked = stack_states(blocks)

    def step(carry, xs):
        state, skip = xs
        x = carry if skip is None else jnp.concatenate([carry, skip], axis=-1)
        out = call_block(nnx.merge(graphdef, state), x, emb, remat=remat)
        return out, out if collect else None

    return jax.lax.scan(step, h, (stacked, skips))


class CBottleUNet(nnx.Module):
    """SongUNet on HEALPix level 6 as cBottle builds it: ``SongUNetHPX64`` (time_length 1) or
    ``SongUNetHPX64Video`` (time_length T > 1: temporal attention, multi-head attention).

    One code path for both: activations are (B, T, X, C); T = 1 is the image model.
    Call with the preconditioned input; returns the raw network output F.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        config.check_supported()
        mc = config.model_channels
        emb = mc * CHANNEL_MULT_EMB
        self.config = config
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (NPIX, mc), jnp.float32))
        self.map_label = Linear(config.label_dim, mc, rngs=rngs) if config.label_dim else None
        self.map_layer0 = Linear(mc, emb, rngs=rngs)
        self.map_layer1 = Linear(emb, emb, rngs=rngs)

        def block(spec: BlockSpec) -> UNetBlock:
            return UNetBlock(
                spec.cin,
                spec.cout,
                emb,
                resample=spec.resample,
                attention=spec.attention,
                temporal_attention=spec.temporal,
                heads=config.attention_heads(spec.cout),
                time_length=config.time_length,
                rngs=rngs,
            )

        enc: dict[str, nnx.Module] = {}
        for spec in encoder_layout(config):
            if spec.name.endswith("_conv_embed"):
                enc[spec.name] = HealpixConv(spec.cin, spec.cout, 3, rngs=rngs)
            else:
                enc[spec.name] = block(spec)
        self.enc = nnx.Dict(enc)
        self.enc_order = tuple(spec.name for spec in encoder_layout(config))
        self.dec = nnx.Dict({spec.name: block(spec) for spec in decoder_layout(config)})
        self.dec_order = tuple(spec.name for spec in decoder_layout(config))
        self.aux_norm = GroupNorm(mc)
        self.aux_conv = HealpixConv(mc, config.out_channels, 3, rngs=rngs)
        if config.enable_classifier:
            last = mc * CHANNEL_MULT[-1]
            self.classifier_conv0 = HealpixConv(last, 32, 3, rngs=rngs)
            self.classifier_norm = GroupNorm(32, eps=1e-5, groups=8)
            self.classifier_conv1 = HealpixConv(32, 1, 1, rngs=rngs)
        else:
            self.classifier_conv0 = self.classifier_norm = self.classifier_conv1 = None

    def _encoder_entry(self, name: str, h: jax.Array, emb: jax.Array, acts: dict | None, remat: bool) -> jax.Array:
        """One encoder entry, unrolled: (B, T, X, C) -> (B, T, X', C'); records into ``acts``."""
        block = self.enc[name]
        if name.endswith("_conv_embed"):
            h = block(h)
            if acts is not None:
                acts["enc." + name] = h
            return h + self.pos_embed[...].astype(h.dtype)
        if acts is None:
            return call_block(block, h, emb, remat=remat)
        h = block(h, emb, acts, "enc." + name)
        acts["enc." + name] = h
        return h

    def embedding(self, c_noise: jax.Array, class_labels: jax.Array | None) -> jax.Array:
        """Noise + label embedding fed to every block (shared by all frames). (B,), (B or 1, label_dim) -> (B, 4 mc)."""
        emb = noise_embedding(c_noise, self.config.model_channels)
        if self.map_label is not None:
            labels = class_labels.astype(c_noise.dtype) * np.float32(np.sqrt(self.config.label_dim))
            emb = emb + self.map_label(labels)
        emb = jax.nn.silu(self.map_layer0(emb))
        return jax.nn.silu(self.map_layer1(emb))

    def __call__(
        self,
        x: jax.Array,
        c_noise: jax.Array,
        cond: Conditioning,
        options: ForwardOptions = ForwardOptions(),
        *,
        return_intermediates: bool = False,
    ):
        """x: (B, T, X, C_in) preconditioned input (c_in x, condition), channels last;
        c_noise: (B,); cond: the calendar ``second_of_day``, ``day_of_year`` (B, T) per
        frame and ``class_labels`` (B or 1, label_dim) or None for a model without labels
        (its ``condition`` is already part of x).

        ``options.remat``: recompute each UNetBlock in the backward pass (see
        :func:`call_block`; ignored with ``return_intermediates``).
        ``options.scan_blocks`` (None: the module default ``SCAN_BLOCKS``, True, for float32 and
        float64; unrolled for bfloat16, whose rounding it changes): each maximal run
        of consecutive blocks of identical structure and shapes (:func:`encoder_scan_keys`,
        :func:`decoder_scan_keys`) runs as one ``lax.scan`` (:func:`scan_run`), so XLA
        compiles each distinct block once; False unrolls every block. Same values to
        float32 round-off. ``return_intermediates`` always unrolls (it records every block).
        Returns F (B, T, X, out_channels) in ``accum_dtype(compute_dtype)`` (and a dict of
        activations (B, T, X', C) if asked; the classifier logits are among them when the
        config has a classifier).
        """
        compute_dtype, remat, scan_blocks = options.compute_dtype, options.remat, options.scan_blocks
        acts = {} if return_intermediates else None
        cal = calendar_embedding(cond.second_of_day, cond.day_of_year, legacy=self.config.calendar_include_legacy_bug)
        acc = accum_dtype(compute_dtype)
        h = jnp.concatenate([x.astype(acc), cal.astype(acc)], axis=-1).astype(compute_dtype)
        emb = self.embedding(c_noise.astype(acc), cond.class_labels)
        if acts is not None:
            acts["embed_calendar"] = cal
            acts["emb"] = emb
        if scan_blocks is None:
            # bfloat16 stays unrolled: XLA rounds a scanned block's activations where the
            # unrolled program fuses across blocks, and at sigma 150 the largest deviation
            # from cBottle's float32 output doubled (0.24 -> 0.56 x RMS; tests/test_precision)
            scan_blocks = SCAN_BLOCKS and jnp.dtype(compute_dtype).itemsize >= 4
        scan = scan_blocks and acts is None
        enc_runs = scan_runs(encoder_scan_keys(self.config) if scan else [None] * len(self.enc_order))
        dec_runs = scan_runs(decoder_scan_keys(self.config) if scan else [None] * len(self.dec_order))
        skips = []
        for start, stop in enc_runs:
            if stop - start > 1:
                h, outs = scan_run([self.enc[n] for n in self.enc_order[start:stop]], h, emb, remat=remat)
                skips.extend(outs[i] for i in range(stop - start))
            else:
                h = self._encoder_entry(self.enc_order[start], h, emb, acts, remat)
                skips.append(h)
        if self.classifier_conv0 is not None and acts is not None:
            logits = jax.nn.relu(self.classifier_conv0(h))
            logits = self.classifier_conv1(self.classifier_norm(logits).astype(h.dtype))
            acts["classifier_logits"] = logits.astype(acc)
        for start, stop in dec_runs:
            names = self.dec_order[start:stop]
            if len(names) > 1:
                popped = [skips.pop() for _ in names]
                if len({(s.shape, s.dtype) for s in popped}) != 1:
                    raise ValueError(f"decoder blocks {names} pop skips of different shapes: {[s.shape for s in popped]}")
                h, _ = scan_run([self.dec[n] for n in names], h, emb, jnp.stack(popped), remat=remat, collect=False)
                continue
            name = names[0]
            if takes_skip(name):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            if acts is None:
                h = call_block(self.dec[name], h, emb, remat=remat)
            else:
                h = self.dec[name](h, emb, acts, "dec." + name)
                acts["dec." + name] = h
        h = self.aux_norm(h)
        out = self.aux_conv(jax.nn.silu(h).astype(compute_dtype)).astype(acc)
        if acts is not None:
            acts["dec.aux_norm"] = h
            acts["dec.aux_conv"] = out
        return (out, acts) if return_intermediates else out
