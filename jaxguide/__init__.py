"""jaxguide: score-based data assimilation with cBottle in JAX.

Subpackages by layer, each importing only from the layers before it:

    io -> grid -> model -> diffusion -> observations -> assimilation -> campaign
       -> verification -> demo -> earth2studio -> cli

``io`` (atomic files, ISO times) is at the bottom because every layer writes files or reads
times; ``tests/test_layers.py`` checks the order. ``import jaxguide`` is light (no JAX): the
entry points below are imported when first used.
"""

from __future__ import annotations

import importlib

from jaxguide import compat

__version__ = "0.1.0"

# name -> module that defines it; `jaxguide.<name>` imports it on first use
_ENTRY_POINTS = {
    "load_model": "jaxguide.model.checkpoint",
    "assimilate": "jaxguide.assimilation.pipeline",
    "AssimilationSettings": "jaxguide.assimilation.settings",
    "Session": "jaxguide.assimilation.session",
    "guidance": "jaxguide.diffusion.guidance",
}

compat.install()


def __getattr__(name: str):
    module = _ENTRY_POINTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxguide' has no attribute {name!r}")
    target = importlib.import_module(module)
    return target if module.rsplit(".", 1)[-1] == name else getattr(target, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_ENTRY_POINTS])
