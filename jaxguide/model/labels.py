"""cBottle's dataset label: a one-hot of length 1024 (``MAX_CLASSES``), index = position in
cBottle's ``LABELS`` (icon 0, era5 1)."""

from __future__ import annotations

import numpy as np

from jaxguide.model.config import LABELS, MAX_CLASSES  # cBottle: one-hot index 0 = ICON, 1 = ERA5


def label_index(name: str) -> int:
    """cBottle's dataset label index (``"icon"`` 0, ``"era5"`` 1), case-insensitive."""
    key = str(name).lower()
    if key not in LABELS:
        raise ValueError(f"unknown dataset label {name!r}; valid labels: {list(LABELS)}")
    return LABELS.index(key)


def label_one_hot(name: str, label_dim: int = MAX_CLASSES) -> np.ndarray:
    """One-hot class label (label_dim,) float32 for a dataset name."""
    idx = label_index(name)
    if label_dim <= idx:
        raise ValueError(f"label_dim {label_dim} too small for label index {idx}")
    out = np.zeros(label_dim, dtype=np.float32)
    out[idx] = 1.0
    return out
