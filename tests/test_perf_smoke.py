"""Fast smoke test of benchmarks/perf.py's pieces (tiny config; one small network compile)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import perf  # noqa: E402


def test_timed_jit_counts_one_compile_over_new_data():
    t = perf.timed_jit("smoke_fn", lambda a: jnp.sin(a) @ a, lambda i: (np.full((8, 8), i, np.float32),), 2)
    assert t.n_compiles == 1 and t.cache_size == 1
    assert len(t.run_s) == 2 and all(np.isfinite(t.run_s))
    assert np.isfinite(t.compile_s) and t.compile_s > 0


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


def test_targets_and_table_format():
    class A:
        members = 8

    res = {
        "config": "tiny", "n_params": 1, "device": "cpu", "jax": "x", "members": 8,
        "timings": {"unguided": {"compile_s": 1.0, "best_s": 1.0, "n_compiles": 1, "cache_size": 1}},
        "forward": {"xla_flops": 2e9, "analytic_flops": 1.9e9, "gflops_per_s_xla_count": 2.0,
                    "gflops_per_s_analytic": 1.9},
        "ratios": {"dps/unguided": 2.0, "mmps5/unguided": 8.0, "vmap 8 / 8 singles": 0.5},
        "compiles": {"unguided": 1}, "cache_sizes": {"unguided": 1},
    }
    res["targets"] = perf.targets(res, A)
    assert res["targets"]["dps step <= 2.5x unguided"]["met"]
    assert not res["targets"]["mmps k=5 step <= 7x unguided"]["met"]
    assert res["targets"]["no recompilation (max compiles per function, cache size)"]["met"]
    assert "| target |" in perf.table(res)
