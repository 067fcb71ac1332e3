"""The demo (``jaxguide.demo.experiment.run_demo`` and ``jaxguide demo``) on a small configuration.

nside 8, 32 members, 16 Heun steps, 120 observation locations: one run is shared by
the module (~20 s with compilation on two CPU cores; the CLI run reuses its compiled
programs).
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import one_line_error

from jaxguide import demo, io

from jaxguide.model import gaussian

from jaxguide.assimilation import dataset as schema
from jaxguide.cli import app

SMALL = dict(nside=8, lmax=12, length_scale_km=1500.0, members=32, steps=16, obs_count=120, cg_iters=8)
FILES = ("truth.nc", "obs.csv", "held_out.csv", "prior_ensemble.nc", "analysis_mmps.nc", "analysis_regression.nc",
         "summary.json")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    stages = []
    summary = demo.run_demo(out, demo.DemoConfig(**SMALL), progress=lambda i, n, name: stages.append((i, n, name)))
    return out, summary, stages


def test_files_written_and_cf(small_run):
    out, summary, stages = small_run
    for name in FILES:
        assert (out / name).is_file(), name
    assert [s[0] for s in stages] == list(range(len(demo.STAGES)))
    for name in ("truth.nc", "prior_ensemble.nc", "analysis_mmps.nc", "analysis_regression.nc"):
        ds = io.read_analysis(out / name)
        assert schema.check_cf(ds) == [], name
        assert set(schema.channel_variables(ds)) == {"T850", "T500", "T300"}
        assert ds.attrs["model_sha256"] == summary["model_sha256"] and len(summary["model_sha256"]) == 64
        assert "gaussian-prior" in ds.attrs["model"]
    ds = io.read_analysis(out / "analysis_mmps.nc")
    assert ds.sizes["member"] == SMALL["members"] and "T850_prior_mean" in ds
    assert ds.attrs["n_obs"] == summary["n_obs"]["assimilated"]
    # physical units and a plausible climatology: T850 warmer than T500 warmer than T300
    t = {c: float(ds[c].mean()) for c in ("T850", "T500", "T300")}
    assert 260 < t["T850"] < 300 and t["T850"] - 30 < t["T500"] < t["T850"] - 10 and t["T300"] < t["T500"] - 10
    pngs = [p for p in os.listdir(out) if p.endswith(".png")]
    assert {"maps_mmps_T850.png", "rank_held_out_mmps.png", "rank_held_out_regression.png"} <= set(pngs)
    assert json.loads((out / "summary.json").read_text())["methods"].keys() == summary["methods"].keys()


def test_mmps_beats_prior_and_matches_exact_posterior(small_run):
    _, summary, _ = small_run
    m = summary["methods"]
    assert m["mmps"]["held_out"]["all"]["rmse"] < m["prior"]["held_out"]["all"]["rmse"]
    assert m["mmps"]["assimilated"]["all"]["rmse"] < m["prior"]["assimilated"]["all"]["rmse"]
    # Tolerance on the mean error in posterior-std units: for an exact sampler each
    # pixel's (ensemble mean - posterior mean) / posterior std is N(0, 1/M), so the RMS
    # over the 3 x 768 pixels is 1/sqrt(M) = 0.177 (M = 32) up to the chi-square
    # fluctuation of a smooth field (>~100 effective degrees of freedom: < 10%);
    # 1.5/sqrt(M) = 0.265 leaves room for the sampler's discretisation and the truncated
    # CG (measured 0.195-0.200 over seeds 0-2) and still rejects regression guidance
    # (~0.98) and the prior (~1.9).
    bound = 1.5 / np.sqrt(SMALL["members"])
    ex = {k: m[k]["exact_posterior"]["all"] for k in m}
    assert ex["mmps"]["mean_error_post_std"] < bound
    assert ex["prior"]["mean_error_post_std"] > 3 * bound
    assert 0.9 < ex["mmps"]["spread_ratio"] < 1.2
    assert ex["prior"]["spread_ratio"] > 1.5  # the observations shrink the spread
    # spread-skill reported, near 1 for MMPS (120 noisy held-out values: loose bounds)
    ho = m["mmps"]["held_out"]["all"]
    assert 0.6 < ho["spread_skill_obs"] < 1.6 and "spread_skill" in ho
    # regression guidance reported beside it
    reg = m["regression"]
    assert np.isfinite(reg["held_out"]["all"]["rmse"]) and reg["options"]["scale"] > 0
    assert {r["method"] for r in demo.summary_rows(summary)} == {"prior", "mmps", "regression"}


def test_kalman_marginals_match_dense_posterior():
    cfg = demo.DemoConfig(**SMALL)
    prior = demo.build_prior(cfg)
    rng = np.random.default_rng(3)
    n = 15
    H = np.zeros((n, int(np.prod(prior.shape))))
    H[np.arange(n), rng.choice(H.shape[1], n, replace=False)] = 1.0
    y = H @ np.asarray(prior.mu).reshape(-1) + rng.normal(size=n) * 0.2
    sigma_y = 0.05 + 0.05 * rng.random(n)
    mean, std = gaussian.kalman_marginals(prior, H, y, sigma_y)
    ref_mean, ref_cov = prior.posterior(H, y, sigma_y)
    ref_std = np.sqrt(np.diag(ref_cov)).reshape(prior.shape)
    pstd = prior.std()
    np.testing.assert_allclose(gaussian.pointwise_std(prior), pstd, rtol=1e-10)
    assert np.max(np.abs(mean - ref_mean) / pstd) < 1e-4  # float32 Sigma H^T
    assert np.max(np.abs(std - ref_std) / pstd) < 1e-4
    assert np.min(ref_std / pstd) < 0.7  # the observations matter


def test_harmonic_basis_approximates_dense_kernel():
    vecs, vals, floor = gaussian.harmonic_basis(8, 1500.0, 12)
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(vals.size), atol=1e-10)
    K = gaussian.kernel_matrix(8, 1500.0)
    approx = (vecs * vals) @ vecs.T + floor * (np.eye(K.shape[0]) - vecs @ vecs.T)
    assert np.linalg.norm(approx - K) / np.linalg.norm(K) < 0.02
    assert np.trace(approx) == pytest.approx(K.shape[0])


def test_cli_demo_and_evaluate(small_run, tmp_path, monkeypatch):
    # the small configuration behind the CLI (same programs as the module's run: cached)
    monkeypatch.setattr(demo, "DemoConfig", functools.partial(demo.DemoConfig, **SMALL))
    out = tmp_path / "demo_out"
    runner = CliRunner()
    res = runner.invoke(app, ["demo", "--out", str(out), "--seed", "1", "--members", "32", "--steps", "16"])
    assert res.exit_code == 0, res.output
    for col in ("mmps", "regression", "prior", "RMSE", "spread"):
        assert col in res.stdout
    assert str(out) in res.stdout.replace("\n", "")
    for name in FILES:
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["seed"] == 1 and s["config"]["members"] == 32
    # the written files work with `jaxguide evaluate`
    res = runner.invoke(app, ["evaluate", str(out / "analysis_mmps.nc"), "--obs", str(out / "obs.csv"),
                              "--held-out", str(out / "held_out.csv"), "--truth", str(out / "truth.nc")])
    assert res.exit_code == 0, res.output
    assert "held_out" in res.stdout and "truth" in res.stdout


def test_cli_demo_bad_inputs(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["demo", "--help"])
    defaults = demo.DemoConfig()
    assert f"(default {defaults.members})" in res.stdout and f"(default {defaults.steps})" in res.stdout
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_line_error(runner.invoke(app, ["demo", "--out", str(afile)]))
    assert "not a directory" in line and str(afile) in line
    assert "members" in one_line_error(runner.invoke(app, ["demo", "--out", str(tmp_path / "o"), "--members", "1"]))
    if os.path.isdir("/sys"):
        assert "/sys" in one_line_error(runner.invoke(app, ["demo", "--out", "/sys/jaxguide_demo"]))
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            one_line_error(runner.invoke(app, ["demo", "--out", str(ro)]))
        finally:
            ro.chmod(0o700)
