"""One seed rule for every entry point (issue 21, item 4): the keys of a run at time t are
``split(fold_in(key(seed), unix seconds of t))``, whether t is a single-time analysis,
a campaign time or a video window's first frame; two times never share noise.

Uses the campaign's Gaussian stand-in model (tests/campaign_case.py): steps 3, two members.
"""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd
import xarray as xr

import campaign_case as case

from jaxguide.assimilation.session import Session
from jaxguide.assimilation.settings import AssimilationSettings, SEED_RULE, run_keys, time_key
from jaxguide.campaign.run import assimilate_campaign
from jaxguide.campaign.store import read_campaign
from jaxguide.campaign.times import time_key as campaign_time_key
from jaxguide.model import gaussian

VARS = [f"{c}{s}" for c in case.CHANNELS for s in ("", "_prior_mean")]


def _data(key) -> list[int]:
    return np.asarray(jax.random.key_data(key)).tolist()


def test_time_key_is_the_campaign_key_and_differs_between_times():
    t = pd.Timestamp("2020-01-01T18:00")
    assert _data(time_key(11, t)) == _data(campaign_time_key(11, t))
    assert _data(time_key(11, t)) != _data(time_key(11, t + pd.Timedelta(seconds=1)))
    assert _data(time_key(11, t)) != _data(time_key(12, t))
    assert [_data(k) for k in run_keys(11, t)] == [_data(k) for k in jax.random.split(time_key(11, t))]


def test_single_time_and_campaign_give_the_same_members(tmp_path):
    """A single-time analysis at t and the campaign's time t (same seed) are bit-identical;
    a loop of single-time analyses over two times draws different noise (the prior mean of
    the Gaussian model does not depend on the time, so only the noise can differ)."""
    settings = case.settings()
    table = case.table()
    times = case.TIMES[[1, 3]]  # 20 and 40 observations: both pad to 64, as the campaign does
    session = Session(case.model())
    assimilate_campaign(None, table, tmp_path / "c.zarr", times, settings, session=session)
    singles = []
    for t in times:
        out = tmp_path / f"{t:%H}.nc"
        session.assimilate(table, out, time=t, settings=settings)
        with xr.open_dataset(out) as ds:
            singles.append(ds.load())
    with read_campaign(tmp_path / "c.zarr") as store:
        for t, single in zip(times, singles):
            at = store.sel(time=[t])
            for v in VARS:
                np.testing.assert_array_equal(at[v].values, single[v].values, err_msg=f"{v} at {t}")
    for v in (f"{c}_prior_mean" for c in case.CHANNELS):
        assert not np.array_equal(singles[0][v].values, singles[1][v].values), v
    assert singles[0].attrs["seed_rule"] == SEED_RULE


def test_video_windows_use_the_rule_at_each_window_start(tmp_path, monkeypatch):
    """A chained video run samples window k with run_keys(seed, first frame of window k)."""
    step_h, frames = 6.0, 3
    prior = gaussian.make_prior(4, [0.0], [1.0], [[1.0]], 2500.0, time_length=frames, time_step_hours=step_h)
    model = gaussian.GaussianModel(prior, ("T850",), np.array([281.0]), np.array([12.0]), 4, time_step_hours=step_h)
    start = pd.Timestamp("2022-01-01T00:00")
    table = pd.DataFrame({"time": [start], "lat": [10.0], "lon": [20.0], "variable": ["T850"],
                          "value": [282.0], "sigma": [1.0]})
    session = Session(model)
    used = []
    prepare = session.programs.prepare

    def recording(fn, key, *a, **k):
        used.append(_data(key))
        return prepare(fn, key, *a, **k)

    monkeypatch.setattr(session.programs, "prepare", recording)
    settings = AssimilationSettings(method="dps", members=1, prior_members=1, steps=2, seed=7)
    # frames 0-4: windows [0, 2] and [2, 4] (one conditioning frame)
    session.assimilate(table, tmp_path / "v.nc", time=start, end=start + pd.Timedelta(hours=4 * step_h),
                       settings=settings)
    starts = [start, start + pd.Timedelta(hours=2 * step_h)]
    want = {tuple(_data(k)) for t in starts for k in run_keys(7, t)}
    assert {tuple(k) for k in used} == want and len(want) == 4
