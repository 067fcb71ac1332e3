"""Campaign times: ISO 8601 intervals, times files, per-time keys."""

import jax
import numpy as np
import pandas as pd
import pytest

from jaxguide.campaign.times import (
    TimesError,
    parse_duration,
    parse_time,
    parse_times,
    read_times_file,
    time_key,
    unix_seconds,
)


def test_interval_end_inclusive():
    got = parse_times("2020-01-01T00/2020-01-02T00/PT6H")
    want = pd.date_range("2020-01-01T00", "2020-01-02T00", freq="6h")
    assert list(got) == list(want)


def test_several_ranges_timezones_and_single_times():
    got = parse_times(["2020-01-01T00Z/2020-01-01T08+02:00/PT3H", "2020-01-02T00,2020-01-03T12:30"])
    assert [str(t) for t in got] == [
        "2020-01-01 00:00:00", "2020-01-01 03:00:00", "2020-01-01 06:00:00",
        "2020-01-02 00:00:00", "2020-01-03 12:30:00",
    ]


@pytest.mark.parametrize("text,td", [("PT6H", "6h"), ("P1D", "1D"), ("P1DT12H", "36h"), ("PT90M", "90min"), ("P1W", "7D"), ("PT30S", "30s")])
def test_durations(text, td):
    assert parse_duration(text) == pd.Timedelta(td)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("2020-01-05/2020-01-01/PT6H", "empty"),
        ("2020-01-01/2020-01-02T00/PT6H,2020-01-01T12/2020-01-03/P1D", "overlap"),
        ("2020-01-01/2020-01-02/PT6H,2020-01-02/2020-01-03/PT6H", "overlap"),  # shared end point
        ("2020-01-03,2020-01-01", "out of order"),
        ("2020-01-01/2020-01-02", "START/END/STEP"),
        ("01/02/2020", "not an ISO 8601 time"),
        ("Jan 1 2020", "not an ISO 8601 time"),
        ("2020-01-01/2020-01-02/P1M", "years and months"),
        ("2020-01-01/2020-01-02/6h", "not an ISO 8601 duration"),
        ("2020-01-01/2020-01-02/PT0H", "positive"),
        ("2020-01-01T00:00:00.5", "whole seconds"),
        ("", "no analysis times"),
    ],
)
def test_bad_specs_are_named_one_line_errors(spec, match):
    with pytest.raises(TimesError, match=match) as e:
        parse_times(spec)
    assert "\n" not in str(e.value)
    if match in ("not an ISO 8601 time",):
        assert "expected YYYY-MM-DD" in str(e.value)


def test_times_file(tmp_path):
    f = tmp_path / "times.txt"
    f.write_text("# analysis times\n2020-01-01T00\n\n2020-01-01T06:00Z  # comment\n2020-01-02T00\n")
    assert [str(t) for t in read_times_file(f)] == ["2020-01-01 00:00:00", "2020-01-01 06:00:00", "2020-01-02 00:00:00"]


@pytest.mark.parametrize(
    "text,match",
    [
        ("2020-01-01T00\n2020-01-01T00\n", "line 2: .* repeats line 1"),
        ("2020-01-02T00\n2020-01-01T00\n", "line 2: .* before line 1"),
        ("2020-01-01T00\n1/2/2020\n", "line 2: '1/2/2020' is not an ISO 8601"),
        ("# nothing\n\n", "has no times"),
    ],
)
def test_times_file_errors_name_the_line(tmp_path, text, match):
    f = tmp_path / "times.txt"
    f.write_text(text)
    with pytest.raises(TimesError, match=match):
        read_times_file(f)
    with pytest.raises(FileNotFoundError, match="no such times file"):
        read_times_file(tmp_path / "missing.txt")


def test_parse_time_utc():
    assert parse_time("2020-01-01T06:00+06:00") == pd.Timestamp("2020-01-01T00:00")
    assert unix_seconds("1970-01-02") == 86400
    assert unix_seconds("1969-12-31T23:59:59") == -1


def test_time_key_depends_on_seed_and_time_only():
    times = ["2020-01-01T00", "2020-01-01T06", "1950-06-01T12", "2200-01-01T00"]
    data = lambda s, t: np.asarray(jax.random.key_data(time_key(s, t)))
    forward = [data(7, t) for t in times]
    backward = [data(7, t) for t in reversed(times)][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a, b)
    # distinct per time and per seed (pre-1970 and post-2106 included)
    keys = {tuple(k) for k in forward} | {tuple(data(8, t)) for t in times}
    assert len(keys) == 2 * len(times)
    # equivalent spellings of one instant give one key
    np.testing.assert_array_equal(data(7, "2020-01-01T06:00Z"), data(7, pd.Timestamp("2020-01-01 06:00")))
