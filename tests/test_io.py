from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from conftest import record_fsync_and_replace, require_module
from jaxguide.grid import latlon as grid_sampling, healpix
from jaxguide import io
from jaxguide.io import files as io_files
from jaxguide.assimilation import dataset as schema

REPO = Path(__file__).resolve().parents[1]
NSIDE = 4
NPIX = 12 * NSIDE**2
CHANNELS = ["T850", "tas", "pres_msl", "rlut"]
CENTER = [281.13, 286.09, 101160.2, 243.58]
SCALE = [12.34, 15.61, 1109.4, 42.0]
PROV = {
    "method": "mmps",
    "sigma_y": 0.5,
    "guidance_scale": 1.0,
    "steps": 18,
    "seed": 3,
    "model_sha256": "0" * 64,
    "n_obs": 12,
    "command": "jaxguide assimilate --test",
    "cg_iterations": None,
    "use_bf16": False,
}


def make_ensemble(m=3, seed=0):
    return np.random.default_rng(seed).normal(size=(m, len(CHANNELS), 1, NPIX)).astype(np.float32)


def make_ds(**kw):
    args = dict(channels=CHANNELS, center=CENTER, scale=SCALE, times=["2021-06-01T12:00"], provenance=PROV)
    args.update(kw)
    return schema.analysis_to_dataset(kw.pop("ensemble", make_ensemble()), **{k: v for k, v in args.items() if k != "ensemble"})


def test_dataset_layout_units_and_nest_order():
    x = make_ensemble()
    ds = schema.analysis_to_dataset(x, channels=CHANNELS, center=CENTER, scale=SCALE, times=["2021-06-01T12:00"], provenance=PROV, prior=x[:2])
    assert ds["T850"].dims == ("member", "time", "pixel") and ds["T850"].dtype == np.float32
    # physical units, NEST order: value at nest pixel p is the net value at the same location
    nest_to_net = healpix.permutation(NSIDE, "net", "nest")
    c = 2
    expected = x[:, c, 0, nest_to_net] * SCALE[c] + CENTER[c]
    np.testing.assert_allclose(ds["pres_msl"].values[:, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(ds["pres_msl_prior_mean"].values[0], expected[:2].mean(axis=0), rtol=1e-6)
    # pixel centres against healpy (independent implementation)
    hp = require_module("healpy")
    lon, lat = hp.pix2ang(NSIDE, np.arange(NPIX), nest=True, lonlat=True)
    np.testing.assert_allclose(ds["lat"].values, lat, atol=1e-9)
    np.testing.assert_allclose(ds["lon"].values, lon, atol=1e-9)
    assert ds["T850"].attrs["standard_name"] == "air_temperature" and float(ds["plev850"]) == 85000.0
    assert ds["pres_msl"].attrs["units"] == "Pa" and ds["rlut"].attrs["units"] == "W m-2" and ds["tas"].attrs["units"] == "K"
    assert ds["crs"].attrs["grid_mapping_name"] == "healpix" and ds["crs"].attrs["refinement_level"] == 2


def test_missing_provenance_and_bad_shapes():
    with pytest.raises(ValueError, match="provenance"):
        make_ds(provenance={"method": "mmps"})
    with pytest.raises(ValueError, match="times"):
        make_ds(times=["2021-01-01", "2021-01-02"])
    with pytest.raises(ValueError, match="length"):
        make_ds(channels=CHANNELS[:2])


@pytest.mark.parametrize("fmt,name", [("netcdf", "a.nc"), ("zarr", "a.zarr")])
def test_roundtrip_and_cf_check(tmp_path, fmt, name):
    if fmt == "zarr":
        require_module("zarr")
    ds = make_ds()
    assert schema.check_cf(ds) == []
    path = io.write_dataset(ds, tmp_path / name, format=fmt)
    back = io.read_analysis(path)
    assert schema.check_cf(back) == []
    np.testing.assert_array_equal(back["tas"].values, ds["tas"].values)
    assert back.attrs["method"] == "mmps" and int(back.attrs["n_obs"]) == 12
    assert back["crs"].attrs["healpix_order"] == "nest" and back["crs"].attrs["indexing_scheme"] == "nested"
    assert back["tas"].attrs["grid_mapping"] == "crs"
    assert sorted(os.listdir(tmp_path)) == [name]  # no temporaries left


def test_cf_check_finds_problems(tmp_path):
    good = make_ds()
    cases = []
    bad = good.copy(deep=True)
    del bad["tas"].attrs["units"]
    cases.append((bad, "tas: no units"))
    bad = good.copy(deep=True)
    bad["crs"].attrs["indexing_scheme"] = "ring"
    cases.append((bad, "indexing_scheme"))
    bad = good.copy(deep=True)
    bad.attrs.pop("Conventions")
    cases.append((bad, "Conventions"))
    bad = good.copy(deep=True)
    bad.attrs["Conventions"] = "CF-1.11"
    cases.append((bad, "needs CF-1.13"))
    bad = good.copy(deep=True)
    bad = bad.assign_coords(lat=("pixel", good["lat"].values[::-1], good["lat"].attrs))
    cases.append((bad, "NEST pixel centres"))
    bad = good.copy(deep=True)
    bad["rlut"].attrs["units"] = "K"
    cases.append((bad, "rlut: units"))
    bad = good.copy(deep=True)
    del bad.attrs["model_sha256"]
    cases.append((bad, "model_sha256"))
    for ds, needle in cases:
        problems = schema.check_cf(ds)
        assert any(needle in p for p in problems), (needle, problems)
    # a broken file read back from disk too
    bad = good.copy(deep=True)
    del bad["T850"].attrs["grid_mapping"]
    back = io.read_analysis(io.write_dataset(bad, tmp_path / "bad.nc"))
    assert any("grid_mapping" in p for p in schema.check_cf(back))
    # unknown channel: no units known
    odd = make_ds(channels=["T850", "tas", "pres_msl", "mystery"])
    assert any("mystery: no units" in p for p in schema.check_cf(odd))


def test_write_refuses_overwrite_and_bad_dirs(tmp_path):
    ds = make_ds()
    path = io.write_dataset(ds, tmp_path / "a.nc")
    with pytest.raises(FileExistsError):
        io.write_dataset(ds, path)
    ds2 = make_ds(ensemble=make_ensemble(seed=1))
    io.write_dataset(ds2, path, overwrite=True)
    np.testing.assert_array_equal(io.read_analysis(path)["tas"].values, ds2["tas"].values)
    try:
        import zarr  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="zarr"):
            io.write_dataset(ds, tmp_path / "a.zarr", format="zarr")
    else:
        zp = io.write_dataset(ds, tmp_path / "a.zarr", format="zarr")
        io.write_dataset(ds2, zp, format="zarr", overwrite=True)
        np.testing.assert_array_equal(io.read_analysis(zp)["tas"].values, ds2["tas"].values)
    with pytest.raises(FileNotFoundError):
        io.write_dataset(ds, tmp_path / "nope" / "a.nc")
    with pytest.raises(ValueError):
        io.write_dataset(ds, tmp_path / "b.nc", format="grib")
    if Path("/sys").is_dir():
        with pytest.raises(PermissionError, match="not writable|cannot create"):
            io.write_dataset(ds, "/sys/jaxguide_test.nc")
    with pytest.raises(FileNotFoundError):
        io.read_analysis(tmp_path / "missing.nc")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    ds = make_ds()
    real = xr.Dataset.to_netcdf

    def half_then_fail(self, target, *a, **k):
        real(self, target, *a, **k)
        with open(target, "r+b") as fh:  # truncate: a half-written file
            fh.truncate(os.path.getsize(target) // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        io.write_dataset(ds, tmp_path / "a.nc")
    assert os.listdir(tmp_path) == []


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from tests.test_io import make_ds
    from jaxguide import io
    real = os.replace
    def slow_replace(src, dst):
        open(sys.argv[2], "w").close()  # signal: the temporary is written, replace pending
        time.sleep(60)
        real(src, dst)
    os.replace = slow_replace
    io.write_dataset(make_ds(), sys.argv[1])
    """
)


def test_killed_writer_leaves_no_destination(tmp_path):
    dest = tmp_path / "out" / "a.nc"
    dest.parent.mkdir()
    flag = tmp_path / "flag"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(dest), str(flag)], cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        leftovers = list(dest.parent.iterdir())
        assert leftovers and all(p.name.startswith(".a.nc.") for p in leftovers)  # the hidden temporary exists
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not dest.exists()
    assert not any(p.name == "a.nc" for p in dest.parent.rglob("*") if p.parent == dest.parent)
    # the killed writer's hidden temporary is removed by the next write of the same target
    left = [p.name for p in dest.parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(".a.nc.") and f"-{proc.pid}." in left[0]
    (dest.parent / "b.nc").write_text("another target, untouched")
    io.write_dataset(make_ds(), dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["a.nc", "b.nc"]
    io.read_analysis(dest)


def test_regridded_dataset(tmp_path):
    ds = make_ds(regrid_latlon=grid_sampling.LatLonGrid(6, 12, "bilinear"), prior=make_ensemble(2, seed=9))
    assert ds["tas"].dims == ("member", "time", "lat", "lon") and "crs" not in ds
    assert ds["tas_prior_mean"].dims == ("time", "lat", "lon")
    back = io.read_analysis(io.write_dataset(ds, tmp_path / "r.nc"))
    assert schema.check_cf(back) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_keep_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what a normal write gives
        want = os.stat(plain).st_mode & 0o777
        assert want == 0o666 & ~umask
        nc = io.write_dataset(make_ds(), tmp_path / "a.nc")
        js = io.write_json_atomic(tmp_path / "a.json", {"a": 1})
        png = io.atomic_write(tmp_path / "a.bin", lambda p: p.write_bytes(b"1"))
        for p in (nc, js, png):
            assert os.stat(p).st_mode & 0o777 == want, (p, oct(os.stat(p).st_mode & 0o777))
        try:
            import zarr  # noqa: F401
        except ImportError:
            return
        z = io.write_dataset(make_ds(), tmp_path / "a.zarr", format="zarr")
        assert os.stat(z).st_mode & 0o777 == 0o777 & ~umask
        inner = [p for p in z.rglob("*") if p.is_file()]
        assert inner and all(os.stat(p).st_mode & 0o777 == want for p in inner)
    finally:
        os.umask(old)


def test_netcdf_is_compressed_and_coordinates_have_no_fill_value(tmp_path):
    import netCDF4

    path = io.write_dataset(make_ds(prior=make_ensemble(2, seed=1)), tmp_path / "a.nc")
    with netCDF4.Dataset(path) as nc:
        for name in ("T850", "tas", "T850_prior_mean"):
            assert nc[name].filters()["zlib"] and nc[name].filters()["shuffle"], name
        for name in ("member", "time", "pixel", "lat", "lon", "plev850", "height2m", "crs"):
            assert "_FillValue" not in nc[name].ncattrs(), name


def test_file_and_directory_mixups_are_named(tmp_path):
    ds = make_ds()
    (tmp_path / "dir.nc").mkdir()
    with pytest.raises(IsADirectoryError, match="dir.nc.*is a directory"):
        io.write_dataset(ds, tmp_path / "dir.nc", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        io.write_dataset(ds, tmp_path / "file" / "a.nc")
    with pytest.raises(NotADirectoryError, match="is a file"):
        io.check_writable_dir(tmp_path / "file")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        io.write_json_atomic(tmp_path / "dir.nc", {})
    (tmp_path / "text.nc").write_text("not netcdf")
    with pytest.raises(ValueError, match="text.nc.*not a readable NetCDF"):
        io.read_analysis(tmp_path / "text.nc")


def test_stale_temporary_rules(tmp_path):
    """Only temporaries of dead writers on this host (or legacy ones over an hour old) go."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = io_files._writer_tag().rsplit("-", 1)[0]
    names = {
        f".m.json.{host}-{dead_pid}.abcd1234.tmp": False,  # dead writer, this host: removed
        f".m.json.{host}-{dead_pid}.old": False,
        f".m.json.{host}-{os.getpid()}.abcd1234.tmp": True,  # a live writer (this process): kept
        f".m.json.otherhost-{dead_pid}.abcd1234.tmp": True,  # another machine on a shared disk: kept
        ".m.json.q1w2e3r4.tmp": False,  # legacy name, two hours old: removed
        ".m.json.zzzzzzzz.tmp": True,  # legacy name, fresh: kept (maybe an old version still writing)
        f".m.json.x.{host}-{dead_pid}.abcd1234.tmp": True,  # the temporary of target "m.json.x": kept
        "m.json.bak": True,
    }
    for n in names:
        (tmp_path / n).write_text("x")
    old = time.time() - 7200
    os.utime(tmp_path / ".m.json.q1w2e3r4.tmp", (old, old))
    io.write_json_atomic(tmp_path / "m.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.json", *(n for n, keep in names.items() if keep)])


@pytest.mark.parametrize("kind", ["json", "zarr"])
def test_atomic_writes_are_durable(tmp_path, monkeypatch, kind):
    """The data are fsynced before the rename, the directory after it (a machine crash
    cannot leave the new name pointing at data that never reached the disk)."""
    events = record_fsync_and_replace(monkeypatch)
    root = os.path.realpath(tmp_path)
    if kind == "json":
        dest = tmp_path / "s.json"
        io_files.write_json_atomic(dest, {"a": 1})
        io_files.write_json_atomic(dest, {"a": 2})  # over an existing file
        events = events[len(events) // 2:]
    else:
        dest = tmp_path / "a.zarr"
        io.write_dataset(make_ds(), dest, format="zarr")
    moves = [k for k, e in enumerate(events) if e[0] == "replace" and e[2] == os.path.realpath(dest)]
    assert len(moves) == 1, events
    k = moves[0]
    src = events[k][1]
    synced_before = [e[1] for e in events[:k] if e[0] == "fsync"]
    if kind == "json":
        assert src in synced_before  # the written temporary
    else:
        assert f"{src}/zarr.json" in synced_before and any(p.startswith(f"{src}/T850/c") for p in synced_before)
    assert ("fsync", root) in events[k + 1:]  # the directory, after the rename
