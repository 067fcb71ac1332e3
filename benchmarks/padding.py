"""HEALPix face padding: the former full gather against interior reshape + border gather.

``jaxguide.grid.healpix.pad`` used to be one ``jnp.take`` over every padded position
(12 (n+2)^2 rows) with the averaged corner positions set after; reverse mode
differentiated that gather into a scatter-add into a zero-initialised (12 n^2, C)
buffer (``old``), or, inside rematerialised blocks, into the gather-transposed VJP
(``old_gt``: a (12 n^2, K) gather of the cotangent and a weighted sum). Now the
interior of every padded face is a reshape of the input, only the border strips are
gathered and the pieces concatenated; the VJP is the interior's slice plus small
gathers for the pixels along the face edges (``new``). Both former versions are kept
here, as they were, for the comparison.

Measured at nside 64 (the network's finest level), batch 1, float32, padding 1, for
``--channels`` (default 8 = the fixture's width, 128 and 256 = the released model's):

* ``pad``: the padding alone, forward; ``pad + VJP``: forward and the VJP of a
  random cotangent;
* ``block``: padding + ``layers.conv3x3_valid`` (C -> C), forward; ``block + VJP``:
  forward and the VJP with respect to the input;
* ``scan2 ...``: the same inside a ``lax.scan`` of 2 iterations (the sampler and the
  CG loops run the network in a loop body; XLA:CPU compiles loop bodies differently).
  The scan's carry is the input of the next iteration (the forward's output, or the VJP
  of the output itself), so no iteration can be hoisted.

Every case is one ``jax.jit`` function compiled ahead of time (``compile s`` = lower +
compile) and then called ``--repeats`` (block cases) or ``--pad-repeats`` (padding
alone) times per implementation, the implementations interleaved round by round;
``ms`` = the minimum; ``temp MB`` = XLA's temp buffers of the compiled program
(``memory_analysis``). The machine is shared: compare the
columns of one run, not runs.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/padding.py --json benchmarks/padding.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.grid import healpix
from jaxguide.model.layers import conv3x3_valid

NSIDE = 64


# ---- the former implementations, verbatim apart from their names --------------------


def old_pad(x, padding):
    """The former ``healpix.pad``: one gather over all padded positions."""
    npix = x.shape[-2]
    n = healpix.nside_of_npix(npix)
    if padding == 0:
        return x.reshape(*x.shape[:-2], 12, n, n, x.shape[-1])
    primary, avg_pos, avg_src = healpix.pad_gather(n, padding)
    out = jnp.take(x, primary, axis=-2)
    if avg_pos.size:
        mean = (jnp.take(x, avg_src[0], axis=-2) + jnp.take(x, avg_src[1], axis=-2)) * 0.5
        out = out.at[..., avg_pos, :].set(mean)
    m = n + 2 * padding
    return out.reshape(*x.shape[:-2], 12, m, m, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def old_pad_gather_transposed(x, padding):
    """The former ``healpix.pad_gather_transposed`` (remat path): VJP a full-size gather."""
    return old_pad(x, padding)


def _old_gt_fwd(x, padding):
    return old_pad(x, padding), None


def _old_gt_bwd(padding, _, ct):
    *lead, faces, m, _m, c = ct.shape
    n = m - 2 * padding
    index, weight = healpix.pad_transpose_table(n, padding)
    flat = ct.reshape(*lead, faces * m * m, c)
    parts = jnp.take(flat, jnp.asarray(index), axis=-2, mode="fill", fill_value=0)
    return (jnp.einsum("...pkc,pk->...pc", parts, jnp.asarray(weight, ct.dtype)),)


old_pad_gather_transposed.defvjp(_old_gt_fwd, _old_gt_bwd)

IMPLS = {"old": old_pad, "old_gt": old_pad_gather_transposed, "new": healpix.pad}


# ---- the measured functions ----------------------------------------------------------


def _block(pad, x, w):
    """pad + 3x3 conv: (1, 12 n^2, C) -> (1, 12 n^2, Cout)."""
    n = healpix.nside_of_npix(x.shape[-2])
    y = conv3x3_valid(pad(x, 1).reshape(-1, n + 2, n + 2, x.shape[-1]), w)
    return y.reshape(x.shape[0], 12 * n * n, -1)


def _vjp_of_self(f, x):
    """f(x) and the VJP of f at x applied to f(x) (the gradient of |f(x)|^2 / 2)."""
    y, vjp = jax.vjp(f, x)
    return y, vjp(y)[0]


def cases(pad):
    """name -> (function of (x, ct, w), needs_vjp) for one padding implementation."""

    def pad_fwd(x, ct, w):
        return pad(x, 1)

    def pad_vjp(x, ct, w):
        y, vjp = jax.vjp(lambda v: pad(v, 1), x)
        return y, vjp(ct)[0]

    def block_fwd(x, ct, w):
        return _block(pad, x, w)

    def block_vjp(x, ct, w):
        return _vjp_of_self(lambda v: _block(pad, v, w), x)

    def scan_pad_fwd(x, ct, w):
        return jax.lax.scan(lambda c, _: (c * 0.5, pad(c, 1)), x, None, length=2)

    def scan_pad_vjp(x, ct, w):
        return jax.lax.scan(lambda c, _: (_vjp_of_self(lambda v: pad(v, 1), c)[1] * 0.1, None), x, None, length=2)[0]

    def scan_block_fwd(x, ct, w):
        return jax.lax.scan(lambda c, _: (_block(pad, c, w), None), x, None, length=2)[0]

    def scan_block_vjp(x, ct, w):
        return jax.lax.scan(lambda c, _: (_vjp_of_self(lambda v: _block(pad, v, w), c)[1], None), x, None, length=2)[0]

    return {
        "pad": (pad_fwd, False),
        "pad + VJP": (pad_vjp, True),
        "block": (block_fwd, False),
        "block + VJP": (block_vjp, True),
        "scan2 pad": (scan_pad_fwd, False),
        "scan2 pad + VJP": (scan_pad_vjp, True),
        "scan2 block": (scan_block_fwd, False),
        "scan2 block + VJP": (scan_block_vjp, True),
    }


def _inputs(c: int):
    rng = np.random.default_rng(c)
    x = jnp.asarray(rng.standard_normal((1, 12 * NSIDE**2, c)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((1, 12, NSIDE + 2, NSIDE + 2, c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c), jnp.float32)
    return x, ct, w


def _compile(f, args):
    t = time.perf_counter()
    compiled = jax.jit(f).lower(*args).compile()
    return compiled, time.perf_counter() - t


def _temp_mb(compiled) -> float:
    """XLA's temp buffer bytes of a compiled program (MB), NaN where not reported."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 1e6
    except (AttributeError, TypeError):
        return float("nan")


def _check(results: dict, case: str):
    """The implementations agree: forward values bit for bit, VJPs to round-off."""
    ref = jax.tree_util.tree_leaves(results["old"])
    for name, out in results.items():
        for a, b in zip(jax.tree_util.tree_leaves(out), ref):
            a, b = np.asarray(a), np.asarray(b)
            if case in ("pad", "scan2 pad"):
                np.testing.assert_array_equal(a, b, err_msg=f"{case} {name}")
            else:
                scale = float(np.max(np.abs(b))) or 1.0
                np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=1e-5, err_msg=f"{case} {name}")


def measure(channels: list[int], repeats: int, pad_repeats: int, only: list[str] | None) -> list[dict]:
    rows = []
    for c in channels:
        args = _inputs(c)
        per_impl = {name: cases(pad) for name, pad in IMPLS.items()}
        for case in per_impl["new"]:
            if only and case not in only:
                continue
            impls = [n for n in IMPLS if per_impl[n][case][1] or n != "old_gt"]  # old_gt = old forward
            compiled, compile_s, outs, times = {}, {}, {}, {n: [] for n in impls}
            for name in impls:
                compiled[name], compile_s[name] = _compile(per_impl[name][case][0], args)
                outs[name] = jax.block_until_ready(compiled[name](*args))
            _check(outs, case)
            del outs
            for _ in range(repeats if "block" in case else pad_repeats):
                for name in impls:
                    t = time.perf_counter()
                    jax.block_until_ready(compiled[name](*args))
                    times[name].append(time.perf_counter() - t)
            for name in impls:
                rows.append(dict(channels=c, case=case, impl=name, ms=1e3 * min(times[name]),
                                 median_ms=1e3 * float(np.median(times[name])), compile_s=compile_s[name],
                                 temp_mb=_temp_mb(compiled[name])))
            print(f"C={c:4d} {case:18s} " + "  ".join(f"{n} {1e3 * min(times[n]):9.3f} ms" for n in impls), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one row per (channels, case), the implementations side by side."""
    by = {(r["channels"], r["case"], r["impl"]): r for r in rows}
    keys = list(dict.fromkeys((r["channels"], r["case"]) for r in rows))  # in measured order
    out = ["| C | measured | old ms | old_gt ms | new ms | old / new | best old / new | compile s old / new "
           "| temp MB old / old_gt / new |",
           "|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for c, case in keys:
        old, new, gt = by[(c, case, "old")], by[(c, case, "new")], by.get((c, case, "old_gt"))
        best = min(old["ms"], gt["ms"]) if gt else old["ms"]
        gt_ms, gt_mb = (f"{gt['ms']:.3f}", f"{gt['temp_mb']:.1f}") if gt else ("-", "-")
        out.append(f"| {c} | {case} | {old['ms']:.3f} | {gt_ms} | {new['ms']:.3f} | {old['ms'] / new['ms']:.2f} "
                   f"| {best / new['ms']:.2f} | {old['compile_s']:.2f} / {new['compile_s']:.2f} "
                   f"| {old['temp_mb']:.1f} / {gt_mb} / {new['temp_mb']:.1f} |")
    return "\n".join(out)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--channels", default="8,128,256", help="comma list of channel counts")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per implementation of the block cases")
    ap.add_argument("--pad-repeats", type=int, default=10, help="timed calls per implementation of the padding alone")
    ap.add_argument("--cases", default="", help="comma list of case names (default: all)")
    ap.add_argument("--json", default="", help="write the rows and the machine's state here")
    args = ap.parse_args(argv)
    channels = [int(c) for c in args.channels.split(",")]
    only = [c.strip() for c in args.cases.split(",") if c.strip()] or None
    meta = dict(jax=jax.__version__, device=str(jax.devices()[0]), cpus=os.cpu_count(),
                machine=platform.processor() or platform.machine(), nside=NSIDE, repeats=args.repeats,
                pad_repeats=args.pad_repeats, uptime_start=_uptime())
    print(f"jax {meta['jax']} on {meta['device']}, {meta['cpus']} CPUs; {meta['uptime_start']}", flush=True)
    t0 = time.perf_counter()
    rows = measure(channels, args.repeats, args.pad_repeats, only)
    meta["uptime_end"] = _uptime()
    meta["wall_s"] = time.perf_counter() - t0
    print(f"\n{meta['uptime_end']}; {meta['wall_s']:.0f} s\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
