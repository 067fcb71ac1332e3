"""Files: atomic writes (NetCDF4 with zlib, zarr, JSON, anything via a callback) and reads.

What goes into an analysis file (variables, coordinates, CF attributes) is defined in
:mod:`jaxguide.assimilation.dataset`; this module only puts a Dataset on disk and reads it back.
Every write goes to a hidden temporary beside the destination and is renamed into
place, so a destination is absent, the old file, or complete, and is durable: the data
are fsynced before the rename and the directory after it (:func:`fsync_file`,
:func:`fsync_dir`), so a machine crash cannot leave the new name on disk with data that
never got there. The new file gets the
permissions a plain ``open(path, "w")`` would give (``0o666`` minus the umask), not
``mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import xarray as xr

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# atomic write / read

Format = Literal["netcdf", "zarr"]

# NetCDF4 compression of data variables (lossless; coordinates are left uncompressed)
NETCDF_COMPRESSION = {"zlib": True, "complevel": 4, "shuffle": True}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(directory: bool = False) -> int:
    """Permissions a plain ``open(..., "w")`` (``mkdir`` for directories) would give."""
    return (0o777 if directory else 0o666) & ~_umask()


def _chmod_tree(path: Path) -> None:
    """Give a freshly written file or directory tree the plain-write permissions."""
    if path.is_dir():
        os.chmod(path, _default_mode(True))
        for root, dirs, names in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), _default_mode(True))
            for n in names:
                os.chmod(os.path.join(root, n), _default_mode())
    else:
        os.chmod(path, _default_mode())


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to the disk (``os.fsync``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (renames, new and removed files in it) to the disk;
    a no-op where a directory cannot be opened or synced (Windows, some filesystems)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file and directory under ``path`` (a zarr store before its rename)."""
    path = Path(path)
    if not path.is_dir():
        fsync_file(path)
        return
    for root, _dirs, names in os.walk(path, topdown=False):
        for n in names:
            fsync_file(os.path.join(root, n))
        fsync_dir(root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_identity(path: str | os.PathLike, files: list[Path] | None = None) -> dict[str, Any]:
    """What an input holds, to tell later whether it changed: for a file its size and
    SHA-256, ``{"size", "sha256"}``; for a directory a manifest ``{"files": {name relative
    to it: {"size", "sha256"}}}`` of ``files`` (default: every file under it, hidden
    ones aside)."""
    path = Path(path)
    if not path.is_dir():
        return {"size": path.stat().st_size, "sha256": _sha256(path)}
    if files is None:
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(s.startswith(".") for s in p.relative_to(path).parts))
    return {"files": {p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                      for p in sorted(files)}}


def changed_content(path: str | os.PathLike, old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """None when two :func:`content_identity` of ``path`` agree; else the file that
    differs and how (``'obs.parquet' (size 100 -> 120)``, ``'obs/b.parquet' (removed)``)."""
    if old == new:
        return None
    path = Path(path)
    if "files" in old and "files" in new:
        for name in sorted(set(old["files"]) | set(new["files"])):
            a, b = old["files"].get(name), new["files"].get(name)
            if a != b:
                how = "added" if a is None else "removed" if b is None else _how(a, b)
                return f"{str(path / name)!r} ({how})"
    if "files" in old or "files" in new:
        kinds = ["directory" if "files" in x else "file" for x in (old, new)]
        return f"{str(path)!r} (a {kinds[0]} before, now a {kinds[1]})"
    return f"{str(path)!r} ({_how(old, new)})"


def _how(a: dict[str, Any], b: dict[str, Any]) -> str:
    if a.get("size") != b.get("size"):
        return f"size {a.get('size')} -> {b.get('size')}"
    return "same size, different contents"


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree (not following a symlink); a missing path is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# Hidden temporaries beside a target are named ``.{target}.{host}-{pid}.{random}.tmp``
# (and ``.{target}.{host}-{pid}.old`` for a zarr store moved aside), so that the next
# write of the same target can tell a crashed writer's leftovers (same host, process
# gone) from a writer that is still running (kept). Leftovers of jaxguide versions
# before this naming (``.{target}.{random}.tmp``) are removed once an hour old.
_LEGACY_STALE_SECONDS = 3600.0


def _writer_tag() -> str:
    import socket

    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: never guess
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but not ours, or cannot tell: keep its files
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporaries of ``path`` left by writers that died (killed,
    crashed) on this host; returns what was removed. Temporaries of live processes and
    of other hosts (a shared filesystem) are kept."""
    import time

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    name = re.escape(path.name)
    tagged = re.compile(rf"^\.{name}\.([A-Za-z0-9_]+)-(\d+)\.(?:[a-z0-9_]{{8}}\.tmp|old)$")
    legacy = re.compile(rf"^\.{name}\.(?:[a-z0-9_]{{8}}\.tmp|old-\d+)$")
    host = _writer_tag().rsplit("-", 1)[0]
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = tagged.match(entry.name)
        if m:
            stale = m.group(1) == host and not _pid_alive(int(m.group(2)))
        elif legacy.match(entry.name):
            try:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > _LEGACY_STALE_SECONDS
            except OSError:
                stale = False
        else:
            continue
        if stale:
            remove_path(Path(entry.path))
            removed.append(Path(entry.path))
    if removed:
        logger.warning("removed %d temporary file(s) of %s left by an interrupted earlier run: %s",
                       len(removed), path, [p.name for p in removed])
    return removed


def temp_beside(path: str | os.PathLike, *, directory: bool) -> Path:
    """A new hidden temporary (file or directory) beside ``path``, after removing the
    stale ones of crashed earlier writers of the same target. The caller renames it
    onto ``path`` or removes it."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    remove_stale_temporaries(path)
    prefix = f".{path.name}.{_writer_tag()}."
    try:
        if directory:
            return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
    except OSError as e:
        raise PermissionError(f"cannot create files in output directory {str(parent)!r}: {e.strerror}") from None
    os.close(fd)
    return Path(tmp)


def require_zarr() -> None:
    """Raise a ValueError naming the missing package unless ``zarr`` is importable."""
    try:
        import zarr  # noqa: F401
    except ImportError:
        raise ValueError("the zarr format needs the 'zarr' package (tested with zarr==3.1.6)") from None


def output_parent(path: Path) -> Path:
    """The existing directory ``path`` will be written into (``.`` for a bare name);
    NotADirectoryError / FileNotFoundError naming it otherwise."""
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"{str(parent)!r} is a file, not a directory (output {str(path)!r})")
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {str(parent)!r} does not exist")
    return parent


def netcdf_encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """Per-variable NetCDF encoding: zlib for data variables, no ``_FillValue`` on
    coordinates (CF: coordinate variables must not have missing values) nor on the
    grid-mapping container."""
    enc: dict[str, dict[str, Any]] = {}
    for name, var in ds.variables.items():
        if name in ds.coords or var.ndim == 0:
            enc[name] = {"_FillValue": None}
        else:
            enc[name] = dict(NETCDF_COMPRESSION)
    return enc


def write_dataset(ds: xr.Dataset, path: str | os.PathLike, *, format: Format = "netcdf", overwrite: bool = False) -> Path:
    """Write ``ds`` atomically: to a hidden temporary in the same directory, then
    ``os.replace``. The destination either does not exist or is complete. NetCDF data
    variables are zlib-compressed (:data:`NETCDF_COMPRESSION`).

    Raises FileExistsError (exists and not ``overwrite``), IsADirectoryError (a NetCDF
    destination that is a directory), NotADirectoryError (a zarr destination that is a
    file, or a parent that is a file), FileNotFoundError (no such directory),
    PermissionError (directory not writable), ValueError (bad format).
    Overwriting a zarr directory moves the old one aside first (a crash in that short
    window leaves no destination rather than a partial one). Temporaries left by a
    killed earlier write of the same ``path`` are removed (:func:`remove_stale_temporaries`).
    """
    if format not in ("netcdf", "zarr"):
        raise ValueError(f"unknown format {format!r}; expected 'netcdf' or 'zarr'")
    if format == "zarr":
        require_zarr()
    path = Path(path)
    parent = output_parent(path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {str(parent)!r} is not writable")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists (pass overwrite=True to replace it)")
    if format == "netcdf" and path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; a NetCDF analysis is a file (e.g. analysis.nc)")
    if format == "zarr" and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is a file; a zarr store is a directory")
    tmp = temp_beside(path, directory=True)
    target = tmp / path.name
    try:
        try:
            if format == "netcdf":
                ds.to_netcdf(target, engine="netcdf4", format="NETCDF4", encoding=netcdf_encoding(ds))
                fsync_file(target)
            else:
                ds.to_zarr(target, mode="w", consolidated=False)
                fsync_tree(target)
        except OSError as e:  # disk full, file-size limit, ...: name the destination (the old one is intact)
            if e.filename is not None or not e.strerror:
                raise
            raise OSError(e.errno, e.strerror, str(path)) from None
        except RuntimeError as e:  # the NetCDF library's "NetCDF: HDF error" for the same
            if "HDF error" not in str(e):
                raise
            raise OSError(f"cannot write {str(path)!r} ({e}; disk full or over a file-size limit?); "
                          "an existing file there is unchanged") from None
        _chmod_tree(target)
        replace_into_place(target, path)
        logger.info("wrote %s (%s)", path, format)
    finally:
        remove_path(tmp)
    return path


def read_analysis(path: str | os.PathLike) -> xr.Dataset:
    """Read an analysis written by :func:`write_dataset` into memory (a ``.zarr``
    directory or a NetCDF file); named errors for a missing path and for a file
    that is not an analysis."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such analysis file: {str(path)!r}")
    try:
        if path.is_dir():
            require_zarr()
            ds = xr.open_zarr(path, consolidated=False)
        else:
            ds = xr.open_dataset(path, engine="netcdf4")
    except (OSError, ValueError) as e:
        kind = "zarr store" if path.is_dir() else "NetCDF file"
        raise ValueError(f"{str(path)!r} is not a readable {kind} written by jaxguide: {e}") from None
    with ds:
        loaded = ds.load()
    if not any("member" in v.dims for v in loaded.data_vars.values()):
        raise ValueError(f"{str(path)!r} has no data variable with a member dimension; not an analysis")
    return loaded


def check_writable_dir(directory: str | os.PathLike) -> Path:
    """``directory`` if a file can be created in it; else FileNotFoundError /
    NotADirectoryError / PermissionError naming it (checked before long work, so it
    fails early)."""
    directory = Path(directory) if str(directory) else Path(".")
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{str(directory)!r} is a file, not an output directory")
    if not directory.is_dir():
        raise FileNotFoundError(f"output directory {str(directory)!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".jaxguide-probe.", dir=directory)
    except OSError as e:
        raise PermissionError(f"cannot create files in output directory {str(directory)!r}: {e.strerror}") from None
    os.close(fd)
    os.unlink(probe)
    return directory


def replace_into_place(target: Path, path: Path) -> None:
    """Rename the finished (and fsynced) ``target`` to ``path``, then fsync the directory
    so that the rename is durable; an existing directory at ``path`` (a zarr store) is
    moved aside first and removed after, since a rename cannot replace a non-empty
    directory."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        old = path.parent / f".{path.name}.{_writer_tag()}.old"
        os.replace(path, old)
        os.replace(target, path)
        fsync_dir(parent)
        remove_path(old)
    else:
        os.replace(target, path)
        fsync_dir(parent)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a hidden temporary file beside ``path``, then rename it to
    ``path``: the destination is either absent, the old file, or complete, and durable
    (the data are fsynced before the rename, the directory after it). The file
    gets the permissions of a plain write (``0o666`` minus the umask). Temporaries
    that killed earlier writes of ``path`` left behind are removed first
    (:func:`remove_stale_temporaries`).

    Raises FileNotFoundError (no such directory), IsADirectoryError (``path`` is a
    directory), PermissionError (not writable).
    """
    path = Path(path)
    output_parent(path)  # names a missing or unwritable directory
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; expected a file name")
    tmp = temp_beside(path, directory=False)
    try:
        try:
            write(tmp)
            fsync_file(tmp)
        except OSError as e:  # disk full, file-size limit, ...: name the destination (the old file is intact)
            if e.filename is not None or not e.strerror:
                raise
            raise OSError(e.errno, e.strerror, str(path)) from None
        os.chmod(tmp, _default_mode())
        replace_into_place(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (see :func:`atomic_write`); non-JSON
    numbers (NumPy scalars) are written as floats."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=float)
            fh.write("\n")

    return atomic_write(path, write)
