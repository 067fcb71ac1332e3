"""Shared test helpers: locating ../shared/fixtures, the matmul precision of parity tests,
and the test run's compiler options and compilation cache.

Tests that need the cBottle fixtures use the ``fixtures_dir`` fixture. When the
fixtures are absent they skip locally but FAIL under CI (CI=true), so a broken path
can never pass silently.

Parity tests (float32 results against an independent reference at round-off
tolerances: PyTorch fixtures, closed forms, finite differences) run under
``jax.default_matmul_precision("highest")``: on GPUs the default may use TF32 for
float32 matmuls and convolutions. They are the modules in ``PARITY_MODULES`` and any
test marked ``@pytest.mark.parity``. Every other test runs at JAX's default precision,
the one users get (``tests/test_precision.py`` checks the network there and in bf16).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

# jaxguide's CPU compiler options (jaxguide.model.xla_options) for every program of the tests, the
# ones tests jit themselves included (XLA_FLAGS is read when the CPU backend starts)
_YNN = "--xla_cpu_experimental_ynn_fusion_type="
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _YNN).strip()


def _test_compile_cache() -> Path:
    """One persistent compilation cache per test run: ``$JAXGUIDE_TEST_CACHE_DIR`` (``.ci/run``
    gives the default and the slow set the same one), else a fresh temporary directory.

    Tests build the same programs again and again (every CLI invocation makes a new
    ``Session``); with the cache the second build loads the executable instead of compiling
    it. The CLI's own cache (``JAXGUIDE_CACHE_DIR``) is pointed at it, so CLI runs in tests
    use the cache as users' runs do. Loading still counts as a compilation for
    ``ensemble.count_compiles`` (JAX reports the backend compile event for cache hits too),
    so compile-count tests are unaffected.
    """
    import atexit
    import shutil
    import tempfile

    path = os.environ.get("JAXGUIDE_TEST_CACHE_DIR")
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)
    tmp = tempfile.mkdtemp(prefix="jaxguide-test-xla-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return Path(tmp)


# the CLI (in-process and in subprocesses) uses the same cache, never ~/.cache
_CACHE = _test_compile_cache()
os.environ["JAXGUIDE_CACHE_DIR"] = str(_CACHE)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

PARITY_MODULES = frozenset(
    {"test_network", "test_video", "test_replay", "test_sampler", "test_guidance", "test_gaussian_posterior", "test_cg_gradient"}
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("JAXGUIDE_FIXTURES", REPO.parent / "shared" / "fixtures"))


def pytest_configure(config):
    config.addinivalue_line("markers", "parity: run under jax.default_matmul_precision('highest')")
    config.addinivalue_line(
        "markers", "slow: end-to-end checks of > 20 s on 2 cores; deselected by default (addopts), "
        "run with `pytest -m slow` (CI runs both sets)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if getattr(item, "module", None) is not None and item.module.__name__ in PARITY_MODULES:
            item.add_marker(pytest.mark.parity)


@pytest.fixture(autouse=True, scope="module")
def _parity_precision_module(request):
    """"highest" for a whole parity module, its module-scoped fixtures included."""
    if request.module.__name__ in PARITY_MODULES:
        with jax.default_matmul_precision("highest"):
            yield
    else:
        yield


@pytest.fixture(autouse=True)
def _parity_precision(request):
    """"highest" for a test marked ``parity`` (and inside parity modules)."""
    if request.node.get_closest_marker("parity") is not None:
        with jax.default_matmul_precision("highest"):
            yield
    else:
        yield


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


def record_fsync_and_replace(monkeypatch) -> list[tuple]:
    """Record ``os.fsync`` as ("fsync", synced path) and ``os.replace`` as ("replace", src,
    dst) (real paths), in call order: durability tests check that data reach the disk
    before a rename or a flag. Names synced files through /proc/self/fd (Linux)."""
    if not Path("/proc/self/fd").is_dir():
        skip_or_fail("needs /proc/self/fd to name synced files")
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return require_fixtures()


@pytest.fixture(scope="session")
def tiny_model_dir(fixtures_dir, tmp_path_factory) -> Path:
    """The fixture's tiny.checkpoint converted once per session (needs torch)."""
    from jaxguide.model.convert import convert_checkpoints

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
    """The CLI's answer to bad input: exit status 2, one ``error: ...`` line, the last on
    stderr (after the progress messages of the stages that ran), no traceback."""
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert "Traceback" not in res.output
    return errors[0]
