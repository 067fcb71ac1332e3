"""Run time of one jitted network forward with the U-Net blocks scanned vs unrolled.

One process, both programs compiled first, then timed alternately (``--repeats`` each,
new data every call, ``block_until_ready``); prints the minimum of each and their ratio.

    PYTHONPATH=. python benchmarks/scan_forward.py --model MODEL_DIR [--batch 1] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxguide.model.checkpoint import graphdef_and_shapes, load_model
from jaxguide.model.config import NPIX
from jaxguide.model.inputs import Conditioning, ForwardOptions
from jaxguide.model.precond import precond_forward


def forward_fn(model, scan: bool):
    """jit(params, x, sigma, cond) -> D with the blocks scanned or unrolled."""
    graphdef, _ = graphdef_and_shapes(model.config)

    def run(params, x, sigma, cond):
        return precond_forward(nnx.merge(graphdef, nnx.State(params)), x, sigma, Conditioning(**cond),
                               ForwardOptions(scan_blocks=scan))

    return jax.jit(run)


def inputs(model, batch: int, seed: int):
    cfg = model.config
    rng = np.random.default_rng(seed)
    t = cfg.time_length
    x = jnp.asarray(rng.standard_normal((batch, cfg.out_channels, t, NPIX)), jnp.float32)
    cond = {"second_of_day": jnp.full((batch, t), 3600.0 * seed, jnp.float32),
            "day_of_year": jnp.full((batch, t), 100.0 + seed, jnp.float32)}
    if cfg.label_dim:
        cond["class_labels"] = jnp.zeros((batch, cfg.label_dim), jnp.float32).at[:, 1].set(1)
    if cfg.condition_channels:
        cond["condition"] = jnp.asarray(rng.standard_normal((batch, cfg.condition_channels, t, NPIX)), jnp.float32)
    return x, jnp.full((batch,), 1.5 + seed, jnp.float32), cond


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    model = load_model(args.model)
    params = model.params[0]
    fns = {mode: forward_fn(model, mode == "scan") for mode in ("scan", "unrolled")}
    for fn in fns.values():  # compile (and run once)
        jax.block_until_ready(fn(params, *inputs(model, args.batch, 0)))
    times = {mode: [] for mode in fns}
    for rep in range(args.repeats):
        for mode, fn in fns.items():
            data = inputs(model, args.batch, rep + 1)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, *data))
            times[mode].append(round(time.perf_counter() - t0, 4))
    result = {"model": args.model, "batch": args.batch, "times_s": times,
              "min_s": {m: min(t) for m, t in times.items()}, "load_1min": round(os.getloadavg()[0], 2)}
    result["scan_over_unrolled"] = round(result["min_s"]["scan"] / result["min_s"]["unrolled"], 3)
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
