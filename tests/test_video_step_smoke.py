"""Fast smoke test of benchmarks/video_step.py (tiny video config; lowering only, no compile:
compiling even the tiny video network takes ~1 min on 2 cores)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxguide.diffusion import sampler
from jaxguide.model.checkpoint import count_params

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
    # independent of video_step's formula: the trajectory is as many calls as jaxguide's Heun
    # sampler really makes over TRAJECTORY_STEPS steps (counted at run time), a Heun step two
    calls = []

    def counting_denoiser(x, sigma):
        jax.debug.callback(lambda: calls.append(1))
        return 0.5 * x

    jax.block_until_ready(sampler.sample(counting_denoiser, jax.random.PRNGKey(0), (1,), num_steps=video_step.TRAJECTORY_STEPS,
                                         sigma_min=0.02, sigma_max=200.0))
    assert res["gpu_estimate"]["trajectory_calls"] == len(calls) == 35
    assert est["trajectory_s"] / est["call_s"] == pytest.approx(len(calls), rel=1e-12)
    assert est["heun_step_s"] / est["call_s"] == pytest.approx(2, rel=1e-12)
    # ... and the FLOP counter counts 2 per multiply-add (the convention of the peak rates), on
    # small programs counted by hand: a batched matmul and a 3x3 "valid" convolution
    a, b = jax.ShapeDtypeStruct((3, 40, 50), jnp.float32), jax.ShapeDtypeStruct((50, 7), jnp.float32)
    assert video_step.lowered_flops(lambda a, b: a @ b, a, b) == 2 * 3 * 40 * 50 * 7
    x, w = jax.ShapeDtypeStruct((2, 10, 12, 4), jnp.float32), jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    assert video_step.lowered_flops(conv, x, w) == 2 * (2 * 8 * 10 * 6) * (3 * 3 * 4)
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


def _trainable(path: Path) -> tuple[int, dict[str, tuple[int, ...]]]:
    """(trainable parameter count, {key: shape}) of a PyTorch state-dict table in the
    fixtures (buffers left out: device_buffer, resample_filter); checked against the
    count in the file's header."""
    text = path.read_text()
    shapes = {}
    for key, shape in re.findall(r"^\| (\S+) \| \(([\d, ]*)\) \|", text, re.M):
        if not key.endswith(("device_buffer", "resample_filter")):
            shapes[key] = tuple(int(v) for v in shape.replace(" ", "").split(",") if v)
    total = sum(int(np.prod(s)) for s in shapes.values())
    header = int(re.search(r"trainable parameters: (\d+)", text, re.I).group(1))
    assert total == header, (path, total, header)
    return total, shapes


def test_video_param_counts_match_pytorch_state_dicts(fixtures_dir):
    """video_step's configurations have the parameter counts of cBottle's own video models
    (PyTorch state dicts in the fixtures), independently of jaxguide: the released video
    configuration 281,537,869; the tiny one (T = 2) the fixture's T = 4 model minus half of
    every temporal attention's relative-position table (heads, 2T)."""
    released, _ = _trainable(fixtures_dir / "video" / "released_video_state_dict.txt")
    assert count_params(video_step.CONFIGS["released"]) == released == 281_537_869
    tiny4, shapes = _trainable(fixtures_dir / "video" / "video_state_dict.txt")
    tiny = video_step.CONFIGS["tiny"]
    with zipfile.ZipFile(fixtures_dir / "video" / "video.checkpoint") as z:  # the fixture model: the tiny config but T
        fixture_cfg = json.loads(z.read("model.json"))
    assert {k: v for k, v in dataclasses.asdict(dataclasses.replace(tiny, time_length=4)).items() if k in fixture_cfg} == fixture_cfg
    assert tiny.channels_per_head == 4  # the fixture's heads (fixtures README 8.1)
    pos = [s for k, s in shapes.items() if k.endswith("temporal_attention.positional_embedding")]
    assert len(pos) == 24 and all(s[1] == 2 * 4 for s in pos)
    want = tiny4 - sum(h * 2 * (4 - tiny.time_length) for h, _ in pos)
    assert count_params(tiny) == want == 674_643
