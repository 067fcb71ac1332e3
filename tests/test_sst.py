"""The synthetic SST file: the AMIP tosbcs layout the conditioning reader needs, marked
synthetic, covering the requested times (checked with netCDF4 directly and through
``conditioning.read_amip_sst`` / ``sst_at``)."""

from __future__ import annotations

import netCDF4
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner


from jaxguide.grid import healpix
from jaxguide.model import sst
from jaxguide.cli import app


def _field(lat_deg, lon_deg, month):
    """The synthetic climatology of jaxguide/model/sst.py written out independently (deg C):
    28 - 30 sin^2(phi) + 0.5 cos(2 lon) cos^2(phi), phi = lat - 5 cos(2 pi (month - 8) / 12)
    degrees (warmest 5 N in August, 5 S in February), floored at -1.8."""
    lat, lon = np.broadcast_arrays(np.asarray(lat_deg, np.float64), np.asarray(lon_deg, np.float64))
    phi = np.deg2rad(lat - 5.0 * np.cos(2 * np.pi * (month - 8) / 12))
    return np.maximum(28.0 - 30.0 * np.sin(phi) ** 2 + 0.5 * np.cos(2 * np.deg2rad(lon)) * np.cos(phi) ** 2, -1.8)


def _bilinear(grid, lat, lon, plat, plon):
    """Bilinear interpolation of grid (nlat, nlon) on ascending cell-centre lat and lon
    (periodic in lon) at points (plat, plon) inside the lat range."""
    dlat, dlon = lat[1] - lat[0], lon[1] - lon[0]
    j = np.clip(np.floor((plat - lat[0]) / dlat).astype(int), 0, lat.size - 2)
    t = (plat - lat[j]) / dlat
    u = (plon - lon[0]) / dlon
    i = np.floor(u).astype(int)
    s = u - i
    i0, i1 = i % lon.size, (i + 1) % lon.size
    return ((1 - t) * ((1 - s) * grid[j, i0] + s * grid[j, i1]) + t * ((1 - s) * grid[j + 1, i0] + s * grid[j + 1, i1]))


def test_synthetic_sst_layout_and_metadata(tmp_path):
    path = sst.write_synthetic_sst(tmp_path / "tosbcs.nc", "2020-01-05T00:00", "2020-03-20", resolution_deg=2.0)
    with netCDF4.Dataset(path) as nc:
        v = nc["tosbcs"]
        assert v.dimensions == ("time", "lat", "lon") and v.units == "degC" and v.dtype == np.float32
        assert nc["time"].units == "days since 1870-01-01" and nc["time"].calendar == "standard"
        assert "SYNTHETIC" in nc.title and "synthetic" in nc.comment.lower() and nc.synthetic == 1
        assert nc["lat"].shape == (90,) and nc["lon"].shape == (180,)
        times = netCDF4.num2date(nc["time"][:], nc["time"].units, nc["time"].calendar)
        # mid-month values bracketing the first and last time
        assert [(t.year, t.month, t.day) for t in times] == [(2019, 12, 15), (2020, 1, 15), (2020, 2, 15),
                                                             (2020, 3, 15), (2020, 4, 15)]
        data = v[:]
        assert -1.9 < data.min() and data.max() < 29.0
        # 2-degree cell centres, lon 0..360
        lat, lon = np.asarray(nc["lat"][:]), np.asarray(nc["lon"][:])
        np.testing.assert_allclose(lat, -89.0 + 2.0 * np.arange(90), rtol=0, atol=1e-12)
        np.testing.assert_allclose(lon, 1.0 + 2.0 * np.arange(180), rtol=0, atol=1e-12)
        data = np.asarray(data)
    # every month is the documented field (float32 storage)
    for k, t in enumerate(times):
        np.testing.assert_array_equal(data[k], _field(lat[:, None], lon[None, :], t.month).astype(np.float32), err_msg=str(t))
    # what the formula means: the sea-ice floor at the poles, the warmest latitude follows the sun
    # (floor where |lat - shift| >= ~85.3 deg, shift <= 5 deg)
    assert np.all(data.min(axis=(1, 2)) == np.float32(-1.8)) and np.all(data[:, np.abs(lat) < 80] > -1.8)
    zonal = data.mean(axis=2)
    # warmest latitude Dec..Apr: 5 cos(2 pi (month - 8) / 12) = -2.5, -4.33, -5, -4.33, -2.5 deg,
    # i.e. the cell centres -3, -5, -5, -5, -3 (the wave 2 averages out over longitude)
    assert list(lat[np.argmax(zonal, axis=1)]) == [-3.0, -5.0, -5.0, -5.0, -3.0]

    ds = sst.read_amip_sst(path)
    for t in ("2020-01-05T00:00", "2020-03-20T18:00"):
        cond = sst.sst_at(ds, t)
        assert cond.shape == (1, 1, 1, 12 * 64**2) and np.isfinite(cond).all()
    # the condition at 2020-02-01: 17/31 of the way from the Jan 15 to the Feb 15 field, bilinear
    # at the network pixels' centres, in K, encoded (sst_K - 287.6897) / 15.5862
    plon, plat = healpix.lonlat(64, "net")
    inside = np.abs(plat) <= lat[-1]  # poleward of the outermost grid latitude (89 deg) there is no stencil
    w = 17.0 / 31.0
    field_k = (1 - w) * data[1].astype(np.float64) + w * data[2].astype(np.float64) + 273.15
    want = (_bilinear(field_k, lat, lon, plat[inside], plon[inside]) - 287.6897) / 15.5862
    got = sst.sst_at(ds, "2020-02-01T00:00")[0, 0, 0]
    np.testing.assert_allclose(got[inside], want, rtol=0, atol=2e-6)  # float32 output (round-off 6e-8 at |x| ~ 1)
    assert inside.sum() > 49152 - 100
    # ... and close to the analytic field at the pixel centres. Bilinear error of the 2-degree grid:
    # h^2 / 8 x max d2f/dlat2 = 4 / 8 x 60 (pi / 180)^2 = 0.009 K where the field is smooth (measured
    # 0.0096 K), more near the -1.8 C floor's kink at |lat| ~ 80-89 (measured 0.022 K)
    exact = (1 - w) * _field(plat, plon, 1) + w * _field(plat, plon, 2) + 273.15
    err = np.abs(got * 15.5862 + 287.6897 - exact)
    assert err[inside].max() <= 0.05 and err[np.abs(plat) < 75].max() <= 0.015, (err[inside].max(), err[np.abs(plat) < 75].max())
    # at a mid-month time the field itself
    jan = sst.sst_at(ds, "2020-01-15T00:00")[0, 0, 0]
    np.testing.assert_allclose(jan[inside], (_bilinear(data[1] + 273.15, lat, lon, plat[inside], plon[inside]) - 287.6897)
                               / 15.5862, rtol=0, atol=2e-6)
    with pytest.raises(sst.SSTTimeError):
        sst.sst_at(ds, "2020-05-01")


def test_synthetic_sst_command(tmp_path):
    out = tmp_path / "s.nc"
    runner = CliRunner()
    res = runner.invoke(app, ["synthetic-sst", str(out), "--start", "2020-06-01", "--end", "2020-06-02"])
    assert res.exit_code == 0, res.output
    assert "synthetic" in res.output and out.exists()
    res = runner.invoke(app, ["synthetic-sst", str(out), "--start", "2020-06-01", "--end", "2020-06-02"])
    assert res.exit_code == 2 and "exists" in res.output
    res = runner.invoke(app, ["synthetic-sst", str(tmp_path / "t.nc"), "--start", "06/01/2020", "--end", "2020-06-02"])
    assert res.exit_code == 2 and "ISO 8601" in res.output


def write_sst_steps(path, hours, fields, start="2020-01-01 00:00:00", units="degC"):
    """A tosbcs NetCDF file on a 10-degree grid with time steps ``hours`` after ``start``
    (the reader accepts any steps, not only monthly), ``fields``: (T, 18, 36) deg C."""
    with netCDF4.Dataset(path, "w") as nc:
        nc.createDimension("time", None)
        nc.createDimension("lat", 18)
        nc.createDimension("lon", 36)
        t = nc.createVariable("time", "f8", ("time",))
        t.units, t.calendar = f"hours since {start}", "standard"
        t[:] = np.asarray(hours, np.float64)
        nc.createVariable("lat", "f8", ("lat",))[:] = -85.0 + 10.0 * np.arange(18)
        nc.createVariable("lon", "f8", ("lon",))[:] = 5.0 + 10.0 * np.arange(36)
        v = nc.createVariable("tosbcs", "f4", ("time", "lat", "lon"))
        v.set_auto_mask(False)  # write NaN / Inf / 1e20 as they are (no fill-value masking)
        v.units = units
        v[:] = np.asarray(fields, np.float32)
    return path


def test_sst_values_that_cannot_be_sst_are_refused(tmp_path):
    """NaN is land (filled with 290 K); Inf, an unmasked fill value, a wrong unit or a step
    with no ocean at all are refused, naming the step of the file and the time asked; a
    bad step is caught even where its interpolation weight is 0 (0 x Inf would be NaN,
    i.e. silently land)."""
    good = np.full((18, 36), 15.0)
    good[:2] = np.nan  # land / ice: fine

    def steps(bad_step: int, where, value):
        fields = np.stack([good, good])
        fields[(bad_step, *where)] = value
        return sst.read_amip_sst(write_sst_steps(tmp_path / f"s{value}{bad_step}.nc", [0, 6], fields))

    assert np.isfinite(sst.sst_at(steps(0, (slice(None),), 15.0), "2020-01-01T03:00")).all()  # land -> 290 K
    with pytest.raises(sst.SSTValueError, match=r"1 infinite value\(s\) at 2020-01-01 06:00:00 \(used for 2020-01-01T00"):
        sst.sst_at(steps(1, (5, 5), np.inf), "2020-01-01T00:00")  # weight 0 on the Inf step
    with pytest.raises(sst.SSTValueError, match=r"1 value\(s\) outside -5\.\.50 deg C at 2020-01-01 00:00.*1e\+20"):
        sst.sst_at(steps(0, (6, 6), 1e20), "2020-01-01T03:00")  # a fill value written without _FillValue
    with pytest.raises(sst.SSTValueError, match="no finite value at 2020-01-01 06:00:00.*all NaN"):
        sst.sst_at(steps(1, (slice(None),), np.nan), "2020-01-01T03:00")
    ds = steps(0, (0, 0), np.nan)
    kelvin_as_degc = sst.read_amip_sst(write_sst_steps(tmp_path / "k.nc", [0, 6], np.full((2, 18, 36), 288.0)))
    with pytest.raises(sst.SSTValueError, match="outside -5..50 deg C.*units other than"):
        sst.sst_at(kelvin_as_degc, "2020-01-01T03:00")
    with pytest.raises(sst.SSTTimeError, match=r"2 times are outside the SST data \(2020-01-01 00:00:00 \.\. "
                                               r"2020-01-01 06:00:00, SST file .*snan0\.nc'\): 2019-12-31 23:00:00, 2020-01-03"):
        sst.check_sst_covers(ds, [pd.Timestamp("2019-12-31T23:00"), pd.Timestamp("2020-01-01T06:00"),
                                  pd.Timestamp("2020-01-03")])
