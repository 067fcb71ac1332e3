"""The window demo (``jaxguide demo --window``): 4D assimilation on an exact space-time prior.

Why: a video model analyses T frames at once, and observations at some frames inform
the others through the prior's time correlation. With a Gaussian space-time prior
(:func:`jaxguide.model.gaussian.harmonic_prior` with a time factor: ``(S R S) kron K_time
kron K``, K_time = exp(-|lag| / correlation time), the AR(1) process) the exact answer
is the Kalman smoother of the window, so the demo shows, frame by frame, how much the
MMPS analysis gains over the prior where there are observations and where there are
none, and that it gains what the exact posterior says.

Steps (:func:`run_window_demo`): the single-time demo's climatology, channel
correlation and spatial kernel (:mod:`jaxguide.demo.experiment`) on ``frames`` frames
``time_step_hours`` apart; a truth drawn from it; noisy point observations (every
channel at ``obs_count`` random locations) at random times in the first
``observed_frames`` frames (mostly between frame times: the operator interpolates
linearly in time), made into an observation table and put through
``observations.prepare(window=...)``; prior and MMPS ensembles (common random
numbers); the exact posterior (:func:`jaxguide.model.gaussian.kalman_marginals`); per-frame
skill. Files in the output directory (``window_`` prefix, beside the single-time
demo's): ``window_truth.nc``, ``window_prior_ensemble.nc``, ``window_analysis_mmps.nc``
(io layout, one time per frame), ``window_obs.csv``, ``window_skill.csv``,
``window_summary.json``, ``window_skill.png``.

Per-frame scores (K, over channels and pixels of one frame): ``rmse_*`` = RMS of
(mean - truth) for the MMPS ensemble mean, the exact posterior mean, the prior
ensemble mean and the prior (climatological) mean; ``spread_*`` = RMS of the ensemble
std, ``std_exact`` = RMS of the exact posterior std; ``mean_error_vs_exact`` (prior
std units) and ``spread_ratio_vs_exact`` as in :func:`jaxguide.demo.experiment.posterior_scores`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxguide.demo.experiment import (DemoConfig, Progress, climatology_k, file_provenance, posterior_scores,
                                      prepare_out_dir, prior_sha256, stage_clock)
from jaxguide.io.files import atomic_write, write_dataset, write_json_atomic
from jaxguide.observations.operator import build_operator
from jaxguide.observations.prepare import prepare
from jaxguide.observations.table import write_observations

from jaxguide.diffusion import ensemble, guidance, guided

from jaxguide.model import gaussian, units

from jaxguide.grid import healpix

from jaxguide.verification import plots

from jaxguide.assimilation import dataset as schema
from jaxguide.model.window import FrameWindow

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("prior", "truth and observations", "exact posterior", "ensembles", "verification",
                           "files and plots")


@dataclasses.dataclass(frozen=True)
class WindowDemoConfig(DemoConfig):
    """The window demo's settings: :class:`jaxguide.demo.experiment.DemoConfig`'s (climatology,
    channels, spatial kernel, members, steps, observation count and error, cg_iters,
    seed; ``time`` is the window start) plus the window: ``frames`` frames
    ``time_step_hours`` apart, time correlation ``exp(-|lag| / correlation_hours)``,
    observations in the first ``observed_frames`` frames only. Defaults: nside 8 (the
    window state has as many values as the single-time demo's nside 16 state), 100
    locations (300 observations)."""

    nside: int = 8
    lmax: int = 12
    length_scale_km: float = 1500.0
    obs_count: int = 100
    frames: int = 4
    time_step_hours: float = 6.0
    correlation_hours: float = 24.0
    observed_frames: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.frames < 2:
            raise ValueError(f"the window demo needs frames >= 2, got {self.frames}")
        if not 1 <= self.observed_frames <= self.frames:
            raise ValueError(f"observed_frames must be in [1, {self.frames}], got {self.observed_frames}")
        if not self.obs_count >= 1:
            raise ValueError(f"obs_count must be >= 1, got {self.obs_count}")

    @property
    def window(self) -> FrameWindow:
        return FrameWindow(self.time, self.time_step_hours, self.frames)


def build_prior(config: WindowDemoConfig) -> gaussian.GaussianPrior:
    """The space-time prior in normalised units, (C, T, npix) net order: the single-time
    demo's climatology (the same in every frame) and covariance, times K_time."""
    _, lat = healpix.lonlat(config.nside, "net")
    mu = units.normalise(climatology_k(config, lat), config.center, config.scale, axis=-2)
    return gaussian.harmonic_prior(config.nside, mu, np.asarray(config.std_k) / config.scale, config.channel_corr,
                                   config.length_scale_km, config.lmax, time_length=config.frames,
                                   time_step_hours=config.time_step_hours, correlation_hours=config.correlation_hours)


def observation_table(config: WindowDemoConfig, truth: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """Every channel at ``obs_count`` random locations, each at a random time in the
    first ``observed_frames`` frames (a frame time when ``observed_frames`` is 1):
    values = the time-interpolating bilinear operator on the truth (K) + N(0, sigma_obs_k^2)."""
    n = config.obs_count
    lon, lat = rng.uniform(0.0, 360.0, n), np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    pos = rng.uniform(0.0, config.observed_frames - 1, n)
    C = len(config.channels)
    loc = {"lat": np.repeat(lat, C), "lon": np.repeat(lon, C), "variable": np.tile(np.arange(C), n)}
    position = np.repeat(pos, C)
    op = build_operator(loc, config.channels, nside=config.nside, frame_position=position,
                                     n_frames=config.frames)
    ch = loc["variable"]
    value_n = np.asarray(op(jnp.asarray(truth, jnp.float32)), np.float64)
    value = units.unnormalise(value_n, config.center, config.scale, channel=ch)
    value = value + config.sigma_obs_k * rng.standard_normal(value.shape)
    times = config.window.start + pd.to_timedelta(position * config.time_step_hours, unit="h")
    return pd.DataFrame({"time": times.round("s"), "lat": loc["lat"], "lon": loc["lon"],
                         "variable": np.asarray(config.channels)[ch], "value": value, "sigma": config.sigma_obs_k})


def frame_scores(config: WindowDemoConfig, ens: dict[str, np.ndarray], truth: np.ndarray, prior: gaussian.GaussianPrior,
                 post_mean: np.ndarray, post_std: np.ndarray, frame_position: np.ndarray) -> list[dict[str, Any]]:
    """One row per frame (see the module doc); arrays normalised (C, T, npix) or (M, C, T, npix)."""
    s = np.asarray(config.scale)[:, None, None]
    prior_std = gaussian.pointwise_std(prior)
    rms = lambda a: np.sqrt(np.mean(a**2, axis=(0, 2)))  # noqa: E731  (C, T, npix) -> (T,)
    e_m, e_p = ens["mmps"], ens["prior"]
    mean_m = e_m.mean(0)
    d = (mean_m - post_mean) / prior_std
    nearest = np.round(frame_position).astype(int)
    cols = {
        "rmse_mmps": rms((mean_m - truth) * s),
        "spread_mmps": rms(e_m.std(0, ddof=1) * s),
        "rmse_exact": rms((post_mean - truth) * s),
        "std_exact": rms(post_std * s),
        "rmse_prior": rms((e_p.mean(0) - truth) * s),
        "spread_prior": rms(e_p.std(0, ddof=1) * s),
        "rmse_prior_mean": rms((np.asarray(prior.mu) - truth) * s),
        "mean_error_vs_exact": rms(d),
        "spread_ratio_vs_exact": np.mean(e_m.std(0, ddof=1) / post_std, axis=(0, 2)),
    }
    rows = []
    for t in range(config.frames):
        rows.append({"frame": t, "hours": t * config.time_step_hours,
                     "time": config.window.times[t].strftime("%Y-%m-%dT%H:%M"),
                     "observed": bool(t < config.observed_frames), "n_obs_nearest": int(np.sum(nearest == t)),
                     **{k: float(v[t]) for k, v in cols.items()}})
    return rows


def _dataset(ens, config: WindowDemoConfig, provenance: dict, title: str, prior=None):
    ds = schema.analysis_to_dataset(ens, channels=list(config.channels), center=config.center, scale=config.scale,
                                    times=list(config.window.times), provenance=provenance, prior=prior)
    ds.attrs["title"] = title
    return ds


def run_window_demo(out_dir: str | os.PathLike, config: WindowDemoConfig = WindowDemoConfig(), *,
                    progress: Progress | None = None, command: str = "jaxguide demo --window") -> dict[str, Any]:
    """Run the window demo, write its files into ``out_dir`` and return the summary
    (also ``out_dir/window_summary.json``). progress/command as :func:`jaxguide.demo.experiment.run_demo`."""
    out = prepare_out_dir(out_dir)
    stage, timings = stage_clock(STAGES, progress, "window demo")

    channels, center, scale = list(config.channels), config.center, config.scale
    window = config.window
    k_truth, k_ens = jax.random.split(jax.random.PRNGKey(config.seed))

    stage(0)
    prior = build_prior(config)
    sha = prior_sha256(prior)
    model = gaussian.GaussianModel(prior, tuple(channels), center, scale, config.nside,
                                   time_step_hours=config.time_step_hours)

    stage(1)
    truth = np.asarray(prior.sample(k_truth, 1)[0], np.float64)  # (C, T, npix) normalised
    table = observation_table(config, truth, np.random.default_rng(config.seed))
    prep = prepare(table, channels, center, scale, window=window, nside=config.nside, pad_to="bucket")
    obs, n_obs = prep.obs, prep.n_obs

    stage(2)
    H = obs.A.dense(prior.shape)[:n_obs]
    post_mean, post_std = gaussian.kalman_marginals(prior, H, np.asarray(obs.y)[:n_obs], np.asarray(obs.sigma_y)[:n_obs])
    prior_std = gaussian.pointwise_std(prior)

    stage(3)
    programs, fn = ensemble.EnsembleSampler(), guided.guided_denoiser(model)
    kwargs = dict(num_steps=config.steps, sigma_min=config.sigma_min, sigma_max=config.sigma_max)
    cond = model.window_conditioning(window)
    methods = {"prior": (None, None), "mmps": (guidance.MMPS(cg_iters=int(config.cg_iters)), obs)}
    calls = {name: programs.prepare(fn, k_ens, model.member_shape, config.members, sampler_kwargs=kwargs,
                                    operands=(model.params, cond, m, o), devices=jax.devices()[:1])
             for name, (m, o) in methods.items()}
    programs.compile_many(list(calls.values()))
    ens = {name: np.asarray(programs.run(call), np.float64) for name, call in calls.items()}
    for name, e in ens.items():
        if not np.all(np.isfinite(e)):
            raise FloatingPointError(f"the {name} ensemble has non-finite values")

    stage(4)
    rows = frame_scores(config, ens, truth, prior, post_mean, post_std, prep.table["frame_position"].to_numpy())
    overall = {name: posterior_scores(e, post_mean, post_std, prior_std, channels)["all"]
               for name, e in ens.items()}

    stage(5)
    files = {"truth": out / "window_truth.nc", "prior": out / "window_prior_ensemble.nc",
             "mmps": out / "window_analysis_mmps.nc", "obs": out / "window_obs.csv", "skill": out / "window_skill.csv",
             "summary": out / "window_summary.json", "plot": out / "window_skill.png"}
    write_observations(table, files["obs"])
    prov = functools.partial(file_provenance, config, n_obs=n_obs, sha=sha, command=command)
    extra = {"time_interpolation": "linear between frames", "time_step_hours": config.time_step_hours}
    none = "none (no observations used)"
    writes = {
        "truth": (truth[None], prov("truth (one draw from the space-time prior)", sigma_y=none, scale=None),
                  "jaxguide window demo truth: one draw from the space-time Gaussian prior", None),
        "prior": (ens["prior"], prov("none (unguided prior ensemble)", sigma_y=none, scale=None),
                  "jaxguide window demo prior ensemble (space-time Gaussian prior, not cBottle)", None),
        "mmps": (ens["mmps"], prov(f"mmps (cg_iters={config.cg_iters})", sigma_y=config.sigma_obs_k, scale=1.0),
                 "jaxguide window demo analysis, MMPS (space-time Gaussian prior, not cBottle)", ens["prior"]),
    }
    for name, (e, p, title, pr) in writes.items():
        write_dataset(_dataset(e, config, p | extra, title, prior=pr), files[name], overwrite=True)
    skill = pd.DataFrame(rows)
    atomic_write(files["skill"], lambda tmp: skill.to_csv(tmp, index=False))
    plots.plot_frame_skill(
        files["plot"], skill["hours"].to_numpy(),
        {"MMPS RMSE": skill["rmse_mmps"], "MMPS spread": skill["spread_mmps"],
         "exact posterior RMSE": skill["rmse_exact"], "exact posterior std": skill["std_exact"],
         "prior RMSE": skill["rmse_prior"]},
        observed=skill["observed"].to_numpy(),
        title=(f"window demo: {n_obs} observations in frames 0-{config.observed_frames - 1} of {config.frames}, "
               f"{config.members} members"), units="RMS over channels and pixels (K)")

    summary = {
        "config": dataclasses.asdict(config),
        "window": {"start": window.start.isoformat(), "time_step_hours": config.time_step_hours,
                   "frames": config.frames, "times": [t.isoformat() for t in window.times]},
        "center_k": center.tolist(),
        "scale_k": scale.tolist(),
        "model_sha256": sha,
        "n_obs": n_obs,
        "frames": rows,
        "exact_posterior": overall,
        "files": {k: str(v) for k, v in files.items()},
    }
    stage(len(STAGES))
    summary["timing_s"] = timings
    write_json_atomic(files["summary"], summary)
    return summary
