"""The one ISO 8601 time parser (jaxguide.io.times) and the layers that read times through it."""

import datetime

import numpy as np
import pandas as pd
import pytest

from jaxguide.campaign.times import TIME_FORM, TimesError
from jaxguide.campaign.times import parse_time as campaign_time
from jaxguide.io import times
from jaxguide.model.window import FrameWindow
from jaxguide.observations.errors import ObservationError, TimeFormatError
from jaxguide.observations.sources import PartitionFileError, open_observations
from jaxguide.observations.table import parse_time as observation_time


@pytest.mark.parametrize("text,expected", [
    ("2020-01-20", "2020-01-20 00:00"),  # date
    ("2020-01-20T06", "2020-01-20 06:00"),  # hour
    ("2020-01-20T06:30", "2020-01-20 06:30"),  # minutes
    ("2020-01-20 06:30", "2020-01-20 06:30"),  # space for T
    ("2020-01-20T06:30:15", "2020-01-20 06:30:15"),  # seconds
    ("2020-01-20T06:30:15.25", "2020-01-20 06:30:15.25"),  # fraction
    ("2020-01-20T06:30:15.123456789", "2020-01-20 06:30:15.123456789"),  # nanoseconds
    ("2020-01-20T06:30Z", "2020-01-20 06:30"),  # UTC
    ("2020-01-20T08:30+02:00", "2020-01-20 06:30"),  # offset
    ("2020-01-20T04:00-02:30", "2020-01-20 06:30"),  # negative offset with minutes
    ("2020-01-20T08:30+0200", "2020-01-20 06:30"),  # offset without colon
    ("  2020-01-20T06:30  ", "2020-01-20 06:30"),  # surrounding blanks
])
def test_iso_forms_are_accepted_as_utc_naive(text, expected):
    t = times.parse_time(text)
    assert t == pd.Timestamp(expected) and t.tzinfo is None
    assert times.is_iso(text)


@pytest.mark.parametrize("value", [
    pd.Timestamp("2020-01-20T08:30", tz="Europe/Berlin"), datetime.datetime(2020, 1, 20, 7, 30),
    np.datetime64("2020-01-20T07:30"), pd.Timestamp("2020-01-20T07:30"),
])
def test_datetime_likes_pass_through_in_utc(value):
    assert times.parse_time(value) == pd.Timestamp("2020-01-20T07:30")


@pytest.mark.parametrize("text", ["05/01/2020", "01.05.2020", "2020-1-5", "20200105", "Jan 5 2020", "2020-01-20T6:00",
                                  "2020-01-20T06:00 UTC", "yesterday", ""])
def test_non_iso_text_is_rejected_naming_the_format(text):
    with pytest.raises(times.TimeFormatError, match=r"^--time .* is not an ISO 8601 time; expected YYYY-MM-DD") as e:
        times.parse_time(text, "--time")
    assert times.ISO_FORMAT in str(e.value)
    assert not times.is_iso(text)


def test_iso_shaped_impossible_dates_and_missing_times():
    with pytest.raises(times.TimeFormatError, match=r"'2020-13-01' is not a valid time .*expected YYYY-MM-DD"):
        times.parse_time("2020-13-01")
    with pytest.raises(times.TimeFormatError, match="time is missing"):
        times.parse_time(None)


def test_columns_refuse_non_iso_text_and_numbers():
    got = times.to_utc_naive(["2020-01-20T08:30+02:00", "2020-01-20T06:30Z", None, ""])
    assert got.dtype == "datetime64[ns]"
    assert list(got[:2]) == [pd.Timestamp("2020-01-20T06:30")] * 2 and got[2:].isna().all()
    with pytest.raises(times.TimeFormatError, match=r"1 of 2 observation times are not ISO 8601 \(first: '05/01/2020'\)") as e:
        times.to_utc_naive(["2020-01-20", "05/01/2020"])
    assert e.value.counts == {"bad_time": 1}
    with pytest.raises(times.TimeFormatError, match="holds numbers"):
        times.to_utc_naive([20200120, 20200121])
    assert times.epoch_ns(["1970-01-01T00:00:01Z"]).tolist() == [1_000_000_000]


def test_each_layer_keeps_its_error_class_and_wording():
    # observations: catchable as an ObservationError, as jaxguide's TimeFormatError and as ValueError
    with pytest.raises(TimeFormatError) as e:
        observation_time("05/01/2020", "--time")
    assert isinstance(e.value, ObservationError) and isinstance(e.value, times.TimeFormatError)
    assert str(e.value) == f"--time '05/01/2020' is not an ISO 8601 time; expected {times.ISO_FORMAT}"
    # campaigns: a TimesError naming the campaign's form
    with pytest.raises(TimesError) as e:
        campaign_time("05/01/2020", "--times")
    assert str(e.value) == f"--times '05/01/2020' is not an ISO 8601 time; expected {TIME_FORM}"
    # model: a video window's start is read by the same parser
    assert FrameWindow("2020-01-20T08:00+02:00", 6.0, 2).start == pd.Timestamp("2020-01-20T06:00")
    with pytest.raises(times.TimeFormatError):
        FrameWindow("05/01/2020", 6.0, 2)


def _rows():
    return pd.DataFrame({"lat": [0.0], "lon": [10.0], "variable": ["T850"], "value": [280.0], "sigma": [1.0]})


def test_partition_times_are_iso_only(tmp_path):
    """A hive partition value that is not ISO 8601 is refused (jaxguide 0.1 read
    ``time=Jan 5 2020`` with pandas' guesswork)."""
    d = tmp_path / "time=Jan 5 2020"
    d.mkdir()
    _rows().to_parquet(d / "part-0.parquet", index=False)
    with pytest.raises(PartitionFileError, match=r"partition time 'Jan 5 2020' is not an ISO 8601 time") as e:
        open_observations(tmp_path)
    assert e.value.path == d / "part-0.parquet"


def test_partition_file_stems_are_iso_only(tmp_path):
    """A file stem that only pandas reads as a date (``20200105``) is no time."""
    _rows().to_parquet(tmp_path / "20200105.parquet", index=False)
    with pytest.raises(PartitionFileError, match="no 'time' column and no time in its path"):
        open_observations(tmp_path)


def test_iso_partitions_still_read(tmp_path):
    d = tmp_path / "time=2020-01-05T06%3A00%3A00Z"
    d.mkdir()
    _rows().to_parquet(d / "part-0.parquet", index=False)
    got = open_observations(tmp_path).window("2020-01-05T00:00", "2020-01-05T12:00")
    assert list(got["time"]) == [pd.Timestamp("2020-01-05T06:00")]
