"""The synthetic SST file: the AMIP tosbcs layout the conditioning reader needs, marked
synthetic, covering the requested times (checked with netCDF4 directly and through
``sst.read_amip_sst`` / ``sst_at``)."""

from __future__ import annotations

import netCDF4
import numpy as np
import pytest
from typer.testing import CliRunner

from jaxguide.model import sst
from jaxguide.cli import app


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
    ds = sst.read_amip_sst(path)
    for t in ("2020-01-05T00:00", "2020-03-20T18:00"):
        cond = sst.sst_at(ds, t)
        assert cond.shape == (1, 1, 1, 12 * 64**2) and np.isfinite(cond).all()
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
