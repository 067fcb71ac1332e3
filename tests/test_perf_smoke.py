"""Fast smoke test of benchmarks/perf.py's pieces (tiny config; one small network compile)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import perf  # noqa: E402


def test_timed_jit_counts_one_compile_over_new_data():
    """New data of the same shape: one compile; the count is of this function only (an
    unrelated program compiled between the calls is not counted); the output is that of
    the last data set; a second distinct shape is a second compile."""
    def fn():  # a new function per timed_jit (JAX caches compilations per function object)
        return lambda a: jnp.sin(a) @ a

    other = jax.jit(lambda a: jnp.cos(a) + 1.0)

    def make_args(i):
        other(np.ones(i + 1, np.float32)).block_until_ready()  # a new shape: one unrelated compile per call
        return (np.full((8, 8), i, np.float32),)

    t = perf.timed_jit("smoke_fn", fn(), make_args, 2, keep_output=True)
    assert t.n_compiles == 1 and t.cache_size == 1
    assert len(t.run_s) == 2 and all(np.isfinite(t.run_s)) and all(r > 0 for r in t.run_s)
    assert np.isfinite(t.compile_s) and t.compile_s > 0
    assert t.compile_s >= t.backend_compile_s > 0  # trace + lowering + backend compile
    assert t.best == min(t.run_s)
    a = np.full((8, 8), 2.0)  # data set 2: the last of 1 + 2 calls
    np.testing.assert_allclose(np.asarray(t.output), np.sin(a) @ a, rtol=1e-5)
    # a second shape in the repeats: a second compile, and both counted
    t2 = perf.timed_jit("smoke_fn_two_shapes", fn(), lambda i: (np.ones((8 + 8 * (i > 0),) * 2, np.float32),), 2)
    assert t2.n_compiles == 2 and t2.cache_size == 2
    # no repeats: the reported time is the first call's estimate
    t0 = perf.timed_jit("smoke_fn_no_repeats", fn(), lambda i: (np.ones((8, 8), np.float32),), 0)
    assert t0.run_s == [] and t0.n_compiles == 1 and t0.best == t0.first_call_run_s >= 0


def test_analytic_flops_and_problem():
    cfg = perf.CONFIGS["released"]
    fl = perf.analytic_flops(cfg)
    assert 0.8e12 < fl["total"] < 1.2e12  # ~1 TFLOP per forward (XLA counts 1.02e12)
    assert fl["conv3"] > 0.8 * fl["total"]
    prob = perf.Problem(perf.CONFIGS["tiny"], 100)
    x = prob.x(0)
    assert x.shape == (3, 1, 49152) and prob.A(x).shape == (100,)
    assert not np.array_equal(prob.x(0), prob.x(1)) and not np.array_equal(prob.y(0), prob.y(1))


def test_tiny_forward_finite_one_compile_flops_close():
    cfg = perf.CONFIGS["tiny"]
    model, params = perf.build(cfg)
    prob = perf.Problem(cfg, 100)

    def fwd(p, x):
        return perf.make_den(model, p, prob.cond)(x, jnp.float32(perf.SIGMA))

    t = perf.timed_jit("smoke_forward", fwd, lambda i: (params, prob.x(i)), 1, analyse=True, keep_output=True)
    assert t.n_compiles == 1 and t.cache_size == 1
    assert np.all(np.isfinite(np.asarray(t.output)))
    assert t.memory["peak_bytes"] > 0 and t.memory["temp_size_in_bytes"] > 0
    assert 0.8 < t.flops / perf.analytic_flops(cfg)["total"] < 1.5


class _Args:
    members = 8


def test_targets_and_table_format():
    res = {
        "config": "tiny", "n_params": 1, "device": "cpu", "jax": "x", "members": 8,
        "timings": {"unguided": {"compile_s": 1.0, "best_s": 1.0, "n_compiles": 1, "cache_size": 1}},
        "forward": {"xla_flops": 2e9, "analytic_flops": 1.9e9, "gflops_per_s_xla_count": 2.0,
                    "gflops_per_s_analytic": 1.9},
        "ratios": {"dps/unguided": 2.0, "mmps5/unguided": 8.0, "vmap 8 / 8 singles": 0.5},
        "compiles": {"unguided": 1}, "cache_sizes": {"unguided": 1},
    }
    res["targets"] = perf.targets(res, _Args)
    assert res["targets"]["dps step <= 2.5x unguided"]["met"]
    assert not res["targets"]["mmps k=5 step <= 7x unguided"]["met"]
    assert res["targets"]["no recompilation (max compiles per function, cache size)"]["met"]
    assert "| target |" in perf.table(res)
    # the values behind the verdicts, and only the measured ratios give targets
    assert res["targets"] == {
        "dps step <= 2.5x unguided": {"value": 2.0, "limit": 2.5, "met": True},
        "mmps k=5 step <= 7x unguided": {"value": 8.0, "limit": 7, "met": False},
        "vmap ensemble of 8 <= 0.8x 8 singles": {"value": 0.5, "limit": 0.8, "met": True},
        "no recompilation (max compiles per function, cache size)": {"value": 1, "limit": 1, "met": True},
    }
    lines = perf.table(res).splitlines()
    for row in ("| dps step <= 2.5x unguided | 2 | 2.5 | yes |", "| mmps k=5 step <= 7x unguided | 8 | 7 | NO |",
                "| vmap ensemble of 8 <= 0.8x 8 singles | 0.5 | 0.8 | yes |", "| unguided | 1.0 | 1.000 | 1.00x unguided | 1 | 1 |",
                "| dps/unguided | 2.000 |"):
        assert row in lines, row


# (ratio key, target name, limit): the targets of benchmarks/README.md ("Target: <= 2.5x
# unguided", "<= (k+2)x unguided", "ratio <= 0.8", "remat <= 3x unguided peak")
RATIO_TARGETS = [
    ("regression/unguided", "regression step <= 2.5x unguided", 2.5),
    ("dps/unguided", "dps step <= 2.5x unguided", 2.5),
    ("mmps1/unguided", "mmps k=1 step <= 3x unguided", 3),
    ("mmps2/unguided", "mmps k=2 step <= 4x unguided", 4),
    ("mmps5/unguided", "mmps k=5 step <= 7x unguided", 7),
    ("vmap 8 / 8 singles", "vmap ensemble of 8 <= 0.8x 8 singles", 0.8),
    ("peak mem dps_remat_blocks/unguided", "guided step with remat (blocks) <= 3x unguided peak memory", 3.0),
]


def _res(ratios, compiles=None, cache_sizes=None, **extra):
    return {"ratios": ratios, "compiles": {"unguided": 1} if compiles is None else compiles,
            "cache_sizes": {"unguided": 1} if cache_sizes is None else cache_sizes, **extra}


@pytest.mark.parametrize("ratio,name,limit", RATIO_TARGETS)
def test_targets_flip_at_their_limits(ratio, name, limit):
    """met = (ratio <= limit): met at the limit, missed just above it."""
    for value, met in ((0.5 * limit, True), (limit, True), (limit * (1 + 1e-9), False), (2.0 * limit, False)):
        got = perf.targets(_res({ratio: value}), _Args)
        assert got[name] == {"value": value, "limit": limit, "met": met}, (value, got)
    assert name not in perf.targets(_res({}), _Args)  # not measured: no target


def test_targets_members_compiles_and_torch():
    class Args4:
        members = 4

    got = perf.targets(_res({"vmap 4 / 4 singles": 0.81, "vmap 8 / 8 singles": 0.1}), Args4)
    assert got["vmap ensemble of 4 <= 0.8x 4 singles"] == {"value": 0.81, "limit": 0.8, "met": False}
    assert not any("of 8" in k for k in got)
    # no recompilation: the worst compile count is the value; cache sizes and new compiles of
    # the single-member calls count too
    key = "no recompilation (max compiles per function, cache size)"
    ok = dict(compiles={"a": 1, "b": 1}, cache_sizes={"a": 1, "b": 1})
    assert perf.targets(_res({}, **ok), _Args)[key] == {"value": 1, "limit": 1, "met": True}
    assert perf.targets(_res({}, compiles={"a": 1, "b": 2}, cache_sizes=ok["cache_sizes"]), _Args)[key] == {
        "value": 2, "limit": 1, "met": False}
    assert not perf.targets(_res({}, compiles=ok["compiles"], cache_sizes={"a": 1, "b": 2}), _Args)[key]["met"]
    assert not perf.targets(_res({}, **ok, ensemble={"singles_new_compiles": 1}), _Args)[key]["met"]
    assert perf.targets(_res({}, **ok, ensemble={"singles_new_compiles": 0}), _Args)[key]["met"]
    assert key not in perf.targets(_res({}, compiles={}, cache_sizes={}), _Args)
    # the torch comparison: at least as fast (>= 1)
    name = "network forward GFLOP/s >= torch eager conv GFLOP/s"
    for value, met in ((1.0, True), (1.5, True), (1 - 1e-9, False)):
        assert perf.targets(_res({"jax forward GFLOP/s / torch conv GFLOP/s": value}), _Args)[name] == {
            "value": value, "limit": 1.0, "met": met}
