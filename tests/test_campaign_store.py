"""Campaign zarr store: layout, per-time region writes, completion flags, resume checks."""

from pathlib import Path

import numpy as np
import pytest

from conftest import record_fsync_and_replace, require_module
from jaxguide.campaign.store import (
    ANALYSED,
    PENDING,
    SKIPPED,
    CampaignStore,
    CampaignStoreError,
    SettingsMismatchError,
    read_campaign,
)
from jaxguide.campaign.times import parse_times
from jaxguide.assimilation.dataset import REQUIRED_PROVENANCE, analysis_to_dataset, check_cf

require_module("zarr")

NPIX = 768  # nside 8
CHANNELS = ["tas", "T850"]
TIMES = parse_times("2020-01-01T00/2020-01-01T18/PT6H")
SETTINGS = {"method": "mmps", "steps": 3, "members": 2, "sigma_y": {"tas": 1.0}}
PROV = {k: "x" for k in REQUIRED_PROVENANCE}


def one_time(t, seed):
    """Dataset of one analysis time, as the campaign writes it."""
    x = np.random.default_rng(seed).normal(size=(2, 2, 1, NPIX)).astype(np.float32)
    ds = analysis_to_dataset(x, channels=CHANNELS, center=[280.0, 250.0], scale=[10.0, 8.0],
                             times=[t], provenance=PROV, prior=x[:1])
    ds["n_obs"] = ("time", np.array([seed + 3], np.int32), {"long_name": "observations assimilated", "units": "1"})
    return ds


def make(path):
    return CampaignStore.create(path, one_time(TIMES[0], 0), TIMES, SETTINGS)


def test_layout_and_cf(tmp_path):
    store = make(tmp_path / "c.zarr")
    assert list(store.status()) == [PENDING] * 4
    store.write_time(one_time(TIMES[2], 2))
    ds = read_campaign(store.path)
    assert ds["tas"].dims == ("member", "time", "pixel") and ds.sizes["time"] == 4
    assert [str(t) for t in ds["time"].values.astype("datetime64[s]")] == [str(t) for t in TIMES.to_numpy().astype("datetime64[s]")]
    assert check_cf(ds) == []
    assert ds["tas"].attrs["units"] == "K" and ds["crs"].attrs["grid_mapping_name"] == "healpix"
    assert list(ds["completed"].values) == [PENDING, PENDING, ANALYSED, PENDING]
    assert ds["completed"].attrs["flag_meanings"] == "pending analysed skipped"
    ref = one_time(TIMES[2], 2)
    for name in ("tas", "T850", "tas_prior_mean", "n_obs"):
        np.testing.assert_array_equal(ds[name].isel(time=[2]).values, ref[name].values)
    assert np.isnan(ds["tas"].isel(time=[0, 1, 3]).values).all()


def test_skip_records_reason_and_clears_data(tmp_path):
    store = make(tmp_path / "c.zarr")
    store.write_time(one_time(TIMES[1], 1))  # e.g. a run killed after writing the data...
    store.skip(TIMES[1], "all 5 observations rejected (bad_lat: 5)")
    ds = read_campaign(store.path)
    assert ds["completed"].values[1] == SKIPPED
    assert ds["skipped_reason"].values[1] == "all 5 observations rejected (bad_lat: 5)"
    assert np.isnan(ds["tas"].values[:, 1]).all() and ds["n_obs"].values[1] == 0
    with pytest.raises(CampaignStoreError, match="needs a reason"):
        store.skip(TIMES[0], "")


def test_flag_is_written_last(tmp_path, monkeypatch):
    """A crash between the data and the flag leaves the time pending; rewriting it gives the
    same store as an uninterrupted write."""
    store = make(tmp_path / "a.zarr")
    calls = []
    real = CampaignStore._region_write

    def crash_on_flag(self, i, data):
        if "completed" in data:
            raise KeyboardInterrupt("killed")
        calls.append(sorted(data))
        real(self, i, data)

    monkeypatch.setattr(CampaignStore, "_region_write", crash_on_flag)
    with pytest.raises(KeyboardInterrupt):
        store.write_time(one_time(TIMES[3], 3))
    monkeypatch.setattr(CampaignStore, "_region_write", real)
    assert "tas" in calls[0]  # the data were written...
    resumed = CampaignStore.open(store.path, TIMES, SETTINGS)
    assert resumed.pending() == [0, 1, 2, 3]  # ...but the time is not complete
    resumed.write_time(one_time(TIMES[3], 3))
    clean = make(tmp_path / "b.zarr")
    clean.write_time(one_time(TIMES[3], 3))
    a, b = read_campaign(resumed.path), read_campaign(clean.path)
    for name in ("tas", "T850", "tas_prior_mean", "n_obs", "completed"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_resume_checks_settings_and_times(tmp_path):
    store = make(tmp_path / "c.zarr")
    store.write_time(one_time(TIMES[0], 0))
    assert CampaignStore.open(store.path, TIMES, dict(SETTINGS)).pending() == [1, 2, 3]
    with pytest.raises(SettingsMismatchError, match=r"made with steps=3, this run has steps=18") as e:
        CampaignStore.open(store.path, TIMES, {**SETTINGS, "steps": 18})
    assert e.value.setting == "steps"
    with pytest.raises(SettingsMismatchError, match="sigma_y") as e:
        CampaignStore.open(store.path, TIMES, {**SETTINGS, "sigma_y": {"tas": 2.0}})
    assert e.value.setting == "sigma_y"
    with pytest.raises(SettingsMismatchError, match="cfg_new") as e:
        CampaignStore.open(store.path, TIMES, {**SETTINGS, "cfg_new": 1})
    with pytest.raises(SettingsMismatchError, match="--times") as e:
        CampaignStore.open(store.path, TIMES[:3], SETTINGS)
    assert e.value.setting == "times"


def test_create_errors(tmp_path):
    make(tmp_path / "c.zarr")
    with pytest.raises(FileExistsError, match="--resume"):
        make(tmp_path / "c.zarr")
    CampaignStore.create(tmp_path / "c.zarr", one_time(TIMES[0], 0), TIMES[:2], SETTINGS, overwrite=True)
    assert len(read_campaign(tmp_path / "c.zarr")["time"]) == 2
    with pytest.raises(FileNotFoundError):
        make(tmp_path / "no" / "c.zarr")
    with pytest.raises(CampaignStoreError, match="increasing"):
        CampaignStore.create(tmp_path / "d.zarr", one_time(TIMES[0], 0), TIMES[::-1], SETTINGS)
    with pytest.raises(CampaignStoreError, match="not a jaxguide campaign store"):
        one_time(TIMES[0], 0).to_zarr(tmp_path / "plain.zarr", consolidated=False)
        CampaignStore.open(tmp_path / "plain.zarr")
    store = CampaignStore.open(tmp_path / "c.zarr")
    with pytest.raises(CampaignStoreError, match="not one of the campaign's times"):
        store.write_time(one_time(TIMES[3], 3))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_each_time_touches_only_its_own_chunk_files(tmp_path):
    """Writing time i creates or replaces only chunk files of time i (no shared chunk, no
    metadata rewrite), so processes writing different times cannot race."""
    store = make(tmp_path / "c.zarr")
    for i, write in [(1, lambda: store.write_time(one_time(TIMES[1], 1))), (2, lambda: store.skip(TIMES[2], "no obs"))]:
        before = _snapshot(store.path)
        write()
        after = _snapshot(store.path)
        touched = {f for f in after if before.get(f) != after[f]} | (set(before) - set(after))
        assert touched
        for f in touched:
            var, c, *idx = Path(f).parts
            assert c == "c", f
            dims = read_campaign(store.path)[var].dims
            assert int(idx[dims.index("time")]) == i, f


def test_threads_write_disjoint_times_of_one_store(tmp_path):
    """Concurrent writers of interleaved times give the same bytes as one writer."""
    from concurrent.futures import ThreadPoolExecutor

    seq = make(tmp_path / "seq.zarr")
    for i in range(4):
        seq.write_time(one_time(TIMES[i], i))
    par = make(tmp_path / "par.zarr")
    datasets = [one_time(TIMES[i], i) for i in range(4)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda idx: [CampaignStore.open(par.path).write_time(datasets[i]) for i in idx], ([0, 2], [3, 1])))
    a, b = read_campaign(seq.path), read_campaign(par.path)
    for name in a.variables:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    files = sorted(p.relative_to(seq.path) for p in seq.path.rglob("c/**/*") if p.is_file())
    assert files and all((seq.path / f).read_bytes() == (par.path / f).read_bytes() for f in files)


def test_data_is_durable_before_the_flag(tmp_path, monkeypatch):
    """A machine crash cannot keep the flag and lose the data: every chunk file of the
    time and its directory are fsynced before the flag is written, the flag after."""
    store = make(tmp_path / "c.zarr")
    root = str(store.path.resolve())
    events = record_fsync_and_replace(monkeypatch)
    store.write_time(one_time(TIMES[2], 2))
    flag = f"{root}/completed/c/2"
    i_flag = next(k for k, e in enumerate(events) if e[0] == "replace" and e[2] == flag)
    synced = [e[1] for e in events[:i_flag] if e[0] == "fsync"]
    for name in ("tas", "T850", "tas_prior_mean", "n_obs"):
        chunk = f"{root}/{name}/c/" + ("2" if name == "n_obs" else "2/0" if name == "tas_prior_mean" else "0/2/0")
        assert chunk in synced, f"{name}: its chunk file was not fsynced before the flag"
    for name in ("tas", "T850", "tas_prior_mean", "n_obs"):
        assert f"{root}/{name}/c" in synced, f"{name}: its chunk directory was not fsynced before the flag"
    after = [e[1] for e in events[i_flag:] if e[0] == "fsync"]
    assert flag in after and f"{root}/completed/c" in after  # the flag and the rename into its directory


def test_resume_refuses_changed_inputs(tmp_path):
    from jaxguide.campaign.store import InputsChangedError
    from jaxguide.io.files import content_identity

    obs, parts = tmp_path / "obs.csv", tmp_path / "parts"
    obs.write_text("time,lat,lon\n2020-01-01,1,2\n")
    (parts / "time=1").mkdir(parents=True)
    (parts / "time=1" / "p.parquet").write_bytes(b"one")
    (parts / "time=2").mkdir()
    (parts / "time=2" / "p.parquet").write_bytes(b"two")

    def inputs():
        return {"observations": {"path": str(obs), "identity": content_identity(obs)},
                "sst": {"path": str(parts), "identity": content_identity(parts)}}

    store = CampaignStore.create(tmp_path / "c.zarr", one_time(TIMES[0], 0), TIMES, SETTINGS, inputs=inputs())
    CampaignStore.open(store.path, TIMES, SETTINGS, inputs=inputs())  # unchanged: fine
    obs.write_text("time,lat,lon\n2020-01-01,1,3\n")  # same size, one digit edited
    with pytest.raises(InputsChangedError, match=r"observations file '.*obs.csv' \(same size, different contents\)"):
        CampaignStore.open(store.path, TIMES, SETTINGS, inputs=inputs())
    CampaignStore.open(store.path, TIMES, SETTINGS, inputs=inputs(), allow_changed_inputs=True)  # allowed
    obs.write_text("time,lat,lon\n2020-01-01,1,2\n")
    (parts / "time=2" / "p.parquet").write_bytes(b"two!")
    with pytest.raises(InputsChangedError, match=r"'.*parts/time=2/p.parquet' \(size 3 -> 4\)"):
        CampaignStore.open(store.path, TIMES, SETTINGS, inputs=inputs())
    (parts / "time=2" / "p.parquet").write_bytes(b"two")
    (parts / "time=3").mkdir()
    (parts / "time=3" / "p.parquet").write_bytes(b"new")
    with pytest.raises(InputsChangedError, match=r"'.*parts/time=3/p.parquet' \(added\)") as e:
        CampaignStore.open(store.path, TIMES, SETTINGS, inputs=inputs())
    assert "\n" not in str(e.value) and "--allow-changed-inputs" in str(e.value)


def test_store_opens_without_consolidation_warning(tmp_path):
    import warnings

    import xarray as xr

    store = make(tmp_path / "c.zarr")
    store.write_time(one_time(TIMES[1], 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with xr.open_zarr(store.path) as ds:
            assert ds["completed"].values.tolist() == [PENDING, ANALYSED, PENDING, PENDING]
            assert ds["tas"].isel(time=1).notnull().all()
    store.consolidate()  # again at the end of a run (a store of an earlier jaxguide): still right
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with xr.open_zarr(store.path) as ds:
            assert ds["completed"].values.tolist() == [PENDING, ANALYSED, PENDING, PENDING]


def test_redo_damaged_finds_truncated_and_missing_chunks(tmp_path):
    store = make(tmp_path / "c.zarr")
    for i in range(3):
        store.write_time(one_time(TIMES[i], i))
    store.skip(TIMES[3], "no observations")
    assert store.redo_damaged() == []
    chunk = store.path / "T850" / "c" / "0" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:40])  # truncated
    (store.path / "tas_prior_mean" / "c" / "2" / "0").unlink()  # deleted
    redo = store.redo_damaged()
    assert [t for t, _ in redo] == [TIMES[1], TIMES[2]]
    assert "T850/c/0/1/0 cannot be read" in redo[0][1] and "tas_prior_mean/c/2/0 is missing" in redo[1][1]
    assert store.pending() == [1, 2]
    for i in (1, 2):
        store.write_time(one_time(TIMES[i], i))
    ds, ref = read_campaign(store.path), one_time(TIMES[1], 1)
    np.testing.assert_array_equal(ds["T850"].isel(time=[1]).values, ref["T850"].values)
    assert store.redo_damaged() == [] and store.pending() == []
