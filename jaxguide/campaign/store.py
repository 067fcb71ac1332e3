"""The zarr store of a campaign: one analysis per time, written time by time, resumable.

Layout: the dataset of :func:`jaxguide.assimilation.dataset.analysis_to_dataset` (dims ``(member, time,
pixel)`` per channel, CF and HEALPix metadata, provenance attributes) with the full
``time`` axis of the campaign, created up front, plus per time

- ``completed`` (time) int8: 0 not yet done, 1 analysed, 2 skipped (CF flag variable);
- ``skipped_reason`` (time) string: why a time was skipped ("" otherwise);

and the campaign's settings as the JSON attribute ``jaxguide_campaign``.

Every variable with a ``time`` dimension is chunked one time per chunk, so each time is
written by ``to_zarr(region=...)`` into its own chunk files: processes that write
different times never touch the same file, and a time is written data first and its
``completed`` flag last (each chunk file is replaced atomically by zarr's local store).
A run killed at any moment leaves every time either complete or flagged 0; a resumed
run (:meth:`CampaignStore.open`) writes the flagged-0 times again, whole. Unwritten data
read as NaN. A machine crash cannot reorder this: the time's chunk files (and their
directories) are fsynced before the flag is written, and the flag is fsynced after.
:meth:`CampaignStore.redo_damaged` (run on ``--resume``) flags pending again any complete
time whose chunk files were lost or damaged since.

The attribute also records what the inputs held (:func:`jaxguide.io.files.content_identity`
of the observation and SST files), so a resume with edited inputs is refused
(:class:`InputsChangedError`) instead of mixing old and new results. The store's metadata
are consolidated (``zarr.json`` at the root lists every array; they never change after
creation), so ``xarray.open_zarr(store)`` opens it without a warning.

``JAXGUIDE_TEST_KILL_AT`` is a hook of the fault tests (:func:`fault_hook`).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.io.files import (
    changed_content,
    fsync_dir,
    fsync_file,
    fsync_tree,
    output_parent,
    remove_path,
    replace_into_place,
    require_zarr,
    temp_beside,
)
from jaxguide.io.times import parse_time

logger = logging.getLogger(__name__)

CAMPAIGN_ATTR = "jaxguide_campaign"
PENDING, ANALYSED, SKIPPED = 0, 1, 2
STATUS_VARS = ("completed", "skipped_reason")
TIME_UNITS = "seconds since 1970-01-01T00:00:00"


class CampaignStoreError(ValueError):
    """A campaign store that cannot be created, resumed or written as asked."""


class SettingsMismatchError(CampaignStoreError):
    """``--resume`` on a store made with different settings; ``setting`` names the first
    differing one (``"times"`` for a different list of analysis times)."""

    def __init__(self, message: str, setting: str):
        super().__init__(message)
        self.setting = setting


class InputsChangedError(CampaignStoreError):
    """``--resume`` with an observation or SST file whose contents differ from those the
    store was made with; the message names the file."""


KILL_AT_ENV = "JAXGUIDE_TEST_KILL_AT"


def fault_hook(point: str, index: int | None = None) -> None:
    """Fault-test hook: with ``JAXGUIDE_TEST_KILL_AT=POINT[:INDEX][+SECONDS]`` in the
    environment, kill this process (SIGKILL, as ``kill -9``) when it reaches ``point`` (of
    time ``INDEX`` when given), or ``SECONDS`` after that (then it dies in whatever
    follows: compiling, sampling). Points: ``start`` (the pending times were read),
    ``before_data``, ``after_data`` (data written, flag not yet), ``after_flag`` (per
    time), ``before_consolidate``. Unset: nothing."""
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    m = re.fullmatch(r"(\w+)(?::(\d+))?(?:\+([0-9.]+))?", spec.strip())
    if m is None or m.group(1) != point or (m.group(2) is not None and int(m.group(2)) != index):
        return
    kill = functools.partial(os.kill, os.getpid(), signal.SIGKILL)
    if m.group(3):
        timer = threading.Timer(float(m.group(3)), kill)
        timer.daemon = True
        timer.start()
    else:
        kill()


def normalise_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as they are stored (a JSON round trip: tuples become lists, ...)."""
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=str))


def _time_vars(ds: xr.Dataset) -> list[str]:
    return [n for n, v in ds.data_vars.items() if "time" in v.dims and n not in STATUS_VARS]


def _fill(dtype: np.dtype):
    return np.nan if np.issubdtype(dtype, np.floating) else 0


def _as_times(times) -> pd.DatetimeIndex:
    idx = pd.DatetimeIndex(times).as_unit("ns")
    if idx.tz is not None:
        idx = idx.tz_convert("UTC").tz_localize(None)
    if len(idx) == 0:
        raise CampaignStoreError("a campaign needs at least one analysis time")
    if not idx.is_monotonic_increasing or idx.has_duplicates:
        raise CampaignStoreError("campaign times must be strictly increasing")
    if (idx.asi8 % 1_000_000_000).any():
        raise CampaignStoreError("campaign times must be whole seconds")
    return idx


@dataclass(frozen=True)
class CampaignStore:
    """A campaign's zarr store (see the module docstring); create with :meth:`create`,
    continue with :meth:`open`. ``settings`` are the normalised campaign settings."""

    path: Path
    times: pd.DatetimeIndex
    settings: dict[str, Any]
    variables: tuple[str, ...]  # per-time data variables (without the status ones)
    changed_inputs: tuple[str, ...] = ()  # inputs found changed (allowed) when opened: see record_inputs

    # ---------------------------------------------------------------- creation / opening

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        template: xr.Dataset,
        times: Sequence[Any],
        settings: Mapping[str, Any],
        *,
        overwrite: bool = False,
        inputs: Mapping[str, Any] | None = None,
    ) -> CampaignStore:
        """Create the store for all ``times`` (nothing analysed yet), atomically.

        template: the dataset of ONE time as it will be written (e.g. from
          :func:`jaxguide.assimilation.dataset.analysis_to_dataset`); its variables without a ``time``
          dimension (coordinates, ``crs``) and its attributes are written now, the
          per-time ones are allocated (NaN / 0) for every time.
        settings: JSON-friendly mapping stored in the ``jaxguide_campaign`` attribute and
          compared by :meth:`open`.
        inputs: what the input files held, ``{role: {"path": ..., "identity": ...}}``
          (:func:`jaxguide.io.files.content_identity`), compared by :meth:`open`.
        Raises FileExistsError (exists and not ``overwrite``), FileNotFoundError (no parent
        directory), CampaignStoreError (bad template or times).
        """
        require_zarr()
        import zarr

        path = Path(path)
        times = _as_times(times)
        if template.sizes.get("time") != 1:
            raise CampaignStoreError(f"the template must hold one time, got time size {template.sizes.get('time')}")
        names = _time_vars(template)
        if not names:
            raise CampaignStoreError("the template has no variable with a time dimension")
        output_parent(path)  # names a missing or unwritable directory
        if path.exists() and not overwrite:
            raise FileExistsError(f"{str(path)!r} exists (pass --resume to continue that campaign, or --overwrite)")

        settings = normalise_settings(settings)
        ds = template.copy()
        for name in names:  # allocate only: NaN/0 chunks equal the fill value and are not written
            v = ds[name]
            ds[name] = v.copy(data=np.full(v.shape, _fill(v.dtype), v.dtype))
        ds = ds.assign_coords(time=("time", times[:1].to_numpy(), template["time"].attrs))
        # status variables are auxiliary coordinates along time (CF: no units needed)
        ds = ds.assign_coords(
            completed=("time", np.zeros(1, np.int8), {
                "long_name": "analysis status of the time",
                "flag_values": np.array([PENDING, ANALYSED, SKIPPED], np.int8),
                "flag_meanings": "pending analysed skipped",
            }),
            skipped_reason=("time", np.array([""], dtype=object), {"long_name": "why the time was skipped"}),
        )
        meta: dict[str, Any] = {"settings": settings, "n_times": len(times)}
        if inputs is not None:
            meta["inputs"] = normalise_settings(inputs)
        ds.attrs[CAMPAIGN_ATTR] = json.dumps(meta, sort_keys=True)

        encoding: dict[str, dict[str, Any]] = {"time": {"units": TIME_UNITS, "calendar": "proleptic_gregorian",
                                                        "dtype": "int64", "chunks": (len(times),)}}
        for name in [*names, *STATUS_VARS]:
            v = ds[name]
            enc: dict[str, Any] = {"chunks": tuple(1 if d == "time" else s for d, s in zip(v.dims, v.shape))}
            if np.issubdtype(v.dtype, np.floating):
                enc["_FillValue"] = np.nan
            encoding[name] = enc

        tmp = temp_beside(path, directory=True)  # also removes those of killed earlier creations
        target = tmp / path.name
        try:
            ds.to_zarr(target, mode="w", consolidated=False, encoding=encoding)
            group = zarr.open_group(target, mode="r+")
            for name in [*names, *STATUS_VARS, "time"]:
                arr = group[name]
                shape = list(arr.shape)
                shape[list(arr.metadata.dimension_names).index("time")] = len(times)
                arr.resize(tuple(shape))
            group["time"][:] = times.asi8 // 1_000_000_000
            _consolidate(target)
            fsync_tree(target)
            replace_into_place(target, path)  # and fsyncs the parent directory
        finally:
            remove_path(tmp)
        logger.info("created campaign store %s: %d times", path, len(times))
        return cls(path, times, settings, tuple(names))

    @classmethod
    def open(cls, path: str | os.PathLike, times: Sequence[Any] | None = None,
             settings: Mapping[str, Any] | None = None, *, inputs: Mapping[str, Any] | None = None,
             allow_changed_inputs: bool = False) -> CampaignStore:
        """Open an existing store to continue it. With ``times`` / ``settings`` given,
        they must equal the store's: otherwise :class:`SettingsMismatchError` naming the
        first differing setting (``"times"``, checked first, for the time list). With
        ``inputs`` given (as to :meth:`create`), an input whose contents differ from the
        recorded ones raises :class:`InputsChangedError` naming the file, unless
        ``allow_changed_inputs`` (then a warning)."""
        require_zarr()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such campaign store: {str(path)!r}")
        try:
            ds = xr.open_zarr(path, consolidated=False, chunks=None)
        except Exception as e:  # noqa: BLE001 - any zarr/xarray failure means "not a store"
            raise CampaignStoreError(f"{str(path)!r} is not a readable zarr store ({type(e).__name__}: {e})") from None
        with ds:
            meta = ds.attrs.get(CAMPAIGN_ATTR)
            if meta is None or any(v not in ds.variables for v in STATUS_VARS):
                raise CampaignStoreError(f"{str(path)!r} is not a jaxguide campaign store (no {CAMPAIGN_ATTR!r} attribute)")
            meta = json.loads(meta)
            stored = meta["settings"]
            store_times = pd.DatetimeIndex(ds["time"].values).as_unit("ns")
            names = tuple(_time_vars(ds))
        if times is not None:
            want = _as_times(times)
            if not store_times.equals(want):
                raise SettingsMismatchError(
                    f"cannot resume {str(path)!r}: it was made for {len(store_times)} times "
                    f"{store_times[0]} .. {store_times[-1]}, this run asks for {len(want)} times "
                    f"{want[0]} .. {want[-1]}; use the same --times, or a new --out", "times")
        if settings is not None:
            new = normalise_settings(settings)
            for key in sorted(set(stored) | set(new)):
                old_v, new_v = stored.get(key, "<not set>"), new.get(key, "<not set>")
                if old_v != new_v:
                    raise SettingsMismatchError(
                        f"cannot resume {str(path)!r}: it was made with {key}={old_v!r}, this run has "
                        f"{key}={new_v!r}; use the same settings, or a new --out", key)
        changed: tuple[str, ...] = ()
        if inputs is not None:
            changed = _check_inputs(path, meta.get("inputs"), normalise_settings(inputs), allow_changed_inputs)
        return cls(path, store_times, stored, names, changed)

    def record_inputs(self, inputs: Mapping[str, Any], changes: Sequence[str]) -> None:
        """Record ``inputs`` as the store's inputs after a resume that allowed ``changes``
        (descriptions, as :attr:`changed_inputs`), so later resumes check against what
        was used last; the changes are kept in the attribute's ``input_changes`` (UTC
        time and what changed), as the store now mixes results of both inputs."""
        import zarr

        group = zarr.open_group(self.path, mode="r+")
        meta = json.loads(group.attrs[CAMPAIGN_ATTR])
        meta["inputs"] = normalise_settings(inputs)
        stamp = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
        meta.setdefault("input_changes", []).append({"time": stamp, "changes": list(changes)})
        group.attrs[CAMPAIGN_ATTR] = json.dumps(meta, sort_keys=True)
        self.consolidate()

    # ---------------------------------------------------------------- state

    def status(self) -> np.ndarray:
        """(T,) int8: :data:`PENDING`, :data:`ANALYSED` or :data:`SKIPPED` per time."""
        import zarr

        return np.asarray(zarr.open_array(self.path / "completed", mode="r")[:], np.int8)

    def pending(self) -> list[int]:
        """Indices of the times not yet complete (analysed or skipped)."""
        out = [int(i) for i in np.flatnonzero(self.status() == PENDING)]
        fault_hook("start")
        return out

    def index(self, time) -> int:
        t = parse_time(time)
        try:
            return int(self.times.get_loc(t))
        except KeyError:
            raise CampaignStoreError(f"{t} is not one of the campaign's times") from None

    # ---------------------------------------------------------------- writing

    def _region_write(self, i: int, data: Mapping[str, xr.Variable]) -> None:
        """Write the variables of time ``i`` and make them durable: fsync their chunk files
        and the directories holding them (zarr renames each chunk file into place, or
        removes it when the chunk equals the fill value)."""
        xr.Dataset(dict(data)).to_zarr(self.path, region={"time": slice(i, i + 1)}, consolidated=False)
        dirs = set()
        for f in self.chunk_files(i, list(data)):
            if f.exists():
                fsync_file(f)
            d = f.parent
            while d != self.path.parent and d not in dirs:
                dirs.add(d)
                d = d.parent
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                fsync_dir(d)

    def chunk_files(self, i: int, names: Sequence[str] | None = None) -> list[Path]:
        """The chunk files of time ``i`` of the variables ``names`` (default: every per-time
        variable and the status ones), whether they exist or not (a chunk equal to the fill
        value is not stored)."""
        import zarr

        group = zarr.open_group(self.path, mode="r", use_consolidated=False)
        return [f for _, f in self._chunks(group, i, names)]

    def _chunks(self, group, i: int, names: Sequence[str] | None = None) -> list[tuple[str, Path]]:
        out = []
        for name in (names if names is not None else [*self.variables, *STATUS_VARS]):
            arr = group[name]
            dims = list(arr.metadata.dimension_names)
            ranges = [[i // arr.chunks[k]] if d == "time" else range(n)
                      for k, (d, n) in enumerate(zip(dims, arr.cdata_shape))]
            out += [(name, self.path / name / arr.metadata.encode_chunk_key(c)) for c in itertools.product(*ranges)]
        return out

    def consolidate(self) -> None:
        """(Re)write the consolidated metadata (see the module docstring), durably."""
        fault_hook("before_consolidate")
        _consolidate(self.path)
        fsync_file(self.path / "zarr.json")
        fsync_dir(self.path)

    def redo_damaged(self) -> list[tuple[pd.Timestamp, str]]:
        """Flag pending again every complete time whose chunk files are missing (an
        analysed time's floating-point data) or cannot be decoded (truncated, damaged), so
        that a resume writes it again; returns those times and what was wrong."""
        import zarr

        group = zarr.open_group(self.path, mode="r", use_consolidated=False)
        flags = group["completed"]
        redo = []
        for i in range(len(self.times)):
            try:
                flag = int(flags[i])
            except Exception as e:  # noqa: BLE001 - a flag that cannot be read: the time is redone
                redo.append((i, f"its flag cannot be read ({type(e).__name__})"))
                continue
            if flag == PENDING:
                continue
            for name, f in self._chunks(group, i):
                arr = group[name]
                rel = f.relative_to(self.path).as_posix()
                if not f.exists():
                    if flag == ANALYSED and np.issubdtype(arr.dtype, np.floating):
                        redo.append((i, f"chunk file {rel} is missing"))
                        break
                    continue
                region = tuple(slice(i, i + 1) if d == "time" else slice(None) for d in arr.metadata.dimension_names)
                try:
                    arr[region]
                except Exception as e:  # noqa: BLE001 - any decoding failure means a damaged chunk
                    redo.append((i, f"chunk file {rel} cannot be read ({type(e).__name__})"))
                    break
        for i, why in redo:
            logger.warning("redoing %s: %s", self.times[i], why)
            self._region_write(i, {"completed": xr.Variable(("time",), np.array([PENDING], np.int8))})
        return [(self.times[i], why) for i, why in redo]

    def write_time(self, ds: xr.Dataset) -> int:
        """Write one analysed time (a dataset like the template, time size 1), then flag
        it complete. Returns the time's index."""
        if ds.sizes.get("time") != 1:
            raise CampaignStoreError(f"write_time needs a dataset of one time, got time size {ds.sizes.get('time')}")
        i = self.index(ds["time"].values[0])
        names = _time_vars(ds)
        if sorted(names) != sorted(self.variables):
            raise CampaignStoreError(f"variables {sorted(names)} do not match the store's {sorted(self.variables)}")
        with xr.open_zarr(self.path, consolidated=False, chunks=None) as store:
            data = {}
            for n in names:
                v, s = ds[n].variable, store[n]
                if v.dims != s.dims or v.shape[:] != tuple(1 if d == "time" else s.sizes[d] for d in s.dims):
                    raise CampaignStoreError(f"{n}: dims {v.dims} shape {v.shape} do not fit the store's {s.dims} {s.shape}")
                data[n] = xr.Variable(v.dims, np.asarray(v.values, s.dtype))
        data["skipped_reason"] = xr.Variable(("time",), np.array([""], dtype=object))
        fault_hook("before_data", i)
        self._region_write(i, data)  # durable before the flag is written
        fault_hook("after_data", i)
        self._region_write(i, {"completed": xr.Variable(("time",), np.array([ANALYSED], np.int8))})
        fault_hook("after_flag", i)
        return i

    def skip(self, time, reason: str, **scalars: float) -> int:
        """Record ``time`` as skipped with ``reason``: its data are reset to NaN (integer
        per-time variables to ``scalars.get(name, 0)``), then it is flagged complete."""
        if not reason:
            raise CampaignStoreError("a skipped time needs a reason")
        i = self.index(time)
        with xr.open_zarr(self.path, consolidated=False, chunks=None) as store:
            data = {}
            for n in self.variables:
                s = store[n]
                shape = tuple(1 if d == "time" else s.sizes[d] for d in s.dims)
                value = scalars.get(n, _fill(s.dtype))
                data[n] = xr.Variable(s.dims, np.full(shape, value, s.dtype))
        data["skipped_reason"] = xr.Variable(("time",), np.array([str(reason)], dtype=object))
        fault_hook("before_data", i)
        self._region_write(i, data)  # durable before the flag is written
        fault_hook("after_data", i)
        self._region_write(i, {"completed": xr.Variable(("time",), np.array([SKIPPED], np.int8))})
        fault_hook("after_flag", i)
        logger.warning("skipped %s: %s", self.times[i], reason)
        return i


def _consolidate(path: Path) -> None:
    import warnings

    import zarr

    with warnings.catch_warnings():  # zarr 3: "consolidated metadata is not part of the v3 spec" (xarray reads it)
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(path)


def _check_inputs(path: Path, old: Mapping[str, Any] | None, new: Mapping[str, Any], allow: bool) -> tuple[str, ...]:
    """InputsChangedError naming the first input file whose contents are not the recorded
    ones; with ``allow``, a warning per changed input and their descriptions returned."""
    if old is None:
        logger.warning("%s records no input contents (made by an earlier jaxguide): cannot check that the "
                       "observation and SST files are unchanged", path)
        return ()
    changed = []
    for role in sorted(set(old) | set(new)):
        a, b = old.get(role), new.get(role)
        if a is None or b is None or a.get("identity") is None or b.get("identity") is None:
            if (a or {}).get("identity") == (b or {}).get("identity"):
                continue
            what = f"{role} input {(b or a or {}).get('path')!r} ({'not recorded' if a is None else 'not given now'})"
        else:
            what = changed_content(b.get("path") or a.get("path"), a["identity"], b["identity"])
            if what is None:
                continue
            what = f"{role} file {what}"
        msg = (f"cannot resume {str(path)!r}: the {what} changed since the store was made; use the same inputs, "
               "a new --out, or --allow-changed-inputs to continue anyway")
        if not allow:
            raise InputsChangedError(msg)
        logger.warning("the %s changed since %s was made; continuing (changed inputs allowed)", what, path)
        changed.append(what)
    return tuple(changed)


def read_campaign(path: str | os.PathLike) -> xr.Dataset:
    """A campaign store loaded into memory (times not yet complete hold NaN)."""
    require_zarr()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such campaign store: {str(path)!r}")
    with xr.open_zarr(path, consolidated=False, chunks=None) as ds:
        return ds.load()
