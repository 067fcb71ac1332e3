"""Analysis times of a campaign: ISO 8601 intervals and files, and per-time random keys.

``--times 2020-01-01T00/2020-01-05T00/PT6H`` is an ISO 8601 repeating interval written
as START/END/STEP (END inclusive); several ranges (repeat ``--times`` or separate them
with commas) must be in increasing order and must not overlap. A single ISO time is a
range of one. ``--times-file`` holds one ISO time per line (``#`` comments and blank
lines ignored), strictly increasing.

Times are UTC (naive input is taken as UTC; ``Z`` / ``+HH:MM`` are converted) and whole
seconds: the campaign store encodes them in seconds and :func:`time_key` derives each
time's random key from its Unix second, so the result of a time does not depend on the
order in which times are processed, on how they are split over processes, or on resumes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from jaxguide.assimilation.settings import time_key as settings_time_key
from jaxguide.io import times as io_times

TIMES_FORM = "START/END/STEP in ISO 8601, e.g. 2020-01-01T00/2020-01-05T00/PT6H (END inclusive), or one time like 2020-01-01T06:00"
TIME_FORM = "YYYY-MM-DDTHH[:MM[:SS]][Z|+HH:MM], e.g. 2020-01-01T06:00"
DURATION_FORM = "PnDTnHnMnS or PnW, e.g. PT6H, PT30M, P1D, P1DT12H"

_DURATION = re.compile(
    r"P(?:(?P<weeks>\d+(?:\.\d+)?)W|(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?=\d)(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?)"
)


class TimesError(ValueError):
    """A time specification that cannot be used (bad syntax, empty, overlapping, unordered)."""


def parse_time(text: str, what: str = "time") -> pd.Timestamp:
    """One ISO 8601 time -> UTC ``pd.Timestamp`` without timezone, whole seconds."""
    t = io_times.parse_time(str(text), what, expected=TIME_FORM, error=TimesError)
    if t != t.floor("s"):
        raise TimesError(f"{what} {text!r} has fractions of a second; campaign times are whole seconds")
    return t.as_unit("ns")


def parse_duration(text: str) -> pd.Timedelta:
    """ISO 8601 duration without years/months (``PT6H``, ``P1D``, ``P1DT12H``, ``P1W``)."""
    s = str(text).strip().upper()
    m = _DURATION.fullmatch(s)
    if m is None or s in ("P", "PT") or not any(m.groupdict().values()):
        hint = " (years and months have no fixed length: use days)" if re.search(r"P\d+[YM]", s) else ""
        raise TimesError(f"step {text!r} is not an ISO 8601 duration{hint}; expected {DURATION_FORM}")
    g = {k: float(v) for k, v in m.groupdict().items() if v is not None}
    step = pd.Timedelta(weeks=g.get("weeks", 0), days=g.get("days", 0), hours=g.get("hours", 0),
                        minutes=g.get("minutes", 0), seconds=g.get("seconds", 0))
    if step <= pd.Timedelta(0):
        raise TimesError(f"step {text!r} must be positive")
    if step != step.floor("s"):
        raise TimesError(f"step {text!r} has fractions of a second; campaign times are whole seconds")
    return step


def _parse_range(spec: str) -> pd.DatetimeIndex:
    parts = spec.strip().split("/")
    if len(parts) == 1:
        return pd.DatetimeIndex([parse_time(parts[0], "--times")])  # one time
    if len(parts) != 3:
        raise TimesError(f"--times {spec!r} is not START/END/STEP; expected {TIMES_FORM}")
    start = parse_time(parts[0], f"--times {spec!r}: start")
    end = parse_time(parts[1], f"--times {spec!r}: end")
    step = parse_duration(parts[2])
    if end < start:
        raise TimesError(f"--times {spec!r} is empty: the end {end} is before the start {start}; expected {TIMES_FORM}")
    n = (end - start) // step + 1
    return pd.DatetimeIndex([start + i * step for i in range(n)])


def parse_times(specs: str | Sequence[str]) -> pd.DatetimeIndex:
    """``--times`` values -> increasing, unique UTC times (see the module docstring).

    Raises :class:`TimesError` for bad syntax, an empty range (END before START),
    overlapping ranges, ranges out of order, or no range at all.
    """
    if isinstance(specs, str):
        specs = [specs]
    parts = [p.strip() for s in specs for p in str(s).split(",") if p.strip()]
    if not parts:
        raise TimesError(f"no analysis times given; expected {TIMES_FORM}")
    ranges = [(p, _parse_range(p)) for p in parts]
    for (prev, a), (spec, b) in zip(ranges, ranges[1:]):
        if b[0] <= a[-1] and b[-1] >= a[0]:
            raise TimesError(f"--times ranges {prev!r} and {spec!r} overlap; give each time once")
        if b[-1] < a[0]:
            raise TimesError(f"--times ranges {prev!r} and {spec!r} are out of order; give them in increasing time")
    return pd.DatetimeIndex(np.concatenate([r.to_numpy() for _, r in ranges]), name="time")


def read_times_file(path: str | os.PathLike) -> pd.DatetimeIndex:
    """One ISO time per line (blank lines and ``#`` comments ignored), strictly increasing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such times file: {str(path)!r}")
    times: list[pd.Timestamp] = []
    lines: list[int] = []
    for no, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        t = parse_time(text, f"{path.name} line {no}:")
        if times and t == times[-1]:
            raise TimesError(f"{path.name} line {no}: {text!r} repeats line {lines[-1]}; give each time once")
        if times and t < times[-1]:
            raise TimesError(f"{path.name} line {no}: {text!r} is before line {lines[-1]}; times must increase")
        times.append(t)
        lines.append(no)
    if not times:
        raise TimesError(f"times file {str(path)!r} has no times; expected one {TIME_FORM} per line")
    return pd.DatetimeIndex(times, name="time")


def unix_seconds(time) -> int:
    """Whole seconds since 1970-01-01T00 UTC (negative before)."""
    t = io_times.parse_time(time, expected=TIME_FORM, error=TimesError)
    ns = t.as_unit("ns").value
    if ns % 1_000_000_000:
        raise TimesError(f"time {t} has fractions of a second; campaign times are whole seconds")
    return ns // 1_000_000_000


def time_key(seed: int, time) -> jax.Array:
    """The random key of one analysis time: :func:`jaxguide.assimilation.settings.time_key`
    (``fold_in`` of its Unix second into ``key(seed)``, the rule of every entry point),
    for a campaign time (whole seconds, else :class:`TimesError`).

    Depends only on (seed, time): not on processing order, process split or resumes."""
    unix_seconds(time)  # whole seconds
    return settings_time_key(seed, time)
