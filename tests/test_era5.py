"""ERA5 temperature reading (current + legacy CDS layouts), observations and regrid.

The test files are written here (xarray + netCDF4/scipy), including int16 packing.
Tolerances: identical layouts exact (values chosen exactly representable); a packed
realistic file decodes to within half a packing step; regrid vs scipy 1e-9 K.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.interpolate import RegularGridInterpolator

from jaxguide.observations import era5 as E
from jaxguide.grid import healpix as H
from jaxguide.grid.latlon import bilinear_latlon
from jaxguide import observations as O

RES = 5.0
LAT_DESC = np.arange(90.0, -90.0 - RES / 2, -RES)  # 90 .. -90, as CDS delivers
LON = np.arange(0.0, 360.0, RES)
LEVELS = np.array([1000, 850, 500, 300])
TIMES = pd.date_range("2020-01-01", periods=4, freq="6h")
SCALE = 2.0**-6  # exactly representable packing so both layouts hold identical numbers
OFFSET = 250.0


def _kelvin(times=TIMES, levels=LEVELS, lat=LAT_DESC, lon=LON):
    """Smooth temperature (time, level, lat, lon) on the packing grid (exact in float32)."""
    t = np.arange(len(times))[:, None, None, None]
    lv = np.asarray(levels)[None, :, None, None]
    la = np.radians(lat)[None, None, :, None]
    lo = np.radians(lon)[None, None, None, :]
    k = 230.0 + 60.0 * np.cos(la) ** 2 + 0.03 * (lv - 300) + 3.0 * np.sin(lo) * np.cos(la) + 0.5 * t
    return OFFSET + np.round((k - OFFSET) / SCALE) * SCALE


def _current(times=TIMES, data=None):
    data = _kelvin(times) if data is None else data
    return xr.Dataset(
        {"t": (("valid_time", "pressure_level", "latitude", "longitude"), data.astype(np.float32),
               {"units": "K", "standard_name": "air_temperature"})},
        coords={
            "valid_time": times,
            "pressure_level": ("pressure_level", LEVELS.astype(np.float64), {"units": "hPa"}),
            "latitude": LAT_DESC,
            "longitude": LON,
            "number": 0,
            "expver": ("valid_time", np.array(["0001"] * len(times))),
        },
    )


def _legacy(data=None, scale=SCALE, offset=OFFSET):
    data = _kelvin() if data is None else data
    ds = xr.Dataset(
        {"t": (("time", "level", "latitude", "longitude"), data, {"units": "K"})},
        coords={
            "time": TIMES,
            "level": ("level", LEVELS.astype(np.int32), {"units": "millibars"}),
            "latitude": LAT_DESC.astype(np.float32),
            "longitude": LON.astype(np.float32),
        },
    )
    enc = {
        "t": {"dtype": "int16", "scale_factor": scale, "add_offset": offset, "_FillValue": np.int16(-32767)},
        "time": {"units": "hours since 1900-01-01 00:00:00.0", "calendar": "gregorian", "dtype": "int32"},
    }
    return ds, enc


def _write_legacy(path, **kw):
    ds, enc = _legacy(**kw)
    ds.to_netcdf(path, format="NETCDF3_64BIT", engine="netcdf4", encoding=enc)
    return path


def test_layouts_load_identically(tmp_path):
    _current().to_netcdf(tmp_path / "new.nc", engine="netcdf4")
    _write_legacy(tmp_path / "old.nc")
    with xr.open_dataset(tmp_path / "old.nc", mask_and_scale=False) as raw:
        assert raw["t"].dtype == np.int16 and "scale_factor" in raw["t"].attrs
    new = E.read_era5_temperature(tmp_path / "new.nc")
    old = E.read_era5_temperature([tmp_path / "old.nc"])
    xr.testing.assert_identical(new, old)
    assert new["t"].dims == ("time", "level", "lat", "lon")
    assert np.all(np.diff(new["lat"].values) > 0) and new["lon"].min() >= 0 and new["lon"].max() < 360
    assert new["level"].values.tolist() == [300, 500, 850, 1000]
    np.testing.assert_array_equal(new["t"].sel(level=850).values[:, ::-1], _kelvin()[:, 1])

    pts = {"lat": [10.0, -33.3, 89.0, -90.0], "lon": [-170.0, 359.0, 12.5, 0.0]}
    a = E.era5_to_observations(new, points=pts, sigma={"T850": 0.5, "T500": 0.7, "T300": 0.9})
    b = E.era5_to_observations(old, points=pts, sigma={"T850": 0.5, "T500": 0.7, "T300": 0.9})
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 4 * 3 * 4 and set(a["variable"]) == {"T850", "T500", "T300"}
    O.validate_observations(a, ["T850", "T500", "T300", "tas"])


def test_packed_values_and_fill_decode(tmp_path):
    rng = np.random.default_rng(0)
    data = 200.0 + 110.0 * rng.random((len(TIMES), len(LEVELS), LAT_DESC.size, LON.size))
    data[1, 2, 3, 4] = np.nan
    scale, offset = 0.0017, 255.0  # CDS-like packing: ~ (max - min) / (2**16 - 2), centred
    _write_legacy(tmp_path / "old.nc", data=data, scale=scale, offset=offset)
    ds = E.read_era5_temperature(tmp_path / "old.nc")
    got = ds["t"].values[:, ::-1, ::-1, :]  # back to file order: level 1000..300, lat 90..-90
    np.testing.assert_array_equal(np.isnan(got), np.isnan(data))
    np.testing.assert_allclose(got, data, rtol=0, atol=scale / 2 + 1e-9)
    assert np.isnan(ds["t"].sel(level=500).values[1, LAT_DESC.size - 1 - 3, 4])


def test_multiple_files_and_zip(tmp_path):
    _current().to_netcdf(tmp_path / "full.nc")
    first = _current(TIMES[:2], _kelvin()[:2])
    second = _current(TIMES[2:], _kelvin()[2:])
    first.to_netcdf(tmp_path / "a.nc")
    second.to_netcdf(tmp_path / "b.nc")
    other = xr.Dataset({"z": (("valid_time", "latitude", "longitude"), np.zeros((4, LAT_DESC.size, LON.size)))},
                       coords={"valid_time": TIMES, "latitude": LAT_DESC, "longitude": LON})
    other.to_netcdf(tmp_path / "z.nc")
    ref = E.read_era5_temperature(tmp_path / "full.nc")
    xr.testing.assert_identical(E.read_era5_temperature([tmp_path / "b.nc", tmp_path / "a.nc", tmp_path / "z.nc"]), ref)
    with zipfile.ZipFile(tmp_path / "cds.zip", "w") as z:
        for name in ("a.nc", "b.nc", "z.nc"):
            z.write(tmp_path / name, f"data_stream-oper_{name}")
    xr.testing.assert_identical(E.read_era5_temperature(tmp_path / "cds.zip"), ref)
    pa = _current()
    pa["pressure_level"] = ("pressure_level", LEVELS * 100.0, {"units": "Pa"})
    pa.to_netcdf(tmp_path / "pa.nc")
    xr.testing.assert_identical(E.read_era5_temperature(tmp_path / "pa.nc"), ref)
    with pytest.raises(E.ERA5FormatError, match="no ERA5 temperature"):
        E.read_era5_temperature(tmp_path / "z.nc")


def test_era5_to_healpix_matches_scipy(tmp_path):
    _current().to_netcdf(tmp_path / "new.nc")
    ds = E.read_era5_temperature(tmp_path / "new.nc")
    hp_t = E.era5_to_healpix(ds, nside=16, order="net")
    assert hp_t.dims == ("time", "level", "pixel") and hp_t.shape == (4, 4, 12 * 16**2)
    plon, plat = H.lonlat(16, "net")
    lat, lon = ds["lat"].values, ds["lon"].values
    f = ds["t"].values[2, 1]
    f_ext = np.concatenate([f, f[:, :1]], axis=1)
    ref = RegularGridInterpolator((lat, np.append(lon, 360.0)), f_ext)(np.stack([plat, plon], -1))
    np.testing.assert_allclose(hp_t.values[2, 1], ref, rtol=0, atol=1e-9)
    # ring order is a permutation of the same values
    np.testing.assert_array_equal(
        E.era5_to_healpix(ds, nside=16, order="ring").values, H.reorder(hp_t.values, "net", "ring")
    )


def test_observations_at_grid_nodes_and_strategy(tmp_path):
    _current().to_netcdf(tmp_path / "new.nc")
    ds = E.read_era5_temperature(tmp_path / "new.nc")
    obs = E.era5_to_observations(ds, levels=(500,), points={"lat": [45.0, -60.0], "lon": [-90.0, 355.0]},
                                 times=TIMES[1:2])
    want = [ds["t"].sel(time=TIMES[1], level=500, lat=45.0, lon=270.0).item(),
            ds["t"].sel(time=TIMES[1], level=500, lat=-60.0, lon=355.0).item()]
    np.testing.assert_array_equal(obs["value"].to_numpy(), want)
    assert (obs["sigma"] == 1.0).all() and (obs["variable"] == "T500").all()
    a = E.era5_to_observations(ds, strategy="uniform", count=50, rng=np.random.default_rng(1), noise=True, sigma=2.0)
    b = E.era5_to_observations(ds, strategy="uniform", count=50, rng=np.random.default_rng(1), noise=True, sigma=2.0)
    pd.testing.assert_frame_equal(a, b)
    clean = E.era5_to_observations(ds, strategy="uniform", count=50, rng=np.random.default_rng(1), sigma=2.0)
    resid = (a["value"] - clean["value"]).to_numpy()
    assert 1.5 < resid.std() < 2.5  # 600 draws of N(0, 2^2)
    with pytest.raises(ValueError, match="levels"):
        E.era5_to_observations(ds, levels=(700,), points={"lat": [0.0], "lon": [0.0]})
    with pytest.raises(ValueError, match="exactly one"):
        E.era5_to_observations(ds)


def test_regional_grid_rejected():
    lat, lon = np.array([0.0, 1.0]), np.array([10.0, 11.0, 12.0])
    with pytest.raises(ValueError, match="global"):
        bilinear_latlon(np.zeros((2, 3)), lat, lon, np.array([0.5]), np.array([10.5]))


# --------------------------------------------------------------------------------------
# cfgrib-written NetCDF, ensembles, forecasts (valid_time = time + step), GRIB


def _cfgrib_like(members=(0,), times=TIMES, steps=None, pack=True, data=None):
    """A NetCDF as cfgrib + xarray write it: dims [number,] time, [step,] isobaricInhPa,
    latitude (descending), longitude; valid_time over time (x step); t packed in int16.

    Member k holds ``_kelvin() + k``; with ``steps`` (a list of timedeltas), the field of
    (init i, step s) is the field of the valid time ``times[i] + s`` (shifted 0.5 K per 6 h)."""
    lead = pd.to_timedelta(steps) if steps is not None else pd.to_timedelta([0], unit="h")
    n_members = len(members)
    valid = np.asarray(times)[:, None] + np.asarray(lead)[None, :]  # (time, step)
    hours = (pd.DatetimeIndex(valid.ravel()) - TIMES[0]) / pd.Timedelta("6h")
    base = _kelvin(times=range(1))[0]  # (level, lat, lon) at TIMES[0]
    field = base[None] + 0.5 * np.asarray(hours).reshape(valid.shape)[..., None, None, None]  # (time, step, lev, lat, lon)
    field = field[None] + np.asarray(members, float)[:, None, None, None, None, None]  # (number, ...)
    if data is not None:
        field = data
    dims = ["number", "time", "step", "isobaricInhPa", "latitude", "longitude"]
    coords = {
        "number": ("number", np.asarray(members, np.int64), {"long_name": "ensemble member numerical id"}),
        "time": times,
        "step": ("step", np.asarray(lead)),
        "isobaricInhPa": ("isobaricInhPa", LEVELS.astype(np.float64), {"units": "hPa"}),
        "latitude": ("latitude", LAT_DESC, {"units": "degrees_north"}),
        "longitude": ("longitude", LON, {"units": "degrees_east"}),
        "valid_time": (("time", "step"), valid),
    }
    ds = xr.Dataset({"t": (dims, field, {"units": "K", "GRIB_shortName": "t"})}, coords=coords)
    if steps is None:  # analysis type: step is a scalar coordinate, valid_time lies along time
        ds = ds.isel(step=0)
    if n_members == 1 and members == (0,):
        ds = ds.isel(number=0)  # scalar 'number', as cfgrib writes a deterministic file
    enc = {"t": {"dtype": "int16", "scale_factor": SCALE, "add_offset": OFFSET, "_FillValue": np.int16(-32767)}} if pack else {}
    return ds, enc


def test_cfgrib_netcdf_analysis_matches_cds_layout(tmp_path):
    ds, enc = _cfgrib_like()
    ds.to_netcdf(tmp_path / "cfgrib.nc", encoding=enc)
    with xr.open_dataset(tmp_path / "cfgrib.nc", mask_and_scale=False) as raw:  # the layout is what we meant
        assert raw["t"].dtype == np.int16 and raw["t"].dims == ("time", "isobaricInhPa", "latitude", "longitude")
        assert "valid_time" in raw.coords and "time" in raw.dims and raw["latitude"].values[0] == 90.0
    _current().to_netcdf(tmp_path / "cds.nc")
    xr.testing.assert_identical(E.read_era5_temperature(tmp_path / "cfgrib.nc"), E.read_era5_temperature(tmp_path / "cds.nc"))


def test_valid_time_not_time_for_forecasts(tmp_path):
    # scalar nonzero step: the observation time is valid_time = time + 12 h, not time
    ds, enc = _cfgrib_like(steps=["12h"])
    ds.isel(step=0).to_netcdf(tmp_path / "fc1.nc", encoding=enc)
    got = E.read_era5_temperature(tmp_path / "fc1.nc")
    np.testing.assert_array_equal(got["time"].values, (TIMES + pd.Timedelta("12h")).values)
    ref = _kelvin(times=range(6))[2:]  # valid at TIMES + 12 h = 2 x 6 h later: +1 K
    np.testing.assert_array_equal(got["t"].values[:, ::-1, ::-1], ref)
    # time x step: one axis of distinct valid times, each holding its own field
    init = pd.DatetimeIndex(["2020-01-01T00", "2020-01-01T12"])
    ds, enc = _cfgrib_like(times=init, steps=["0h", "6h"])
    assert ds["valid_time"].dims == ("time", "step")
    ds.to_netcdf(tmp_path / "fc2.nc", encoding=enc)
    got = E.read_era5_temperature(tmp_path / "fc2.nc")
    want_times = pd.DatetimeIndex(["2020-01-01T00", "2020-01-01T06", "2020-01-01T12", "2020-01-01T18"])
    np.testing.assert_array_equal(got["time"].values, want_times.values)
    np.testing.assert_array_equal(got["t"].values[:, ::-1, ::-1], _kelvin())
    # one initialisation time saved alone (scalar time, step dimension), and one analysis time alone
    ds.isel(time=0).to_netcdf(tmp_path / "fc_one_init.nc", encoding=enc)
    got = E.read_era5_temperature(tmp_path / "fc_one_init.nc")
    np.testing.assert_array_equal(got["time"].values, want_times[:2].values)
    np.testing.assert_array_equal(got["t"].values[:, ::-1, ::-1], _kelvin()[:2])
    ds, enc = _cfgrib_like()
    ds.isel(time=2).to_netcdf(tmp_path / "one_time.nc", encoding=enc)
    got = E.read_era5_temperature(tmp_path / "one_time.nc")
    np.testing.assert_array_equal(got["time"].values, TIMES[2:3].values)
    np.testing.assert_array_equal(got["t"].values[:, ::-1, ::-1], _kelvin()[2:3])
    # overlapping forecasts (00 + 12 h and 06 + 6 h are both valid at 12 h): refused, named
    ds, enc = _cfgrib_like(times=pd.DatetimeIndex(["2020-01-01T00", "2020-01-01T06"]), steps=["6h", "12h"])
    ds.to_netcdf(tmp_path / "fc3.nc", encoding=enc)
    with pytest.raises(E.ERA5FormatError, match=r"fc3\.nc.*valid"):
        E.read_era5_temperature(tmp_path / "fc3.nc")


def test_ensemble_member_selection(tmp_path):
    ds, enc = _cfgrib_like(members=(0, 1, 2, 3))
    assert ds["t"].dims[0] == "number"
    ds.to_netcdf(tmp_path / "ens.nc", encoding=enc)
    with pytest.raises(E.ERA5FormatError, match=r"ens\.nc.*4 members.*'number'.*--member") as err:
        E.read_era5_temperature(tmp_path / "ens.nc")
    assert "member=" in str(err.value)
    for k in (0, 2):
        got = E.read_era5_temperature(tmp_path / "ens.nc", member=k)
        np.testing.assert_array_equal(got["t"].values[:, ::-1, ::-1], _kelvin() + k)
    with pytest.raises(E.ERA5FormatError, match=r"no ensemble member number 7.*\[0, 1, 2, 3\]"):
        E.read_era5_temperature(tmp_path / "ens.nc", member=7)
    # a deterministic file asked for a member
    _current().to_netcdf(tmp_path / "det.nc")
    E.read_era5_temperature(tmp_path / "det.nc", member=0)  # CDS writes number = 0: that member
    with pytest.raises(E.ERA5FormatError, match=r"det\.nc.*member=3.*only member 0"):
        E.read_era5_temperature(tmp_path / "det.nc", member=3)
    # a one-member copy of the ensemble (number kept as a length-1 dimension) needs no choice
    ds.isel(number=[2]).to_netcdf(tmp_path / "one.nc", encoding=enc)
    np.testing.assert_array_equal(E.read_era5_temperature(tmp_path / "one.nc")["t"].values[:, ::-1, ::-1], _kelvin() + 2)


def test_bad_files_name_the_file_and_expectation(tmp_path):
    (tmp_path / "text.nc").write_text("not a netcdf file\n")
    with pytest.raises(E.ERA5FormatError, match=r"text\.nc.*not a readable NetCDF or GRIB"):
        E.read_era5_temperature(tmp_path / "text.nc")
    with pytest.raises(FileNotFoundError, match="missing.nc"):
        E.read_era5_temperature(tmp_path / "missing.nc")
    celsius = _current()
    celsius["t"].attrs["units"] = "degC"
    celsius.to_netcdf(tmp_path / "c.nc")
    with pytest.raises(E.ERA5FormatError, match=r"c\.nc.*units 'degC'.*expected K"):
        E.read_era5_temperature(tmp_path / "c.nc")
    flat = _current().isel(latitude=0, drop=True)
    flat.to_netcdf(tmp_path / "flat.nc")
    with pytest.raises(E.ERA5FormatError, match=r"flat\.nc.*latitude"):
        E.read_era5_temperature(tmp_path / "flat.nc")
    nolev = _current().isel(pressure_level=0, drop=True)
    nolev.to_netcdf(tmp_path / "nolev.nc")
    with pytest.raises(E.ERA5FormatError, match=r"nolev\.nc.*pressure level"):
        E.read_era5_temperature(tmp_path / "nolev.nc")


def _write_grib(path, members, inits, steps, levels=(850, 500)):
    """GRIB2 temperature on pressure levels from eccodes' own sample; member k, init i,
    step s, level l holds ``250 + k + 0.25 i + s / 24 + l / 1000 + 0.125 * cell``."""
    eccodes = _require("eccodes")
    lat = np.arange(90.0, -90.1, -30.0)
    lon = np.arange(0.0, 360.0, 60.0)
    expect = {}
    with open(path, "wb") as fh:
        for k in members:
            for i, t0 in enumerate(inits):
                for s in steps:
                    for lv in levels:
                        h = eccodes.codes_grib_new_from_samples("regular_ll_pl_grib2")
                        keys = dict(Ni=lon.size, Nj=lat.size, latitudeOfFirstGridPointInDegrees=90.0,
                                    latitudeOfLastGridPointInDegrees=-90.0, longitudeOfFirstGridPointInDegrees=0.0,
                                    longitudeOfLastGridPointInDegrees=300.0, iDirectionIncrementInDegrees=60.0,
                                    jDirectionIncrementInDegrees=30.0, discipline=0, parameterCategory=0,
                                    parameterNumber=0, typeOfFirstFixedSurface=100, level=lv,
                                    dataDate=int(t0.strftime("%Y%m%d")), dataTime=int(t0.strftime("%H%M")),
                                    bitsPerValue=24)
                        if len(members) > 1:
                            keys.update(productDefinitionTemplateNumber=1, typeOfEnsembleForecast=3,
                                        perturbationNumber=k, numberOfForecastsInEnsemble=len(members))
                        for key, v in keys.items():
                            eccodes.codes_set(h, key, v)
                        eccodes.codes_set(h, "forecastTime", s)  # hours
                        vals = 250.0 + k + 0.25 * i + s / 24 + lv / 1000 + 0.125 * np.arange(lat.size * lon.size)
                        eccodes.codes_set_values(h, vals)
                        eccodes.codes_write(h, fh)
                        eccodes.codes_release(h)
                        expect[(k, t0 + pd.Timedelta(hours=s), lv)] = vals.reshape(lat.size, lon.size)
    return lat, lon, expect


def _require(name):
    from conftest import require_module

    return require_module(name)


def test_grib_through_cfgrib(tmp_path):
    _require("cfgrib")
    inits = [pd.Timestamp("2020-01-01T00"), pd.Timestamp("2020-01-01T12")]
    lat, lon, expect = _write_grib(tmp_path / "ens.grib", members=(0, 1, 2), inits=inits, steps=(0, 6))
    with pytest.raises(E.ERA5FormatError, match=r"ens\.grib.*3 members.*'number'"):
        E.read_era5_temperature(tmp_path / "ens.grib")
    got = E.read_era5_temperature(tmp_path / "ens.grib", member=1)
    times = pd.DatetimeIndex(got["time"].values)
    assert list(times) == [pd.Timestamp(x) for x in ("2020-01-01T00", "2020-01-01T06", "2020-01-01T12", "2020-01-01T18")]
    assert got["level"].values.tolist() == [500, 850]
    np.testing.assert_array_equal(got["lat"].values, lat[::-1])
    for (k, vt, lv), vals in expect.items():
        if k == 1:
            # GRIB simple packing with 24 bits: error <= range / 2**24 (~1e-6 K here)
            np.testing.assert_allclose(got["t"].sel(time=vt, level=lv).values, vals[::-1], rtol=0, atol=1e-4)
    # deterministic GRIB without a suffix is recognised by its GRIB magic; analysis times only
    _write_grib(tmp_path / "det", members=(0,), inits=inits, steps=(0,))
    det = E.read_era5_temperature(tmp_path / "det")
    assert det["t"].shape == (2, 2, lat.size, lon.size)


def test_legacy_expver_merged(tmp_path):
    """Legacy CDS files that reach into ERA5T carry expver (1, 5); each field is in one."""
    ds, enc = _legacy()
    both = xr.concat([ds, ds], dim=xr.DataArray([1, 5], dims="expver", name="expver")).transpose("time", "expver", ...)
    both["t"][:2, 1] = np.nan  # ERA5 for the first two times,
    both["t"][2:, 0] = np.nan  # ERA5T after
    both.to_netcdf(tmp_path / "expver.nc", encoding=enc)
    _write_legacy(tmp_path / "plain.nc")
    xr.testing.assert_identical(E.read_era5_temperature(tmp_path / "expver.nc"), E.read_era5_temperature(tmp_path / "plain.nc"))
    clash = both.copy(deep=True)
    clash["t"][0, 1] = clash["t"][0, 0]
    clash.to_netcdf(tmp_path / "clash.nc", encoding=enc)
    with pytest.raises(E.ERA5FormatError, match=r"clash\.nc.*expver"):
        E.read_era5_temperature(tmp_path / "clash.nc")


def test_grib_without_cfgrib_names_the_extra(tmp_path, monkeypatch):
    import sys

    (tmp_path / "x.grib").write_bytes(b"GRIB" + bytes(100))
    monkeypatch.setitem(sys.modules, "cfgrib", None)  # as if the 'grib' extra were not installed
    with pytest.raises(E.ERA5FormatError, match=r"x\.grib.*GRIB.*jaxguide\[grib\]"):
        E.read_era5_temperature(tmp_path / "x.grib")
