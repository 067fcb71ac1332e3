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


def require_fixtures() -> Path:
    if FIXTURES.is_dir() and (FIXTURES / "README.md").exists():
        return FIXTURES
    msg = f"cBottle fixtures not found at {FIXTURES}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg + " (CI=true: fixtures are required)")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return require_fixtures()
