"""The Flax port of cBottle's network against the real PyTorch outputs (fixtures).

Tolerances (fixtures README): two correct float32 evaluations of cBottle differ by up
to 1.6e-5 x RMS (max-abs), so D must agree to max-abs <= 1e-4 x RMS and RMS error
<= 1e-5 x RMS. Intermediate activations carry the same round-off, which grows to
~1e-4 x RMS at the 8x8 bottleneck; they are checked at max-abs <= 5e-4 x RMS and
RMS error <= 2e-5 x RMS.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_errors
from jaxguide.grid import healpix
from jaxguide.model.config import ModelConfig, UnsupportedArchitectureError
from jaxguide.model.checkpoint import count_params, graphdef_and_shapes
from jaxguide.model.embedding import calendar_embedding, lon_shift_seconds, noise_embedding
from jaxguide.model.inputs import Conditioning
from jaxguide.model.layers import GroupNorm
from jaxguide.model.precond import precond_forward


@pytest.fixture(scope="module")
def den(fixtures_dir):
    return np.load(fixtures_dir / "tiny_denoiser.npz")


def _conditioning(d):
    return dict(
        class_labels=d["class_labels"],
        condition=d["condition"],
        second_of_day=d["second_of_day"],
        day_of_year=d["day_of_year"],
    )


@pytest.fixture(scope="module")
def forward_with_activations(tiny_model, den):
    graphdef, _ = graphdef_and_shapes(tiny_model.config)

    def run(params, x, sigma, cond):
        model = nnx.merge(graphdef, nnx.State(params))
        return precond_forward(model, x, sigma, Conditioning(**cond), return_intermediates=True)

    return jax.jit(run)(tiny_model.params[0], den["x"], den["sigma"], _conditioning(den))


def test_denoiser_matches_pytorch(forward_with_activations, den):
    D, acts = forward_with_activations
    for b in range(3):
        maxabs, rms = rel_errors(D[b], den["D"][b])
        assert maxabs <= 1e-4 and rms <= 1e-5, (b, maxabs, rms)
    for k in ("c_skip", "c_out", "c_in", "c_noise"):
        np.testing.assert_allclose(np.asarray(acts[k]), den[k], rtol=2e-7, atol=0)


ACTIVATIONS = {
    "model.embed_calendar": "embed_calendar",
    "model.enc.64x64_conv_embed": "enc.64x64_conv_embed",
    "model.enc.64x64_block0": "enc.64x64_block0",
    "model.enc.32x32_down": "enc.32x32_down",
    "model.enc.8x8_block0": "enc.8x8_block0",
    "model.enc.8x8_block3": "enc.8x8_block3",
    "model.dec.8x8_in0": "dec.8x8_in0",
    "model.dec.16x16_up": "dec.16x16_up",
    "model.dec.64x64_block4": "dec.64x64_block4",
    "model.dec.64x64_aux_norm": "dec.aux_norm",
    "model.dec.64x64_aux_conv": "dec.aux_conv",
}


@pytest.mark.parametrize("torch_name", sorted(ACTIVATIONS))
def test_activations_match_pytorch(forward_with_activations, den, torch_name):
    _, acts = forward_with_activations
    ref = den["act__" + torch_name]
    stride = int(den["act_stride__" + torch_name])
    mine = np.transpose(np.asarray(acts[ACTIVATIONS[torch_name]]), (0, 3, 1, 2))[..., ::stride]  # (B, T, X, C) -> (B, C, T, X)
    maxabs, rms = rel_errors(mine, ref)
    assert maxabs <= 5e-4 and rms <= 2e-5, (maxabs, rms)


def test_embedding_layers_match(tiny_model, den):
    graphdef, _ = graphdef_and_shapes(tiny_model.config)
    model = nnx.merge(graphdef, nnx.State(tiny_model.params[0]))
    noise = np.asarray(noise_embedding(jnp.asarray(den["c_noise"]), 8))
    # the fixture stores map_noise before the sin/cos swap
    ref = den["act__model.map_noise"]
    np.testing.assert_allclose(noise, np.concatenate([ref[:, 4:], ref[:, :4]], axis=1), rtol=0, atol=1e-6)
    lab = np.asarray(model.map_label(jnp.asarray(den["class_labels"]) * 32.0))
    np.testing.assert_allclose(lab, den["act__model.map_label"], rtol=0, atol=1e-5)


def _calendar_variants(legacy):
    """The embedding as eager, jitted and vmapped code: (B, T) -> (B, T, X, 32)."""
    jitted = jax.jit(lambda s, d: calendar_embedding(s, d, legacy=legacy))
    vmapped = jax.jit(jax.vmap(lambda s, d: calendar_embedding(s[None], d[None], legacy=legacy)[0]))
    return {"eager": lambda s, d: calendar_embedding(s, d, legacy=legacy), "jit": jitted, "vmap": vmapped}


# sin/cos of the same float32 argument differ by at most 1-2 ulp of the result between libms;
# one ulp of the argument (a division rounded differently) would show as up to 4e-6.
CALENDAR_ATOL = 1.2e-7


def test_calendar_embedding(fixtures_dir):
    cal = np.load(fixtures_dir / "calendar.npz")
    np.testing.assert_array_equal(lon_shift_seconds(), cal["lon_shift_seconds"])
    np.testing.assert_array_equal(healpix.lonlat(64, "net")[0].astype(np.float32), cal["lon_net_f32"])
    pix = cal["pixels"]
    for legacy, key in ((True, "embedding_legacy_sub"), (False, "embedding_fixed_sub")):
        for how, f in _calendar_variants(legacy).items():
            emb = f(jnp.asarray(cal["second_of_day"]), jnp.asarray(cal["day_of_year"]))  # (12, 1, X, 32)
            mine = np.transpose(np.asarray(emb), (0, 3, 1, 2))[..., pix]
            np.testing.assert_allclose(mine, cal[key], rtol=0, atol=CALENDAR_ATOL, err_msg=f"{key} {how}")


def test_calendar_embedding_video_frames(fixtures_dir):
    """Per-frame embedding, legacy = false, times with minutes (issue 11 item 8): exact to round-off."""
    d = np.load(fixtures_dir / "video" / "video_denoiser.npz")
    ref = d["act__model.embed_calendar"]  # (3, 32, 4, 384)
    stride = int(d["act_stride__model.embed_calendar"])
    for how, f in _calendar_variants(False).items():
        emb = f(jnp.asarray(d["second_of_day"]), jnp.asarray(d["day_of_year"]))  # (3, 4, X, 32)
        mine = np.transpose(np.asarray(emb), (0, 3, 1, 2))[..., ::stride]
        np.testing.assert_allclose(mine, ref, rtol=0, atol=CALENDAR_ATOL, err_msg=how)


def test_groupnorm(fixtures_dir):
    g = np.load(fixtures_dir / "groupnorm.npz")
    for c, groups in zip(g["channels"], g["num_groups"]):
        x = np.transpose(g[f"C{c}_x"][:, :, 0, :], (0, 2, 1))
        for silu, key in ((False, "y_eval"), (True, "y_eval_silu")):
            norm = GroupNorm(int(c), silu=silu)
            assert norm.groups == groups
            norm.scale[...] = jnp.asarray(g[f"C{c}_weight"])
            norm.bias[...] = jnp.asarray(g[f"C{c}_bias"])
            y = np.transpose(np.asarray(norm(jnp.asarray(x))), (0, 2, 1))[:, :, None, :]
            np.testing.assert_allclose(y, g[f"C{c}_{key}"], rtol=0, atol=2e-6, err_msg=f"C={c} {key}")


@pytest.mark.slow  # > 20 s on 2 cores: in the `-m slow` set that CI also runs (README, Tests)
def test_mixture_of_experts(fixtures_dir, tmp_path):
    from jaxguide.model.convert import convert_checkpoints
    import jaxguide

    moe = np.load(fixtures_dir / "moe_denoiser.npz")
    experts = [fixtures_dir / "moe" / f"expert{i}.checkpoint" for i in range(3)]
    out = convert_checkpoints(experts, tmp_path / "moe", sigma_thresholds=[100.0, 10.0])
    model = jaxguide.load_model(out)
    assert model.sigma_thresholds == (100.0, 10.0)
    cond = dict(
        class_labels=moe["class_labels"],
        condition=moe["condition"],
        second_of_day=moe["second_of_day"],
        day_of_year=moe["day_of_year"],
    )
    f = jax.jit(model.apply)
    for sigma, ref, idx in zip(moe["sigmas"], moe["D"], moe["expert_index"]):
        D = f(model.params, moe["x"], jnp.float32(sigma), **cond)
        maxabs, rms = rel_errors(D, ref)
        assert maxabs <= 1e-4 and rms <= 1e-5, (sigma, idx, maxabs, rms)
    # a batch is routed by its first sigma: [5, 150] goes entirely to expert 2
    x2 = np.concatenate([moe["x"], moe["x"]])
    cond2 = {k: np.concatenate([v, v]) for k, v in cond.items()}
    D = f(model.params, x2, jnp.asarray(moe["mixed_sigma"], jnp.float32), **cond2)
    s = int(moe["mixed_stride"])
    maxabs, rms = rel_errors(np.asarray(D)[..., ::s], moe["mixed_D_sub"])
    assert maxabs <= 1e-4 and rms <= 1e-5


@pytest.mark.slow  # > 20 s on 2 cores: in the `-m slow` set that CI also runs (README, Tests)
def test_grad_matches_finite_differences(tiny_model, den):
    """d/dx of <w, D(x)> along a random direction, float64 throughout, vs central differences."""
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tiny_model.params)
        x = jnp.asarray(den["x"][1:2], jnp.float64)
        rng = np.random.default_rng(0)
        w = jnp.asarray(rng.normal(size=x.shape))
        v = jnp.asarray(rng.normal(size=x.shape))
        cond = {k: v_[1:2] for k, v_ in _conditioning(den).items()}

        def scalar(x):
            D = tiny_model.apply(params, x, jnp.float64(1.5), compute_dtype=jnp.float64, **cond)
            return jnp.sum(w * D)

        f = jax.jit(scalar)
        g = jax.jit(jax.grad(scalar))(x)
        # |v| ~ 540 over 294912 entries: a step of 1e-5 keeps truncation error ~1e-10 relative
        h = 1e-5
        fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
        ad = jnp.sum(g * v)
        assert abs(float(ad - fd)) <= 1e-7 * abs(float(fd)), (float(ad), float(fd))


def test_vmap_over_members_equals_loop(tiny_model, den):
    """vmap over members (params shared) equals a Python loop.

    Checked in float64, where the two programs must agree to round-off (1e-10): in
    float32 XLA's batched and unbatched convolutions differ by ~4e-5 x RMS, the same
    order as PyTorch's own batch-size dependence (fixtures README).
    """
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tiny_model.params)
        cond = _conditioning(den)
        xs = jnp.asarray(den["x"][:2, None], jnp.float64)  # (2 members, batch 1, C, 1, X)
        per = {k: v[:2, None] for k, v in cond.items()}

        def one(x, c):
            return tiny_model.apply(params, x, jnp.float64(1.5), compute_dtype=jnp.float64, **c)

        batched = jax.jit(jax.vmap(one))(xs, per)
        f = jax.jit(one)
        for m in range(2):
            single = f(xs[m], {k: v[m] for k, v in per.items()})
            maxabs, _ = rel_errors(batched[m], single)
            assert maxabs <= 1e-10, (m, maxabs)


def _parse_state_dict_txt(path):
    rows = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\| (\S+) \| \(([\d, ]*)\) \| float32 \|", line)
        if m:
            rows[m.group(1)] = tuple(int(s) for s in m.group(2).split(",") if s.strip())
    return rows


@pytest.mark.parametrize(
    "name,config",
    [
        ("tiny_state_dict.txt", ModelConfig(model_channels=8, label_dim=1024, out_channels=6, condition_channels=1)),
        (
            "released_coarse_state_dict.txt",
            ModelConfig(model_channels=128, label_dim=1024, out_channels=45, condition_channels=1),
        ),
    ],
)
def test_key_mapping_covers_state_dict(fixtures_dir, name, config):
    """Every key and shape of the real state dicts (tiny and the released coarse model)."""
    from jaxguide.model.convert.mapping import key_map, to_torch

    rows = _parse_state_dict_txt(fixtures_dir / name)
    mapping, buffers = key_map(config)
    assert set(rows) == set(mapping) | buffers
    _, shapes = graphdef_and_shapes(config)
    for key, (path, rule) in mapping.items():
        leaf = shapes
        for p in path:
            leaf = leaf[p]
        assert to_torch(rule, np.zeros(leaf.shape, np.float32)).shape == rows[key], key


def test_released_config_builds():
    config = ModelConfig(model_channels=128, label_dim=1024, out_channels=45, condition_channels=1)
    # the fixtures README: 68,361,901 trainable parameters in cBottle's released coarse model
    assert count_params(config) == 68_361_901


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(architecture="unet_hpx1024_patch"), "unet_hpx1024_patch"),
        (dict(time_length=4, model_channels=8), "0 heads"),  # cBottle's video model: 64 channels per head
        (dict(time_length=0), "time_length"),
        (dict(architecture="mystery_net"), "mystery_net"),
    ],
)
def test_unported_architectures_fail_by_name(changes, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        ModelConfig(**changes).check_supported()


def test_shape_errors_name_the_layout(tiny_model, den):
    with pytest.raises(ValueError, match="batch, channel, time, pixel"):
        tiny_model.denoise(den["x"][:, :5], 1.0, **_conditioning(den))
