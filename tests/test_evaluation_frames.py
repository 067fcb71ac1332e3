"""jaxguide.verification.evaluation on trajectories (several frame times, a video model's run): the
ensemble is read in time with the rule assimilate used (the file's time_interpolation),
and the scores are also given per frame.

Reference: a field LINEAR in time (x = a + k b at frame k, white noise a, b), so the
ensemble at an observation between frames is exactly a + p b at its fractional frame
position p; the spatial part is read with assimilate's own point operator at T = 1, the
whole reading also with its frame stencil (observations.build_operator(frame_position)).
Tolerance: the file stores float32 physical values, relative ~1e-7 of the field's size;
we allow 1e-5 x (center + 3 scale) as tests/test_evaluation.py does.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from jaxguide.verification import evaluation, metrics

from jaxguide import io, observations

from jaxguide.assimilation import dataset as schema
from jaxguide.cli import app

NSIDE = 8
NPIX = 12 * NSIDE**2
CHANNELS = ["tas", "pres_msl"]
CENTER = np.array([286.0, 101160.0])
SCALE = np.array([15.0, 1100.0])
ATOL = 1e-5 * (CENTER + 3 * SCALE)
PROV = {"method": "mmps", "sigma_y": None, "guidance_scale": 1.0, "steps": 2, "seed": 0, "model_sha256": "f" * 64,
        "n_obs": 40, "command": "test", "observation_operator": "bilinear"}
START = pd.Timestamp("2016-02-28T18:00")
STEP_H = 6.0
T = 4
FRAMES = pd.DatetimeIndex([START + pd.Timedelta(hours=STEP_H * k) for k in range(T)])


def _trajectory(time_interpolation: str | None, m: int = 3, seed: int = 0):
    """(M, C, T, npix) normalised ensemble linear in time (net order), and its Dataset."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, 2, 1, NPIX))
    b = rng.normal(size=(m, 2, 1, NPIX))
    ens = (a + np.arange(T)[None, None, :, None] * b).astype(np.float32)
    prov = PROV if time_interpolation is None else PROV | {"time_interpolation": time_interpolation}
    ds = schema.analysis_to_dataset(ens, channels=CHANNELS, center=CENTER, scale=SCALE, times=FRAMES, provenance=prov)
    return ds, a, b


def _table(hours, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(hours)
    var = np.where(np.arange(n) % 2 == 0, "tas", "pres_msl")
    return pd.DataFrame({
        "time": [START + pd.Timedelta(hours=float(h)) for h in hours],
        "lat": np.degrees(np.arcsin(rng.uniform(-1, 1, n))),
        "lon": rng.uniform(0, 360, n),
        "variable": var,
        "value": np.where(var == "tas", 286.0, 101160.0) + rng.normal(size=n) * np.where(var == "tas", 15.0, 1100.0),
        "sigma": np.where(var == "tas", 1.0, 100.0),
    })


def _spatial(field: np.ndarray, table: pd.DataFrame) -> np.ndarray:
    """assimilate's bilinear point operator on (M, C, 1, npix) normalised states -> (M, n)."""
    op = observations.build_operator(table, CHANNELS, nside=NSIDE, method="bilinear")
    return np.asarray(jax.vmap(op)(jnp.asarray(field, jnp.float32)), np.float64)


def _physical(vals_n: np.ndarray, table: pd.DataFrame, *, offset: bool = True) -> np.ndarray:
    ch = np.array([CHANNELS.index(v) for v in table["variable"]])
    return vals_n * SCALE[ch] + (CENTER[ch] if offset else 0.0)


def test_linear_trajectory_is_read_exactly_between_frames():
    ds, a, b = _trajectory("linear")
    hours = np.array([0.0, 1.0, 2.0, 3.0, 4.5, 6.0, 8.0, 11.0, 13.5, 17.0, 18.0, 12.0] * 5)
    table = _table(hours, seed=1)
    at = evaluation.ensemble_at_observations(ds, table)
    p = hours / STEP_H  # fractional frame position
    want = _physical(_spatial(a, table) + p[None] * _spatial(b, table), table)
    # assimilate's own reading: the frame stencil of the operator on the (C, T, npix) state
    op = observations.build_operator(table, CHANNELS, nside=NSIDE, method="bilinear", frame_position=p, n_frames=T)
    ens_n = np.asarray(jax.vmap(op)(jnp.asarray(a + np.arange(T)[None, None, :, None] * b, jnp.float32)), np.float64)
    via_operator = _physical(ens_n, table)
    for i, var in enumerate(CHANNELS):
        rows = (table["variable"] == var).to_numpy()
        np.testing.assert_allclose(at[var].ensemble, want[:, rows], rtol=0, atol=ATOL[i])
        np.testing.assert_allclose(at[var].ensemble, via_operator[:, rows], rtol=0, atol=ATOL[i])
        # the nearest frame (a tie, 3 h or 15 h, goes to the earlier frame)
        np.testing.assert_array_equal(at[var].frame, np.floor(hours[rows] / STEP_H + 0.5 - 1e-9).astype(int))
    # between frames the nearest-time reading would be far off (the test can tell)
    ds_exact = ds.assign_attrs(time_interpolation="exact")
    near = evaluation.ensemble_at_observations(ds_exact, table)["tas"].ensemble
    rows = (table["variable"] == "tas").to_numpy()
    p_near = np.floor(hours / STEP_H + 0.5 - 1e-9)
    want_near = _physical(_spatial(a, table) + p_near[None] * _spatial(b, table), table)[:, rows]
    np.testing.assert_allclose(near, want_near, rtol=0, atol=ATOL[0])
    assert np.abs(near - at["tas"].ensemble).max() > 1.0


@pytest.mark.parametrize("attr", ["exact", None])
def test_exact_and_older_trajectories_take_the_nearest_time(attr):
    ds, a, b = _trajectory(attr, seed=2)
    hours = np.array([0.0, 2.0, 4.0, 6.0, 19.0, -5.0, 30.0, 9.5])  # outside the run too: nearest frame, as before
    table = _table(hours, seed=3)
    # within the time tolerance only (default 3 h: -5 h and 30 h are left out, counted)
    near = evaluation.evaluate(ds, {"assimilated": table}, variogram=False)
    assert near.skipped["assimilated"]["time_tolerance"]["n_obs"] == 2 and near.time_tolerance_hours == 3.0
    result = evaluation.evaluate(ds, {"assimilated": table}, variogram=False, time_tolerance_hours=24.0)
    assert result.time_rule == "nearest" and result.skipped == {}
    k = np.argmin(np.abs(hours[:, None] - STEP_H * np.arange(T)[None]), axis=1)
    want = _physical(_spatial(a, table) + k[None] * _spatial(b, table), table)
    for i, var in enumerate(CHANNELS):
        rows = (table["variable"] == var).to_numpy()
        np.testing.assert_allclose(result.samples["assimilated"][var].ensemble, want[:, rows], rtol=0, atol=ATOL[i])


def test_observations_outside_a_linear_trajectory():
    ds, _, _ = _trajectory("linear", seed=4)
    hours = np.array([-1.0, 0.0, 5.0, 18.0, 18.5, 40.0, 7.0, 9.0])
    table = _table(hours, seed=5)
    with pytest.raises(ValueError, match=r"3 observations lie outside the analysis times 2016-02-28T18:00:00 to "
                                         r"2016-02-29T12:00:00"):
        evaluation.ensemble_at_observations(ds, table)
    result = evaluation.evaluate(ds, {"held_out": table}, variogram=False)
    assert result.skipped == {"held_out": {"outside_time": {"n_obs": 3, "first": "2016-02-28T18:00:00",
                                                            "last": "2016-02-29T12:00:00"}}}
    assert sum(s["n_obs"] for s in result.metrics["held_out"].values()) == 5
    with pytest.raises(ValueError, match="none of the 2 assimilated observations lies within the analysis times"):
        evaluation.evaluate(ds, {"assimilated": table.iloc[[0, 5]]})
    with pytest.raises(ValueError, match="time_interpolation is 'cubic'"):
        evaluation.evaluate(ds.assign_attrs(time_interpolation="cubic"), {"assimilated": table})


def test_per_frame_metrics_group_observations_by_nearest_frame():
    ds, a, b = _trajectory("linear", m=4, seed=6)
    hours = np.array([0.0, 0.5, 2.9, 3.0, 3.1, 6.0, 6.0, 7.0, 8.9, 9.1, 17.5, 18.0, 16.0, 15.0, 1.0, 4.0, 12.0])  # odd: both variables at each
    table = _table(np.concatenate([hours, hours]), seed=7)
    extra = table.iloc[:2].assign(variable="unknown_var")
    result = evaluation.evaluate(ds, {"assimilated": pd.concat([table, extra], ignore_index=True)}, seed=3)
    assert result.skipped == {"assimilated": {"variables": ["unknown_var"], "n_obs": 2}}
    per = result.per_frame["assimilated"]
    assert list(per) == [t.isoformat() for t in FRAMES]
    # expected counts: nearest frame, ties (3 h, 15 h) to the earlier
    frame = np.floor(np.concatenate([hours, hours]) / STEP_H + 0.5 - 1e-9).astype(int)
    p = np.concatenate([hours, hours]) / STEP_H
    ref = _physical(_spatial(a, table) + p[None] * _spatial(b, table), table)
    for k, t in enumerate(FRAMES):
        for var in CHANNELS:
            rows = ((table["variable"] == var).to_numpy()) & (frame == k)
            got = per[t.isoformat()][var]
            assert got["n_obs"] == int(rows.sum()) > 0, (k, var)
            want = metrics.summarize(ref[:, rows], table["value"].to_numpy()[rows], obs_sigma=table["sigma"].to_numpy()[rows],
                                     seed=3, variogram=True)
            assert got["rmse"] == pytest.approx(want["rmse"], rel=1e-5)
            assert got["spread"] == pytest.approx(want["spread"], rel=1e-4)
            assert got["crps"] == pytest.approx(want["crps"], rel=1e-4)
    assert sum(per[t][v]["n_obs"] for t in per for v in per[t]) == len(table)
    js = json.loads(json.dumps(result.to_json("traj.nc")))
    assert js["time_interpolation"] == "linear" and js["per_frame"]["assimilated"][FRAMES[1].isoformat()]["tas"]["n_obs"] > 0


def test_single_time_files_have_no_per_frame_entries():
    rng = np.random.default_rng(8)
    ens = rng.normal(size=(3, 2, 1, NPIX)).astype(np.float32)
    ds = schema.analysis_to_dataset(ens, channels=CHANNELS, center=CENTER, scale=SCALE, times=[START],
                                    provenance=PROV | {"time_interpolation": "linear"})
    table = _table(np.array([-2.0, 0.0, 2.5, 1.0]), seed=9)  # within the image window: all read at the one time
    result = evaluation.evaluate(ds, {"assimilated": table})
    assert result.time_rule == "single" and result.per_frame == {} and result.skipped == {}
    assert set(result.to_json()) == {"analysis", "observation_operator", "skipped", "time_tolerance_hours", "sigma", "metrics"}
    assert result.samples["assimilated"]["tas"].frame is None


def test_cli_evaluate_prints_per_frame_table(tmp_path):
    ds, _, _ = _trajectory("linear", seed=10)
    path = io.write_dataset(ds, tmp_path / "traj.nc")
    table = _table(np.array([0.0, 1.0, 5.0, 6.5, 12.0, 13.0, 17.0, 18.0, 25.0, 2.0]), seed=11)
    table.to_csv(tmp_path / "obs.csv", index=False)
    res = CliRunner().invoke(app, ["evaluate", str(path), "--obs", str(tmp_path / "obs.csv"),
                                   "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    assert "assimilated per frame" in res.output and "time interpolation: linear" in res.output
    for t in FRAMES:
        assert t.strftime("%Y-%m-%dT%H:%M") in res.output
    assert "left out 1 observations outside the analysis times" in res.output
    js = json.loads((tmp_path / "m.json").read_text())
    frame_rows = [line for line in res.output.splitlines() if line.strip().startswith("2016-")]
    n_rows = sum(len(v) for v in js["per_frame"]["assimilated"].values())
    assert len(frame_rows) == n_rows
    first = js["per_frame"]["assimilated"][FRAMES[0].isoformat()]["tas"]
    assert f"{first['rmse']:.4g}" in res.output
