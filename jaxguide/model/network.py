"""cBottle's HEALPix U-Net (``unet_hpx64``: SongUNet on HEALPix level 6) in Flax NNX.

A port of the networks that cBottle's coarse models run, numerically faithful to its
eval-mode PyTorch code: the image model (``SongUNetHPX64``, time_length 1) and the video
model (``SongUNetHPX64Video``, time_length T > 1) in one code path. Group norms with
unbiased variance in float32 over all frames; attention over all 768 pixels of each frame
at the 8x8 level with q/k/v interleaved per head (one head for images, channels // 64 for
video); temporal attention across frames with a relative-position bias (video);
HEALPix-padded 3x3 convolutions per frame; the calendar embedding per frame in float32;
the EDM preconditioning (sigma_data = 0.5).

Layout: the public functions take cBottle's layout ``(batch, channel, time, pixel)``
in the network's pixel order (``healpix`` order "net"). Inside, activations are
channels-last ``(batch, time, pixel, channel)``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxguide.grid import healpix
from jaxguide.model.config import (
    ATTN_RESOLUTIONS,
    CALENDAR_EMBED_CHANNELS,
    CHANNEL_MULT,
    CHANNEL_MULT_EMB,
    GN_EPS,
    HPX64_LEVEL,
    NUM_BLOCKS,
    SIGMA_DATA,
    ModelConfig,
)

SKIP_SCALE = float(np.sqrt(0.5))
NSIDE = 2**HPX64_LEVEL
NPIX = 12 * NSIDE * NSIDE
# Default of ``CBottleUNet.__call__(scan_blocks=...)``: runs of identical U-Net blocks as one
# ``lax.scan`` each (see scan_run); False unrolls every block (the former program).
SCAN_BLOCKS = True


def num_groups(channels: int, cap: int = 32, min_per_group: int = 4) -> int:
    """cBottle's group count: ``min(32, ceil(C / 4))``; C must divide evenly."""
    g = min(cap, (channels + min_per_group - 1) // min_per_group)
    if channels % g:
        raise ValueError(f"{channels} channels cannot be split into {g} groups")
    return g


def accum_dtype(compute_dtype) -> jnp.dtype:
    """Precision of norms, softmax and the EDM algebra: at least float32 (cBottle's rule)."""
    return jnp.promote_types(compute_dtype, jnp.float32)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    return jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(max(fan_in, 1))


# --------------------------------------------------------------------------------------
# Layers


class Linear(nnx.Module):
    """``y = x @ kernel + bias``; kernel (in, out) (PyTorch's weight transposed)."""

    def __init__(self, fin: int, fout: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (fin, fout), fin))
        self.bias = nnx.Param(jnp.zeros((fout,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class GroupNorm(nnx.Module):
    """cBottle's eval-mode GroupNorm: per (sample, group) over (channels of the group, frames, pixels).

    Computed in (at least) float32 with the unbiased (n - 1) variance, as cBottle's
    inference path. Statistics span every axis between the first and the last, so a
    video state (B, T, X, C) is normalised over all its frames, as cBottle does.
    """

    def __init__(self, channels: int, *, eps: float = GN_EPS, groups: int | None = None, silu: bool = False):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.groups = groups if groups is not None else num_groups(channels)
        self.eps = eps
        self.silu = silu

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, ..., C) -> same shape, in float32 (float64 for float64 input)."""
        b, c = x.shape[0], x.shape[-1]
        xg = x.astype(accum_dtype(x.dtype)).reshape(b, -1, self.groups, c // self.groups)
        mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
        dev = xg - mean
        n = xg.shape[1] * xg.shape[3]
        var = jnp.sum(dev * dev, axis=(1, 3), keepdims=True) / (n - 1)
        y = (dev * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * self.scale[...].astype(y.dtype) + self.bias[...].astype(y.dtype)
        return jax.nn.silu(y) if self.silu else y


def downsample(x: jax.Array) -> jax.Array:
    """2x2 mean per face (filter [1, 1], stride 2). (..., 12 n^2, C) -> (..., 3 n^2, C)."""
    *lead, npix, c = x.shape
    n = healpix.nside_of_npix(npix)
    f = x.reshape(*lead, 12, n // 2, 2, n // 2, 2, c)
    quarter = jnp.asarray(0.25, x.dtype)
    y = (f[..., :, 0, :, 0, :] * quarter + f[..., :, 0, :, 1, :] * quarter) + (
        f[..., :, 1, :, 0, :] * quarter + f[..., :, 1, :, 1, :] * quarter
    )
    return y.reshape(*lead, 12 * (n // 2) ** 2, c)


def upsample(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 per face. (..., 12 n^2, C) -> (..., 48 n^2, C)."""
    *lead, npix, c = x.shape
    n = healpix.nside_of_npix(npix)
    f = x.reshape(*lead, 12, n, 1, n, 1, c)
    f = jnp.broadcast_to(f, (*lead, 12, n, 2, n, 2, c))
    return f.reshape(*lead, 12 * 4 * n * n, c)


_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x: jax.Array, w: jax.Array, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, window_strides=(1, 1), padding=padding, dimension_numbers=_CONV_DIMS)


@jax.custom_vjp
def conv3x3_valid(padded: jax.Array, w: jax.Array) -> jax.Array:
    """3x3 "VALID" convolution of padded images. (N, n+2, n+2, Cin), (3, 3, Cin, Cout) -> (N, n, n, Cout).

    Same values as ``lax.conv_general_dilated``; only the derivative with respect to the
    input is written out. JAX transposes a convolution into one whose kernel is labelled
    (out, in) ("01oi"). XLA:CPU canonicalises such a convolution for its fast (Eigen)
    kernels only in a program's entry computation: inside a loop body (the sampler's
    ``lax.scan``, a CG loop) it fell back to a generic loop emitter, 2-4x slower, and an
    MMPS ensemble sampled 2.1x slower than its denoiser calls run alone. Here the input
    gradient is a forward convolution of the cotangent (padded by 2) with the kernel
    flipped in space and transposed to (3, 3, Cout, Cin): canonical everywhere. Reverse
    mode only (``jax.jvp`` through it is not supported, as for every ``custom_vjp``).
    """
    return _conv(padded, w, "VALID")


def _conv3x3_fwd(padded, w):
    return _conv(padded, w, "VALID"), (padded, w)


def _conv3x3_bwd(residuals, g):
    padded, w = residuals
    w_t = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)
    g_padded = _conv(g, w_t, ((2, 2), (2, 2)))
    # the kernel's gradient (only when parameters are differentiated; XLA drops it otherwise)
    g_w = jax.vjp(lambda k: _conv(padded, k, "VALID"), w)[1](g)[0]
    return g_padded, g_w


conv3x3_valid.defvjp(_conv3x3_fwd, _conv3x3_bwd)


class HealpixConv(nnx.Module):
    """Optional resampling, then a k x k convolution of each face of each frame (k = 1 or 3).

    3x3 kernels see each face padded by one pixel from its HEALPix neighbours.
    kernel: (k, k, in, out) for k = 3 (PyTorch's (out, in, kh, kw) transposed), (in, out) for k = 1.
    """

    def __init__(self, cin: int, cout: int, kernel: int, *, resample: str | None = None, rngs: nnx.Rngs):
        if kernel not in (1, 3):
            raise ValueError(f"kernel must be 1 or 3, got {kernel}")
        shape = (cin, cout) if kernel == 1 else (kernel, kernel, cin, cout)
        self.kernel = nnx.Param(_normal(rngs, shape, cin * kernel * kernel))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.size = kernel
        self.resample = resample

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., X, Cin) -> (..., X', Cout); leading axes (batch, frames) are independent images."""
        if self.resample == "down":
            x = downsample(x)
        elif self.resample == "up":
            x = upsample(x)
        w = self.kernel[...].astype(x.dtype)
        if self.size == 1:
            return x @ w + self.bias[...].astype(x.dtype)
        *lead, npix, cin = x.shape
        n = healpix.nside_of_npix(npix)
        padded = healpix.pad(x, 1).reshape(-1, n + 2, n + 2, cin)
        y = conv3x3_valid(padded, w)
        return y.reshape(*lead, npix, -1) + self.bias[...].astype(x.dtype)


def _scaled_by_rsqrt(k: jax.Array, c: int) -> jax.Array:
    """``k / sqrt(c)`` rounded as PyTorch rounds it (a multiply when 1/sqrt(c) is exact)."""
    root = float(np.float32(np.sqrt(c)))
    if math.frexp(root)[0] == 0.5:  # a power of two: the reciprocal is exact
        return k * jnp.asarray(1.0 / root, k.dtype)
    return _divide_ieee(k, root)


class Attention(nnx.Module):
    """cBottle's SpatialAttention: self-attention over all pixels of each frame (the 8x8 level).

    The qkv 1x1 conv output (3C channels) is split per head and interleaved, as cBottle
    reshapes it: channel ``h*3c + 3i + j`` is element i of head h of q (j = 0), k (1),
    v (2), with c = C / heads; head h writes output channels ``h*c .. h*c + c - 1``.
    The image model has one head (q = 0::3, k = 1::3, v = 2::3).
    """

    def __init__(self, channels: int, *, heads: int = 1, rngs: nnx.Rngs):
        if heads < 1 or channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
        self.norm2 = GroupNorm(channels)
        self.qkv = HealpixConv(channels, 3 * channels, 1, rngs=rngs)
        self.proj = HealpixConv(channels, channels, 1, rngs=rngs)
        self.heads = heads

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, T, X, C) -> (B, T, X, C), residual included (not yet scaled)."""
        b, t, npix, ch = x.shape
        c = ch // self.heads
        # the norm of the spatial attention is per frame (cBottle runs it on (b t) c 1 x)
        h = self.norm2(x.reshape(b * t, npix, ch)).reshape(x.shape).astype(x.dtype)
        qkv = self.qkv(h).reshape(b, t, npix, self.heads, c, 3)
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]  # (B, T, X, H, c)
        acc = accum_dtype(x.dtype)
        logits = jnp.einsum("btqhc,btkhc->bthqk", q.astype(acc), _scaled_by_rsqrt(k, c).astype(acc))
        w = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        a = jnp.einsum("bthqk,btkhc->btqhc", w, v).reshape(x.shape)
        return self.proj(a) + x


class TemporalAttention(nnx.Module):
    """cBottle's TemporalAttention: self-attention across the T frames of each pixel.

    Differs from the spatial attention in four ways (fixtures README section 8.3):
    GroupNorm eps 1e-5 with statistics over all frames; q, k, v are three contiguous
    blocks of the qkv output (heads contiguous inside each); a learned relative-position
    bias ``P[h, t_q - t_k + T - 1]`` (table (heads, 2T), last column unused) is added
    to the logits; the residual is added by the block, not here. Computed in float32.
    """

    def __init__(self, channels: int, time_length: int, *, heads: int, rngs: nnx.Rngs):
        if heads < 1 or channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
        self.norm2 = GroupNorm(channels, eps=1e-5)
        self.qkv = HealpixConv(channels, 3 * channels, 1, rngs=rngs)
        self.proj = HealpixConv(channels, channels, 1, rngs=rngs)
        self.positional_embedding = nnx.Param(_normal(rngs, (heads, 2 * time_length), 2 * time_length))
        self.heads = heads
        self.time_length = time_length

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, T, X, C) -> TA(x) (B, T, X, C) in x's dtype (no residual)."""
        b, t, npix, ch = x.shape
        if t != self.time_length:
            raise ValueError(f"temporal attention built for {self.time_length} frames got {t}")
        c = ch // self.heads
        acc = accum_dtype(x.dtype)
        xf = x.astype(acc)
        qkv = self.qkv(self.norm2(xf).astype(acc))
        q, k, v = (qkv[..., i * ch : (i + 1) * ch].reshape(b, t, npix, self.heads, c) for i in range(3))
        logits = jnp.einsum("bqxhc,bkxhc->bxhqk", q, _scaled_by_rsqrt(k, c))
        steps = np.arange(t)
        offset = steps[:, None] - steps[None, :] + t - 1  # (T_q, T_k)
        bias = self.positional_embedding[...].astype(acc)[:, offset]  # (H, T_q, T_k)
        w = jax.nn.softmax(logits + bias, axis=-1)
        out = jnp.einsum("bxhqk,bkxhc->bqxhc", w, v).reshape(b, t, npix, ch)
        return self.proj(out).astype(x.dtype)


class UNetBlock(nnx.Module):
    """cBottle's UNetBlock (adaptive_scale=False, skip_scale=sqrt(1/2)), optional spatial and temporal attention."""

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_channels: int,
        *,
        resample: str | None = None,
        attention: bool = False,
        temporal_attention: bool = False,
        heads: int = 1,
        time_length: int = 1,
        rngs: nnx.Rngs,
    ):
        self.norm0 = GroupNorm(cin, silu=True)
        self.conv0 = HealpixConv(cin, cout, 3, resample=resample, rngs=rngs)
        self.affine = Linear(emb_channels, cout, rngs=rngs)
        self.norm1 = GroupNorm(cout, silu=True)
        self.conv1 = HealpixConv(cout, cout, 3, rngs=rngs)
        needs_skip = cin != cout or resample is not None
        self.skip = HealpixConv(cin, cout, 1, resample=resample, rngs=rngs) if needs_skip else None
        self.attn = Attention(cout, heads=heads, rngs=rngs) if attention else None
        self.tattn = TemporalAttention(cout, time_length, heads=heads, rngs=rngs) if temporal_attention else None
        self.out_channels = cout

    def __call__(self, x: jax.Array, emb: jax.Array, acts: dict | None = None, name: str = "") -> jax.Array:
        """x: (B, T, X, Cin), emb: (B, E) -> (B, T, X', Cout). Records attention outputs in ``acts``."""
        dtype = x.dtype
        scale = jnp.asarray(SKIP_SCALE, dtype)
        h = self.conv0(self.norm0(x).astype(dtype))
        h = h + self.affine(emb).astype(dtype)[:, None, None, :]
        h = self.conv1(self.norm1(h).astype(dtype))
        h = (h + (self.skip(x) if self.skip is not None else x)) * scale
        if self.attn is not None:
            a = self.attn(h)
            if acts is not None:
                acts[name + ".attn"] = a
            h = a * scale
        if self.tattn is not None:
            ta = self.tattn(h)
            if acts is not None:
                acts[name + ".temporal_attention"] = ta
            h = (ta + h) * scale
        return h


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _remat_block(graphdef, state, x: jax.Array, emb: jax.Array) -> jax.Array:
    """``UNetBlock(x, emb)`` that keeps only its inputs for the backward pass."""
    return nnx.merge(graphdef, state)(x, emb)


def _remat_block_fwd(graphdef, state, x, emb):
    return _remat_block(graphdef, state, x, emb), (state, x, emb)


def _remat_block_bwd(graphdef, residuals, g):
    state, x, emb = residuals
    # Make the recomputation depend on the cotangent g through an exact zero (0 * a finite
    # element of g; XLA does not fold float x * 0). Without a data dependency XLA may run
    # every block's recomputation during the forward pass, when all the inputs exist, and
    # hold all activations at once again: with jax.checkpoint per block (or an
    # optimization_barrier, which XLA:CPU drops) the compiled guided step needed as much
    # memory as without rematerialisation.
    g0 = jnp.ravel(g)[0]
    x = x + (jnp.where(jnp.isfinite(g0), g0, 0) * 0).astype(x.dtype)
    # (healpix.pad's own VJP has no zero-initialised full-size buffer, which XLA:CPU would
    # allocate for every block at the start of the program)
    _, vjp = jax.vjp(lambda s, a, e: nnx.merge(graphdef, s)(a, e), state, x, emb)
    return vjp(g)


_remat_block.defvjp(_remat_block_fwd, _remat_block_bwd)


def call_block(block: UNetBlock, x: jax.Array, emb: jax.Array, *, remat: bool) -> jax.Array:
    """``block(x, emb)``; with ``remat`` its activations are recomputed in reverse mode.

    Rematerialisation keeps only the block's inputs (x, emb, parameters) for the
    backward pass, which recomputes the block's forward once the cotangent arrives, so
    a VJP through the U-Net holds about one block's activations at a time instead of
    all of them (one extra forward of compute). Same values and gradients. It acts in
    reverse mode (VJP, grad), the mode guidance uses; forward mode is not supported.
    """
    if not remat:
        return block(x, emb)
    graphdef, state = nnx.split(block)
    return _remat_block(graphdef, state, x, emb)


# --------------------------------------------------------------------------------------
# Embeddings


@functools.lru_cache(maxsize=None)
def lon_shift_seconds() -> np.ndarray:
    """``floor(lon * 86400 / 360)`` per network pixel, evaluated in float32 as cBottle does.

    (In float64 it differs at 380 of 49152 pixels, which moves D by ~5e-4 x RMS.)
    """
    lon = healpix.lonlat(NSIDE, "net")[0].astype(np.float32)
    shift = np.floor_divide(lon * np.float32(86400), np.float32(360)).astype(np.float32)
    shift.setflags(write=False)
    return shift


def _divide_ieee(x: jax.Array, divisor: float) -> jax.Array:
    """``x / divisor`` correctly rounded, as PyTorch computes it.

    XLA's algebraic simplifier rewrites a division by a constant (or by a broadcast
    scalar) into a multiplication by its rounded reciprocal, which is 1 ulp off for
    many inputs; in the calendar that ulp is multiplied by 2 pi k (up to 50) before
    sin/cos and showed up as 4e-6 errors in the embedding and 4.5e-4 x RMS in D at
    sigma 80. Dividing by a full-shape array behind an optimisation barrier keeps the
    true division.
    """
    # the divisor is built from x so that it has x's shape under vmap too (a broadcast
    # divisor would be rewritten again)
    d = jax.lax.optimization_barrier(x * 0 + jnp.asarray(divisor, x.dtype))
    return jax.lax.div(x, d)


def _frequency_features(t: jax.Array, count: int) -> jax.Array:
    """[cos(2 pi k t), sin(2 pi k t)] for k = 1..count, 2 pi k formed in float32."""
    freqs = np.float32(2 * math.pi) * np.arange(1, count + 1, dtype=np.float32)
    arg = t[..., None] * freqs
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def calendar_embedding(
    second_of_day: jax.Array, day_of_year: jax.Array, *, legacy: bool, count: int = CALENDAR_EMBED_CHANNELS
) -> jax.Array:
    """cBottle's CalendarEmbedding, per frame. (B, T) seconds / fractional 0-based days -> (B, T, X, 4*count).

    Channels: cos/sin of local time of day (k = 1..count), then cos/sin of the year fraction.
    ``legacy=True`` reproduces the sign error of the released image checkpoints
    (``second_of_day - lon_shift``); ``False`` (cBottle's training default, the video model) adds it.
    Every step is float32 and rounded as PyTorch rounds it (see :func:`_divide_ieee`).
    """
    shift = jnp.asarray(lon_shift_seconds())
    sod = jnp.asarray(second_of_day).astype(jnp.float32)[..., None]  # (B, T, 1), float32 as cBottle
    doy = jnp.asarray(day_of_year).astype(jnp.float32)  # (B, T)
    local = jnp.remainder(sod - shift if legacy else sod + shift, jnp.float32(86400))  # (B, T, X)
    day = _frequency_features(_divide_ieee(local, 86400.0), count)  # (B, T, X, 2c)
    year_fraction = jnp.remainder(_divide_ieee(doy, 365.25), jnp.float32(1))
    year = _frequency_features(year_fraction, count)  # (B, T, 2c)
    year = jnp.broadcast_to(year[:, :, None, :], day.shape)
    return jnp.concatenate([day, year], axis=-1)


def noise_embedding(c_noise: jax.Array, channels: int) -> jax.Array:
    """EDM positional embedding (endpoint form), halves swapped to [sin, cos]. (B,) -> (B, channels)."""
    half = channels // 2
    freqs = np.arange(half, dtype=np.float32) / np.float32(half - 1)
    freqs = np.float32(1 / 10000) ** freqs
    arg = c_noise[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=1)


# --------------------------------------------------------------------------------------
# The U-Net


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
        class_labels: jax.Array | None,
        second_of_day: jax.Array,
        day_of_year: jax.Array,
        *,
        compute_dtype: jnp.dtype = jnp.float32,
        return_intermediates: bool = False,
        remat: bool = False,
        scan_blocks: bool | None = None,
    ):
        """x: (B, T, X, C_in) preconditioned input (c_in x, condition), channels last;
        second_of_day, day_of_year: (B, T) per frame.

        ``remat``: recompute each UNetBlock in the backward pass (see :func:`call_block`;
        ignored with ``return_intermediates``).
        ``scan_blocks`` (None: the module default ``SCAN_BLOCKS``, True, for float32 and
        float64; unrolled for bfloat16, whose rounding it changes): each maximal run
        of consecutive blocks of identical structure and shapes (:func:`encoder_scan_keys`,
        :func:`decoder_scan_keys`) runs as one ``lax.scan`` (:func:`scan_run`), so XLA
        compiles each distinct block once; False unrolls every block. Same values to
        float32 round-off. ``return_intermediates`` always unrolls (it records every block).
        Returns F (B, T, X, out_channels) in ``accum_dtype(compute_dtype)`` (and a dict of
        activations (B, T, X', C) if asked; the classifier logits are among them when the
        config has a classifier).
        """
        acts = {} if return_intermediates else None
        cal = calendar_embedding(second_of_day, day_of_year, legacy=self.config.calendar_include_legacy_bug)
        acc = accum_dtype(compute_dtype)
        h = jnp.concatenate([x.astype(acc), cal.astype(acc)], axis=-1).astype(compute_dtype)
        emb = self.embedding(c_noise.astype(acc), class_labels)
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


# --------------------------------------------------------------------------------------
# EDM preconditioning


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
    *,
    class_labels: jax.Array | None,
    condition: jax.Array | None,
    second_of_day: jax.Array,
    day_of_year: jax.Array,
    compute_dtype: jnp.dtype = jnp.float32,
    return_intermediates: bool = False,
    remat: bool = False,
    scan_blocks: bool | None = None,
):
    """cBottle's EDMPrecond: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, ...).

    Args (cBottle layout, network pixel order, normalised units; T = the model's time_length,
    1 for the image model):
      x: (B, C, T, X) noisy state.  sigma: scalar or (B,) noise level (one per window).
      class_labels: (B, label_dim) one-hot (or None: zeros, as cBottle).
      condition: (B, condition_channels, T, X): the encoded SST (image model), or for the
        video model ``[target * mask (C), SST (1), mask (1)]`` per frame; NaN becomes 0.
      second_of_day, day_of_year: (B, T) float32 per frame (``conditioning.calendar_inputs``).
      compute_dtype: precision of convolutions and matmuls (float32 default; bfloat16 for
        speed; float64 for gradient checks). Norms, softmax and the EDM algebra run in
        ``accum_dtype(compute_dtype)``: float32, as cBottle, unless float64 is asked for.
      remat: rematerialise each U-Net block in reverse mode: a VJP through D (guidance)
        keeps ~one block's activations instead of all, for one extra forward of compute.
      scan_blocks: one ``lax.scan`` per run of identical blocks (None: ``SCAN_BLOCKS``); see
        :meth:`CBottleUNet.__call__`.
    Returns D: (B, C, T, X) in ``accum_dtype(compute_dtype)``.
    """
    cfg = model.config
    acc = accum_dtype(compute_dtype)
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
        if condition is None:
            raise ValueError(
                f"this model needs a condition with {cfg.condition_channels} channel(s) "
                + ("(target * mask, SST, mask)" if cfg.is_video else "(the SST)")
            )
        cond = jnp.nan_to_num(jnp.asarray(condition).astype(acc), nan=0.0)
        want = (b, cfg.condition_channels, t, npix)
        try:
            if np.broadcast_shapes(cond.shape, want) != want:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"condition has shape {cond.shape}; this model expects "
                f"(batch, {cfg.condition_channels}, {cfg.time_length}, {NPIX}) (batch, channel, time, pixel)"
            ) from None
        cond = jnp.broadcast_to(cond, want)
        parts.append(jnp.transpose(cond, (0, 2, 3, 1)))
    if cfg.label_dim:
        labels = jnp.zeros((1, cfg.label_dim), jnp.float32) if class_labels is None else class_labels
        labels = jnp.asarray(labels).astype(acc).reshape(-1, cfg.label_dim)
    else:
        labels = None
    sod = jnp.broadcast_to(jnp.asarray(second_of_day, jnp.float32).reshape(-1, t), (b, t))
    doy = jnp.broadcast_to(jnp.asarray(day_of_year, jnp.float32).reshape(-1, t), (b, t))
    out = model(
        jnp.concatenate(parts, axis=-1),
        c_noise,
        labels,
        sod,
        doy,
        compute_dtype=compute_dtype,
        return_intermediates=return_intermediates,
        remat=remat,
        scan_blocks=scan_blocks,
    )
    f, acts = out if return_intermediates else (out, None)
    f = jnp.transpose(f, (0, 3, 1, 2))  # (B, C, T, X)
    d = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * f
    if return_intermediates:
        acts.update(F=f, c_skip=c_skip, c_out=c_out, c_in=c_in, c_noise=c_noise)
        return d, acts
    return d
