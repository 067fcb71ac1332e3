"""``jaxguide.earth2studio.CBottleDA`` against the real earth2studio package (the
``earth2studio`` extra, installed by setup.sh): the ``AssimilationModel`` protocol, an
ISD-shaped frame, the generator over three times (compiles counted), bad frames, and
equality with ``jaxguide assimilate`` on the same observations, time and seed (bit for bit,
after the name mapping).

The model runs the replacement method with nearest-pixel observations: its last sampler
step puts the observed values at the observed pixels, so the DataArray's names, units
and pixel order are also checked against the frame itself, independently of the
network's (random) weights.
"""

from __future__ import annotations

import tomllib

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from conftest import REPO, require_module
from test_pipeline import write_sst

from jaxguide import io
from jaxguide.cli import app
from jaxguide.diffusion.ensemble import count_compiles, describe_devices
from jaxguide.grid import healpix
from jaxguide.observations.sources import channel_earth2studio, earth2studio_channel

TIMES = ("2020-01-20T00:00", "2020-01-20T06:00", "2020-01-20T12:00")
OPTIONS = dict(method="replacement", interpolation="nearest", members=2, steps=2, seed=7, sigma_y=1.0)
# plausible values (physical units) of the ISD variables the fixture model has
TYPICAL = {"t2m": (280.0, 5.0), "msl": (101000.0, 800.0), "t850": (265.0, 5.0)}


def isd_frame(time: str, n: int, rng: np.random.Generator, *, hours=None, variables=("t2m", "msl")) -> pd.DataFrame:
    """A frame shaped as earth2studio.data.ISD returns (its schema's columns and dtypes,
    lon in [0, 360), ``request_time`` in attrs), stations at distinct HEALPix pixel centres."""
    lon, lat = healpix.lonlat(64, "nest")
    pix = rng.choice(lon.size, n, replace=False)
    variable = np.array(variables)[np.arange(n) % len(variables)]
    value = [rng.normal(*TYPICAL[v]) for v in variable]
    t = np.datetime64(time, "ns")
    offsets = np.zeros(n) if hours is None else np.asarray(hours, float)
    frame = pd.DataFrame({
        "time": (t + (offsets * 3600).astype("timedelta64[s]")).astype("datetime64[ns]"),
        "lat": lat[pix].astype(np.float32),
        "lon": (lon[pix] % 360.0).astype(np.float32),
        "elev": rng.uniform(0.0, 500.0, n).astype(np.float32),
        "station": [f"{i:06d}99999" for i in range(n)],
        "observation": np.asarray(value, np.float32),
        "variable": variable,
    })
    frame.attrs["request_time"] = np.array([t])
    frame.attrs["source"] = "test"
    return frame


@pytest.fixture(scope="module")
def case(tiny_model_dir, tmp_path_factory):
    """One CBottleDA; its generator run over three ISD-shaped frames, compiles counted per send."""
    require_module("earth2studio")
    from jaxguide.earth2studio import CBottleDA

    tmp = tmp_path_factory.mktemp("e2s")
    sst = write_sst(tmp / "tosbcs.nc")
    model = CBottleDA(tiny_model_dir, sst=sst, **OPTIONS)
    rng = np.random.default_rng(11)
    frames = [isd_frame(t, 24 + 3 * i, rng) for i, t in enumerate(TIMES)]
    gen = model.create_generator()
    primed = gen.send(None)
    outputs, compiles = [], []
    for frame in frames:
        with count_compiles() as c:
            outputs.append(gen.send(frame))
        compiles.append(len(c))
    after_none = gen.send(None)
    gen.close()
    return dict(tmp=tmp, sst=sst, model=model, model_dir=tiny_model_dir, frames=frames, outputs=outputs,
                compiles=compiles, primed=primed, after_none=after_none)


def test_is_an_earth2studio_assimilation_model(case):
    from earth2studio.models.da.base import AssimilationModel

    model = case["model"]
    assert isinstance(model, AssimilationModel)
    assert model.init_coords() is None
    (schema,) = model.input_coords()
    assert list(schema) == ["time", "lat", "lon", "observation", "variable"]
    # every channel of the checkpoint, by its earth2studio name
    assert list(schema["variable"]) == ["t850", "t500", "t300", "t2m", "msl", "rlut"]
    assert [earth2studio_channel(v) for v in schema["variable"]] == list(model.channels)
    # the output coordinates describe the DataArray the call returns
    (da,) = case["outputs"][0]
    (coords,) = model.output_coords(model.input_coords(), request_time=case["frames"][0].attrs["request_time"])
    assert list(coords) == list(da.dims) == ["ensemble", "time", "variable", "npix"]
    for dim, values in coords.items():
        np.testing.assert_array_equal(da[dim].values, values)
    assert da.shape == (2, 1, 6, 49152) and da.dtype == np.float32
    assert list(da["units"].values) == ["K", "K", "K", "K", "Pa", "W m-2"]
    assert list(da["channel"].values) == list(model.channels)
    # without a request time (earth2studio's eval recipe asks so): NaT, as HealDA
    (c0,) = model.output_coords(model.input_coords())
    assert np.isnat(c0["time"]).all()
    assert model.to("cpu") is model and model.session.devices == tuple(__import__("jax").devices("cpu")[:1])
    # earth2studio's loading convention (its eval recipe): a Package rooted at the converted model
    from earth2studio.models.auto import Package

    from jaxguide.earth2studio import CBottleDA

    loaded = CBottleDA.load_model(Package(str(case["model_dir"])), sst=case["sst"], **OPTIONS)
    assert loaded.channels == model.channels and loaded.settings == model.settings


def test_generator_compiles_once_over_three_times(case):
    assert case["primed"] is None and case["after_none"] is None
    # first frame: the programs compile (or load from the test cache: counted too); then none
    assert case["compiles"][0] > 0 and case["compiles"][1:] == [0, 0], case["compiles"]
    values = []
    for frame, out in zip(case["frames"], case["outputs"]):
        assert isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], xr.DataArray)
        (da,) = out
        np.testing.assert_array_equal(da["time"].values, frame.attrs["request_time"])
        assert int(da["n_obs"].values[0]) == len(frame)
        assert np.isfinite(da.values).all()
        values.append(da.values)
    assert not np.array_equal(values[0], values[1])  # each time its own key and observations


def test_observed_values_at_observed_pixels(case):
    """Replacement, nearest pixel: the DataArray holds each observation at its pixel, under
    its earth2studio name, in its units (NEST pixel index)."""
    for frame, (da,) in zip(case["frames"], case["outputs"]):
        lon, lat = healpix.lonlat(64, "nest")
        pix = [int(np.argmin((lat - la) ** 2 + ((lon - lo + 180) % 360 - 180) ** 2))
               for la, lo in zip(frame["lat"].to_numpy(np.float64), frame["lon"].to_numpy(np.float64))]
        got = da.isel(time=0).values  # (ensemble, variable, npix)
        var = [list(da["variable"].values).index(v) for v in frame["variable"]]
        for m in range(da.sizes["ensemble"]):
            np.testing.assert_allclose(got[m, var, pix], frame["observation"].to_numpy(np.float64), rtol=2e-6)


def test_equals_jaxguide_assimilate(case, tmp_path):
    """The DataArray equals the CLI's analysis file on the same observations (the frame as
    Parquet), time and seed, bit for bit; a stateless call with extra rows outside the
    window (dropped, as earth2studio's filter_time_range does) gives the same values."""
    frame, (da,) = case["frames"][0], case["outputs"][0]
    obs = tmp_path / "isd.parquet"
    stored = frame.copy()
    stored.attrs = {}  # (Parquet keeps no ndarray attrs; the CLI is given the time by --time)
    stored.to_parquet(obs)
    out = tmp_path / "cli.nc"
    args = ["assimilate", "--model", str(case["model_dir"]), "--obs", str(obs), "--time", TIMES[0],
            "--sst", str(case["sst"]), "--method", "replacement", "--interpolation", "nearest", "--members", "2",
            "--steps", "2", "--seed", "7", "--sigma-y", "1", "--prior-members", "0", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    first = res.stderr.strip().splitlines()[0]
    assert first.startswith(f"[0.0 s] on {describe_devices()}: reading"), first
    ds = io.read_analysis(out)
    assert ds.attrs["n_obs"] == len(frame)
    for channel in case["model"].channels:
        cli = ds[channel].values[:, 0]  # (member, pixel), physical units, NEST
        mine = da.sel(variable=channel_earth2studio(channel)).values[:, 0]
        assert mine.dtype == cli.dtype == np.float32
        assert np.array_equal(mine, cli), channel
    # stateless call, extra rows 5 h away (outside +-3 h): dropped, same analysis
    rng = np.random.default_rng(5)
    extra = isd_frame(TIMES[0], 6, rng, hours=[5.0, -5.0, 4.0, -4.0, 6.0, -6.0])
    both = pd.concat([frame, extra], ignore_index=True)
    both.attrs = dict(frame.attrs)
    (again,) = case["model"](both)
    assert np.array_equal(again.values, da.values)


def test_bad_frames_are_refused(case):
    from jaxguide.earth2studio import CBottleDA

    model, frame = case["model"], case["frames"][0]
    with pytest.raises(ValueError, match=r"missing required fields: \['observation'\]"):  # earth2studio's check
        model(frame.drop(columns="observation"))
    bad = frame.copy()
    bad.loc[0, "variable"] = "tp"
    with pytest.raises(ValueError, match=r"variables \['tp'\] this model cannot assimilate"):
        model(bad)
    no_time = frame.copy()
    no_time.attrs = {}
    with pytest.raises(ValueError, match="no 'request_time'"):
        model(no_time)
    late = frame.copy()
    late.attrs["request_time"] = np.array([np.datetime64("2020-01-21T00:00", "ns")])
    with pytest.raises(ValueError, match="no observations in the window"):
        model(late)
    with pytest.raises(TypeError, match="pandas DataFrame"):
        model(frame.to_xarray())
    with pytest.raises(ValueError, match="needs an observation frame"):
        model(None)
    # jaxguide's own validation: a latitude out of range is named
    wrong = frame.copy()
    wrong.loc[0, "lat"] = 95.0
    with pytest.raises(ValueError, match="lat"):
        model(wrong)
    with pytest.raises(TypeError, match=r"unknown options \['member'\]"):
        CBottleDA(case["model_dir"], member=2)
    with pytest.raises(ValueError, match="prior_members must be 0"):
        CBottleDA(case["model_dir"], prior_members=2)
    with pytest.raises(ValueError, match="cg_iters"):  # the method's options are checked up front
        CBottleDA(case["model_dir"], method="replacement", cg_iters=2)


def test_extras_pin_the_packages_they_are_tested_with():
    """``[cuda12]`` installs the CUDA plugin of the pinned jax; ``[earth2studio]`` the version
    these tests import."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    jax_pin = next(d for d in meta["dependencies"] if d.startswith("jax=="))
    assert meta["optional-dependencies"]["cuda12"] == [jax_pin.replace("jax==", "jax[cuda12]==")]
    import earth2studio

    assert f"earth2studio=={earth2studio.__version__}" in meta["optional-dependencies"]["earth2studio"]


@pytest.mark.slow  # reads the package index (a few seconds); CI's setup.sh reads it too
def test_cuda12_extra_resolves(tmp_path):
    """``pip install --dry-run`` of the CUDA 12 plugin and PJRT of the pinned jax (their
    NVIDIA wheels are left out: --no-deps)."""
    import json
    import subprocess
    import sys

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    version = next(d for d in meta["dependencies"] if d.startswith("jax==")).split("==")[1]
    report = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                          "--quiet", "--report", str(report), f"jax-cuda12-plugin[with-cuda]=={version}",
                          f"jax-cuda12-pjrt=={version}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert got == {"jax-cuda12-plugin": version, "jax-cuda12-pjrt": version}


@pytest.mark.slow  # a second session (regridded output) and the video model: > 20 s on 2 cores
def test_regrid_and_video(case, fixtures_dir, tmp_path):
    from jaxguide.earth2studio import CBottleDA
    from jaxguide.grid.latlon import LatLonGrid, regrid_to_latlon

    # regular grid: the HEALPix analysis regridded (the same members: same seed, time, observations)
    model = CBottleDA(case["model_dir"], sst=case["sst"], regrid="9x18", **OPTIONS)
    (da,) = model(case["frames"][0])
    assert list(da.dims) == ["ensemble", "time", "variable", "lat", "lon"] and da.shape == (2, 1, 6, 9, 18)
    (coords,) = model.output_coords(model.input_coords())
    lat, lon = LatLonGrid(9, 18).coords()
    np.testing.assert_array_equal(coords["lat"], lat)
    np.testing.assert_array_equal(da["lon"].values, lon)
    (hpx,) = case["outputs"][0]
    np.testing.assert_allclose(da.values, regrid_to_latlon(hpx.values, LatLonGrid(9, 18)), rtol=1e-6)

    # video model: lead_time = the window's frames; equal to the CLI's trajectory
    res = CliRunner().invoke(app, ["convert", str(fixtures_dir / "video" / "video.checkpoint"), "--out",
                                   str(tmp_path / "video")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["synthetic-sst", str(tmp_path / "sst.nc"), "--start", "2016-02-01", "--end",
                                   "2016-03-31", "--resolution", "2"])
    assert res.exit_code == 0, res.output
    start = "2016-02-28T18:00"
    video = CBottleDA(tmp_path / "video", sst=tmp_path / "sst.nc", **OPTIONS)
    # the video fixture's channels are T850, T500, tas: a frame of t2m and t850 at each of the 4 frames
    frame = isd_frame(start, 12, np.random.default_rng(2), hours=np.arange(12) % 4 * 6.0, variables=("t2m", "t850"))
    (va,) = video(frame)
    assert list(va.dims) == ["ensemble", "time", "lead_time", "variable", "npix"]
    assert va.shape[:3] == (2, 1, 4)
    np.testing.assert_array_equal(va["lead_time"].values, np.arange(4) * np.timedelta64(6, "h"))
    stored = frame.copy()
    stored.attrs = {}
    stored.to_parquet(tmp_path / "obs.parquet")
    out = tmp_path / "traj.nc"
    res = CliRunner().invoke(app, [
        "assimilate", "--model", str(tmp_path / "video"), "--obs", str(tmp_path / "obs.parquet"), "--time", start,
        "--sst", str(tmp_path / "sst.nc"), "--method", "replacement", "--interpolation", "nearest", "--members", "2",
        "--steps", "2", "--seed", "7", "--sigma-y", "1", "--prior-members", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    ds = io.read_analysis(out)
    for channel in video.channels:
        assert np.array_equal(va.sel(variable=channel_earth2studio(channel)).values[:, 0], ds[channel].values), channel


@pytest.mark.slow  # compiles MMPS for the fixture: > 20 s on 2 cores
def test_readme_example_runs_as_written(tiny_model_dir, tmp_path, monkeypatch):
    """README's "Using jaxguide from earth2studio" example, with the fixture checkpoint."""
    require_module("earth2studio")
    text = (REPO / "README.md").read_text()
    start = text.index("## Using jaxguide from earth2studio")
    block = text[text.index("```python", start) + len("```python"):]
    block = block[:block.index("```")]
    monkeypatch.chdir(tmp_path)
    write_sst(tmp_path / "tosbcs.nc")
    code = block.replace('"model"', repr(str(tiny_model_dir)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    da = namespace["analysis"]  # the example unpacks the 1-tuple
    assert da.dims == ("ensemble", "time", "variable", "npix") and np.isfinite(da.values).all()


def test_jaxguide_never_imports_earth2studio():
    """The extra is optional: jaxguide's own packages and CLI do not import it (nor torch)."""
    import subprocess
    import sys

    code = ("import sys, jaxguide, jaxguide.assimilation, jaxguide.campaign, jaxguide.cli; "
            "bad = [m for m in ('earth2studio', 'torch') if m in sys.modules]; assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
