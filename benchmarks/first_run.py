"""First run vs second run (warm persistent compilation cache) of the CLI (issue 12, item 1).

Converts the fixture checkpoint, writes synthetic observations (60 = 20 stations x
T850/T500/T300) and a synthetic SST file, then runs

    jaxguide assimilate --members 2 --steps 4 --cg-iters 1 ...

twice in fresh processes with the same, initially empty, cache directory
(``JAXGUIDE_CACHE_DIR``), and once more with ``--no-cache``. Prints wall and CPU
seconds of each run and the compile/sampling split the command reports.

    PYTHONPATH=. python benchmarks/first_run.py --workdir /tmp/first_run
    # side by side with another checkout (e.g. `git worktree add /tmp/base <commit>`)
    PYTHONPATH=. python benchmarks/first_run.py --baseline /tmp/base --runs first_run,second_run_warm_cache

On a shared machine wall times depend on the other load; CPU seconds (user + sys of
the child) are steadier.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))


def run(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Run ``cmd`` in ``cwd`` (not the repository: ``python -m`` would import the package
    from the working directory before ``PYTHONPATH``)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "stdout_tail": res.stdout.strip().splitlines()[-3:],
            # the command's first progress line, which names the devices
            "first_line": next((line for line in res.stderr.splitlines() if line.startswith("[0.0 s] on ")), None)}


def main(argv=None) -> dict:
    from convert_and_assimilate import FIXTURE_CHECKPOINT, LEVELS, synthetic_era5

    from jaxguide.observations.era5 import era5_to_observations, read_era5_temperature
    from jaxguide.observations.table import write_observations
    from jaxguide.model.sst import write_synthetic_sst

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/jaxguide_first_run"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--runs", default="first_run,second_run_warm_cache,no_cache",
                    help="comma-separated subset of first_run,second_run_warm_cache,no_cache")
    ap.add_argument("--options", default="--members 2 --steps 4 --cg-iters 1",
                    help="the assimilate options (method, members, steps) of every run")
    ap.add_argument("--baseline", type=Path,
                    help="another checkout of jaxguide (e.g. a git worktree of an older main): each run is made "
                         "with it and with this one, alternately, each with its own cache directory")
    args = ap.parse_args(argv)
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    t = "2020-01-20T00:00"
    py = [sys.executable, "-m", "jaxguide.cli"]
    checkouts = {"this": REPO} if args.baseline is None else {"baseline": args.baseline.resolve(), "this": REPO}
    envs = {}
    for label, repo in checkouts.items():
        cache = w / f"xla_cache_{label}"
        shutil.rmtree(cache, ignore_errors=True)
        envs[label] = dict(os.environ, PYTHONPATH=str(repo), JAXGUIDE_CACHE_DIR=str(cache))
        envs[label].pop("JAXGUIDE_NO_CACHE", None)
    env = envs["this"]
    subprocess.run([*py, "convert", str(FIXTURE_CHECKPOINT), "--out", str(w / "model"), "--overwrite"], env=env,
                   check=True, capture_output=True, cwd=w)
    era5 = read_era5_temperature(synthetic_era5(w / "era5.nc", t))
    table = era5_to_observations(era5, LEVELS, strategy="random", count=20, rng=np.random.default_rng(0), sigma=1.0,
                                 times=[t], noise=True)
    write_observations(table, w / "obs.csv")
    write_synthetic_sst(w / "sst.nc", t, t)
    cmd = [*py, "assimilate", "--model", str(w / "model"), "--obs", str(w / "obs.csv"), "--time", t, "--sst",
           str(w / "sst.nc"), *args.options.split(), "--out", str(w / "a.nc"), "--overwrite"]
    out = {"command": " ".join(cmd[2:]), "machine_cores": os.cpu_count(), "load_before": os.getloadavg()}
    runs = args.runs.split(",")
    for name, extra in (("first_run", []), ("second_run_warm_cache", []), ("no_cache", ["--no-cache"])):
        if name not in runs:
            continue
        for label in checkouts:  # alternately: the baseline, then this checkout
            key = name if label == "this" else f"{label}_{name}"
            out[key] = run(cmd + extra, envs[label], w)
            out[key]["jaxguide"] = subprocess.run([sys.executable, "-c", "import jaxguide; print(jaxguide.__file__)"],
                                                  env=envs[label], cwd=w, capture_output=True, text=True).stdout.strip()
            print(key, json.dumps(out[key]), flush=True)
    for prefix in ("", "baseline_") if args.baseline else ("",):
        first, second = out.get(prefix + "first_run"), out.get(prefix + "second_run_warm_cache")
        if first and second:
            out[prefix + "ratio_second_over_first_wall"] = round(second["wall_s"] / first["wall_s"], 3)
            out[prefix + "ratio_second_over_first_cpu"] = round(second["cpu_s"] / first["cpu_s"], 3)
    if args.baseline:
        out["baseline"] = str(args.baseline)
        for name in runs:
            if name in out and "baseline_" + name in out:
                out[f"ratio_{name}_this_over_baseline_wall"] = round(out[name]["wall_s"] / out["baseline_" + name]["wall_s"], 3)
    out["load_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in out.items() if "ratio" in k}))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
