"""Shared test helpers: locating ../shared/fixtures.

Tests that need the cBottle fixtures use the ``fixtures_dir`` fixture. When the
fixtures are absent they skip locally but FAIL under CI (CI=true), so a broken path
can never pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("JAXGUIDE_FIXTURES", REPO.parent / "shared" / "fixtures"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(msg: str) -> None:
    """Skip locally; under CI (CI=true) fail instead, so a missing piece never passes silently."""
    if in_ci():
        pytest.fail(msg + " (CI=true: required)")
    pytest.skip(msg)


def require_fixtures() -> Path:
    if FIXTURES.is_dir() and (FIXTURES / "README.md").exists():
        return FIXTURES
    skip_or_fail(f"cBottle fixtures not found at {FIXTURES}")


def require_module(name: str):
    """Import an optional test dependency (healpy, zarr, ...): skip locally, fail under CI."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        skip_or_fail(f"{name} not installed")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return require_fixtures()


@pytest.fixture(scope="session")
def tiny_model_dir(fixtures_dir, tmp_path_factory) -> Path:
    """The fixture's tiny.checkpoint converted once per session (needs torch)."""
    from jaxguide.convert import convert_checkpoints

    out = tmp_path_factory.mktemp("models") / "tiny"
    return convert_checkpoints([fixtures_dir / "tiny.checkpoint"], out)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import jaxguide

    return jaxguide.load_model(tiny_model_dir)


def rel_errors(got, ref):
    """(max |got - ref| / RMS(ref), RMS(got - ref) / RMS(ref))."""
    import numpy as np

    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    rms = np.sqrt(np.mean(ref**2))
    return float(np.max(np.abs(got - ref)) / rms), float(np.sqrt(np.mean((got - ref) ** 2)) / rms)


def one_line_error(res) -> str:
    """The CLI's answer to bad input: exit status 2, one ``error: ...`` line, no traceback."""
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]
