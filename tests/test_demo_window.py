"""The window demo (``jaxguide.demo.window_experiment.run_window_demo`` and ``jaxguide demo --window``)
on a small configuration: nside 4, 4 frames 6 h apart, observations in frames 0-1, 64
members, 16 steps.

The per-frame numbers are checked against an exact posterior recomputed here from the
written files: the observation table (``window_obs.csv``), an H built from the bilinear
stencil and linear time weights, dense float64 linear algebra, the truth read back from
``window_truth.nc`` (K, NEST order).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from jaxguide.demo import window_experiment as demo_window

from jaxguide.grid import latlon as grid_sampling, healpix

from jaxguide import io, observations

from jaxguide.assimilation import dataset as schema

from jaxguide.model import units
from jaxguide.cli import app

SMALL = dict(nside=4, lmax=8, length_scale_km=2500.0, members=64, steps=16, obs_count=40, cg_iters=8)
FILES = ("window_truth.nc", "window_prior_ensemble.nc", "window_analysis_mmps.nc", "window_obs.csv", "window_skill.csv",
         "window_summary.json", "window_skill.png")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_window")
    config = demo_window.WindowDemoConfig(**SMALL)
    return out, config, demo_window.run_window_demo(out, config)


def _exact_from_files(out, config):
    """Exact posterior mean and std (C, T, npix) normalised net order, from the written table."""
    prior = demo_window.build_prior(config)
    C, T, npix = prior.shape
    table = observations.read_observations(out / "window_obs.csv")
    ch = np.array([config.channels.index(v) for v in table["variable"]])
    pos = ((pd.to_datetime(table["time"]) - pd.Timestamp(config.time)) / pd.Timedelta(hours=config.time_step_hours))
    pos = pos.to_numpy(np.float64)
    pix, w = grid_sampling.stencil(config.nside, table["lon"].to_numpy(), table["lat"].to_numpy(), "bilinear", "net")
    n = len(table)
    H = np.zeros((n, C * T * npix))
    f0 = np.minimum(np.floor(pos), T - 2).astype(int)
    for f, wt in ((f0, 1.0 - (pos - f0)), (f0 + 1, pos - f0)):
        np.add.at(H, (np.arange(n)[:, None], (ch[:, None] * T + f[:, None]) * npix + pix), w * wt[:, None])
    scale, center = config.scale[ch], config.center[ch]
    mean, cov = prior.posterior(H, (table["value"].to_numpy() - center) / scale, table["sigma"].to_numpy() / scale)
    return prior, mean, np.sqrt(np.diag(cov)).reshape(prior.shape), pos


def test_window_demo_files_and_per_frame_skill(small_run):
    out, config, summary = small_run
    for name in FILES:
        assert (out / name).is_file(), name
    times = pd.DatetimeIndex(config.window.times)
    for name in FILES[:3]:
        ds = io.read_analysis(out / name)
        assert schema.check_cf(ds) == [], name
        assert (pd.DatetimeIndex(ds["time"].values) == times).all()
    rows = summary["frames"]
    assert [r["frame"] for r in rows] == [0, 1, 2, 3] and [r["observed"] for r in rows] == [True, True, False, False]
    assert pd.read_csv(out / "window_skill.csv")["rmse_mmps"].tolist() == pytest.approx([r["rmse_mmps"] for r in rows])
    assert json.loads((out / "window_summary.json").read_text())["frames"] == rows

    prior, mean, std, pos = _exact_from_files(out, config)
    assert pos.min() >= 0 and pos.max() <= 1 and np.mean(pos % 1 > 0) > 0.9  # frames 0-1, mostly between frames
    # the demo's exact posterior RMSE and std per frame vs this recomputation (K, truth from the file);
    # tolerance 2e-3 K: float32 file values and kalman_marginals' float32 Sigma H^T
    truth = np.stack([io.read_analysis(out / "window_truth.nc")[c].values[0] for c in config.channels])  # (C, T, npix) K nest
    to_k = lambda x: healpix.reorder(units.unnormalise(x, config.center, config.scale, axis=0), "net", "nest")  # noqa: E731
    rmse = np.sqrt(np.mean((to_k(mean) - truth) ** 2, axis=(0, 2)))
    std_k = np.sqrt(np.mean((std * config.scale[:, None, None]) ** 2, axis=(0, 2)))
    np.testing.assert_allclose([r["rmse_exact"] for r in rows], rmse, atol=2e-3)
    np.testing.assert_allclose([r["std_exact"] for r in rows], std_k, atol=2e-3)
    # MMPS vs the exact posterior per frame. Mean error: Monte-Carlo alone gives ~ (post std /
    # prior std) / sqrt(64) <= 0.125 per frame; bound 0.2 (1.6 / sqrt(M)). Spread ratio in
    # [0.85, 1.15] (16 steps, 64 members: per-pixel std errors ~ 1/sqrt(128) average out).
    # RMSE vs truth within 0.2 prior std of the exact posterior's (one truth).
    prior_std_k = np.sqrt(np.mean((np.asarray(config.std_k)) ** 2))
    for r in rows:
        assert r["mean_error_vs_exact"] < 0.2, r
        assert 0.85 < r["spread_ratio_vs_exact"] < 1.15, r
        assert abs(r["rmse_mmps"] - r["rmse_exact"]) < 0.2 * prior_std_k, r
    # information propagates: the unobserved frames' exact std is below the prior's, less so later
    s = [r["std_exact"] for r in rows]
    assert s[2] < 0.9 * prior_std_k and s[1] < s[2] < s[3] < prior_std_k
    # and the prior ensemble is far from the posterior where there are observations
    assert all(r["rmse_prior"] > r["rmse_exact"] + 0.3 for r in rows[:2])


def test_window_demo_config_errors():
    with pytest.raises(ValueError, match="observed_frames"):
        demo_window.WindowDemoConfig(frames=4, observed_frames=5)
    with pytest.raises(ValueError, match="frames >= 2"):
        demo_window.WindowDemoConfig(frames=1, observed_frames=1)


def test_cli_demo_window(small_run, tmp_path, monkeypatch):
    # the small configuration behind the CLI (the same programs shapes as the module's run)
    import functools
    monkeypatch.setattr(demo_window, "WindowDemoConfig", functools.partial(demo_window.WindowDemoConfig, **SMALL))
    out = tmp_path / "w"
    res = CliRunner().invoke(app, ["demo", "--window", "--out", str(out), "--seed", "1"])
    assert res.exit_code == 0, res.output
    for word in ("frame", "MMPS", "exact", "spread ratio"):
        assert word in res.stdout
    for name in FILES:
        assert (out / name).is_file(), name
    assert json.loads((out / "window_summary.json").read_text())["config"]["seed"] == 1
