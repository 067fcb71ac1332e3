"""Performance benchmark of jaxguide's cBottle network, guidance, ensembles and memory.

Run (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/perf.py --config released --json perf.json
    PYTHONPATH=$PWD python benchmarks/perf.py --config tiny --sections all

Random weights from ``init_params`` (no download). Everything runs on the default JAX
device (``jax.devices()[0]``: the CPU here, a GPU when present). Every ratio in the
table is measured side by side in the same process. See ``benchmarks/README.md``.

Timing protocol: each configuration is one ``jax.jit`` function. Its first call (with
data set 0) compiles and runs; the compile time is what the ``jax.monitoring`` events
``/jax/core/compile/*_duration`` report for that function, and the first call's run time
is estimated as its wall time minus those durations. Then ``--repeats`` more calls with
NEW data (new x, new y) are timed with ``block_until_ready``; the reported time is the
minimum over those calls (the first-call estimate when ``--repeats 0``). The number of
backend compilations of each function (monitoring events with its name) and its
``_cache_size()`` are recorded after all its calls: both must be 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import platform
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.diffusion import guidance

from jaxguide.grid import healpix

from jaxguide.model import unet, xla_options
from jaxguide.model.config import CALENDAR_EMBED_CHANNELS, CHANNEL_MULT_EMB, BatchInfo, ModelConfig
from jaxguide.model.denoiser import make_denoiser
from jaxguide.model.checkpoint import CBottleModel, count_params, init_params
from jaxguide.model.config import NSIDE
from jaxguide.model.unet import decoder_layout, encoder_layout
from jaxguide.diffusion.sampler import sample

CONFIGS = {
    # the released coarse cBottle model (68,361,901 parameters)
    "released": ModelConfig(model_channels=128, label_dim=1024, out_channels=45, condition_channels=1),
    # same architecture, 1/4 of the channels (~1/16 of the FLOPs): the full suite in minutes on CPU
    "medium": ModelConfig(model_channels=32, label_dim=1024, out_channels=45, condition_channels=1),
    "tiny": ModelConfig(model_channels=8, label_dim=1024, out_channels=3, condition_channels=1),
}
SECTIONS = ("forward", "bf16", "guided", "memory", "ensemble", "sampler", "torch")
GUIDED = ("regression", "dps", "sda", "mmps1", "mmps2", "mmps5")
# diagnosis only (not in "all"): MMPS with the CG iterations as a fori_loop (guidance.MMPS's
# cg_unroll=False) instead of unrolled (the default since the diagnosis below)
EXTRA_GUIDED = ("mmps1_loop", "mmps2_loop", "mmps5_loop", "mmps3")  # mmps3: device_check.sh's k = 3 row
SIGMA = 2.0  # noise level of the timed denoiser calls
SIGMA_Y = 0.1

# --------------------------------------------------------------------------------------
# compile accounting (jax.monitoring)

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class CompileLog:
    """Every compile event of the process: (event, seconds, fun_name)."""

    def __init__(self):
        self.events: list[tuple[str, float, str]] = []
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **kw):
        if event in COMPILE_EVENTS:
            self.events.append((event, float(duration), str(kw.get("fun_name", ""))))

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int, fun_name: str | None = None):
        ev = self.events[mark:]
        if fun_name is not None:
            ev = [e for e in ev if fun_name in e[2]]
        seconds = sum(d for _, d, _ in ev)
        n_backend = sum(1 for e, _, _ in ev if e == BACKEND_COMPILE)
        backend_s = sum(d for e, d, _ in ev if e == BACKEND_COMPILE)
        return seconds, n_backend, backend_s


LOG = CompileLog()
# compiler options of every timed program: jaxguide's (what its ensemble programs use; --xla-options)
COMPILER_OPTIONS = xla_options.compiler_options()


def block(tree):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


@dataclasses.dataclass
class Timing:
    name: str
    compile_s: float  # trace + lower + backend compile of the function
    backend_compile_s: float
    first_call_run_s: float  # wall of the first call minus the compile durations
    run_s: list[float]  # timed calls with new data
    n_compiles: int  # backend compiles of this function over all its calls
    cache_size: int
    memory: dict | None = None
    flops: float | None = None
    output: Any = None
    jitted: Any = None

    @property
    def best(self) -> float:
        return min(self.run_s) if self.run_s else self.first_call_run_s

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("output")
        d.pop("jitted")
        d["best_s"] = self.best
        return d


def timed_jit(name: str, fn: Callable, make_args: Callable[[int], tuple], repeats: int,
              analyse: bool = False, keep_output: bool = False) -> Timing:
    """Compile+run ``jit(fn)`` on data set 0, then time ``repeats`` calls on new data sets."""
    fn.__name__ = fn.__qualname__ = name  # the jit's fun_name in the monitoring events
    jf = jax.jit(fn, compiler_options=COMPILER_OPTIONS)
    m = LOG.mark()
    args = make_args(0)
    t0 = time.perf_counter()
    out = block(jf(*args))
    wall = time.perf_counter() - t0
    comp_s, _, backend_s = LOG.since(m, name)
    runs = []
    for r in range(repeats):
        args = make_args(r + 1)
        t0 = time.perf_counter()
        out = block(jf(*args))
        runs.append(time.perf_counter() - t0)
    _, n_compiles, _ = LOG.since(m, name)
    mem = flops = None
    if analyse:  # hits the jit's compilation cache: no new compile
        mem = memory_of(jf.lower(*args).compile())
        with unrolled_blocks():  # the FLOPs of every block (one extra compile)
            unrolled = jax.jit(lambda *a: fn(*a), compiler_options=COMPILER_OPTIONS)  # a new trace
            flops = flops_of(unrolled.lower(*args).compile())
    t = Timing(name, comp_s, backend_s, max(wall - comp_s, 0.0), runs, n_compiles, jf._cache_size(), mem, flops,
               out if keep_output else None, jf)
    print(f"  {name}: compile {t.compile_s:.1f}s, run {t.best:.3f}s (runs {[round(r, 3) for r in runs]}, "
          f"first-call est {t.first_call_run_s:.3f}s), compiles {t.n_compiles}, cache {t.cache_size}",
          flush=True)
    return t


def memory_of(compiled) -> dict:
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    d = {k: int(getattr(ma, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                          "temp_size_in_bytes", "alias_size_in_bytes")}
    d["peak_bytes"] = d["argument_size_in_bytes"] + d["output_size_in_bytes"] + d["temp_size_in_bytes"] \
        - d["alias_size_in_bytes"]
    return d


@contextlib.contextmanager
def unrolled_blocks():
    """Trace the network with every U-Net block unrolled (``unet.SCAN_BLOCKS = False``):
    XLA's cost analysis counts a loop body once, not once per iteration, so FLOPs are
    counted on the unrolled program (same operations)."""
    saved = unet.SCAN_BLOCKS
    unet.SCAN_BLOCKS = False
    try:
        yield
    finally:
        unet.SCAN_BLOCKS = saved


def flops_of(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca:
        return None
    return float(ca.get("flops", float("nan")))


def device_peak() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # CPU devices may not implement it
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


# --------------------------------------------------------------------------------------
# the model and the problem


def build(config: ModelConfig, seed: int = 0):
    chans = tuple(f"c{i}" for i in range(config.out_channels))  # no rlut/rsut/rsds: one pass
    params = init_params(config, seed)
    model = CBottleModel(config, BatchInfo(channels=chans), (), (params,))
    return model, params


def make_den(model, params, cond, compute_dtype=jnp.float32, remat=False):
    """One-pass (label "icon") denoiser (C, 1, npix) -> (C, 1, npix), params traced."""
    return make_denoiser(model, condition=cond, second_of_day=43200.0, day_of_year=100.0, label="icon",
                         params=(params,), compute_dtype=compute_dtype, remat=remat)


class Problem:
    """Random states and ~n_obs point observations (a gather of random channels/pixels)."""

    def __init__(self, config: ModelConfig, n_obs: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.shape = (config.out_channels, 1, 12 * NSIDE * NSIDE)
        c, _, npix = self.shape
        self.n_obs = n_obs
        self.obs_c = rng.integers(0, c, n_obs).astype(np.int32)
        self.obs_p = rng.choice(npix, n_obs, replace=False).astype(np.int32)
        self.cond = rng.standard_normal((1, 1, 1, npix)).astype(np.float32)
        self.seed = seed

    def A(self, x):
        return x[self.obs_c, 0, self.obs_p]

    def x(self, i: int, members: int | None = None) -> np.ndarray:
        rng = np.random.default_rng(1000 + i)
        shape = self.shape if members is None else (members, *self.shape)
        return (rng.standard_normal(shape) * np.sqrt(1 + SIGMA**2)).astype(np.float32)

    def y(self, i: int) -> np.ndarray:
        rng = np.random.default_rng(2000 + i)
        return rng.standard_normal(self.n_obs).astype(np.float32)


def guided_fn(method: str, model, problem: Problem, remat: str | None = None):
    """step(params, x, y) -> guided D at sigma = SIGMA (one member)."""
    cg = {"mmps1": 1, "mmps2": 2, "mmps3": 3, "mmps5": 5}
    looped = method.endswith("_loop")
    method = method.removesuffix("_loop")

    def step(params, x, y):
        den = make_den(model, params, problem.cond, remat=remat == "blocks")
        if remat == "net":
            den = jax.checkpoint(den)
        if method in cg:
            g = guidance.MMPS(cg_iters=cg[method], cg_unroll=not looped)(den, guidance.Observations(problem.A, y, SIGMA_Y))
        elif method == "regression":
            g = guidance.Regression(scale=SIGMA_Y**2)(den, guidance.Observations(problem.A, y, SIGMA_Y))
        else:
            g = guidance.make(method)(den, guidance.Observations(problem.A, y, SIGMA_Y))
        return g(x, jnp.float32(SIGMA))

    return step


# --------------------------------------------------------------------------------------
# analytic FLOPs


def conv_list(config: ModelConfig) -> list[tuple[str, int, int, int, int]]:
    """(kind, nside, cin, cout, count) of every conv / matmul of the forward."""
    out: list[tuple[str, int, int, int]] = []
    mc = config.model_channels
    cin0 = config.out_channels + config.condition_channels + 4 * CALENDAR_EMBED_CHANNELS

    def block(res, cin, cout, resample, attn):
        r = res // 2 if resample == "down" else (res * 2 if resample == "up" else res)
        out.append(("conv3", r, cin, cout))
        out.append(("conv3", r, cout, cout))
        if cin != cout or resample is not None:
            out.append(("conv1", r, cin, cout))
        if attn:
            out.append(("conv1", r, cout, 3 * cout))
            out.append(("attn", r, cout, cout))
            out.append(("conv1", r, cout, cout))

    def res_of(name):
        return int(name.split("x")[0])

    for name, cin, cout, resample, attn, _temporal in encoder_layout(config):
        res = res_of(name)
        if name.endswith("_conv_embed"):
            out.append(("conv3", res, cin0, mc))
        else:
            block(res * 2 if resample == "down" else res, cin, cout, resample, attn)
    for name, cin, cout, resample, attn, _temporal in decoder_layout(config):
        res = res_of(name)
        block(res // 2 if resample == "up" else res, cin, cout, resample, attn)
    out.append(("conv3", NSIDE, mc, config.out_channels))
    counts = collections.Counter(out)
    return [(k, r, ci, co, n) for (k, r, ci, co), n in counts.items()]


def analytic_flops(config: ModelConfig) -> dict:
    """2 x multiply-adds of convs, 1x1 convs, attention matmuls and embedding linears."""
    tot = collections.Counter()
    for kind, r, ci, co, n in conv_list(config):
        npx = 12 * r * r
        if kind == "conv3":
            tot[kind] += n * 2 * npx * 9 * ci * co
        elif kind == "conv1":
            tot[kind] += n * 2 * npx * ci * co
        else:  # q k^T and w v: 2 matmuls of npx x npx x c
            tot[kind] += n * 2 * 2 * npx * npx * ci
    mc, emb = config.model_channels, config.model_channels * CHANNEL_MULT_EMB
    tot["linear"] = 2 * (config.label_dim * mc + mc * emb + emb * emb)
    n_blocks = len(encoder_layout(config)) - 1 + len(decoder_layout(config))
    tot["linear"] += 2 * n_blocks * emb * 0  # affine(emb) per block: negligible, counted below
    tot["linear"] += sum(2 * emb * co for _, _, co, _, _, _ in encoder_layout(config)[1:] + decoder_layout(config))
    d = {k: float(v) for k, v in tot.items()}
    d["total"] = float(sum(tot.values()))
    return d


# --------------------------------------------------------------------------------------
# conv microbenchmarks: XLA conv, XLA as 9 shifted matmuls, torch conv2d


def _best(fn, n=2):
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def conv_micro(config: ModelConfig, reps: int) -> dict:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    tot = collections.Counter()
    for kind, r, ci, co, n in conv_list(config):
        if kind != "conv3":
            continue
        rng = np.random.default_rng(0)
        xp = rng.standard_normal((12, r + 2, r + 2, ci)).astype(np.float32)
        w = (rng.standard_normal((3, 3, ci, co)) / np.sqrt(9 * ci)).astype(np.float32)
        flops = 2 * 12 * r * r * 9 * ci * co
        def conv(a, b):
            return jax.lax.conv_general_dilated(a, b, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

        xla = jax.jit(conv)  # XLA's default options
        xla_jg = jax.jit(conv, compiler_options=xla_options.compiler_options())  # jaxguide's

        def shifted(a, b, r=r):
            return sum(a[:, i:i + r, j:j + r, :] @ b[i, j] for i in range(3) for j in range(3))

        sh = jax.jit(shifted)
        xj, wj = jnp.asarray(xp), jnp.asarray(w)
        npix = 12 * r * r
        xs = jnp.asarray(rng.standard_normal((1, npix, ci)).astype(np.float32))
        padf = jax.jit(lambda a: healpix.pad(a, 1))
        t_xla = _best(lambda: xla(xj, wj).block_until_ready(), reps)
        t_xla_jg = _best(lambda: xla_jg(xj, wj).block_until_ready(), reps)
        t_sh = _best(lambda: sh(xj, wj).block_until_ready(), reps)
        t_pad = _best(lambda: padf(xs).block_until_ready(), reps)
        xt = torch.from_numpy(np.ascontiguousarray(xp.transpose(0, 3, 1, 2)))
        wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
        with torch.no_grad():
            t_t = _best(lambda: torch.nn.functional.conv2d(xt, wt), reps)
        rows.append(dict(nside=r, cin=ci, cout=co, count=n, gflop=flops / 1e9, xla_s=t_xla, xla_jaxguide_s=t_xla_jg,
                         shifted_s=t_sh,
                         torch_s=t_t, pad_gather_s=t_pad))
        tot["flops"] += n * flops
        tot["xla_s"] += n * t_xla
        tot["xla_jaxguide_s"] += n * t_xla_jg
        tot["shifted_s"] += n * t_sh
        tot["torch_s"] += n * t_t
        tot["pad_gather_s"] += n * t_pad
        print(f"  conv3 nside {r} {ci}->{co} x{n}: {flops / 1e9:.2f} GFLOP; GFLOP/s xla {flops / t_xla / 1e9:.1f}, "
              f"shifted-matmul {flops / t_sh / 1e9:.1f}, torch {flops / t_t / 1e9:.1f}; pad {t_pad * 1e3:.1f} ms",
              flush=True)
    summary = {k: float(v) for k, v in tot.items()}
    for k in ("xla", "xla_jaxguide", "shifted", "torch"):
        summary[f"{k}_gflops_per_s"] = tot["flops"] / tot[f"{k}_s"] / 1e9
    return dict(rows=rows, summary=summary, torch_threads=torch.get_num_threads())


# --------------------------------------------------------------------------------------
# the benchmark


def run(args) -> dict:
    config = CONFIGS[args.config]
    sections = set(SECTIONS if args.sections == "all" else args.sections.split(","))
    guided_methods = GUIDED if args.guided == "all" else tuple(args.guided.split(","))
    dev = jax.devices()[0]
    res: dict[str, Any] = dict(
        config=args.config, model_config=config.to_dict(), n_params=count_params(config),
        device=str(dev), platform=dev.platform, jax=jax.__version__, python=platform.python_version(),
        n_obs=args.n_obs, members=args.members, steps=args.steps, repeats=args.repeats, sigma=SIGMA,
        timings={}, ratios={}, targets={},
    )
    print(f"# jaxguide perf: config {args.config} ({res['n_params']:,} params) on {dev}", flush=True)
    t0 = time.perf_counter()
    model, params = build(config)
    res["init_s"] = time.perf_counter() - t0
    prob = Problem(config, args.n_obs)
    T: dict[str, Timing] = {}
    xs = prob.x
    reps = args.repeats

    def record(t: Timing):
        T[t.name] = t
        res["timings"][t.name] = t.to_json()
        if args.json:  # partial results survive an interrupted run
            with open(args.json + ".partial", "w") as f:
                json.dump(res, f, indent=1, default=float)

    # ---------------- forward (unguided denoiser call), always
    def unguided(p, x):
        return make_den(model, p, prob.cond)(x, jnp.float32(SIGMA))

    print("## unguided denoiser call (network forward)", flush=True)
    n_fwd = max(reps, 1)  # at least one call with new data: shows no recompilation
    record(timed_jit("unguided", unguided, lambda i: (params, xs(i)), n_fwd, analyse=True,
                     keep_output="bf16" in sections))
    t_fwd = T["unguided"].best
    res["analytic_flops"] = analytic_flops(config)
    xla_flops = T["unguided"].flops
    res["forward"] = dict(
        xla_flops=xla_flops, analytic_flops=res["analytic_flops"]["total"],
        gflops_per_s_xla_count=(xla_flops / t_fwd / 1e9) if xla_flops else None,
        gflops_per_s_analytic=res["analytic_flops"]["total"] / t_fwd / 1e9,
    )

    if "bf16" in sections:
        print("## bfloat16 network", flush=True)

        def unguided_bf16(p, x):
            return make_den(model, p, prob.cond, compute_dtype=jnp.bfloat16)(x, jnp.float32(SIGMA))

        t16 = timed_jit("unguided_bf16", unguided_bf16, lambda i: (params, xs(i)), reps, keep_output=True)
        record(t16)
        # compare on the data set of the kept fp32 output (the last one of the unguided calls)
        d32 = np.asarray(T["unguided"].output, np.float64)
        d16 = np.asarray(t16.output if reps == n_fwd else t16.jitted(params, xs(n_fwd)), np.float64)
        diff = d16 - d32
        res["bf16"] = dict(
            time_ratio_bf16_over_fp32=t16.best / t_fwd,
            max_abs_diff=float(np.max(np.abs(diff))),
            rms_rel_diff=float(np.sqrt(np.mean(diff**2)) / np.sqrt(np.mean(d32**2))),
            rms_D=float(np.sqrt(np.mean(d32**2))),
        )
        res["ratios"]["bf16/fp32 time"] = t16.best / t_fwd

    if "guided" in sections:
        print("## guided denoiser calls (%d point observations)" % args.n_obs, flush=True)
        for meth in guided_methods:
            record(timed_jit(meth, guided_fn(meth, model, prob), lambda i: (params, xs(i), prob.y(i)), reps))
            res["ratios"][f"{meth}/unguided"] = T[meth].best / t_fwd

    if "memory" in sections:
        print("## memory (compiled memory_analysis; compile only)", flush=True)
        mem = {"unguided": T["unguided"].memory}
        for label, remat in (("dps", None), ("dps_remat_net", "net"), ("dps_remat_blocks", "blocks")):
            fn = guided_fn("dps", model, prob, remat=remat)
            fn.__name__ = fn.__qualname__ = "mem_" + label
            m = LOG.mark()
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(params, xs(0), prob.y(0)).compile()
            dt = time.perf_counter() - t0
            mem[label] = memory_of(compiled)
            mem[label]["compile_s"] = dt
            mem[label]["n_compiles"] = LOG.since(m, "mem_" + label)[1]
            print(f"  {label}: peak {mem[label]['peak_bytes'] / 2**20:.0f} MiB "
                  f"(temp {mem[label]['temp_size_in_bytes'] / 2**20:.0f} MiB), compile {dt:.1f}s", flush=True)
        res["memory"] = mem
        base = mem["unguided"]["peak_bytes"]
        for k in ("dps", "dps_remat_net", "dps_remat_blocks"):
            res["ratios"][f"peak mem {k}/unguided"] = mem[k]["peak_bytes"] / base
            res["ratios"][f"temp mem {k}/unguided"] = mem[k]["temp_size_in_bytes"] / max(
                mem["unguided"]["temp_size_in_bytes"], 1)
        res["device_peak_bytes_in_use"] = device_peak()

    if "ensemble" in sections:
        print(f"## ensemble of {args.members}: vmap vs {args.members} single calls", flush=True)
        M = args.members

        def ens(p, x):
            return jax.vmap(lambda xi: make_den(model, p, prob.cond)(xi, jnp.float32(SIGMA)))(x)

        record(timed_jit("ensemble_vmap", ens, lambda i: (params, xs(i, M)), reps))
        # M single-member calls of the already-compiled unguided step, new data each
        jf = jax.jit(unguided)
        m = LOG.mark()
        xm = xs(99, M)
        t0 = time.perf_counter()
        for j in range(M):
            block(jf(params, xm[j]))
        t_single = time.perf_counter() - t0
        n_new = LOG.since(m)[1]
        res["ensemble"] = dict(vmap_s=T["ensemble_vmap"].best, singles_s=t_single, singles_new_compiles=n_new,
                               singles_per_member_s=t_single / M)
        res["ratios"][f"vmap {M} / {M} singles"] = T["ensemble_vmap"].best / t_single
        print(f"  {M} single calls: {t_single:.3f}s ({n_new} new compiles)", flush=True)

    if "sampler" in sections:
        print(f"## sampler run: {args.steps} Euler steps (= {args.steps} denoiser calls)", flush=True)

        def samp(p, key):
            den = make_den(model, p, prob.cond)
            return sample(den, key, prob.shape, num_steps=args.steps, sigma_min=0.02, sigma_max=80.0,
                          solver="euler")

        t = timed_jit("sampler_unguided", samp, lambda i: (params, jax.random.key(i)), reps)
        record(t)
        res["ratios"]["sampler run / (steps x unguided call)"] = t.best / (args.steps * t_fwd)
        if "guided" in sections and "dps" in T:
            def samp_dps(p, key, y):
                den = make_den(model, p, prob.cond)
                g = guidance.DPS()(den, guidance.Observations(prob.A, y, SIGMA_Y))
                return sample(g, key, prob.shape, num_steps=args.steps, sigma_min=0.02, sigma_max=80.0,
                              solver="euler")

            t = timed_jit("sampler_dps", samp_dps, lambda i: (params, jax.random.key(i), prob.y(i)), reps)
            record(t)
            res["ratios"]["dps sampler run / (steps x dps call)"] = t.best / (args.steps * T["dps"].best)

    if "torch" in sections:
        print("## 3x3 convs of the network: XLA conv vs XLA shifted matmuls vs torch conv2d (eager)", flush=True)
        micro = conv_micro(config, max(reps, 1))
        res["conv_micro"] = micro
        s = micro["summary"]
        res["forward"].update(
            conv3_flops=s["flops"], conv3_xla_s=s["xla_s"], conv3_torch_s=s["torch_s"],
            conv3_shifted_s=s["shifted_s"], pad_gather_s=s["pad_gather_s"],
            other_s=t_fwd - s["xla_s"] - s["pad_gather_s"],
        )
        res["ratios"]["jax forward GFLOP/s / torch conv GFLOP/s"] = (
            res["forward"]["gflops_per_s_analytic"] / s["torch_gflops_per_s"])

    res["compiles"] = {name: t.n_compiles for name, t in T.items()}
    res["cache_sizes"] = {name: t.cache_size for name, t in T.items()}
    res["targets"] = targets(res, args)
    return res


def targets(res: dict, args) -> dict:
    r = res["ratios"]
    out = {}

    def add(name, value, limit):
        if value is not None:
            out[name] = dict(value=value, limit=limit, met=bool(value <= limit))

    for m in ("regression", "dps"):
        add(f"{m} step <= 2.5x unguided", r.get(f"{m}/unguided"), 2.5)
    for k in (1, 2, 5):
        add(f"mmps k={k} step <= {k + 2}x unguided", r.get(f"mmps{k}/unguided"), k + 2)
    M = args.members
    add(f"vmap ensemble of {M} <= 0.8x {M} singles", r.get(f"vmap {M} / {M} singles"), 0.8)
    add("guided step with remat (blocks) <= 3x unguided peak memory", r.get("peak mem dps_remat_blocks/unguided"), 3.0)
    if res["compiles"]:
        worst = max(res["compiles"].values())
        out["no recompilation (max compiles per function, cache size)"] = dict(
            value=worst, limit=1, met=bool(worst <= 1 and max(res["cache_sizes"].values()) <= 1
                                           and res.get("ensemble", {}).get("singles_new_compiles", 0) == 0))
    v = r.get("jax forward GFLOP/s / torch conv GFLOP/s")
    if v is not None:
        out["network forward GFLOP/s >= torch eager conv GFLOP/s"] = dict(value=v, limit=1.0, met=bool(v >= 1.0))
    return out


def table(res: dict) -> str:
    L = []
    L.append(f"### jaxguide perf — config `{res['config']}` ({res['n_params']:,} params), device `{res['device']}`, "
             f"jax {res['jax']}")
    L.append("")
    L.append("| measurement | compile s | time s | ratio | compiles | cache |")
    L.append("|---|---:|---:|---:|---:|---:|")
    base = res["timings"]["unguided"]["best_s"]
    for name, t in res["timings"].items():
        L.append(f"| {name} | {t['compile_s']:.1f} | {t['best_s']:.3f} | {t['best_s'] / base:.2f}x unguided | "
                 f"{t['n_compiles']} | {t['cache_size']} |")
    if "ensemble" in res:
        e = res["ensemble"]
        L.append(f"| {res['members']} single calls (compiled unguided) | – | {e['singles_s']:.3f} | "
                 f"{e['singles_s'] / base:.2f}x unguided | {e['singles_new_compiles']} new | – |")
    L.append("")
    f = res["forward"]
    L.append("| forward | value |")
    L.append("|---|---:|")
    if f.get("xla_flops"):
        L.append(f"| XLA cost_analysis flops | {f['xla_flops'] / 1e9:.1f} GFLOP |")
    L.append(f"| analytic conv/matmul flops | {f['analytic_flops'] / 1e9:.1f} GFLOP |")
    if f.get("gflops_per_s_xla_count"):
        L.append(f"| achieved (XLA count / time) | {f['gflops_per_s_xla_count']:.1f} GFLOP/s |")
    L.append(f"| achieved (analytic / time) | {f['gflops_per_s_analytic']:.1f} GFLOP/s |")
    if "conv3_xla_s" in f:
        s = res["conv_micro"]["summary"]
        L.append(f"| 3x3 convs alone, XLA conv (sum of isolated convs) | {f['conv3_xla_s']:.2f} s, "
                 f"{s['xla_gflops_per_s']:.1f} GFLOP/s |")
        L.append(f"| 3x3 convs alone, XLA conv with jaxguide's compiler options | {s['xla_jaxguide_s']:.2f} s, "
                 f"{s['flops'] / s['xla_jaxguide_s'] / 1e9:.1f} GFLOP/s |")
        L.append(f"| 3x3 convs alone, XLA 9 shifted matmuls | {f['conv3_shifted_s']:.2f} s, "
                 f"{s['shifted_gflops_per_s']:.1f} GFLOP/s |")
        L.append(f"| 3x3 convs alone, torch conv2d eager | {f['conv3_torch_s']:.2f} s, "
                 f"{s['torch_gflops_per_s']:.1f} GFLOP/s |")
        L.append(f"| HEALPix padding gathers (sum) | {f['pad_gather_s']:.2f} s |")
        L.append(f"| rest of forward (norms, silu, attention, 1x1, concat) | {f['other_s']:.2f} s |")
    if "bf16" in res:
        b = res["bf16"]
        L.append(f"| bf16/fp32 time | {b['time_ratio_bf16_over_fp32']:.2f}x |")
        L.append(f"| bf16 vs fp32 D: max abs / RMS rel | {b['max_abs_diff']:.3g} / {b['rms_rel_diff']:.3g} |")
    if "memory" in res:
        L.append("")
        L.append("| memory (compiled) | args MiB | temp MiB | out MiB | peak MiB | peak / unguided |")
        L.append("|---|---:|---:|---:|---:|---:|")
        b0 = res["memory"]["unguided"]["peak_bytes"]
        for k, m in res["memory"].items():
            L.append(f"| {k} | {m['argument_size_in_bytes'] / 2**20:.0f} | {m['temp_size_in_bytes'] / 2**20:.0f} | "
                     f"{m['output_size_in_bytes'] / 2**20:.0f} | {m['peak_bytes'] / 2**20:.0f} | "
                     f"{m['peak_bytes'] / b0:.2f}x |")
        if res.get("device_peak_bytes_in_use"):
            L.append(f"\ndevice peak_bytes_in_use: {res['device_peak_bytes_in_use'] / 2**20:.0f} MiB")
    L.append("")
    L.append("| ratio | value |")
    L.append("|---|---:|")
    for k, v in res["ratios"].items():
        L.append(f"| {k} | {v:.3f} |")
    L.append("")
    L.append("| target | measured | limit | met |")
    L.append("|---|---:|---:|:---:|")
    for k, t in res["targets"].items():
        L.append(f"| {k} | {t['value']:.3g} | {t['limit']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="released")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed calls with new data after the compiling call (0: first-call estimate)")
    ap.add_argument("--n-obs", type=int, default=1000)
    ap.add_argument("--sections", default="all", help=f"comma list of {SECTIONS} or 'all' (forward always runs)")
    ap.add_argument("--guided", default="all", help=f"comma list of {GUIDED + EXTRA_GUIDED} or 'all' (= {GUIDED})")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--xla-options", choices=("jaxguide", "default"), default="jaxguide",
                    help="compile the timed programs with jaxguide's compiler options (jaxguide.model.xla_options, "
                         "what its ensemble programs use) or XLA's defaults")
    args = ap.parse_args(argv)
    global COMPILER_OPTIONS
    COMPILER_OPTIONS = xla_options.compiler_options() if args.xla_options == "jaxguide" else {}
    t0 = time.perf_counter()
    res = run(args)
    res["compiler_options"] = COMPILER_OPTIONS
    res["total_wall_s"] = time.perf_counter() - t0
    res["argv"] = sys.argv[1:] if argv is None else list(argv)
    print()
    print(table(res))
    print(f"\ntotal wall {res['total_wall_s']:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=float)
    return res


if __name__ == "__main__":
    main()
