"""jaxguide.verification.evaluation: the analysis is read at the observations with the operator that
assimilate used (recorded in the file), and the scores account for observation noise.

test_cli_evaluate_uses_the_assimilation_operator failed on the old code (``evaluate``
read the pixel with the nearest centre through a KD-tree, not the containing pixel of
``assimilate --interpolation nearest``, and never read bilinearly).
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from jaxguide.verification import evaluation

from jaxguide.grid import healpix

from jaxguide import io, observations

from jaxguide.assimilation import dataset as schema
from jaxguide.cli import app

NSIDE = 16
NPIX = 12 * NSIDE**2
CHANNELS = ["tas", "pres_msl"]
CENTER = np.array([286.0, 101160.0])
SCALE = np.array([15.0, 1100.0])
PROV = {"method": "mmps", "sigma_y": 1.0, "guidance_scale": 1.0, "steps": 6, "seed": 0, "model_sha256": "f" * 64,
        "n_obs": 40, "command": "test"}
TIME = "2022-03-01T00:00"


def _analysis(tmp_path, operator: str | None, m: int = 5, seed: int = 0):
    """A rough (white-noise) ensemble, so that reading a different pixel changes the scores."""
    rng = np.random.default_rng(seed)
    ens = rng.normal(size=(m, 2, 1, NPIX)).astype(np.float32)
    prov = PROV if operator is None else PROV | {"observation_operator": operator}
    ds = schema.analysis_to_dataset(ens, channels=CHANNELS, center=CENTER, scale=SCALE, times=[TIME], provenance=prov)
    path = io.write_dataset(ds, tmp_path / f"analysis_{operator}.nc")
    return path, ens


def _observations(n: int, seed: int) -> pd.DataFrame:
    """Random stations (uniform on the sphere, a few near the poles and on the 0/360 meridian)."""
    rng = np.random.default_rng(seed)
    lon = np.concatenate([rng.uniform(-180, 360, n - 20), rng.uniform(0, 360, 10), [359.9999, 0.0, -1e-6, 360.0, 0.5] * 2])
    lat = np.concatenate([np.degrees(np.arcsin(rng.uniform(-1, 1, n - 20))), rng.uniform(88, 90, 5), rng.uniform(-90, -88, 5),
                          rng.uniform(-60, 60, 10)])
    var = np.where(np.arange(n) % 2 == 0, "tas", "pres_msl")
    value = np.where(var == "tas", 286.0, 101160.0) + rng.normal(size=n) * np.where(var == "tas", 15.0, 1100.0)
    sigma = np.where(var == "tas", 1.0, 100.0)
    return pd.DataFrame({"time": TIME, "lat": lat, "lon": lon, "variable": var, "value": value, "sigma": sigma})


def _through_operator(ens_norm: np.ndarray, table: pd.DataFrame, method: str) -> dict[str, np.ndarray]:
    """The ensemble at the observations as assimilate's operator reads it (physical units)."""
    op = observations.build_operator(table, CHANNELS, nside=NSIDE, method=method)
    vals = np.asarray(jax.vmap(op)(jnp.asarray(ens_norm)), np.float64)  # (M, n) normalised
    ch = np.asarray(op.channel)
    phys = vals * SCALE[ch] + CENTER[ch]
    return {var: phys[:, (table["variable"] == var).to_numpy()] for var in CHANNELS}


@pytest.mark.parametrize("operator", ["nearest", "bilinear"])
def test_cli_evaluate_uses_the_assimilation_operator(tmp_path, operator):
    path, ens = _analysis(tmp_path, operator)
    table = _observations(300, seed=1)
    table.to_csv(tmp_path / "obs.csv", index=False)
    res = CliRunner().invoke(app, ["evaluate", str(path), "--obs", str(tmp_path / "obs.csv"), "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "m.json").read_text())["metrics"]["assimilated"]
    want = _through_operator(ens, table, operator)
    for var in CHANNELS:
        y = table.loc[table["variable"] == var, "value"].to_numpy()
        rmse = float(np.sqrt(np.mean((want[var].mean(0) - y) ** 2)))
        bias = float(np.mean(want[var].mean(0) - y))
        assert got[var]["rmse"] == pytest.approx(rmse, rel=1e-5), var
        assert got[var]["bias"] == pytest.approx(bias, rel=1e-4, abs=1e-6 * SCALE[CHANNELS.index(var)]), var


def test_ensemble_at_observations_is_the_operator(tmp_path):
    for operator in ("nearest", "bilinear"):
        path, ens = _analysis(tmp_path, operator, seed=2)
        ds = io.read_analysis(path)
        table = _observations(400, seed=3)
        at = evaluation.ensemble_at_observations(ds, table)
        want = _through_operator(ens, table, operator)
        for var in CHANNELS:
            # float32 file values and operator weights: relative 1e-6 of the field's size
            np.testing.assert_allclose(at[var].ensemble, want[var], rtol=0, atol=1e-5 * (CENTER + 3 * SCALE)[CHANNELS.index(var)])
            rows = (table["variable"] == var).to_numpy()
            np.testing.assert_array_equal(at[var].value, table.loc[rows, "value"].to_numpy())
            np.testing.assert_array_equal(at[var].lon, table.loc[rows, "lon"].to_numpy())
    # the two schemes really differ on this field (so the test above can tell them apart)
    nearest = evaluation.ensemble_at_observations(ds, table, "nearest")["tas"].ensemble
    assert np.abs(nearest - at["tas"].ensemble).max() > 1.0


def test_older_files_default_to_bilinear_with_a_note(tmp_path, caplog):
    path, ens = _analysis(tmp_path, None)
    ds = io.read_analysis(path)
    table = _observations(60, seed=4)
    with caplog.at_level(logging.WARNING, logger="jaxguide.verification.evaluation"):
        result = evaluation.evaluate(ds, {"assimilated": table})
    assert result.operator == "bilinear"
    assert "observation_operator" in caplog.text and "bilinear" in caplog.text
    want = _through_operator(ens, table, "bilinear")["tas"]
    y = table.loc[table["variable"] == "tas", "value"].to_numpy()
    assert result.metrics["assimilated"]["tas"]["rmse"] == pytest.approx(float(np.sqrt(np.mean((want.mean(0) - y) ** 2))), rel=1e-5)
    bad = ds.assign_attrs(observation_operator="cubic")
    with pytest.raises(ValueError, match="cubic"):
        evaluation.evaluate(bad, {"assimilated": table})


def _hand_scores(ens: np.ndarray, y: np.ndarray, sigma: np.ndarray, seed: int) -> dict:
    """The scores at observations computed from their definitions (jaxguide/verification/metrics.py's
    module doc), with plain NumPy: the predictive ensemble ens + sigma * N(0, 1) drawn as
    documented (``numpy.random.default_rng(seed)``, (M, n) standard normals) for the CRPS,
    energy, variogram and rank scores; the members themselves for RMSE, bias and spread."""
    m, n = ens.shape
    pert = ens + sigma[None, :] * np.random.default_rng(seed).standard_normal((m, n))
    pairs = np.abs(pert[:, None, :] - pert[None, :, :])  # (M, M, n)
    crps = np.mean(np.abs(pert - y[None, :]), 0) - pairs.sum((0, 1)) / (2 * m * (m - 1))  # fair kernel form
    dist = np.linalg.norm(pert[:, None, :] - pert[None, :, :], axis=-1)  # (M, M)
    energy = np.mean(np.linalg.norm(pert - y[None, :], axis=1)) - dist.sum() / (2 * m * (m - 1))
    v_obs = np.abs(y[:, None] - y[None, :]) ** 0.5
    v_ens = np.mean(np.abs(pert[:, :, None] - pert[:, None, :]) ** 0.5, axis=0)
    ranks = np.sum(pert < y[None, :], axis=0)  # continuous values: no ties
    err = ens.mean(0) - y
    spread = np.sqrt(np.mean(np.var(ens, axis=0, ddof=1)))
    rmse = np.sqrt(np.mean(err**2))
    return {
        "rmse": rmse, "bias": np.mean(err), "spread": spread, "crps": np.mean(crps), "energy_score": energy,
        "variogram_score": np.sum((v_obs - v_ens) ** 2), "rank_histogram": np.bincount(ranks, minlength=m + 1).tolist(),
        "spread_skill": np.sqrt((m + 1) / m * spread**2) / rmse,
        "spread_skill_obs": np.sqrt((m + 1) / m * spread**2 + np.mean(sigma**2)) / rmse,
        "crps_without_noise": np.mean(np.mean(np.abs(ens - y[None, :]), 0)
                                      - np.abs(ens[:, None] - ens[None, :]).sum((0, 1)) / (2 * m * (m - 1))),
    }


def test_evaluate_reports_noise_aware_and_multivariate_scores(tmp_path):
    """Every score at the observations equals its hand computation (:func:`_hand_scores`)
    on the ensemble read by the assimilation operator. Tolerance 1e-5 relative: the file
    stores float32 physical values and the operator here runs in float32 (round-off
    ~1e-7 of the field, ~286 K / 101160 Pa, against scores of 5..15 K / 300..1100 Pa;
    measured <= 2.4e-7); the rank histogram exactly. Ignoring the observation noise
    changes the CRPS by 0.6 % (tas) and 0.17 % (pres_msl)."""
    path, ens = _analysis(tmp_path, "bilinear", m=4)
    ds = io.read_analysis(path)
    table = _observations(80, seed=5)
    extra = table.iloc[:3].assign(variable="unknown_var")
    result = evaluation.evaluate(ds, {"assimilated": pd.concat([table, extra], ignore_index=True)}, seed=7)
    s = result.metrics["assimilated"]["tas"]
    for key in ("energy_score", "variogram_score", "crps", "spread_skill_obs", "rank_histogram"):
        assert key in s and s[key] is not None
    assert s["obs_noise_in_scores"] and s["n_obs"] == 40
    assert result.skipped == {"assimilated": {"variables": ["unknown_var"], "n_obs": 3}}
    # the values
    at = _through_operator(ens, table, "bilinear")
    for var in CHANNELS:
        got = result.metrics["assimilated"][var]
        rows = (table["variable"] == var).to_numpy()
        y, sigma = table.loc[rows, "value"].to_numpy(), table.loc[rows, "sigma"].to_numpy()
        want = _hand_scores(at[var], y, sigma, seed=7)
        assert got["n_obs"] == rows.sum() == 40 and got["n_members"] == 4
        assert got["crps_form"] == got["energy_score_form"] == "fair"
        for key in ("rmse", "spread", "crps", "energy_score", "variogram_score", "spread_skill", "spread_skill_obs"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (var, key, got[key], want[key])
        assert got["bias"] == pytest.approx(want["bias"], rel=1e-4, abs=1e-6 * SCALE[CHANNELS.index(var)]), var
        assert got["rank_histogram"] == want["rank_histogram"], var
        assert sum(got["rank_histogram"]) == 40
        # the noise is really in the scores: the members' own CRPS is different
        assert abs(got["crps"] - want["crps_without_noise"]) > 1e-3 * want["crps"], var
    # deterministic in the seed
    again = evaluation.evaluate(ds, {"assimilated": table}, seed=7).metrics["assimilated"]["tas"]
    assert again["crps"] == s["crps"] and again["energy_score"] == s["energy_score"]
    assert json.loads(json.dumps(result.to_json("a.nc")))["observation_operator"] == "bilinear"
    with pytest.raises(ValueError, match="HEALPix"):
        evaluation.ensemble_at_observations(ds.rename({"pixel": "cell"}), table)
