"""Run each script in ``examples/`` on small settings and check the numbers it returns.

Every example has ``main(argv) -> dict``. A case is: the example's file name, a
function building its argv (it can ask for pytest fixtures by name, e.g. the converted
tiny model), and a check of the returned dict. Adding an example = adding one
:class:`Case` to :data:`CASES`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

Fixture = Callable[[str], Any]  # request.getfixturevalue


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (examples/ is not a package)."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------
# checks


def check_convert_and_assimilate(out: dict[str, Any]) -> None:
    # Mechanics only: with the fixture's random weights and 3 Heun steps the MMPS
    # analysis is not closer to the observations than the prior (measured: prior 18-38 K,
    # analysis 157-268 K obs RMSE; see examples/README.md, example (b)).
    assert Path(out["analysis"]).is_file()
    assert out["n_assimilated"] + out["n_held_out"] == 3 * 16 and out["n_held_out"] > 0
    assert out["assimilation"]["n_obs"] == out["n_assimilated"]
    for set_name, n in (("assimilated", out["n_assimilated"]), ("held_out", out["n_held_out"])):
        per_var = out["metrics"][set_name]
        assert set(per_var) == {"T850", "T500", "T300"}
        assert sum(s["n_obs"] for s in per_var.values()) == n
        for s in per_var.values():
            assert s["n_members"] == 2
            assert all(math.isfinite(s[k]) for k in ("rmse", "crps", "spread")), s


def check_jit_ensemble(out: dict[str, Any]) -> None:
    first, second = out["first"], out["second"]
    for res in (first, second):
        assert res["finite"]
        assert res["shape"] == (2, 6, 1, 49152)
        assert res["n_assimilated"] == 3 * 24  # 32 stations, a quarter held out, 3 levels
        # Observation error 0.1 K, prior-truth difference at the stations ~1.3 K: guidance
        # that works must pull the analysis mean well toward the observations (measured:
        # 1.30 -> 0.25 K and 1.27 -> 0.46 K). Held-out stations are not checked: the
        # fixture network has random weights, so it carries no spatial covariance.
        assert res["analysis_rmse_k"] < 0.6 * res["prior_rmse_k"], res
    # the first analysis compiles the guided ensemble program, the second (new
    # observations: other stations, other noise) reuses it
    assert first["n_compiles"] >= 1
    assert second["n_compiles"] == 0, second
    assert second["wall_s"] < first["wall_s"]


def check_learn_sigma_y(out: dict[str, Any]) -> None:
    losses = out["losses"]
    assert all(math.isfinite(v) for v in losses + [out["final_loss"]])
    assert out["final_loss"] < 0.9 * losses[0]
    for split in ("val", "test"):  # fresh key; "test" never entered the loss
        assert out["crps_after"][split] < out["crps_before"][split], (split, out["crps_before"], out["crps_after"])
        # and close to the exact Kalman posterior's CRPS (measured within 0.007)
        assert out["crps_after"][split] < 1.1 * out["crps_oracle"][split]
    true = out["true_sigma"]
    start, learned = out["sigma_y"][0], out["sigma_y"][-1]
    # moved toward the truth: at least halfway in log space (measured 5x off -> 0.75-0.83x)
    assert abs(math.log(learned / true)) < 0.5 * abs(math.log(start / true)), (start, learned, true)
    # MMPS is exact for a Gaussian prior, so the learned guidance scale should be ~1
    assert 0.7 < out["scale"][-1] < 1.4, out["scale"]


# --------------------------------------------------------------------------------------
# cases


@dataclasses.dataclass(frozen=True)
class Case:
    example: str  # file name in examples/, without .py
    argv: Callable[[Fixture], list[str]]
    check: Callable[[dict[str, Any]], None]


CASES: dict[str, Case] = {
    "convert_and_assimilate": Case(
        "convert_and_assimilate",
        lambda fx: ["--workdir", str(fx("tmp_path") / "work"),
                    "--checkpoint", str(fx("fixtures_dir") / "tiny.checkpoint"), "--stations", "16", "--members", "2", "--steps", "3", "--cg-iters", "1", "--seed", "0"],
        check_convert_and_assimilate,
    ),
    "jit_ensemble": Case(
        "jit_ensemble",
        lambda fx: ["--model", str(fx("tiny_model_dir")), "--members", "2", "--steps", "3",
                    "--solver", "euler", "--method", "mmps", "--cg-iters", "1", "--n-obs", "32",
                    "--obs-sigma", "0.1", "--seed", "0"],
        check_jit_ensemble,
    ),
    # sigma_y starts 5x too small and 5x too large
    "learn_sigma_y_small": Case(
        "learn_sigma_y", lambda fx: ["--steps", "40", "--init-factor", "0.2"], check_learn_sigma_y),
    "learn_sigma_y_large": Case(
        "learn_sigma_y", lambda fx: ["--steps", "40", "--init-factor", "5"], check_learn_sigma_y),
}


# the two cBottle-fixture examples take 1.5-2 min each on 2 cores: slow set (CI runs it)
SLOW_CASES = {"convert_and_assimilate", "jit_ensemble"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_example(case: str, request) -> None:
    c = CASES[case]
    argv = c.argv(request.getfixturevalue)
    t0 = time.perf_counter()
    out = load_example(c.example).main(argv)
    print(f"{case}: {time.perf_counter() - t0:.1f}s")
    c.check(out)


def test_checks_can_fail() -> None:
    """The checks reject results that miss their claims (guards against vacuous tests)."""
    good_b = {"finite": True, "shape": (2, 6, 1, 49152), "n_assimilated": 72, "n_compiles": 1,
              "wall_s": 2.0, "prior_rmse_k": 1.3, "analysis_rmse_k": 0.3}
    check_jit_ensemble({"first": good_b, "second": {**good_b, "n_compiles": 0, "wall_s": 1.0}})
    with pytest.raises(AssertionError):  # recompiled on new observations
        check_jit_ensemble({"first": good_b, "second": {**good_b, "n_compiles": 1, "wall_s": 1.0}})
    with pytest.raises(AssertionError):  # analysis no closer to the observations
        check_jit_ensemble({"first": good_b, "second": {**good_b, "n_compiles": 0, "wall_s": 1.0,
                                                        "analysis_rmse_k": 1.3}})
    good_c = {"losses": [0.30, 0.25], "final_loss": 0.23, "true_sigma": 0.3, "sigma_y": [0.06, 0.25],
              "scale": [1.0, 1.05], "crps_before": {"val": 0.3, "test": 0.34},
              "crps_after": {"val": 0.23, "test": 0.25}, "crps_oracle": {"val": 0.233, "test": 0.246}}
    check_learn_sigma_y(good_c)
    with pytest.raises(AssertionError):  # sigma_y moved away from the truth
        check_learn_sigma_y({**good_c, "sigma_y": [0.06, 0.004]})
    with pytest.raises(AssertionError):  # test CRPS did not improve
        check_learn_sigma_y({**good_c, "crps_after": {"val": 0.23, "test": 0.35}})
