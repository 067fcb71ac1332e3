"""The flat module paths of jaxguide 0.1 (``jaxguide.healpix``, ``jaxguide.pipeline``, ...), kept
for one release: importing one warns with a ``DeprecationWarning`` naming the new module and
gives that module (or, for a module split in several, one with all their public names).

``install()`` (called by ``import jaxguide``) adds one finder to ``sys.meta_path`` that
answers only for the names in ``OLD_PATHS``; nothing else is imported until an old path is.
Old paths that are also new packages (``jaxguide.io``, ``jaxguide.model``,
``jaxguide.observations``, ``jaxguide.campaign``, ``jaxguide.demo``, ``jaxguide.cli``) need
no entry: each package re-exports the public names of the module it replaces.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old dotted path -> the new modules that hold its public names
OLD_PATHS: dict[str, tuple[str, ...]] = {
    "jaxguide.healpix": ("jaxguide.grid.healpix",),
    "jaxguide.grid_sampling": ("jaxguide.grid.latlon",),
    "jaxguide.config": ("jaxguide.model.config",),
    "jaxguide.units": ("jaxguide.model.units",),
    "jaxguide.network": ("jaxguide.model.config", "jaxguide.model.layers", "jaxguide.model.embedding",
                         "jaxguide.model.unet", "jaxguide.model.precond", "jaxguide.model.inputs"),
    "jaxguide.conditioning": ("jaxguide.model.conditioning", "jaxguide.model.calendar", "jaxguide.model.labels",
                              "jaxguide.model.sst"),
    "jaxguide.sst": ("jaxguide.model.sst",),
    "jaxguide.window": ("jaxguide.model.window",),
    "jaxguide.denoiser": ("jaxguide.model.denoiser",),
    "jaxguide.gaussian": ("jaxguide.model.gaussian",),
    "jaxguide.xla_options": ("jaxguide.model.xla_options",),
    "jaxguide.convert": ("jaxguide.model.convert",),
    "jaxguide.convert.checkpoint": ("jaxguide.model.convert.checkpoint",),
    "jaxguide.convert.mapping": ("jaxguide.model.convert.mapping",),
    "jaxguide.sampler": ("jaxguide.diffusion.sampler",),
    "jaxguide.ensemble": ("jaxguide.diffusion.ensemble",),
    "jaxguide.guidance": ("jaxguide.diffusion.guidance",),
    "jaxguide.guided": ("jaxguide.diffusion.guided",),
    "jaxguide.observation_sources": ("jaxguide.observations.sources",),
    "jaxguide.era5": ("jaxguide.observations.era5",),
    "jaxguide.strategies": ("jaxguide.observations.strategies",),
    "jaxguide.pipeline": ("jaxguide.assimilation.pipeline", "jaxguide.assimilation.settings",
                          "jaxguide.assimilation.session", "jaxguide.assimilation.analysis",
                          "jaxguide.assimilation.windows", "jaxguide.assimilation.provenance"),
    "jaxguide.schema": ("jaxguide.assimilation.dataset", "jaxguide.model.channels"),
    "jaxguide.known_frames": ("jaxguide.assimilation.known_frames",),
    "jaxguide.campaign_store": ("jaxguide.campaign.store",),
    "jaxguide.campaign_times": ("jaxguide.campaign.times",),
    "jaxguide.distributed": ("jaxguide.campaign.distributed",),
    "jaxguide.metrics": ("jaxguide.verification.metrics",),
    "jaxguide.evaluation": ("jaxguide.verification.evaluation", "jaxguide.verification.truth"),
    "jaxguide.plots": ("jaxguide.verification.plots",),
    "jaxguide.demo_window": ("jaxguide.demo.window_experiment",),
    "jaxguide.cli_campaign": ("jaxguide.cli.commands.campaign",),
}
PACKAGES = frozenset({"jaxguide.convert"})  # old paths that had submodules


class _OldPathLoader(importlib.abc.Loader):
    """An old path with one new module is that module (same object); one split over several
    new modules is a module holding their public names."""

    def __init__(self, old: str):
        self.old = old

    def create_module(self, spec):
        new = OLD_PATHS[self.old]
        return importlib.import_module(new[0]) if len(new) == 1 else None

    def exec_module(self, module: types.ModuleType) -> None:
        new = OLD_PATHS[self.old]
        warnings.warn(f"{self.old} is deprecated and will be removed in jaxguide 0.3; "
                      f"import from {' / '.join(new)}", DeprecationWarning, stacklevel=2)
        if module.__name__ != self.old:
            return  # the new module itself
        for name in new:
            target = importlib.import_module(name)
            public = getattr(target, "__all__", None) or [n for n in vars(target) if not n.startswith("_")]
            for n in public:
                if not isinstance(getattr(target, n), types.ModuleType) or n not in vars(module):
                    setattr(module, n, getattr(target, n))
        module.__doc__ = f"Deprecated alias of {' / '.join(new)} (jaxguide 0.1's module path)."


class _OldPathFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in OLD_PATHS:
            return None
        return importlib.machinery.ModuleSpec(fullname, _OldPathLoader(fullname), is_package=fullname in PACKAGES)


def install() -> None:
    """Answer imports of the old paths (idempotent)."""
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _OldPathFinder())  # before the path finder: an old package path is the new package, whose directory holds the submodules
