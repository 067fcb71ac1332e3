"""The smoother (``--smoother``, :mod:`jaxguide.model.trajectory`) against the filter chain.

Run (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/smoother.py [--model DIR] [--out benchmarks/smoother.json]

1. **Composite error vs overlap** (exact, float64, no network): the Gaussian AR(1)
   space-time prior (24 h correlation, 6 h frames, nside 2) on L = 16 frames; the
   composite of exact window denoisers (T = 8) against the exact trajectory denoiser,
   RMS error / prior std, per noise level, overlap and weighting.
2. **Cost per frame, side by side** (the video fixture model, CPU, one member): one
   MMPS (1 CG iteration) guided denoiser call on one window (the filter chain's call,
   which adds T - 1 new frames with one conditioning frame) and on a trajectory of L
   frames (the smoother's call, all L frames), for L = 8, 12, 16 (overlap T/2):
   seconds per call (best of ``--repeats``, after compiling), seconds per frame, the smoother's
   cost per frame over the filter's, and how it grows with L.
3. **Memory per frame**: compiled peak bytes (XLA ``memory_analysis``) of those calls,
   without ``remat`` at every L, with it at the second L.

Timings depend on the machine's load: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import memory_of  # noqa: E402

from jaxguide import observations  # noqa: E402
from jaxguide.assimilation.session import as_denoiser_model  # noqa: E402
from jaxguide.diffusion import guidance  # noqa: E402
from jaxguide.diffusion.guided import guided_denoiser  # noqa: E402
from jaxguide.model import gaussian  # noqa: E402
from jaxguide.model.checkpoint import load_model  # noqa: E402
from jaxguide.model.convert.checkpoint import convert_checkpoints  # noqa: E402
from jaxguide.model.sst import read_amip_sst, write_synthetic_sst  # noqa: E402
from jaxguide.model.trajectory import WEIGHTINGS, TrajectoryModel  # noqa: E402
from jaxguide.model.window import FrameWindow  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
START = pd.Timestamp("2016-02-28T18:00")


def composite_errors(length: int = 16, window: int = 8, tau_h: float = 24.0) -> list[dict]:
    jax.config.update("jax_enable_x64", True)
    try:
        prior = lambda n: gaussian.make_prior(2, [0.2], [0.8], [[1.0]], 2500.0, time_length=n,  # noqa: E731
                                              time_step_hours=6.0, correlation_hours=tau_h)
        full = prior(length)
        inner = gaussian.GaussianModel(prior(window), ("T850",), [281.0], [12.0], 2)
        sd = float(np.sqrt(np.mean(full.std() ** 2)))
        x0 = np.asarray(full.sample(jax.random.key(1), 32), np.float64)
        rng = np.random.default_rng(0)
        rows = []
        for sigma in (0.05, 0.2, 0.5, 1.0, 3.0, 10.0):
            x = x0 + sigma * rng.standard_normal(x0.shape)
            exact = jax.vmap(lambda v: full.denoiser(v, sigma))(x)
            for overlap in range(1, window):
                for weighting in WEIGHTINGS:
                    tm = TrajectoryModel(inner, length, overlap, weighting)
                    comp = jax.vmap(lambda v: tm.denoise(inner.params, v, sigma))(x)
                    rows.append(dict(sigma=sigma, overlap=overlap, weighting=weighting, windows=len(tm.starts),
                                     error=float(np.sqrt(np.mean((comp - exact) ** 2)) / sd)))
        return rows
    finally:
        jax.config.update("jax_enable_x64", False)


def _observations(dm, frames: int, n: int = 200):
    rng = np.random.default_rng(0)
    names = list(dm.channels)
    table = observations.make_table(
        START + pd.to_timedelta(rng.uniform(0, frames - 1, n) * float(dm.time_step_hours), unit="h"),
        np.degrees(np.arcsin(rng.uniform(-0.95, 0.95, n))), rng.uniform(0, 360, n),
        [names[i % len(names)] for i in range(n)], np.asarray(dm.center)[np.arange(n) % len(names)], [1.0] * n)
    window = FrameWindow(START, float(dm.time_step_hours), frames)
    return observations.prepare(table, dm.channels, dm.center, dm.scale, nside=dm.nside, window=window).obs


def call_cost(dm, frames: int | None, sst, remat_label: str, repeats: int = 1) -> dict:
    """One guided MMPS(1) call of the window model (frames None) or of the trajectory
    model of ``frames`` frames: compile, best of ``repeats`` runs, compiled memory."""
    model = dm if frames is None else TrajectoryModel(dm, frames)
    c, length, npix = model.member_shape
    cond = model.window_conditioning(FrameWindow(START, float(dm.time_step_hours), length), sst_data=sst)
    obs = _observations(dm, length)
    fn = guided_denoiser(model)
    method = guidance.make("mmps", cg_iters=1)
    x = jax.random.normal(jax.random.key(0), (c, length, npix), jnp.float32) * 2.0
    f = jax.jit(lambda x, params, cond, obs: fn(x, jnp.float32(2.0), params, cond, method, obs))
    t0 = time.perf_counter()
    compiled = f.lower(x, model.params, cond, obs).compile()
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(x, model.params, cond, obs))
        runs.append(time.perf_counter() - t0)
    mem = memory_of(compiled)
    windows = 1 if frames is None else len(model.starts)
    row = dict(kind="window" if frames is None else "trajectory", frames=length, windows=windows, remat=remat_label,
               compile_s=compile_s, call_s=min(runs), runs=runs, peak_bytes=mem.get("peak_bytes"))
    print(f"  {row['kind']:10s} L={length:3d} J={windows:2d} remat={remat_label:3s} compile {compile_s:6.1f} s, "
          f"call {row['call_s']:.3f} s, peak {row['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="converted video model directory (default: the fixture's, converted)")
    p.add_argument("--lengths", default="8,12,16", help="trajectory lengths (frames), comma separated")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per call after compiling (best counts)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/smoother.json"))
    a = p.parse_args(argv)
    print("## composite of exact window denoisers vs the exact trajectory denoiser (RMS / prior std)", flush=True)
    errors = composite_errors()
    for sigma in sorted({r["sigma"] for r in errors}):
        line = [f"sigma {sigma:5g}:"]
        for r in errors:
            if r["sigma"] == sigma:
                line.append(f"K={r['overlap']} {r['weighting'][0]} {r['error']:.3f}")
        print("  " + "  ".join(line), flush=True)

    tmp = Path(tempfile.mkdtemp())
    model_dir = a.model
    if model_dir is None:
        model_dir = tmp / "video_model"
        convert_checkpoints([FIXTURES / "video" / "video.checkpoint"], model_dir)
    sst = read_amip_sst(write_synthetic_sst(tmp / "sst.nc", "2016-02-01", "2016-04-30", resolution_deg=2.0))
    loaded = load_model(model_dir)
    rows = []
    print("## one MMPS(1) guided call: the filter's window vs the smoother's trajectory", flush=True)
    for remat in (False, True):
        dm = as_denoiser_model(loaded, remat=remat)
        label = "yes" if remat else "no"
        base = call_cost(dm, None, sst, label, a.repeats)
        rows.append(base)
        t = dm.member_shape[1]
        lengths = [int(s) for s in a.lengths.split(",")]
        for frames in (lengths if not remat else lengths[1:2]):  # remat: memory per frame at one length
            row = call_cost(dm, frames, sst, label, a.repeats)
            # the filter chain: one window call per T - 1 new frames (one conditioning frame)
            filter_per_frame = base["call_s"] / (t - 1)
            row.update(s_per_frame=row["call_s"] / frames, filter_s_per_frame=filter_per_frame,
                       cost_ratio_per_frame=row["call_s"] / frames / filter_per_frame,
                       bytes_per_frame=row["peak_bytes"] / frames,
                       filter_bytes_per_frame=base["peak_bytes"] / t)
            rows.append(row)
    traj = [r for r in rows if r["kind"] == "trajectory" and r["remat"] == "no"]
    if len(traj) > 1:
        slope, intercept = np.polyfit([r["frames"] for r in traj], [r["call_s"] for r in traj], 1)
        print(f"## growth with L (no remat): call {intercept:.3f} s + {slope:.4f} s/frame (linear fit)", flush=True)
    print("| L | windows | remat | call s | s / frame | filter s / frame | smoother / filter per frame | "
          "peak MiB / frame (filter) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "trajectory":
            print(f"| {r['frames']} | {r['windows']} | {r['remat']} | {r['call_s']:.3f} | {r['s_per_frame']:.4f} | "
                  f"{r['filter_s_per_frame']:.4f} | {r['cost_ratio_per_frame']:.2f} | "
                  f"{r['bytes_per_frame'] / 2**20:.1f} ({r['filter_bytes_per_frame'] / 2**20:.1f}) |")
    a.out.write_text(json.dumps({"composite_errors": errors, "calls": rows,
                                 "device": str(jax.devices()[0]), "cores": len(jax.devices())}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
