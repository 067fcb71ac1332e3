"""``benchmarks/device_check.sh``'s CPU path (``DEVICE_CHECK_SIZE=tiny``), so the GPU check
cannot rot: it runs every step and its JSON has every row, with numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from device_check_summary import ROWS, summarize  # noqa: E402


SMOKE_ROWS = ["cli_cold", "cli_warm", "unguided", "mmps1", "video_unguided"]


@pytest.mark.slow  # the three benchmark steps at tiny sizes: minutes on 2 cores
def test_device_check_cpu_path(fixtures_dir, tmp_path):
    """The smoke path: every step of the script (the CLI cold and warm, perf.py, video_step.py,
    the summary) at tiny sizes, the performance table cut to two rows (its full tiny path,
    every row, took 588 s on the shared 2 cores: DEVICE_CHECK_SIZE=tiny)."""
    out = tmp_path / "check"
    env = dict(os.environ, DEVICE_CHECK_SIZE="smoke", DEVICE_CHECK_BUDGET_S="1500", PYTHON=sys.executable)
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), str(out)], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    log = (out / "device_check.log").read_text()
    assert "the CPU path" in log and "missing rows" not in log
    summary = json.loads((out / "device_check.json").read_text())
    assert summary["missing"] == [] and summary["expected"] == SMOKE_ROWS
    assert summary["platform"] == "cpu" and summary["perf_config"] == "tiny" and summary["video_config"] == "tiny"
    rows = summary["rows"]
    for name in SMOKE_ROWS:
        numbers = [v for v in rows[name].values() if isinstance(v, int | float)]
        assert numbers and all(v > 0 for v in numbers), (name, rows[name])
    # the CLI's first progress line names the devices; the warm run loads what the cold one compiled
    assert "on 1 cpu device (cpu)" in rows["cli_cold"]["devices_line"]
    assert rows["cli_warm"]["cpu_s"] < rows["cli_cold"]["cpu_s"]
    assert rows["unguided"]["n_compiles"] == 1 and rows["mmps1"]["n_compiles"] == 1


def test_summary_lists_missing_rows(tmp_path):
    """A step cut short (no JSON) leaves its rows missing, and the table says so."""
    (tmp_path / "first_run.json").write_text(json.dumps(
        {"first_run": {"wall_s": 3.0, "cpu_s": 2.0, "first_line": "x"}}))
    summary = summarize(tmp_path)
    assert summary["rows"]["cli_cold"] == {"wall_s": 3.0, "cpu_s": 2.0, "devices_line": "x"}
    assert summary["missing"] == [r for r in ROWS if r != "cli_cold"]
