"""The video model (cBottle's SongUNetHPX64Video, time_length T > 1) against PyTorch.

Fixtures: ../shared/fixtures/video (README section 8): a random-weight checkpoint with
T = 4, 3 channels, model_channels 8 and 4 channels per attention head, cBottle's denoiser
outputs with activations, and a conditioned sampling trajectory. Tolerances are the
video round-off floor measured in README section 8.7 (PyTorch's own float32 vs float64
reaches 9.2e-5 x RMS max-abs for D and 1.4e-4 for the sampler states): D max-abs
<= 3e-4 x RMS and RMS error <= 3e-5 x RMS per sample; sampler states and output
max-abs <= 5e-4 x RMS, RMS error <= 3e-5 x RMS; activations max-abs <= 1e-3 x their RMS.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_errors
from jaxguide.model import calendar, conditioning
from jaxguide.model import sst as sst_lib
from jaxguide.diffusion import sampler
from jaxguide.model.config import ModelConfig, UnsupportedArchitectureError
from jaxguide.model.denoiser import make_denoiser, postprocess
from jaxguide.model.checkpoint import count_params, graphdef_and_shapes
from jaxguide.model.inputs import Conditioning
from jaxguide.model.layers import Attention, TemporalAttention
from jaxguide.model.precond import precond_forward

VIDEO_CONFIG = dict(model_channels=8, label_dim=1024, out_channels=3, condition_channels=5, time_length=4)


@pytest.fixture(scope="module")
def video_dir(fixtures_dir):
    return fixtures_dir / "video"


@pytest.fixture(scope="module")
def video_model(video_dir, tmp_path_factory):
    from jaxguide.model.convert import convert_checkpoints
    import jaxguide

    out = convert_checkpoints([video_dir / "video.checkpoint"], tmp_path_factory.mktemp("video") / "model")
    return jaxguide.load_model(out)


@pytest.fixture(scope="module")
def vden(video_dir):
    return np.load(video_dir / "video_denoiser.npz")


def _cond(d):
    return dict(
        class_labels=d["class_labels"],
        condition=d["condition"],
        second_of_day=d["second_of_day"],
        day_of_year=d["day_of_year"],
    )


@pytest.fixture(scope="module")
def video_forward(video_model, vden):
    graphdef, _ = graphdef_and_shapes(video_model.config)

    def run(params, x, sigma, cond):
        model = nnx.merge(graphdef, nnx.State(params))
        return precond_forward(model, x, sigma, Conditioning(**cond), return_intermediates=True)

    return jax.jit(run)(video_model.params[0], vden["x"], vden["sigma"], _cond(vden))


def test_converter_reads_heads_and_config(video_model):
    cfg = video_model.config
    assert (cfg.time_length, cfg.channels_per_head, cfg.calendar_include_legacy_bug) == (4, 4, False)
    assert cfg.attention_heads(8) == 2 and cfg.attention_heads(16) == 4
    assert video_model.batch_info.time_step == 6
    assert count_params(cfg) == 674_987  # README 8.1


def test_video_denoiser_matches_pytorch(video_forward, vden):
    D, acts = video_forward
    assert D.shape == (3, 3, 4, 49152)
    for b in range(3):
        maxabs, rms = rel_errors(D[b], vden["D"][b])
        assert maxabs <= 3e-4 and rms <= 3e-5, (float(vden["sigma"][b]), maxabs, rms)
    for k in ("c_skip", "c_out", "c_in", "c_noise"):
        np.testing.assert_allclose(np.asarray(acts[k]), vden[k], rtol=2e-7, atol=0)
    s = int(vden["F_x_stride"])
    maxabs, _ = rel_errors(np.asarray(acts["F"])[..., ::s], vden["F_x_sub"])
    assert maxabs <= 3e-4, maxabs


def _video_activation_names(d):
    alias = {"dec.64x64_aux_norm": "dec.aux_norm", "dec.64x64_aux_conv": "dec.aux_conv"}
    names = {}
    for k in d.keys():
        if k.startswith("act__") and d[k].ndim == 4:
            torch_name = k[len("act__") :]
            short = torch_name.removeprefix("model.")
            names[torch_name] = alias.get(short, short)
    return names


def test_video_activations_match_pytorch(video_forward, vden):
    """Every recorded 4-D activation (calendar, blocks, spatial and temporal attentions, output), all frames."""
    _, acts = video_forward
    names = _video_activation_names(vden)
    assert len(names) == 18  # + map_noise/map_label/map_layer0/map_layer1 (2-D), checked below
    assert sum(".temporal_attention" in n for n in names) == 8
    worst = {}
    for torch_name, mine_name in names.items():
        stride = int(vden["act_stride__" + torch_name])
        mine = np.transpose(np.asarray(acts[mine_name]), (0, 3, 1, 2))[..., ::stride]
        worst[torch_name] = rel_errors(mine, vden["act__" + torch_name])
    bad = {k: v for k, v in worst.items() if not (v[0] <= 1e-3 and v[1] <= 5e-5)}
    assert not bad, bad
    # the noise/label embedding shared by all frames: emb = silu(map_layer1(...))
    ref = np.asarray(jax.nn.silu(jnp.asarray(vden["act__model.map_layer1"])))
    np.testing.assert_allclose(np.asarray(acts["emb"]), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _block(model_params, config, path):
    graphdef, _ = graphdef_and_shapes(config)
    model = nnx.merge(graphdef, nnx.State(model_params))
    node = model
    for p in path:
        node = node[p] if isinstance(node, nnx.Dict) else getattr(node, p)
    return node


@pytest.mark.parametrize(
    "torch_name,path",
    [
        ("enc.8x8_block0.attn", ("enc", "8x8_block0", "attn")),
        ("enc.8x8_block0.temporal_attention", ("enc", "8x8_block0", "tattn")),
        ("dec.8x8_in0.temporal_attention", ("dec", "8x8_in0", "tattn")),
    ],
)
def test_attention_modules_alone(video_model, vden, torch_name, path):
    """Each attention module on its recorded full input (multi-head spatial, temporal with bias)."""
    module = _block(video_model.params[0], video_model.config, path)
    assert isinstance(module, Attention if path[-1] == "attn" else TemporalAttention)
    x = jnp.transpose(jnp.asarray(vden["act_in__model." + torch_name]), (0, 2, 3, 1))  # (B, T, X, C)
    out = np.transpose(np.asarray(module(x)), (0, 3, 1, 2))
    maxabs, rms = rel_errors(out, vden["act__model." + torch_name])
    assert maxabs <= 1e-4 and rms <= 1e-5, (maxabs, rms)


def test_temporal_attention_layout_matters(video_model, vden):
    """The module test above can tell the sign of the relative position: P[h, k - q + T - 1]
    instead of P[h, q - k + T - 1] misses its 1e-4 bound by more than 10x."""
    module = _block(video_model.params[0], video_model.config, ("dec", "8x8_in0", "tattn"))
    x = jnp.transpose(jnp.asarray(vden["act_in__model.dec.8x8_in0.temporal_attention"]), (0, 2, 3, 1))
    ref = vden["act__model.dec.8x8_in0.temporal_attention"]
    table = module.positional_embedding[...]
    flipped = np.asarray(table)[:, ::-1][:, 1:]  # P[h, k - q + T - 1] == flipped[h, q - k + T - 1]
    module.positional_embedding[...] = jnp.concatenate([jnp.asarray(flipped), table[:, -1:]], axis=1)
    out = np.transpose(np.asarray(module(x)), (0, 3, 1, 2))
    module.positional_embedding[...] = table
    assert rel_errors(out, ref)[0] > 1e-3


def test_temporal_attention_gradient_matches_finite_differences():
    """jax.grad through the temporal attention (float64) against central differences."""
    with jax.enable_x64(True):
        module = TemporalAttention(8, 3, heads=2, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(module)
        state = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), state)
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.normal(size=(2, 3, 48, 8)))
        w = jnp.asarray(rng.normal(size=(2, 3, 48, 8)))
        v = jnp.asarray(rng.normal(size=(2, 3, 48, 8)))

        def f(x):
            return jnp.sum(w * nnx.merge(graphdef, state)(x))

        g = jax.grad(f)(x)
        h = 1e-6
        fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
        assert abs(float(jnp.sum(g * v) - fd)) <= 1e-7 * abs(float(fd))


def test_frame_inputs_rebuild_the_fixture_batches(vden, video_dir):
    """Frame times, per-frame calendar and the [target * mask, SST, mask] condition as cBottle builds them."""
    for b in range(3):
        sod, doy = calendar.frame_calendar_inputs(str(vden["window_start"][b]), 4, 6)
        np.testing.assert_array_equal(sod, vden["second_of_day"][b : b + 1])
        np.testing.assert_array_equal(doy, vden["day_of_year"][b : b + 1])
        cond = vden["condition"][b]
        keep = vden["frame_mask"][b]
        target = np.where(keep[None, :, None], cond[:3], np.float32(7.0))  # dropped frames are multiplied by 0
        rebuilt = conditioning.frame_condition(target, keep, cond[3])
        np.testing.assert_array_equal(rebuilt[0], cond)
    rec = np.load(video_dir / "video_sampler.npz")
    sod, doy = calendar.frame_calendar_inputs(str(rec["window_start"]), 4, int(rec["time_step_hours"]))
    np.testing.assert_array_equal(sod, rec["second_of_day"])
    np.testing.assert_array_equal(doy, rec["day_of_year"])
    with pytest.raises(ValueError, match="frames"):
        conditioning.frame_condition(np.zeros((3, 4, 12)), [True, False], np.zeros(12))


def test_window_conditioning_rebuilds_the_sampler_batch(video_dir, video_model, tmp_path):
    """CBottleDenoiser.window_conditioning for the fixture's window and its known frame 0
    gives cBottle's batch: calendar per frame, [frame * mask, SST, mask] (the fixture's
    SST came from a synthetic loader, so channel 3 is checked against our AMIP path)."""
    from jaxguide.model.denoiser import CBottleDenoiser
    from jaxguide.model.sst import write_synthetic_sst
    from jaxguide.model.window import FrameWindow

    rec = np.load(video_dir / "video_sampler.npz")
    dm = CBottleDenoiser(video_model)
    assert dm.time_step_hours == 6.0 and dm.member_shape == (3, 4, 49152)
    window = dm.window(str(rec["window_start"]))
    assert [str(t) for t in window.times] == [str(t).replace("T", " ") for t in rec["frame_timestamps"]]
    fixture = rec["condition"][0]
    known = conditioning.KnownFrames(np.where(rec["frame_mask"][None, :, None], fixture[:3], 5.0), rec["frame_mask"])
    sst_path = write_synthetic_sst(tmp_path / "sst.nc", "2016-01-01", "2016-12-31")
    cond = dm.window_conditioning(window, known=known, sst_path=sst_path)
    np.testing.assert_array_equal(cond["second_of_day"], rec["second_of_day"][0])
    np.testing.assert_array_equal(cond["day_of_year"], rec["day_of_year"][0])
    np.testing.assert_array_equal(cond["condition"][[0, 1, 2, 4]], fixture[[0, 1, 2, 4]])
    sst = sst_lib.read_amip_sst(sst_path)
    for f, t in enumerate(window.times):
        np.testing.assert_array_equal(cond["condition"][3, f], sst_lib.sst_at(sst, t).reshape(-1))
    with pytest.raises(ValueError, match="this model samples 4"):
        dm.window_conditioning(FrameWindow(window.start, 6, 3), sst_path=sst_path)


@pytest.mark.slow  # > 20 s on 2 cores: in the `-m slow` set that CI also runs (README, Tests)
def test_replay_video_trajectory(video_dir, video_model):
    """cBottle's conditioned video sampling (first frame given, 6 Heun steps) draw for draw."""
    rec = np.load(video_dir / "video_sampler.npz")
    np.testing.assert_allclose(
        np.append(sampler.sigma_schedule(6, 0.02, 200, 7.0), 0.0), rec["sigma_steps"], rtol=1e-14, atol=0
    )
    assert bool(rec["channel_mask"].all())  # T850, T500, tas: one ERA5 pass
    with jax.enable_x64(True):
        denoise = make_denoiser(
            video_model,
            condition=rec["condition"],
            second_of_day=rec["second_of_day"],
            day_of_year=rec["day_of_year"],
            label="era5",
        )
        latents = jnp.asarray(rec["latents"][0], jnp.float32)  # (C, T, npix)
        final, traj = sampler.sample(
            denoise,
            None,
            latents.shape,
            num_steps=6,
            sigma_min=0.02,
            sigma_max=200,
            latents=latents,
            return_trajectory=True,
            dtype=jnp.float64,
        )
        final, traj = np.asarray(final), np.asarray(traj)
    assert final.shape == (3, 4, 49152)
    stride = int(rec["x_stride"])
    for step in range(5):
        maxabs, rms = rel_errors(traj[step + 1][None][..., ::stride], rec["x_after_step_sub"][step])
        assert maxabs <= 5e-4 and rms <= 3e-5, (step + 1, maxabs, rms)
    maxabs, rms = rel_errors(final[None], rec["x_final"])
    assert maxabs <= 5e-4 and rms <= 3e-5, ("final", maxabs, rms)
    out = postprocess(final, rec["center"], rec["scales"])
    for c in range(out.shape[0]):
        maxabs, _ = rel_errors(out[c] - rec["center"][c], rec["output_postprocessed"][0, c] - rec["center"][c])
        assert maxabs <= 5e-4, (str(rec["channels"][c]), maxabs)


def _parse_state_dict_txt(path):
    rows = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\| (\S+) \| \(([\d, ]*)\) \| float32 \|", line)
        if m:
            rows[m.group(1)] = tuple(int(s) for s in m.group(2).split(",") if s.strip())
    return rows


RELEASED_VIDEO = ModelConfig(
    model_channels=256,
    label_dim=1024,
    out_channels=45,
    condition_channels=47,
    time_length=12,
    calendar_include_legacy_bug=False,
)


@pytest.mark.parametrize(
    "name,config",
    [
        ("video_state_dict.txt", ModelConfig(**VIDEO_CONFIG, calendar_include_legacy_bug=False, channels_per_head=4)),
        ("released_video_state_dict.txt", RELEASED_VIDEO),
    ],
)
def test_video_key_mapping_covers_state_dict(video_dir, name, config):
    from jaxguide.model.convert.mapping import key_map, to_torch

    rows = _parse_state_dict_txt(video_dir / name)
    mapping, buffers = key_map(config)
    assert set(rows) == set(mapping) | buffers
    assert sum(k.endswith(".temporal_attention.positional_embedding") for k in mapping) == 24
    _, shapes = graphdef_and_shapes(config)
    for key, (path, rule) in mapping.items():
        leaf = shapes
        for p in path:
            leaf = leaf[p]
        assert to_torch(rule, np.zeros(leaf.shape, np.float32)).shape == rows[key], key


def test_released_video_config_builds():
    # released_video_state_dict.txt: 281,537,869 trainable parameters (nnx.eval_shape, no weights allocated)
    assert count_params(RELEASED_VIDEO) == 281_537_869


def test_video_shape_errors(video_model, vden):
    with pytest.raises(ValueError, match=r"\(batch, 3, 4, 49152\)"):
        video_model.denoise(vden["x"][:, :, :1], 1.0, **_cond(vden))
    with pytest.raises(ValueError, match="condition"):
        video_model.denoise(vden["x"], 1.0, **{**_cond(vden), "condition": vden["condition"][:, :1, :, :100]})
    with pytest.raises(UnsupportedArchitectureError, match="0 heads"):
        ModelConfig(**VIDEO_CONFIG).check_supported()  # cBottle's 64 channels per head at width 8


def test_video_mixture_converts_with_thresholds(video_dir, tmp_path):
    """cbottle-3d-video is a mixture of 3 video experts split at sigma 316 and 10."""
    from jaxguide.model.convert import convert_checkpoints
    from jaxguide.model.checkpoint import expert_index, load_model

    ck = video_dir / "video.checkpoint"
    model = load_model(convert_checkpoints([ck, ck, ck], tmp_path / "moe", sigma_thresholds=[316.0, 10.0]))
    assert model.sigma_thresholds == (316.0, 10.0) and len(model.params) == 3
    assert model.config.time_length == 4 and model.config.channels_per_head == 4
    routes = [int(expert_index(jnp.float32(s), model.sigma_thresholds, 3)) for s in (1000.0, 316.0, 300.0, 10.0, 3.0)]
    assert routes == [0, 0, 1, 1, 2]
