"""Times: the one ISO 8601 parser of jaxguide.

The times jaxguide reads (``--time``, a campaign's ``--times``, an observation table's
``time`` column, a partition directory's ``time=...``, a video window's start) go
through :func:`parse_time` (one value) or :func:`to_utc_naive` (a column). Text must be
ISO 8601 (:data:`ISO_FORMAT`): ``05/01/2020`` is May 1st or January 5th depending on
who wrote it, so it is refused rather than guessed. Results are UTC without a timezone
(naive input is taken as UTC; ``Z`` and ``+HH:MM`` are converted).

Errors are :class:`TimeFormatError` unless the caller names its own class (``error=``),
so that each layer keeps raising its own exception (an observation table's
``TimeFormatError`` is also an ``ObservationError``; a campaign's is a ``TimesError``).

The bottom layer: imports nothing else from jaxguide.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

ISO_FORMAT = "YYYY-MM-DD[THH:MM[:SS[.fff]]][Z|+HH:MM] (ISO 8601, e.g. 2020-01-20T06:00 or 2020-01-20T06:00Z)"
ISO_PATTERN = re.compile(
    r"\d{4}-\d{2}-\d{2}"  # date
    r"(?:[T ]\d{2}(?::\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?)?"  # time
    r"(?:Z|[+-]\d{2}(?::?\d{2})?)?"  # UTC or offset
)


class TimeFormatError(ValueError):
    """A time that is not ISO 8601 text (``2020-01-20T00:00``, optionally ``Z`` or ``+HH:MM``).

    ``counts`` maps a reason (``"bad_time"``) to the number of entries it applies to
    (set for columns, see :func:`check_iso_column`).
    """

    def __init__(self, message: str, counts: Mapping[str, int] | None = None):
        super().__init__(message)
        self.counts = dict(counts or {})


ErrorFactory = Callable[..., Exception]


def is_iso(text: str) -> bool:
    """Whether ``text`` (surrounding blanks ignored) has the shape of :data:`ISO_FORMAT`."""
    return ISO_PATTERN.fullmatch(text.strip()) is not None


def parse_time(value, what: str = "time", *, expected: str = ISO_FORMAT,
               error: ErrorFactory = TimeFormatError) -> pd.Timestamp:
    """One time -> UTC ``pd.Timestamp`` without timezone (naive input is UTC).

    Strings must be ISO 8601 (:data:`ISO_FORMAT`); anything else raises ``error(message)``
    naming ``what`` and ``expected`` (the accepted form, as the caller words it).
    datetime-like objects (``pd.Timestamp``, ``datetime``, ``np.datetime64``) pass through.
    """
    if isinstance(value, str):
        text = value.strip()
        if not ISO_PATTERN.fullmatch(text):
            raise error(f"{what} {value!r} is not an ISO 8601 time; expected {expected}")
        try:
            t = pd.Timestamp(text)
        except ValueError as e:
            raise error(f"{what} {value!r} is not a valid time ({e}); expected {expected}") from None
    else:
        t = pd.Timestamp(value)
    if t is pd.NaT:
        raise error(f"{what} is missing; expected {expected}")
    return t.tz_convert("UTC").tz_localize(None) if t.tzinfo is not None else t


def check_iso_column(t: pd.Series, *, error: ErrorFactory = TimeFormatError) -> None:
    """Text times must all be ISO 8601; numbers are refused too. Empty cells pass (callers
    flag them as missing). Raises ``error(message[, {"bad_time": n}])``."""
    if pd.api.types.is_datetime64_any_dtype(t):
        return
    if pd.api.types.is_numeric_dtype(t) and t.notna().any():
        raise error(f"the time column holds numbers ({t.dropna().iloc[0]!r}); expected text in {ISO_FORMAT}")
    text = t.dropna().map(lambda v: v.strip() if isinstance(v, str) else v)
    text = text[text.map(lambda v: not (isinstance(v, str) and v == ""))]
    bad = text.map(lambda v: isinstance(v, str) and ISO_PATTERN.fullmatch(v) is None)
    if bad.any():
        raise error(
            f"{int(bad.sum())} of {len(t)} observation times are not ISO 8601 (first: {text[bad].iloc[0]!r}); "
            f"expected {ISO_FORMAT}", {"bad_time": int(bad.sum())})


def to_utc_naive(t, *, error: ErrorFactory = TimeFormatError) -> pd.Series:
    """Times (a sequence or column of ISO text or datetime-likes) -> UTC-naive
    ``datetime64[ns]`` Series; text must be ISO 8601 (:func:`check_iso_column`); empty or
    unreadable entries (``2020-13-01``) become NaT."""
    t = pd.Series(t)
    check_iso_column(t, error=error)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "could not infer format"
            t = pd.to_datetime(t, utc=True)
    except (ValueError, TypeError):  # mixed formats or garbage: element-wise, NaT on failure
        t = pd.to_datetime(t, utc=True, format="mixed", errors="coerce")
    return t.dt.tz_localize(None).astype("datetime64[ns]")


def epoch_ns(times, *, error: ErrorFactory = TimeFormatError) -> np.ndarray:
    """Times (as :func:`to_utc_naive` takes them) -> (n,) int64 nanoseconds since
    1970-01-01 UTC (NaT as the int64 minimum)."""
    return to_utc_naive(np.asarray(times), error=error).to_numpy("datetime64[ns]").astype(np.int64)
