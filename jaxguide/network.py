"""cBottle's HEALPix U-Net (``unet_hpx64``: SongUNet on HEALPix level 6) in Flax NNX.

A port of the network that cBottle's coarse model runs, numerically faithful to its
eval-mode PyTorch code: group norms with unbiased variance in float32, one attention
head over all 768 pixels of the 8x8 level with q/k/v interleaved in the qkv output,
HEALPix-padded 3x3 convolutions, the legacy calendar embedding in float32, and the EDM
preconditioning (sigma_data = 0.5).

Layout: the public functions take cBottle's layout ``(batch, channel, time=1, pixel)``
in the network's pixel order (``healpix`` order "net"). Inside, activations are
channels-last ``(batch, pixel, channel)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxguide import healpix
from jaxguide.config import (
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
    """cBottle's eval-mode GroupNorm over (channels of the group, all pixels).

    Computed in (at least) float32 with the unbiased (n - 1) variance, as cBottle's
    inference path.
    """

    def __init__(self, channels: int, *, eps: float = GN_EPS, groups: int | None = None, silu: bool = False):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.groups = groups if groups is not None else num_groups(channels)
        self.eps = eps
        self.silu = silu

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, X, C) -> (B, X, C) in float32 (float64 for float64 input)."""
        b, npix, c = x.shape
        xg = x.astype(accum_dtype(x.dtype)).reshape(b, npix, self.groups, c // self.groups)
        mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
        dev = xg - mean
        var = jnp.sum(dev * dev, axis=(1, 3), keepdims=True) / (npix * (c // self.groups) - 1)
        y = (dev * jax.lax.rsqrt(var + self.eps)).reshape(b, npix, c)
        y = y * self.scale[...].astype(y.dtype) + self.bias[...].astype(y.dtype)
        return jax.nn.silu(y) if self.silu else y


def downsample(x: jax.Array) -> jax.Array:
    """2x2 mean per face (filter [1, 1], stride 2). (B, 12 n^2, C) -> (B, 3 n^2, C)."""
    b, npix, c = x.shape
    n = healpix.nside_of_npix(npix)
    f = x.reshape(b, 12, n // 2, 2, n // 2, 2, c)
    quarter = jnp.asarray(0.25, x.dtype)
    y = (f[:, :, :, 0, :, 0] * quarter + f[:, :, :, 0, :, 1] * quarter) + (
        f[:, :, :, 1, :, 0] * quarter + f[:, :, :, 1, :, 1] * quarter
    )
    return y.reshape(b, 12 * (n // 2) ** 2, c)


def upsample(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 per face. (B, 12 n^2, C) -> (B, 48 n^2, C)."""
    b, npix, c = x.shape
    n = healpix.nside_of_npix(npix)
    f = x.reshape(b, 12, n, 1, n, 1, c)
    f = jnp.broadcast_to(f, (b, 12, n, 2, n, 2, c))
    return f.reshape(b, 12 * 4 * n * n, c)


class HealpixConv(nnx.Module):
    """Optional resampling, then a k x k convolution of each face (k = 1 or 3).

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
        """x: (B, X, Cin) -> (B, X', Cout)."""
        if self.resample == "down":
            x = downsample(x)
        elif self.resample == "up":
            x = upsample(x)
        w = self.kernel[...].astype(x.dtype)
        if self.size == 1:
            return x @ w + self.bias[...].astype(x.dtype)
        b, npix, cin = x.shape
        n = healpix.nside_of_npix(npix)
        padded = healpix.pad(x, 1).reshape(b * 12, n + 2, n + 2, cin)
        y = jax.lax.conv_general_dilated(
            padded, w, window_strides=(1, 1), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y.reshape(b, npix, -1) + self.bias[...].astype(x.dtype)


class Attention(nnx.Module):
    """One-head self-attention over all pixels (cBottle's SpatialAttention at 8x8)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.norm2 = GroupNorm(channels)
        self.qkv = HealpixConv(channels, 3 * channels, 1, rngs=rngs)
        self.proj = HealpixConv(channels, channels, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, X, C) -> (B, X, C), residual included (not yet scaled)."""
        c = x.shape[-1]
        qkv = self.qkv(self.norm2(x).astype(x.dtype))
        # cBottle splits the 3C qkv channels interleaved: q = 0::3, k = 1::3, v = 2::3.
        q, k, v = qkv[..., 0::3], qkv[..., 1::3], qkv[..., 2::3]
        acc = accum_dtype(x.dtype)
        logits = jnp.einsum("bqc,bkc->bqk", q.astype(acc), (k / np.float32(np.sqrt(c))).astype(acc))
        w = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        a = jnp.einsum("bqk,bkc->bqc", w, v)
        return self.proj(a) + x


class UNetBlock(nnx.Module):
    """cBottle's UNetBlock with adaptive_scale=False, skip_scale=sqrt(1/2), optional attention."""

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_channels: int,
        *,
        resample: str | None = None,
        attention: bool = False,
        rngs: nnx.Rngs,
    ):
        self.norm0 = GroupNorm(cin, silu=True)
        self.conv0 = HealpixConv(cin, cout, 3, resample=resample, rngs=rngs)
        self.affine = Linear(emb_channels, cout, rngs=rngs)
        self.norm1 = GroupNorm(cout, silu=True)
        self.conv1 = HealpixConv(cout, cout, 3, rngs=rngs)
        needs_skip = cin != cout or resample is not None
        self.skip = HealpixConv(cin, cout, 1, resample=resample, rngs=rngs) if needs_skip else None
        self.attn = Attention(cout, rngs=rngs) if attention else None
        self.out_channels = cout

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        """x: (B, X, Cin), emb: (B, E) -> (B, X', Cout)."""
        dtype = x.dtype
        h = self.conv0(self.norm0(x).astype(dtype))
        h = h + self.affine(emb).astype(dtype)[:, None, :]
        h = self.conv1(self.norm1(h).astype(dtype))
        h = (h + (self.skip(x) if self.skip is not None else x)) * jnp.asarray(SKIP_SCALE, dtype)
        if self.attn is not None:
            h = self.attn(h) * jnp.asarray(SKIP_SCALE, dtype)
        return h


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


def encoder_layout(config: ModelConfig) -> list[tuple[str, int, int, str | None, bool]]:
    """(name, cin, cout, resample, attention) for each encoder entry, in cBottle's order."""
    mc = config.model_channels
    cout = config.out_channels + config.condition_channels + 4 * CALENDAR_EMBED_CHANNELS
    layout = []
    for level, mult in enumerate(CHANNEL_MULT):
        res = NSIDE >> level
        if level == 0:
            layout.append((f"{res}x{res}_conv_embed", cout, mc, None, False))
            cout = mc
        else:
            layout.append((f"{res}x{res}_down", cout, cout, "down", False))
        for idx in range(NUM_BLOCKS):
            cin, cout = cout, mc * mult
            layout.append((f"{res}x{res}_block{idx}", cin, cout, None, res in ATTN_RESOLUTIONS))
    return layout


def decoder_layout(config: ModelConfig) -> list[tuple[str, int, int, str | None, bool]]:
    """(name, cin, cout, resample, attention) for each decoder block, in cBottle's order."""
    mc = config.model_channels
    skips = [cout for _, _, cout, _, _ in encoder_layout(config)]
    cout = skips[-1]
    layout = []
    for level in reversed(range(len(CHANNEL_MULT))):
        mult = CHANNEL_MULT[level]
        res = NSIDE >> level
        if level == len(CHANNEL_MULT) - 1:
            layout.append((f"{res}x{res}_in0", cout, cout, None, True))
            layout.append((f"{res}x{res}_in1", cout, cout, None, False))
        else:
            layout.append((f"{res}x{res}_up", cout, cout, "up", False))
        for idx in range(NUM_BLOCKS + 1):
            cin, cout = cout + skips.pop(), mc * mult
            attn = idx == NUM_BLOCKS and res in ATTN_RESOLUTIONS
            layout.append((f"{res}x{res}_block{idx}", cin, cout, None, attn))
    return layout


class CBottleUNet(nnx.Module):
    """SongUNet on HEALPix level 6 as cBottle's ``SongUNetHPX64`` builds it.

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
        enc: dict[str, nnx.Module] = {}
        for name, cin, cout, resample, attn in encoder_layout(config):
            if name.endswith("_conv_embed"):
                enc[name] = HealpixConv(cin, cout, 3, rngs=rngs)
            else:
                enc[name] = UNetBlock(cin, cout, emb, resample=resample, attention=attn, rngs=rngs)
        self.enc = nnx.Dict(enc)
        self.enc_order = tuple(name for name, *_ in encoder_layout(config))
        dec = {
            name: UNetBlock(cin, cout, emb, resample=resample, attention=attn, rngs=rngs)
            for name, cin, cout, resample, attn in decoder_layout(config)
        }
        self.dec = nnx.Dict(dec)
        self.dec_order = tuple(name for name, *_ in decoder_layout(config))
        self.aux_norm = GroupNorm(mc)
        self.aux_conv = HealpixConv(mc, config.out_channels, 3, rngs=rngs)
        if config.enable_classifier:
            last = mc * CHANNEL_MULT[-1]
            self.classifier_conv0 = HealpixConv(last, 32, 3, rngs=rngs)
            self.classifier_norm = GroupNorm(32, eps=1e-5, groups=8)
            self.classifier_conv1 = HealpixConv(32, 1, 1, rngs=rngs)
        else:
            self.classifier_conv0 = self.classifier_norm = self.classifier_conv1 = None

    def embedding(self, c_noise: jax.Array, class_labels: jax.Array | None) -> jax.Array:
        """Noise + label embedding fed to every block. (B,), (B or 1, label_dim) -> (B, 4 mc)."""
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
    ):
        """x: (B, X, C_in) preconditioned input (c_in x, condition), channels last.

        Returns F (B, X, out_channels) in ``accum_dtype(compute_dtype)`` (and a dict of activations if asked;
        the classifier logits (B, 768, 1) are among them when the config has a classifier).
        """
        acts = {}
        cal = calendar_embedding(second_of_day, day_of_year, legacy=self.config.calendar_include_legacy_bug)[:, 0]
        acts["embed_calendar"] = cal
        acc = accum_dtype(compute_dtype)
        h = jnp.concatenate([x.astype(acc), cal.astype(acc)], axis=-1).astype(compute_dtype)
        emb = self.embedding(c_noise.astype(acc), class_labels)
        acts["emb"] = emb
        skips = []
        for name in self.enc_order:
            block = self.enc[name]
            if name.endswith("_conv_embed"):
                h = block(h)
                acts["enc." + name] = h
                h = h + self.pos_embed[...].astype(h.dtype)
            else:
                h = block(h, emb)
                acts["enc." + name] = h
            skips.append(h)
        if self.classifier_conv0 is not None:
            logits = jax.nn.relu(self.classifier_conv0(h))
            logits = self.classifier_conv1(self.classifier_norm(logits).astype(h.dtype))
            acts["classifier_logits"] = logits.astype(acc)
        for name in self.dec_order:
            block = self.dec[name]
            if not (name.endswith("_in0") or name.endswith("_in1") or name.endswith("_up")):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = block(h, emb)
            acts["dec." + name] = h
        h = self.aux_norm(h)
        acts["dec.aux_norm"] = h
        out = self.aux_conv(jax.nn.silu(h).astype(compute_dtype)).astype(acc)
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
):
    """cBottle's EDMPrecond: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, ...).

    Args (cBottle layout, network pixel order, normalised units):
      x: (B, C, 1, X) noisy state.  sigma: scalar or (B,) noise level.
      class_labels: (B, label_dim) one-hot (or None: zeros, as cBottle).
      condition: (B, condition_channels, 1, X) encoded SST; NaN becomes 0.
      second_of_day, day_of_year: (B, 1) float32 (see ``conditioning.calendar_inputs``).
      compute_dtype: precision of convolutions and matmuls (float32 default; bfloat16 for
        speed; float64 for gradient checks). Norms, softmax and the EDM algebra run in
        ``accum_dtype(compute_dtype)``: float32, as cBottle, unless float64 is asked for.
    Returns D: (B, C, 1, X) in ``accum_dtype(compute_dtype)``.
    """
    cfg = model.config
    acc = accum_dtype(compute_dtype)
    x = jnp.asarray(x).astype(acc)
    b, c, t, npix = x.shape
    if c != cfg.out_channels or t != 1 or npix != NPIX:
        raise ValueError(
            f"x has shape {x.shape}; this model expects (batch, {cfg.out_channels}, 1, {NPIX}) "
            "(batch, channel, time, pixel in the network's HEALPix order)"
        )
    sigma = jnp.broadcast_to(jnp.asarray(sigma).astype(acc).reshape(-1), (b,))
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
    parts = [jnp.transpose((c_in[:, None, None, None] * x)[:, :, 0, :], (0, 2, 1))]
    if cfg.condition_channels:
        if condition is None:
            raise ValueError(f"this model needs a condition with {cfg.condition_channels} channel(s) (the SST)")
        cond = jnp.nan_to_num(jnp.asarray(condition).astype(acc), nan=0.0)
        cond = jnp.broadcast_to(cond, (b, cfg.condition_channels, 1, npix))
        parts.append(jnp.transpose(cond[:, :, 0, :], (0, 2, 1)))
    if cfg.label_dim:
        labels = jnp.zeros((1, cfg.label_dim), jnp.float32) if class_labels is None else class_labels
        labels = jnp.asarray(labels).astype(acc).reshape(-1, cfg.label_dim)
    else:
        labels = None
    sod = jnp.broadcast_to(jnp.asarray(second_of_day, jnp.float32).reshape(-1, 1), (b, 1))
    doy = jnp.broadcast_to(jnp.asarray(day_of_year, jnp.float32).reshape(-1, 1), (b, 1))
    out = model(
        jnp.concatenate(parts, axis=-1),
        c_noise,
        labels,
        sod,
        doy,
        compute_dtype=compute_dtype,
        return_intermediates=return_intermediates,
    )
    f, acts = out if return_intermediates else (out, None)
    f = jnp.transpose(f, (0, 2, 1))[:, :, None, :]
    d = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * f
    if return_intermediates:
        acts.update(F=f, c_skip=c_skip, c_out=c_out, c_in=c_in, c_noise=c_noise)
        return d, acts
    return d
