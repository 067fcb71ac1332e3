"""Compiles and seconds per ``pipeline.assimilate`` call over a multi-time assimilation.

Runs ``--times`` analyses (6-hourly from 2020-01-20T00) with the fixture tiny model
(``../shared/fixtures/tiny.checkpoint``, converted to a temporary directory), each with
its own observations (a different count every time: 10, 13, 16, ... rows) and prints,
per call, the number of XLA backend compiles (``jax.monitoring`` event
``/jax/core/compile/backend_compile_duration``) and the wall time. With one
``pipeline.Session`` for all calls only the first call should compile its ensemble
programs; the later calls should compile nothing.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/compile_counts.py --times 5

Also runs against an older jaxguide without ``Session`` (then every call uses plain
``pipeline.assimilate``), which is how the "before" figures in benchmarks/README.md
were measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cftime
import jax
import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.grid import healpix

from jaxguide import load_model

from jaxguide.assimilation import pipeline

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"


def convert_tiny(out: Path) -> Path:
    try:
        from jaxguide.model.convert import convert_checkpoints
    except ImportError:  # older layout: top-level package
        from convert import convert_checkpoints
    return convert_checkpoints([FIXTURES / "tiny.checkpoint"], out)


def write_sst(path: Path) -> Path:
    """Smooth synthetic AMIP-style ``tosbcs`` (deg C, monthly, 2-degree grid), Jan-Feb 2020."""
    lat = np.arange(-89.0, 90.0, 2.0)
    lon = np.arange(0.0, 360.0, 2.0)
    la = np.radians(lat)[:, None] + 0 * lon[None, :]
    data = np.stack([28.0 - 30.0 * np.sin(la) ** 2 + 0.5 * i for i in range(2)]).astype(np.float32)
    units = "days since 1870-01-01"
    tnum = cftime.date2num([cftime.datetime(2020, m, 15) for m in (1, 2)], units, calendar="standard")
    xr.Dataset({"tosbcs": (("time", "lat", "lon"), data, {"units": "degC"})},
               coords={"time": ("time", tnum, {"units": units, "calendar": "standard"}),
                       "lat": lat, "lon": lon}).to_netcdf(path)
    return path


def observations(t: pd.Timestamp, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    lon, lat = healpix.lonlat(64, "nest")
    pix = rng.choice(lon.size, n, replace=False)
    return pd.DataFrame({"time": t, "lat": lat[pix], "lon": lon[pix],
                         "variable": np.array(["T850", "T500", "tas"])[np.arange(n) % 3],
                         "value": 260.0 + rng.normal(0.0, 8.0, n), "sigma": 0.5})


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--times", type=int, default=5)
    p.add_argument("--method", default="mmps")
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    compiles: list[float] = []

    def listener(event, duration, **_):
        if event == BACKEND_COMPILE:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = load_model(convert_tiny(d / "model"))
        sst = write_sst(d / "tosbcs.nc")
        settings = pipeline.AssimilationSettings(method=args.method, members=args.members, steps=args.steps,
                                                 prior_members=args.members, cg_iters=1)
        session = pipeline.Session(model) if hasattr(pipeline, "Session") else None
        for i in range(args.times):
            t = pd.Timestamp("2020-01-20T00:00") + pd.Timedelta(hours=6 * i)
            table = observations(t, 10 + 3 * i, seed=i)
            n0, t0 = len(compiles), time.perf_counter()
            kw = {"session": session} if session is not None else {}
            pipeline.assimilate(model, table, d / f"a{i}.nc", time=t, settings=settings, sst=sst, **kw)
            rows.append({"call": i, "n_obs": len(table), "compiles": len(compiles) - n0,
                         "compile_s": float(sum(compiles[n0:])), "seconds": time.perf_counter() - t0})
    jax.monitoring.unregister_event_duration_listener(listener)
    print(f"jaxguide pipeline.assimilate, tiny model, {args.method}, {args.members} members, {args.steps} steps, "
          f"session={'yes' if session is not None else 'no (old API)'}")
    print("| call | n_obs | backend compiles | compile s | wall s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['call']} | {r['n_obs']} | {r['compiles']} | {r['compile_s']:.2f} | {r['seconds']:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
