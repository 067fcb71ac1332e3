"""Campaign benchmark: per-time cost of a campaign vs single-time calls; 1 vs 2 processes.

Run (from the repository root; needs the fixtures and PyTorch to convert the tiny
checkpoint, or ``--model DIR`` of an already converted one)::

    PYTHONPATH=$PWD python benchmarks/campaign.py --times 20 --json campaign.json
    PYTHONPATH=$PWD python benchmarks/campaign.py --times 6 --single 1 --sections campaign,processes

Measured (wall clock, seconds), on the fixture checkpoint (tiny cBottle U-Net, nside 64)
with a synthetic SST file and 12 observations per time:

- ``campaign``: :func:`jaxguide.campaign.run.assimilate_campaign` over N times in this
  process; the per-time cost is the median over times 2..N (the first compiles), and
  ``one sampler run`` is the median of 3 direct calls of the session's compiled ensemble
  program for one time (nothing else). Target: per-time <= 1.2 x one sampler run.
- ``single``: a loop of K single-time ``pipeline.assimilate`` calls without a shared
  session (each compiles), and K single-time ``jaxguide assimilate`` CLI processes
  (imports, model loading, compile): seconds per call and the ratio to the campaign's
  per-time cost.
- ``processes``: the same N-time campaign through ``jaxguide campaign`` in 1 process and
  in 2 processes on this machine (jax.distributed, explicit coordinator): wall time each.
  On a machine with fewer free cores than processes this measures contention, not
  scaling; the numbers say how many cores there were.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("JAXGUIDE_FIXTURES", REPO.parent / "shared" / "fixtures"))
SECTIONS = ("campaign", "single", "processes")


def observations(times: pd.DatetimeIndex, n: int = 12) -> pd.DataFrame:
    from jaxguide.grid import healpix

    lon, lat = healpix.lonlat(64, "nest")
    rng = np.random.default_rng(0)
    rows = []
    for t in times:
        p = rng.choice(lon.size, n, replace=False)
        rows.append(pd.DataFrame({"time": t, "lat": lat[p], "lon": lon[p],
                                  "variable": np.array(["T850", "tas"])[np.arange(n) % 2],
                                  "value": 265.0 + rng.normal(0.0, 8.0, n), "sigma": 1.0}))
    return pd.concat(rows, ignore_index=True)


def settings_args(a) -> list[str]:
    return ["--method", a.method, "--members", str(a.members), "--steps", str(a.steps), "--prior-members", "0"]


def run_cli(args: list[str], env=None) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "jaxguide.cli", *args], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"jaxguide {' '.join(args[:1])} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--times", type=int, default=20, help="analysis times of the campaign")
    p.add_argument("--single", type=int, default=2, help="single-time calls per loop (each compiles)")
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--method", default="mmps")
    p.add_argument("--model", type=Path, help="converted model directory (default: convert the fixture)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--json", type=Path)
    p.add_argument("--per-time", type=float, help="campaign per-time seconds from an earlier run (for the ratios "
                   "when the campaign section is not run)")
    a = p.parse_args()
    sections = a.sections.split(",")

    import jax

    from jaxguide.assimilation import pipeline
    from jaxguide.assimilation.session import Session
    from jaxguide.assimilation.settings import AssimilationSettings
    from jaxguide.campaign.run import assimilate_campaign
    from jaxguide.campaign.times import time_key

    work = Path(tempfile.mkdtemp(prefix="jaxguide-campaign-bench-"))
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "load_average": os.getloadavg(), "jax": jax.__version__,
                                 "device": str(jax.devices()[0])},
                     "config": vars(a) | {"model": str(a.model)}}
    try:
        model = a.model
        if model is None:
            from jaxguide.model.convert import convert_checkpoints

            model = convert_checkpoints([FIXTURES / "tiny.checkpoint"], work / "model")
        times = pd.date_range("2020-01-20T00", periods=a.times, freq="6h")
        from jaxguide.model.sst import write_synthetic_sst

        sst = write_synthetic_sst(work / "sst.nc", times[0], times[-1], resolution_deg=2.0)
        table = observations(times)
        obs_path = work / "obs.parquet"
        table.to_parquet(obs_path)
        settings = AssimilationSettings(method=a.method, members=a.members, steps=a.steps, prior_members=0)
        spec = f"{times[0]:%Y-%m-%dT%H:%M}/{times[-1]:%Y-%m-%dT%H:%M}/PT6H"
        per_time = a.per_time

        if "campaign" in sections:
            session = Session(model)
            t0 = time.perf_counter()
            summary = assimilate_campaign(None, table, work / "c.zarr", times, settings, sst=sst, session=session)
            wall = time.perf_counter() - t0
            secs = [e["seconds"] for e in summary["this_process"]]
            per_time = statistics.median(secs[1:]) if len(secs) > 1 else float("nan")
            # one sampler run: the session's compiled program alone, for the last time's inputs
            from jaxguide.observations.prepare import prepare

            dm, fn = session.model_for(settings)
            t = times[-1]
            from jaxguide.campaign.run import _padding
            from jaxguide.observations.sources import open_observations

            pad = _padding(open_observations(table), times, settings)
            prepared = prepare(table[table["time"] == t], dm.channels, dm.center, dm.scale, time=t, nside=dm.nside,
                               pad_to=pad)
            cond = dm.conditioning(t, sst_path=sst)
            runs = []
            for k in range(3):
                t1 = time.perf_counter()
                ens = session.programs(fn, time_key(k, t), dm.member_shape, a.members,
                                       sampler_kwargs=settings.sampler_kwargs(), devices=session.devices,
                                       operands=(dm.params, cond, settings.guidance_method(), prepared.obs))
                jax.block_until_ready(ens)
                runs.append(time.perf_counter() - t1)
            one_run = statistics.median(runs)
            results["campaign"] = {"times": a.times, "wall_s": wall, "first_time_s": secs[0],
                                   "per_time_s": per_time, "one_sampler_run_s": one_run,
                                   "per_time_over_sampler_run": per_time / one_run, "per_time_all_s": secs}
            print(f"campaign of {a.times} times: {wall:.1f} s; first time {secs[0]:.1f} s (compiles); "
                  f"then {per_time:.3f} s per time (median); one sampler run {one_run:.3f} s "
                  f"-> ratio {per_time / one_run:.2f} (target <= 1.2)", flush=True)

        if "single" in sections and a.single > 0:
            loop = []
            for k in range(a.single):  # one observation file per time, as single-time runs have them
                table[table["time"] == times[k]].to_parquet(work / f"obs{k}.parquet")
                t1 = time.perf_counter()
                pipeline.assimilate(model, work / f"obs{k}.parquet", work / f"single{k}.nc", time=times[k],
                                    settings=settings, sst=sst)
                loop.append(time.perf_counter() - t1)
            cli = [run_cli(["assimilate", "--model", str(model), "--obs", str(work / f"obs{k}.parquet"), "--sst", str(sst),
                            "--time", f"{times[k]:%Y-%m-%dT%H:%M}", "--out", str(work / f"cli{k}.nc"),
                            *settings_args(a)]) for k in range(a.single)]
            entry = {"python_loop_s_per_call": statistics.mean(loop), "cli_loop_s_per_call": statistics.mean(cli),
                     "python_calls": loop, "cli_calls": cli}
            if per_time:
                entry["python_loop_over_campaign_per_time"] = statistics.mean(loop) / per_time
                entry["cli_loop_over_campaign_per_time"] = statistics.mean(cli) / per_time
            results["single"] = entry
            print(f"single-time calls: pipeline.assimilate {statistics.mean(loop):.1f} s per call, "
                  f"jaxguide assimilate (CLI process) {statistics.mean(cli):.1f} s per call"
                  + (f" = {statistics.mean(loop) / per_time:.0f}x / {statistics.mean(cli) / per_time:.0f}x "
                     "the campaign's per-time cost" if per_time else ""), flush=True)

        if "processes" in sections:
            env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
            base = ["campaign", "--model", str(model), "--obs", str(obs_path), "--sst", str(sst), "--times", spec,
                    *settings_args(a)]
            one = run_cli(base + ["--out", str(work / "p1.zarr"), "--distributed", "off"], env)
            with socket.socket() as s:
                s.bind(("localhost", 0))
                addr = f"localhost:{s.getsockname()[1]}"
            t1 = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, "-m", "jaxguide.cli", *base, "--out", str(work / "p2.zarr"),
                                       "--coordinator", addr, "--num-processes", "2", "--process-id", str(i)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for i in range(2)]
            for pr in procs:
                _, err = pr.communicate()
                if pr.returncode != 0:
                    raise RuntimeError(f"2-process campaign failed:\n{err[-3000:]}")
            two = time.perf_counter() - t1
            from jaxguide.campaign.store import read_campaign

            a1, a2 = read_campaign(work / "p1.zarr"), read_campaign(work / "p2.zarr")
            same = all(np.array_equal(a1[v].values, a2[v].values, equal_nan=True) for v in a1.data_vars
                       if a1[v].dtype.kind == "f")
            results["processes"] = {"one_process_s": one, "two_processes_s": two, "speedup": one / two,
                                    "stores_bit_identical": bool(same)}
            print(f"jaxguide campaign, {a.times} times: 1 process {one:.1f} s, 2 processes {two:.1f} s "
                  f"(speedup {one / two:.2f} on {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}); "
                  f"stores bit-identical: {same}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=lambda v: float(v) if np.isscalar(v) else str(v)) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
