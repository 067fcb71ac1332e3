"""Point observations: the table, its validation and the linear operator A.

An observation table is a pandas DataFrame with one row per scalar observation:

=========  ==================================================================
time       ``datetime64[ns]`` (UTC, timezone-naive); in files, ISO 8601 text only
           (``2020-01-20T00:00``, ``2020-01-20T00:00:00Z``, ``...+02:00``)
lat        latitude, degrees north, in [-90, 90]
lon        longitude, degrees east; -180..180 or 0..360 accepted, stored in [0, 360)
variable   the model's channel name (``"T850"``, ``"tas"``, ...)
value      observed value in PHYSICAL units (K for temperatures, Pa for pressure)
sigma      observation-error standard deviation, same units as ``value``, > 0
=========  ==================================================================

:func:`normalise` converts value/sigma to the network's normalised units with the
checkpoint's per-channel ``center``/``scale``; :func:`build_operator` turns the
locations into :class:`PointObservationOperator`, a gather + weighted sum over
network-order pixels (a :func:`jaxguide.grid.latlon.stencil`) that is linear and
jit/vmap/grad friendly. Row ``i`` of the table is element ``i`` of ``A(x)``.

:func:`check_plausible` refuses values far outside the checkpoint's climatology
(|value - center| > 8 scale), which is what a unit mistake (degrees Celsius for K, hPa
for Pa) looks like; :func:`parse_time` is the one ISO 8601 time parser.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxguide.grid import latlon as grid_sampling

from jaxguide.model import units
from jaxguide.diffusion.guidance import Observations
from jaxguide.io.files import atomic_write
from jaxguide.model.window import FrameWindow

logger = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = ("time", "lat", "lon", "variable", "value", "sigma")

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


_FORMAT_NAMES = {"csv": "CSV (UTF-8 text)", "parquet": "Parquet", "netcdf": "NetCDF"}


class TimeFormatError(ObservationError):
    """A time that is not ISO 8601 text (``2020-01-20T00:00``, optionally ``Z`` or ``+HH:MM``)."""


class ImplausibleObservationsError(ObservationError):
    """Values far outside the model's climatology for their variable (a unit mistake?)."""


class ObservationTimeError(ObservationError):
    """Observation times between a video model's frames when exact matching was asked for."""


# --------------------------------------------------------------------------------------
# Times: ISO 8601 only

ISO_FORMAT = "YYYY-MM-DD[THH:MM[:SS[.fff]]][Z|+HH:MM] (ISO 8601, e.g. 2020-01-20T06:00 or 2020-01-20T06:00Z)"
_ISO = re.compile(
    r"\d{4}-\d{2}-\d{2}"  # date
    r"(?:[T ]\d{2}(?::\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?)?"  # time
    r"(?:Z|[+-]\d{2}(?::?\d{2})?)?"  # UTC or offset
)


def parse_time(value, what: str = "time") -> pd.Timestamp:
    """One ISO 8601 time -> UTC timestamp without timezone (naive input is UTC).

    Strings must be ISO 8601 (:data:`ISO_FORMAT`); ``05/01/2020`` and friends are
    ambiguous and raise :class:`TimeFormatError` naming ``what``. datetime-like objects
    pass through.
    """
    if isinstance(value, str):
        text = value.strip()
        if not _ISO.fullmatch(text):
            raise TimeFormatError(f"{what} {value!r} is not an ISO 8601 time; expected {ISO_FORMAT}")
        try:
            t = pd.Timestamp(text)
        except ValueError as e:
            raise TimeFormatError(f"{what} {value!r} is not a valid time ({e}); expected {ISO_FORMAT}") from None
    else:
        t = pd.Timestamp(value)
    if t is pd.NaT:
        raise TimeFormatError(f"{what} is missing; expected {ISO_FORMAT}")
    return t.tz_convert("UTC").tz_localize(None) if t.tzinfo is not None else t


def _check_iso_column(t: pd.Series) -> None:
    """Text times must all be ISO 8601 (empty cells are left to validation: bad_time)."""
    if pd.api.types.is_datetime64_any_dtype(t):
        return
    if pd.api.types.is_numeric_dtype(t) and t.notna().any():
        raise TimeFormatError(f"the time column holds numbers ({t.dropna().iloc[0]!r}); expected text in {ISO_FORMAT}")
    text = t.dropna().map(lambda v: v.strip() if isinstance(v, str) else v)
    text = text[text.map(lambda v: not (isinstance(v, str) and v == ""))]
    bad = text.map(lambda v: isinstance(v, str) and _ISO.fullmatch(v) is None)
    if bad.any():
        raise TimeFormatError(
            f"{int(bad.sum())} of {len(t)} observation times are not ISO 8601 (first: {text[bad].iloc[0]!r}); "
            f"expected {ISO_FORMAT}", {"bad_time": int(bad.sum())})


# --------------------------------------------------------------------------------------
# Construction, I/O


def make_table(time, lat, lon, variable, value, sigma) -> pd.DataFrame:
    """Observation table from equal-length columns (scalars are broadcast).

    Types are coerced (time to datetime64[ns] UTC-naive, numbers to float64,
    variable to str); nothing is validated: call :func:`validate_observations`.
    """
    cols = dict(time=time, lat=lat, lon=lon, variable=variable, value=value, sigma=sigma)
    n = max((len(v) for v in cols.values() if np.ndim(v) > 0 and not isinstance(v, str)), default=1)
    out = {}
    for k, v in cols.items():
        if isinstance(v, str) or np.ndim(v) == 0:
            v = [v] * n
        out[k] = list(v) if not isinstance(v, np.ndarray) else v
    return _coerce(pd.DataFrame(out, columns=list(COLUMNS)))


def to_utc_naive(t) -> pd.Series:
    """Times as UTC-naive datetime64[ns]; text must be ISO 8601 (else
    :class:`TimeFormatError`); empty entries become NaT (flagged later)."""
    t = pd.Series(t)
    _check_iso_column(t)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "could not infer format"
            t = pd.to_datetime(t, utc=True)
    except (ValueError, TypeError):  # mixed formats or garbage: element-wise, NaT on failure
        t = pd.to_datetime(t, utc=True, format="mixed", errors="coerce")
    return t.dt.tz_localize(None).astype("datetime64[ns]")


def _coerce(table: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise MissingColumnsError(f"observation table lacks columns {missing}; required: {list(COLUMNS)}")
    out = table.copy()
    out = out.reset_index(drop=True)
    out["time"] = to_utc_naive(out["time"]).to_numpy()
    for c in ("lat", "lon", "value", "sigma"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype(np.float64)
    out["variable"] = out["variable"].astype(str)
    return out


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".nc", ".nc4", ".netcdf"):
        return "netcdf"
    raise ValueError(f"unknown observation file type {suffix!r} ({path}); use .csv, .parquet or .nc")


def table_format(path: str | os.PathLike) -> str:
    """``"csv"``, ``"parquet"`` or ``"netcdf"`` by suffix; ValueError for anything else."""
    return _format(Path(path))


def write_observations(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a table as CSV, Parquet or NetCDF (by suffix), atomically (temp + rename).

    Extra columns (e.g. ``value_n``) are written too; times are written as UTC.
    """
    path = Path(path)
    fmt = _format(path)
    table = _coerce(table)

    def write(tmp: Path):
        if fmt == "csv":
            out = table.copy()
            out["time"] = out["time"].dt.strftime("%Y-%m-%dT%H:%M:%S.%f")
            out.to_csv(tmp, index=False)
        elif fmt == "parquet":
            table.to_parquet(tmp, index=False)
        else:
            ds = table.rename_axis("obs").to_xarray()
            ds["variable"] = ds["variable"].astype(str)
            ds.attrs["title"] = "jaxguide point observations"
            ds.to_netcdf(tmp, engine="netcdf4")

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def read_observations(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`write_observations` (or by hand, same columns).

    Raises FileNotFoundError, :class:`EmptyTableError` (an empty file),
    :class:`ObservationFileError` (not readable as its format) and
    :class:`MissingColumnsError`; the rows are checked by :func:`validate_observations`.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"observation file {str(path)!r} is a directory; expected a .csv, .parquet or .nc file")
    fmt = _format(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such observation file: {str(path)!r}")
    try:
        if fmt == "csv":
            try:
                table = pd.read_csv(path, dtype={"variable": str})
            except pd.errors.EmptyDataError:
                raise EmptyTableError(f"observation file {str(path)!r} is empty") from None
        elif fmt == "parquet":
            table = pd.read_parquet(path)
        else:
            import xarray as xr

            with xr.open_dataset(path, engine="netcdf4") as ds:
                table = ds.load().to_dataframe().reset_index(drop=True)
    except ObservationError:
        raise
    except (UnicodeDecodeError, pd.errors.ParserError, OSError, ValueError) as e:
        # a binary file named .csv, a truncated Parquet, a text file named .nc, ...
        reason = e.reason if isinstance(e, UnicodeDecodeError) else " ".join(str(e).split())
        raise ObservationFileError(
            f"observation file {str(path)!r} is not a readable {_FORMAT_NAMES[fmt]} table ({type(e).__name__}: "
            f"{reason[:200]})"
        ) from None
    return _coerce(table)


# --------------------------------------------------------------------------------------
# Validation


def _unknown_message(unknown: Sequence[str], channels: Sequence[str]) -> str:
    return f"unknown variable(s) {sorted(set(unknown))}; valid channel names: {list(channels)}"


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
    NaN or <= 0; duplicate (time, lat, lon, variable) after normalising lon (the first
    is kept). With ``drop_bad=False`` any rejected row raises (an
    :class:`ObservationError` subclass whose ``counts`` give every reason); with
    ``drop_bad=True`` the rows are removed and the counts are logged and returned.
    Missing columns and an empty table (before or after dropping) always raise.
    The clean table has lon in [0, 360) and a fresh 0..n-1 index.
    ``window_description`` replaces the analysis-time wording of the error for times
    outside ``time_window`` (e.g. a video window's frames).
    """
    channels = list(channels)
    table = _coerce(table)
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
    checks["duplicate"] = out.duplicated(subset=["time", "lat", "lon", "variable"], keep="first").to_numpy()

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
            raise UnknownVariableError(_unknown_message(unknown, channels), counts)
        msg = f"{int(bad_so_far.sum())} bad observation rows of {len(table)} ({detail})"
        if "unknown_variable" in counts:
            msg += "; " + _unknown_message(table.loc[checks["unknown_variable"], "variable"].tolist(), channels)
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


# --------------------------------------------------------------------------------------
# Plausibility in physical units

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
    from jaxguide.assimilation.dataset import channel_info

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


def channel_index(variables: Sequence[str], channels: Sequence[str]) -> np.ndarray:
    """Index of each variable name in ``channels`` (int32); unknown names raise."""
    channels = list(channels)
    lookup = {c: i for i, c in enumerate(channels)}
    unknown = [v for v in variables if v not in lookup]
    if unknown:
        raise UnknownVariableError(_unknown_message(unknown, channels), {"unknown_variable": len(unknown)})
    return np.array([lookup[v] for v in variables], dtype=np.int32)


def normalise(
    table: pd.DataFrame, channels: Sequence[str], center: Sequence[float], scale: Sequence[float]
) -> pd.DataFrame:
    """Add ``value_n = (value - center[c]) / scale[c]`` and ``sigma_n = sigma / scale[c]``.

    ``center``/``scale`` are the checkpoint's per-channel values (batch_info), in the
    physical units of the table, aligned with ``channels``.
    """
    center = np.asarray(center, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    if center.shape != (len(channels),) or scale.shape != (len(channels),):
        raise ValueError(f"center/scale must have shape ({len(channels)},), got {center.shape}, {scale.shape}")
    idx = channel_index(table["variable"].tolist(), channels)
    out = table.copy()
    out["value_n"] = units.normalise(out["value"].to_numpy(np.float64), center, scale, channel=idx)
    out["sigma_n"] = units.normalise(out["sigma"].to_numpy(np.float64), 0.0, scale, channel=idx)
    return out


# --------------------------------------------------------------------------------------
# The operator A


@dataclasses.dataclass(frozen=True, eq=False)
class PointObservationOperator:
    """Linear point-observation operator ``A``: state -> observed values.

    Arrays (pytree leaves), K stencil entries per observation:
      channel: (n,) int32, channel index of each observation.
      pixel: (n, K) int32, network-order pixels of the interpolation stencil.
      weight: (n, K) float32, interpolation weights (rows sum to 1; 0 for padding rows).
      frame: (n, K) int32 frame of each entry, or None (every entry in frame 0, states
        (C, 1, npix)). Video windows use K = 8: the 4 pixels in the frames before and
        after the observation time, weights = spatial x linear-in-time weights.
    """

    channel: jax.Array
    pixel: jax.Array
    weight: jax.Array
    frame: jax.Array | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (C, T, npix) one member's state in net order -> (n,) in x's units."""
        if x.ndim != 3 or (self.frame is None and x.shape[1] != 1):
            raise ValueError(f"expected a state of shape (C, {'1' if self.frame is None else 'T'}, npix), got {x.shape}")
        frame = 0 if self.frame is None else self.frame
        vals = x[self.channel[:, None], frame, self.pixel]  # (n, K)
        return jnp.sum(vals * self.weight.astype(vals.dtype), axis=-1)

    @property
    def num_obs(self) -> int:
        return self.channel.shape[0]

    def dense(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The operator as a dense (n_obs, C*T*npix) float64 matrix on flattened (C, T, npix) states."""
        _, t, npix = shape
        ch = np.asarray(self.channel, np.int64)
        pix = np.asarray(self.pixel, np.int64)
        fr = np.zeros_like(pix) if self.frame is None else np.asarray(self.frame, np.int64)
        if fr.size and fr.max() >= t:
            raise ValueError(f"the operator reads frame {fr.max()} of a state with {t} frames")
        H = np.zeros((ch.size, int(np.prod(shape))))
        np.add.at(H, (np.arange(ch.size)[:, None], (ch[:, None] * t + fr) * npix + pix), np.asarray(self.weight, np.float64))
        return H


jax.tree_util.register_dataclass(
    PointObservationOperator, data_fields=["channel", "pixel", "weight", "frame"], meta_fields=[]
)


def time_stencil(position, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation in time: fractional frame positions (n,) -> frames (n, 2) int32
    and weights (n, 2) float64 (the frames before and after; weight 0 on the second when
    the time is a frame time). Positions must lie in [0, n_frames - 1]."""
    pos = np.asarray(position, np.float64).reshape(-1)
    if n_frames < 1 or pos.size and not (np.all(pos >= 0) and np.all(pos <= n_frames - 1)):
        raise ValueError(f"frame positions must lie in [0, {n_frames - 1}]")
    if n_frames == 1:
        return np.zeros((pos.size, 2), np.int32), np.stack([np.ones_like(pos), np.zeros_like(pos)], 1)
    f0 = np.minimum(np.floor(pos), n_frames - 2)
    w1 = pos - f0
    return np.stack([f0, f0 + 1], 1).astype(np.int32), np.stack([1.0 - w1, w1], 1)


def build_operator(
    table_or_arrays: pd.DataFrame | Mapping,
    channels: Sequence[str],
    nside: int = 64,
    method: grid_sampling.Method = "bilinear",
    as_numpy: bool = False,
    frame_position=None,
    n_frames: int = 1,
) -> PointObservationOperator:
    """Operator for the rows of a table (or a mapping with ``lat``, ``lon``, ``variable``).

    ``variable`` holds channel names, or integer channel indices in a mapping.
    Row order is kept: element ``i`` of ``A(x)`` is row ``i``. ``method`` is a
    :mod:`jaxguide.grid.latlon` scheme: "bilinear" (HEALPix interpolation) or
    "nearest" (the containing pixel); ``jaxguide evaluate`` samples with the same one.
    ``as_numpy``: NumPy leaves instead of JAX arrays. ``frame_position`` (n,): each
    row's fractional frame index in a window of ``n_frames`` frames
    (:meth:`jaxguide.model.window.FrameWindow.position`): the operator then reads (C, T, npix)
    states, linear in time between the two nearest frames (:func:`time_stencil`).
    """
    src = table_or_arrays
    missing = [k for k in ("lat", "lon", "variable") if k not in src]
    if missing:
        raise MissingColumnsError(f"observation locations lack {missing}")
    lat = np.asarray(src["lat"], dtype=np.float64)
    lon = np.asarray(src["lon"], dtype=np.float64)
    var = np.asarray(src["variable"])
    if var.dtype.kind in "iu":
        if var.size and (var.min() < 0 or var.max() >= len(channels)):
            raise UnknownVariableError(f"channel indices must be in [0, {len(channels)}), got {var.min()}..{var.max()}")
        ch = var.astype(np.int32)
    else:
        ch = channel_index([str(v) for v in var], channels)
    if not (lat.shape == lon.shape == ch.shape and lat.ndim == 1):
        raise ValueError(f"lat, lon, variable must be 1-D of equal length, got {lat.shape}, {lon.shape}, {ch.shape}")
    pix, w = grid_sampling.stencil(nside, lon, lat, method, "net")
    frame = None
    if frame_position is not None:
        frames, tw = time_stencil(frame_position, n_frames)
        if frames.shape[0] != ch.shape[0]:
            raise ValueError(f"frame_position has {frames.shape[0]} entries for {ch.shape[0]} observations")
        k = pix.shape[1]
        frame = np.repeat(frames, k, axis=1)  # (n, 2K): the K pixels in each of the two frames
        pix = np.concatenate([pix, pix], axis=1)
        w = np.concatenate([w * tw[:, :1], w * tw[:, 1:]], axis=1)
    pix, w = pix.astype(np.int32), w.astype(np.float32)
    if as_numpy:
        return PointObservationOperator(ch, pix, w, frame)
    return PointObservationOperator(jnp.asarray(ch), jnp.asarray(pix), jnp.asarray(w),
                                    None if frame is None else jnp.asarray(frame))


def override_sigma(table: pd.DataFrame, sigma_y) -> pd.DataFrame:
    """Replace the table's ``sigma`` (physical units): one value for every row, or a
    mapping variable -> value; None keeps it. Names without observations are an error."""
    if sigma_y is None:
        return table
    out = table.copy()
    if isinstance(sigma_y, Mapping):
        unknown = sorted(set(sigma_y) - set(out["variable"]))
        if unknown:
            raise ValueError(f"--sigma-y names variables with no observations: {unknown}")
        for var, val in sigma_y.items():
            out.loc[out["variable"] == var, "sigma"] = float(val)
    else:
        out["sigma"] = float(sigma_y)
    bad = ~(out["sigma"].to_numpy(np.float64) > 0)
    if bad.any():
        raise ValueError(f"sigma_y must be > 0, got {sigma_y}")
    return out


def bucket_size(n: int, minimum: int = 32) -> int:
    """The padded observation count for ``n`` rows: the next power of two >= max(n, minimum)."""
    return max(int(minimum), 1 << max(int(n) - 1, 0).bit_length())


def pad(obs: Observations, size: int) -> Observations:
    """``obs`` with zero rows appended up to ``size`` (weight 0, y 0, sigma_y 1).

    A zero-weight row adds exactly nothing to any guidance method (see
    :mod:`jaxguide.diffusion.guidance`), so counts padded to one size share one compiled program.
    The concatenation runs in NumPy: no JAX operation on the unpadded shapes (each new
    shape would compile a small program).
    """
    A = obs.A
    if not isinstance(A, PointObservationOperator):
        raise TypeError("pad needs a PointObservationOperator")
    y = np.asarray(obs.y, np.float32)
    n = y.shape[0]
    if size < n:
        raise ValueError(f"cannot pad {n} observations to {size}")
    k = size - n

    def cat(a, fill=0):
        a = np.asarray(a)
        return jnp.asarray(np.concatenate([a, np.full((k, *a.shape[1:]), fill, a.dtype)]))

    return Observations(
        A=PointObservationOperator(cat(A.channel), cat(A.pixel), cat(A.weight),
                                   None if A.frame is None else cat(A.frame)),
        y=cat(y),
        sigma_y=cat(np.broadcast_to(np.asarray(obs.sigma_y, np.float32), (n,)), 1),
        cov_factor=None if obs.cov_factor is None else cat(obs.cov_factor),
    )


@dataclasses.dataclass(frozen=True)
class PreparedObservations:
    """Observations ready for guidance, in the network's units.

    obs: :class:`~jaxguide.diffusion.guidance.Observations` (A on (C, T, npix) net-order states;
      y, sigma_y (n_padded,) float32 normalised); rows >= ``n_obs`` are padding.
    table: the clean rows (physical units plus ``value_n`` / ``sigma_n``), row i = y[i].
    dropped: rows rejected per reason (only with ``drop_bad``).
    """

    obs: Observations
    table: pd.DataFrame
    dropped: dict[str, int]

    @property
    def n_obs(self) -> int:
        return len(self.table)


def prepare(
    table: pd.DataFrame,
    channels: Sequence[str],
    center: Sequence[float],
    scale: Sequence[float],
    *,
    time=None,
    window_hours: float = 3.0,
    drop_bad: bool = False,
    sigma_y=None,
    nside: int = 64,
    interpolation: grid_sampling.Method = "bilinear",
    pad_to: int | Literal["bucket"] | None = None,
    check_plausibility: bool = True,
    window: FrameWindow | None = None,
    time_matching: Literal["linear", "exact"] = "linear",
) -> PreparedObservations:
    """Validate, override sigma, check plausibility, normalise, locate and (optionally)
    pad a table.

    time: the analysis time; rows outside ``+- window_hours`` are rejected (None: no
      time check). drop_bad: drop rejected rows instead of raising (see
      :func:`validate_observations`). sigma_y: see :func:`override_sigma` (physical
      units, applied before normalising). center/scale: the model's (C,) normalisation.
      pad_to: None (no padding), a size, or ``"bucket"`` (:func:`bucket_size`).
      check_plausibility: refuse values far from the model's climatology
      (:func:`check_plausible`; a unit mistake).
      window: a video model's frames (instead of ``time``): rows must lie between its
        first and last frame; each is placed at its fractional frame position (column
        ``frame_position``) and the operator reads (C, T, npix) states, linear in time
        between the two nearest frames, or, with ``time_matching="exact"``, a row off
        the frame times is an :class:`ObservationTimeError` (dropped and counted as
        ``time_between_frames`` with ``drop_bad``).
    """
    if time_matching not in ("linear", "exact"):
        raise ValueError(f"unknown time matching {time_matching!r}; expected 'linear' or 'exact'")
    span, description = None, None
    if window is not None:
        if time is not None:
            raise ValueError("pass the analysis time or the video window, not both")
        span = (window.start, window.end)
        fmt = "%Y-%m-%dT%H:%M"
        description = (f"the video window's {window.length} frames run from {window.start.strftime(fmt)} to "
                       f"{window.end.strftime(fmt)} UTC ({window.time_step_hours:g} h apart); observations must lie "
                       "within it: move the window start (--time) or the end of the run (--end)")
    elif time is not None:
        t = parse_time(time, "analysis time")
        span = (t - pd.Timedelta(hours=window_hours), t + pd.Timedelta(hours=window_hours))
    clean, dropped = validate_observations(table, channels, time_window=span, drop_bad=drop_bad,
                                           window_description=description)
    position = None
    if window is not None:
        position = window.position(clean["time"].to_numpy())
        nearest = np.round(position)
        off = np.abs(position - nearest) * window.time_step_hours * 3600.0 > 0.5  # more than half a second
        if time_matching == "exact":
            if off.any() and not drop_bad:
                example = clean.loc[off, "time"].iloc[0]
                raise ObservationTimeError(
                    f"{int(off.sum())} of {len(clean)} observations fall between the model's frames (e.g. {example}; "
                    f"frames are {window.time_step_hours:g} h apart from {window.start}); exact time matching was "
                    "asked for: use linear interpolation in time (--time-matching linear) or drop them (--drop-bad)",
                    {"time_between_frames": int(off.sum())})
            if off.any():
                logger.warning("dropped %d observations between frames (exact time matching)", int(off.sum()))
                dropped = {**dropped, "time_between_frames": int(off.sum())}
                clean = clean.loc[~off].reset_index(drop=True)
                position = nearest[~off]
                if len(clean) == 0:
                    raise EmptyTableError("no observations left: every one falls between the model's frames",
                                          dropped)
            else:
                position = nearest
        clean = clean.assign(frame_position=position)
    clean = override_sigma(clean, sigma_y)
    if check_plausibility:
        check_plausible(clean, channels, center, scale)
    norm = normalise(clean, channels, center, scale)
    # NumPy leaves until padded (see :func:`pad`)
    obs = Observations(
        A=build_operator(norm, channels, nside=nside, method=interpolation, as_numpy=True, frame_position=position,
                         n_frames=1 if window is None else window.length),
        y=norm["value_n"].to_numpy(np.float32),
        sigma_y=norm["sigma_n"].to_numpy(np.float32),
    )
    if pad_to is None:
        obs = jax.tree_util.tree_map(jnp.asarray, obs)
    else:
        obs = pad(obs, bucket_size(len(norm)) if pad_to == "bucket" else int(pad_to))
    return PreparedObservations(obs=obs, table=norm, dropped=dict(dropped))
