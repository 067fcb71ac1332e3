"""Observation sources for campaigns: one table, partitioned Parquet, earth2studio frames."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jaxguide.observations.sources import (
    EARTH2STUDIO_VARIABLES,
    PartitionFileError,
    PartitionedSource,
    TableSource,
    earth2studio_channel,
    open_observations,
    standard_layout,
)
from jaxguide.observations.errors import MissingColumnsError
from jaxguide.observations.table import make_table, write_observations
from jaxguide.observations.validation import validate_observations

CHANNELS = ["T850", "T500", "T300", "tas", "pres_msl", "rlut"]


def table(n=40, seed=0):
    """Observations every 3 hours over two days (physical units)."""
    rng = np.random.default_rng(seed)
    times = pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 16, n) * 3, unit="h")
    return make_table(times, rng.uniform(-80, 80, n), rng.uniform(-180, 180, n), rng.choice(["tas", "T850"], n),
                      rng.normal(280, 10, n), 1.0)


def same_rows(a: pd.DataFrame, b: pd.DataFrame):
    cols = ["time", "lat", "lon", "variable", "value", "sigma"]
    key = ["time", "lat", "lon", "variable"]
    pd.testing.assert_frame_equal(a[cols].sort_values(key).reset_index(drop=True),
                                  b[cols].sort_values(key).reset_index(drop=True), check_dtype=False)


def manual_window(t, start, end):
    return t[(t["time"] >= pd.Timestamp(start)) & (t["time"] <= pd.Timestamp(end))]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".nc"])
def test_one_table_for_all_times(tmp_path, suffix):
    t = table()
    path = write_observations(t, tmp_path / f"obs{suffix}")
    src = open_observations(path)
    assert isinstance(src, TableSource)
    for start, end in [("2019-12-31T21", "2020-01-01T03"), ("2020-01-01T09", "2020-01-01T15"), ("2020-02-01", "2020-02-02")]:
        same_rows(src.window(start, end), manual_window(t, start, end))


def write_hive(root: Path, t: pd.DataFrame, keep_time_column: bool):
    """Hive layout: one directory per 6-hour block, time=<ISO> (':' escaped as %3A)."""
    block = t["time"].dt.floor("6h")
    for b, rows in t.groupby(block):
        d = root / f"time={b.isoformat().replace(':', '%3A')}"
        d.mkdir(parents=True)
        (rows if keep_time_column else rows.drop(columns="time")).to_parquet(d / "part-0.parquet", index=False)


def test_hive_partitions_with_and_without_time_column(tmp_path):
    t = table()
    write_hive(tmp_path / "a", t, keep_time_column=True)
    src = open_observations(tmp_path / "a")
    assert isinstance(src, PartitionedSource) and len(src.parts) > 3
    for start, end in [("2019-12-31T21", "2020-01-01T03"), ("2020-01-01T10", "2020-01-01T20"), ("2020-03-01", "2020-03-02")]:
        same_rows(src.window(start, end), manual_window(t, start, end))
    # files without a time column: every row gets its partition's time
    t6 = t.assign(time=t["time"].dt.floor("6h"))
    write_hive(tmp_path / "b", t6, keep_time_column=False)
    src = open_observations(tmp_path / "b")
    same_rows(src.window("2020-01-01T06", "2020-01-01T12"), manual_window(t6, "2020-01-01T06", "2020-01-01T12"))


def test_one_file_per_time_reads_only_overlapping_files(tmp_path, monkeypatch):
    t = table()
    for when, rows in t.groupby("time"):
        rows.to_parquet(tmp_path / f"{when:%Y-%m-%dT%H}.parquet", index=False)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "junk.parquet").write_bytes(b"not parquet")  # hidden: ignored
    src = PartitionedSource.open(tmp_path)
    opened = []
    real = pd.read_parquet
    monkeypatch.setattr(pd, "read_parquet", lambda p, *a, **k: opened.append(Path(p).name) or real(p, *a, **k))
    got = src.window("2020-01-01T03", "2020-01-01T06")
    assert len(got) > 0
    same_rows(got, manual_window(t, "2020-01-01T03", "2020-01-01T06"))
    assert sorted(opened) == sorted({f"{w:%Y-%m-%dT%H}.parquet" for w in got["time"]})


def test_malformed_file_is_named(tmp_path):
    t = table()
    write_hive(tmp_path, t, keep_time_column=True)
    bad = sorted(tmp_path.glob("time=*"))[2] / "part-1.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(PartitionFileError, match="part-1.parquet") as e:
        open_observations(tmp_path)
    assert e.value.path == bad
    bad.unlink()
    # a file whose times are not ISO 8601 text
    pd.DataFrame({"time": ["01/02/2020"], "lat": [0.0], "lon": [0.0], "variable": ["tas"], "value": [280.0],
                  "sigma": [1.0]}).to_parquet(tmp_path / "2020-01-02T00.parquet")
    with pytest.raises(PartitionFileError, match="2020-01-02T00.parquet.*01/02/2020"):
        open_observations(tmp_path)
    (tmp_path / "2020-01-02T00.parquet").unlink()
    # no time column and no time in the path
    t.drop(columns="time").to_parquet(tmp_path / "stations.parquet")
    with pytest.raises(PartitionFileError, match="stations.parquet.*no 'time' column"):
        open_observations(tmp_path)


def test_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="no .parquet files"):
        open_observations(tmp_path)


def earth2studio_frame():
    """The layout of earth2studio's DataFrameSources (e.g. data.ISD): lon in [0, 360),
    float32 coordinates, an ``observation`` column, metadata columns, no error column."""
    return pd.DataFrame({
        "time": pd.to_datetime(["2020-01-01T00:10", "2020-01-01T00:50", "2020-01-01T01:00", "2020-01-01T23:00"]),
        "lat": np.array([37.6, 37.6, 52.3, -33.9], np.float32),
        "lon": np.array([237.6, 237.6, 4.8, 18.6], np.float32),
        "station": ["72494023234", "72494023234", "06240099999", "68816099999"],
        "elev": np.array([3.0, 3.0, -3.0, 42.0], np.float32),
        "observation": np.array([283.15, 101520.0, 276.0, 295.4], np.float32),
        "variable": ["t2m", "msl", "t2m", "t850"],
    })


def test_earth2studio_frame_needs_sigma(tmp_path):
    frame = earth2studio_frame()
    with pytest.raises(MissingColumnsError, match="no 'sigma' column.*--sigma-y"):
        open_observations(frame)
    frame.to_parquet(tmp_path / "isd.parquet")
    with pytest.raises(MissingColumnsError, match="isd.parquet.*--sigma-y"):
        open_observations(tmp_path / "isd.parquet")
    with pytest.raises(MissingColumnsError, match=r"no value for \['T850'\]"):
        open_observations(frame, sigma_y={"tas": 1.0, "pres_msl": 100.0})


@pytest.mark.parametrize("where", ["frame", "parquet", "directory"])
def test_earth2studio_frame_loads_without_conversion(tmp_path, where):
    frame = earth2studio_frame()
    sigma = {"tas": 1.5, "pres_msl": 120.0, "T850": 1.0}
    if where == "frame":
        src = open_observations(frame, sigma_y=sigma)
    elif where == "parquet":
        frame.to_parquet(tmp_path / "isd.parquet")
        src = open_observations(tmp_path / "isd.parquet", sigma_y=sigma)
    else:
        frame.iloc[:3].to_parquet(tmp_path / "2020-01-01T00.parquet")
        frame.iloc[3:].to_parquet(tmp_path / "2020-01-01T23.parquet")
        src = open_observations(tmp_path, sigma_y=sigma)
    got = src.window("2020-01-01T00", "2020-01-01T03")
    assert list(got["variable"]) == ["tas", "pres_msl", "tas"]
    np.testing.assert_allclose(got["value"], frame["observation"].iloc[:3].astype(np.float64))
    np.testing.assert_allclose(got["sigma"], [1.5, 120.0, 1.5])
    assert list(got["station"]) == list(frame["station"].iloc[:3])  # extra columns kept
    clean, dropped = validate_observations(got, CHANNELS)  # lon 0-360 is valid as it is
    assert dropped == {} and len(clean) == 3
    np.testing.assert_allclose(clean["lon"], frame["lon"].iloc[:3].astype(np.float64), rtol=1e-6)


def test_earth2studio_names():
    assert earth2studio_channel("t2m") == "tas" and earth2studio_channel("msl") == "pres_msl"
    assert earth2studio_channel("t850") == "T850" and earth2studio_channel("z500") == "Z500"
    assert earth2studio_channel("tp") == "tp"  # different units from cBottle's pr: left unknown
    assert set(EARTH2STUDIO_VARIABLES.values()) <= {"tas", "uas", "vas", "pres_msl", "sp", "2d", "skt", "sst", "tcwv"}
    # jaxguide's own layout passes through unchanged (no renaming of its variables)
    t = table(5)
    pd.testing.assert_frame_equal(standard_layout(t), t)
