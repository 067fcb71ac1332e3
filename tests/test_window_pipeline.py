"""A chained video run through the whole pipeline, exact against the Kalman smoother.

The model is a space-time Gaussian prior (:class:`~jaxguide.model.gaussian.GaussianModel`,
nside 4, one channel, windows of T = 4 frames 6 h apart, AR(1) time correlation with a
24 h time scale, so the process is Markov in time). The run covers 7 frames: two windows
chained through one conditioning frame (the second window starts at frame 3 and is
conditioned, member by member, on frame 3 of the first; known frames enter the Gaussian
model exactly, :func:`jaxguide.model.gaussian.given_frames`). Observations lie in the first
window only (on and between frames). For a Markov prior this chain is exact: the first
window is the smoother posterior given all observations, and the forecast frames 4-6
follow from frame 3 alone. So the trajectory file must match the exact posterior of the
7-frame prior in every frame: mean error <= 0.1 prior std and spread ratio 0.9-1.1, and
the forecast frames must show the (decaying) move the exact posterior makes. Control:
independent windows (no conditioning frame) lose that move.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from jaxguide.model import gaussian, units

from jaxguide.grid import healpix

from jaxguide import observations
from jaxguide.assimilation.session import Session
from jaxguide.assimilation.settings import AssimilationSettings
from jaxguide.model.window import FrameWindow

NSIDE = 4
NPIX = 12 * NSIDE**2
CHANNELS = ("T850",)
CENTER, SCALE = np.array([281.0]), np.array([12.0])
T, STEP_H, TAU_H = 4, 6.0, 24.0
START = pd.Timestamp("2022-01-01T00:00")
RUN = 7  # frames 0..6: windows [0, 3] and [3, 6]
SIGMA_Y_K = 0.6


def _prior(time_length):
    return gaussian.make_prior(NSIDE, [0.2], [0.8], [[1.0]], 2500.0, time_length=time_length,
                               time_step_hours=STEP_H, correlation_hours=TAU_H)


@pytest.fixture(scope="module")
def case():
    full = _prior(RUN)
    rng = np.random.default_rng(3)
    import jax

    truth = np.asarray(full.sample(jax.random.key(4), 1), np.float64)[0]  # (1, 7, npix) normalised
    n = 48
    positions = np.concatenate([np.arange(4.0), rng.uniform(0.0, 3.0, n - 4)])  # first window only
    lon, lat = rng.uniform(0, 360, n), np.degrees(np.arcsin(rng.uniform(-0.95, 0.95, n)))
    table = observations.make_table(START + pd.to_timedelta(positions * STEP_H, unit="h"), lat, lon,
                                    ["T850"] * n, np.full(n, CENTER[0]), [SIGMA_Y_K] * n)
    run = FrameWindow(START, STEP_H, RUN)
    H = observations.prepare(table, CHANNELS, CENTER, SCALE, nside=NSIDE, window=run).obs.A.dense((1, RUN, NPIX))
    table["value"] = (H @ truth.reshape(-1)) * SCALE[0] + CENTER[0] + SIGMA_Y_K * rng.standard_normal(n)
    mean, std = gaussian.kalman_marginals(full, H, (table["value"].to_numpy() - CENTER[0]) / SCALE[0],
                                          SIGMA_Y_K / SCALE[0])
    return dict(table=table, post_mean=mean, post_std=std, prior_mean=np.asarray(full.mu, np.float64),
                prior_std=full.std())


def _run(tmp_path, case, overlap, members):
    model = gaussian.GaussianModel(_prior(T), CHANNELS, CENTER, SCALE, NSIDE, time_step_hours=STEP_H)
    session = Session(model, report_progress=False)
    settings = AssimilationSettings(members=members, prior_members=0, steps=32, sigma_min=0.002, sigma_max=800.0,
                                    cg_iters=16, conditioning_frames=overlap, seed=5)
    out = tmp_path / f"traj{overlap}.nc"
    summary = session.assimilate(case["table"], out, time=START, end=START + pd.Timedelta(hours=STEP_H * (RUN - 1)),
                                 settings=settings)
    with xr.open_dataset(out) as ds:
        assert ds["T850"].dims == ("member", "time", "pixel") and ds.sizes["time"] == RUN
        assert list(pd.DatetimeIndex(ds["time"].values)) == list(FrameWindow(START, STEP_H, RUN).times)
        assert ds.attrs["n_windows"] == 2 and ds.attrs["conditioning_frames"] == overlap
        ens = healpix.reorder(units.normalise(ds["T850"].values[:, None], CENTER, SCALE), "nest", "net")
    return ens, summary, session  # ens (M, 1, RUN, npix) normalised net order


def _per_frame(ens, case):
    sd = case["prior_std"]
    mean_err = np.sqrt(np.mean(((ens.mean(0) - case["post_mean"]) / sd) ** 2, axis=(0, 2)))
    spread = np.mean(ens.std(0, ddof=1), axis=(0, 2)) / np.mean(case["post_std"], axis=(0, 2))
    move_exact = np.sqrt(np.mean(((case["post_mean"] - case["prior_mean"]) / sd) ** 2, axis=(0, 2)))
    move = np.sqrt(np.mean(((ens.mean(0) - case["prior_mean"]) / sd) ** 2, axis=(0, 2)))
    return mean_err, spread, move_exact, move


@pytest.mark.slow
def test_chained_windows_match_the_exact_posterior(tmp_path, case):
    ens, summary, session = _run(tmp_path, case, overlap=1, members=256)
    mean_err, spread, move_exact, move = _per_frame(ens, case)
    print("mean error / prior std per frame", np.round(mean_err, 3), "spread ratio", np.round(spread, 3),
          "exact move", np.round(move_exact, 3), "MMPS move", np.round(move, 3))
    assert mean_err.max() <= 0.1
    assert np.all((spread >= 0.9) & (spread <= 1.1))
    # the forecast frames (4-6, no observations) move toward the truth as the exact posterior says
    assert np.all(move_exact[4:] > 0.2) and np.all(np.diff(move_exact[3:]) < 0)
    np.testing.assert_allclose(move[4:], move_exact[4:], atol=0.1)
    # one program served both windows (the conditioning and observations are arguments)
    assert session.programs.num_programs == 1 and len(session.programs._compiled) == 1
    assert summary["windows"] == 2 and len(summary["frames"]) == RUN


@pytest.mark.slow
def test_independent_windows_lose_the_forecast(tmp_path, case):
    """Control: without a conditioning frame the second window is a fresh prior draw, so
    its frames miss the exact posterior's move (the check above would fail)."""
    # the Monte Carlo error of a 64-member mean is 0.07-0.085 prior std on frames 0-3 (sqrt of
    # post var / prior var / M; measured 0.073-0.104); at 32 members it was 0.10-0.12, and the
    # seed rule's new draw gave 0.162 against the 0.15 bound
    ens, _, _ = _run(tmp_path, case, overlap=0, members=64)
    mean_err, _, move_exact, move = _per_frame(ens, case)
    assert mean_err[:4].max() <= 0.15
    assert mean_err[4] > 0.3 and move[4] < 0.5 * move_exact[4]


def test_options_of_the_other_kind_of_model_are_errors(tmp_path, case):
    """Video-only options on a single-time model, and the single-time window on a video
    model, are named errors before anything is compiled (nothing silently ignored)."""
    single = gaussian.GaussianModel(_prior(1), CHANNELS, CENTER, SCALE, NSIDE)
    video = gaussian.GaussianModel(_prior(T), CHANNELS, CENTER, SCALE, NSIDE, time_step_hours=STEP_H)
    table = case["table"]
    with pytest.raises(ValueError, match="are for video models"):
        Session(single).assimilate(table, tmp_path / "a.nc", time=START, end=START)
    with pytest.raises(ValueError, match="time_matching .* are for video models"):
        Session(single).assimilate(table, tmp_path / "a.nc", time=START,
                                   settings=AssimilationSettings(time_matching="exact"))
    with pytest.raises(ValueError, match="window_hours .* is for single-time models"):
        Session(video).assimilate(table, tmp_path / "a.nc", time=START, settings=AssimilationSettings(window_hours=6))
    from jaxguide.model.window import WindowError

    with pytest.raises(WindowError, match="not a whole number of the model's 6 h frames"):
        Session(video).assimilate(table, tmp_path / "a.nc", time=START, end=START + pd.Timedelta(hours=20))
    with pytest.raises(observations.BadObservationsError, match="video window's 4 frames"):
        Session(video).assimilate(table.assign(time=START + pd.Timedelta(hours=30)), tmp_path / "a.nc", time=START)
    assert not (tmp_path / "a.nc").exists()
