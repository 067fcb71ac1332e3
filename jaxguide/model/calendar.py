"""cBottle's calendar inputs: ``second_of_day`` and ``day_of_year`` per time, and the frame
times of a video window.

As cBottle's AMIP inference path (``dataset_3d._encode_amip``): timestamps are truncated
to whole seconds (``as_cftime``), then ``second_of_day`` = seconds since 00:00 and
``day_of_year`` = days since Jan 1 00:00, **0-based and fractional**, both float32 (N, 1).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import cftime
import numpy as np
import pandas as pd

from jaxguide.io.times import parse_time


def time_fields(t) -> tuple[int, int, int, int, int, int]:
    """(year, month, day, hour, minute, second) of a time as the calendar reads it: UTC,
    fractional seconds truncated (also what the SST's time interpolation reads)."""
    if isinstance(t, (str, np.datetime64, datetime.datetime)) or not hasattr(t, "year"):
        t = parse_time(t)  # ISO 8601 text or datetime-like -> UTC (cftime objects pass as they are)
    return int(t.year), int(t.month), int(t.day), int(t.hour), int(t.minute), int(t.second)


def calendar_inputs(times: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """cBottle's ``(second_of_day, day_of_year)`` for timestamps, each (N, 1) float32.

    ``times``: ISO 8601 text (:mod:`jaxguide.io.times`), or datetime / cftime objects
    (Gregorian calendar; tz-aware times are converted to UTC). ``day_of_year`` is
    0-based and fractional: 2000-02-29 12:30 -> 59.5208.
    """
    if isinstance(times, (str, np.datetime64, pd.Timestamp, datetime.datetime, cftime.datetime)):
        times = [times]
    sod, doy = [], []
    for t in times:
        y, mo, d, h, mi, s = time_fields(t)
        seconds = h * 3600 + mi * 60 + s
        days = (datetime.date(y, mo, d) - datetime.date(y, 1, 1)).days
        sod.append(float(seconds))
        # (time - Jan 1) / 1 day, as Python's exact timedelta division does
        doy.append((days * 86400 + seconds) / 86400)
    return (
        np.asarray(sod, dtype=np.float64).astype(np.float32).reshape(-1, 1),
        np.asarray(doy, dtype=np.float64).astype(np.float32).reshape(-1, 1),
    )


def frame_times(window_start, time_length: int, time_step_hours: float) -> pd.DatetimeIndex:
    """The T frame times of a video window: ``window_start + k * time_step``, k = 0..T-1.

    The video model never sees the spacing except through each frame's calendar; the
    checkpoint's ``batch_info.json`` ``time_step`` (hours) gives it (cBottle's
    ``Checkpoint.read_batch_info`` drops it: read it from the json).
    """
    if time_length < 1:
        raise ValueError(f"time_length must be >= 1, got {time_length}")
    if not time_step_hours > 0:
        raise ValueError(f"the frame time step must be positive, got {time_step_hours} h")
    start = pd.Timestamp(window_start)
    return pd.DatetimeIndex([start + pd.Timedelta(hours=float(time_step_hours) * k) for k in range(time_length)])


def frame_calendar_inputs(window_start, time_length: int, time_step_hours: float) -> tuple[np.ndarray, np.ndarray]:
    """``(second_of_day, day_of_year)`` per frame of a window, each (1, T) float32 (cBottle's video batch)."""
    sod, doy = calendar_inputs(list(frame_times(window_start, time_length, time_step_hours)))
    return sod.reshape(1, -1), doy.reshape(1, -1)
