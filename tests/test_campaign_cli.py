"""``jaxguide campaign`` on the cBottle fixture checkpoint (replacement guidance, nearest
pixel: the stored analysis must hold each time's observed values at the observed pixels)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import one_line_error, require_module
from jaxguide.grid import healpix
from jaxguide.assimilation import dataset as schema
from jaxguide.campaign.store import ANALYSED, SKIPPED, read_campaign
from jaxguide.cli import app
from test_pipeline import write_sst

require_module("zarr")
TIMES = ["2020-01-20T00:00", "2020-01-20T06:00", "2020-01-20T12:00"]
N_OBS = 6


@pytest.fixture(scope="module")
def case(fixtures_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("campaign_cli")
    res = CliRunner().invoke(app, ["convert", str(fixtures_dir / "tiny.checkpoint"), "--out", str(tmp / "model")])
    assert res.exit_code == 0, res.output
    lon, lat = healpix.lonlat(64, "nest")
    rng = np.random.default_rng(5)
    rows, pix = [], {}
    for t in TIMES[:2]:  # the third time has no observations: skipped
        p = rng.choice(lon.size, N_OBS, replace=False)
        pix[t] = p
        rows.append(pd.DataFrame({"time": t, "lat": lat[p], "lon": lon[p],
                                  "variable": np.array(["T850", "tas"])[np.arange(N_OBS) % 2],
                                  "value": 265.0 + rng.normal(0.0, 8.0, N_OBS), "sigma": 0.5}))
    table = pd.concat(rows, ignore_index=True)
    table.to_parquet(tmp / "obs.parquet")
    return dict(tmp=tmp, model=tmp / "model", sst=write_sst(tmp / "sst.nc"), obs=tmp / "obs.parquet", table=table, pix=pix)


def args(case, out, *extra):
    return ["campaign", "--model", str(case["model"]), "--obs", str(case["obs"]), "--sst", str(case["sst"]),
            "--out", str(out), "--times", f"{TIMES[0]}/{TIMES[-1]}/PT6H", "--method", "replacement",
            "--interpolation", "nearest", "--members", "2", "--steps", "2", "--prior-members", "0", *extra]


@pytest.mark.slow  # > 20 s on 2 cores: in the `-m slow` set that CI also runs (README, Tests)
def test_campaign_cli_end_to_end(case):
    runner, out = CliRunner(), case["tmp"] / "store.zarr"
    res = runner.invoke(app, args(case, out, "--json", str(case["tmp"] / "s.json")))
    assert res.exit_code == 0, res.output
    assert "3/3" in res.stdout and "ETA" in res.stdout
    assert "skipped 2020-01-20 12:00:00: no observations within +-3 h" in res.stdout
    assert "2 analysed, 1 skipped, 0 incomplete of 3 times" in res.stdout
    ds = read_campaign(out)
    assert schema.check_cf(ds) == []
    assert list(ds["completed"].values) == [ANALYSED, ANALYSED, SKIPPED]
    assert ds.sizes["member"] == 2 and ds["T850"].dims == ("member", "time", "pixel")
    meta = json.loads((case["model"] / "jaxguide.json").read_text())
    assert ds.attrs["model_sha256"] == meta["sources"][0]["sha256"]
    table = case["table"]
    for k, t in enumerate(TIMES[:2]):
        rows = table[table["time"] == t]
        for var in ("T850", "tas"):
            sel = (rows["variable"] == var).to_numpy()
            got = ds[var].isel(time=k).values[:, case["pix"][t][sel]]
            np.testing.assert_allclose(got, np.broadcast_to(rows.loc[sel, "value"].to_numpy(), got.shape), atol=2e-3)
    summary = json.loads((case["tmp"] / "s.json").read_text())
    assert [e["status"] for e in summary["this_process"]] == ["analysed", "analysed", "skipped"]

    # resume: nothing left to do; a different seed is refused, naming it
    res = runner.invoke(app, args(case, out, "--resume"))
    assert res.exit_code == 0, res.output
    assert "0 times" in res.stdout
    line = one_line_error(runner.invoke(app, args(case, out, "--resume", "--seed", "5")))
    assert "seed=0" in line and "seed=5" in line
    line = one_line_error(runner.invoke(app, args(case, out)))
    assert "--resume" in line
    # `jaxguide assimilate --times` is the same campaign: resuming the store through it finds it complete
    via_assimilate = ["assimilate", *args(case, out, "--resume")[1:]]
    res = runner.invoke(app, via_assimilate)
    assert res.exit_code == 0, res.output
    assert "0 times" in res.stdout and "2 analysed, 1 skipped, 0 incomplete of 3 times" in res.stdout
    line = one_line_error(runner.invoke(app, via_assimilate + ["--seed", "5"]))
    assert "seed=0" in line and "seed=5" in line


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--time", "2020-01-20T00:00", "--times", "2020-01-20T00/2020-01-20T06/PT6H"], "not both"),
        ([], "missing --time"),
        (["--time", "2020-01-20T00:00", "--resume"], "--resume continues a campaign"),
    ],
)
def test_assimilate_time_or_times(case, tmp_path, extra, match):
    base = ["assimilate", "--model", str(case["model"]), "--obs", str(case["obs"]), "--out", str(tmp_path / "s.zarr")]
    line = one_line_error(CliRunner().invoke(app, base + extra))
    assert match in line


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--times", "2020-01-02/2020-01-01/PT6H"], "empty"),
        (["--times", "2020-01-01/2020-01-02/PT6H", "--times", "2020-01-01T12/2020-01-03/PT6H"], "overlap"),
        (["--times", "01/02/2020"], "ISO 8601"),
        ([], "exactly one of --times"),
        (["--times", "2020-01-01T00", "--coordinator", "localhost:1"], "--num-processes"),
    ],
)
def test_campaign_cli_bad_input(case, tmp_path, extra, match):
    base = ["campaign", "--model", str(case["model"]), "--obs", str(case["obs"]), "--out", str(tmp_path / "s.zarr")]
    line = one_line_error(CliRunner().invoke(app, base + extra))
    assert match in line


def test_malformed_partition_is_named(case, tmp_path):
    d = tmp_path / "obs"
    (d / "time=2020-01-20T00:00:00").mkdir(parents=True)
    case["table"].to_parquet(d / "time=2020-01-20T00:00:00" / "part-0.parquet")
    (d / "time=2020-01-20T06:00:00").mkdir()
    (d / "time=2020-01-20T06:00:00" / "part-0.parquet").write_bytes(b"garbage")
    line = one_line_error(CliRunner().invoke(app, args(case, tmp_path / "s.zarr") + ["--obs", str(d)]))
    assert "time=2020-01-20T06:00:00/part-0.parquet" in line


@pytest.mark.parametrize("failed", [1, 0])
def test_aborted_campaign_is_one_line(case, tmp_path, monkeypatch, failed):
    """A multi-process abort (tests/test_campaign.py runs a real one): every process ends
    with exit status 1 and one line naming the failing process and time; the failing
    process also shows its error's traceback (not bad input: a bug or a system fault)."""
    from jaxguide.campaign import distributed, run

    said = "process 1 of 2 failed at analysis time 2020-01-20 06:00:00: RuntimeError: boom"

    def aborted(*args, **kwargs):
        try:
            raise RuntimeError("boom")
        except RuntimeError as e:
            raise distributed.CampaignAbortedError(f"{said}; the other processes stop too", 1) from e

    monkeypatch.setattr(run, "assimilate_campaign", aborted)
    monkeypatch.setattr(distributed, "initialize", lambda *a, **k: distributed.ProcessInfo(failed, 2))
    res = CliRunner().invoke(app, args(case, tmp_path / "s.zarr"))
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert lines[-1] == f"error: {said}; the other processes stop too"
    assert ("Traceback" in res.stderr and "RuntimeError: boom" in res.stderr) == (failed == 1)
