"""Cost of a guided step of the video cBottle (time_length T > 1): measured at a reduced
width on this machine, and the FLOP count of the released video model with a computed
GPU estimate.

Run (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/video_step.py --json benchmarks/video_step_reduced.json
    PYTHONPATH=$PWD python benchmarks/video_step.py --config tiny --sections time

Sections:

* ``time``: one jitted function per method (unguided, MMPS cg 1, MMPS cg 3, DPS), each a
  guided denoiser call ``fn(x, sigma, params, cond, method, obs)`` of
  :func:`jaxguide.diffusion.guided.guided_denoiser` on one member (C, T, npix), random weights,
  the window's conditioning from :meth:`CBottleDenoiser.window_conditioning` (per-frame
  calendar, ``[known * mask, SST, mask]`` with frame 0 known, a synthetic SST written by
  :func:`jaxguide.model.sst.write_synthetic_sst`), point observations spread over the frames
  (times on and between frames: the operator interpolates linearly in time) from
  :func:`jaxguide.observations.prepare.prepare` with ``window=``. Protocol as ``perf.py``
  (:func:`perf.timed_jit`): the first call compiles (its compile time is reported
  separately), then ``--repeats`` calls on new data (new x, new y) are timed; the
  minimum is reported. A Heun step (predictor + corrector: two denoiser calls, as
  :func:`jaxguide.diffusion.sampler.sample` does on every step but the last) is timed as its own
  jitted function for the methods in ``--heun``. All ratios come from the same process.
* ``memory``: ``compiled.memory_analysis()`` of the timed programs and of the guided
  programs compiled with per-block rematerialisation (``CBottleDenoiser(remat=True)``),
  compile only (as ``remat_memory.py``).
* ``flops``: XLA's cost analysis of the *lowered* (unoptimised) programs of the released
  video configuration (T = 12, model_channels 256, 45 channels, SST + mask condition,
  281,537,869 parameters) built on ``jax.ShapeDtypeStruct`` s: no parameter or state is
  allocated, nothing is compiled. The same count at the measured config is checked
  against the compiled programs' count. Then a GPU time per step *computed* from the
  FLOPs with stated peak rates and utilisations (no GPU was measured).

Never pass/fail on time: this prints figures. Writes ``--json`` (and ``PATH.partial``
after each measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import analytic_flops, memory_of, timed_jit, unrolled_blocks  # noqa: E402

from jaxguide.diffusion import guidance  # noqa: E402

from jaxguide import observations
from jaxguide.model.conditioning import KnownFrames  # noqa: E402
from jaxguide.model.sst import read_amip_sst  # noqa: E402
from jaxguide.model.config import BatchInfo, ModelConfig  # noqa: E402
from jaxguide.model.denoiser import CBottleDenoiser  # noqa: E402
from jaxguide.diffusion.guided import guided_denoiser  # noqa: E402
from jaxguide.model.checkpoint import CBottleModel, count_params, graphdef_and_shapes, init_params  # noqa: E402
from jaxguide.model.sst import write_synthetic_sst  # noqa: E402

START = "2020-06-01T00:00"
TIME_STEP_H = 6
SIGMA = 2.0  # noise level of the timed denoiser calls
SIGMA_NEXT = 1.5  # the Heun step goes SIGMA -> SIGMA_NEXT
SIGMA_Y = 0.1  # observation error std, normalised units


def _video(model_channels, channels, time_length, channels_per_head, sst=True) -> ModelConfig:
    return ModelConfig(model_channels=model_channels, label_dim=1024, out_channels=channels,
                       condition_channels=channels + (2 if sst else 1), time_length=time_length,
                       calendar_include_legacy_bug=False, channels_per_head=channels_per_head)


CONFIGS = {
    # cbottle-3d-video as released (released_video_state_dict.txt): 281,537,869 parameters
    "released": _video(256, 45, 12, 64),
    # same architecture and channels at 1/16 of the width (1/256 of the conv FLOPs), 4 frames:
    # what 2 CPU cores time in minutes
    "reduced": _video(16, 45, 4, 8),
    "tiny": _video(8, 3, 2, 4),  # the smoke test's size
}
METHODS = {
    "unguided": None,
    "mmps1": guidance.MMPS(cg_iters=1),
    "mmps3": guidance.MMPS(cg_iters=3),
    "dps": guidance.DPS(),
}
# network passes per call: forward + VJPs (a VJP w.r.t. x only)
PASSES = {"unguided": (1, 0), "mmps1": (1, 2), "mmps3": (1, 4), "dps": (1, 1)}

# assumed GPU rates (dense, no sparsity; NVIDIA datasheets, SXM): TF32 tensor core and bf16
GPU_PEAK = {"H100 SXM": {"fp32 (TF32 tensor core)": 494.7e12, "bf16": 989.4e12},
            "H200 SXM": {"fp32 (TF32 tensor core)": 494.7e12, "bf16": 989.4e12}}
UTILISATION = (0.3, 0.5)
# measured on an H100 with the image model (README "Performance"): 76 TFLOP/s in f32
MEASURED_IMAGE_H100_F32 = 76e12
TRAJECTORY_STEPS = 18  # Heun: 2 * 18 - 1 = 35 denoiser calls


def channel_names(n: int) -> tuple[str, ...]:
    """A few real names (observed below, no rlut/rsut/rsds: one network pass) then c{i}."""
    real = ("T850", "tas", "pres_msl", "T500", "Z500")
    return tuple(real[:n]) + tuple(f"c{i}" for i in range(len(real), n))


def build(config: ModelConfig, seed: int = 0, remat: bool = False, abstract: bool = False):
    """(denoiser model, params): random weights, or ShapeDtypeStructs when ``abstract``."""
    chans = channel_names(config.out_channels)
    center = tuple(280.0 if c.startswith("T") or c == "tas" else 0.0 for c in chans)
    center = tuple(101000.0 if c == "pres_msl" else 5500.0 if c == "Z500" else v for c, v in zip(chans, center))
    scale = tuple(1000.0 if c == "pres_msl" else 100.0 if c == "Z500" else 10.0 for c in chans)
    info = BatchInfo(channels=chans, center=center, scales=scale, time_step=TIME_STEP_H)
    if abstract:
        _, shapes = graphdef_and_shapes(config)
        params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)
    else:
        params = init_params(config, seed)
    model = CBottleModel(config, info, (), (params,))
    # label "icon": one network pass (the ERA5 label with rlut/rsut/rsds runs a batch of 2)
    return CBottleDenoiser(model, label="icon", remat=remat), model.params


class Problem:
    """The window, its conditioning (frame 0 known, synthetic SST) and observations."""

    def __init__(self, den: CBottleDenoiser, n_obs: int, sst_dir: str, seed: int = 0):
        cfg = den.model.config
        self.window = den.window(START)
        self.shape = den.member_shape
        c, t, npix = self.shape
        rng = np.random.default_rng(seed)
        known = KnownFrames(rng.standard_normal(self.shape).astype(np.float32), np.arange(t) == 0)
        sst_data = None
        if cfg.condition_channels == cfg.out_channels + 2:
            path = Path(sst_dir) / f"tosbcs_synthetic_{self.window.start:%Y%m%d%H}_{self.window.end:%Y%m%d%H}.nc"
            if not path.exists():  # one file per window (the FLOP section builds the same window twice)
                write_synthetic_sst(path, self.window.start, self.window.end, resolution_deg=2.0)
            sst_data = read_amip_sst(path)
        self.cond = den.window_conditioning(self.window, known=known, sst_data=sst_data)
        # observations on every frame and halfway between frames (hours 0, 3, 6, ...)
        hours = rng.integers(0, 2 * (t - 1) + 1, n_obs) * TIME_STEP_H / 2
        observed = den.channels[: min(3, c)]
        var = rng.choice(observed, n_obs)
        ci = np.array([den.channels.index(v) for v in var])
        table = observations.make_table(
            time=self.window.start + pd.to_timedelta(hours, unit="h"),
            lat=np.degrees(np.arcsin(rng.uniform(-1, 1, n_obs))), lon=rng.uniform(0, 360, n_obs),
            variable=var, value=den.center[ci] + den.scale[ci] * rng.standard_normal(n_obs), sigma=1.0)
        self.prepared = observations.prepare(table, den.channels, den.center, den.scale, window=self.window,
                                             sigma_y=None, pad_to="bucket")
        self.obs = self.prepared.obs
        self.n_obs = n_obs
        self.frames_observed = sorted(set(np.round(self.prepared.table["frame_position"], 2)))

    def x(self, i: int) -> np.ndarray:
        rng = np.random.default_rng(1000 + i)
        return (rng.standard_normal(self.shape) * np.sqrt(1 + SIGMA**2)).astype(np.float32)

    def obs_i(self, i: int):
        """The same operator with new values y (padding rows keep y = 0)."""
        rng = np.random.default_rng(2000 + i)
        y = np.asarray(self.obs.y)
        y = np.where(np.arange(y.size) < self.n_obs, rng.standard_normal(y.size), 0.0).astype(y.dtype)
        return dataclasses.replace(self.obs, y=jnp.asarray(y))


def denoiser_call(den: CBottleDenoiser):
    fn = guided_denoiser(den)

    def call(x, params, cond, method, obs):
        return fn(x, jnp.float32(SIGMA), params, cond, method, obs)

    return call


def heun_step(den: CBottleDenoiser):
    """EDM Heun from SIGMA to SIGMA_NEXT (no churn): predictor + corrector, 2 calls."""
    fn = guided_denoiser(den)

    def step(x, params, cond, method, obs):
        t0, t1 = jnp.float32(SIGMA), jnp.float32(SIGMA_NEXT)
        d0 = (x - fn(x, t0, params, cond, method, obs)) / t0
        xe = x + (t1 - t0) * d0
        d1 = (xe - fn(xe, t1, params, cond, method, obs)) / t1
        return x + (t1 - t0) * (0.5 * d0 + 0.5 * d1)

    return step


# --------------------------------------------------------------------------------------
# FLOPs of the lowered programs (no allocation, no compile)


def lowered_flops(fn, *args) -> float:
    with unrolled_blocks():  # a scanned block would count once
        ca = jax.jit(lambda *a: fn(*a)).lower(*args).cost_analysis()  # a new trace
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca["flops"])


def _abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype)
                                  if isinstance(a, (np.ndarray, jax.Array)) else a, tree)


def flop_counts(config: ModelConfig, n_obs: int, sst_dir: str, methods=("unguided", "mmps1", "mmps3", "dps"),
                era5_batch2: bool = True) -> dict:
    """Lowered-program FLOPs per denoiser call for each method at ``config``; plus the
    network forward at batch 2 (the ERA5 label's two passes)."""
    den, params = build(config, abstract=True)
    prob = Problem(den, n_obs, sst_dir)
    x = jax.ShapeDtypeStruct(prob.shape, jnp.float32)
    cond = _abstract(prob.cond)
    out: dict[str, Any] = {"n_params": count_params(config), "per_call": {}}
    # independent check: perf.analytic_flops of the image network (same width, T = 1) x T frames
    # (convs, spatial attention, embeddings; the video model adds its temporal attention)
    out["analytic_image_x_T"] = analytic_flops(dataclasses.replace(config, time_length=1))["total"] * config.time_length
    call = denoiser_call(den)
    for name in methods:
        t0 = time.perf_counter()
        out["per_call"][name] = lowered_flops(call, x, params, cond, METHODS[name], prob.obs)
        if name == "unguided":
            out["unguided/analytic_image_x_T"] = out["per_call"][name] / out["analytic_image_x_T"]
        print(f"  lowered {name}: {out['per_call'][name] / 1e12:.3f} TFLOP ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    if era5_batch2:
        apply = den.model.apply
        c, t, npix = prob.shape

        def fwd2(p, xb, cnd):
            return apply(p, xb, jnp.float32(SIGMA), class_labels=jnp.zeros((2, config.label_dim)),
                         condition=jnp.broadcast_to(cnd["condition"][None], (2, *cnd["condition"].shape)),
                         second_of_day=jnp.broadcast_to(cnd["second_of_day"], (2, t)),
                         day_of_year=jnp.broadcast_to(cnd["day_of_year"], (2, t)))

        xb = jax.ShapeDtypeStruct((2, c, t, npix), jnp.float32)
        out["forward_batch2"] = lowered_flops(fwd2, den.model.params, xb, cond)
        print(f"  lowered forward at batch 2 (ERA5 label): {out['forward_batch2'] / 1e12:.3f} TFLOP", flush=True)
    return out


def gpu_estimate(flops_per_call: dict, forward_batch2: float | None) -> dict:
    """Seconds per denoiser call, per Heun step (2 calls) and per 18-step trajectory
    (2 * 18 - 1 calls) at the assumed peak rates and utilisations. Computed, not measured."""
    calls = 2 * TRAJECTORY_STEPS - 1
    rows = {}
    for gpu, peaks in GPU_PEAK.items():
        for prec, peak in peaks.items():
            for u in UTILISATION:
                key = f"{gpu}, {prec}, {int(u * 100)}% of peak"
                rows[key] = {name: {"call_s": f / (peak * u), "heun_step_s": 2 * f / (peak * u),
                                    "trajectory_s": calls * f / (peak * u)} for name, f in flops_per_call.items()}
    measured = {name: {"call_s": f / MEASURED_IMAGE_H100_F32, "heun_step_s": 2 * f / MEASURED_IMAGE_H100_F32,
                       "trajectory_s": calls * f / MEASURED_IMAGE_H100_F32} for name, f in flops_per_call.items()}
    rows["H100, f32 at the 76 TFLOP/s measured for the image model"] = measured
    out = {"assumed_peak_flops_per_s": GPU_PEAK, "utilisation": UTILISATION, "trajectory_steps": TRAJECTORY_STEPS,
           "trajectory_calls": calls, "rows": rows}
    if forward_batch2 is not None:
        out["era5_two_pass_factor"] = forward_batch2 / flops_per_call["unguided"]
    return out


# --------------------------------------------------------------------------------------


def run(args) -> dict:
    config = CONFIGS[args.config]
    if args.time_length or args.model_channels:
        config = dataclasses.replace(config, time_length=args.time_length or config.time_length,
                                     model_channels=args.model_channels or config.model_channels)
    config.check_supported()
    sections = set(args.sections.split(","))
    methods = tuple(args.methods.split(","))
    heun = tuple(filter(None, args.heun.split(",")))
    dev = jax.devices()[0]
    res: dict[str, Any] = dict(
        config=args.config, model_config=config.to_dict(), n_params=count_params(config), device=str(dev),
        platform=dev.platform, cpu_count=os.cpu_count(), jax=jax.__version__, python=platform.python_version(),
        n_obs=args.n_obs, repeats=args.repeats, sigma=SIGMA, label="icon (one network pass)",
        conditioning="frame 0 known + synthetic SST (jaxguide.model.sst.write_synthetic_sst) + mask",
        timings={}, ratios={}, memory={})

    def save():
        if args.json:
            Path(args.json + ".partial").write_text(json.dumps(res, indent=1, default=float))

    print(f"# video step: T={config.time_length}, model_channels {config.model_channels}, {config.out_channels} "
          f"channels, condition {config.condition_channels}, channels_per_head {config.channels_per_head} "
          f"({res['n_params']:,} params, random weights) on {dev}, {os.cpu_count()} CPUs, label icon", flush=True)
    with tempfile.TemporaryDirectory() as sst_dir:
        if sections & {"time", "memory"}:
            den, params = build(config)
            prob = Problem(den, args.n_obs, sst_dir)
            res["frames_observed"] = [float(f) for f in prob.frames_observed]
            res["n_obs_padded"] = int(np.shape(prob.obs.y)[0])
            print(f"  {args.n_obs} observations (padded to {res['n_obs_padded']}) at frame positions "
                  f"{res['frames_observed']}; window {prob.window.start} + {config.time_length} x {TIME_STEP_H} h",
                  flush=True)

            def make_args(i):
                return (prob.x(i), params, prob.cond, METHODS[name], prob.obs_i(i))

            comp = {}
            for name in methods:
                t = timed_jit(f"video_{name}", denoiser_call(den), make_args, args.repeats,
                              analyse="memory" in sections)
                res["timings"][name] = t.to_json()
                comp[name] = t
                save()
            for name in heun:
                t = timed_jit(f"video_heun_{name}", heun_step(den), make_args, args.repeats)
                res["timings"][f"heun_{name}"] = t.to_json()
                save()
            if "unguided" in res["timings"]:
                base = res["timings"]["unguided"]["best_s"]
                for name in methods[1:] if methods[0] == "unguided" else methods:
                    res["ratios"][f"{name}/unguided"] = res["timings"][name]["best_s"] / base
                if "heun_unguided" in res["timings"]:
                    hb = res["timings"]["heun_unguided"]["best_s"]
                    res["ratios"]["heun_unguided/unguided call"] = hb / base
                    for name in heun:
                        if name != "unguided":
                            res["ratios"][f"heun_{name}/heun_unguided"] = res["timings"][f"heun_{name}"]["best_s"] / hb
            if "memory" in sections:
                for name, t in comp.items():
                    res["memory"][name] = t.memory
                    res.setdefault("compiled_flops", {})[name] = t.flops
                den_r = dataclasses.replace(den, remat=True)
                for name in args.remat.split(","):
                    if not name:
                        continue
                    t0 = time.perf_counter()
                    compiled = jax.jit(denoiser_call(den_r)).lower(*make_args(0)).compile()
                    m = memory_of(compiled)
                    m["compile_s"] = time.perf_counter() - t0
                    res["memory"][f"{name}_remat"] = m
                    print(f"  compiled {name}_remat for memory ({m['compile_s']:.0f} s)", flush=True)
                    save()
                if "unguided" in res["memory"]:
                    b = res["memory"]["unguided"]
                    for k, m in res["memory"].items():
                        m["peak/unguided"] = m["peak_bytes"] / b["peak_bytes"]
                        m["temp/unguided"] = m["temp_size_in_bytes"] / max(b["temp_size_in_bytes"], 1)
        if "flops" in sections:
            print("# FLOPs of the lowered programs at the measured config (check against the compiled count)",
                  flush=True)
            here = flop_counts(config, args.n_obs, sst_dir, methods=methods, era5_batch2=False)
            res["flops_measured_config"] = here
            if res.get("compiled_flops"):
                res["flops_lowered/compiled"] = {k: here["per_call"][k] / v for k, v in res["compiled_flops"].items()
                                                 if v}
            target = CONFIGS[args.flops_config]
            print(f"# FLOPs of the {args.flops_config} video config (T={target.time_length}, model_channels "
                  f"{target.model_channels}, {target.out_channels} channels), abstract parameters", flush=True)
            t0 = time.perf_counter()
            fl = flop_counts(target, args.n_obs, sst_dir, methods=methods)
            fl["lowering_s"] = time.perf_counter() - t0
            fl["config"] = target.to_dict()
            res["flops_released"] = fl
            res["gpu_estimate"] = gpu_estimate(fl["per_call"], fl.get("forward_batch2"))
            save()
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float))
        Path(args.json + ".partial").unlink(missing_ok=True)
    return res


def report(res: dict) -> str:
    lines = []
    T = res["timings"]
    if T:
        lines += ["", f"## Measured: {res['device']} ({res['cpu_count']} CPUs), {res['n_params']:,} params, "
                      f"{res['n_obs']} obs, {res['repeats']} new-data calls each", "",
                  "| program | run s (best) | vs unguided | compile s | compiles / cache |", "|---|---|---|---|---|"]
        base = T.get("unguided", {}).get("best_s")
        for name, t in T.items():
            ref = T.get("heun_unguided", {}).get("best_s") if name.startswith("heun_") else base
            ratio = f"{t['best_s'] / ref:.2f}x" if ref else ""
            lines.append(f"| {name} | {t['best_s']:.3f} | {ratio} | {t['compile_s']:.1f} | "
                         f"{t['n_compiles']} / {t['cache_size']} |")
        lines.append("(heun_* rows: ratio to heun_unguided)")
    if res.get("memory"):
        lines += ["", "| program | peak MiB | temp MiB | args MiB | peak / unguided | temp / unguided |",
                  "|---|---|---|---|---|---|"]
        for name, m in res["memory"].items():
            lines.append(f"| {name} | {m['peak_bytes'] / 2**20:.1f} | {m['temp_size_in_bytes'] / 2**20:.1f} | "
                         f"{m['argument_size_in_bytes'] / 2**20:.1f} | {m.get('peak/unguided', float('nan')):.2f} | "
                         f"{m.get('temp/unguided', float('nan')):.2f} |")
    if res.get("flops_released"):
        fl = res["flops_released"]
        here = res["flops_measured_config"]["per_call"]
        lines += ["", f"## FLOPs per denoiser call (XLA cost analysis of the lowered program; released video: "
                      f"{fl['n_params']:,} params)", "", "| program | measured config TFLOP | released TFLOP | "
                      "released / its forward |", "|---|---|---|---|"]
        f0 = fl["per_call"]["unguided"]
        for name, f in fl["per_call"].items():
            lines.append(f"| {name} | {here.get(name, float('nan')) / 1e12:.4f} | {f / 1e12:.2f} | {f / f0:.2f} |")
        if "forward_batch2" in fl:
            lines.append(f"| forward at batch 2 (ERA5 two passes) | | {fl['forward_batch2'] / 1e12:.2f} | "
                         f"{fl['forward_batch2'] / f0:.2f} |")
        lines.append(f"lowered unguided / (analytic image-network count x T): released "
                     f"{fl['unguided/analytic_image_x_T']:.3f}, measured config "
                     f"{res['flops_measured_config']['unguided/analytic_image_x_T']:.3f}")
        if res.get("flops_lowered/compiled"):
            lines.append("lowered / compiled count at the measured config: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in res["flops_lowered/compiled"].items()))
        g = res["gpu_estimate"]
        lines += ["", f"## GPU time COMPUTED from the FLOPs (not measured): call / Heun step / "
                      f"{g['trajectory_steps']}-step trajectory ({g['trajectory_calls']} calls), one member, "
                      "label icon",
                  "", "| assumption | " + " | ".join(fl["per_call"]) + " |",
                  "|---|" + "---|" * len(fl["per_call"])]
        for key, row in g["rows"].items():
            cells = [f"{r['call_s'] * 1e3:.0f} ms / {r['heun_step_s'] * 1e3:.0f} ms / {r['trajectory_s']:.1f} s"
                     for r in row.values()]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # "released" (281M parameters, T = 12) is for a GPU (device_check.sh times its unguided call)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="reduced")
    ap.add_argument("--time-length", type=int, default=None, help="override the config's T")
    ap.add_argument("--model-channels", type=int, default=None, help="override the config's width")
    ap.add_argument("--sections", default="time,memory,flops", help="comma list of time,memory,flops")
    ap.add_argument("--methods", default="unguided,mmps1,mmps3,dps",
                    help="comma list of " + ",".join(METHODS) + " (unguided first: the reference)")
    ap.add_argument("--heun", default="", help="methods also timed as a Heun step ('' for none)")
    ap.add_argument("--remat", default="mmps1", help="guided programs compiled with remat for memory")
    ap.add_argument("--flops-config", choices=sorted(CONFIGS), default="released")
    ap.add_argument("--n-obs", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
