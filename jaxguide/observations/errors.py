"""Why an observation table cannot be used: :class:`ObservationError` and its subclasses,
and the reasons a row can be rejected (:data:`REASONS`).

Each error is a ``ValueError`` whose ``counts`` map each reason that applies to its
number of rows, so a caller (a campaign, the CLI) can report or skip without parsing text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jaxguide.io import times

# Reasons a row can be rejected, in the order they are checked (a row counts once,
# under the first reason that applies).
REASONS: tuple[str, ...] = (
    "unknown_variable",
    "bad_time",
    "time_outside_data",
    "bad_lat",
    "bad_lon",
    "nan_value",
    "bad_sigma",
    "duplicate",
)


class ObservationError(ValueError):
    """An observation table that cannot be used as it is.

    ``counts`` maps each reason in :data:`REASONS` that applies to its number of rows.
    """

    def __init__(self, message: str, counts: Mapping[str, int] | None = None):
        super().__init__(message)
        self.counts = dict(counts or {})


class MissingColumnsError(ObservationError):
    """Required columns are absent."""


class EmptyTableError(ObservationError):
    """No rows (before or after dropping bad ones)."""


class UnknownVariableError(ObservationError):
    """A variable name that is not one of the model's channels."""


class BadObservationsError(ObservationError):
    """Rows with NaN, out-of-range or duplicate entries (see ``counts``)."""


class ObservationFileError(ObservationError):
    """A file that cannot be read as a table of its format (binary data as CSV, ...)."""


class TimeFormatError(ObservationError, times.TimeFormatError):
    """A time that is not ISO 8601 text (``2020-01-20T00:00``, optionally ``Z`` or ``+HH:MM``).

    Both an :class:`ObservationError` (a campaign skips or reports it like any table
    error) and a :class:`jaxguide.io.times.TimeFormatError` (every time-format error of
    jaxguide is one); the observation layer passes it to the parser as ``error=``.
    """


class SigmaYError(ObservationError):
    """A per-variable sigma_y (``--sigma-y VAR=VALUE,...``) names a variable that the table
    (for a campaign: one time's window) has no observations of."""


class ImplausibleObservationsError(ObservationError):
    """Values far outside the model's climatology for their variable (a unit mistake?)."""


class ObservationTimeError(ObservationError):
    """Observation times between a video model's frames when exact matching was asked for."""


def unknown_variable_message(unknown: Sequence[str], channels: Sequence[str]) -> str:
    """The text of an :class:`UnknownVariableError`: the unknown names and the valid ones."""
    return f"unknown variable(s) {sorted(set(unknown))}; valid channel names: {list(channels)}"
