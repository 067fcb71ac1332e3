"""Checking observation tables: bad rows (:func:`validate_observations`), values that look
like a unit mistake (:func:`check_plausible`), and the user's error override
(:func:`override_sigma`).

:func:`check_plausible` refuses values far outside the checkpoint's climatology
(|value - center| > 8 scale), which is what a unit mistake (degrees Celsius for K, hPa
for Pa) looks like.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from jaxguide.model.channels import channel_info
from jaxguide.observations.errors import (
    REASONS,
    BadObservationsError,
    EmptyTableError,
    ImplausibleObservationsError,
    SigmaYError,
    UnknownVariableError,
    unknown_variable_message,
)
from jaxguide.observations.operator import channel_index
from jaxguide.observations.table import coerce_table, to_utc_naive

logger = logging.getLogger(__name__)


def validate_observations(
    table: pd.DataFrame,
    channels: Sequence[str],
    *,
    times: Sequence | None = None,
    time_window: tuple | None = None,
    drop_bad: bool = False,
    window_description: str | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Check a table; return ``(clean_table, dropped_counts)``.

    Rejected rows (reasons in :data:`REASONS`): unknown variable; NaT time; time not
    among ``times`` / outside the inclusive ``time_window=(start, end)``; latitude
    NaN or outside [-90, 90]; longitude NaN or outside [-180, 360]; NaN value; sigma
    NaN or <= 0; duplicate (time, lat, lon, variable) after normalising lon, among the
    rows that pass every other check (the first is kept). With ``drop_bad=False`` any
    rejected row raises (an :class:`ObservationError` subclass whose ``counts`` give
    every reason); with ``drop_bad=True`` the rows are removed and the counts are
    logged and returned.
    Missing columns and an empty table (before or after dropping) always raise.
    The clean table has lon in [0, 360) and a fresh 0..n-1 index.
    ``window_description`` replaces the analysis-time wording of the error for times
    outside ``time_window`` (e.g. a video window's frames).
    """
    channels = list(channels)
    table = coerce_table(table)
    if len(table) == 0:
        raise EmptyTableError("observation table is empty")

    lat, lon = table["lat"].to_numpy(), table["lon"].to_numpy()
    sigma = table["sigma"].to_numpy()
    t = table["time"]
    checks: dict[str, np.ndarray] = {
        "unknown_variable": ~table["variable"].isin(channels).to_numpy(),
        "bad_time": t.isna().to_numpy(),
        "time_outside_data": np.zeros(len(table), bool),
        "bad_lat": ~(np.abs(lat) <= 90.0),
        "bad_lon": ~((lon >= -180.0) & (lon <= 360.0)),
        "nan_value": ~np.isfinite(table["value"].to_numpy()),
        "bad_sigma": ~(sigma > 0) | ~np.isfinite(sigma),
    }
    if times is not None:
        allowed = pd.DatetimeIndex(to_utc_naive(list(times)))
        checks["time_outside_data"] |= ~t.isin(allowed).to_numpy()
    if time_window is not None:
        start, end = to_utc_naive(list(time_window))
        checks["time_outside_data"] |= ((t < start) | (t > end)).to_numpy()
    checks["time_outside_data"] &= ~checks["bad_time"]

    out = table.copy()
    out["lon"] = np.mod(np.where(checks["bad_lon"], 0.0, lon), 360.0)
    out.loc[out["lon"] >= 360.0, "lon"] = 0.0  # -1e-20 % 360 == 360.0
    # duplicates among the rows that pass every other check: a rejected row (a NaN value, say)
    # must not make the valid row at its place a duplicate
    valid = ~np.logical_or.reduce(list(checks.values()))
    checks["duplicate"] = np.zeros(len(table), bool)
    checks["duplicate"][valid] = out.loc[valid].duplicated(subset=["time", "lat", "lon", "variable"],
                                                           keep="first").to_numpy()

    bad_so_far = np.zeros(len(table), bool)
    counts: dict[str, int] = {}
    for reason in REASONS:
        first = checks[reason] & ~bad_so_far
        bad_so_far |= checks[reason]
        if first.any():
            counts[reason] = int(first.sum())

    if counts and not drop_bad:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        if set(counts) == {"unknown_variable"}:
            unknown = table.loc[checks["unknown_variable"], "variable"].tolist()
            raise UnknownVariableError(unknown_variable_message(unknown, channels), counts)
        msg = f"{int(bad_so_far.sum())} bad observation rows of {len(table)} ({detail})"
        if "unknown_variable" in counts:
            msg += "; " + unknown_variable_message(table.loc[checks["unknown_variable"], "variable"].tolist(), channels)
        if "time_outside_data" in counts:
            msg += "; " + _window_message(t[checks["time_outside_data"]], time_window, times, window_description)
        raise BadObservationsError(msg, counts)
    if counts:
        logger.warning("dropped %d of %d observation rows: %s", int(bad_so_far.sum()), len(table), counts)
    out = out.loc[~bad_so_far].reset_index(drop=True)
    if len(out) == 0:
        msg = f"no observations left after dropping bad rows ({counts})"
        if "time_outside_data" in counts:
            msg += "; " + _window_message(t[checks["time_outside_data"]], time_window, times, window_description)
        raise EmptyTableError(msg, counts)
    return out, counts


def _window_message(outside: pd.Series, time_window, times, description: str | None = None) -> str:
    """Which window was used, where the rejected times lie, and how to widen it."""
    fmt = "%Y-%m-%dT%H:%M"
    span = f"the rejected times run from {outside.min().strftime(fmt)} to {outside.max().strftime(fmt)}"
    if description is not None:
        return f"{description}; {span}"
    if time_window is not None:
        start, end = to_utc_naive(list(time_window))
        half = (end - start) / 2
        return (f"the observation window was {start.strftime(fmt)} to {end.strftime(fmt)} UTC (analysis time +- "
                f"{half / pd.Timedelta(hours=1):g} h); {span}; widen it with window_hours (--window-hours) or check "
                f"the analysis time")
    return f"the allowed times are {[pd.Timestamp(v).strftime(fmt) for v in times][:5]}; {span}"


# likely unit mistakes per expected unit: (what the user probably gave, function turning it into the expected unit)
_UNIT_MISTAKES: dict[str, tuple[tuple[str, Callable[[np.ndarray], np.ndarray], str], ...]] = {
    "K": (("degrees Celsius", lambda v: v + 273.15, "add 273.15"),),
    "Pa": (("hPa", lambda v: v * 100.0, "multiply by 100"), ("kPa", lambda v: v * 1000.0, "multiply by 1000")),
    "m2 s-2": (("geopotential height in m", lambda v: v * 9.80665, "multiply by 9.80665"),),
    "kg kg-1": (("g/kg", lambda v: v / 1000.0, "divide by 1000"),),
    "kg m-2 s-1": (("mm/h", lambda v: v / 3600.0, "divide by 3600"), ("mm/day", lambda v: v / 86400.0, "divide by 86400")),
    "m s-1": (("km/h", lambda v: v / 3.6, "divide by 3.6"), ("knots", lambda v: v * 0.514444, "multiply by 0.514444")),
}


def check_plausible(
    table: pd.DataFrame,
    channels: Sequence[str],
    center: Sequence[float],
    scale: Sequence[float],
    *,
    max_scales: float = 8.0,
) -> dict[str, int]:
    """Refuse observations far outside the model's climatology for their variable.

    A value is implausible when ``|value - center[c]| > max_scales * scale[c]`` (the
    checkpoint's per-channel center/scale, physical units). For 8 scales this catches
    temperatures in degrees Celsius (K expected) and pressures in hPa (Pa expected) and
    lets every real observation through. Raises :class:`ImplausibleObservationsError`
    naming each variable, the count, an example and the likely unit mistake; returns
    ``{variable: count}`` (empty when all are plausible). Rows must be validated first.
    """
    center = np.asarray(center, np.float64)
    scale = np.asarray(scale, np.float64)
    idx = channel_index(table["variable"].tolist(), channels)
    value = table["value"].to_numpy(np.float64)
    bad = np.abs(value - center[idx]) > max_scales * scale[idx]
    if not bad.any():
        return {}
    counts: dict[str, int] = {}
    parts = []
    for c in np.unique(idx[bad]):
        var = list(channels)[c]
        rows = idx == c
        v_bad = value[rows & bad]
        counts[var] = int(v_bad.size)
        units = channel_info(var).units or "model units"
        lo, hi = center[c] - max_scales * scale[c], center[c] + max_scales * scale[c]
        text = (f"{var}: {v_bad.size} of {int(rows.sum())} values (e.g. {v_bad[0]:.6g}) are outside the model's "
                f"plausible range {lo:.6g} to {hi:.6g} {units}")
        for mistake, fix, how in _UNIT_MISTAKES.get(units, ()):
            if np.mean(np.abs(fix(v_bad) - center[c]) <= max_scales * scale[c]) >= 0.9:
                text += f"; they look like {mistake} ({how} to get {units})"
                break
        parts.append(text)
    raise ImplausibleObservationsError(
        "implausible observation values (more than "
        f"{max_scales:g} climatological standard deviations from the model's mean): " + "; ".join(parts)
        + ". Values must be in the model's physical units; to assimilate them anyway, pass "
        "check_plausibility=False (--allow-implausible)", counts)



def override_sigma(table: pd.DataFrame, sigma_y) -> pd.DataFrame:
    """Replace the table's ``sigma`` (physical units): one value for every row, or a
    mapping variable -> value; None keeps it. Names without observations are an error."""
    if sigma_y is None:
        return table
    out = table.copy()
    if isinstance(sigma_y, Mapping):
        unknown = sorted(set(sigma_y) - set(out["variable"]))
        if unknown:
            raise SigmaYError(f"--sigma-y names variables with no observations: {unknown}")
        for var, val in sigma_y.items():
            out.loc[out["variable"] == var, "sigma"] = float(val)
    else:
        out["sigma"] = float(sigma_y)
    bad = ~(out["sigma"].to_numpy(np.float64) > 0)
    if bad.any():
        raise ValueError(f"sigma_y must be > 0, got {sigma_y}")
    return out
