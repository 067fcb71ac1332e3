"""The network at the precisions users run: JAX's default matmul precision, and bfloat16.

This module is not a parity module (conftest.PARITY_MODULES): it runs at the default
precision. Reference: cBottle's float32 PyTorch outputs (tiny_denoiser.npz), errors as
(max |diff|, RMS diff) / RMS(reference), per sample (sigma = 0.02, 1.5, 150).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_errors


@pytest.fixture(scope="module")
def den(fixtures_dir):
    return np.load(fixtures_dir / "tiny_denoiser.npz")


@pytest.fixture(scope="module")
def outputs(tiny_model, den):
    """D of the fixture inputs in float32 and through the shipped bf16 path (``--bf16``:
    ``compute_dtype=bfloat16`` through ``model.apply``), at the default precision."""
    cond = dict(class_labels=den["class_labels"], condition=den["condition"],
                second_of_day=den["second_of_day"], day_of_year=den["day_of_year"])
    f = jax.jit(lambda p, x, s, c, dt: tiny_model.apply(p, x, s, compute_dtype=dt, **c), static_argnums=4)
    return {dt: f(tiny_model.params, den["x"], den["sigma"], cond, dt) for dt in (jnp.float32, jnp.bfloat16)}


def _matmul_ops(hlo: str) -> list[str]:
    """The convolutions and dot products of a lowered (StableHLO) program, one line each."""
    return [line for line in hlo.splitlines() if re.search(r"stablehlo\.(convolution|dot_general)\b", line)]


def test_runs_at_default_precision(tiny_model, den):
    """jaxguide leaves the matmul precision to the user: importing it sets no precision, and
    the float32 network pins none on its convolutions and matmuls and runs them in float32
    (no bf16/f16 operand). Checked on the program lowered under a context that is neither
    the default nor "highest" ("tensorfloat32" = StableHLO precision HIGH): every op says
    HIGH, so every op follows ``jax.default_matmul_precision`` (an explicit ``precision=``
    would show as DEFAULT or HIGHEST), hence runs at DEFAULT by default and at HIGHEST in
    the parity tests. The lowered program is the same for every backend, so a pinned
    precision or a silent down-cast shows here even on a CPU, where XLA computes float32
    convolutions in float32 whatever the setting (the output is bit-identical either way)."""
    assert jax.config.jax_default_matmul_precision is None
    cond = dict(class_labels=den["class_labels"], condition=den["condition"],
                second_of_day=den["second_of_day"], day_of_year=den["day_of_year"])
    f = jax.jit(lambda p, x, s, c: tiny_model.apply(p, x, s, compute_dtype=jnp.float32, **c))
    with jax.default_matmul_precision("tensorfloat32"):
        ops = _matmul_ops(f.lower(tiny_model.params, den["x"], den["sigma"], cond).as_text())
    assert len(ops) >= 80, len(ops)  # every 3x3/1x1 conv, attention and embedding matmul (measured: 91)
    for op in ops:
        assert re.search(r"precision(_config)? = \[(#stablehlo<precision )?HIGH>?, (#stablehlo<precision )?HIGH>?\]", op), op
        types = set(re.findall(r"tensor<(?:[\d?]+x)*([a-z]+\d+)>", op))
        assert types == {"f32"}, (types, op)


def test_float32_at_default_precision_matches_pytorch(outputs, den):
    """On CPU XLA computes float32 convolutions and matmuls in float32 whatever the precision
    setting (measured: D is bit-identical to the "highest" run), so the parity tolerances of
    test_network apply unchanged: max-abs <= 1e-4 x RMS, RMS <= 1e-5 x RMS. On a GPU the
    default may use TF32 (10-bit mantissa, unit round-off 2^-11 vs bf16's 2^-8): the bound
    there is the bf16 bound / 8 (not measured on a GPU in this project)."""
    D = outputs[jnp.float32]
    assert D.dtype == jnp.float32
    cpu = jax.default_backend() == "cpu"
    for b in range(3):
        maxabs, rms = rel_errors(D[b], den["D"][b])
        if cpu:
            assert maxabs <= 1e-4 and rms <= 1e-5, (b, maxabs, rms)
        else:
            assert maxabs <= BF16_MAXABS[b] / 8 and rms <= BF16_RMS[b] / 8, (b, maxabs, rms)


# bfloat16 bounds per sample (sigma = 0.02, 1.5, 150): the measured errors (CPU, jax 0.10.2)
# max-abs 0.0057, 0.119, 0.233 and RMS 2.5e-4, 0.0115, 0.0157 (x RMS of D), times ~2.
# Why this size: bf16 keeps 8 significant bits (unit round-off u = 2^-8 = 3.9e-3); each of
# the ~40 layers on the path rounds its input to bf16 (RMS relative error ~u/sqrt(3) =
# 2.3e-3), and independent errors add like a random walk: sqrt(40) x 2.3e-3 = 1.4 % of the
# network output F, as measured at sigma = 150 where D = F. At small sigma D is mostly
# c_skip x, computed in float32, so the error relative to D shrinks with c_out.
# (The released 68M-parameter config measures 0.7 % RMS: benchmarks/README.md.)
BF16_MAXABS = (0.012, 0.25, 0.5)
BF16_RMS = (5e-4, 0.025, 0.03)


def test_bf16_path_against_float32(outputs, den):
    """The bf16 network stays within its precision of cBottle's float32 output, and really runs in bf16."""
    D16 = outputs[jnp.bfloat16]
    assert D16.dtype == jnp.float32  # norms, softmax and the EDM algebra stay float32
    for b in range(3):
        maxabs, rms = rel_errors(D16[b], den["D"][b])
        assert maxabs <= BF16_MAXABS[b] and rms <= BF16_RMS[b], (b, maxabs, rms)
    # bf16 is really used: the network output F differs from float32 by far more than round-off
    b = 2  # sigma = 150: D is almost all network output
    _, rms = rel_errors(D16[b], outputs[jnp.float32][b])
    assert rms >= 1e-3, rms  # float32 vs float32 would be ~1e-6
