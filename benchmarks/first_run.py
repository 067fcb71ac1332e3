"""First run vs second run (warm persistent compilation cache) of the CLI (issue 12, item 1).

Converts the fixture checkpoint, writes synthetic observations (60 = 20 stations x
T850/T500/T300) and a synthetic SST file, then runs

    jaxguide assimilate --members 2 --steps 4 --cg-iters 1 ...

twice in fresh processes with the same, initially empty, cache directory
(``JAXGUIDE_CACHE_DIR``), and once more with ``--no-cache``. Prints wall and CPU
seconds of each run and the compile/sampling split the command reports.

    PYTHONPATH=. python benchmarks/first_run.py --workdir /tmp/first_run

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


def run(cmd: list[str], env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "stdout_tail": res.stdout.strip().splitlines()[-3:]}


def main(argv=None) -> dict:
    from convert_and_assimilate import FIXTURE_CHECKPOINT, LEVELS, synthetic_era5

    from jaxguide.era5 import era5_to_observations, read_era5_temperature
    from jaxguide.observations import write_observations
    from jaxguide.sst import write_synthetic_sst

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/jaxguide_first_run"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--runs", default="first_run,second_run_warm_cache,no_cache",
                    help="comma-separated subset of first_run,second_run_warm_cache,no_cache")
    args = ap.parse_args(argv)
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    t = "2020-01-20T00:00"
    py = [sys.executable, "-m", "jaxguide.cli"]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAXGUIDE_CACHE_DIR=str(w / "xla_cache"))
    env.pop("JAXGUIDE_NO_CACHE", None)
    shutil.rmtree(w / "xla_cache", ignore_errors=True)
    subprocess.run([*py, "convert", str(FIXTURE_CHECKPOINT), "--out", str(w / "model"), "--overwrite"], env=env,
                   check=True, capture_output=True)
    era5 = read_era5_temperature(synthetic_era5(w / "era5.nc", t))
    table = era5_to_observations(era5, LEVELS, strategy="random", count=20, rng=np.random.default_rng(0), sigma=1.0,
                                 times=[t], noise=True)
    write_observations(table, w / "obs.csv")
    write_synthetic_sst(w / "sst.nc", t, t)
    cmd = [*py, "assimilate", "--model", str(w / "model"), "--obs", str(w / "obs.csv"), "--time", t, "--sst",
           str(w / "sst.nc"), "--members", "2", "--steps", "4", "--cg-iters", "1", "--out", str(w / "a.nc"),
           "--overwrite"]
    out = {"command": " ".join(cmd[2:]), "machine_cores": os.cpu_count(), "load_before": os.getloadavg()}
    runs = args.runs.split(",")
    for name, extra in (("first_run", []), ("second_run_warm_cache", []), ("no_cache", ["--no-cache"])):
        if name not in runs:
            continue
        out[name] = run(cmd + extra, env)
        print(name, json.dumps(out[name]), flush=True)
    if "first_run" in out and "second_run_warm_cache" in out:
        out["ratio_second_over_first_wall"] = round(out["second_run_warm_cache"]["wall_s"] / out["first_run"]["wall_s"], 3)
        out["ratio_second_over_first_cpu"] = round(out["second_run_warm_cache"]["cpu_s"] / out["first_run"]["cpu_s"], 3)
    print(json.dumps({k: v for k, v in out.items() if k.startswith("ratio")}))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
