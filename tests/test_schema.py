"""The analysis file read back by an independent CF reader (cfdm, the CF data model's
reference implementation): CF-1.13 HEALPix grid mapping, units, vertical coordinates,
the realization axis and cell methods. None of this uses jaxguide's own ``check_cf``,
which shares the writer's tables."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import skip_or_fail
from jaxguide.grid import latlon as grid_sampling, healpix
from jaxguide import io
from jaxguide.assimilation import dataset as schema

NSIDE = 4
NPIX = 12 * NSIDE**2
CHANNELS = ["T850", "tas", "uas", "pres_msl"]
CENTER = [281.13, 286.09, 0.0, 101160.2]
SCALE = [12.34, 15.61, 5.0, 1109.4]
PROV = {"method": "mmps", "sigma_y": {"T850": 1.0, "tas": 0.5}, "guidance_scale": 1.0, "steps": 4, "seed": 0,
        "model_sha256": "0" * 64, "n_obs": 3, "command": "jaxguide assimilate --test"}


def require_cfdm():
    """cfdm (pip) needs the UDUNITS-2 C library (Debian/Ubuntu: apt-get install libudunits2-0)."""
    try:
        import cfdm
    except (ImportError, FileNotFoundError) as e:  # cfunits raises FileNotFoundError without UDUNITS-2
        skip_or_fail(f"cfdm unavailable ({e}); pip install cfdm==1.13.3.0 and apt-get install libudunits2-0")
    return cfdm


def _write(tmp_path, **kw):
    x = np.random.default_rng(0).normal(size=(3, len(CHANNELS), 1, NPIX)).astype(np.float32)
    ds = schema.analysis_to_dataset(x, channels=CHANNELS, center=CENTER, scale=SCALE, times=["2020-01-20T06:00"],
                                    provenance=PROV, prior=x[:2] + 0.1, **kw)
    return io.write_dataset(ds, tmp_path / "a.nc"), x


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    cfdm = require_cfdm()
    path, x = _write(tmp_path_factory.mktemp("cf"))
    return cfdm, {f.nc_get_variable(): f for f in cfdm.read(str(path))}, x


def test_cfdm_reads_conventions_grid_mapping_and_units(fields):
    cfdm, by_name, x = fields
    assert set(by_name) == {*CHANNELS, *(c + "_prior_mean" for c in CHANNELS)}
    f = by_name["T850"]
    assert f.get_property("Conventions") == "CF-1.13"
    assert f.get_property("standard_name") == "air_temperature" and f.get_property("units") == "K"
    assert by_name["pres_msl"].get_property("units") == "Pa" and by_name["uas"].get_property("units") == "m s-1"
    # the HEALPix grid mapping (CF-1.13) is attached as a coordinate reference
    refs = f.coordinate_references().values()
    gm = [r.coordinate_conversion.get_parameter("grid_mapping_name") for r in refs]
    assert gm == ["healpix"]
    conv = next(iter(refs)).coordinate_conversion
    assert int(conv.get_parameter("refinement_level")) == 2 and conv.get_parameter("indexing_scheme") == "nested"
    # the cell index is the domain axis, lat/lon are auxiliary coordinates in degrees
    idx = f.dimension_coordinate("healpix_index")
    assert idx.data.size == NPIX and np.array_equal(idx.data.array, np.arange(NPIX))
    lat = f.auxiliary_coordinate("latitude")
    assert lat.get_property("units") == "degrees_north"
    lon_ref, lat_ref = healpix.lonlat(NSIDE, "nest")
    np.testing.assert_allclose(lat.data.array, lat_ref)
    # data: physical units, NEST order
    nest_to_net = healpix.permutation(NSIDE, "net", "nest")
    np.testing.assert_allclose(f.data.array[:, 0, :], x[:, 0, 0, nest_to_net] * SCALE[0] + CENTER[0], rtol=1e-6)


def test_cfdm_vertical_coordinates_realization_and_cell_methods(fields):
    cfdm, by_name, _ = fields
    plev = by_name["T850"].dimension_coordinate("air_pressure")
    assert plev.get_property("units") == "Pa" and plev.data.array.tolist() == [85000.0]
    h2 = by_name["tas"].dimension_coordinate("height")
    h10 = by_name["uas"].dimension_coordinate("height")
    assert h2.get_property("units") == "m" and h2.data.array.tolist() == [2.0] and h10.data.array.tolist() == [10.0]
    assert not by_name["pres_msl"].dimension_coordinates(filter_by_property={"standard_name": "height"})
    assert not by_name["pres_msl"].dimension_coordinates(filter_by_property={"standard_name": "air_pressure"})
    member = by_name["T850"].dimension_coordinate("realization")
    assert member.data.array.tolist() == [0, 1, 2]
    cms = list(by_name["T850_prior_mean"].cell_methods().values())
    assert [(cm.get_axes(), cm.get_method()) for cm in cms] == [(("realization",), "mean")]
    assert not by_name["T850"].cell_methods()


def test_cfdm_finds_no_compliance_problems(fields, tmp_path):
    cfdm, by_name, _ = fields
    for name, f in by_name.items():
        report = f.dataset_compliance()
        assert report.pop("CF version") == "1.13" and not report, (name, report)
    # the check can fail: a grid_mapping that names no variable is reported
    path, _ = _write(tmp_path)
    import netCDF4

    with netCDF4.Dataset(path, "a") as nc:
        nc["T850"].grid_mapping = "nowhere"
    bad = {f.nc_get_variable(): f for f in cfdm.read(str(path))}["T850"].dataset_compliance()
    bad.pop("CF version")
    assert "/T850" in bad and "grid_mapping" in str(bad)


def test_xdggs_cell_id_attributes_and_sigma_y_is_a_string(tmp_path):
    path, _ = _write(tmp_path)
    ds = io.read_analysis(path)
    # what xdggs.decode(ds) reads: its default cell-id variable, whose attributes must be
    # exactly the grid's (xdggs passes all of them to HealpixInfo); checked by hand with
    # xdggs 0.6.0 (decode() works, cell centres = the file's lat/lon to 2e-13 deg)
    a = ds["cell_ids"].attrs
    assert set(a) == {"grid_name", "level", "indexing_scheme"}
    assert (a["grid_name"], int(a["level"]), a["indexing_scheme"]) == ("healpix", 2, "nested")
    assert ds["cell_ids"].dims == ("pixel",) and np.array_equal(ds["cell_ids"].values, np.arange(NPIX))
    assert ds["pixel"].attrs["standard_name"] == "healpix_index"
    assert ds.attrs["sigma_y"] == "T850=1, tas=0.5"
    assert schema.describe_sigma_y(None) == "observation table" and schema.describe_sigma_y(0.7) == "0.7"
    assert schema.check_cf(ds) == []


def test_regridded_file_has_vertical_coordinates(tmp_path):
    cfdm = require_cfdm()
    path, _ = _write(tmp_path, regrid_latlon=grid_sampling.LatLonGrid(6, 12))
    by_name = {f.nc_get_variable(): f for f in cfdm.read(str(path))}
    f = by_name["T850"]
    assert f.dimension_coordinate("air_pressure").data.array.tolist() == [85000.0]
    assert f.dimension_coordinate("latitude").get_property("units") == "degrees_north"
    assert not f.coordinate_references()
