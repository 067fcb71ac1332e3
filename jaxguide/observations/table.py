"""Point observation tables: their columns, types and files (CSV, Parquet, NetCDF).

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

:func:`coerce_table` gives the columns their types (the one place that does);
:func:`parse_time` and :func:`to_utc_naive` are :mod:`jaxguide.io.times`' ISO 8601 parser
raising :class:`~jaxguide.observations.errors.TimeFormatError` (an ObservationError).
Rows are checked by :mod:`jaxguide.observations.validation`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from jaxguide.io import times
from jaxguide.io.files import atomic_write
from jaxguide.observations.errors import (
    EmptyTableError,
    MissingColumnsError,
    ObservationError,
    ObservationFileError,
    TimeFormatError,
)

COLUMNS: tuple[str, ...] = ("time", "lat", "lon", "variable", "value", "sigma")

_FORMAT_NAMES = {"csv": "CSV (UTF-8 text)", "parquet": "Parquet", "netcdf": "NetCDF"}


def parse_time(value, what: str = "time") -> pd.Timestamp:
    """One ISO 8601 time -> UTC timestamp without timezone (naive input is UTC).

    :func:`jaxguide.io.times.parse_time`: strings must be ISO 8601
    (:data:`~jaxguide.io.times.ISO_FORMAT`); ``05/01/2020`` and friends are ambiguous and
    raise :class:`TimeFormatError` naming ``what``. datetime-like objects pass through.
    """
    return times.parse_time(value, what, error=TimeFormatError)


def to_utc_naive(t) -> pd.Series:
    """Times as UTC-naive datetime64[ns]; text must be ISO 8601 (else
    :class:`TimeFormatError`); empty entries become NaT (flagged later).
    See :func:`jaxguide.io.times.to_utc_naive`."""
    return times.to_utc_naive(t, error=TimeFormatError)


# --------------------------------------------------------------------------------------
# Construction, I/O


def make_table(time, lat, lon, variable, value, sigma) -> pd.DataFrame:
    """Observation table from equal-length columns (scalars are broadcast).

    Types are coerced (time to datetime64[ns] UTC-naive, numbers to float64,
    variable to str); nothing is validated: call
    :func:`jaxguide.observations.validation.validate_observations`.
    """
    cols = dict(time=time, lat=lat, lon=lon, variable=variable, value=value, sigma=sigma)
    n = max((len(v) for v in cols.values() if np.ndim(v) > 0 and not isinstance(v, str)), default=1)
    out = {}
    for k, v in cols.items():
        if isinstance(v, str) or np.ndim(v) == 0:
            v = [v] * n
        out[k] = list(v) if not isinstance(v, np.ndarray) else v
    return coerce_table(pd.DataFrame(out, columns=list(COLUMNS)))


def coerce_table(table: pd.DataFrame) -> pd.DataFrame:
    """A copy with the table's column types: time UTC-naive datetime64[ns] (ISO 8601 text
    only), lat/lon/value/sigma float64 (unreadable -> NaN), variable str; a fresh index.
    Extra columns are kept. Raises :class:`MissingColumnsError`."""
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


def table_format(path: str | os.PathLike) -> str:
    """``"csv"``, ``"parquet"`` or ``"netcdf"`` by suffix; ValueError for anything else."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".nc", ".nc4", ".netcdf"):
        return "netcdf"
    raise ValueError(f"unknown observation file type {suffix!r} ({path}); use .csv, .parquet or .nc")


def write_observations(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a table as CSV, Parquet or NetCDF (by suffix), atomically (temp + rename).

    Extra columns (e.g. ``value_n``) are written too; times are written as UTC.
    """
    path = Path(path)
    fmt = table_format(path)
    table = coerce_table(table)

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
    :class:`MissingColumnsError`; the rows are checked by
    :func:`jaxguide.observations.validation.validate_observations`.
    """
    return coerce_table(read_raw_table(path))


def read_raw_table(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV / Parquet / NetCDF table as stored (any columns, no types imposed): what
    :func:`read_observations` reads before :func:`coerce_table`, and what
    :mod:`jaxguide.observations.sources` reads earth2studio frames with. Raises
    FileNotFoundError, IsADirectoryError, :class:`EmptyTableError`, :class:`ObservationFileError`."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"observation file {str(path)!r} is a directory; expected a .csv, .parquet or .nc file")
    fmt = table_format(path)
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
    return table
