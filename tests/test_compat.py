"""The flat module paths of jaxguide 0.1 keep working for one release (jaxguide.compat).

``tests/data/public_api_0_1.json`` lists the public names of every 0.1 module, captured
from the last flat release before the move into subpackages. Each old path must import
with a DeprecationWarning that names the new module(s) and expose every one of them.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import jaxguide

API = json.loads((Path(__file__).parent / "data" / "public_api_0_1.json").read_text())
# old module paths that are now packages of the same name: no warning, the package re-exports
PACKAGES = {"jaxguide.io", "jaxguide.model", "jaxguide.observations", "jaxguide.campaign", "jaxguide.demo", "jaxguide.cli"}


@pytest.mark.parametrize("old", sorted(API))
def test_old_path_exposes_every_public_name(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    missing = [n for n in API[old] if not hasattr(module, n)]
    assert not missing, f"{old} lost {missing}"
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning) and old in str(w.message)]
    if old in PACKAGES:
        assert not deprecations
    else:
        assert deprecations and "jaxguide." in str(deprecations[0].message).split("import from")[1]


def test_old_and_new_paths_are_the_same_objects():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jaxguide.pipeline import assimilate as old_assimilate
        from jaxguide.healpix import pad as old_pad
    from jaxguide.assimilation.pipeline import assimilate
    from jaxguide.grid.healpix import pad

    assert old_assimilate is assimilate and old_pad is pad


def test_top_level_entry_points():
    from jaxguide.diffusion import guidance
    from jaxguide.model.checkpoint import load_model

    assert jaxguide.load_model is load_model and jaxguide.guidance is guidance
    assert callable(jaxguide.assimilate) and jaxguide.guidance.MMPS
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        jaxguide.nonexistent  # noqa: B018


def test_import_jaxguide_is_light():
    """``import jaxguide`` (and the CLI's --help) must not import JAX."""
    code = "import sys, jaxguide; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
