"""Campaigns: compile once, skipped times, per-time seeds, kill -9 and resume, 2 processes.

The model is the exact Gaussian-prior denoiser (tests/campaign_case.py); the cBottle
fixture checkpoint runs a campaign through the CLI in tests/test_campaign_cli.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import campaign_case as case
from conftest import require_module
from jaxguide.campaign.run import assimilate_campaign
from jaxguide.campaign.store import ANALYSED, PENDING, SKIPPED, CampaignStore, SettingsMismatchError, read_campaign
from jaxguide.diffusion.ensemble import count_compiles
from jaxguide.assimilation.session import Session

require_module("zarr")
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def assert_same_store(a_path, b_path):
    """Every variable and coordinate bit-identical (NaN where NaN), attributes aside."""
    a, b = read_campaign(a_path), read_campaign(b_path)
    assert sorted(a.variables) == sorted(b.variables)
    for name in a.variables:
        x, y = a[name].values, b[name].values
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), name
        else:
            assert x.tolist() == y.tolist(), name
    assert a.attrs["jaxguide_campaign"] == b.attrs["jaxguide_campaign"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process campaign; compile events recorded per time."""
    path = tmp_path_factory.mktemp("campaign") / "ref.zarr"
    session = Session(case.model())
    per_time = []
    with count_compiles() as compiles:
        summary = assimilate_campaign(None, case.table(), path, case.TIMES, case.settings(), session=session,
                                      progress=lambda p: per_time.append((p, len(compiles))))
    return dict(path=path, session=session, summary=summary, per_time=per_time)


def test_campaign_compiles_once_and_records_skips(reference):
    per_time = reference["per_time"]
    assert [p.done for p, _ in per_time] == [1, 2, 3, 4] and all(p.total == 4 for p, _ in per_time)
    assert per_time[-1][0].eta_s == 0.0 and per_time[0][0].eta_s > 0
    first = per_time[0][1]
    assert first >= 2  # the analysis and prior programs
    assert [n - first for _, n in per_time[1:]] == [0, 0, 0], "a later time compiled again"
    ds = read_campaign(reference["path"])
    assert list(ds["completed"].values) == [ANALYSED, ANALYSED, SKIPPED, ANALYSED]
    assert ds["skipped_reason"].values[2] == "all 30 observations rejected (bad_lat: 30)"
    assert list(ds["n_obs"].values) == [10, 20, 0, 40]
    assert np.isfinite(ds["T850"].isel(time=[0, 1, 3]).values).all() and np.isnan(ds["T850"].isel(time=2).values).all()
    assert np.isfinite(ds["T850_prior_mean"].isel(time=[0, 1, 3]).values).all()
    assert reference["summary"]["analysed"] == 3 and reference["summary"]["skipped"] == 1


def test_seed_depends_on_time_not_order(reference, tmp_path):
    """A campaign of two of the times reproduces them bit for bit."""
    sub = case.TIMES[[1, 3]]
    assimilate_campaign(None, case.table(), tmp_path / "sub.zarr", sub, case.settings(), session=reference["session"])
    a, b = read_campaign(reference["path"]), read_campaign(tmp_path / "sub.zarr")
    for name in ("T850", "T500", "T850_prior_mean"):
        np.testing.assert_array_equal(a[name].sel(time=sub).values, b[name].values)
    # and the member draws differ between times
    assert not np.array_equal(a["T850"].isel(time=0).values, a["T850"].isel(time=1).values)


def test_resume_rules(reference, tmp_path):
    path = tmp_path / "c.zarr"
    s = reference["session"]
    assimilate_campaign(None, case.table(), path, case.TIMES[:2], case.settings(), session=s)
    with pytest.raises(FileExistsError, match="--resume"):
        assimilate_campaign(None, case.table(), path, case.TIMES[:2], case.settings(), session=s)
    with pytest.raises(SettingsMismatchError, match="made with seed=11, this run has seed=12") as e:
        assimilate_campaign(None, case.table(), path, case.TIMES[:2], case.settings(seed=12), session=s, resume=True)
    assert e.value.setting == "seed"
    with pytest.raises(SettingsMismatchError) as e:
        assimilate_campaign(None, case.table(), path, case.TIMES, case.settings(), session=s, resume=True)
    assert e.value.setting == "times"
    summary = assimilate_campaign(None, case.table(), path, case.TIMES[:2], case.settings(), session=s, resume=True)
    assert summary["pending_at_start"] == 0 and summary["this_process"] == []


def test_sigma_y_naming_a_variable_one_window_lacks_skips_that_time(reference, tmp_path):
    """Only the first time's window has T500 (the others' T500 rows become T850, so the
    padding and programs stay the reference's): a per-variable sigma_y naming T500 skips
    the other times with the reason, and the run completes."""
    table = case.table()
    later = table["time"] > case.TIMES[0] + pd.Timedelta(hours=3)
    table.loc[later & (table["variable"] == "T500"), "variable"] = "T850"
    settings = case.settings(sigma_y={"T850": 1.0, "T500": 0.8})
    summary = assimilate_campaign(None, table, tmp_path / "s.zarr", case.TIMES, settings, session=reference["session"])
    ds = read_campaign(tmp_path / "s.zarr")
    assert list(ds["completed"].values) == [ANALYSED, SKIPPED, SKIPPED, SKIPPED]
    for k in (1, 3):
        assert ds["skipped_reason"].values[k] == "--sigma-y names variables with no observations: ['T500']"
        assert np.isnan(ds["T850"].isel(time=k).values).all() and ds["n_obs"].values[k] == 0
    assert ds["skipped_reason"].values[2] == "all 30 observations rejected (bad_lat: 30)"
    assert np.isfinite(ds["T850"].isel(time=0).values).all()
    assert (summary["analysed"], summary["skipped"], summary["incomplete"]) == (1, 3, 0)


def test_non_finite_analysis_skips_that_time(reference, tmp_path, monkeypatch):
    """A non-finite analysis ensemble at the second time (the sampler's output replaced
    by NaN) skips that time with the reason; the other times equal the reference's."""
    session, calls = reference["session"], []
    programs = session.programs

    def poisoned(*args, **kwargs):
        out = programs(*args, **kwargs)
        calls.append(len(calls))
        return np.full(np.shape(out), np.nan, np.float32) if len(calls) == 3 else out  # time 1's analysis

    monkeypatch.setattr(session, "programs", poisoned)
    summary = assimilate_campaign(None, case.table(), tmp_path / "s.zarr", case.TIMES, case.settings(), session=session)
    assert len(calls) == 5  # analysis + prior at times 0 and 3, the analysis at time 1 (2 has no valid rows)
    a, b = read_campaign(reference["path"]), read_campaign(tmp_path / "s.zarr")
    assert list(b["completed"].values) == [ANALYSED, SKIPPED, SKIPPED, ANALYSED]
    assert b["skipped_reason"].values[1].startswith("non-finite values in the analysis ensemble (method 'dps'")
    assert np.isnan(b["T850"].isel(time=1).values).all() and np.isnan(b["T850_prior_mean"].isel(time=1).values).all()
    for name in ("T850", "T500", "T850_prior_mean"):
        np.testing.assert_array_equal(a[name].isel(time=[0, 3]).values, b[name].isel(time=[0, 3]).values)
    assert (summary["analysed"], summary["skipped"]) == (2, 2)


def _env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "JAX_PLATFORMS": "cpu"}
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        env.pop(var, None)
    return env


def test_kill_and_resume_is_identical(reference, tmp_path):
    path = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, str(TESTS / "campaign_case.py"), str(path), "--sleep", "1.5"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill -9 once the first time is complete
            if path.exists() and (path / "completed").exists():
                status = CampaignStore.open(path).status()
                if (status != PENDING).any():
                    break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    status = CampaignStore.open(path).status()
    assert (status != PENDING).any() and (status == PENDING).any(), status  # killed mid-campaign
    summary = assimilate_campaign(None, case.table(), path, case.TIMES, case.settings(),
                                  session=reference["session"], resume=True)
    assert summary["pending_at_start"] == int((status == PENDING).sum())
    assert_same_store(path, reference["path"])


@pytest.mark.slow  # > 20 s on 2 cores: in the `-m slow` set that CI also runs (README, Tests)
def test_two_processes_write_the_same_store(reference, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        addr = f"localhost:{s.getsockname()[1]}"
    path = tmp_path / "two.zarr"
    procs = [subprocess.Popen([sys.executable, str(TESTS / "campaign_case.py"), str(path), "--coordinator", addr,
                               "--process-id", str(i)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    # round robin over the pending times: process 0 ran times 0 and 2, process 1 times 1 and 3
    assert "done 2/2 2020-01-01 12:00:00" in outs[0] and "done 2/2 2020-01-01 18:00:00" in outs[1]
    assert_same_store(path, reference["path"])


@pytest.mark.slow  # 28-61 s on 2 cores (two processes compile): in the `-m slow` set that CI also runs
def test_one_process_failing_stops_both_and_resume_completes(reference, tmp_path):
    """A fault that is not about the data (a RuntimeError from the model at one time) in
    process 1 of 2, at its second time: both exit non-zero within a bound, naming the
    failing process and time, and a resume completes the store as an uninterrupted run.
    (The abort and barrier mechanics in both directions: tests/test_distributed.py.)"""
    failing = 1
    with socket.socket() as s:
        s.bind(("localhost", 0))
        addr = f"localhost:{s.getsockname()[1]}"
    path = tmp_path / "failed.zarr"
    when = str(case.TIMES[3])
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(TESTS / "campaign_case.py"), str(path), "--coordinator", addr,
                               "--process-id", str(i), *(["--fail-at", when] if i == failing else [])],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, 240 - (time.monotonic() - t0)))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    seconds = time.monotonic() - t0
    assert seconds < 200, f"{seconds:.0f} s"  # a clean 2-process run of this case takes ~30-60 s on 2 cores
    said = f"process {failing} of 2 failed at analysis time {pd.Timestamp(when)}: RuntimeError: injected fault"
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode not in (0, None), out[-3000:]
        assert "CampaignAbortedError" in out and said in out, out[-3000:]
        assert "finished" not in out
    status = CampaignStore.open(path).status()
    assert (status == PENDING).any(), status
    summary = assimilate_campaign(None, case.table(), path, case.TIMES, case.settings(),
                                  session=reference["session"], resume=True)
    assert summary["pending_at_start"] == int((status == PENDING).sum()) and summary["incomplete"] == 0
    assert_same_store(path, reference["path"])


@pytest.mark.parametrize("layout", ["earth2studio_frame", "partitioned_directory"])
def test_observation_layouts_give_the_same_store(reference, tmp_path, layout):
    """The same observations as an earth2studio frame (no sigma column: sigma_y given) or
    as a directory of one Parquet file per time give the reference's numbers."""
    table = case.table()
    settings = case.settings()
    if layout == "earth2studio_frame":
        obs = table.drop(columns="sigma").rename(columns={"value": "observation"})
        obs["variable"] = obs["variable"].str.lower()  # earth2studio's names: t850, t500
        settings = case.settings(sigma_y=1.0)  # the reference's sigma column is 1.0 everywhere
    else:
        obs = tmp_path / "obs"
        obs.mkdir()
        for t, rows in table.groupby(table["time"].dt.floor("6h")):
            rows.to_parquet(obs / f"{t:%Y-%m-%dT%H}.parquet")
    assimilate_campaign(None, obs, tmp_path / "s.zarr", case.TIMES, settings, session=reference["session"])
    a, b = read_campaign(reference["path"]), read_campaign(tmp_path / "s.zarr")
    for name in a.variables:
        x, y = a[name].values, b[name].values
        assert np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else x.tolist() == y.tolist(), name
