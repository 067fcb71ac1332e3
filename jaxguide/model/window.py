"""The time window of a video model: its frame times, and where a time falls in it.

A video cBottle (``time_length`` T > 1) samples T frames ``time_step`` hours apart as
one state (C, T, npix); an image model is the case T = 1. A :class:`FrameWindow` is one
such window: its start (the time of frame 0), the model's step and T. Observation
times map to fractional frame positions (:meth:`FrameWindow.position`), which the
observation operator interpolates linearly in time; a run longer than one window is a
chain of windows that overlap by the conditioning frames
(:func:`chain`, as cBottle's ``VideoAutoregression.step_forward``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from jaxguide.io.times import parse_time


class WindowError(ValueError):
    """A window or a run that does not fit the model's frames (time step, length)."""


@dataclasses.dataclass(frozen=True)
class FrameWindow:
    """T frames ``start + k * time_step_hours`` (k = 0..T-1), times UTC (naive)."""

    start: pd.Timestamp
    time_step_hours: float
    length: int

    def __post_init__(self):
        object.__setattr__(self, "start", parse_time(self.start))
        if int(self.length) != self.length or self.length < 1:
            raise WindowError(f"a window needs a whole number of frames >= 1, got {self.length}")
        object.__setattr__(self, "length", int(self.length))
        if not (np.isfinite(self.time_step_hours) and self.time_step_hours > 0):
            raise WindowError(f"the frame time step must be positive, got {self.time_step_hours} h")

    @property
    def step(self) -> pd.Timedelta:
        return pd.Timedelta(hours=float(self.time_step_hours))

    @property
    def times(self) -> pd.DatetimeIndex:
        """(T,) frame times."""
        return pd.DatetimeIndex([self.start + k * self.step for k in range(self.length)])

    @property
    def end(self) -> pd.Timestamp:
        """Time of the last frame."""
        return self.start + (self.length - 1) * self.step

    def position(self, times) -> np.ndarray:
        """Fractional frame index of each time, (n,) float64: 0 at ``start``, T-1 at ``end``
        (outside [0, T-1] for times outside the window)."""
        t = pd.DatetimeIndex(pd.to_datetime(np.atleast_1d(np.asarray(times, dtype="datetime64[ns]"))))
        return np.asarray((t - self.start) / self.step, np.float64)

    def shifted(self, frames: int) -> "FrameWindow":
        """The same window ``frames`` frames later (earlier when negative)."""
        return dataclasses.replace(self, start=self.start + frames * self.step)


def chain(start, end, *, time_step_hours: float, length: int, overlap: int) -> list[FrameWindow]:
    """The windows of a run from ``start`` to ``end`` (both frame times): the first window
    starts at ``start``; each next one starts ``length - overlap`` frames later, so that its
    first ``overlap`` frames are the last of the previous window (the conditioning frames);
    the last window ends at or after ``end``.

    Raises :class:`WindowError` when ``end - start`` is not a whole number of time steps,
    when ``end`` precedes ``start``, or when ``overlap`` is not in [0, length).
    """
    first = FrameWindow(start, time_step_hours, length)
    end = parse_time(end)
    span = (end - first.start) / first.step
    if span < 0:
        raise WindowError(f"the run ends ({end}) before it starts ({first.start})")
    if not np.isclose(span, round(span), rtol=0, atol=1e-9):
        raise WindowError(
            f"the run from {first.start} to {end} is {span * time_step_hours:g} h, not a whole number of the "
            f"model's {time_step_hours:g} h frames; choose an end time {time_step_hours:g} h steps after the start")
    if not 0 <= overlap < length:
        raise WindowError(f"the number of conditioning frames must be in [0, {length}), got {overlap}")
    if length == 1 and overlap == 0 and span > 0:
        raise WindowError("a single-time model has no frames to chain; run one analysis per time instead")
    frames = int(round(span)) + 1
    windows = [first]
    covered = length
    while covered < frames:
        windows.append(windows[-1].shifted(length - overlap))
        covered += length - overlap
    return windows


def trajectory_times(windows: Sequence[FrameWindow], overlap: int) -> pd.DatetimeIndex:
    """Frame times of a chained run: every frame of the first window, then the new
    (non-overlapping) frames of each next one."""
    out = list(windows[0].times)
    for w in windows[1:]:
        out.extend(w.times[overlap:])
    return pd.DatetimeIndex(out)
