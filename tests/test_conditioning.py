"""Calendar, labels and the SST condition.

Calendar: bit-exact against cBottle's outputs (calendar.npz). SST regrid: against an
independent scipy RegularGridInterpolator to 1e-9 K; time interpolation against
xarray's ``interp(method="linear")`` (what cBottle calls) to 1e-6 K.
"""

from __future__ import annotations

import datetime

import cftime
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.interpolate import RegularGridInterpolator

from conftest import require_module
from jaxguide.model import calendar as calendar_lib
from jaxguide.model import labels as labels_lib
from jaxguide.model import sst as sst_lib
from jaxguide.grid import latlon as G
from jaxguide.grid import healpix as H

NSIDE = 64


# ---------------------------------------------------------------- calendar


def test_calendar_matches_cbottle(fixtures_dir):
    d = np.load(fixtures_dir / "calendar.npz")
    sod, doy = calendar_lib.calendar_inputs(list(d["timestamps"]))
    assert sod.dtype == np.float32 and sod.shape == (12, 1) and doy.shape == (12, 1)
    np.testing.assert_array_equal(sod, d["second_of_day"])
    np.testing.assert_array_equal(doy, d["day_of_year"])
    sod2, doy2 = calendar_lib.calendar_inputs(pd.to_datetime(d["unix_seconds"], unit="s"))
    np.testing.assert_array_equal(doy2, d["day_of_year"])


def test_calendar_values_and_inputs():
    sod, doy = calendar_lib.calendar_inputs(["2000-02-29 12:30", "2100-12-31 23:00", "2000-12-31 23:00"])
    np.testing.assert_array_equal(sod[:, 0], [45000, 82800, 82800])
    np.testing.assert_allclose(doy[:, 0], [59 + 45000 / 86400, 364 + 82800 / 86400, 365 + 82800 / 86400], rtol=1e-7)
    # tz-aware -> UTC; fractional seconds truncated like cbottle's as_cftime
    a = calendar_lib.calendar_inputs(pd.Timestamp("2020-06-01 14:00:00.9", tz="Europe/Paris"))
    b = calendar_lib.calendar_inputs(datetime.datetime(2020, 6, 1, 12, 0, 0))
    c = calendar_lib.calendar_inputs([cftime.DatetimeGregorian(2020, 6, 1, 12)])
    for x in (b, c):
        np.testing.assert_array_equal(a[0], x[0])
        np.testing.assert_array_equal(a[1], x[1])


# ---------------------------------------------------------------- labels


def test_labels():
    era5 = labels_lib.label_one_hot("ERA5")
    assert era5.shape == (1024,) and era5.dtype == np.float32 and era5[1] == 1 and era5.sum() == 1
    assert labels_lib.label_one_hot("icon", 8)[0] == 1
    with pytest.raises(ValueError, match=r"\['icon', 'era5'\]"):
        labels_lib.label_one_hot("merra2")


# ---------------------------------------------------------------- SST


def test_encode_sst():
    sst = np.array([290.0, np.nan, 300.0, 271.0])
    enc = sst_lib.encode_sst(sst)
    np.testing.assert_allclose(enc, (np.array([290, 290, 300, 271]) - 287.6897) / 15.5862, rtol=1e-6)
    assert enc.dtype == np.float32
    enc2 = sst_lib.encode_sst(sst, is_land=np.array([False, True, True, False]))
    np.testing.assert_allclose(enc2[2], (290 - 287.6897) / 15.5862, rtol=1e-6)


def _grid(res=2.0):
    lat = np.arange(-90 + res / 2, 90, res)
    lon = np.arange(res / 2, 360, res)  # first lon > 0, like the AMIP grid (0.5 .. 359.5)
    return lat, lon


def _sst_field(lat, lon, month):
    la, lo = np.meshgrid(np.radians(lat), np.radians(lon), indexing="ij")
    return 28.0 - 30.0 * np.sin(la) ** 2 + 2.0 * np.cos(lo) * np.cos(la) + 0.5 * month


def _write_tosbcs(path, calendar, months=(1, 2, 3), land=None, res=2.0, flip=False):
    lat, lon = _grid(res)
    times = [cftime.datetime(2001, m, 15, 12, calendar=calendar) for m in months]
    units = "days since 1870-01-01"
    tnum = cftime.date2num(times, units, calendar=calendar)
    data = np.stack([_sst_field(lat, lon, m) for m in months]).astype(np.float32)
    if land is not None:
        data[:, land] = np.nan
    ds = xr.Dataset(
        {"tosbcs": (("time", "lat", "lon"), data, {"units": "degC"})},
        coords={
            "time": ("time", tnum, {"units": units, "calendar": calendar}),
            "lat": lat,
            "lon": lon,
        },
    )
    if flip:  # latitude descending, longitude -180..180, named latitude/longitude
        ds = ds.isel(lat=slice(None, None, -1)).roll(lon=lon.size // 2, roll_coords=True)
        ds = ds.assign_coords(lon=np.where(ds["lon"] >= 180, ds["lon"] - 360, ds["lon"]))
        ds = ds.rename(lat="latitude", lon="longitude")
    ds.to_netcdf(path, encoding={"time": {"dtype": "float64"}})
    return ds


@pytest.mark.parametrize("calendar", ["standard", "noleap", "360_day"])
def test_sst_time_interpolation_and_regrid(tmp_path, calendar):
    path = tmp_path / "tosbcs.nc"
    _write_tosbcs(path, calendar)
    ds = sst_lib.read_amip_sst(path)
    t = pd.Timestamp("2001-02-01 06:00")
    field = sst_lib.sst_kelvin_latlon(ds, t)
    units, cal = ds["time"].attrs["units"], calendar
    tn = cftime.date2num([cftime.datetime(2001, m, 15, 12, calendar=cal) for m in (1, 2)], units, calendar=cal)
    q = cftime.date2num(cftime.datetime(2001, 2, 1, 6, calendar=cal), units, calendar=cal)
    w = (q - tn[0]) / (tn[1] - tn[0])
    lat, lon = _grid()
    want = (1 - w) * _sst_field(lat, lon, 1).astype(np.float32) + w * _sst_field(lat, lon, 2).astype(np.float32) + 273.15
    np.testing.assert_allclose(field, want, rtol=0, atol=1e-9)
    if calendar == "standard":  # what cBottle calls
        with xr.open_dataset(path) as raw:
            ref = raw["tosbcs"].interp(time=t, method="linear").values + 273.15
        np.testing.assert_allclose(field, ref, rtol=0, atol=1e-6)

    # regrid: independent periodic bilinear reference at pixel centres
    hp_k = sst_lib.sst_kelvin_at(ds, t)
    plon, plat = H.lonlat(NSIDE, "net")
    lon_ext = np.concatenate([lon[-1:] - 360, lon, lon[:1] + 360])
    f_ext = np.concatenate([field[:, -1:], field, field[:, :1]], axis=1)
    inside = np.abs(plat) < lat[-1]
    ref = RegularGridInterpolator((lat, lon_ext), f_ext)(np.stack([plat[inside], plon[inside]], -1))
    np.testing.assert_allclose(hp_k[inside], ref, rtol=0, atol=1e-9)
    assert np.all(np.isnan(hp_k[~inside]))  # poleward of the last grid row: NaN -> 290 K

    cond = sst_lib.sst_at(ds, t)
    assert cond.shape == (1, 1, 1, 12 * NSIDE**2) and cond.dtype == np.float32
    np.testing.assert_allclose(cond[0, 0, 0, ~inside], (290 - 287.6897) / 15.5862, rtol=1e-6)
    np.testing.assert_allclose(cond[0, 0, 0, inside], (hp_k[inside] - 287.6897) / 15.5862, rtol=1e-5)
    warm = sst_lib.sst_at(ds, t, offset=2.0)
    np.testing.assert_allclose(warm[0, 0, 0, inside] - cond[0, 0, 0, inside], 2.0 / 15.5862, atol=1e-5)
    np.testing.assert_array_equal(warm[0, 0, 0, ~inside], cond[0, 0, 0, ~inside])


def test_sst_exact_month_and_out_of_range(tmp_path):
    path = tmp_path / "tosbcs.nc"
    _write_tosbcs(path, "standard")
    ds = sst_lib.read_amip_sst(path)
    lat, lon = _grid()
    np.testing.assert_allclose(
        sst_lib.sst_kelvin_latlon(ds, "2001-03-15 12:00"), _sst_field(lat, lon, 3).astype(np.float32) + 273.15, atol=1e-9
    )
    with pytest.raises(sst_lib.SSTTimeError, match="outside the SST data"):
        sst_lib.sst_at(ds, "2001-03-15 12:00:01")
    with pytest.raises(sst_lib.SSTTimeError, match="outside"):
        sst_lib.sst_at(ds, "1999-01-01")


def test_sst_grid_orientation_does_not_matter(tmp_path):
    _write_tosbcs(tmp_path / "a.nc", "standard")
    _write_tosbcs(tmp_path / "b.nc", "standard", flip=True)
    a, b = sst_lib.read_amip_sst(tmp_path / "a.nc"), sst_lib.read_amip_sst(tmp_path / "b.nc")
    with xr.open_dataset(tmp_path / "b.nc") as raw:
        assert raw["latitude"][0] > 0 and raw["longitude"].min() < 0
    np.testing.assert_allclose(sst_lib.sst_kelvin_at(b, "2001-02-10"), sst_lib.sst_kelvin_at(a, "2001-02-10"), rtol=0, atol=1e-9)


def test_sst_360_day_invalid_date(tmp_path):
    path = tmp_path / "tosbcs.nc"
    _write_tosbcs(path, "360_day")
    ds = sst_lib.read_amip_sst(path)
    sst_lib.sst_at(ds, cftime.datetime(2001, 2, 30, calendar="360_day"))  # exists in 360_day
    with pytest.raises(sst_lib.SSTTimeError, match="360_day"):
        sst_lib.sst_at(ds, "2001-01-31")


def test_missing_variable(tmp_path):
    path = tmp_path / "x.nc"
    xr.Dataset({"tos": (("time", "lat", "lon"), np.zeros((1, 2, 2)))}).to_netcdf(path)
    with pytest.raises(ValueError, match=r"SST file .*x\.nc.* no variable 'tosbcs'"):
        sst_lib.read_amip_sst(path)
    # not NetCDF, a directory, missing: each named, with the option
    text = tmp_path / "sst.csv"
    text.write_text("time,lat,lon,tosbcs\n")
    with pytest.raises(ValueError, match=r"SST file .*sst\.csv.*not a NetCDF file"):
        sst_lib.read_amip_sst(text)
    with pytest.raises(IsADirectoryError, match=r"SST file .*is a directory"):
        sst_lib.read_amip_sst(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no such SST file.*nope\.nc"):
        sst_lib.read_amip_sst(tmp_path / "nope.nc")


# ---------------------------------------------------------------- real land mask


def _globe():
    return require_module("global_land_mask.globe")


@pytest.fixture(scope="module")
def land_1deg():
    """Real GLOBE 1 km land mask (package global-land-mask) at 1-degree cell centres."""
    globe = _globe()
    lat, lon = _grid(1.0)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    return globe.is_land(la, np.where(lo >= 180, lo - 360, lo))


def test_real_land_mask_sst_condition_and_land_only(tmp_path, land_1deg):
    from jaxguide import observations as O
    from jaxguide.observations import strategies as S

    assert 0.25 < land_1deg.mean() < 0.40  # land share of 1-degree cells (area-unweighted)
    path = tmp_path / "tosbcs.nc"
    _write_tosbcs(path, "standard", land=land_1deg, res=1.0)
    ds = sst_lib.read_amip_sst(path)
    sst = sst_lib.sst_kelvin_at(ds, "2001-02-01")
    land = sst_lib.land_mask_from_sst(sst)
    area_share = land.mean()  # HEALPix pixels are equal-area
    assert 0.27 < area_share < 0.40, area_share
    plon, plat = H.lonlat(NSIDE, "net")

    def pixel(lat, lon):
        return G.ang2pix(NSIDE, lon, lat, "net")

    assert land[pixel(23.0, 10.0)] and land[pixel(45.0, 90.0)] and land[pixel(-25.0, 135.0)]  # Sahara, Asia, Australia
    assert not land[pixel(0.0, 220.0)] and not land[pixel(-40.0, 330.0)]  # Pacific, Atlantic
    cond = sst_lib.sst_at(ds, "2001-02-01")
    np.testing.assert_allclose(cond[0, 0, 0, land], (290 - 287.6897) / 15.5862, rtol=1e-6)
    assert np.all(cond[0, 0, 0, ~land] != np.float32((290 - 287.6897) / 15.5862))

    # land_only: every observation lies in a land pixel of the condition
    truth = np.stack([280.0 + 10 * np.sin(np.radians(plat)), 250.0 + 0 * plat])[:, None, :]
    obs, held = S.sample_observations(
        truth, ["tas", "T850"], ["tas"], time="2001-02-01", strategy="land_only",
        count=400, rng=np.random.default_rng(0), sigma=0.5, sst=sst, holdout_fraction=0.25,
    )
    assert len(obs) == 300 and len(held) == 100
    both = pd.concat([obs, held])
    assert land[pixel(both["lat"].to_numpy(), both["lon"].to_numpy())].all()
    O.validate_observations(both, ["tas", "T850"])
