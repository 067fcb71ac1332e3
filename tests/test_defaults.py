"""Library defaults that must not hurt (issue 21, item 7)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import campaign_case as case
from jaxguide.assimilation.session import Session
from jaxguide.assimilation.settings import AssimilationSettings
from jaxguide.diffusion import guidance
from jaxguide.diffusion.sampler import sample


def test_session_does_not_report_progress_by_default():
    """No host callback in every denoiser call unless asked for (it syncs the host and keeps
    the programs out of the persistent compilation cache)."""
    assert Session(case.model()).report_progress is False
    assert Session(case.model(), report_progress=True).report_progress is True


def test_a_diverged_run_is_stopped_and_names_guidance_scale(tmp_path):
    """Uncapped regression at scale 1 diverges to huge but finite values (~1e8 K here):
    the sampler stops at the first denoiser call after which the state has left its
    bound (here the 4th of 5 calls: 3 Heun steps; the estimate reaches 790-1145 scales
    there and 1e7 at the 5th), the run stops with an error naming --guidance-scale and
    writes nothing, instead of writing a file of garbage (the capped default stays
    bounded: tests/test_guidance.py). Calls counted with the session's per-call reports,
    one per member and call, against the same session's healthy run."""
    session = Session(case.model(), report_progress=True)
    calls = []
    count = lambda stage, done, total: calls.append(stage)  # noqa: E731
    base = dict(members=2, prior_members=0, steps=3, drop_bad=True)
    bad = AssimilationSettings(method=guidance.Regression(scale=1.0, cap=False), **base)
    with pytest.raises(FloatingPointError, match="diverged.*stops at the first denoiser call that leaves.*--guidance-scale"):
        session.assimilate(case.table(), tmp_path / "a.nc", time=case.TIMES[1], settings=bad, progress=count)
    assert not (tmp_path / "a.nc").exists()
    diverged = calls.count("analysis")
    calls.clear()
    ok = AssimilationSettings(method=guidance.Regression(scale=1e-3, cap=False), **base)
    session.assimilate(case.table(), tmp_path / "b.nc", time=case.TIMES[1], settings=ok, progress=count)
    assert (diverged, calls.count("analysis")) == (2 * 4, 2 * 5)


def test_the_sampler_stops_at_the_first_wild_call_and_only_when_asked():
    """``stop_above``: a denoiser whose estimate exceeds the bound at its first call is
    called once (not 2N - 1 = 9 times) and the result is NaN, also under vmap; a healthy
    run is bit-identical to the scan without the bound."""
    calls = []

    def wild(x, sigma):
        jax.debug.callback(lambda: calls.append(1))
        return x * 1e4

    kw = dict(num_steps=5, sigma_min=0.002, sigma_max=80.0)
    keys = jax.random.split(jax.random.key(0), 3)
    run = jax.jit(jax.vmap(lambda k: sample(wild, k, (2, 8), stop_above=1e3, **kw)))
    assert np.isnan(np.asarray(run(keys))).all()
    jax.effects_barrier()
    n_stopped = len(calls)
    calls.clear()
    jax.block_until_ready(jax.jit(jax.vmap(lambda k: sample(wild, k, (2, 8), **kw)))(keys))
    jax.effects_barrier()
    assert n_stopped * 9 == len(calls), (n_stopped, len(calls))
    calm = lambda x, sigma: x / (1.0 + sigma**2)  # noqa: E731
    a = jax.jit(lambda k: sample(calm, k, (2, 8), **kw))(keys[0])
    b = jax.jit(lambda k: sample(calm, k, (2, 8), stop_above=1e3, **kw))(keys[0])
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.isfinite(np.asarray(b)).all()
    # a member that stops while the others go on: NaN for it only
    lone = lambda x, sigma: jnp.where(x[0, 0] > 0, x * 1e4, x / (1.0 + sigma**2))  # noqa: E731
    out = np.asarray(jax.vmap(lambda k: sample(lone, k, (2, 8), stop_above=1e3, **kw))(keys))
    first = np.asarray(jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[0], (2, 8)))(keys))[:, 0, 0]
    assert (np.isnan(out).all(axis=(1, 2)) == (first > 0)).all() and np.isfinite(out[first <= 0]).all(), first
