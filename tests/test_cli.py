from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import one_line_error

from jaxguide.grid import healpix

from jaxguide import io

from jaxguide.verification import metrics

from jaxguide.assimilation import dataset as schema
from jaxguide.cli import app

NSIDE = 8
NPIX = 12 * NSIDE**2
CHANNELS = ["tas", "pres_msl"]
CENTER = np.array([286.0, 101160.0])
SCALE = np.array([15.0, 1100.0])
PROV = {"method": "mmps", "sigma_y": None, "guidance_scale": 1.0, "steps": 6, "seed": 0, "model_sha256": "f" * 64, "n_obs": 40, "command": "test"}


@pytest.fixture()
def case(tmp_path):
    """Analysis ensemble whose members and truth are exchangeable (calibrated) draws."""
    rng = np.random.default_rng(0)
    m = 6
    truth_norm = rng.normal(size=(1, 2, 1, NPIX)).astype(np.float32)
    ens = (truth_norm * 0 + rng.normal(size=(m, 2, 1, NPIX))).astype(np.float32)
    ds = schema.analysis_to_dataset(ens, channels=CHANNELS, center=CENTER, scale=SCALE, times=["2022-03-01T00"], provenance=PROV, prior=ens + 0.1)
    path = io.write_dataset(ds, tmp_path / "analysis.nc")
    truth_phys = healpix.reorder(truth_norm[0, :, 0] * SCALE[:, None] + CENTER[:, None], "net", "nest")
    lon, lat = healpix.lonlat(NSIDE, "nest")

    def table(pixels, fname, stamp):
        rows = []
        for c, var in enumerate(CHANNELS):
            for p in pixels:
                rows.append({"time": stamp, "lat": lat[p], "lon": lon[p], "variable": var, "value": truth_phys[c, p], "sigma": 0.5})
        rows.append({"time": "2022-03-01T00:00", "lat": 0.0, "lon": 0.0, "variable": "unknown_var", "value": 1.0, "sigma": 1.0})
        pd.DataFrame(rows).to_csv(tmp_path / fname, index=False)
        return tmp_path / fname

    pix = rng.choice(NPIX, size=60, replace=False)
    obs = table(pix[:40], "obs.csv", "2022-03-01T00:00")
    held = table(pix[40:], "held.csv", "2022-03-01T00:00:00Z")
    tds = ds[["tas", "pres_msl"]].isel(member=0).copy(deep=True)
    tds["tas"].values[:] = truth_phys[0][None]
    tds["pres_msl"].values[:] = truth_phys[1][None]
    truth_path = tmp_path / "truth.nc"
    tds.to_netcdf(truth_path)
    return dict(path=path, obs=obs, held=held, truth=truth_path, ds=ds, truth_phys=truth_phys, pix=pix, tmp=tmp_path)


def test_evaluate_end_to_end(case):
    tmp = case["tmp"]
    runner = CliRunner()
    args = ["evaluate", str(case["path"]), "--obs", str(case["obs"]), "--held-out", str(case["held"]), "--truth", str(case["truth"])]
    args += ["--json", str(tmp / "m.json"), "--plots", str(tmp / "plots")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "RMSE" in res.stdout and "held_out" in res.stdout
    out = json.loads((tmp / "m.json").read_text())["metrics"]
    assert set(out) == {"assimilated", "held_out", "truth"}
    assert set(out["assimilated"]) == {"tas", "pres_msl"}
    # independent recomputation for the assimilated tas observations (exact pixel centres)
    ens = case["ds"]["tas"].values[:, 0][:, case["pix"][:40]]
    y = case["truth_phys"][0, case["pix"][:40]]
    assert out["assimilated"]["tas"]["rmse"] == pytest.approx(metrics.rmse(ens, y), rel=1e-6)
    # CRPS at noisy observations: members + N(0, sigma^2) drawn from the seed (default 0)
    noisy = metrics.perturb(ens, 0.5, np.random.default_rng(0))
    assert out["assimilated"]["tas"]["crps"] == pytest.approx(float(metrics.crps_ensemble(noisy, y).mean()), rel=1e-6)
    assert out["assimilated"]["tas"]["energy_score"] > 0 and "variogram_score" in out["assimilated"]["tas"]
    assert "energy score" in res.stdout
    assert out["held_out"]["pres_msl"]["n_obs"] == 20
    # calibrated by construction (in normalised units): spread-skill near 1 over the full field
    assert 0.8 < out["truth"]["tas"]["spread_skill"] < 1.2
    pngs = sorted(os.listdir(tmp / "plots"))
    assert "tas_maps.png" in pngs and "pres_msl_held_out_rank.png" in pngs and "tas_truth_rank.png" in pngs


def test_evaluate_bad_inputs(case, tmp_path):
    runner = CliRunner()
    path, obs = str(case["path"]), str(case["obs"])
    line = one_line_error(runner.invoke(app, ["evaluate", str(tmp_path / "nope.nc"), "--obs", obs]))
    assert "nope.nc" in line
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "empty" in one_line_error(runner.invoke(app, ["evaluate", path, "--obs", str(empty)]))
    header_only = tmp_path / "header.csv"
    header_only.write_text("time,lat,lon,variable,value,sigma\n")
    assert "no observations" in one_line_error(runner.invoke(app, ["evaluate", path, "--obs", str(header_only)]))
    bad_cols = tmp_path / "cols.csv"
    bad_cols.write_text("a,b\n1,2\n")
    assert "lacks columns" in one_line_error(runner.invoke(app, ["evaluate", path, "--obs", str(bad_cols)]))
    one_line_error(runner.invoke(app, ["evaluate", path, "--obs", obs, "--json", str(tmp_path / "missing_dir" / "m.json")]))
    if os.path.isdir("/sys"):
        line = one_line_error(runner.invoke(app, ["evaluate", path, "--obs", obs, "--json", "/sys/m.json"]))
        assert "/sys" in line
        line = one_line_error(runner.invoke(app, ["evaluate", path, "--obs", obs, "--plots", "/sys/plots"]))
        assert "/sys" in line
    not_analysis = tmp_path / "not.nc"
    not_analysis.write_text("garbage")
    one_line_error(runner.invoke(app, ["evaluate", str(not_analysis), "--obs", obs]))


def test_help_lists_commands():
    runner = CliRunner()
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("convert", "assimilate", "evaluate", "demo"):
        assert cmd in res.stdout


def test_compile_cache_location_and_switches(tmp_path, monkeypatch):
    import jax

    from jaxguide import cli

    before = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
    try:
        monkeypatch.delenv("JAXGUIDE_CACHE_DIR", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert cli.compile_cache_dir() == tmp_path / "xdg" / "jaxguide" / "xla"
        monkeypatch.setenv("JAXGUIDE_NO_CACHE", "1")
        assert cli.enable_compile_cache(True) is None and jax.config.jax_compilation_cache_dir == before["jax_compilation_cache_dir"]
        monkeypatch.setenv("JAXGUIDE_NO_CACHE", "0")
        assert cli.enable_compile_cache(False) is None  # --no-cache
        path = cli.enable_compile_cache(True)
        assert path == tmp_path / "xdg" / "jaxguide" / "xla" and path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs <= 1.0
        monkeypatch.setenv("JAXGUIDE_CACHE_DIR", str(tmp_path / "elsewhere"))
        assert cli.compile_cache_dir() == tmp_path / "elsewhere"
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
    res = CliRunner().invoke(app, ["assimilate", "--help"])
    assert "--no-cache" in res.output


def test_usage_errors_are_one_line(case):
    """typer/click's own parsing errors come out as ONE ``error:`` line naming the option
    and its expected form, exit 2 (not typer's boxed usage panel)."""
    runner = CliRunner()
    path, obs = str(case["path"]), str(case["obs"])
    line = one_line_error(runner.invoke(app, ["evaluate", path, "--obs", obs, "--seed", "two"]))
    assert "--seed" in line and "int" in line
    line = one_line_error(runner.invoke(app, ["assimilate", "--model", "m", "--obs", obs, "--time", "2020-01-01",
                                              "--out", "x.nc", "--members", "two"]))
    assert "--members" in line and "int" in line and "ensemble size" in line
    line = one_line_error(runner.invoke(app, ["evaluate", path]))
    assert "missing option --obs" in line
    line = one_line_error(runner.invoke(app, ["evaluate"]))
    assert "ANALYSIS" in line
    line = one_line_error(runner.invoke(app, ["evaluate", path, "--obs", obs, "--sed", "1"]))
    assert "--sed" in line
    line = one_line_error(runner.invoke(app, ["evaluate", path, "--obs"]))
    assert "--obs" in line
    line = one_line_error(runner.invoke(app, ["nosuchcommand"]))
    assert "nosuchcommand" in line
    assert runner.invoke(app, ["evaluate", "--help"]).exit_code == 0


def test_evaluate_creates_nothing_on_bad_input(case, tmp_path):
    runner = CliRunner()
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    plots, js = tmp_path / "plots", tmp_path / "m.json"
    args = ["evaluate", str(case["path"]), "--obs", str(binary), "--plots", str(plots), "--json", str(js)]
    line = one_line_error(runner.invoke(app, args))
    assert line.startswith("error: --obs") and "binary.csv" in line and "CSV" in line
    assert not plots.exists() and not js.exists()
    args = ["evaluate", str(case["path"]), "--obs", str(case["obs"]), "--held-out", str(tmp_path / "nope.csv"),
            "--plots", str(plots), "--json", str(js)]
    assert "nope.csv" in one_line_error(runner.invoke(app, args))
    assert not plots.exists() and not js.exists()
    plots.write_text("a file")
    line = one_line_error(runner.invoke(app, ["evaluate", str(case["path"]), "--obs", str(case["obs"]), "--plots", str(plots)]))
    assert "--plots" in line and "not a directory" in line


def test_era5_obs_member_option(tmp_path):
    """``jaxguide era5-obs``: an ensemble file needs --member; the values are that member's."""
    from test_era5 import _cfgrib_like

    from jaxguide.observations import era5

    from jaxguide import observations

    ds, enc = _cfgrib_like(members=(0, 1, 2))
    ens = tmp_path / "ens.nc"
    ds.to_netcdf(ens, encoding=enc)
    runner = CliRunner()
    out = tmp_path / "obs.csv"
    base = ["era5-obs", str(ens), "--out", str(out), "--count", "7", "--levels", "850,500", "--seed", "3"]
    line = one_line_error(runner.invoke(app, base))
    assert "'number'" in line and "--member" in line and "ens.nc" in line
    assert not out.exists()
    line = one_line_error(runner.invoke(app, [*base, "--member", "two"]))
    assert "--member" in line and "int" in line
    assert "number 5" in one_line_error(runner.invoke(app, [*base, "--member", "5"]))
    assert "--time" in one_line_error(runner.invoke(app, [*base, "--member", "1", "--time", "2021-01-01T00:00"]))
    assert "--levels" in one_line_error(runner.invoke(app, [*base, "--member", "1", "--levels", "700"]))
    assert not out.exists()
    res = runner.invoke(app, [*base, "--member", "1", "--time", "2020-01-01T06:00Z"])
    assert res.exit_code == 0, res.output
    got = observations.read_observations(out)
    want = era5.era5_to_observations(era5.read_era5_temperature(ens, member=1), (850, 500), strategy="random",
                                     count=7, rng=np.random.default_rng(3), times=["2020-01-01T06:00"])
    assert len(got) == 14 and set(got["variable"]) == {"T850", "T500"}
    np.testing.assert_allclose(got["value"].to_numpy(), want["value"].to_numpy(), rtol=0, atol=1e-9)
    member0 = era5.era5_to_observations(era5.read_era5_temperature(ens, member=0), (850, 500), strategy="random",
                                        count=7, rng=np.random.default_rng(3), times=["2020-01-01T06:00"])
    np.testing.assert_allclose(got["value"].to_numpy(), member0["value"].to_numpy() + 1.0, rtol=0, atol=1e-9)
    assert "exists" in one_line_error(runner.invoke(app, [*base, "--member", "1"]))
    text = tmp_path / "text.nc"
    text.write_text("no")
    line = one_line_error(runner.invoke(app, ["era5-obs", str(text), "--out", str(tmp_path / "o2.csv"), "--count", "3"]))
    assert "text.nc" in line and "NetCDF or GRIB" in line
    assert not (tmp_path / "o2.csv").exists()


def test_programming_errors_keep_their_traceback(monkeypatch, tmp_path):
    """A ValueError from inside NumPy/JAX (a shape bug) is not an input error: it propagates
    with its traceback instead of becoming a one-line ``error:``; ``--debug`` does the
    same for input errors; without it an input error stays one line."""
    from jaxguide.assimilation import pipeline
    from jaxguide.cli import app, is_input_error

    def shape_bug(*a, **k):
        return np.reshape(np.ones(3), (2, 2))  # ValueError raised by NumPy

    monkeypatch.setattr(pipeline, "assimilate", shape_bug)
    argv = ["assimilate", "--model", str(tmp_path), "--obs", "o.csv", "--time", "2020-01-01T00:00",
            "--out", str(tmp_path / "a.nc")]
    res = CliRunner().invoke(app, argv)
    assert isinstance(res.exception, ValueError) and res.exit_code != 2, res.output
    assert not is_input_error(res.exception)
    bad_time = argv[:6] + ["05/01/2020"] + argv[7:]
    one_line_error(CliRunner().invoke(app, bad_time))  # input error: one line
    res = CliRunner().invoke(app, ["--debug", *bad_time])
    assert isinstance(res.exception, ValueError) and "ISO 8601" in str(res.exception)
    assert is_input_error(res.exception)


def test_device_out_of_memory_is_one_line_with_the_hint(monkeypatch, tmp_path):
    """A device OOM (JaxRuntimeError RESOURCE_EXHAUSTED) is one line naming --chunk-size,
    --remat and --bf16, exit status non-zero; other runtime errors keep their traceback."""
    import jax

    from jaxguide.assimilation import pipeline

    def oom(*a, **k):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81604378624 bytes.\nmore detail")

    monkeypatch.setattr(pipeline, "assimilate", oom)
    argv = ["assimilate", "--model", str(tmp_path), "--obs", "o.csv", "--time", "2020-01-01T00:00",
            "--out", str(tmp_path / "a.nc")]
    line = one_line_error(CliRunner().invoke(app, argv))
    assert "out of memory" in line and "RESOURCE_EXHAUSTED" in line
    assert all(opt in line for opt in ("--chunk-size", "--remat", "--bf16")), line
    res = CliRunner().invoke(app, ["--debug", *argv])  # --debug: the traceback
    assert isinstance(res.exception, jax.errors.JaxRuntimeError)

    def other(*a, **k):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(pipeline, "assimilate", other)
    res = CliRunner().invoke(app, argv)
    assert isinstance(res.exception, jax.errors.JaxRuntimeError) and "error: " not in res.output


def test_key_error_from_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """A KeyError from a lookup inside jaxguide (a bug) is not an input error: it keeps its
    traceback instead of becoming "error: missing key ..."; a KeyError that jaxguide raises
    as a sentence about the input stays one line."""
    from jaxguide.assimilation import pipeline
    from jaxguide.cli import is_input_error

    def lookup_bug(*a, **k):
        return {}["n_obs"]  # a KeyError raised by jaxguide's own (here: this test's) code

    monkeypatch.setattr(pipeline, "assimilate", lookup_bug)
    monkeypatch.setattr(lookup_bug, "__code__", lookup_bug.__code__.replace(co_filename=pipeline.__file__))
    argv = ["assimilate", "--model", str(tmp_path), "--obs", "o.csv", "--time", "2020-01-01T00:00",
            "--out", str(tmp_path / "a.nc")]
    res = CliRunner().invoke(app, argv)
    assert isinstance(res.exception, KeyError) and res.exit_code != 2, res.output
    assert "missing key" not in res.output and not is_input_error(res.exception)

    def sentence(*a, **k):
        raise KeyError("variable 'T850' is not in the observation file")

    monkeypatch.setattr(sentence, "__code__", sentence.__code__.replace(co_filename=pipeline.__file__))
    monkeypatch.setattr(pipeline, "assimilate", sentence)
    line = one_line_error(CliRunner().invoke(app, argv))
    assert "variable 'T850' is not in the observation file" in line
