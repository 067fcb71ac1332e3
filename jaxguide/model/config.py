"""Model configuration and channel metadata, as a cBottle checkpoint records them.

``ModelConfig`` mirrors cBottle's ``model.json`` (``ModelConfigV1``); ``BatchInfo`` mirrors
``batch_info.json`` (channel names and the per-channel normalisation
``value_normalised = (value - center) / scale``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

SUPPORTED_ARCHITECTURES = ("unet_hpx64",)
KNOWN_ARCHITECTURES = ("unet_hpx64", "unet_hpx1024_patch")


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture is not ported to JAX."""


class FrozenMapping(Mapping):
    """A read-only, hashable JSON object (nested dicts/lists frozen), so that a frozen config
    holding one can key caches (``graphdef_and_shapes``) and be compared."""

    __slots__ = ("_items",)

    def __init__(self, data: Mapping[str, Any]):
        self._items = tuple(sorted((str(k), _freeze(v)) for k, v in dict(data).items()))

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self):
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and _thaw(self) == _thaw(other)

    def __repr__(self) -> str:
        return f"FrozenMapping({_thaw(self)!r})"


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenMapping(value)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Back to JSON types (dict, list)."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """cBottle model configuration (the fields of ``model.json``; defaults as cBottle's)."""

    architecture: str = "unet_hpx64"
    model_channels: int = 128
    label_dim: int = 0
    out_channels: int = 1
    condition_channels: int = 0
    time_length: int = 1
    label_dropout: float = 0.0
    level: int = 10
    calendar_include_legacy_bug: bool = True
    noise_dependent_dropout_config: FrozenMapping | None = None  # a dict in model.json; frozen to stay hashable
    enable_classifier: bool = False
    position_embed_channels: int = 20
    img_resolution: int = 128
    # Not in cBottle's model.json: SongUNetHPX64Video hard-codes 64 channels per attention
    # head (image model: one head). The converter reads it from the state dict
    # (``positional_embedding`` has one row per head), so checkpoints built otherwise load.
    channels_per_head: int = 64

    def __post_init__(self):
        if self.noise_dependent_dropout_config is not None:
            object.__setattr__(self, "noise_dependent_dropout_config", FrozenMapping(self.noise_dependent_dropout_config))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a ``model.json`` dict; unknown keys are ignored as cBottle does."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The ``model.json`` dict (JSON types only)."""
        return {f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def check_supported(self) -> None:
        """Raise :class:`UnsupportedArchitectureError` for configs we do not port."""
        self.check_architecture()
        self._check_frames_and_heads()

    def check_architecture(self) -> None:
        """The architecture name alone (before any weights are read)."""
        if self.architecture not in KNOWN_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unknown architecture {self.architecture!r}; cBottle knows {KNOWN_ARCHITECTURES}, "
                f"jaxguide ports {SUPPORTED_ARCHITECTURES}"
            )
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"architecture {self.architecture!r} (the HPX1024 patch super-resolution model) is not "
                f"ported to JAX; jaxguide ports {SUPPORTED_ARCHITECTURES}"
            )

    def _check_frames_and_heads(self) -> None:
        if self.time_length < 1:
            raise UnsupportedArchitectureError(f"time_length must be >= 1, got {self.time_length}")
        if self.time_length > 1:
            for cout in sorted({self.model_channels * m for m in CHANNEL_MULT}):
                if self.channels_per_head < 1 or cout // self.channels_per_head < 1 or cout % self.channels_per_head:
                    raise UnsupportedArchitectureError(
                        f"the video model (time_length={self.time_length}) splits its {cout}-channel attention "
                        f"blocks into heads of channels_per_head={self.channels_per_head} channels: "
                        f"{cout // max(self.channels_per_head, 1)} heads is not a valid split "
                        "(cBottle's own model cannot run with 0 heads either)"
                    )

    @property
    def is_video(self) -> bool:
        """cBottle builds ``SongUNetHPX64Video`` (temporal attention, multi-head) for time_length > 1."""
        return self.time_length > 1

    def attention_heads(self, channels: int) -> int:
        """Heads of an attention block with ``channels`` outputs: 1 for the image model
        (cBottle's ``channels_per_head=-1``), ``channels // channels_per_head`` for video."""
        return channels // self.channels_per_head if self.is_video else 1


# The fixed architecture choices of cBottle's SongUNetHPX64 (not in model.json).
HPX64_LEVEL = 6  # HEALPix level of the network grid: nside 64, 49152 pixels
NSIDE = 2**HPX64_LEVEL
NPIX = 12 * NSIDE * NSIDE
CHANNEL_MULT = (1, 2, 2, 2)
NUM_BLOCKS = 4
ATTN_RESOLUTIONS = (8,)
CHANNEL_MULT_EMB = 4
CALENDAR_EMBED_CHANNELS = 8  # -> 4 * 8 = 32 input channels
SIGMA_DATA = 0.5
GN_EPS = 1e-6
MAX_CLASSES = 1024
LABELS = ("icon", "era5")  # cBottle's dataset labels: one-hot index 0 = ICON, 1 = ERA5


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """Channel names and normalisation of a checkpoint (``batch_info.json``)."""

    channels: tuple[str, ...]
    center: tuple[float, ...] | None = None
    scales: tuple[float, ...] | None = None
    time_step: int = 1
    time_unit: str = "HOUR"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BatchInfo":
        channels = tuple(d["channels"])
        center = tuple(float(v) for v in d["center"]) if d.get("center") is not None else None
        scales = tuple(float(v) for v in d["scales"]) if d.get("scales") is not None else None
        for name, vals in (("center", center), ("scales", scales)):
            if vals is not None and len(vals) != len(channels):
                raise ValueError(f"batch_info: {len(vals)} {name} for {len(channels)} channels")
        return cls(
            channels=channels,
            center=center,
            scales=scales,
            time_step=int(d.get("time_step", 1)),
            time_unit=str(d.get("time_unit", "HOUR") or "HOUR"),
        )

    @property
    def time_step_hours(self) -> float:
        """The spacing of a video model's frames in hours (``time_step`` in ``time_unit``)."""
        per = {"HOUR": 1.0, "HOURS": 1.0, "H": 1.0, "MINUTE": 1 / 60, "MINUTES": 1 / 60, "DAY": 24.0, "DAYS": 24.0}
        unit = self.time_unit.upper()
        if unit not in per:
            raise ValueError(f"batch_info: unknown time_unit {self.time_unit!r} (expected HOUR, MINUTE or DAY)")
        return self.time_step * per[unit]

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": list(self.channels),
            "center": None if self.center is None else list(self.center),
            "scales": None if self.scales is None else list(self.scales),
            "time_step": self.time_step,
            "time_unit": self.time_unit,
        }
