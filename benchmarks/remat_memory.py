"""Compiled peak memory of the guided step with and without per-block rematerialisation.

Run (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/remat_memory.py --config released
    XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \\
        PYTHONPATH=$PWD python benchmarks/remat_memory.py --config released

For each program (the unguided denoiser call, DPS = 1 forward + 1 VJP, MMPS with one CG
iteration = 1 forward + 2 VJPs; one member, ~1000 point observations, random weights)
it compiles ``jax.jit(f)`` without running it and prints XLA's
``compiled.memory_analysis()``: argument (the parameters), output and temp bytes;
"peak" = argument + output + temp - alias (what the executable holds at once; temp is
the scheduled peak of the intermediates). ``remat`` = ``make_denoiser(..., remat=True)``:
every U-Net block keeps only its inputs for the VJP and recomputes its activations when
the cotangent arrives (``layers.call_block``). Compile only: the figures do not depend
on the machine's load. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import CONFIGS, SIGMA, SIGMA_Y, Problem, build, memory_of  # noqa: E402

from jaxguide.diffusion import guidance  # noqa: E402
from jaxguide.model.config import ModelConfig  # noqa: E402
from jaxguide.model.denoiser import make_denoiser  # noqa: E402

# the fixture model of tests/ (tiny.checkpoint: model_channels 8, 6 channels)
CONFIGS = dict(CONFIGS, fixture=ModelConfig(model_channels=8, label_dim=1024, out_channels=6, condition_channels=1))


def programs(model, prob: Problem):
    def den(params, remat):
        return make_denoiser(model, condition=prob.cond, second_of_day=43200.0, day_of_year=100.0, label="icon",
                             params=(params,), remat=remat)

    def unguided(params, x, y):
        return den(params, False)(x, jnp.float32(SIGMA))

    def guided(method, remat):
        def step(params, x, y):
            d = den(params, remat)
            g = guidance.dps(d, prob.A, y, SIGMA_Y) if method == "dps" else guidance.mmps(d, prob.A, y, SIGMA_Y,
                                                                                            cg_iters=1)
            return g(x, jnp.float32(SIGMA))

        return step

    yield "unguided", unguided
    for method in ("dps", "mmps1"):
        for remat in (False, True):
            yield f"{method}{'_remat' if remat else ''}", guided(method, remat)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="released")
    ap.add_argument("--n-obs", type=int, default=1000)
    ap.add_argument("--only", default="", help="comma list of programs (default all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    model, params = build(cfg)
    prob = Problem(cfg, args.n_obs)
    x, y = prob.x(0), prob.y(0)
    only = set(filter(None, args.only.split(",")))
    res = {"config": args.config, "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
           "backend": jax.default_backend(), "memory": {}}
    print(f"# {args.config} config on {jax.default_backend()}, XLA_FLAGS={res['xla_flags']!r}", flush=True)
    for name, fn in programs(model, prob):
        if only and name not in only and name != "unguided":
            continue
        t0 = time.perf_counter()
        m = memory_of(jax.jit(fn).lower(params, x, y).compile())
        m["compile_s"] = time.perf_counter() - t0
        res["memory"][name] = m
        base = res["memory"]["unguided"]["peak_bytes"]
        print(f"  {name:12s} peak {m['peak_bytes'] / 2**20:8.1f} MiB  temp {m['temp_size_in_bytes'] / 2**20:8.1f} MiB"
              f"  args {m['argument_size_in_bytes'] / 2**20:7.1f} MiB  peak/unguided {m['peak_bytes'] / base:5.2f}"
              f"  (compile {m['compile_s']:.0f} s)", flush=True)
        if args.json:
            Path(args.json + ".partial").write_text(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
