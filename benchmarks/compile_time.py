"""Where XLA spends its time compiling the ensemble program (issue 12, item 1).

For each variant of the program that ``jaxguide assimilate`` compiles (the ensemble of
``sample_ensemble``: a ``lax.scan`` over denoiser calls, vmapped over members), prints
and records:

- ``stablehlo_kchars``: size of the lowered (unoptimised) program text, thousands of characters;
- ``hlo_instructions``: instructions in the optimised HLO;
- ``convolutions`` and ``network_copies``: convolutions in the optimised HLO, and that
  count divided by the convolutions of ONE unguided denoiser call (so a forward pass
  counts 1, a VJP about 1 more: the network-sized pieces XLA has to optimise);
- ``lower_s`` / ``compile_s``: wall seconds of ``jit(...).lower`` and ``.compile()``.

Variants: unguided (the prior program) vs MMPS with cg_iters 1 and 3, CG unrolled
(the default) vs kept as a loop, the ERA5 label (two passes batched, the default) vs
one pass (ICON label), members by ``vmap`` (default) vs ``lax.map`` (``chunk_size=1``).

Parameters are abstract (``jax.ShapeDtypeStruct``): nothing is allocated, so the
released configuration (68 M parameters) compiles on a laptop.

``--blocks scan,unrolled`` measures every variant with the U-Net's runs of identical
blocks as one ``lax.scan`` each (``unet.SCAN_BLOCKS = True``, the default) and with
every block unrolled (the former program), alternating per variant, in one process.
Video models (time_length T > 1, e.g. the video fixture's converted checkpoint) get
members (C, T, npix), per-frame conditioning and observations spread over the frames.

    PYTHONPATH=. python benchmarks/compile_time.py --model /tmp/model --json compile_fixture.json
    PYTHONPATH=. python benchmarks/compile_time.py --config released --variants unguided,mmps1
    PYTHONPATH=. python benchmarks/compile_time.py --model /tmp/model --blocks scan,unrolled --variants unguided,mmps1

Compile seconds depend on the machine and its load; compare variants of one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.diffusion import ensemble, guidance

from jaxguide.model import unet
from jaxguide.model.config import BatchInfo, ModelConfig
from jaxguide.model.checkpoint import CBottleModel, graphdef_and_shapes, load_model
from jaxguide.model.config import NPIX
from jaxguide.observations.operator import PointObservationOperator
from jaxguide.model.denoiser import CBottleDenoiser
from jaxguide.diffusion.guided import guided_denoiser
from jaxguide.diffusion.sampler import sample

CONFIGS = {
    # the released coarse cBottle model (68,361,901 parameters), as benchmarks/perf.py
    "released": ModelConfig(model_channels=128, label_dim=1024, out_channels=45, condition_channels=1),
}

# name -> (method, cg_iters, cg_unroll, label, chunk_size)
VARIANTS = {
    "unguided": (None, 0, True, "era5", None),
    "mmps1": ("mmps", 1, True, "era5", None),
    "mmps3": ("mmps", 3, True, "era5", None),
    "mmps3_loop": ("mmps", 3, False, "era5", None),
    "mmps1_one_pass": ("mmps", 1, True, "icon", None),
    "mmps1_lax_map": ("mmps", 1, True, "era5", 1),
}


def abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def model_for(args) -> CBottleModel:
    if args.model:
        m = load_model(args.model)
        return CBottleModel(m.config, m.batch_info, m.sigma_thresholds, abstract(m.params), m.metadata)
    config = CONFIGS[args.config]
    # 42 anonymous channels + the three ERA5 lacks, so the ERA5 label takes two passes as in use
    chans = tuple(f"c{i}" for i in range(config.out_channels - 3)) + ("rlut", "rsut", "rsds")
    _, shapes = graphdef_and_shapes(config)
    return CBottleModel(config, BatchInfo(channels=chans), (), (abstract(shapes),))


def operands_for(model: CBottleModel, n_obs: int):
    """Abstract parameters, conditioning of one window (T frames) and point observations
    (for T > 1 with a frame per stencil entry, K = 8 as video windows)."""
    t = model.config.time_length
    k = 4 if t == 1 else 8
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    A = PointObservationOperator(i32(n_obs), i32(n_obs, k), f32(n_obs, k), None if t == 1 else i32(n_obs, k))
    cond = {"second_of_day": f32(1, t), "day_of_year": f32(1, t)}
    if model.config.condition_channels:
        cond["condition"] = f32(1, model.config.condition_channels, t, NPIX)
    return model.params, cond, guidance.Observations(A, f32(n_obs), f32(n_obs))


def hlo_stats(text: str) -> dict:
    return {
        "hlo_instructions": sum(1 for line in text.splitlines() if re.match(r"\s+(ROOT )?%?[\w.\-]+ = ", line)),
        "convolutions": len(re.findall(r"= [^=]*\bconvolution\(", text)),
    }


def load() -> float:
    """The machine's 1-minute load average (compile seconds depend on it)."""
    return round(__import__("os").getloadavg()[0], 2)


def measure(fn_jit, *args) -> dict:
    t0 = time.perf_counter()
    lowered = fn_jit.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = {"stablehlo_kchars": round(len(lowered.as_text()) / 1e3, 1), "lower_s": round(t1 - t0, 2),
           "compile_s": round(t2 - t1, 2)}
    out.update(hlo_stats(compiled.as_text()))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="converted model directory (e.g. the fixture's); else --config")
    ap.add_argument("--config", default="released", choices=sorted(CONFIGS))
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--n-obs", type=int, default=60)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated, of {list(VARIANTS)}")
    ap.add_argument("--blocks", default="scan", help="comma list of scan,unrolled: U-Net blocks scanned or unrolled")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    model = model_for(args)
    params, cond, obs = operands_for(model, args.n_obs)
    member_shape = (model.config.out_channels, model.config.time_length, NPIX)
    modes = args.blocks.split(",")
    kwargs = ensemble._freeze({"num_steps": args.steps, "sigma_min": 0.02, "sigma_max": 200.0, "rho": 7.0})
    result = {"config": args.model or args.config, "members": args.members, "steps": args.steps, "n_obs": args.n_obs,
              "machine": f"{platform.node()} {jax.devices()[0].platform} cores={__import__('os').cpu_count()}",
              "jax": jax.__version__, "blocks": {mode: {"variants": {}} for mode in modes}}

    def write():  # after every measurement: a long run that is stopped keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    # one unguided denoiser call: the unit of "network copies"
    units = {}
    for mode in modes:
        unet.SCAN_BLOCKS = mode == "scan"
        one = guided_denoiser(CBottleDenoiser(model, "era5"))
        x = jax.ShapeDtypeStruct(member_shape, jnp.float32)
        units[mode] = measure(jax.jit(one), x, jax.ShapeDtypeStruct((), jnp.float32), params, cond, None, None)
        result["blocks"][mode]["one_denoiser_call"] = units[mode]
        print(f"{mode:8s} one unguided denoiser call: {units[mode]} (load {load()})", flush=True)
        write()

    for name in args.variants.split(","):
        method, cg, unroll, label, chunk = VARIANTS[name]
        for mode in modes:  # alternating, so that both see the same machine load
            unet.SCAN_BLOCKS = mode == "scan"
            m = None if method is None else guidance.MMPS(cg_iters=cg, cg_unroll=unroll)
            fn = guided_denoiser(CBottleDenoiser(model, label))
            program = ensemble._build(fn, sample, member_shape, args.members, kwargs, (), chunk)
            stats = measure(program, jax.random.key(0), (params, cond, m, None if m is None else obs))
            stats["network_copies"] = round(stats["convolutions"] / max(units[mode]["convolutions"], 1), 2)
            stats["load_1min"] = load()
            result["blocks"][mode]["variants"][name] = stats
            print(f"{mode:8s} {name:16s} {stats}", flush=True)
            write()
    unet.SCAN_BLOCKS = True
    return result


if __name__ == "__main__":
    main()
