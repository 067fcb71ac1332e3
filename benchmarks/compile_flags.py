"""Compile + run wall time of the fixture assimilation under compiler settings (issue 12).

Each variant runs ``pipeline.assimilate`` (what ``jaxguide assimilate --members 2
--steps 4`` runs) in a fresh process WITHOUT the persistent cache, so every run compiles:
the figure that matters for a first run is compile + sampling. Variants: the concurrent
compile of the analysis and prior programs vs one after the other (``seq``), XLA:CPU
flags (``XLA_FLAGS``), MMPS cg 1 vs cg 3 unrolled vs cg 3 as a loop.

    PYTHONPATH=. python benchmarks/compile_flags.py --workdir /tmp/first_run \\
        --variants default,seq,opt0 --json out.json

``--workdir`` must hold ``model/``, ``obs.csv`` and ``sst.nc`` as
``benchmarks/first_run.py`` writes them. Wall and CPU (user + sys of the child,
``resource.getrusage(RUSAGE_CHILDREN)``) per variant; on a shared machine compare the
variants of one invocation with each other (ratios), not with other days.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (XLA_FLAGS to add, cg_iters, cg_unroll, sequential compile)
VARIANTS = {
    "default": ("", 1, True, False),
    "seq": ("", 1, True, True),
    "opt0": ("--xla_backend_optimization_level=0", 1, True, False),
    "opt1": ("--xla_backend_optimization_level=1", 1, True, False),
    "thunk_off": ("--xla_cpu_use_thunk_runtime=false", 1, True, False),
    "llvm_cheap": ("--xla_llvm_disable_expensive_passes=true", 1, True, False),
    "cg3": ("", 3, True, False),
    "cg3_loop": ("", 3, False, False),
}

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from jaxguide.diffusion import guidance
from jaxguide.assimilation import pipeline
from jaxguide.assimilation.settings import AssimilationSettings
from jaxguide.diffusion.ensemble import EnsembleSampler
w, cg, unroll, seq = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
if seq:  # the previous behaviour: one program after the other
    concurrent = EnsembleSampler.compile_many
    def one_by_one(self, calls, **kw):
        return [concurrent(self, [c], **kw)[0] for c in calls]
    EnsembleSampler.compile_many = one_by_one
settings = AssimilationSettings(method=guidance.MMPS(cg_iters=cg, cg_unroll=unroll), members=2, steps=4)
s = pipeline.assimilate(w + "/model", w + "/obs.csv", w + "/flags.nc", time="2020-01-20T00:00", settings=settings,
                        sst=w + "/sst.nc", overwrite=True)
print(json.dumps({k: round(s[k], 2) for k in ("seconds_compile", "seconds_analysis", "seconds_prior", "seconds_total")}
                 | {"process_s": round(time.perf_counter() - t0, 2)}))
"""


def run_variant(name: str, workdir: Path) -> dict:
    flags, cg, unroll, seq = VARIANTS[name]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAXGUIDE_NO_CACHE="1")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, str(workdir), str(cg), str(int(unroll)), str(int(seq))],
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = {"xla_flags": flags, "cg_iters": cg, "cg_unroll": unroll, "sequential_compile": seq,
           "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": os.getloadavg()}
    out.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--variants", default="default,seq,opt0")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = {}
    for name in args.variants.split(","):
        out[name] = run_variant(name, args.workdir)
        print(name, json.dumps(out[name]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
