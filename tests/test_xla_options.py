"""Compiler options per backend (jaxguide.model.xla_options) and their use by the ensemble programs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.model import xla_options
from jaxguide.diffusion.ensemble import EnsembleSampler


class _Device:
    def __init__(self, platform):
        self.platform = platform


def test_cpu_options_and_xla_flags_override(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_options.compiler_options([_Device("cpu")]) == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert xla_options.compiler_options([_Device("gpu")]) == {}
    assert xla_options.compiler_options([_Device("cpu"), _Device("gpu")]) == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=conv")
    assert xla_options.compiler_options([_Device("cpu")]) == {}  # the user's setting wins


def test_ensemble_programs_compile_with_the_options(monkeypatch):
    """Every ensemble program is compiled with the backend's options, and they change no value."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    seen = []
    original = jax.stages.Lowered.compile

    def spy(self, compiler_options=None, **kw):
        seen.append(compiler_options)
        return original(self, compiler_options, **kw)

    def den(x, sigma, w):  # a 3x3 convolution: what the options are about
        y = jax.lax.conv_general_dilated(x[None], w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
        return x + 0.1 * y / (1 + sigma)

    kwargs = dict(num_steps=3, sigma_min=0.1, sigma_max=2.0)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 4, 4)), jnp.float32)
    with monkeypatch.context() as m:
        m.setattr(jax.stages.Lowered, "compile", spy)
        out = EnsembleSampler()(den, jax.random.key(0), (6, 6, 4), 2, sampler_kwargs=kwargs, operands=(w,),
                                devices=jax.devices()[:1])
    assert seen == [xla_options.compiler_options(jax.devices()[:1])]
    from jaxguide.diffusion.sampler import sample

    ref = jax.jit(jax.vmap(lambda k: sample(lambda x, s: den(x, s, w), k, (6, 6, 4), **kwargs)))(
        jax.random.split(jax.random.key(0), 2))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
