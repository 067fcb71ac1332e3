"""Convert cBottle PyTorch checkpoints to jaxguide's Flax parameters (orbax) plus metadata.

A cBottle checkpoint is a zip with ``net_state.pth`` (``torch.save`` of the EDMPrecond
state_dict), ``model.json``, ``batch_info.json`` and ``metadata.json``. The state dict is
read with ``torch.load(weights_only=True)``: no arbitrary code is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxguide.model.convert.mapping import RESAMPLE_FILTER, channels_per_head_from_state, key_map, to_flax, to_torch
from jaxguide import __version__
from jaxguide.io.files import temp_beside
from jaxguide.model.config import BatchInfo, ModelConfig, UnsupportedArchitectureError
from jaxguide.model.checkpoint import FORMAT_VERSION, METADATA_FILE, PARAMS_DIR, graphdef_and_shapes, sha256_file

log = logging.getLogger(__name__)

REQUIRED_MEMBERS = ("net_state.pth", "model.json", "batch_info.json", "metadata.json")


class CheckpointError(ValueError):
    """Base class: a checkpoint cannot be converted."""


class NotAZipError(CheckpointError):
    """The file is not a zip archive (not a cBottle checkpoint)."""


class TruncatedCheckpointError(CheckpointError):
    """The zip is incomplete or damaged (e.g. an interrupted download)."""


class MissingMemberError(CheckpointError):
    """A required member of the checkpoint zip is missing."""


class LegacyCheckpointError(CheckpointError):
    """An old pickled-module checkpoint, which we refuse to unpickle."""


class UnknownArchitectureError(CheckpointError, UnsupportedArchitectureError):
    """model.json names an architecture jaxguide does not port."""


class StateDictMismatchError(CheckpointError):
    """Keys or shapes of the state dict disagree with the model config."""


class ExpertMismatchError(CheckpointError):
    """The experts of a mixture have different configs or channels."""


class OutputExistsError(CheckpointError, FileExistsError):
    """The output directory exists and --overwrite was not given."""


@dataclass
class CheckpointContents:
    path: Path
    config: ModelConfig
    batch_info: BatchInfo
    params: dict  # flax parameter tree of numpy arrays
    sha256: str


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":
        raise NotAZipError(f"{path} is not a cBottle checkpoint: not a zip file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise TruncatedCheckpointError(f"{path} is a damaged or truncated zip ({e}); download it again") from None
    missing = [m for m in REQUIRED_MEMBERS if m not in zf.namelist()]
    if "metadata.json" in missing and "net_state.pth" in zf.namelist():
        zf.close()
        raise LegacyCheckpointError(
            f"{path} has no metadata.json: it is an old cBottle checkpoint that stores a pickled Python "
            "module, and loading it would execute arbitrary code. Load it once with cBottle and re-save it "
            "with cbottle.checkpointing.Checkpoint (write_model, write_model_config, write_batch_info)."
        )
    if missing:
        zf.close()
        raise MissingMemberError(f"{path} lacks {', '.join(missing)} (a cBottle checkpoint has {', '.join(REQUIRED_MEMBERS)})")
    return zf


def _read_json(zf: zipfile.ZipFile, name: str, path: Path) -> dict:
    try:
        return json.loads(zf.read(name).decode())
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise TruncatedCheckpointError(f"{path}: cannot read {name} ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {name} is not valid JSON ({e})") from None


def _load_state_dict(zf: zipfile.ZipFile, path: Path) -> dict:
    import torch

    try:
        with zf.open("net_state.pth") as f:
            state = torch.load(f, weights_only=True, map_location="cpu")
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError) as e:
        raise TruncatedCheckpointError(f"{path}: net_state.pth cannot be read ({type(e).__name__}: {e})") from None
    except Exception as e:  # weights_only refuses objects that are not tensors
        raise CheckpointError(f"{path}: net_state.pth is not a plain state_dict ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: net_state.pth holds a {type(state).__name__}, not a state_dict")
    return state


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def read_checkpoint(path: str | os.PathLike) -> CheckpointContents:
    """Read and map one cBottle checkpoint; every key/shape problem reported at once."""
    path = Path(path)
    zf = _open_zip(path)
    with zf:
        meta = _read_json(zf, "metadata.json", path)
        if meta.get("version") != 1:
            raise CheckpointError(f"{path}: unsupported cBottle checkpoint version {meta.get('version')!r} (known: 1)")
        config = ModelConfig.from_dict(_read_json(zf, "model.json", path))
        try:
            config.check_architecture()
        except UnsupportedArchitectureError as e:
            raise UnknownArchitectureError(f"{path}: {e}") from None
        batch_info = BatchInfo.from_dict(_read_json(zf, "batch_info.json", path))
        if len(batch_info.channels) != config.out_channels:
            raise CheckpointError(
                f"{path}: batch_info.json lists {len(batch_info.channels)} channels, model.json has out_channels={config.out_channels}"
            )
        state = _load_state_dict(zf, path)
    if config.is_video:
        # cBottle does not write the heads to model.json: read them from the weights
        try:
            per_head = channels_per_head_from_state(state)
        except ValueError as e:
            raise StateDictMismatchError(f"{path}: {e}") from None
        if per_head is not None:
            config = dataclasses.replace(config, channels_per_head=per_head)
    try:
        config.check_supported()
    except UnsupportedArchitectureError as e:
        raise UnknownArchitectureError(f"{path}: {e}") from None
    mapping, buffers = key_map(config)
    _, shapes = graphdef_and_shapes(config)
    flat_shapes = {}
    for kp, leaf in _leaves_with_path(shapes):
        flat_shapes[kp] = tuple(leaf.shape)
    missing = sorted(k for k in mapping if k not in state)
    unexpected = sorted(k for k in state if k not in mapping and k not in buffers)
    problems = []
    for key, (fpath, rule) in mapping.items():
        if key not in state:
            continue
        want = to_torch(rule, np.zeros(flat_shapes[fpath], np.float32)).shape
        got = tuple(state[key].shape)
        if got != want:
            problems.append(f"{key}: shape {got}, the config ({config.architecture}, model_channels={config.model_channels}) needs {want}")
    for key in buffers:
        if key.endswith("resample_filter") and key in state:
            if not np.array_equal(state[key].numpy(), RESAMPLE_FILTER):
                problems.append(f"{key}: resample filter {state[key].numpy().ravel().tolist()} is not the [1, 1] filter")
    if missing or unexpected or problems:
        lines = [f"{path}: the state dict does not match model.json:"]
        lines += [f"  missing key: {k}" for k in missing]
        lines += [f"  unexpected key: {k}" for k in unexpected]
        lines += [f"  {p}" for p in problems]
        raise StateDictMismatchError("\n".join(lines))
    params: dict = {}
    for key, (fpath, rule) in mapping.items():
        tensor = state.pop(key)
        if tensor.dtype.is_floating_point is False:
            raise StateDictMismatchError(f"{path}: {key} has dtype {tensor.dtype}, expected floating point")
        arr = to_flax(rule, tensor.detach().float().numpy())
        if not np.all(np.isfinite(arr)):
            raise CheckpointError(f"{path}: {key} contains NaN or inf")
        _set(params, fpath, arr)
        del tensor
    return CheckpointContents(path, config, batch_info, params, sha256_file(path))


def _leaves_with_path(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves_with_path(v, prefix + (str(k),))
    else:
        yield prefix, tree


def _check_experts(experts: Sequence[CheckpointContents], thresholds: Sequence[float]) -> None:
    first = experts[0]
    for e in experts[1:]:
        if e.config != first.config:
            diff = {k: (v, getattr(e.config, k)) for k, v in first.config.to_dict().items() if getattr(e.config, k) != v}
            raise ExpertMismatchError(f"experts disagree on model.json: {first.path.name} vs {e.path.name}: {diff}")
        if e.batch_info != first.batch_info:
            raise ExpertMismatchError(f"experts disagree on batch_info.json (channels or normalisation): {first.path.name} vs {e.path.name}")
    if len(thresholds) != len(experts) - 1:
        raise CheckpointError(
            f"{len(experts)} experts need {len(experts) - 1} sigma thresholds (expert i serves sigma >= thresholds[i]), got {len(thresholds)}"
        )
    if any(not np.isfinite(t) or t <= 0 for t in thresholds) or list(thresholds) != sorted(thresholds, reverse=True):
        raise CheckpointError(f"sigma thresholds must be positive and decreasing, got {list(thresholds)}")


def convert_checkpoints(
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    sigma_thresholds: Sequence[float] = (),
    overwrite: bool = False,
) -> Path:
    """Convert one checkpoint, or the experts of a mixture, into a jaxguide model directory.

    Writes ``out/params`` (orbax) and ``out/jaxguide.json`` (config, batch_info, thresholds,
    sources and their sha256, jaxguide version) atomically: everything goes to a temporary
    directory beside ``out`` that is renamed into place only when complete.
    """
    import orbax.checkpoint as ocp

    if not checkpoints:
        raise CheckpointError("no checkpoint given")
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    thresholds = tuple(float(t) for t in sigma_thresholds)
    experts = []
    tree = {}
    for i, ck in enumerate(checkpoints):
        log.info("reading %s", ck)
        contents = read_checkpoint(ck)
        tree[f"expert_{i}"] = contents.params
        contents.params = None  # keep one copy of the weights
        experts.append(contents)
    _check_experts(experts, thresholds)
    meta = {
        "format_version": FORMAT_VERSION,
        "jaxguide_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_config": experts[0].config.to_dict(),
        "batch_info": experts[0].batch_info.to_dict(),
        "sigma_thresholds": list(thresholds),
        "n_experts": len(experts),
        "sources": [{"file": e.path.name, "sha256": e.sha256} for e in experts],
        "pixel_order": "earth2grid HEALPIX_PAD_XY (jaxguide.grid.healpix order 'net'), HEALPix level 6",
        "layout": "(batch, channel, time, pixel)",
    }
    tmp = temp_beside(out, directory=True)  # also removes what a killed earlier conversion left
    try:
        ocp.PyTreeCheckpointer().save(tmp / PARAMS_DIR, tree)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_cbottle_checkpoint(
    path: str | os.PathLike, config: ModelConfig, batch_info: BatchInfo, params: dict
) -> Path:
    """Write flax parameters as a cBottle-format checkpoint zip (the inverse mapping).

    Used to build random-weight checkpoints at the released size for tests and benchmarks.
    """
    import io

    import torch

    mapping, buffers = key_map(config)
    state = {"device_buffer": torch.empty(0)}
    flat = dict(_leaves_with_path(params))
    for key, (fpath, rule) in mapping.items():
        state[key] = torch.from_numpy(np.array(to_torch(rule, np.asarray(flat[fpath], np.float32))))
    for key in sorted(buffers - {"device_buffer"}):
        state[key] = torch.from_numpy(RESAMPLE_FILTER.copy())
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("net_state.pth", "w", force_zip64=True) as f:
            buf = io.BytesIO()
            torch.save(state, buf)
            f.write(buf.getbuffer())
        zf.writestr("model.json", json.dumps(config.to_dict()))
        bi = batch_info.to_dict()
        zf.writestr("batch_info.json", json.dumps({k: v for k, v in bi.items() if v is not None}))
        zf.writestr("metadata.json", json.dumps({"version": 1}))
    os.replace(tmp, path)
    return path
