"""The layers of cBottle's HEALPix U-Net in Flax NNX, faithful to its eval-mode PyTorch code.

Linear and GroupNorm (unbiased variance, float32 statistics over all frames), the 2x2
down/up-sampling of each HEALPix face, the padded 3x3 convolution with its input
gradient written out (:func:`conv3x3_valid`), spatial attention over each frame and
temporal attention across frames, the UNetBlock, and the rematerialisation of a block
(:func:`call_block`). Activations are channels-last ``(batch, time, pixel, channel)``,
pixels in the network's HEALPix order ("net").
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxguide.grid import healpix
from jaxguide.model.config import GN_EPS

SKIP_SCALE = float(np.sqrt(0.5))


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


def divide_ieee(x: jax.Array, divisor: float) -> jax.Array:
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
    return divide_ieee(k, root)


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
