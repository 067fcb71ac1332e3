"""EDM sampler: draw-for-draw reproduction of cBottle's ``edm_sampler_from_sigma``
(``sampler_toy.npz``), schedule, vmap, compile-once, gradients."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxguide.diffusion import sampler

CONFIGS = ("heun_nochurn", "heun_churn", "euler_churn", "reverse_heun")


def toy_denoiser(x, s):
    """The fixture's closed-form toy denoiser (README §7)."""
    return x * 0.25 / (0.25 + s**2) + 0.3 * jnp.tanh(x) * s / (1 + s**2)


def _cfg(d, name):
    c = json.loads(str(d["meta_json"]))["configs"][name]
    return dict(
        num_steps=c["num_steps"],
        sigma_min=c["sigma_min"],
        sigma_max=c["sigma_max"],
        S_churn=c.get("S_churn", 0.0),
        S_min=c.get("S_min", 0.0),
        S_max=c.get("S_max", float("inf")),
        S_noise=c.get("S_noise", 1.0),
        solver=c.get("time_stepper", "heun"),
        reverse=c.get("reverse", False),
    )


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", CONFIGS)
def test_reproduces_cbottle_toy(fixtures_dir, name):
    d = np.load(fixtures_dir / "sampler_toy.npz")
    cfg = _cfg(d, name)
    xT = d[f"{name}__xT"].astype(np.float64)
    with jax.enable_x64(True):
        # forward: latents * sigma_max must give the recorded float32 xT; xT/smax*smax
        # in float64 reproduces it to ~1e-16 relative.
        latents = xT if cfg["reverse"] else xT / cfg["sigma_max"]
        out, traj = sampler.sample(
            toy_denoiser, None, None, latents=jnp.asarray(latents),
            noise=jnp.asarray(d[f"{name}__draws"]), return_trajectory=True, **cfg,
        )
        assert out.dtype == jnp.float64
        x_cur = d[f"{name}__x_cur"]
        assert traj.shape == x_cur.shape
        # tolerance 1e-10 relative (to the max |value| of each step): float64 round-off
        for i in range(x_cur.shape[0]):
            assert _rel(traj[i], x_cur[i]) < 1e-10, (name, i, _rel(traj[i], x_cur[i]))
        assert _rel(out, d[f"{name}__out"]) < 1e-10


@pytest.mark.parametrize("name", CONFIGS)
def test_schedule_matches_call_sigmas(fixtures_dir, name):
    d = np.load(fixtures_dir / "sampler_toy.npz")
    cfg = _cfg(d, name)
    t_cur, t_hat, t_next, heun = sampler._step_plan(
        cfg["num_steps"], cfg["sigma_min"], cfg["sigma_max"], 7.0, cfg["S_churn"],
        cfg["S_min"], cfg["S_max"], cfg["reverse"])
    calls = []
    for i in range(len(t_cur)):
        calls.append(t_hat[i])
        if cfg["solver"] == "heun" and heun[i]:
            calls.append(t_next[i])
    # equal to 2 ulp: NumPy's pow and PyTorch's pow differ by 1 ulp on one sigma of 14
    np.testing.assert_allclose(np.array(calls), d[f"{name}__call_sigma"], rtol=4.5e-16, atol=0)


def test_schedule_cbottle_values():
    s = sampler.sigma_schedule(6, 0.02, 200, 7.0)  # sampler_unguided.npz sigma_steps
    ref = [200.00000000000009, 66.0698, 17.7129, 3.49593, 0.421260, 0.020000000000000014]
    assert s[0] == ref[0] and s[-1] == ref[-1]
    np.testing.assert_allclose(s, ref, rtol=3e-6)


def test_vmap_equals_loop():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    kw = dict(num_steps=6, sigma_min=0.01, sigma_max=20.0, S_churn=5.0, S_noise=1.01)
    run = lambda k: sampler.sample(toy_denoiser, k, (2, 5), **kw)  # noqa: E731
    batched = jax.vmap(run)(keys)
    loop = jnp.stack([run(k) for k in keys])
    np.testing.assert_allclose(batched, loop, rtol=1e-5, atol=1e-6)  # float32 round-off
    assert batched.dtype == jnp.float32
    # latents batched too
    lat = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 5))
    run2 = lambda k, z: sampler.sample(toy_denoiser, k, None, latents=z, **kw)  # noqa: E731
    b2 = jax.vmap(run2)(keys, lat)
    l2 = jnp.stack([run2(k, z) for k, z in zip(keys, lat)])
    np.testing.assert_allclose(b2, l2, rtol=1e-5, atol=1e-6)


def test_compiles_once_per_configuration():
    traces = []

    def run(key, scale):
        traces.append(1)
        return sampler.sample(lambda x, s: scale * toy_denoiser(x, s), key, (4,),
                              num_steps=5, sigma_min=0.01, sigma_max=10.0)

    f = jax.jit(run)
    a = f(jax.random.PRNGKey(0), jnp.float32(1.0))
    b = f(jax.random.PRNGKey(1), jnp.float32(0.9))
    assert len(traces) == 1 and f._cache_size() == 1
    assert not np.allclose(a, b)


def test_grad_matches_finite_differences():
    with jax.enable_x64(True):
        lat = jax.random.normal(jax.random.PRNGKey(3), (2, 7), jnp.float64)

        def loss(scale, lat):
            den = lambda x, s: toy_denoiser(x, s) + scale * jnp.sin(x) * s / (1 + s**2)  # noqa: E731
            x = sampler.sample(den, jax.random.PRNGKey(4), None, latents=lat, num_steps=6,
                               sigma_min=0.02, sigma_max=5.0, S_churn=3.0)
            return jnp.sum(x**2)

        g_s, g_l = jax.grad(loss, argnums=(0, 1))(0.3, lat)
        h = 1e-6
        fd = (loss(0.3 + h, lat) - loss(0.3 - h, lat)) / (2 * h)
        assert abs(g_s - fd) < 1e-6 * max(1.0, abs(fd))  # central FD error ~h^2
        v = jax.random.normal(jax.random.PRNGKey(5), lat.shape, jnp.float64)
        fd_l = (loss(0.3, lat + h * v) - loss(0.3, lat - h * v)) / (2 * h)
        assert abs(jnp.vdot(g_l, v) - fd_l) < 1e-6 * max(1.0, abs(fd_l))


def test_errors():
    with pytest.raises(ValueError, match="solver"):
        sampler.sample(toy_denoiser, jax.random.PRNGKey(0), (3,), num_steps=4,
                       sigma_min=0.1, sigma_max=1.0, solver="rk4")
    with pytest.raises(ValueError, match="noise shape"):
        sampler.sample(toy_denoiser, None, None, latents=jnp.ones(3), num_steps=4,
                       sigma_min=0.1, sigma_max=1.0, noise=jnp.ones((3, 3)))


def test_float32_default_tracks_float64_fixture(fixtures_dir):
    """x64 off: the same run in float32 stays within 1e-5 of the float64 reference
    (relative to max |x|; float32 round-off over 15 denoiser calls, observed 7e-7)."""
    d = np.load(fixtures_dir / "sampler_toy.npz")
    cfg = _cfg(d, "heun_churn")
    latents = jnp.asarray(d["heun_churn__xT"] / np.float32(cfg["sigma_max"]))
    out = sampler.sample(toy_denoiser, None, None, latents=latents,
                         noise=jnp.asarray(d["heun_churn__draws"], jnp.float32), **cfg)
    assert out.dtype == jnp.float32
    assert _rel(out, d["heun_churn__out"]) < 1e-5


@pytest.mark.parametrize(
    "solver, reverse, expected",
    [("heun", False, 2 * 5 - 1), ("euler", False, 5), ("heun", True, 2 * (5 - 1))],
)
def test_denoiser_call_count(solver, reverse, expected):
    """No wasted evaluation: Heun 2N-1 (no correction at t_next = 0), Euler N, reverse 2(N-1)."""
    sigmas = []

    def counting(x, s):
        jax.debug.callback(lambda v: sigmas.append(float(v)), s)
        return toy_denoiser(x, s)

    kw = dict(num_steps=5, sigma_min=0.02, sigma_max=80.0, solver=solver, reverse=reverse)
    x = jnp.ones((3, 1, 4))
    jax.jit(lambda k: sampler.sample(counting, k, None, latents=x, **kw))(jax.random.key(0))
    jax.effects_barrier()
    assert len(sigmas) == expected
    assert min(sigmas) > 0  # never evaluated at sigma = 0
