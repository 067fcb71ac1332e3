"""The mapping between cBottle's PyTorch state_dict keys and jaxguide's Flax parameters.

Derived from the model configuration alone, so the converter can name every missing or
unexpected key and every shape mismatch before touching the weights. Each entry maps a
PyTorch key to (path in the Flax parameter tree, layout rule). Layout rules:

- ``copy``: same array.
- ``linear``: PyTorch Linear weight (out, in) -> kernel (in, out).
- ``conv3``: Conv weight (out, in, kh, kw) -> HWIO kernel (kh, kw, in, out).
- ``conv1``: 1x1 Conv weight (out, in, 1, 1) -> kernel (in, out).
- ``pos``: positional embedding (C, 1, npix) -> (npix, C) (channels last).
"""

from __future__ import annotations

import numpy as np

from jaxguide.model.config import ModelConfig
from jaxguide.model.unet import decoder_layout, encoder_layout

Path = tuple[str, ...]

# Buffers cBottle stores in the state_dict that carry no learned values.
RESAMPLE_FILTER = np.full((1, 1, 2, 2), 0.25, np.float32)  # the [1, 1] filter, normalised


# rule -> (torch layout -> flax layout, its inverse)
_RULES = {
    "copy": (lambda a: a, lambda a: a),
    "linear": (lambda a: a.T, lambda a: a.T),  # (out, in) <-> (in, out)
    "conv3": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
    "conv1": (lambda a: a[:, :, 0, 0].T, lambda a: a.T[:, :, None, None]),  # OI11 <-> IO
    "pos": (lambda a: a[:, 0, :].T, lambda a: a.T[:, None, :]),  # (C, 1, N) <-> (N, C)
}


def _rule(rule: str):
    if rule not in _RULES:
        raise ValueError(f"unknown mapping rule {rule!r}")
    return _RULES[rule]


def to_flax(rule: str, a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(_rule(rule)[0](a))


def to_torch(rule: str, a: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_flax` (used to write cBottle-format checkpoints)."""
    return np.ascontiguousarray(_rule(rule)[1](a))


def _conv(prefix: str, path: Path, kernel: int, out: dict) -> None:
    out[prefix + ".weight"] = (path + ("kernel",), "conv3" if kernel == 3 else "conv1")
    out[prefix + ".bias"] = (path + ("bias",), "copy")


def _norm(prefix: str, path: Path, out: dict) -> None:
    out[prefix + ".weight"] = (path + ("scale",), "copy")
    out[prefix + ".bias"] = (path + ("bias",), "copy")


def _linear(prefix: str, path: Path, out: dict) -> None:
    out[prefix + ".weight"] = (path + ("kernel",), "linear")
    out[prefix + ".bias"] = (path + ("bias",), "copy")


def _block(prefix: str, path: Path, spec, out: dict, buffers: set):
    _norm(prefix + ".norm0", path + ("norm0",), out)
    _conv(prefix + ".conv0", path + ("conv0",), 3, out)
    _linear(prefix + ".affine", path + ("affine",), out)
    _norm(prefix + ".norm1", path + ("norm1",), out)
    _conv(prefix + ".conv1", path + ("conv1",), 3, out)
    if spec.cin != spec.cout or spec.resample is not None:
        _conv(prefix + ".skip", path + ("skip",), 1, out)
    if spec.resample is not None:
        buffers.add(prefix + ".conv0.resample_filter")
        buffers.add(prefix + ".skip.resample_filter")
    if spec.attention:
        a = prefix + ".attn.attention"
        _norm(a + ".norm2", path + ("attn", "norm2"), out)
        _conv(a + ".qkv", path + ("attn", "qkv"), 1, out)
        _conv(a + ".proj", path + ("attn", "proj"), 1, out)
    if spec.temporal:
        t = prefix + ".temporal_attention"
        _norm(t + ".norm2", path + ("tattn", "norm2"), out)
        _conv(t + ".qkv", path + ("tattn", "qkv"), 1, out)  # a plain torch Conv2d 1x1: same layout
        _conv(t + ".proj", path + ("tattn", "proj"), 1, out)
        out[t + ".positional_embedding"] = (path + ("tattn", "positional_embedding"), "copy")  # (heads, 2T)


def key_map(config: ModelConfig) -> tuple[dict[str, tuple[Path, str]], set[str]]:
    """(parameters: torch key -> (flax path, rule), buffers: torch keys with no learned values)."""
    config.check_supported()
    out: dict[str, tuple[Path, str]] = {}
    buffers = {"device_buffer"}
    out["model.pos_embed"] = (("pos_embed",), "pos")
    if config.label_dim:
        _linear("model.map_label", ("map_label",), out)
    _linear("model.map_layer0", ("map_layer0",), out)
    _linear("model.map_layer1", ("map_layer1",), out)
    for spec in encoder_layout(config):
        if spec.name.endswith("_conv_embed"):
            _conv(f"model.enc.{spec.name}", ("enc", spec.name), 3, out)
        else:
            _block(f"model.enc.{spec.name}", ("enc", spec.name), spec, out, buffers)
    for spec in decoder_layout(config):
        _block(f"model.dec.{spec.name}", ("dec", spec.name), spec, out, buffers)
    _norm("model.dec.64x64_aux_norm", ("aux_norm",), out)
    _conv("model.dec.64x64_aux_conv", ("aux_conv",), 3, out)
    if config.enable_classifier:
        _conv("model.low_res_classifier.0", ("classifier_conv0",), 3, out)
        _norm("model.low_res_classifier.2", ("classifier_norm",), out)
        _conv("model.low_res_classifier.4", ("classifier_conv1",), 1, out)
    return out, buffers


def channels_per_head_from_state(state: dict) -> int | None:
    """The video model's channels per attention head, read from a state dict.

    cBottle does not record it in model.json (``SongUNetHPX64Video`` hard-codes 64);
    every temporal attention stores ``positional_embedding`` (heads, 2T) beside its
    ``norm2.weight`` (C,). Returns None when the state has no temporal attention;
    raises ValueError when blocks disagree.
    """
    found = {}
    suffix = ".temporal_attention.positional_embedding"
    for key, value in state.items():
        if key.endswith(suffix):
            heads = int(value.shape[0])
            norm = state.get(key[: -len("positional_embedding")] + "norm2.weight")
            channels = None if norm is None else int(norm.shape[0])
            ok = channels is not None and heads > 0 and channels % heads == 0
            found[key] = channels // heads if ok else None
    if not found:
        return None
    values = set(found.values())
    if None in values or len(values) != 1:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(found.items())[:4])
        raise ValueError(f"the temporal attention blocks do not share one channels-per-head ({detail})")
    return values.pop()
