"""Sampling at the cost of its network calls (issue "compile fast, test fast", item 2).

Times, in one process and alternating, the same guided denoiser (``guidance.MMPS`` on
``CBottleDenoiser(model, label="era5")``, members vmapped, no progress callback, 60
point observations) run two ways:

- ``calls``: ``2 steps - 1`` top-level calls of the jitted, vmapped denoiser (the
  number of calls a Heun trajectory makes), each on new data;
- ``sampler``: one jitted ``sampler.sample`` trajectory (the ``lax.scan`` over the
  same calls) for the same members.

and prints ``sampler / calls`` (target <= 1.25). Variants, each compiled separately:

- ``grad``: the 3x3 convolution's input gradient as written in
  ``layers.conv3x3_valid`` (``written``, today) or JAX's own transposed convolution
  (``autodiff``, the code before; its kernel is labelled (out, in), which XLA:CPU
  only canonicalises for its fast kernels outside loop bodies);
- ``options``: the programs compiled with ``xla_options.compiler_options()`` (``jaxguide``,
  what the ensemble programs use) or XLA's defaults (``default``).

    PYTHONPATH=. python benchmarks/sampling_overhead.py --json benchmarks/sampling_overhead.json

Uses the fixture checkpoint (``../shared/fixtures/tiny.checkpoint``) and a synthetic SST file.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxguide
from jaxguide.diffusion import guidance, sampler
from jaxguide.model import layers, xla_options
from jaxguide.model.convert import convert_checkpoints
from jaxguide.model.denoiser import CBottleDenoiser
from jaxguide.model.sst import write_synthetic_sst

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("JAXGUIDE_FIXTURES", REPO.parent / "shared" / "fixtures"))
TIME = "2020-01-20T00:00"


def _autodiff_conv(padded, w):
    return jax.lax.conv_general_dilated(padded, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def build(den, method, obs, cond, members, steps, options, grad):
    """Compiled (calls, sampler) programs for one variant."""
    shape = den.member_shape
    kw = dict(num_steps=steps, sigma_min=0.02, sigma_max=80.0)

    def one(x, s, params):
        d = functools.partial(den.denoise, params)
        return d(x, s, cond) if method is None else method(d, obs)(x, s, cond)

    def trajectory(keys, params):
        return jax.vmap(lambda k: sampler.sample(lambda x, s: one(x, s, params), k, shape, **kw))(keys)

    call = jax.jit(jax.vmap(one, in_axes=(0, None, None)))
    traj = jax.jit(trajectory)
    keys = jax.random.split(jax.random.key(0), members)
    x = jnp.zeros((members, *shape), jnp.float32)
    original = layers.conv3x3_valid
    if grad == "autodiff":
        layers.conv3x3_valid = _autodiff_conv  # traced now: the compiled programs keep it
    try:
        t0 = time.perf_counter()
        c_call = call.lower(x, jnp.float32(1.0), den.params).compile(options)
        t1 = time.perf_counter()
        c_traj = traj.lower(keys, den.params).compile(options)
        t2 = time.perf_counter()
    finally:
        layers.conv3x3_valid = original
    return c_call, c_traj, keys, {"compile_calls_s": round(t1 - t0, 1), "compile_sampler_s": round(t2 - t1, 1)}


def time_variant(c_call, c_traj, keys, den, members, steps, seed):
    rng = np.random.default_rng(seed)
    n_calls = 2 * steps - 1
    xs = [jnp.asarray(rng.normal(size=(members, *den.member_shape)), jnp.float32) for _ in range(n_calls)]
    sig = [jnp.float32(s) for s in np.geomspace(80, 0.02, n_calls)]
    jax.block_until_ready(xs)
    t = time.perf_counter()
    for x, s in zip(xs, sig):
        out = c_call(x, s, den.params)
    out.block_until_ready()
    calls = time.perf_counter() - t
    t = time.perf_counter()
    c_traj(keys, den.params).block_until_ready()
    return calls, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--methods", default="mmps1,unguided")
    ap.add_argument("--variants", default="written/jaxguide,autodiff/jaxguide,written/default,autodiff/default",
                    help="comma list of GRAD/OPTIONS, GRAD in written|autodiff, OPTIONS in jaxguide|default")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="jaxguide_sampling_"))
    model = jaxguide.load_model(convert_checkpoints([FIXTURES / "tiny.checkpoint"], work / "model"))
    write_synthetic_sst(work / "sst.nc", TIME, TIME)
    den = CBottleDenoiser(model, label="era5")
    cond = jax.tree_util.tree_map(jnp.asarray, den.conditioning(TIME, sst_path=work / "sst.nc"))
    c, _, npix = den.member_shape
    rng = np.random.default_rng(0)
    idx_c, idx_p = jnp.asarray(rng.integers(0, c, 60)), jnp.asarray(rng.integers(0, npix, 60))
    obs = guidance.Observations(A=lambda x: x[idx_c, 0, idx_p], y=jnp.asarray(rng.normal(size=60), jnp.float32),
                                sigma_y=jnp.float32(0.1))
    out = {"machine_cores": os.cpu_count(), "load_before": os.getloadavg(), "members": args.members,
           "steps": args.steps, "calls_per_trajectory": 2 * args.steps - 1, "jax": jax.__version__, "rows": []}
    for name in args.methods.split(","):
        method = None if name == "unguided" else guidance.MMPS(cg_iters=int(name.removeprefix("mmps")))
        built = {}
        for v in args.variants.split(","):
            grad, opts = v.split("/")
            options = xla_options.compiler_options() if opts == "jaxguide" else {}
            built[v] = build(den, method, obs, cond, args.members, args.steps, options, grad)
        times = {v: [] for v in built}
        for r in range(args.rounds):  # alternate the variants, round after round
            for v, (c_call, c_traj, keys, _) in built.items():
                times[v].append(time_variant(c_call, c_traj, keys, den, args.members, args.steps, r))
        for v, (_, _, _, compile_s) in built.items():
            calls, traj = (min(t[i] for t in times[v]) for i in (0, 1))
            row = {"method": name, "variant": v, "calls_s": round(calls, 2), "sampler_s": round(traj, 2),
                   "sampler_over_calls": round(traj / calls, 2), **compile_s}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    out["load_after"] = os.getloadavg()
    print(f"\n| method | conv gradient / compiler options | {out['calls_per_trajectory']} calls (s) | "
          "sampler (s) | sampler / calls | compile calls / sampler (s) |")
    print("|---|---|---|---|---|---|")
    for r in out["rows"]:
        print(f"| {r['method']} | {r['variant']} | {r['calls_s']} | {r['sampler_s']} | {r['sampler_over_calls']} | "
              f"{r['compile_calls_s']} / {r['compile_sampler_s']} |")
    print(f"\nload before/after: {out['load_before']} / {out['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
