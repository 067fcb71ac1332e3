"""Observation table I/O, validation, normalisation and the operator A.

Tolerances: interpolation against healpy 1e-6 (float32 weights), normalisation 1e-12.
"""

from __future__ import annotations

import functools

import logging

import healpy as hp
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from jaxguide.grid import latlon as G
from jaxguide.grid import healpix as H
from jaxguide import observations as O

CHANNELS = ["T850", "T500", "T300", "tas", "pres_msl", "rlut"]
CENTER = [281.1327209472656, 258.4976501464844, 233.303466796875, 286.0905456542969, 101160.1953125, 243.5808563232422]
SCALE = [12.338329315185547, 10.93696403503418, 9.404952049255371, 15.605487823486328, 1109.4359130859375, 41.99623489379883]
NSIDE = 64
NPIX = 12 * NSIDE**2


def _table(n=6):
    return O.make_table(
        time=pd.date_range("2020-01-01", periods=n, freq="6h"),
        lat=np.linspace(-60, 60, n),
        lon=np.linspace(-170, 170, n),
        variable=(["T850", "tas", "pres_msl"] * n)[:n],
        value=np.linspace(250, 300, n),
        sigma=1.0,
    )


# ---------------------------------------------------------------- I/O


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".nc"])
def test_roundtrip(tmp_path, suffix):
    table = _table()
    table.loc[0, "time"] = pd.Timestamp("2020-01-01 00:00:00.5")
    path = O.write_observations(table, tmp_path / f"obs{suffix}")
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    back = O.read_observations(path)
    pd.testing.assert_frame_equal(back[list(O.COLUMNS)], O.coerce_table(table)[list(O.COLUMNS)])


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "obs.csv"
    O.write_observations(_table(), path)
    before = path.read_bytes()
    with pytest.raises(O.MissingColumnsError):
        O.write_observations(_table().drop(columns="sigma"), path)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="unknown observation file type"):
        O.write_observations(_table(), tmp_path / "obs.xlsx")


def test_timezone_aware_times_become_utc():
    t = pd.Timestamp("2020-01-01 12:00", tz="Europe/Paris")
    table = O.make_table([t], [0.0], [0.0], ["tas"], [280.0], [1.0])
    assert table["time"][0] == pd.Timestamp("2020-01-01 11:00")


# ---------------------------------------------------------------- validation


def test_valid_table_passes_and_lon_normalised():
    clean, counts = O.validate_observations(_table(), CHANNELS)
    assert counts == {}
    assert clean["lon"].between(0, 360, inclusive="left").all()
    np.testing.assert_allclose(clean["lon"][0], 190.0)


def _bad_table():
    t = _table(10)
    t.loc[0, "value"] = np.nan
    t.loc[1, "sigma"] = np.nan
    t.loc[2, "lat"] = 95.0
    t.loc[3, "sigma"] = 0.0
    t.loc[4, "sigma"] = -1.0
    t.loc[5, "variable"] = "T999"
    t.loc[6, "lon"] = 400.0
    t.loc[7, "lon"] = -10.0
    t = pd.concat([t, t.iloc[[9]]], ignore_index=True)  # duplicate of row 9
    dup = t.iloc[[7]].copy()
    dup["lon"] = 350.0  # same point written in 0..360 convention
    return pd.concat([t, dup], ignore_index=True)


def test_bad_rows_raise_with_counts():
    with pytest.raises(O.BadObservationsError) as e:
        O.validate_observations(_bad_table(), CHANNELS)
    assert e.value.counts == {
        "unknown_variable": 1,
        "bad_lat": 1,
        "bad_lon": 1,
        "nan_value": 1,
        "bad_sigma": 3,
        "duplicate": 2,
    }
    assert "T850" in str(e.value) and "T999" in str(e.value)


def test_drop_bad_reports_and_logs(caplog):
    with caplog.at_level(logging.WARNING, logger="jaxguide.observations.validation"):
        clean, counts = O.validate_observations(_bad_table(), CHANNELS, drop_bad=True)
    assert sum(counts.values()) == 9
    assert len(clean) == 12 - 9
    assert "dropped 9 of 12" in caplog.text
    assert list(clean.index) == [0, 1, 2]


def test_unknown_variable_lists_valid_names():
    t = _table()
    t.loc[2, "variable"] = "Z500"
    with pytest.raises(O.UnknownVariableError, match=r"Z500.*pres_msl"):
        O.validate_observations(t, CHANNELS)


def test_missing_columns_and_empty():
    with pytest.raises(O.MissingColumnsError, match="sigma"):
        O.validate_observations(_table().drop(columns="sigma"), CHANNELS)
    with pytest.raises(O.EmptyTableError):
        O.validate_observations(_table().iloc[:0], CHANNELS)
    t = _table(2)
    t["sigma"] = 0.0
    with pytest.raises(O.EmptyTableError):
        O.validate_observations(t, CHANNELS, drop_bad=True)


def test_times_outside_data():
    t = _table(4)  # 00, 06, 12, 18 h
    with pytest.raises(O.BadObservationsError) as e:
        O.validate_observations(t, CHANNELS, times=pd.date_range("2020-01-01", periods=2, freq="6h"))
    assert e.value.counts == {"time_outside_data": 2}
    clean, counts = O.validate_observations(
        t, CHANNELS, time_window=("2020-01-01 05:00", "2020-01-01 12:00"), drop_bad=True
    )
    assert counts == {"time_outside_data": 2} and len(clean) == 2
    t.loc[0, "time"] = pd.NaT
    with pytest.raises(O.BadObservationsError, match="bad_time"):
        O.validate_observations(t, CHANNELS)
    t = _table(3).astype({"time": object})
    t.loc[0, "time"] = ""
    t.loc[1, "time"] = "2020-01-01T06:00:00+01:00"  # ISO with an offset, among ISO without
    t.loc[2, "time"] = "2020-01-01T12:00Z"
    clean, counts = O.validate_observations(t, CHANNELS, drop_bad=True)
    assert counts == {"bad_time": 1} and clean["time"].tolist() == [pd.Timestamp("2020-01-01 05:00"),
                                                                    pd.Timestamp("2020-01-01 12:00")]


def test_window_miss_names_the_window_and_how_to_widen_it():
    t = _table(4)  # 00, 06, 12, 18 h
    with pytest.raises(O.BadObservationsError) as e:
        O.validate_observations(t, CHANNELS, time_window=(pd.Timestamp("2020-01-02 09:00"), pd.Timestamp("2020-01-02 15:00")))
    msg = str(e.value)
    assert "2020-01-02T09:00 to 2020-01-02T15:00" in msg and "+- 3 h" in msg and "--window-hours" in msg
    assert "2020-01-01T00:00 to 2020-01-01T18:00" in msg  # where the rejected times are
    with pytest.raises(O.EmptyTableError, match="window_hours"):
        O.validate_observations(t, CHANNELS, time_window=(pd.Timestamp("2020-01-02 09:00"), pd.Timestamp("2020-01-02 15:00")),
                                drop_bad=True)


@pytest.mark.parametrize("text,expected", [
    ("2020-01-20T06:00", "2020-01-20 06:00"), ("2020-01-20T06:00:00Z", "2020-01-20 06:00"),
    ("2020-01-20T08:00+02:00", "2020-01-20 06:00"), ("2020-01-20 06:00", "2020-01-20 06:00"),
    ("2020-01-20", "2020-01-20 00:00"), ("2020-01-20T06:00:00.500", "2020-01-20 06:00:00.5"),
])
def test_parse_time_accepts_iso(text, expected):
    assert O.parse_time(text) == pd.Timestamp(expected)


@pytest.mark.parametrize("text", ["05/01/2020", "01.05.2020", "2020-1-5", "20200105", "Jan 5 2020", "2020-13-01T00:00"])
def test_non_iso_times_are_named_errors(text, tmp_path):
    with pytest.raises(O.TimeFormatError, match=r"--time .*expected YYYY-MM-DD.*ISO 8601"):
        O.parse_time(text, "--time")
    # in a table too, whatever drop_bad says: a date format is not a bad row to drop silently
    path = tmp_path / "obs.csv"
    path.write_text(f"time,lat,lon,variable,value,sigma\n2020-01-05T00:00,0,0,T850,280,1\n{text},0,10,T850,280,1\n")
    if text == "2020-13-01T00:00":  # ISO-shaped but no such month: unreadable rows stay bad_time
        with pytest.raises(O.BadObservationsError, match="bad_time"):
            O.validate_observations(O.read_observations(path), CHANNELS)
        return
    with pytest.raises(O.TimeFormatError, match=rf"1 of 2 observation times are not ISO 8601 \(first: '{text}'\)"):
        O.read_observations(path)
    with pytest.raises(O.TimeFormatError):
        O.make_table([text], [0.0], [0.0], ["T850"], [280.0], [1.0])


def test_implausible_values_name_variable_count_and_unit_mistake():
    base = dict(time="2020-01-01", lat=[0.0, 10.0, 20.0, 30.0], lon=0.0, sigma=1.0)
    ok = O.make_table(**base, variable=["T850", "T850", "tas", "pres_msl"], value=[250.0, 300.0, 310.0, 99000.0])
    assert O.check_plausible(ok, CHANNELS, CENTER, SCALE) == {}
    celsius = ok.assign(value=[-23.0, 27.0, 310.0, 99000.0])  # two T850 in deg C
    with pytest.raises(O.ImplausibleObservationsError) as e:
        O.check_plausible(celsius, CHANNELS, CENTER, SCALE)
    assert e.value.counts == {"T850": 2}
    assert "T850: 2 of 2 values" in str(e.value) and "degrees Celsius" in str(e.value) and "--allow-implausible" in str(e.value)
    hpa = ok.assign(value=[250.0, 300.0, 310.0, 990.0])
    with pytest.raises(O.ImplausibleObservationsError, match=r"pres_msl: 1 of 1 .*look like hPa"):
        O.check_plausible(hpa, CHANNELS, CENTER, SCALE)
    # just inside / outside 8 scales of T850
    edge = O.make_table(time="2020-01-01", lat=[0.0, 1.0], lon=0.0, sigma=1.0, variable="T850",
                        value=[CENTER[0] + 7.99 * SCALE[0], CENTER[0] - 8.01 * SCALE[0]])
    with pytest.raises(O.ImplausibleObservationsError) as e:
        O.check_plausible(edge, CHANNELS, CENTER, SCALE)
    assert e.value.counts == {"T850": 1} and "degrees Celsius" not in str(e.value)  # no unit fix explains it


def test_normalise():
    t = _table()
    n = O.normalise(t, CHANNELS, CENTER, SCALE)
    idx = O.channel_index(t["variable"], CHANNELS)
    np.testing.assert_allclose(n["value_n"], (t["value"] - np.array(CENTER)[idx]) / np.array(SCALE)[idx], rtol=1e-12)
    np.testing.assert_allclose(n["sigma_n"], 1.0 / np.array(SCALE)[idx], rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        O.normalise(t, CHANNELS, CENTER[:3], SCALE)


# ---------------------------------------------------------------- operator


def _random_points(rng, n):
    lon = rng.uniform(-180, 360, n)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    # poles and the lon wrap-around
    lon = np.concatenate([lon, [0.0, 123.0, 359.99, -0.01, 180.0, -180.0]])
    lat = np.concatenate([lat, [90.0, -90.0, 10.0, 10.0, 89.9, -89.9]])
    return lon, lat


def test_bilinear_operator_matches_healpy():
    rng = np.random.default_rng(0)
    x_ring = rng.normal(size=(len(CHANNELS), 1, NPIX)).astype(np.float32)
    x_net = H.reorder(x_ring, "ring", "net")
    lon, lat = _random_points(rng, 3000)
    var = rng.choice(CHANNELS, lon.size)
    A = O.build_operator({"lat": lat, "lon": lon, "variable": var}, CHANNELS)
    got = np.asarray(A(jnp.asarray(x_net)))
    ch = O.channel_index(var, CHANNELS)
    want = np.array([hp.get_interp_val(x_ring[c, 0].astype(np.float64), lo, la, lonlat=True) for c, lo, la in zip(ch, lon, lat)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(x_ring).max())
    # poles: the value is the mean of the 4 pixels of the first / last ring
    np.testing.assert_allclose(got[-6], x_ring[ch[-6], 0, :4].mean(), atol=1e-6)
    np.testing.assert_allclose(got[-5], x_ring[ch[-5], 0, -4:].mean(), atol=1e-6)


def test_lon_wrap_same_point_same_value():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 1, NPIX)).astype(np.float32))
    A1 = O.build_operator({"lat": [12.3, -45.0], "lon": [-0.001, -179.5], "variable": ["T850", "T500"]}, CHANNELS[:2])
    A2 = O.build_operator({"lat": [12.3, -45.0], "lon": [359.999, 180.5], "variable": ["T850", "T500"]}, CHANNELS[:2])
    np.testing.assert_array_equal(np.asarray(A1(x)), np.asarray(A2(x)))


@pytest.mark.parametrize("method", ["bilinear", "nearest"])
def test_pixel_centre_returns_pixel_value(method):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(len(CHANNELS), 1, NPIX)).astype(np.float32)
    pix = np.concatenate([rng.integers(0, NPIX, 500), [0, NPIX - 1, 4095, 4096]])
    lon, lat = H.lonlat(NSIDE, "net")
    ch = rng.integers(0, len(CHANNELS), pix.size)
    A = O.build_operator({"lat": lat[pix], "lon": lon[pix], "variable": ch}, CHANNELS, method=method)
    np.testing.assert_allclose(np.asarray(A(jnp.asarray(x))), x[ch, 0, pix], rtol=0, atol=1e-6)


def test_nearest_is_containing_pixel():
    rng = np.random.default_rng(3)
    lon, lat = _random_points(rng, 1000)
    x_ring = rng.normal(size=(1, 1, NPIX)).astype(np.float32)
    A = O.build_operator({"lat": lat, "lon": lon, "variable": np.zeros(lon.size, int)}, ["tas"], method="nearest")
    got = np.asarray(A(jnp.asarray(H.reorder(x_ring, "ring", "net"))))
    np.testing.assert_array_equal(got, x_ring[0, 0, hp.ang2pix(NSIDE, lon, lat, lonlat=True)])
    assert np.all(np.asarray(A.weight)[:, 1:] == 0)


def test_operator_is_linear_pytree_jit_vmap_grad():
    rng = np.random.default_rng(4)
    lon, lat = _random_points(rng, 50)
    A = O.build_operator({"lat": lat, "lon": lon, "variable": rng.choice(CHANNELS, lon.size)}, CHANNELS)
    leaves = jax.tree_util.tree_leaves(A)
    assert [l.dtype for l in leaves] == [jnp.int32, jnp.int32, jnp.float32]
    assert leaves[1].shape == (lon.size, 4)
    x = jnp.asarray(rng.normal(size=(3, len(CHANNELS), 1, NPIX)).astype(np.float32))
    y = jax.jit(lambda op, v: jax.vmap(op)(v))(A, x)
    assert y.shape == (3, lon.size)
    np.testing.assert_allclose(np.asarray(y[1]), np.asarray(A(x[1])), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(A(2 * x[0] + x[1])), np.asarray(2 * A(x[0]) + A(x[1])), atol=1e-5)
    # gradient of sum(A x) = A^T 1: the weights scattered to the stencil pixels
    g = jax.grad(lambda v: A(v).sum())(x[0])
    ref = np.zeros((len(CHANNELS), 1, NPIX), np.float64)
    np.add.at(ref, (np.asarray(A.channel)[:, None], 0, np.asarray(A.pixel)), np.asarray(A.weight))
    np.testing.assert_allclose(np.asarray(g), ref, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        A(x)


def test_build_operator_errors():
    with pytest.raises(O.UnknownVariableError, match="valid channel names"):
        O.build_operator({"lat": [0.0], "lon": [0.0], "variable": ["q700"]}, CHANNELS)
    with pytest.raises(ValueError, match="method"):
        O.build_operator({"lat": [0.0], "lon": [0.0], "variable": ["tas"]}, CHANNELS, method="cubic")
    with pytest.raises(ValueError, match="latitude"):
        O.build_operator({"lat": [91.0], "lon": [0.0], "variable": ["tas"]}, CHANNELS)


def test_prepare_normalises_overrides_and_pads():
    t = _table()  # synthetic values (pres_msl 270 Pa): the plausibility check has its own tests
    prepare = functools.partial(O.prepare, check_plausibility=False)
    p = prepare(t, CHANNELS, CENTER, SCALE, sigma_y={"T850": 0.7})
    idx = O.channel_index(t["variable"], CHANNELS)
    np.testing.assert_allclose(np.asarray(p.obs.y), (t["value"] - np.array(CENTER)[idx]) / np.array(SCALE)[idx], rtol=1e-6)
    want_sigma = np.where(t["variable"] == "T850", 0.7, t["sigma"]) / np.array(SCALE)[idx]
    np.testing.assert_allclose(np.asarray(p.obs.sigma_y), want_sigma, rtol=1e-6)
    assert p.obs.A.num_obs == len(t) == p.n_obs and p.obs.sigma_y.dtype == jnp.float32
    with pytest.raises(ValueError, match="no observations"):
        prepare(t, CHANNELS, CENTER, SCALE, sigma_y={"rlut": 1.0})
    # padding: a power-of-two bucket, zero rows that change no guided denoiser
    padded = prepare(t, CHANNELS, CENTER, SCALE, pad_to="bucket")
    assert padded.obs.y.shape == (O.bucket_size(len(t)),) and padded.n_obs == len(t) < padded.obs.y.shape[0]
    assert O.bucket_size(33) == 64 and O.bucket_size(5) == 32 and O.bucket_size(64) == 64
    from jaxguide.diffusion import guidance

    def den(x, sigma, cond=None):  # a nonlinear stand-in network on nside-64 states
        return jnp.tanh(x) / (1.0 + sigma**2) + 0.1 * jnp.roll(x, 1, axis=-1)

    x = jax.random.normal(jax.random.PRNGKey(0), (len(CHANNELS), 1, NPIX)) * 1.3
    plain = prepare(t, CHANNELS, CENTER, SCALE).obs
    for method in (guidance.MMPS(cg_iters=4), guidance.MMPS(cg_iters=3, solver="gmres"), guidance.SDA(),
                   guidance.Regression(scale=0.01), guidance.Replacement()):
        a = method(den, plain)(x, 0.8)
        for obs in (padded.obs, O.pad(plain, 40)):
            np.testing.assert_allclose(np.asarray(method(den, obs)(x, 0.8)), np.asarray(a), rtol=1e-5, atol=1e-6)
        assert float(jnp.max(jnp.abs(a - den(x, 0.8)))) > 1e-3  # the guidance did something


# ---------------------------------------------------------------- strategies

from jaxguide.observations import strategies as S  # noqa: E402


def _truth(rng):
    lon, lat = H.lonlat(NSIDE, "net")
    smooth = np.sin(np.radians(lat)) + 0.5 * np.cos(np.radians(lon)) * np.cos(np.radians(lat))
    return np.stack([smooth + 0.1 * c for c in range(len(CHANNELS))])[:, None, :].astype(np.float32)


def test_sample_observations_noise_split_and_units():
    rng = np.random.default_rng(0)
    truth_n = _truth(rng)
    kw = dict(time="2020-01-01", count=2000, sigma={"T850": 0.5, "tas": 2.0}, holdout_fraction=0.2,
              center=CENTER, scale=SCALE)
    obs, held = S.sample_observations(truth_n, CHANNELS, ["T850", "tas"], strategy="random", rng=7, **kw)
    obs2, held2 = S.sample_observations(truth_n, CHANNELS, ["T850", "tas"], strategy="random",
                                        rng=np.random.default_rng(7), **kw)
    pd.testing.assert_frame_equal(obs, obs2)
    pd.testing.assert_frame_equal(held, held2)
    assert len(obs) == 2 * 1600 and len(held) == 2 * 400
    # held-out locations are disjoint from assimilated ones
    key = lambda t: set(zip(t["lat"].round(9), t["lon"].round(9)))  # noqa: E731
    assert not key(obs) & key(held)
    # values = A(physical truth) + noise of the requested std (physical units)
    both = pd.concat([obs, held], ignore_index=True)
    truth_phys = truth_n * np.array(SCALE)[:, None, None] + np.array(CENTER)[:, None, None]
    A = O.build_operator(both, CHANNELS)
    resid = both["value"].to_numpy() - np.asarray(A(jnp.asarray(truth_phys)), np.float64)
    for var, s in (("T850", 0.5), ("tas", 2.0)):
        r = resid[both["variable"].to_numpy() == var]
        assert abs(r.std() / s - 1) < 0.06, (var, r.std())  # 2000 draws: std error ~1.6 %
        assert abs(r.mean()) < 4 * s / np.sqrt(r.size)
        assert (both.loc[both["variable"] == var, "sigma"] == s).all()
    O.validate_observations(both, CHANNELS)
    # physical truth (no center/scale) gives the same values for the same draws
    obs3, _ = S.sample_observations(truth_phys, CHANNELS, ["T850", "tas"], strategy="random", rng=7,
                                    time="2020-01-01", count=2000, sigma={"T850": 0.5, "tas": 2.0},
                                    holdout_fraction=0.2)
    np.testing.assert_allclose(obs3["value"], obs["value"], rtol=0, atol=1e-3)


def test_uniform_strategy_is_near_equal_area():
    lon, lat = S.sample_locations("uniform", 3000, np.random.default_rng(1))
    counts = np.bincount(G.ang2pix(4, lon, lat, "net"), minlength=192)  # 192 equal-area cells
    assert counts.min() >= 10 and counts.max() <= 22  # mean 15.6; random points would spread ~ +-4 sigma = 8..32
    rlon, rlat = S.sample_locations("random", 3000, np.random.default_rng(1))
    assert np.bincount(G.ang2pix(4, rlon, rlat, "net"), minlength=192).std() > 2 * counts.std()


def test_land_only_with_mask_and_errors():
    npix = 12 * 16**2
    lon, lat = H.lonlat(16, "net")
    mask = (lat > 20) & (lon < 90)  # a synthetic "continent"
    plon, plat = S.sample_locations("land_only", 500, np.random.default_rng(2), land_mask=mask)
    assert plon.size == 500 and mask[G.ang2pix(16, plon, plat, "net")].all()
    with pytest.raises(ValueError, match="no land"):
        S.sample_locations("land_only", 5, 0, land_mask=np.zeros(npix, bool))
    with pytest.raises(ValueError, match="land_mask"):
        S.sample_locations("land_only", 5, 0)
    with pytest.raises(ValueError, match="unknown strategy"):
        S.sample_locations("gaussian", 5, 0)
    with pytest.raises(TypeError, match="Generator"):
        S.sample_locations("random", 5, None)
    truth = np.zeros((len(CHANNELS), 1, NPIX), np.float32)
    with pytest.raises(O.UnknownVariableError):
        S.sample_observations(truth, CHANNELS, ["Q850"], time="2020-01-01", count=5, rng=0, sigma=1.0)
    with pytest.raises(ValueError, match="both center and scale"):
        S.sample_observations(truth, CHANNELS, ["tas"], time="2020-01-01", count=5, rng=0, sigma=1.0, center=CENTER)


def test_rejected_rows_do_not_make_valid_rows_duplicates():
    """Issue 21 (2): a NaN row followed by a valid row at the same (time, lat, lon,
    variable) lost both (the duplicate mask included rejected rows): 8 of 9 valid rows."""
    t = _table(9)
    nan_first = t.iloc[[4]].assign(value=np.nan)
    bad = pd.concat([t.iloc[:4], nan_first, t.iloc[4:]], ignore_index=True)  # NaN row, then the valid row
    clean, counts = O.validate_observations(bad, CHANNELS, drop_bad=True)
    assert counts == {"nan_value": 1} and len(clean) == 9
    pd.testing.assert_frame_equal(clean, O.validate_observations(t, CHANNELS)[0])
    # and prepare's n_obs (what assimilate reports) counts all 9
    assert O.prepare(bad, CHANNELS, CENTER, SCALE, nside=8, drop_bad=True, check_plausibility=False).n_obs == 9
    # a window holding only the pair keeps the valid row (was EmptyTableError)
    one = pd.concat([nan_first, t.iloc[[4]]], ignore_index=True)
    clean, counts = O.validate_observations(one, CHANNELS, drop_bad=True)
    assert counts == {"nan_value": 1} and len(clean) == 1 and clean["value"][0] == t["value"][4]
    with pytest.raises(O.BadObservationsError) as e:
        O.validate_observations(one, CHANNELS)
    assert e.value.counts == {"nan_value": 1}
    # duplicates among valid rows are still dropped (the first kept)
    dup = pd.concat([t, t.iloc[[4, 4]]], ignore_index=True)
    clean, counts = O.validate_observations(dup, CHANNELS, drop_bad=True)
    assert counts == {"duplicate": 2} and len(clean) == 9
