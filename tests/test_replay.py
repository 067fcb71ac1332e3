"""Replay cBottle's own sampling trajectories (CBottle3d, 6 Heun steps) draw for draw.

The converted tiny checkpoint, the recorded latents and cBottle's denoiser semantics
(ERA5 label with an ICON pass for rlut) must reproduce the state after every step and
the post-processed output within 1e-4 x RMS (max-abs), unguided and with the seed's
regression guidance (loss ||A(D) - y||^2 / (2 sigma_y^2), scale 0.01).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_errors
from jaxguide.diffusion import guidance, sampler
from jaxguide.model.denoiser import CBottleDenoiser, postprocess


def _run(model, rec, guided: bool):
    with jax.enable_x64(True):
        dm = CBottleDenoiser(model, label="era5")
        cond = {"condition": rec["condition"], "second_of_day": rec["second_of_day"], "day_of_year": rec["day_of_year"]}
        denoise = functools.partial(dm.denoise, model.params)  # the contract: D(x, sigma, cond)
        if guided:
            ch = jnp.asarray(rec["obs_channel"])
            px = jnp.asarray(rec["obs_pixel_net"])

            def A(x):
                return x[ch, 0, px]

            obs = guidance.Observations(A, jnp.asarray(rec["y"], jnp.float64), float(rec["sigma_y"]))
            denoise = guidance.Regression(scale=float(rec["guidance_scale"]))(denoise, obs)
        # cBottle: xT = float32(latents * 200.0), state float64, schedule from int(200)
        latents = jnp.asarray(rec["latents"][0], jnp.float32)
        final, traj = sampler.sample(
            lambda x, sigma: denoise(x, sigma, cond),
            None,
            latents.shape,
            num_steps=6,
            sigma_min=0.02,
            sigma_max=200,
            latents=latents,
            return_trajectory=True,
            dtype=jnp.float64,
        )
        return np.asarray(final), np.asarray(traj)


# the guided replay (VJPs through the network at every call) takes > 60 s on 2 cores: slow set
@pytest.mark.parametrize("name", ["sampler_unguided.npz", pytest.param("sampler_guided.npz", marks=pytest.mark.slow)])
def test_replay_cbottle_trajectory(fixtures_dir, tiny_model, name):
    rec = np.load(fixtures_dir / name)
    np.testing.assert_allclose(
        np.append(sampler.sigma_schedule(6, 0.02, 200, 7.0), 0.0), rec["sigma_steps"], rtol=1e-14, atol=0
    )
    final, traj = _run(tiny_model, rec, guided=name == "sampler_guided.npz")
    stride = int(rec["x_stride"])
    # traj[i] is the state at the start of step i; the fixture has the state after steps 1..5
    for step in range(5):
        maxabs, rms = rel_errors(traj[step + 1][None][..., ::stride], rec["x_after_step_sub"][step])
        assert maxabs <= 1e-4 and rms <= 1e-5, (step + 1, maxabs, rms)
    maxabs, rms = rel_errors(final[None], rec["x_final"])
    assert maxabs <= 1e-4 and rms <= 1e-5, ("final", maxabs, rms)
    out = postprocess(final, rec["center"], rec["scales"])
    for c in range(out.shape[0]):
        maxabs, _ = rel_errors(out[c] - rec["center"][c], rec["output_postprocessed"][0, c] - rec["center"][c])
        assert maxabs <= 1e-4, (rec["channels"][c], maxabs)
