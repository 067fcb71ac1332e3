"""Video windows: frame times, chained runs, observations placed in time, known frames.

References are independent: dense operator matrices built entry by entry, hand-computed
frame positions and interpolation weights, and small files written here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from jaxguide.grid import healpix

from jaxguide import observations as O
from jaxguide.model.conditioning import KnownFrames, frame_condition, window_conditioning
from jaxguide.assimilation.known_frames import ConditioningFileError, read_known_frames
from jaxguide.model.window import FrameWindow, WindowError, chain, trajectory_times

CHANNELS = ["T850", "T500"]
CENTER = np.array([280.0, 250.0])
SCALE = np.array([10.0, 5.0])
NSIDE = 4
NPIX = 12 * NSIDE**2


def test_frame_window_times_and_positions():
    w = FrameWindow("2016-02-28T20:20", 6, 4)
    assert list(w.times.strftime("%m-%d %H:%M")) == ["02-28 20:20", "02-29 02:20", "02-29 08:20", "02-29 14:20"]
    assert w.end == pd.Timestamp("2016-02-29T14:20")
    np.testing.assert_allclose(w.position(pd.to_datetime(["2016-02-28T20:20", "2016-02-29T05:20", "2016-02-29T14:20",
                                                           "2016-02-28T14:20"])), [0.0, 1.5, 3.0, -1.0])
    assert FrameWindow("2020-01-01T00:00Z", 6, 2).start == pd.Timestamp("2020-01-01")
    with pytest.raises(WindowError, match="positive"):
        FrameWindow("2020-01-01", 0, 4)
    with pytest.raises(WindowError, match="whole number of frames"):
        FrameWindow("2020-01-01", 6, 0)


def test_chain_covers_the_run_with_overlapping_windows():
    ws = chain("2020-01-01", "2020-01-03", time_step_hours=6, length=4, overlap=1)
    assert [str(w.start) for w in ws] == ["2020-01-01 00:00:00", "2020-01-01 18:00:00", "2020-01-02 12:00:00"]
    times = trajectory_times(ws, 1)
    assert len(times) == 10 and times[0] == pd.Timestamp("2020-01-01") and times.is_unique
    assert (np.diff(times.values) == np.timedelta64(6, "h")).all()
    # overlap 2: windows 2 frames apart
    ws2 = chain("2020-01-01", "2020-01-02", time_step_hours=6, length=4, overlap=2)
    assert [w.start.hour for w in ws2] == [0, 12]  # 5 frames: 0-18 h, then 12-30 h
    assert len(chain("2020-01-01", "2020-01-01T18:00", time_step_hours=6, length=4, overlap=1)) == 1


@pytest.mark.parametrize("end, overlap, match", [
    ("2020-01-03T01:00", 1, "not a whole number of the model's 6 h frames"),
    ("2019-12-31", 1, "ends .* before it starts"),
    ("2020-01-03", 4, r"conditioning frames must be in \[0, 4\)"),
])
def test_chain_errors(end, overlap, match):
    with pytest.raises(WindowError, match=match):
        chain("2020-01-01", end, time_step_hours=6, length=4, overlap=overlap)


def test_time_stencil_weights():
    frames, w = O.time_stencil([0.0, 0.25, 2.0, 3.0], 4)
    np.testing.assert_array_equal(frames, [[0, 1], [0, 1], [2, 3], [2, 3]])
    np.testing.assert_allclose(w, [[1, 0], [0.75, 0.25], [1, 0], [0, 1]])
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        O.time_stencil([3.5], 4)


def _table(times, lats, lons, variables, values, sigma=1.0):
    return O.make_table(pd.to_datetime(times), lats, lons, variables, values, [sigma] * len(values))


def test_operator_interpolates_in_time_like_a_dense_reference():
    """A(x) for a state (C, T, npix): an observation between frames is the linear blend
    of the spatial interpolations at the two frames (dense matrix built independently)."""
    w = FrameWindow("2020-01-01", 6, 4)
    tab = _table(["2020-01-01T00:00", "2020-01-01T09:00", "2020-01-01T18:00"], [10, -20, 45], [5, 100, 250],
                 ["T850", "T500", "T850"], [281.0, 251.0, 279.0])
    p = O.prepare(tab, CHANNELS, CENTER, SCALE, nside=NSIDE, window=w)
    np.testing.assert_allclose(p.table["frame_position"], [0.0, 1.5, 3.0])
    x = np.random.default_rng(1).normal(size=(2, 4, NPIX))
    got = np.asarray(p.obs.A(x.astype(np.float32)), np.float64)
    # reference: single-time operators at each frame, blended by hand
    single = O.build_operator(p.table, CHANNELS, nside=NSIDE, as_numpy=True)
    at = lambda f: np.asarray(single(x[:, f:f + 1].astype(np.float32)), np.float64)  # noqa: E731
    ref = np.array([at(0)[0], 0.5 * at(1)[1] + 0.5 * at(2)[1], at(3)[2]])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.obs.A.dense((2, 4, NPIX)) @ x.ravel(), ref, rtol=1e-5, atol=1e-5)
    # a state that is linear in time is read exactly between frames
    lin = np.broadcast_to(np.arange(4.0)[None, :, None], (2, 4, NPIX))
    np.testing.assert_allclose(np.asarray(p.obs.A(lin.astype(np.float32))), [0.0, 1.5, 3.0], atol=1e-6)


def test_prepare_window_errors_and_exact_matching():
    w = FrameWindow("2020-01-01", 6, 4)
    between = _table(["2020-01-01T00:00", "2020-01-01T03:00"], [0, 0], [0, 0], ["T850", "T850"], [280.0, 281.0])
    with pytest.raises(O.ObservationTimeError, match="1 of 2 observations fall between the model's frames"):
        O.prepare(between, CHANNELS, CENTER, SCALE, nside=NSIDE, window=w, time_matching="exact")
    kept = O.prepare(between, CHANNELS, CENTER, SCALE, nside=NSIDE, window=w, time_matching="exact", drop_bad=True)
    assert kept.n_obs == 1 and kept.dropped == {"time_between_frames": 1}
    outside = _table(["2020-01-01T00:00", "2020-01-02T00:00"], [0, 0], [0, 0], ["T850", "T850"], [280.0, 281.0])
    with pytest.raises(O.BadObservationsError, match="video window's 4 frames run from 2020-01-01T00:00 to "
                                                     "2020-01-01T18:00"):
        O.prepare(outside, CHANNELS, CENTER, SCALE, nside=NSIDE, window=w)
    with pytest.raises(ValueError, match="time matching"):
        O.prepare(between, CHANNELS, CENTER, SCALE, nside=NSIDE, window=w, time_matching="nearest")


def test_padding_keeps_frames():
    w = FrameWindow("2020-01-01", 6, 4)
    tab = _table(["2020-01-01T09:00"], [0], [0], ["T500"], [250.0])
    p = O.prepare(tab, CHANNELS, CENTER, SCALE, nside=NSIDE, window=w, pad_to="bucket")
    assert p.obs.A.frame.shape == (32, 8) and float(np.abs(np.asarray(p.obs.A.weight)[1:]).sum()) == 0.0
    x = np.random.default_rng(2).normal(size=(2, 4, NPIX)).astype(np.float32)
    un = O.prepare(tab, CHANNELS, CENTER, SCALE, nside=NSIDE, window=w)
    np.testing.assert_allclose(np.asarray(p.obs.A(x))[:1], np.asarray(un.obs.A(x)), rtol=1e-6)


def test_window_conditioning_layout():
    """[known * mask, SST, mask] per frame, calendar per frame; per-member known frames
    give every leaf a member axis."""
    w = FrameWindow("2016-02-28T20:20", 6, 4)
    vals = np.random.default_rng(3).normal(size=(3, 2, 4, NPIX)).astype(np.float32)
    keep = np.array([True, False, False, False])
    cond = window_conditioning(w, channels=2, nside=NSIDE, condition_channels=3, known=KnownFrames(vals, keep))
    assert cond["condition"].shape == (3, 3, 4, NPIX) and cond["second_of_day"].shape == (3, 4)
    np.testing.assert_array_equal(cond["condition"][:, :2, 0], vals[:, :, 0])
    assert not cond["condition"][:, :2, 1:].any()
    np.testing.assert_array_equal(cond["condition"][:, 2], np.broadcast_to(keep[:, None], (3, 4, NPIX)))
    np.testing.assert_allclose(cond["second_of_day"][0], [73200, 8400, 30000, 51600])  # fixture README 8.6
    np.testing.assert_allclose(cond["day_of_year"][0], [58.847, 59.097, 59.347, 59.597], atol=1e-3)
    shared = window_conditioning(w, channels=2, nside=NSIDE, condition_channels=3)
    assert shared["condition"].shape == (3, 4, NPIX) and not shared["condition"].any()
    with_sst = frame_condition(vals[0], keep, np.ones(NPIX))
    assert with_sst.shape == (1, 4, 4, NPIX) and (with_sst[0, 2] == 1).all()
    with pytest.raises(ValueError, match="2 \\+ 2 channels"):
        window_conditioning(w, channels=2, nside=NSIDE, condition_channels=7)
    with pytest.raises(ValueError, match="sea-surface temperature"):
        window_conditioning(w, channels=2, nside=NSIDE, condition_channels=4)


def _analysis_file(path, times, members=None, nside=NSIDE, channels=CHANNELS, latlon=False):
    rng = np.random.default_rng(4)
    npix = 12 * nside**2
    dims = ("time", "pixel") if members is None else ("member", "time", "pixel")
    shape = (len(times), npix) if members is None else (members, len(times), npix)
    data = {c: (dims, CENTER[i] + SCALE[i] * rng.normal(size=shape)) for i, c in enumerate(channels)}
    ds = xr.Dataset(data, coords={"time": pd.to_datetime(times)})
    if latlon:
        ds = xr.Dataset({c: (("time", "lat", "lon"), np.zeros((len(times), 4, 8))) for c in channels},
                        coords={"time": pd.to_datetime(times), "lat": np.arange(4.0), "lon": np.arange(8.0)})
    ds.to_netcdf(path)
    return ds


def test_read_known_frames_from_an_analysis_file(tmp_path):
    w = FrameWindow("2020-01-01T12:00", 6, 4)
    ds = _analysis_file(tmp_path / "a.nc", ["2020-01-01T06:00", "2020-01-01T12:00"], members=2)
    known, used = read_known_frames(tmp_path / "a.nc", w, channels=CHANNELS, center=CENTER, scale=SCALE,
                                    nside=NSIDE, members=3)
    assert used == [pd.Timestamp("2020-01-01T12:00")]
    np.testing.assert_array_equal(known.keep, [True, False, False, False])
    assert known.values.shape == (3, 2, 4, NPIX) and not known.values[:, :, 1:].any()
    for i, src in enumerate([0, 1, 0]):  # member i from file member i mod 2
        ref = (ds["T500"].values[src, 1] - CENTER[1]) / SCALE[1]
        np.testing.assert_allclose(known.values[i, 1, 0], healpix.reorder(ref, "nest", "net"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, match", [
    ("latlon", "is on a lat/lon grid; known frames must be on the model's HEALPix grid"),
    ("nside", "has 768 pixels \\(nside 8\\); the model's grid is nside 4"),
    ("channel", r"lacks the model's channel\(s\) \['T500'\]"),
    ("between", "between its frames"),
    ("none", "none of the times"),
])
def test_read_known_frames_errors(tmp_path, case, match):
    w = FrameWindow("2020-01-01T12:00", 6, 4)
    times = {"between": ["2020-01-01T15:00"], "none": ["2020-01-03T00:00"]}.get(case, ["2020-01-01T12:00"])
    _analysis_file(tmp_path / "c.nc", times, nside=8 if case == "nside" else NSIDE,
                   channels=["T850"] if case == "channel" else CHANNELS, latlon=case == "latlon")
    with pytest.raises(ConditioningFileError, match=match):
        read_known_frames(tmp_path / "c.nc", w, channels=CHANNELS, center=CENTER, scale=SCALE, nside=NSIDE, members=1)
