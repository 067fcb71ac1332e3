"""Scan over U-Net blocks (``CBottleUNet.__call__(scan_blocks=True)``, the default).

Runs of identical blocks are one ``lax.scan`` each; the scanned network must give the
unrolled network's D and VJP with respect to x to float32 round-off, for the image
fixture and the video fixture: RMS error <= 1e-6 x RMS, max-abs error <= 5e-6 x RMS
for D and <= 1e-5 x RMS for the VJP (the tolerance of ``test_remat``). (Measured on
XLA:CPU, image fixture: D RMS 1.6e-7, max-abs 2.4e-6; VJP RMS 2.0e-7, max-abs 5.6e-6. Each
scanned block gives the same bits as that block compiled alone; the unrolled program
differs from both because XLA fuses the end of one block into the start of the next.
Both are as close to PyTorch: D max-abs 9.5e-6 vs 8.7e-6 x RMS.) The grouping is
derived from the layouts: checked here against the runs the architecture has.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_errors
from jaxguide.model.config import ModelConfig
from jaxguide.model.checkpoint import graphdef_and_shapes
from jaxguide.model.inputs import Conditioning, ForwardOptions
from jaxguide.model.precond import precond_forward
from jaxguide.model.unet import (
    decoder_layout,
    decoder_scan_keys,
    decoder_skip_channels,
    encoder_layout,
    encoder_scan_keys,
    scan_runs,
)

IMAGE = ModelConfig(model_channels=8, label_dim=1024, out_channels=3, condition_channels=1)
VIDEO = ModelConfig(model_channels=8, label_dim=1024, out_channels=3, condition_channels=5, time_length=4)


def _run_names(layout, keys):
    return [[layout[i].name for i in range(a, b)] for a, b in scan_runs(keys) if b - a > 1]


def test_scan_runs_groups_consecutive_equal_keys():
    assert scan_runs([None, 1, 1, 2, None, None, 2, 2, 2]) == [(0, 1), (1, 3), (3, 4), (4, 5), (5, 6), (6, 9)]
    assert scan_runs([]) == []


@pytest.mark.parametrize("config", [IMAGE, VIDEO], ids=["image", "video"])
def test_runs_follow_the_layout(config):
    enc = _run_names(encoder_layout(config), encoder_scan_keys(config))
    assert enc == [
        [f"64x64_block{i}" for i in range(4)],
        [f"32x32_block{i}" for i in range(1, 4)],
        [f"16x16_block{i}" for i in range(4)],
        [f"8x8_block{i}" for i in range(4)],
    ]
    dec = _run_names(decoder_layout(config), decoder_scan_keys(config))
    last = 4 if config.is_video else 5  # the video model's last block per level has temporal attention
    assert dec == [
        [f"8x8_block{i}" for i in range(4)],
        [f"16x16_block{i}" for i in range(last)],
        [f"32x32_block{i}" for i in range(4)],
        [f"64x64_block{i}" for i in range(1, last)],
    ]
    # every scanned decoder run pops skips of one width
    skips = decoder_skip_channels(config)
    for a, b in scan_runs(decoder_scan_keys(config)):
        assert len(set(skips[a:b])) == 1


def _forward_and_vjp(model, x, sigma, cond, w):
    """{scan: (D, VJP of w)} (w None: {scan: (D,)})."""
    graphdef, _ = graphdef_and_shapes(model.config)

    def run(params, x, scan):
        net = nnx.merge(graphdef, nnx.State(params))
        f = lambda z: precond_forward(net, z, sigma, Conditioning(**cond), ForwardOptions(scan_blocks=scan))  # noqa: E731
        if w is None:
            return (f(x),)
        d, vjp = jax.vjp(f, x)
        return d, vjp(w)[0]

    return {scan: jax.jit(run, static_argnums=2)(model.params[0], x, scan) for scan in (True, False)}


def _check(results):
    for i, (what, max_tol) in enumerate((("D", 5e-6), ("vjp", 1e-5))[:len(results[True])]):
        maxabs, rms = rel_errors(results[True][i], results[False][i])
        assert maxabs <= max_tol and rms <= 1e-6, (what, maxabs, rms)


def _cond(d, sl):
    return {k: jnp.asarray(d[k][sl]) for k in ("class_labels", "condition", "second_of_day", "day_of_year")}


def test_scanned_matches_unrolled_image(tiny_model, fixtures_dir):
    d = np.load(fixtures_dir / "tiny_denoiser.npz")
    x = jnp.asarray(d["x"][:2])
    w = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)
    _check(_forward_and_vjp(tiny_model, x, jnp.asarray(d["sigma"][:2]), _cond(d, slice(0, 2)), w))


@pytest.mark.slow  # video fixture: convert + two compiles
def test_scanned_matches_unrolled_video(fixtures_dir, tmp_path):
    """The video model's runs (temporal attention in every encoder block, only the last
    decoder block of a level): forward only; the scan's VJP is checked on the image model."""
    import jaxguide
    from jaxguide.model.convert import convert_checkpoints

    model = jaxguide.load_model(convert_checkpoints([fixtures_dir / "video" / "video.checkpoint"], tmp_path / "m"))
    d = np.load(fixtures_dir / "video" / "video_denoiser.npz")
    x = jnp.asarray(d["x"][:1])
    _check(_forward_and_vjp(model, x, jnp.asarray(d["sigma"][:1]), _cond(d, slice(0, 1)), None))
