from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxguide.diffusion.ensemble import EnsembleSampler, count_compiles, sample_ensemble

REPO = Path(__file__).resolve().parents[1]
SHAPE = (2, 1, 48)
KW = {"num_steps": 5, "sigma_min": 0.02, "sigma_max": 20.0}
TRACES = {"n": 0}


def stand_in_sampler(denoiser, key, shape, *, num_steps, sigma_min, sigma_max, rho=7.0):
    """Stand-in for jaxguide.diffusion.sampler.sample: EDM sigmas, stochastic Euler steps."""
    TRACES["n"] += 1  # runs once per trace, i.e. once per compilation under jit
    i = jnp.arange(num_steps)
    sig = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sig = jnp.append(sig, 0.0)
    k0, k1 = jax.random.split(key)
    x = sigma_max * jax.random.normal(k0, shape)
    for n in range(num_steps):
        d = denoiser(x, sig[n])
        x = d + sig[n + 1] / sig[n] * (x - d) + 0.01 * sig[n + 1] * jax.random.normal(jax.random.fold_in(k1, n), shape)
    return x


def gauss_denoiser(x, sigma, mu):
    """Exact denoiser of a N(mu, I) prior."""
    return mu + (x - mu) / (1.0 + sigma**2)


def test_vmap_equals_loop_of_single_runs():
    key = jax.random.key(0)
    mu = jnp.linspace(-1.0, 1.0, 96).reshape(SHAPE)
    ens = sample_ensemble(gauss_denoiser, key, SHAPE, 5, sampler_kwargs=KW, operands=(mu,), sampler=stand_in_sampler, devices=jax.devices()[:1])
    assert ens.shape == (5, *SHAPE) and ens.dtype == jnp.float32
    keys = jax.random.split(key, 5)
    loop = np.stack([np.asarray(stand_in_sampler(lambda x, s: gauss_denoiser(x, s, mu), k, SHAPE, **KW)) for k in keys])
    np.testing.assert_allclose(np.asarray(ens), loop, rtol=1e-5, atol=1e-5)
    assert np.std(np.asarray(ens)[:, 0, 0, 0]) > 0.1  # members differ


def test_chunked_matches_vmap():
    key = jax.random.key(1)
    mu = jnp.ones(SHAPE)
    args = dict(sampler_kwargs=KW, operands=(mu,), sampler=stand_in_sampler, devices=jax.devices()[:1])
    ref = np.asarray(sample_ensemble(gauss_denoiser, key, SHAPE, 6, **args))
    chunked = np.asarray(sample_ensemble(gauss_denoiser, key, SHAPE, 6, chunk_size=4, **args))
    np.testing.assert_allclose(chunked, ref, rtol=1e-5, atol=1e-5)


def test_compiles_once_per_configuration():
    def den(x, sigma, mu):  # fresh function: its own cache entries
        return gauss_denoiser(x, sigma, mu)

    ens = EnsembleSampler(stand_in_sampler)
    args = dict(sampler_kwargs=KW, devices=jax.devices()[:1])
    key_a, key_b = jax.random.key(2), jax.random.key(3)
    mu_a, mu_b = jnp.zeros(SHAPE), jnp.ones(SHAPE) * 5.0
    start = TRACES["n"]
    with count_compiles() as first:
        a = ens(den, key_a, SHAPE, 3, operands=(mu_a,), **args)
    assert len(first) >= 1  # the counter sees compilations (so the zero below means something)
    with count_compiles() as second:
        b = ens(den, key_b, SHAPE, 3, operands=(mu_b,), **args)
        b.block_until_ready()
    assert second == []  # the second call with new data compiles nothing
    # weakly typed operands (jnp.full with a Python float) reuse the same program too
    ens(den, key_b, SHAPE, 3, operands=(jnp.full(SHAPE, 2.0),), **args)
    assert TRACES["n"] - start == 1 and ens.num_programs == 1
    assert not np.allclose(np.asarray(a), np.asarray(b))
    ens(den, jax.random.key(3), SHAPE, 3, operands=(jnp.zeros(SHAPE),), **{**args, "sampler_kwargs": {**KW, "num_steps": 4}})
    assert TRACES["n"] - start == 2  # a new configuration compiles again
    # a fresh sampler object owns fresh programs: nothing module-global
    EnsembleSampler(stand_in_sampler)(den, key_a, SHAPE, 3, operands=(mu_a,), **args)
    assert TRACES["n"] - start == 3


def test_compile_many_concurrent_is_bit_identical_and_compiles_once():
    """Two programs (analysis-like and prior-like: other member count, other denoiser)
    compiled at once in worker threads give the same bits as each compiled and run
    alone through ``jax.jit``, compile once each, and are reused by later calls."""
    from jaxguide.diffusion.ensemble import _build, _freeze

    def den_a(x, sigma, mu):
        return gauss_denoiser(x, sigma, mu)

    def den_b(x, sigma, mu):
        return 0.5 * gauss_denoiser(x, sigma, mu)

    ens = EnsembleSampler(stand_in_sampler)
    dev = jax.devices()[:1]
    mu = jnp.linspace(-1.0, 1.0, 96).reshape(SHAPE)
    specs = [(den_a, jax.random.key(4), 3), (den_b, jax.random.key(5), 2)]
    calls = [ens.prepare(d, k, SHAPE, n, sampler_kwargs=KW, devices=dev, operands=(mu,)) for d, k, n in specs]
    assert not any(ens.is_compiled(c) for c in calls)
    with count_compiles() as compiled:
        seconds = ens.compile_many(calls)
    assert len(compiled) == 2 and all(s > 0 for s in seconds)
    with count_compiles() as again:
        assert ens.compile_many(calls) == [0.0, 0.0]
        got = [np.asarray(ens.run(c)) for c in calls]
        via_call = np.asarray(ens(den_a, jax.random.key(4), SHAPE, 3, sampler_kwargs=KW, devices=dev, operands=(mu,)))
    assert again == [] and ens.num_programs == 2
    for (d, k, n), g in zip(specs, got):
        ref = np.asarray(_build(d, stand_in_sampler, SHAPE, n, _freeze(KW), (), None)(k, (mu,)))
        assert g.shape == (n, *SHAPE)
        np.testing.assert_array_equal(g, ref)
    np.testing.assert_array_equal(via_call, got[0])
    with pytest.raises(RuntimeError, match="not compiled"):
        ens.run(ens.prepare(den_a, jax.random.key(4), SHAPE, 4, sampler_kwargs=KW, devices=dev, operands=(mu,)))


def test_no_global_cache_keeps_denoisers_alive():
    import gc
    import weakref

    class Den:
        def __call__(self, x, sigma, mu):
            return gauss_denoiser(x, sigma, mu)

    den = Den()
    ref = weakref.ref(den)
    sample_ensemble(den, jax.random.key(0), SHAPE, 2, sampler_kwargs=KW, operands=(jnp.zeros(SHAPE),),
                    sampler=stand_in_sampler, devices=jax.devices()[:1])
    del den
    gc.collect()
    assert ref() is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_members"):
        sample_ensemble(gauss_denoiser, jax.random.key(0), SHAPE, 0, sampler_kwargs=KW, sampler=stand_in_sampler)
    with pytest.raises(ValueError, match="multiple"):
        cpu = jax.devices()[0]
        sample_ensemble(gauss_denoiser, jax.random.key(0), SHAPE, 3, sampler_kwargs=KW, sampler=stand_in_sampler, devices=[cpu, cpu])


SHARD_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from tests.test_ensemble import SHAPE, KW, gauss_denoiser, stand_in_sampler
    from jaxguide.diffusion.ensemble import sample_ensemble
    assert len(jax.devices()) == 4, jax.devices()
    mu = jnp.linspace(0.0, 2.0, 96).reshape(SHAPE)
    args = dict(sampler_kwargs=KW, operands=(mu,), sampler=stand_in_sampler)
    key = jax.random.key(7)
    sharded = sample_ensemble(gauss_denoiser, key, SHAPE, 8, **args)
    single = sample_ensemble(gauss_denoiser, key, SHAPE, 8, devices=jax.devices()[:1], **args)
    chunked = sample_ensemble(gauss_denoiser, key, SHAPE, 8, chunk_size=1, **args)
    assert isinstance(sharded.sharding, NamedSharding), sharded.sharding
    assert sharded.sharding.spec == PartitionSpec("member"), sharded.sharding.spec
    assert len(sharded.sharding.device_set) == 4
    assert len(single.sharding.device_set) == 1
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(single), rtol=1e-5, atol=1e-5)
    try:
        sample_ensemble(gauss_denoiser, key, SHAPE, 6, **args)
    except ValueError as e:
        assert "multiple" in str(e)
    else:
        raise AssertionError("6 members on 4 devices must fail")
    print("SHARD-OK")
    """
)


def test_sharded_over_four_cpu_devices_matches_unsharded():
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARD_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SHARD-OK" in proc.stdout


def test_per_member_operands_give_each_member_its_own_value():
    """An operand marked per member: member i sees entry i (vmap, chunked lax.map), the
    same as running member i alone with that value; a wrong leading axis is an error."""
    mus = jnp.stack([jnp.full(SHAPE, v) for v in (-2.0, 0.5, 3.0)])

    def den(x, sigma, scale, mu):
        return scale * gauss_denoiser(x, sigma, mu)

    ens = EnsembleSampler(stand_in_sampler)
    key = jax.random.key(7)
    dev = jax.devices()[:1]
    got = np.asarray(ens(den, key, SHAPE, 3, sampler_kwargs=KW, devices=dev, operands=(jnp.float32(1.0), mus),
                         per_member=(False, True)))
    chunked = np.asarray(ens(den, key, SHAPE, 3, sampler_kwargs=KW, devices=dev, chunk_size=2,
                             operands=(jnp.float32(1.0), mus), per_member=(False, True)))
    np.testing.assert_allclose(chunked, got, rtol=1e-6, atol=1e-6)
    keys = jax.random.split(key, 3)
    for i in range(3):
        alone = stand_in_sampler(lambda x, s: den(x, s, 1.0, mus[i]), keys[i], SHAPE, **KW)
        np.testing.assert_allclose(got[i], np.asarray(alone), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[0], got[2])
    with pytest.raises(ValueError, match="leading axis of n_members=4"):
        ens.prepare(den, key, SHAPE, 4, sampler_kwargs=KW, devices=dev, operands=(jnp.float32(1.0), mus),
                    per_member=(False, True))
    with pytest.raises(ValueError, match="per_member has 1 flags for 2 operands"):
        ens.prepare(den, key, SHAPE, 3, sampler_kwargs=KW, devices=dev, operands=(jnp.float32(1.0), mus),
                    per_member=(True,))
