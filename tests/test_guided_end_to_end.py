"""Guided assimilation end to end with a known answer, and compile-once across analyses.

The exact Gaussian-prior denoiser (:class:`jaxguide.model.gaussian.GaussianModel`, nside 8, two
channels with their own center/scale in K) goes through ``pipeline.assimilate`` like a
cBottle model: an observation table in physical units (with a wrong ``sigma`` column
that the ``sigma_y`` setting overrides), normalisation, the bilinear operator, MMPS,
the EDM sampler, the NetCDF writer. Read back in K, the analysis must match the exact
Kalman posterior computed here independently in physical units (dense covariance, the
grid_sampling bilinear weights as H): mean error <= 0.1 prior std (RMS over pixels), spread
ratio in [0.9, 1.1]. A sigma_y left in K instead of normalised units, a dropped
override, a wrong operator or a wrong unit conversion on the way out all fail it.
"""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd
import pytest

from jaxguide.model import gaussian

from jaxguide.grid import latlon as grid_sampling, healpix

from jaxguide import io

from jaxguide.assimilation import pipeline
from jaxguide.assimilation.session import Session
from jaxguide.assimilation.settings import AssimilationSettings
from jaxguide.diffusion.ensemble import count_compiles

NSIDE = 8
CHANNELS = ("T850", "T500")
CENTER = np.array([281.13, 258.50])  # K
SCALE = np.array([12.34, 10.94])  # K
SIGMA_Y_K = 0.4  # the override, K
TIME = pd.Timestamp("2022-01-01T00:00")


@pytest.fixture(scope="module")
def model():
    prior = gaussian.make_prior(NSIDE, [0.3, -0.2], [0.8, 0.6], [[1.0, 0.6], [0.6, 1.0]], 2500.0, max_modes=96)
    return gaussian.GaussianModel(prior, CHANNELS, CENTER, SCALE, NSIDE)


def observation_table(model, n: int, seed: int, time=TIME) -> pd.DataFrame:
    """n noisy observations of a prior draw at random points, physical units (K).

    The ``sigma`` column says 5 K; the runs override it with SIGMA_Y_K, which is also
    the noise actually added."""
    rng = np.random.default_rng(seed)
    lon, lat = rng.uniform(0.0, 360.0, n), np.degrees(np.arcsin(rng.uniform(-0.95, 0.95, n)))
    ch = np.arange(n) % len(CHANNELS)
    truth = np.asarray(model.prior.sample(jax.random.PRNGKey(seed), 1)[0], np.float64)
    pix, w = grid_sampling.stencil(NSIDE, lon, lat, "bilinear", "net")
    value_n = np.sum(truth[ch[:, None], 0, pix] * w, axis=1)
    value = value_n * SCALE[ch] + CENTER[ch] + SIGMA_Y_K * rng.standard_normal(n)
    return pd.DataFrame({"time": time, "lat": lat, "lon": lon, "variable": np.array(CHANNELS)[ch],
                         "value": value, "sigma": 5.0})


def kalman_physical(model, table: pd.DataFrame):
    """Exact posterior mean and pointwise std, prior std and mean, in K, (C, npix) NEST order."""
    C, _, npix = model.prior.shape
    ch = np.array([CHANNELS.index(v) for v in table["variable"]])
    pix, w = grid_sampling.stencil(NSIDE, table["lon"].to_numpy(), table["lat"].to_numpy(), "bilinear", "nest")
    H = np.zeros((len(table), C * npix))
    np.add.at(H, (np.arange(len(table))[:, None], ch[:, None] * npix + pix), w)
    # the prior in K, NEST order: x_K = D_s (x_n reordered) + c
    perm = healpix.reorder(np.arange(npix), "net", "nest").astype(int)  # nest[i] = net[perm[i]]
    idx = (np.arange(C)[:, None] * npix + perm[None, :]).reshape(-1)
    s = np.repeat(SCALE, npix)
    cov = model.prior.dense_cov()[np.ix_(idx, idx)] * s[:, None] * s[None, :]
    mu = np.asarray(model.prior.mu, np.float64)[:, 0, perm].reshape(-1) * s + np.repeat(CENTER, npix)
    S = H @ cov @ H.T + SIGMA_Y_K**2 * np.eye(len(table))
    K = np.linalg.solve(S, H @ cov).T
    mean = mu + K @ (table["value"].to_numpy() - H @ mu)
    var = np.diag(cov) - np.sum(K * (cov @ H.T), axis=1)
    return (mean.reshape(C, npix), np.sqrt(var).reshape(C, npix), np.sqrt(np.diag(cov)).reshape(C, npix),
            mu.reshape(C, npix))


SETTINGS = AssimilationSettings(
    method="mmps", cg_iters=12, members=256, prior_members=0, steps=24, sigma_min=0.002, sigma_max=800.0,
    sigma_y=SIGMA_Y_K, seed=3)


def test_mmps_analysis_on_disk_matches_kalman_posterior(model, tmp_path):
    table = observation_table(model, 24, seed=1)
    out = tmp_path / "analysis.nc"
    summary = pipeline.assimilate(model, table, out, time=TIME, settings=SETTINGS)
    assert summary["n_obs"] == 24
    ds = io.read_analysis(out)
    assert ds.attrs["method"] == "mmps" and ds.attrs["cg_iters"] == 12 and ds.attrs["sigma_y"] == "0.4"
    ens = np.stack([ds[v].isel(time=0).values for v in CHANNELS], axis=1).astype(np.float64)  # (M, C, npix) K nest
    mean, std, prior_std, prior_mean = kalman_physical(model, table)
    mean_err = float(np.sqrt(np.mean(((ens.mean(0) - mean) / prior_std) ** 2)))
    spread = float(np.mean(ens.std(0, ddof=1) / std))
    prior_err = float(np.sqrt(np.mean(((prior_mean - mean) / prior_std) ** 2)))
    print(f"mean error {mean_err:.4f} prior std (prior mean: {prior_err:.3f}); spread ratio {spread:.4f}")
    assert mean_err <= 0.1
    assert 0.9 <= spread <= 1.1
    assert prior_err > 3 * mean_err  # the observations matter: the prior fails this test
    assert float(np.min(std / prior_std)) < 0.2  # ... and sigma_y does (observed pixels pinned)


def test_second_analysis_compiles_nothing(model, tmp_path):
    """Same session, new time, new observations (another count in the same bucket) and a
    new guidance scale: no XLA compilation at all. Without padding the count changes the
    shapes, and the counter sees the recompilation (the test can fail)."""
    settings = AssimilationSettings(method="mmps", members=4, prior_members=2, steps=4, sigma_y=SIGMA_Y_K)
    session = Session(model)
    with count_compiles() as first:
        pipeline.assimilate(model, observation_table(model, 20, seed=2), tmp_path / "a.nc", time=TIME,
                            settings=settings, session=session)
    assert len(first) >= 2  # analysis and prior programs (at least)
    t2 = TIME + pd.Timedelta(hours=6)
    calls = []
    with count_compiles() as second:
        s2 = pipeline.assimilate(model, observation_table(model, 27, seed=3, time=t2), tmp_path / "b.nc", time=t2,
                                 settings=AssimilationSettings(**{**settings.__dict__, "guidance_scale": 0.7}),
                                 session=session, progress=lambda *a: calls.append(a))
    assert second == [], f"{len(second)} compilations on the second analysis"
    assert s2["n_obs"] == 27 and calls and calls[-1][1] == calls[-1][2]  # progress ran to the end
    assert session.programs.num_programs == 2
    unpadded = AssimilationSettings(**{**settings.__dict__, "pad_observations": False})
    pipeline.assimilate(model, observation_table(model, 20, seed=2), tmp_path / "c.nc", time=TIME,
                        settings=unpadded, session=session)
    with count_compiles() as third:
        pipeline.assimilate(model, observation_table(model, 27, seed=3), tmp_path / "d.nc", time=TIME,
                            settings=unpadded, session=session)
    assert len(third) >= 1  # a new observation count without padding is a new program


def test_model_contract_errors(model, tmp_path):
    class NotAModel:
        channels = CHANNELS

    with pytest.raises(TypeError, match="lacks.*denoise"):
        pipeline.assimilate(NotAModel(), observation_table(model, 4, seed=0), tmp_path / "x.nc", time=TIME)
    with pytest.raises(ValueError, match="another model"):
        pipeline.assimilate(model, observation_table(model, 4, seed=0), tmp_path / "x.nc", time=TIME,
                            session=Session(gaussian.GaussianModel(model.prior, CHANNELS, CENTER, SCALE, NSIDE)))


def test_settings_and_cli_options_reach_the_method(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from jaxguide.diffusion import guidance
    from jaxguide.cli import app

    S = AssimilationSettings
    assert S(method="sda", gamma=0.05, guidance_scale=0.5).guidance_method() == guidance.SDA(gamma=0.05, scale=0.5)
    assert S(cg_iters=7, solver="gmres").guidance_method() == guidance.MMPS(cg_iters=7, solver="gmres")
    assert S(method="regression", norm_matching=True).guidance_method() == guidance.Regression(norm_matching=True)
    assert S(method="replacement").guidance_method() == guidance.Replacement()
    obj = guidance.PiGDM(data_std=0.5)
    assert S(method=obj).guidance_method() is obj
    for bad in (S(gamma=0.1), S(method="sda", cg_iters=2), S(method=obj, cg_iters=2), S(method="mmps", solver="lu")):
        with pytest.raises(guidance.GuidanceInputError):
            bad.check()

    seen = {}

    class Stop(Exception):
        pass

    def fake(model, obs, out, *, settings, **kw):
        seen["method"] = settings.guidance_method()
        raise Stop

    monkeypatch.setattr(pipeline, "assimilate", fake)
    base = ["assimilate", "--model", str(tmp_path), "--obs", "o.csv", "--time", "2020-01-01", "--out", str(tmp_path / "a.nc")]
    for extra, want in [(["--method", "sda", "--gamma", "0.05"], guidance.SDA(gamma=0.05)),
                        (["--solver", "gmres", "--cg-iters", "4", "--guidance-scale", "0.8"],
                         guidance.MMPS(cg_iters=4, solver="gmres", scale=0.8)),
                        (["--method", "regression", "--norm-matching"], guidance.Regression(norm_matching=True))]:
        res = CliRunner().invoke(app, base + extra)
        assert isinstance(res.exception, Stop), res.output
        assert seen["method"] == want
    res = CliRunner().invoke(app, base + ["--gamma", "0.1"])  # mmps has no gamma: a one-line error
    assert res.exit_code == 2 and "gamma" in res.stderr
