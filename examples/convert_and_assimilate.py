"""Example (a): convert a cBottle checkpoint and assimilate ERA5-style point observations.

The command-line workflow a user runs, step by step (each step is printed as the shell
command it is):

1. ``jaxguide convert CKPT --out MODEL``: PyTorch checkpoint -> JAX parameters;
2. point observations of ERA5 temperature at 850/500/300 hPa at station-like random
   locations, with 1 K noise, split into assimilated and held-out sets
   (``jaxguide.observations.era5.era5_to_observations``);
3. ``jaxguide assimilate --method mmps``: the posterior ensemble, with the SST of the
   AMIP file as the model's condition;
4. ``jaxguide evaluate``: RMSE / CRPS / spread-skill at assimilated and held-out
   observations, plus maps.

Real data: pass ``--checkpoint`` (the released cBottle checkpoint), ``--era5`` (a CDS
download of ``temperature`` on pressure levels 850/500/300) and ``--sst`` (the
input4MIPs AMIP ``tosbcs`` file). Without them the example uses the test fixture's
small random-weight checkpoint and writes SYNTHETIC ERA5-layout and AMIP-layout files
(smooth zonal fields), so it runs anywhere in a minute or two; with random weights the
analysis numbers are meaningless, only the workflow is shown.

    python examples/convert_and_assimilate.py --workdir /tmp/jaxguide_example
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.observations.era5 import era5_to_observations, read_era5_temperature
from jaxguide.observations.table import write_observations

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CHECKPOINT = REPO.parent / "shared" / "fixtures" / "tiny.checkpoint"
LEVELS = (850, 500, 300)


def synthetic_era5(path: Path, time: str) -> Path:
    """An ERA5 file in the CDS layout (valid_time, pressure_level, latitude desc, longitude),
    1-degree grid, a smooth temperature field (K) with a zonal profile and planetary waves."""
    lat = np.arange(90.0, -90.5, -1.0)
    lon = np.arange(0.0, 360.0, 1.0)
    la, lo = np.meshgrid(np.radians(lat), np.radians(lon), indexing="ij")
    base = {850: 255.0, 500: 235.0, 300: 212.0}
    t = np.stack([base[lv] + 45.0 * np.cos(la) ** 2 + 4.0 * np.sin(3 * lo) * np.cos(la) ** 2 for lv in LEVELS])
    ds = xr.Dataset(
        {"t": (("valid_time", "pressure_level", "latitude", "longitude"), t[None].astype(np.float32),
               {"units": "K", "standard_name": "air_temperature"})},
        coords={
            "valid_time": [np.datetime64(pd.Timestamp(time), "ns")],
            "pressure_level": ("pressure_level", np.asarray(LEVELS, np.float64), {"units": "hPa"}),
            "latitude": lat,
            "longitude": lon,
        },
    )
    ds.to_netcdf(path)
    return path


def synthetic_sst(path: Path, time: str) -> Path:
    """An AMIP-style monthly ``tosbcs`` file (deg C, 2-degree grid) around ``time``."""
    import cftime

    t = pd.Timestamp(time)
    months = [(t - pd.DateOffset(months=1)).replace(day=15), t.replace(day=15), (t + pd.DateOffset(months=1)).replace(day=15)]
    lat = np.arange(-89.0, 90.0, 2.0)
    lon = np.arange(0.0, 360.0, 2.0)
    la = np.radians(lat)[:, None] + 0.0 * lon[None, :]
    data = np.stack([28.0 - 30.0 * np.sin(la) ** 2 + 0.3 * i for i in range(3)]).astype(np.float32)
    units = "days since 1870-01-01"
    tnum = cftime.date2num([cftime.datetime(m.year, m.month, 15) for m in months], units, calendar="standard")
    xr.Dataset(
        {"tosbcs": (("time", "lat", "lon"), data, {"units": "degC"})},
        coords={"time": ("time", tnum, {"units": units, "calendar": "standard"}), "lat": lat, "lon": lon},
    ).to_netcdf(path)
    return path


def jaxguide(*args: str) -> None:
    """Run a jaxguide command as a user would (same Python environment)."""
    cmd = ["jaxguide", *args]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "jaxguide.cli", *args], check=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("jaxguide_example"))
    ap.add_argument("--checkpoint", type=Path, nargs="+", default=[FIXTURE_CHECKPOINT],
                    help="cBottle checkpoint(s); several = experts, with --sigma-thresholds")
    ap.add_argument("--sigma-thresholds", default=None, help="mixture thresholds, e.g. 100,10")
    ap.add_argument("--era5", type=Path, default=None,
                    help="ERA5 pressure-level temperature: NetCDF (CDS or cfgrib) or GRIB (jaxguide[grib])")
    ap.add_argument("--member", type=int, default=None, help="member number of an ensemble ERA5 file")
    ap.add_argument("--sst", type=Path, default=None, help="AMIP tosbcs NetCDF")
    ap.add_argument("--time", default="2020-01-20T00:00")
    ap.add_argument("--stations", type=int, default=60, help="observation locations (3 levels each)")
    ap.add_argument("--held-out", type=float, default=0.2, help="share of locations held out")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--cg-iters", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    convert_args = [*map(str, args.checkpoint), "--out", str(model), "--overwrite"]
    if args.sigma_thresholds:
        convert_args += ["--sigma-thresholds", args.sigma_thresholds]
    jaxguide("convert", *convert_args)

    era5_path = args.era5 or synthetic_era5(work / "era5_synthetic.nc", args.time)
    sst_path = args.sst or synthetic_sst(work / "tosbcs_synthetic.nc", args.time)

    # station-like observations of T850/T500/T300 with 1 K error, some held out
    rng = np.random.default_rng(args.seed)
    era5 = read_era5_temperature(era5_path, member=args.member)
    table = era5_to_observations(era5, LEVELS, strategy="random", count=args.stations, rng=rng, sigma=1.0,
                                 times=[args.time], noise=True)
    locations = table[["lat", "lon"]].drop_duplicates()
    held = locations.sample(frac=args.held_out, random_state=args.seed)
    is_held = table.set_index(["lat", "lon"]).index.isin(held.set_index(["lat", "lon"]).index)
    obs_path = write_observations(table[~is_held].reset_index(drop=True), work / "obs.csv")
    held_path = write_observations(table[is_held].reset_index(drop=True), work / "held_out.csv")

    analysis = work / "analysis.nc"
    jaxguide("assimilate", "--model", str(model), "--obs", str(obs_path), "--time", args.time, "--sst", str(sst_path),
             "--method", "mmps", "--members", str(args.members), "--steps", str(args.steps),
             "--cg-iters", str(args.cg_iters), "--seed", str(args.seed), "--out", str(analysis), "--overwrite",
             "--json", str(work / "assimilation.json"))
    jaxguide("evaluate", str(analysis), "--obs", str(obs_path), "--held-out", str(held_path),
             "--json", str(work / "metrics.json"), "--plots", str(work / "plots"))
    return {
        "analysis": analysis,
        "assimilation": json.loads((work / "assimilation.json").read_text()),
        "metrics": json.loads((work / "metrics.json").read_text())["metrics"],
        "n_assimilated": int((~is_held).sum()),
        "n_held_out": int(is_held.sum()),
    }


if __name__ == "__main__":
    main()
