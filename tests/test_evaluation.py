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
import xarray as xr
from typer.testing import CliRunner

from jaxguide.verification import evaluation, metrics

from jaxguide.grid import healpix

from jaxguide import io, observations

from jaxguide.assimilation import dataset as schema
from jaxguide.cli import app

NSIDE = 16
NPIX = 12 * NSIDE**2
CHANNELS = ["tas", "pres_msl"]
CENTER = np.array([286.0, 101160.0])
SCALE = np.array([15.0, 1100.0])
# sigma_y None: the analysis used the table's sigma, so evaluate scores with it too
PROV = {"method": "mmps", "sigma_y": None, "guidance_scale": 1.0, "steps": 6, "seed": 0, "model_sha256": "f" * 64,
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


# --------------------------------------------------------------------------------------
# issue 21 (3): only analysed times, a time tolerance, a checked truth, the analysis' sigma

CAMPAIGN_TIMES = pd.date_range("2020-01-01T00", periods=4, freq="6h")


def _one_time(k: int, *, m: int = 4, sigma_y=None, window_hours=3.0):
    rng = np.random.default_rng(100 + k)
    ens = rng.normal(size=(m, 2, 1, NPIX)).astype(np.float32)
    prov = PROV | {"sigma_y": sigma_y, "observation_operator": "bilinear", "observation_window_hours": window_hours}
    return schema.analysis_to_dataset(ens, channels=CHANNELS, center=CENTER, scale=SCALE, times=[CAMPAIGN_TIMES[k]],
                                      provenance=prov)


def _campaign(tmp_path, status: str):
    """A campaign store of CAMPAIGN_TIMES written as a campaign writes it: ``status`` per
    time, "a" analysed, "s" skipped, "p" pending (never written)."""
    from jaxguide.campaign.store import CampaignStore

    store = CampaignStore.create(tmp_path / "campaign.zarr", _one_time(0), CAMPAIGN_TIMES, {"case": "evaluate"})
    for k, s in enumerate(status):
        if s == "a":
            store.write_time(_one_time(k))
        elif s == "s":
            store.skip(CAMPAIGN_TIMES[k], "no observations within +-3 h")
    return store.path


def _campaign_obs(per_time: int = 10, seed: int = 12) -> pd.DataFrame:
    """``per_time`` observations within +-60 min of each campaign time (both variables)."""
    rng = np.random.default_rng(seed)
    parts = []
    for t in CAMPAIGN_TIMES:
        tab = _observations(per_time + 20, seed=int(rng.integers(1 << 30))).iloc[:per_time]
        parts.append(tab.assign(time=t + pd.to_timedelta(rng.integers(-60, 60, per_time), unit="min")))
    return pd.concat(parts, ignore_index=True)


def _numbers(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [tree] if isinstance(tree, float) else []


def test_cli_evaluate_campaign_with_a_skipped_time_scores_only_analysed_times(tmp_path):
    """The issue's repro: a campaign store with one skipped time gave 16 non-finite scores
    of 63; now the skipped time is reported and its observations are left out."""
    path = _campaign(tmp_path, "aasa")
    table = _campaign_obs()
    table.to_csv(tmp_path / "obs.csv", index=False)
    res = CliRunner().invoke(app, ["evaluate", str(path), "--obs", str(tmp_path / "obs.csv"), "--held-out",
                                   str(tmp_path / "obs.csv"), "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    js = json.loads((tmp_path / "m.json").read_text())
    scores = _numbers(js["metrics"])
    assert len(scores) >= 36 and all(np.isfinite(scores)), scores
    assert js["times"] == {"n_times": 4, "n_analysed": 3, "n_not_analysed": 1, "pending": [],
                           "skipped": {"2020-01-01T12:00:00": "no observations within +-3 h"}}
    for name in ("assimilated", "held_out"):
        assert js["skipped"][name]["time_tolerance"]["n_obs"] == 10
        assert sum(s["n_obs"] for s in js["metrics"][name].values()) == 30
    assert js["time_tolerance_hours"] == 3.0  # the analysis' own observation window
    assert "1 of the 4 times were not analysed" in res.output and "left out 10 observations" in res.output
    # every member is scored as it is: the result equals scoring the analysed times alone
    ds = io.read_analysis(path)
    done = ds.isel(time=[0, 1, 3]).drop_vars(["completed", "skipped_reason"])
    kept = table[(table["time"] - CAMPAIGN_TIMES[2]).abs() > pd.Timedelta(hours=2)]
    want = evaluation.evaluate(done, {"assimilated": kept}).metrics["assimilated"]
    assert js["metrics"]["assimilated"]["tas"]["crps"] == pytest.approx(want["tas"]["crps"], rel=1e-9)


def test_pending_times_are_not_scored_and_nothing_left_raises(tmp_path):
    path = _campaign(tmp_path, "apap")
    result = evaluation.evaluate(io.read_analysis(path), {"assimilated": _campaign_obs()})
    assert result.times["pending"] == ["2020-01-01T06:00:00", "2020-01-01T18:00:00"]
    assert result.skipped["assimilated"]["time_tolerance"]["n_obs"] == 20
    assert all(np.isfinite(_numbers(result.metrics)))
    (tmp_path / "none").mkdir()
    nothing = io.read_analysis(_campaign(tmp_path / "none", "pssp"))
    with pytest.raises(ValueError, match=r"no analysed time: 4 of 4 times are pending or skipped"):
        evaluation.evaluate(nothing, {"assimilated": _campaign_obs()})


def test_time_tolerance_single_time(tmp_path):
    """A single-time analysis was scored against observations of any date."""
    ds = _one_time(0, window_hours=1.0)
    table = _campaign_obs(per_time=10).iloc[:20]  # 10 near the analysis time, 10 at +6 h
    table.loc[:9, "time"] = CAMPAIGN_TIMES[0] + pd.Timedelta(minutes=30)
    table.loc[:1, "time"] = CAMPAIGN_TIMES[0] + pd.Timedelta(minutes=90)  # outside the 1 h window
    res = evaluation.evaluate(ds, {"assimilated": table})
    assert res.time_tolerance_hours == 1.0
    assert res.skipped["assimilated"]["time_tolerance"]["n_obs"] == 12
    assert "farther than 1 h from every analysed time" in res.skipped["assimilated"]["time_tolerance"]["reason"]
    assert sum(s["n_obs"] for s in res.metrics["assimilated"].values()) == 8
    wide = evaluation.evaluate(ds, {"assimilated": table}, time_tolerance_hours=8.0)
    assert wide.skipped == {} and sum(s["n_obs"] for s in wide.metrics["assimilated"].values()) == 20
    # no recorded window: 3 h
    no_attr = ds.copy()
    del no_attr.attrs["observation_window_hours"]
    assert evaluation.evaluate(no_attr, {"assimilated": table}).time_tolerance_hours == 3.0
    with pytest.raises(ValueError, match=r"none of the 10 assimilated observations lies within 1 h of an analysed time"):
        evaluation.evaluate(ds, {"assimilated": table.iloc[10:]})
    with pytest.raises(ValueError, match="time_tolerance_hours must be"):
        evaluation.evaluate(ds, {"assimilated": table}, time_tolerance_hours=-1.0)
    # through the CLI option
    path = io.write_dataset(ds, tmp_path / "a.nc")
    table.to_csv(tmp_path / "obs.csv", index=False)
    out = CliRunner().invoke(app, ["evaluate", str(path), "--obs", str(tmp_path / "obs.csv"), "--time-tolerance-hours",
                                   "8", "--json", str(tmp_path / "m.json")])
    assert out.exit_code == 0, out.output
    js = json.loads((tmp_path / "m.json").read_text())
    assert js["time_tolerance_hours"] == 8.0 and js["skipped"] == {}


def _truth_of(ds: xr.Dataset) -> xr.Dataset:
    return ds[CHANNELS].isel(member=0).copy(deep=True)


def test_truth_is_matched_by_time_nside_and_pixel_order(tmp_path):
    path = _campaign(tmp_path, "aasa")
    ds = io.read_analysis(path)
    truth = xr.concat([_truth_of(_one_time(k)) for k in range(4)], dim="time")
    res = evaluation.evaluate(ds, {"assimilated": _campaign_obs()}, truth=truth)
    assert res.metrics["truth"]["tas"]["n_obs"] == 3 * NPIX  # the analysed times only
    assert all(np.isfinite(_numbers(res.metrics["truth"])))
    one = _one_time(0)
    good = _truth_of(one)
    assert evaluation.truth_metrics(one, good)["tas"]["n_obs"] == NPIX
    shifted = good.assign_coords(time=good["time"].values + np.timedelta64(6, "h"))
    with pytest.raises(ValueError, match=r"the truth has no field at the analysis time\(s\) \['2020-01-01T00:00:00'\]"):
        evaluation.truth_metrics(one, shifted)
    coarse = _truth_of(schema.analysis_to_dataset(np.zeros((1, 2, 1, 12 * 8**2), np.float32), channels=CHANNELS,
                                                  center=CENTER, scale=SCALE, times=[CAMPAIGN_TIMES[0]], provenance=PROV))
    with pytest.raises(ValueError, match=r"the truth has nside 8 \(768 pixels\), the analysis nside 16"):
        evaluation.truth_metrics(one, coarse)
    ring_idx = healpix.reorder(np.arange(NPIX), "nest", "ring")  # same shape, other order
    ring = good.isel(pixel=ring_idx)
    with pytest.raises(ValueError, match="pixel order"):
        evaluation.truth_metrics(one, ring)
    declared = good.copy()
    declared["crs"] = xr.DataArray(np.int32(0), attrs={"healpix_order": "ring"})
    with pytest.raises(ValueError, match="the truth is in RING pixel order, the analysis in NEST"):
        evaluation.truth_metrics(one, declared)
    bare = good.drop_vars(["lat", "lon", "pixel", "cell_ids"])  # no coordinates to check: as before, by shape
    assert evaluation.truth_metrics(one, bare)["tas"]["n_obs"] == NPIX


@pytest.mark.parametrize("sigma_y, want", [(None, {"tas": 1.0, "pres_msl": 100.0}), (2.0, {"tas": 2.0, "pres_msl": 2.0}),
                                           ({"tas": 3.0}, {"tas": 3.0, "pres_msl": 100.0})])
def test_scores_use_the_analysis_sigma_y(sigma_y, want):
    """Scores used the table's sigma even where the analysis was made with --sigma-y."""
    ds = _one_time(0, sigma_y=sigma_y)
    table = _observations(60, seed=13).assign(time=CAMPAIGN_TIMES[0])
    res = evaluation.evaluate(ds, {"assimilated": table}, seed=4, variogram=False)
    for var in CHANNELS:
        a = res.samples["assimilated"][var]
        np.testing.assert_array_equal(a.sigma, want[var])
        ref = metrics.summarize(a.ensemble, a.value, obs_sigma=want[var], seed=4)
        assert res.metrics["assimilated"][var]["crps"] == ref["crps"]
    assert res.sigma == ({"source": "observation table"} if sigma_y is None
                         else {"source": "analysis sigma_y", "sigma_y": schema.describe_sigma_y(sigma_y)})
    assert res.to_json()["sigma"] == res.sigma
