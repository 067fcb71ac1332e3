"""Fast smoke test of benchmarks/video_step.py (tiny video config; lowering only, no compile:
compiling even the tiny video network takes ~1 min on 2 cores)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import video_step  # noqa: E402


def test_video_step_flops_section_and_problem_at_tiny_size(tmp_path):
    out = tmp_path / "v.json"
    res = video_step.main(["--config", "tiny", "--sections", "flops", "--methods", "unguided",
                           "--flops-config", "tiny", "--n-obs", "20", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["flops_released"]["per_call"] == res["flops_released"]["per_call"]
    fl = res["flops_released"]
    assert fl["config"]["time_length"] == 2 and fl["n_params"] == 674_643
    # the ERA5 label's two passes are one batch of 2: twice the FLOPs (up to the shared embeddings)
    assert 1.95 < fl["forward_batch2"] / fl["per_call"]["unguided"] <= 2.0
    # independent count: perf's analytic image-network FLOPs x T frames, plus the temporal attention
    assert 1.0 < fl["unguided/analytic_image_x_T"] < 1.3
    est = res["gpu_estimate"]["rows"]["H100 SXM, bf16, 50% of peak"]["unguided"]
    f = fl["per_call"]["unguided"]
    assert est["call_s"] == pytest.approx(f / (0.5 * 989.4e12), rel=1e-12)
    assert est["trajectory_s"] == pytest.approx(35 * est["call_s"], rel=1e-12)
    assert "COMPUTED from the FLOPs (not measured)" in video_step.report(res)

    # the timed problem: window conditioning, observations on and between frames, new data
    den, _ = video_step.build(video_step.CONFIGS["tiny"], abstract=True)
    prob = video_step.Problem(den, 30, str(tmp_path))
    c, t, npix = prob.shape
    assert (c, t, npix) == (3, 2, 49152)
    assert prob.cond["condition"].shape == (5, 2, npix)  # [known * mask, SST, mask]
    np.testing.assert_array_equal(prob.cond["condition"][-1, :, 0], [1.0, 0.0])  # frame 0 known
    assert prob.frames_observed == [0.0, 0.5, 1.0]  # on frames and halfway between
    assert jax.eval_shape(prob.obs.A, prob.x(0)).shape == np.shape(prob.obs.y)
    y0, y1 = np.asarray(prob.obs_i(0).y), np.asarray(prob.obs_i(1).y)
    assert not np.array_equal(y0[:30], y1[:30]) and not np.any(y0[30:]) and not np.any(y1[30:])
    assert not np.array_equal(prob.x(0), prob.x(1))
