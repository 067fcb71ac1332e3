"""The end-to-end demo: an observing-system experiment on an exact Gaussian prior.

Why a Gaussian prior: it needs no download, runs in seconds on a CPU, and its
denoiser and posterior are exact, so the demo can score the guided samplers against
the true Bayesian answer (the Kalman posterior), not only against observations.

Steps (:func:`run_demo`): a Gaussian random field on HEALPix for T850/T500/T300 with a
latitude-dependent climatological mean, per-channel stds of a few K, vertical channel
correlation and a ~1200 km correlation length; a truth drawn from it; noisy point
observations (``strategies.sample_observations``) split into assimilated and held-out
sets; three ensembles sampled with the EDM sampler (prior, MMPS, regression guidance);
verification against held-out and assimilated observations, against the truth and
against the exact posterior; NetCDF analyses, CSV tables, ``summary.json`` and PNG
plots in the output directory.

Files in the output directory: ``truth.nc``, ``prior_ensemble.nc``,
``analysis_mmps.nc``, ``analysis_regression.nc`` (io layout, NEST pixels, K; the
analyses carry the prior ensemble mean), ``obs.csv`` / ``held_out.csv`` (observation
tables), ``summary.json``, ``maps_mmps_<channel>.png``, ``truth_<channel>.png`` and
``rank_held_out_<method>.png``. They work with ``jaxguide evaluate
OUT/analysis_mmps.nc --obs OUT/obs.csv --held-out OUT/held_out.csv --truth
OUT/truth.nc``; that command samples the ensemble at the nearest pixel, the demo
through the bilinear observation operator the observations were made with, so its
numbers differ slightly (most at the assimilated observations).

Choices: the three ensembles share their initial noise (common random numbers: the
differences between methods are not sampling noise); the regression guidance scale
is cBottle's ``sigma_y^2`` (see :func:`regression_scale`); MMPS uses 8 CG iterations
(at the default, 4 / 8 / 16 give a mean error vs the exact posterior of 0.13 / 0.10 /
0.094 prior std against a Monte-Carlo floor of 0.073, at 0.6 / 1 / 1.6x the cost).

Units: the state is NORMALISED like cBottle's network state, ``(T - center) / scale``
per channel with cBottle's batch_info center/scale, shape (C, 1, npix), "net" pixel
order. Observation tables, NetCDF files, metrics and plots are PHYSICAL (K).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxguide.diffusion import ensemble, guidance, guided

from jaxguide.model import gaussian, units

from jaxguide.grid import healpix

from jaxguide.io.files import check_writable_dir, write_dataset, write_json_atomic
from jaxguide.observations.operator import PointObservationOperator
from jaxguide.observations.prepare import prepare
from jaxguide.observations.table import write_observations

from jaxguide.verification import metrics, plots

from jaxguide.assimilation import dataset as schema

from jaxguide.observations import strategies

logger = logging.getLogger(__name__)

# cBottle's batch_info center/scale for these channels (dataset_v6_stats), K.
CBOTTLE_CENTER = {"T850": 281.1327209472656, "T500": 258.4976501464844, "T300": 233.303466796875}
CBOTTLE_SCALE = {"T850": 12.338329315185547, "T500": 10.93696403503418, "T300": 9.404952049255371}

METHODS: tuple[str, ...] = ("prior", "mmps", "regression")
STAGES: tuple[str, ...] = (
    "prior",
    "truth and observations",
    "exact posterior",
    "prior ensemble",
    "MMPS ensemble",
    "regression ensemble",
    "verification",
    "files and plots",
)
Progress = Callable[[int, int, str], None]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (defaults: the README's ``jaxguide demo``).

    Climatology (K): ``T(lat) = equator_k - pole_drop_k sin^2(lat) - offset_k[c]``
    (T850 298 K at the equator, 252 K at the poles; T500 22 K and T300 45 K colder).
    Anomaly: std ``std_k`` per channel, channel correlation ``channel_corr``,
    squared-exponential kernel of length ``length_scale_km`` kept to its spherical
    harmonics of degree <= ``lmax`` (plus a constant floor, same total variance).
    Ensembles: ``members`` members, ``steps`` Heun steps of the EDM schedule.
    Observations: ``obs_count`` locations (each observes every channel) drawn by
    ``strategy`` ("random" or "uniform"), error ``sigma_obs_k`` (K),
    ``holdout_fraction`` of the locations held out. Guidance: ``cg_iters`` CG
    iterations for MMPS; ``regression_scale`` None means :func:`regression_scale`'s rule.
    """

    nside: int = 16
    channels: tuple[str, ...] = ("T850", "T500", "T300")
    equator_k: float = 298.0
    pole_drop_k: float = 46.0
    offset_k: tuple[float, ...] = (0.0, 22.0, 45.0)
    std_k: tuple[float, ...] = (3.0, 2.5, 2.5)
    channel_corr: tuple[tuple[float, ...], ...] = ((1.0, 0.7, 0.4), (0.7, 1.0, 0.75), (0.4, 0.75, 1.0))
    length_scale_km: float = 1200.0
    lmax: int = 19
    members: int = 64
    steps: int = 24
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    obs_count: int = 200
    sigma_obs_k: float = 1.0
    holdout_fraction: float = 0.2
    strategy: str = "random"
    cg_iters: int = 8
    regression_scale: float | None = None
    time: str = "2022-01-01T00:00"
    seed: int = 0

    def __post_init__(self):
        c = len(self.channels)
        if any(ch not in CBOTTLE_CENTER for ch in self.channels):
            raise ValueError(f"demo channels must be among {sorted(CBOTTLE_CENTER)}, got {list(self.channels)}")
        if len(self.offset_k) != c or len(self.std_k) != c or np.shape(self.channel_corr) != (c, c):
            raise ValueError("offset_k, std_k must have one entry per channel and channel_corr be (C, C)")
        if self.members < 2:
            raise ValueError(f"members must be >= 2 (spread needs two), got {self.members}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2, got {self.steps}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")

    @property
    def center(self) -> np.ndarray:
        return np.array([CBOTTLE_CENTER[c] for c in self.channels])

    @property
    def scale(self) -> np.ndarray:
        return np.array([CBOTTLE_SCALE[c] for c in self.channels])


# --------------------------------------------------------------------------------------
# prior, observations, exact posterior


def climatology_k(config: DemoConfig, lat_deg: np.ndarray) -> np.ndarray:
    """Climatological mean (C, npix) in K at latitudes ``lat_deg`` (npix,)."""
    base = config.equator_k - config.pole_drop_k * np.sin(np.deg2rad(lat_deg)) ** 2
    return base[None, :] - np.asarray(config.offset_k)[:, None]


def build_prior(config: DemoConfig) -> gaussian.GaussianPrior:
    """The Gaussian prior in normalised units, (C, 1, npix) net order.

    :func:`jaxguide.model.gaussian.harmonic_prior` with the normalised stds and the climatology
    of :func:`climatology_k`, normalised.
    """
    _, lat = healpix.lonlat(config.nside, "net")
    mu = units.normalise(climatology_k(config, lat), config.center, config.scale, axis=-2)
    return gaussian.harmonic_prior(config.nside, mu, np.asarray(config.std_k) / config.scale, config.channel_corr,
                                   config.length_scale_km, config.lmax)


def prior_sha256(prior: gaussian.GaussianPrior) -> str:
    """sha256 of the prior's parameters (float64 bytes of every leaf, in field order; the
    time factor only for T > 1, so a single-time prior keeps the hash it had before
    priors had frames)."""
    h = hashlib.sha256()
    for f in dataclasses.fields(prior):
        if f.name.startswith("time_") and prior.shape[1] == 1:
            continue
        h.update(np.ascontiguousarray(np.asarray(getattr(prior, f.name), np.float64)).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# ensembles


def model_of(config: DemoConfig, prior: gaussian.GaussianPrior) -> gaussian.GaussianModel:
    """The prior as a denoiser model (channels, K center/scale, grid)."""
    return gaussian.GaussianModel(prior, tuple(config.channels), config.center, config.scale, config.nside)


def regression_scale(config: DemoConfig, sigma_n) -> float:
    """The regression guidance scale: the configured one, else ``min(sigma_y)^2``
    (normalised units), cBottle's choice: at low noise (J ~ I) one call moves the
    state at an observation by the full residual (by ``(min sigma_y / sigma_y)^2`` of it
    for less accurate observations)."""
    if config.regression_scale is not None:
        return float(config.regression_scale)
    return float(np.min(np.asarray(sigma_n, np.float64))) ** 2


def sample_method(method: str, config: DemoConfig, prior: gaussian.GaussianPrior, key: jax.Array,
                  obs: guidance.Observations | None = None, scale: float | None = None,
                  programs: ensemble.EnsembleSampler | None = None, fn=None) -> np.ndarray:
    """(M, C, 1, npix) ensemble, normalised net order, float32, for one method.

    obs: the assimilated observations (normalised; unused for "prior"); scale: the
    regression scale. ``programs`` and ``fn`` (:func:`jaxguide.diffusion.guided.guided_denoiser`
    of :func:`model_of`): pass the same ones to every call to reuse compiled programs."""
    kwargs = dict(num_steps=config.steps, sigma_min=config.sigma_min, sigma_max=config.sigma_max)
    if method == "prior":
        m, obs = None, None
    elif method == "mmps":
        m = guidance.MMPS(cg_iters=int(config.cg_iters))
    elif method == "regression":
        m = guidance.Regression(scale=jnp.asarray(scale, jnp.float32))
    else:
        raise ValueError(f"unknown demo method {method!r}; expected one of {METHODS}")
    programs = programs if programs is not None else ensemble.EnsembleSampler()
    fn = fn if fn is not None else guided.guided_denoiser(model_of(config, prior))
    ens = programs(fn, key, prior.shape, config.members, sampler_kwargs=kwargs, operands=(prior, {}, m, obs),
                   devices=jax.devices()[:1])
    return np.asarray(ens)


# --------------------------------------------------------------------------------------
# verification


def at_observations(ens: np.ndarray, op: PointObservationOperator, center, scale) -> np.ndarray:
    """Ensemble (M, C, 1, npix) normalised -> (M, n_obs) physical at the observations,
    through the observation operator itself (bilinear, as the observations were made)."""
    vals = np.asarray(jax.vmap(op)(jnp.asarray(ens, jnp.float32)), np.float64)
    return units.unnormalise(vals, center, scale, channel=np.asarray(op.channel))


def observation_scores(ens_obs: np.ndarray, table: pd.DataFrame, seed: int) -> dict[str, dict]:
    """``metrics.summarize`` over all observations (``"all"``) and per variable (K)."""
    y = table["value"].to_numpy(np.float64)
    sig = table["sigma"].to_numpy(np.float64)
    var = table["variable"].to_numpy()
    out = {"all": metrics.summarize(ens_obs, y, obs_sigma=sig, seed=seed)}
    for v in pd.unique(var):
        m = var == v
        out[str(v)] = metrics.summarize(ens_obs[:, m], y[m], obs_sigma=sig[m], seed=seed)
    return out


def posterior_scores(ens: np.ndarray, post_mean: np.ndarray, post_std: np.ndarray, prior_std: np.ndarray,
                     channels: Sequence[str]) -> dict[str, dict]:
    """Ensemble vs the exact posterior, over all channels (``"all"``) and per channel.

    mean_error_prior_std / mean_error_post_std: RMS over pixels of (ensemble mean -
    posterior mean) / (prior | posterior) std; spread_ratio: mean over pixels of
    ensemble std / posterior std (1 = right spread). An exact sampler leaves only the
    Monte-Carlo error of the mean, RMS ~ posterior std / sqrt(M).
    """
    ens = np.asarray(ens, np.float64)
    m = ens.shape[0]
    d = ens.mean(0) - post_mean
    sd = ens.std(0, ddof=1)

    def scores(sl):
        return {
            "mean_error_prior_std": float(np.sqrt(np.mean((d[sl] / prior_std[sl]) ** 2))),
            "mean_error_post_std": float(np.sqrt(np.mean((d[sl] / post_std[sl]) ** 2))),
            "spread_ratio": float(np.mean(sd[sl] / post_std[sl])),
            "mc_floor_prior_std": float(np.sqrt(np.mean((post_std[sl] / prior_std[sl]) ** 2) / m)),
            "mc_floor_post_std": float(1.0 / np.sqrt(m)),
        }

    out = {"all": scores(slice(None))}
    for i, c in enumerate(channels):
        out[c] = scores(slice(i, i + 1))
    return out


def truth_scores(ens_k: np.ndarray, truth_k: np.ndarray, channels: Sequence[str], seed: int) -> dict[str, dict]:
    """``metrics.summarize`` of the whole field against the truth, per channel (K)."""
    return {c: metrics.summarize(ens_k[:, i].reshape(ens_k.shape[0], -1), truth_k[i].reshape(-1), seed=seed)
            for i, c in enumerate(channels)}


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows for a table: per method and set (``all`` and each channel):
    held-out / assimilated RMSE (K), held-out CRPS (K), held-out spread-skill (with the
    observation error), mean error vs the exact posterior (prior-std units) and spread
    ratio vs the exact posterior."""
    rows = []
    for method, r in summary["methods"].items():
        for s in ["all", *summary["config"]["channels"]]:
            ho, asm, ex = r["held_out"][s], r["assimilated"][s], r["exact_posterior"][s]
            rows.append({
                "method": method, "set": s, "rmse_held_out": ho["rmse"], "rmse_assimilated": asm["rmse"],
                "crps_held_out": ho["crps"], "spread_skill_held_out": ho["spread_skill_obs"],
                "mean_error_vs_exact": ex["mean_error_prior_std"], "spread_ratio_vs_exact": ex["spread_ratio"],
            })
    return rows


# --------------------------------------------------------------------------------------
# files


def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` (and parents) and check that files can be created in it.

    Raises NotADirectoryError (it exists as a file), PermissionError (not writable).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return check_writable_dir(out)


def file_provenance(config: DemoConfig, method: str, *, sigma_y, scale, n_obs: int, sha: str, command: str) -> dict:
    """The provenance attributes of a demo file (truth, prior or analysis of ``method``;
    the single-time and the window demo write the same keys)."""
    return {
        "method": method,
        "sigma_y": sigma_y,
        "guidance_scale": scale,
        "steps": config.steps,
        "seed": config.seed,
        "model_sha256": sha,
        "model": ("gaussian-prior: Gaussian random field on HEALPix (no network); model_sha256 is the sha256 of "
                  "its parameters (mean and eigendecompositions, float64)"),
        "n_obs": n_obs,
        "command": command,
        "observation_operator": "bilinear",
    }


def _dataset(ens: np.ndarray, config: DemoConfig, provenance: dict, title: str, prior=None):
    ds = schema.analysis_to_dataset(ens, channels=list(config.channels), center=config.center, scale=config.scale,
                                times=[config.time], provenance=provenance, prior=prior)
    ds.attrs["title"] = title
    return ds


def _plots(out: Path, config: DemoConfig, ens_mmps, prior_mean, truth, assim: pd.DataFrame,
           results: dict[str, dict], held: pd.DataFrame | None = None) -> list[Path]:
    """MMPS maps per channel (mean, increment vs the exact prior mean, spread;
    assimilated observations marked), truth maps, and held-out rank histograms per method.

    ens_mmps (M, C, 1, npix), prior_mean and truth (C, 1, npix): normalised, net order."""
    phys = lambda x: healpix.reorder(  # noqa: E731  (..., C, npix) normalised net -> K nest
        units.unnormalise(x, config.center, config.scale, axis=-2), "net", "nest")
    mm, pm, tt = phys(ens_mmps[:, :, 0]), phys(prior_mean[:, 0]), phys(truth[:, 0])
    paths = []
    for i, c in enumerate(config.channels):
        rows = assim["variable"] == c
        hrows = None if held is None else held["variable"] == c
        paths.append(plots.plot_maps(out / f"maps_mmps_{c}.png", mm[:, i], order="nest", prior=pm[i],
                                     obs_lon=assim.loc[rows, "lon"].to_numpy(), obs_lat=assim.loc[rows, "lat"].to_numpy(),
                                     held_out_lon=None if held is None else held.loc[hrows, "lon"].to_numpy(),
                                     held_out_lat=None if held is None else held.loc[hrows, "lat"].to_numpy(),
                                     name=f"{c} MMPS", units="K", valid_time=config.time))
        paths.append(plots.plot_maps(out / f"truth_{c}.png", tt[i], order="nest", name=f"{c} truth", units="K",
                                     figsize=(5.0, 4.0), valid_time=config.time))
    for method, r in results.items():
        paths.append(plots.plot_rank_histogram(out / f"rank_held_out_{method}.png", r["held_out"]["all"]["rank_histogram"],
                                               title=f"{method}: held-out observations (all channels)"))
    return paths


# --------------------------------------------------------------------------------------
# the demo


def stage_clock(stages: Sequence[str], progress: Progress | None, label: str):
    """``(stage, timings)``: call ``stage(i)`` as stage i starts (``stage(len(stages))`` at
    the end); it logs, reports ``progress(i, len(stages), stages[i])`` and records each
    finished stage's seconds in ``timings``."""
    timings: dict[str, float] = {}
    clock = [time.perf_counter(), None]

    def stage(i: int) -> None:
        now = time.perf_counter()
        if clock[1] is not None:
            timings[stages[clock[1]]] = now - clock[0]
        clock[:] = [now, i]
        logger.info("%s stage %d/%d: %s", label, i + 1, len(stages), stages[i] if i < len(stages) else "done")
        if progress is not None and i < len(stages):
            progress(i, len(stages), stages[i])

    return stage, timings


def run_demo(out_dir: str | os.PathLike, config: DemoConfig = DemoConfig(), *, progress: Progress | None = None,
             command: str = "jaxguide demo") -> dict[str, Any]:
    """Run the demo, write its files into ``out_dir`` (created; files are overwritten)
    and return the summary (also written to ``out_dir/summary.json``).

    progress: called as ``progress(index, len(STAGES), STAGES[index])`` when each stage
    starts. command: recorded in the files' provenance.
    """
    out = prepare_out_dir(out_dir)
    stage, timings = stage_clock(STAGES, progress, "demo")

    channels, center, scale = list(config.channels), config.center, config.scale
    key = jax.random.PRNGKey(config.seed)
    k_truth, k_ens = jax.random.split(key)

    stage(0)
    prior = build_prior(config)
    sha = prior_sha256(prior)

    stage(1)
    truth = np.asarray(prior.sample(k_truth, 1)[0], np.float64)  # (C, 1, npix) normalised
    assim, held = strategies.sample_observations(
        truth, channels, channels, time=config.time, strategy=config.strategy, count=config.obs_count,
        rng=np.random.default_rng(config.seed), sigma=config.sigma_obs_k, holdout_fraction=config.holdout_fraction,
        center=center, scale=scale)
    obs = prepare(assim, channels, center, scale, nside=config.nside).obs
    A, sigma_y = obs.A, obs.sigma_y
    A_held = prepare(held, channels, center, scale, nside=config.nside).obs.A

    stage(2)
    post_mean, post_std = gaussian.kalman_marginals(prior, A.dense(prior.shape), obs.y, sigma_y)
    prior_std = gaussian.pointwise_std(prior)

    # common random numbers: the three ensembles start from the same noise
    scale_reg = regression_scale(config, sigma_y)
    programs, fn = ensemble.EnsembleSampler(), guided.guided_denoiser(model_of(config, prior))
    run = functools.partial(sample_method, config=config, prior=prior, key=k_ens, programs=programs, fn=fn)
    ens = {}
    stage(3)
    ens["prior"] = run("prior")
    stage(4)
    ens["mmps"] = run("mmps", obs=obs)
    stage(5)
    ens["regression"] = run("regression", obs=obs, scale=scale_reg)

    stage(6)
    truth_k = units.unnormalise(truth[:, 0], center, scale, axis=-2)
    results: dict[str, dict] = {}
    for method, e in ens.items():
        if not np.all(np.isfinite(e)):
            raise FloatingPointError(f"the {method} ensemble has non-finite values")
        e_k = units.unnormalise(e[:, :, 0], center, scale, axis=-2)
        results[method] = {
            "held_out": observation_scores(at_observations(e, A_held, center, scale), held, config.seed),
            "assimilated": observation_scores(at_observations(e, A, center, scale), assim, config.seed),
            "exact_posterior": posterior_scores(e, post_mean, post_std, prior_std, channels),
            "truth": truth_scores(e_k, truth_k, channels, config.seed),
        }
    results["mmps"]["options"] = {"cg_iters": int(config.cg_iters)}
    results["regression"]["options"] = {"scale": scale_reg, "scale_rule": (
        "configured" if config.regression_scale is not None else "min(sigma_y)^2, normalised units (cBottle's choice)")}
    exact = {
        "held_out_rmse_of_mean": metrics.rmse(at_observations(post_mean[None], A_held, center, scale),
                                              held["value"].to_numpy()),
        "assimilated_rmse_of_mean": metrics.rmse(at_observations(post_mean[None], A, center, scale),
                                                 assim["value"].to_numpy()),
        "mean_post_std_over_prior_std": float(np.mean(post_std / prior_std)),
    }

    stage(7)
    files = {
        "truth": out / "truth.nc", "obs": out / "obs.csv", "held_out": out / "held_out.csv",
        "prior": out / "prior_ensemble.nc", "mmps": out / "analysis_mmps.nc",
        "regression": out / "analysis_regression.nc", "summary": out / "summary.json",
    }
    write_observations(assim, files["obs"])
    write_observations(held, files["held_out"])
    prov = functools.partial(file_provenance, config, n_obs=len(assim), sha=sha, command=command)
    sig_k = config.sigma_obs_k
    writes = {
        "truth": (truth[None], prov("truth (one draw from the prior)", sigma_y="none (no observations used)", scale=None),
                  "jaxguide demo truth: one draw from the Gaussian random-field prior", None),
        "prior": (ens["prior"], prov("none (unguided prior ensemble)", sigma_y="none (no observations used)", scale=None),
                  "jaxguide demo prior ensemble (Gaussian random-field prior, not cBottle)", None),
        "mmps": (ens["mmps"], prov(f"mmps (cg_iters={config.cg_iters})", sigma_y=sig_k, scale=1.0),
                 "jaxguide demo analysis, MMPS (Gaussian random-field prior, not cBottle)", ens["prior"]),
        "regression": (ens["regression"], prov("regression", sigma_y=sig_k, scale=scale_reg),
                       "jaxguide demo analysis, regression guidance (Gaussian random-field prior, not cBottle)",
                       ens["prior"]),
    }
    for name, (e, p, title, pr) in writes.items():
        write_dataset(_dataset(e, config, p, title, prior=pr), files[name], overwrite=True)
    pngs = _plots(out, config, ens["mmps"], np.asarray(prior.mu), truth, assim, results, held)

    summary = {
        "config": dataclasses.asdict(config),
        "center_k": center.tolist(),
        "scale_k": scale.tolist(),
        "model_sha256": sha,
        "n_obs": {"assimilated": len(assim), "held_out": len(held)},
        "methods": results,
        "exact_posterior": exact,
        "files": {k: str(v) for k, v in files.items()} | {"plots": [str(p) for p in pngs]},
    }
    stage(len(STAGES))
    summary["timing_s"] = timings
    write_json_atomic(files["summary"], summary)
    return summary
