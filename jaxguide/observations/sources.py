"""Observations for many analysis times: one table, or a directory partitioned by time.

A campaign reads, for each analysis time, the rows within its window. Two sources:

- :class:`TableSource`: one CSV / Parquet / NetCDF table holding every time (read once);
- :class:`PartitionedSource`: a directory of Parquet files, hive style
  (``obs/time=2020-01-01T00:00:00/part-0.parquet``) or one file per time
  (``obs/2020-01-01T00.parquet``). Each file's time range is read from its footer (or
  its ``time`` column, or the partition value when the files have no ``time`` column),
  so a window opens only the files that can hold rows in it. An unreadable file is a
  :class:`PartitionFileError` naming the file, raised when the directory is opened.

Both accept jaxguide's table layout (:mod:`jaxguide.observations.table`) and earth2studio's
observation frame layout (``DataFrameSource`` such as ``earth2studio.data.ISD``:
columns ``time, lat, lon, observation, variable`` with lon in [0, 360), plus ``station``,
``elev`` ... which are kept): ``observation`` is read as ``value``, earth2studio variable
names become cBottle channel names (:data:`EARTH2STUDIO_VARIABLES`, e.g. ``t2m`` ->
``tas``; the units already agree: K, Pa, m s-1), and as those frames carry no error
column, ``sigma_y`` must be given (else :class:`~jaxguide.observations.errors.MissingColumnsError`
says so).
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from jaxguide.io import times
from jaxguide.observations.errors import EmptyTableError, MissingColumnsError, ObservationFileError
from jaxguide.observations.table import COLUMNS, coerce_table, read_raw_table

logger = logging.getLogger(__name__)

# earth2studio lexicon name -> cBottle channel name (same physical units)
EARTH2STUDIO_VARIABLES: dict[str, str] = {
    "t2m": "tas",
    "u10m": "uas",
    "v10m": "vas",
    "msl": "pres_msl",
    "sp": "sp",
    "d2m": "2d",
    "skt": "skt",
    "sst": "sst",
    "tcwv": "tcwv",
}
_E2S_LEVEL = re.compile(r"([tuvzq])(\d+)")  # t850 -> T850, z500 -> Z500 (geopotential, m2 s-2)


class PartitionFileError(ObservationFileError):
    """One file of an observation directory cannot be used; ``path`` names it."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = Path(path)


def is_earth2studio_frame(table: pd.DataFrame) -> bool:
    """earth2studio's observation frame layout: an ``observation`` column and no ``value``."""
    return "observation" in table.columns and "value" not in table.columns


def earth2studio_channel(name: str) -> str:
    """cBottle channel name of an earth2studio variable name (unknown names unchanged)."""
    if name in EARTH2STUDIO_VARIABLES:
        return EARTH2STUDIO_VARIABLES[name]
    m = _E2S_LEVEL.fullmatch(name)
    return f"{m.group(1).upper()}{m.group(2)}" if m else name


def channel_earth2studio(channel: str) -> str:
    """earth2studio variable name of a cBottle channel, the inverse of
    :func:`earth2studio_channel` (``tas`` -> ``t2m``, ``T850`` -> ``t850``; a channel with no
    earth2studio name of the same units, e.g. ``rlut``, ``pr``, is unchanged)."""
    for e2s, ch in EARTH2STUDIO_VARIABLES.items():
        if ch == channel:
            return e2s
    m = re.fullmatch(r"([TUVZQ])(\d+)", channel)
    return f"{m.group(1).lower()}{m.group(2)}" if m else channel


def analysis_table(obs: str | os.PathLike | pd.DataFrame, *, sigma_y=None) -> pd.DataFrame:
    """The observations of one analysis: a DataFrame or a file (CSV / Parquet / NetCDF), in
    jaxguide's layout (unchanged, typed when read from a file) or earth2studio's frame
    layout (:func:`standard_layout`: renamed, ``sigma`` from ``sigma_y``)."""
    raw = obs if isinstance(obs, pd.DataFrame) else read_raw_table(obs)
    source = "observation table" if isinstance(obs, pd.DataFrame) else f"observation file {str(obs)!r}"
    if is_earth2studio_frame(raw):
        return standard_layout(raw, sigma_y=sigma_y, source=source)
    return raw if isinstance(obs, pd.DataFrame) else coerce_table(raw)


def _fill_sigma(table: pd.DataFrame, sigma_y, source: str) -> pd.DataFrame:
    if sigma_y is None:
        raise MissingColumnsError(
            f"{source} has no 'sigma' column (the observation error std; earth2studio frames have none): "
            "give the error standard deviation with --sigma-y VALUE or --sigma-y VAR=VALUE,... "
            "(Python: sigma_y=...)")
    out = table.copy()
    if isinstance(sigma_y, Mapping):
        sig = out["variable"].astype(str).map({str(k): float(v) for k, v in sigma_y.items()})
        missing = sorted(set(out.loc[sig.isna(), "variable"].astype(str)))
        if missing:
            raise MissingColumnsError(f"{source} has no 'sigma' column and --sigma-y gives no value for {missing}")
        out["sigma"] = sig.to_numpy(np.float64)
    else:
        out["sigma"] = float(sigma_y)
    return out


def standard_layout(table: pd.DataFrame, *, sigma_y=None, source: str = "observation table") -> pd.DataFrame:
    """A raw table (jaxguide or earth2studio layout) -> jaxguide's columns, typed.

    sigma_y: physical-unit error std (one value, or a mapping channel -> value), used only
      when the table has no ``sigma`` column. Extra columns are kept.
    """
    out = table
    if is_earth2studio_frame(out):
        out = out.rename(columns={"observation": "value"})
        out["variable"] = out["variable"].astype(str).map(earth2studio_channel)
    if "sigma" not in out.columns and all(c in out.columns for c in COLUMNS if c != "sigma"):
        out = _fill_sigma(out, sigma_y, source)
    try:
        return coerce_table(out)
    except MissingColumnsError as e:
        raise MissingColumnsError(f"{source}: {e}") from None


def _in_window(table: pd.DataFrame, start, end) -> pd.DataFrame:
    """Rows with ``start <= time <= end``, plus rows without a time (NaT), so that
    validation reports those (``bad_time``) instead of them vanishing."""
    t = table["time"]
    keep = ((t >= pd.Timestamp(start)) & (t <= pd.Timestamp(end))) | t.isna()
    return table.loc[keep].reset_index(drop=True)


@dataclass(frozen=True, eq=False)
class TableSource:
    """One table for every time, read into memory once (physical units, jaxguide layout)."""

    table: pd.DataFrame
    name: str = "observation table"

    @classmethod
    def read(cls, path: str | os.PathLike, *, sigma_y=None) -> TableSource:
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{str(path)!r} is a directory; use open_observations for partitioned Parquet")
        if not path.is_file():
            raise FileNotFoundError(f"no such observation file: {str(path)!r}")
        return cls(standard_layout(read_raw_table(path), sigma_y=sigma_y, source=f"observation file {str(path)!r}"), str(path))

    def window(self, start, end) -> pd.DataFrame:
        """Rows with ``start <= time <= end`` (UTC-naive times; see :func:`_in_window`)."""
        return _in_window(self.table, start, end)


@dataclass(frozen=True)
class _Part:
    path: Path
    tmin: pd.Timestamp
    tmax: pd.Timestamp
    time_value: pd.Timestamp | None  # partition time, for files without a time column


def _partition_time(path: Path, root: Path) -> pd.Timestamp | None:
    """``time=...`` from hive directory names, else the file stem if it is a time."""
    for part in path.relative_to(root).parts[:-1]:
        key, sep, value = part.partition("=")
        if sep and key == "time":
            return _label_time(urllib.parse.unquote(value), path)
    stem = urllib.parse.unquote(path.name.split(".")[0])
    try:
        return _label_time(stem, path)
    except PartitionFileError:
        return None


def _label_time(text: str, path: Path) -> pd.Timestamp:
    """A partition's time (``time=...`` or the file stem): ISO 8601 only (:mod:`jaxguide.io.times`)."""
    if not text.strip():
        raise PartitionFileError(f"observation file {str(path)!r}: empty partition time", path)
    try:
        return times.parse_time(text, "partition time")
    except times.TimeFormatError:
        raise PartitionFileError(f"observation file {str(path)!r}: partition time {text!r} is not an ISO 8601 time", path) from None


def _time_range(path: Path, root: Path) -> _Part:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if "time" not in names:
            label = _partition_time(path, root)
            if label is None:
                raise PartitionFileError(
                    f"observation file {str(path)!r} has no 'time' column and no time in its path "
                    "(expected .../time=2020-01-01T00:00:00/part.parquet or 2020-01-01T00.parquet)", path)
            return _Part(path, label, label, label)
        field = pf.schema_arrow.field("time")
        tmin = tmax = None
        if pa.types.is_timestamp(field.type) and pf.metadata.num_row_groups > 0:
            j = names.index("time")
            stats = [pf.metadata.row_group(k).column(j).statistics for k in range(pf.metadata.num_row_groups)]
            if all(s is not None and s.has_min_max for s in stats):
                tmin, tmax = min(s.min for s in stats), max(s.max for s in stats)
                tz = field.type.tz
                tmin, tmax = (pd.Timestamp(v, tz=tz) if tz and pd.Timestamp(v).tzinfo is None else pd.Timestamp(v)
                              for v in (tmin, tmax))
        if tmin is None:
            t = _coerce_times(pq.read_table(path, columns=["time"]).column("time").to_pandas(), path)
            if t.notna().sum() == 0:
                return _Part(path, pd.Timestamp.max, pd.Timestamp.min, None)  # empty: never in a window
            tmin, tmax = t.min(), t.max()
    except PartitionFileError:
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        raise PartitionFileError(f"observation file {str(path)!r} is not a readable Parquet file ({e})", path) from None
    utc = [v.tz_convert("UTC").tz_localize(None) if v.tzinfo is not None else v for v in (tmin, tmax)]
    return _Part(path, utc[0], utc[1], None)


def _coerce_times(t: pd.Series, path: Path) -> pd.Series:
    out = pd.to_datetime(t, utc=True, errors="coerce", format="ISO8601")
    bad = out.isna() & t.notna()
    if bad.any():
        raise PartitionFileError(f"observation file {str(path)!r}: time {t[bad].iloc[0]!r} is not an ISO 8601 time", path)
    return out.dt.tz_localize(None)


@dataclass(frozen=True, eq=False)
class PartitionedSource:
    """A directory of Parquet files partitioned by time (see the module docstring)."""

    root: Path
    parts: tuple[_Part, ...]
    sigma_y: object = None

    @classmethod
    def open(cls, root: str | os.PathLike, *, sigma_y=None) -> PartitionedSource:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"no such observation directory: {str(root)!r}")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".parquet", ".pq")
                       and not any(s.startswith((".", "_")) for s in p.relative_to(root).parts))
        if not files:
            raise EmptyTableError(f"observation directory {str(root)!r} holds no .parquet files")
        return cls(root, tuple(_time_range(p, root) for p in files), sigma_y)

    def window(self, start, end) -> pd.DataFrame:
        """Rows with ``start <= time <= end`` from the files whose time range overlaps it."""
        start, end = pd.Timestamp(start), pd.Timestamp(end)
        tables = []
        for part in self.parts:
            if part.tmax < start or part.tmin > end:
                continue
            try:
                raw = pd.read_parquet(part.path)
            except Exception as e:  # noqa: BLE001 - any reader failure names the file
                raise PartitionFileError(f"observation file {str(part.path)!r} cannot be read ({type(e).__name__}: {e})",
                                           part.path) from None
            if "time" not in raw.columns:
                raw = raw.assign(time=part.time_value)
            else:
                raw = raw.assign(time=_coerce_times(raw["time"], part.path))
            tables.append(standard_layout(raw, sigma_y=self.sigma_y, source=f"observation file {str(part.path)!r}"))
        if not tables:
            return standard_layout(pd.DataFrame({c: [] for c in COLUMNS}), source=str(self.root))
        return _in_window(pd.concat(tables, ignore_index=True), start, end)


ObservationSource = TableSource | PartitionedSource


def open_observations(source, *, sigma_y=None) -> ObservationSource:
    """A file, a partitioned directory, or a DataFrame (either layout) -> a source with
    ``window(start, end)``. sigma_y: used only for tables without a ``sigma`` column."""
    if isinstance(source, pd.DataFrame):
        return TableSource(standard_layout(source, sigma_y=sigma_y), "observation table")
    path = Path(source)
    if path.is_dir():
        return PartitionedSource.open(path, sigma_y=sigma_y)
    return TableSource.read(path, sigma_y=sigma_y)
