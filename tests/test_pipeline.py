"""``jaxguide convert`` + ``assimilate`` + ``evaluate`` end to end on the fixture checkpoint,
and the commands' answers to bad input.

The end-to-end run uses the replacement method with nearest-pixel observations: its last
sampler step returns ``D + A^T (y - A D)``, so the written analysis must hold the
observed values exactly at the observed pixels. That checks, independently of the
(random) network weights, the whole chain of units, normalisation, pixel orders
(net <-> nest), the operator and the output file. The guided-network path (MMPS) runs in
``examples/convert_and_assimilate.py`` (tests/test_examples.py).
"""

from __future__ import annotations

import json
import os

import cftime
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from conftest import one_line_error

from jaxguide.grid import healpix

from jaxguide import io

from jaxguide.assimilation import dataset as schema
from jaxguide.cli import app

TIME = "2020-01-20T00:00"
N_OBS = 12


def write_sst(path, months=((2020, 1), (2020, 2))):
    """A smooth synthetic AMIP-style ``tosbcs`` file (deg C, monthly, 2-degree grid)."""
    lat = np.arange(-89.0, 90.0, 2.0)
    lon = np.arange(0.0, 360.0, 2.0)
    la = np.radians(lat)[:, None] + 0 * lon[None, :]
    data = np.stack([28.0 - 30.0 * np.sin(la) ** 2 + 0.5 * i for i, _ in enumerate(months)]).astype(np.float32)
    units = "days since 1870-01-01"
    tnum = cftime.date2num([cftime.datetime(y, m, 15) for y, m in months], units, calendar="standard")
    ds = xr.Dataset(
        {"tosbcs": (("time", "lat", "lon"), data, {"units": "degC"})},
        coords={"time": ("time", tnum, {"units": units, "calendar": "standard"}), "lat": lat, "lon": lon},
    )
    ds.to_netcdf(path)
    return path


@pytest.fixture(scope="module")
def case(fixtures_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    runner = CliRunner()
    res = runner.invoke(app, ["convert", str(fixtures_dir / "tiny.checkpoint"), "--out", str(tmp / "model")])
    assert res.exit_code == 0, res.output
    sst = write_sst(tmp / "tosbcs.nc")
    lon, lat = healpix.lonlat(64, "nest")
    rng = np.random.default_rng(3)
    pix = rng.choice(lon.size, N_OBS, replace=False)
    variables = np.array(["T850", "T500", "tas"])[np.arange(N_OBS) % 3]
    obs = pd.DataFrame(
        {"time": TIME, "lat": lat[pix], "lon": lon[pix], "variable": variables,
         "value": 260.0 + rng.normal(0.0, 8.0, N_OBS), "sigma": 0.5}
    )
    obs.to_csv(tmp / "obs.csv", index=False)
    return dict(tmp=tmp, model=tmp / "model", sst=sst, obs=tmp / "obs.csv", table=obs, pix=pix)


def _assimilate_args(case, out_path, *extra, **replace):
    """Command line for ``assimilate``; ``replace`` overrides options (None drops one)."""
    opts = {"model": case["model"], "obs": case["obs"], "time": TIME, "sst": case["sst"], "out": out_path} | replace
    args = ["assimilate"]
    for name, value in opts.items():
        if value is not None:
            args += [f"--{name}", str(value)]
    return args + list(extra)


@pytest.mark.slow  # > 20 s on 2 cores: in the `-m slow` set that CI also runs (README, Tests)
def test_replacement_end_to_end(case):
    tmp, runner = case["tmp"], CliRunner()
    out = tmp / "analysis.nc"
    args = _assimilate_args(case, out, "--method", "replacement", "--interpolation", "nearest",
                            "--members", "2", "--steps", "2", "--prior-members", "1", "--json", str(tmp / "s.json"),
                            "--no-cache")  # the progress bar then counts denoiser calls (checked below)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "analysis RMSE" in res.stdout
    # what it is doing, in order, from the first second: loading, validating, compiling, sampling, writing
    err = " ".join(res.stderr.split())
    # (both programs compile at once: the two "compiling" lines come first)
    marks = ["reading", f"validated {N_OBS} observations", "analysis: compiling the sampler for 2 members",
             "prior: compiling the sampler for 1 members", "analysis: compiled in", "prior: compiled in", "writing"]
    at = [err.find(m) for m in marks]
    assert all(i >= 0 for i in at) and at == sorted(at), (at, err)
    assert "compilation cache off" in err  # --no-cache: the bar counts denoiser calls
    assert "analysis: done" in err and "3/3" in err  # 2 steps = 3 denoiser calls
    assert "time: total" in res.stdout and "compile" in res.stdout

    ds = io.read_analysis(out)
    assert schema.check_cf(ds) == []
    assert ds.attrs["method"] == "replacement" and ds.attrs["n_obs"] == N_OBS and ds.attrs["steps"] == 2
    assert ds.attrs["observation_operator"] == "nearest"  # what evaluate samples with
    meta = json.loads((case["model"] / "jaxguide.json").read_text())
    assert ds.attrs["model_sha256"] == meta["sources"][0]["sha256"]
    assert ds.sizes["member"] == 2 and "T850_prior_mean" in ds
    # the observed values sit at the observed pixels (physical units, NEST order)
    table = case["table"]
    for var in ("T850", "T500", "tas"):
        rows = table["variable"] == var
        got = ds[var].isel(time=0).values[:, case["pix"][rows.to_numpy()]]
        np.testing.assert_allclose(got, np.broadcast_to(table.loc[rows, "value"].to_numpy(), got.shape), atol=2e-3)
    # unobserved pixels are not pinned: the members differ there
    assert float(np.abs(ds["T850"].values[0] - ds["T850"].values[1]).max()) > 1.0

    summary = json.loads((tmp / "s.json").read_text())
    assert summary["n_obs"] == N_OBS and summary["prior_members"] == 1
    assert summary["seconds_compile"] > 0 and summary["seconds_analysis"] > 0 and summary["seconds_prior"] > 0
    assert summary["seconds_compile"] + summary["seconds_analysis"] + summary["seconds_prior"] \
        <= summary["seconds_total"]
    assert all(v["rmse"] < 2e-3 for v in summary["analysis"].values())
    assert all(v["rmse"] > 1.0 for v in summary["prior"].values())

    res = runner.invoke(app, ["evaluate", str(out), "--obs", str(case["obs"]), "--json", str(tmp / "m.json")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp / "m.json").read_text())["metrics"]["assimilated"]
    assert set(m) == {"T850", "T500", "tas"} and all(v["rmse"] < 2e-3 for v in m.values())


def test_assimilate_bad_inputs(case, tmp_path):
    runner = CliRunner()
    out = tmp_path / "a.nc"

    def error(*extra, **replace) -> str:
        return one_line_error(runner.invoke(app, _assimilate_args(case, out, *extra, **replace)))

    assert "nomodel" in error(model=tmp_path / "nomodel")
    assert "kalman" in error("--method", "kalman")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "empty" in error(obs=empty)
    assert "time_outside_data: 12" in error(time="2020-06-01T00:00")  # the observations are for January
    late = tmp_path / "late.csv"
    case["table"].assign(time="2020-03-20T00:00").to_csv(late, index=False)
    assert "outside the SST data" in error(obs=late, time="2020-03-20T00:00")
    assert "--sst" in error(sst=None)
    unknown = tmp_path / "unknown.csv"
    case["table"].assign(variable="Z999").to_csv(unknown, index=False)
    assert "Z999" in error(obs=unknown)
    assert "does not exist" in error(out=tmp_path / "nodir" / "a.nc")
    if os.path.isdir("/sys"):
        assert "/sys" in error(out="/sys/a.nc")
    out.write_text("existing")
    assert "exists" in error()
    assert "members" in error("--members", "0", out=tmp_path / "b.nc")
    assert "sigma-y" in error("--sigma-y", "x", out=tmp_path / "b.nc")
    # typer's own parsing errors: one line naming the option and the expected form
    line = error("--members", "two", out=tmp_path / "b.nc")
    assert "--members" in line and "int" in line
    # file-format errors name the option and the file
    no_var = tmp_path / "sst_no_tosbcs.nc"
    xr.open_dataset(case["sst"]).rename(tosbcs="sst").to_netcdf(no_var)
    line = error(sst=no_var, out=tmp_path / "b.nc")
    assert line.startswith("error: --sst") and "sst_no_tosbcs.nc" in line and "tosbcs" in line
    assert "missing key" not in line
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    line = error(obs=binary, out=tmp_path / "b.nc")
    assert line.startswith("error: --obs") and "binary.csv" in line and "CSV" in line
    assert not (tmp_path / "b.nc").exists()


def test_convert_bad_inputs(case, fixtures_dir, tmp_path):
    runner = CliRunner()
    not_zip = tmp_path / "bad.checkpoint"
    not_zip.write_text("not a zip")
    assert "zip" in one_line_error(runner.invoke(app, ["convert", str(not_zip), "--out", str(tmp_path / "m")]))
    line = one_line_error(runner.invoke(app, ["convert", str(fixtures_dir / "tiny.checkpoint"), "--out", str(case["model"])]))
    assert "exists" in line
    assert "missing.checkpoint" in one_line_error(runner.invoke(app, ["convert", str(tmp_path / "missing.checkpoint"), "--out", str(tmp_path / "m")]))
    line = one_line_error(runner.invoke(app, ["convert", str(fixtures_dir / "tiny.checkpoint"), "--out", str(tmp_path / "m"),
                                               "--sigma-thresholds", "ten"]))
    assert "sigma-thresholds" in line


def test_assimilate_names_the_right_thing(case, fixtures_dir, tmp_path):
    """Unit mistakes, non-ISO times and file mix-ups end in one line naming the cause,
    before anything compiles."""
    runner = CliRunner()
    out = tmp_path / "a.nc"

    def error(*extra, **replace) -> str:
        return one_line_error(runner.invoke(app, _assimilate_args(case, out, *extra, **replace)))

    line = error(model=fixtures_dir / "tiny.checkpoint")
    assert "cBottle checkpoint" in line and "jaxguide convert" in line
    assert "is a directory" in error(obs=tmp_path)
    assert "--sst" in error(sst=tmp_path) and "is a directory" in error(sst=tmp_path)
    not_nc = tmp_path / "sst.csv"
    not_nc.write_text("a,b\n1,2\n")
    line = error(sst=not_nc)
    assert "--sst" in line and "sst.csv" in line and "not a NetCDF file" in line
    no_var = tmp_path / "tos.nc"
    xr.Dataset({"tos": (("time", "lat", "lon"), np.zeros((1, 2, 2)))}).to_netcdf(no_var)
    line = error(sst=no_var)
    assert "--sst" in line and "tos.nc" in line and "'tosbcs'" in line
    line = error("--sigma-y", "T850:1")
    assert "'T850=1'" in line
    line = error(time="05/01/2020")
    assert "--time '05/01/2020'" in line and "ISO 8601" in line
    us_dates = tmp_path / "us.csv"
    case["table"].assign(time="01/20/2020 00:00").to_csv(us_dates, index=False)
    assert "not ISO 8601 (first: '01/20/2020 00:00')" in error(obs=us_dates)
    celsius = tmp_path / "celsius.csv"
    case["table"].assign(value=case["table"]["value"] - 273.15).to_csv(celsius, index=False)
    line = error(obs=celsius)
    assert "degrees Celsius" in line and "T850: 4 of 4" in line and "--allow-implausible" in line
    (tmp_path / "dir.nc").mkdir()
    assert "is a directory" in error("--overwrite", out=tmp_path / "dir.nc")
    line = error(time="2020-01-22T00:00")
    assert "2020-01-21T21:00 to 2020-01-22T03:00" in line and "--window-hours" in line
    assert not out.exists()


def test_plausibility_check_can_be_overridden(case):
    from jaxguide.model.checkpoint import load_model
    from jaxguide.observations.errors import ImplausibleObservationsError
    from jaxguide.observations.prepare import prepare
    from jaxguide.observations.table import read_observations

    model = load_model(case["model"])
    info = model.batch_info
    table = read_observations(case["obs"]).assign(value=lambda t: t["value"] - 273.15)
    with pytest.raises(ImplausibleObservationsError):
        prepare(table, model.channels, info.center, info.scales, time=TIME)
    prepared = prepare(table, model.channels, info.center, info.scales, time=TIME, check_plausibility=False)
    assert prepared.n_obs == N_OBS
