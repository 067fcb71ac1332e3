"""The fault battery of the campaign store: kill -9 at points spread over a campaign and
its resumes, damaged chunk files, edited observation files, a file-size limit, a
read-only output directory. In each, nothing is lost: the resumed store equals an
uninterrupted run bit for bit, or the run stops with one line naming the problem.

The campaign is tests/campaign_case.py's (the exact Gaussian-prior denoiser, 4 times, one
skipped); the kills use the store's test hook ``JAXGUIDE_TEST_KILL_AT`` (see
:func:`jaxguide.campaign.store.fault_hook`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import campaign_case as case
from conftest import _CACHE, one_line_error, require_module, skip_or_fail
from jaxguide.assimilation.session import Session
from jaxguide.campaign.run import assimilate_campaign
from jaxguide.campaign.store import ANALYSED, CAMPAIGN_ATTR, KILL_AT_ENV, PENDING, SKIPPED, CampaignStore, InputsChangedError, read_campaign
from jaxguide.cli import app
from jaxguide.model.conditioning import assemble
from jaxguide.model.sst import SSTTimeError
from test_campaign import _env, assert_same_store
from test_sst import write_sst_steps

require_module("zarr")
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted campaign, and the session (compiled programs) the in-process runs share."""
    path = tmp_path_factory.mktemp("faults") / "ref.zarr"
    session = Session(case.model())
    assimilate_campaign(None, case.table(), path, case.TIMES, case.settings(), session=session)
    return dict(path=path, session=session, data=read_campaign(path))


def _case_process(path: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    """tests/campaign_case.py as its own process (it resumes the store if present), with the
    test run's compilation cache; ``kill``: the JAXGUIDE_TEST_KILL_AT point."""
    env = {**_env(), "JAX_COMPILATION_CACHE_DIR": str(_CACHE), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop(KILL_AT_ENV, None)
    if kill:
        env[KILL_AT_ENV] = kill
    return subprocess.run([sys.executable, str(TESTS / "campaign_case.py"), str(path)], env=env, capture_output=True,
                          text=True, timeout=300)


def _nothing_lost(path: Path, reference) -> np.ndarray:
    """Every time of the store is complete with the reference's data, or pending."""
    ds, ref = read_campaign(path), reference["data"]
    status = ds["completed"].values
    for i in np.flatnonzero(status != PENDING):
        for name in ref.data_vars:
            if "time" in ref[name].dims:
                x, y = ds[name].isel(time=i).values, ref[name].isel(time=i).values
                same = np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else x.tolist() == y.tolist()
                assert same, (i, name)
    return status


# kill -9 points, in the order one campaign and its resumes meet them (times 0, 1, 3 are
# analysed, 2 is skipped); "+S": S seconds after the point, in the compile or sampling
# that follows. Every run after the first is a resume, so most kills hit a resume.
KILLS = [
    "start+0.1",  # tracing / compiling / sampling time 0 in a fresh store
    "before_data:0",
    "after_data:0",  # data written and fsynced, flag not: the time is redone
    "after_flag:0+0.01",  # sampling time 1 (or writing it)
    "after_data:1",
    "after_flag:1",
    "after_data:2",  # a skipped time: reason written, flag not
    "before_data:3",
    "after_data:3",
    "before_consolidate",  # every time complete, the run not finished
]


@pytest.mark.slow  # 11 processes: 88-115 s on the 2 shared cores of the dev machine
def test_kill9_at_ten_points_then_resume_is_identical(reference, tmp_path):
    path = tmp_path / "killed.zarr"
    hit = []
    for point in KILLS:
        index = point.split(":")[1].split("+")[0] if ":" in point else None
        if index is not None and path.exists() and CampaignStore.open(path).status()[int(index)] != PENDING:
            continue  # done already (a delayed kill came later than usual)
        res = _case_process(path, point)
        assert res.returncode == -signal.SIGKILL, (point, res.returncode, res.stdout[-2000:], res.stderr[-3000:])
        hit.append(point)
        if path.exists() and (path / "completed").exists():
            _nothing_lost(path, reference)
    assert len(hit) >= 9, hit
    res = _case_process(path)
    assert res.returncode == 0 and "finished" in res.stdout, res.stderr[-3000:]
    assert_same_store(path, reference["path"])


def test_kill9_between_data_and_flag_then_resume(reference, tmp_path):
    """The cheap one of the default set: killed with time 1's data on disk and its flag
    not; the resume redoes it and the store equals an uninterrupted run."""
    path = tmp_path / "killed.zarr"
    res = _case_process(path, "after_data:1")
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert list(_nothing_lost(path, reference)) == [1, 0, 0, 0]
    summary = assimilate_campaign(None, case.table(), path, case.TIMES, case.settings(),
                                  session=reference["session"], resume=True)
    assert summary["pending_at_start"] == 3
    assert_same_store(path, reference["path"])


def test_damaged_chunks_are_redone_on_resume(reference, tmp_path):
    path = tmp_path / "damaged.zarr"
    shutil.copytree(reference["path"], path)
    chunk = path / "T850" / "c" / "0" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])  # truncated
    (path / "T500_prior_mean" / "c" / "3" / "0").unlink()  # deleted
    (path / "completed" / "c" / "0").write_bytes(b"")  # an empty flag chunk
    summary = assimilate_campaign(None, case.table(), path, case.TIMES, case.settings(),
                                  session=reference["session"], resume=True)
    assert summary["pending_at_start"] == 3 and [e["time"] for e in summary["this_process"]] == [
        str(case.TIMES[i]) for i in (0, 1, 3)]
    assert_same_store(path, reference["path"])


@pytest.mark.parametrize("layout", ["file", "partitioned"])
def test_observations_edited_between_runs(reference, tmp_path, layout):
    table = case.table()
    if layout == "file":
        obs = edited = tmp_path / "obs.parquet"
        table.to_parquet(obs)
    else:
        obs = tmp_path / "obs"
        obs.mkdir()
        for t, rows in table.groupby(table["time"].dt.floor("6h")):
            rows.to_parquet(obs / f"{t:%Y-%m-%dT%H}.parquet")
        edited = obs / f"{case.TIMES[1]:%Y-%m-%dT%H}.parquet"
    path, s = tmp_path / "s.zarr", reference["session"]
    assimilate_campaign(None, obs, path, case.TIMES[:2], case.settings(), session=s)
    rows = table if layout == "file" else table[table["time"].dt.floor("6h") == case.TIMES[1]]
    rows.assign(value=rows["value"] + 1.0).to_parquet(edited)
    with pytest.raises(InputsChangedError, match="observations file " + repr(str(edited)).replace(".", r"\.")) as e:
        assimilate_campaign(None, obs, path, case.TIMES[:2], case.settings(), session=s, resume=True)
    assert "\n" not in str(e.value) and "--allow-changed-inputs" in str(e.value)
    summary = assimilate_campaign(None, obs, path, case.TIMES[:2], case.settings(), session=s, resume=True,
                                  allow_changed_inputs=True)
    assert summary["pending_at_start"] == 0
    # the allowed change is recorded: the next resume checks against the edited file
    meta = json.loads(read_campaign(path).attrs[CAMPAIGN_ATTR])
    assert len(meta["input_changes"]) == 1 and str(edited) in meta["input_changes"][0]["changes"][0]
    assimilate_campaign(None, obs, path, case.TIMES[:2], case.settings(), session=s, resume=True)


def test_bad_sst_months_skip_their_times(reference, tmp_path):
    """An SST file with an infinite value in one step and an unmasked fill value in
    another: the times interpolated from those steps are skipped, naming the step; the
    others equal the uninterrupted reference bit for bit. A time outside the SST file is
    refused before the store exists. (The Gaussian model has no SST channel: its
    conditioning here reads the file as an SST-conditioned cBottle's does.)"""
    good = np.full((18, 36), 15.0)
    fields = np.stack([good] * 5)
    fields[0, 5, 5] = np.inf  # used by time 0 (00:00, between -3 h and 3 h)
    fields[4, 6, 6] = 1e20  # used by time 3 (18:00, between 15 h and 21 h)
    sst = write_sst_steps(tmp_path / "sst.nc", [-3, 3, 9, 15, 21], fields)
    m = case.model()
    conditioning = m.conditioning

    def with_sst(t, *, sst_path=None, sst_offset=0.0):
        assemble(t, nside=case.NSIDE, sst_channels=1, sst_path=sst_path, sst_offset=sst_offset)
        return conditioning(t)

    object.__setattr__(m, "conditioning", with_sst)  # a frozen dataclass: this instance only
    session = Session(m)
    path = tmp_path / "s.zarr"
    assimilate_campaign(None, case.table(), path, case.TIMES, case.settings(), session=session, sst=sst)
    ds, ref = read_campaign(path), reference["data"]
    assert list(ds["completed"].values) == [SKIPPED, ANALYSED, SKIPPED, SKIPPED]
    reasons = ds["skipped_reason"].values
    assert "1 infinite value(s) at 2019-12-31 21:00:00 (used for 2020-01-01 00:00:00)" in reasons[0], reasons[0]
    assert reasons[2] == ref["skipped_reason"].values[2]  # its observations: rejected before the SST is read
    assert "outside -5..50 deg C at 2020-01-01 21:00:00" in reasons[3], reasons[3]
    for name in ref.data_vars:
        if "time" in ref[name].dims and ref[name].dtype.kind == "f":
            assert np.array_equal(ds[name].isel(time=1).values, ref[name].isel(time=1).values, equal_nan=True), name
    short = write_sst_steps(tmp_path / "short.nc", [-3, 3, 9, 15], fields[:4])
    with pytest.raises(SSTTimeError, match=r"time 2020-01-01 18:00:00 is outside the SST data"):
        assimilate_campaign(None, case.table(), tmp_path / "t.zarr", case.TIMES, case.settings(), session=session,
                            sst=short)
    assert not (tmp_path / "t.zarr").exists()


FSIZE_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    import numpy as np
    import xarray as xr
    from jaxguide.io.files import write_dataset, write_json_atomic
    d = sys.argv[1]

    def ds(m):
        return xr.Dataset({"T850": (("member", "pixel"), np.random.default_rng(m).normal(size=(m, 768)).astype("f4"))})

    write_json_atomic(f"{d}/s.json", {"a": 1})
    write_dataset(ds(3), f"{d}/a.nc")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    for write in (lambda: write_json_atomic(f"{d}/s.json", {"a": list(range(20000))}),
                  lambda: write_dataset(ds(40), f"{d}/a.nc", overwrite=True),
                  lambda: write_dataset(ds(40), f"{d}/b.zarr", format="zarr")):
        try:
            write()
            print("no error")
        except OSError as e:
            print(" ".join(str(e).split("\\n")))
    """
)


def test_write_over_the_file_size_limit(tmp_path):
    res = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, str(tmp_path)], env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3, res.stdout
    for line, name in zip(lines, ("s.json", "a.nc", "b.zarr")):
        assert name in line and ("File too large" in line or "file-size limit" in line), line

    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}  # the previous files, intact
    from jaxguide.io.files import read_analysis

    assert read_analysis(tmp_path / "a.nc").sizes["member"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nc", "s.json"]  # no temporaries left


def test_read_only_output_directory(reference, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: sysfs refuses new files
            if not Path("/sys").is_dir():
                skip_or_fail("cannot make a read-only directory here")
            ro = Path("/sys")
        res = CliRunner().invoke(app, ["campaign", "--model", str(tmp_path / "model"), "--obs", str(tmp_path / "o.csv"),
                                       "--out", str(ro / "s.zarr"), "--times", "2020-01-01T00/2020-01-01T06/PT6H"])
        line = one_line_error(res)
        assert str(ro) in line and ("cannot create files" in line or "not writable" in line), line
        with pytest.raises(PermissionError, match=str(ro)):
            assimilate_campaign(None, case.table(), ro / "s.zarr", case.TIMES[:1], case.settings(),
                                session=reference["session"])
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_cli_names_the_changed_file_and_allows_it_explicitly(tmp_path, monkeypatch):
    """``jaxguide campaign --resume``: a changed input is one error line; with
    ``--allow-changed-inputs`` the library is asked to continue (the library's check is
    tested above; here the command line's wiring)."""
    import jaxguide.campaign.run as run

    asked = []

    def fake(*a, allow_changed_inputs=False, **k):
        asked.append(allow_changed_inputs)
        if not allow_changed_inputs:
            raise InputsChangedError(f"cannot resume 's.zarr': the observations file {str(tmp_path / 'o.csv')!r} "
                                     "(size 1 -> 2) changed since the store was made; use the same inputs, a new "
                                     "--out, or --allow-changed-inputs to continue anyway")
        return {"store": str(tmp_path / "s.zarr"), "process": 0, "processes": 1, "times": 2, "pending_at_start": 0,
                "this_process": [], "seconds_total": 0.0, "denoiser_calls_per_member": 2, "analysed": 2,
                "skipped": 0, "incomplete": 0}

    monkeypatch.setattr(run, "assimilate_campaign", fake)
    base = ["campaign", "--model", str(tmp_path / "model"), "--obs", str(tmp_path / "o.csv"), "--out",
            str(tmp_path / "s.zarr"), "--times", "2020-01-01T00/2020-01-01T06/PT6H", "--resume", "--no-cache"]
    line = one_line_error(CliRunner().invoke(app, base))
    assert "o.csv" in line and "--allow-changed-inputs" in line
    res = CliRunner().invoke(app, base + ["--allow-changed-inputs"])
    assert res.exit_code == 0, res.output
    assert asked == [False, True]
