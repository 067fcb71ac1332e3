"""Jit-compiled ensemble assimilation of point observations with a converted cBottle model.

Why: an operational cycle assimilates a new batch of observations every few hours with
the same model. Compiling the guided sampler costs far more than running it at small
sizes, so the ensemble program must be compiled ONCE and re-run on new data. This
example builds the guided denoiser once as a function of its data
(:func:`jaxguide.diffusion.guided.guided_denoiser`: network parameters, conditioning, the guidance
method, the observations): those are traced ``operands`` of one
:class:`jaxguide.diffusion.ensemble.EnsembleSampler`, so a second analysis with a different set of
observations reuses the compiled program. It shows that by counting XLA compilations
(``jax.monitoring``) and timing the first call against the second.

Steps:
  1. load the converted model (``--model DIR``), build the conditioning for ``--time``:
     calendar inputs, and the SST condition from an AMIP file (``--sst FILE``) or, when
     none is given, a synthetic zonal SST profile (see :func:`synthetic_sst_k`);
  2. sample the unguided prior ensemble; one extra unguided sample (other key, same
     compiled program) is the "truth";
  3. draw ERA5-style point observations of T850/T500/T300 from the truth (radiosonde-like
     error ``--obs-sigma`` K) through the observation-table API
     (:func:`jaxguide.observations.strategies.sample_observations`, :func:`jaxguide.observations.prepare.prepare`);
  4. run the guided ensemble (MMPS by default), then again with a NEW observation network
     (other stations, other noise): no recompilation;
  5. print the observation-space RMSE (K) of the prior and of the analysis ensemble mean,
     at the assimilated and at held-out stations.

Run::

    python examples/jit_ensemble.py --model DIR --members 4 --steps 8 --n-obs 64

With the test fixture's random-weight model (``tiny.checkpoint``) use ``--solver euler``:
its "denoiser" is not a denoiser, and with few Heun steps the correction at sigma ~ 0.02
amplifies its output error (3 Heun steps: prior samples ~3.5 normalised std, 38 K
observation RMSE, and the guided run diverged); Euler steps stay bounded. CI runs
``--members 2 --steps 3 --solver euler --cg-iters 1 --obs-sigma 0.1``: with an
observation error far below the prior's spread at the stations, working guidance must
pull the analysis toward the observations, which the test checks.

Units: states are in the network's normalised units (per channel ``(value - center) /
scale``), network pixel order; RMSE and observation errors are reported in K.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import jaxguide
from jaxguide.model import calendar, sst, units
from jaxguide.diffusion import ensemble, guidance, guided
from jaxguide.grid import healpix
from jaxguide import observations
from jaxguide.observations import strategies
from jaxguide.model.denoiser import CBottleDenoiser
from jaxguide.model.checkpoint import CBottleModel

SIGMA_MIN, SIGMA_MAX = 0.02, 200.0  # cBottle's CBottle3d sampler settings
OBS_VARIABLES = ("T850", "T500", "T300")
# Tweedie-weighted methods (scale 1 is meaningful); regression needs a tuned scale
METHODS = ("mmps", "sda", "dps", "pigdm")


# --------------------------------------------------------------------------------------
# conditioning


def synthetic_sst_k(nside: int = 64) -> np.ndarray:
    """A plausible SST (npix,) in K, network order: a zonal profile, no land.

    ``271.35 K + 29.5 K cos^2(lat)``: -1.8 C (sea-ice freezing point) at the poles, about
    28 C at the equator, the shape of the observed zonal-mean SST. Used when no AMIP SST
    file is given; the example only needs a condition in cBottle's encoding, not a real
    ocean (the fixtures' model has random weights anyway).
    """
    _, lat = healpix.lonlat(nside, "net")
    return 271.35 + 29.5 * np.cos(np.deg2rad(lat)) ** 2


def build_conditioning(when: pd.Timestamp, sst_path: str | None, nside: int = 64) -> dict[str, np.ndarray]:
    """Condition (1, 1, 1, npix) encoded SST, second_of_day and day_of_year (1, 1) float32."""
    sod, doy = calendar.calendar_inputs([when])
    if sst_path is None:
        cond = sst.encode_sst(synthetic_sst_k(nside))[None, None, None, :]
    else:
        cond = sst.sst_at(sst.read_amip_sst(sst_path), when, nside)
    return {"condition": np.asarray(cond, np.float32), "second_of_day": sod, "day_of_year": doy}


# --------------------------------------------------------------------------------------
# the guided denoiser, written as a function of its data (operands)


def make_method(method: str, cg_iters: int) -> guidance.Method:
    """The guidance method object (its array hyperparameters are traced operands)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return guidance.make(method, **({"cg_iters": int(cg_iters)} if method == "mmps" else {}))


# --------------------------------------------------------------------------------------
# observations


def synthesise_observations(
    truth: np.ndarray, model: CBottleModel, when: pd.Timestamp, n_stations: int, obs_sigma_k: float,
    seed: int, holdout_fraction: float = 0.25,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Radiosonde-like T850/T500/T300 observations of ``truth`` (C, 1, npix) normalised.

    ``n_stations`` random locations, each observing the three levels, error
    ``obs_sigma_k`` K; a quarter of the stations is held out. Tables in physical units.
    """
    bi = model.batch_info
    return strategies.sample_observations(
        np.asarray(truth), model.channels, OBS_VARIABLES, time=when, strategy="random",
        count=n_stations, rng=seed, sigma=obs_sigma_k, holdout_fraction=holdout_fraction,
        center=bi.center, scale=bi.scales)


def obs_rmse_k(members: jax.Array, table: pd.DataFrame, model: CBottleModel) -> float:
    """RMSE (K) of the ensemble mean of ``members`` (M, C, 1, npix) at the table's rows."""
    bi = model.batch_info
    obs = observations.prepare(table, model.channels, bi.center, bi.scales).obs
    at_obs = np.asarray(jax.vmap(obs.A)(jnp.asarray(members)), np.float64).mean(axis=0)  # (n,)
    err_k = units.unnormalise(at_obs - np.asarray(obs.y, np.float64), 0.0, bi.scales, channel=np.asarray(obs.A.channel))
    return float(np.sqrt(np.mean(err_k**2)))


# --------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="converted model directory (jaxguide.model.convert.convert_checkpoints)")
    p.add_argument("--members", type=int, default=4, help="ensemble size")
    p.add_argument("--steps", type=int, default=8, help="EDM sampler steps (Heun)")
    p.add_argument("--solver", default="heun", choices=("heun", "euler"),
                   help="EDM solver; euler: one network call per step (see README for the random-weight test model)")
    p.add_argument("--method", default="mmps", choices=METHODS, help="guidance method")
    p.add_argument("--cg-iters", type=int, default=3, help="MMPS conjugate-gradient iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-obs", type=int, default=64,
                   help="number of stations; each observes T850, T500, T300 (3 values)")
    p.add_argument("--obs-sigma", type=float, default=1.0, help="observation error std (K)")
    p.add_argument("--time", default="2020-01-15T12:00", help="analysis time (UTC)")
    p.add_argument("--sst", default=None, help="AMIP SST file (tosbcs); default: synthetic zonal SST")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the key numbers (times in s, RMSEs in K)."""
    args = parse_args(argv)
    model = jaxguide.load_model(args.model)
    bi = model.batch_info
    when = pd.Timestamp(args.time)
    cond = build_conditioning(when, args.sst)
    member_shape = (len(model.channels), 1, int(cond["condition"].shape[-1]))
    sampler_kwargs = {"num_steps": args.steps, "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX,
                      "solver": args.solver}
    # built ONCE: the denoiser function and the sampler that owns the compiled programs
    fn = guided.guided_denoiser(CBottleDenoiser(model, label="era5"))
    programs = ensemble.EnsembleSampler()
    method = make_method(args.method, args.cg_iters)

    def run(method, obs, key) -> tuple[jax.Array, float, int]:
        """One ensemble; returns (members, wall s, backend compiles during the call)."""
        t0 = time.perf_counter()
        with ensemble.count_compiles() as compiles:
            out = programs(fn, key, member_shape, args.members, sampler_kwargs=sampler_kwargs,
                           operands=(model.params, cond, method, obs))
            out = jax.block_until_ready(out)
        return out, time.perf_counter() - t0, len(compiles)

    key_truth, key_prior, key_a, key_b = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    # prior program (method None): compiled once, run for the truth and for the prior ensemble
    truth_ens, t_prior_first, _ = run(None, None, key_truth)
    prior, t_prior_second, _ = run(None, None, key_prior)
    truth = np.asarray(truth_ens[0])
    print(f"prior ensemble ({args.members} members, {args.steps} steps): "
          f"first call {t_prior_first:.1f}s (compile + run), second {t_prior_second:.1f}s")

    results: list[dict[str, Any]] = []
    for i, key in enumerate((key_a, key_b)):
        assim, held = synthesise_observations(truth, model, when, args.n_obs, args.obs_sigma, args.seed + 1 + i)
        prepared = observations.prepare(assim, model.channels, bi.center, bi.scales, pad_to="bucket")
        analysis, wall, n_comp = run(method, prepared.obs, key)
        res = {
            "wall_s": wall, "n_compiles": n_comp, "n_assimilated": prepared.n_obs, "n_heldout": len(held),
            "finite": bool(np.all(np.isfinite(np.asarray(analysis)))),
            "shape": tuple(analysis.shape),
            "prior_rmse_k": obs_rmse_k(prior, assim, model),
            "analysis_rmse_k": obs_rmse_k(analysis, assim, model),
            "prior_heldout_rmse_k": obs_rmse_k(prior, held, model),
            "analysis_heldout_rmse_k": obs_rmse_k(analysis, held, model),
        }
        results.append(res)
        print(f"analysis {i + 1} ({args.method}, {res['n_assimilated']} obs): {wall:.1f}s, "
              f"{n_comp} XLA compiles; obs RMSE prior {res['prior_rmse_k']:.2f} K -> analysis "
              f"{res['analysis_rmse_k']:.2f} K; held-out {res['prior_heldout_rmse_k']:.2f} K -> "
              f"{res['analysis_heldout_rmse_k']:.2f} K")
    first, second = results
    print(f"second analysis reused the compiled program: {second['n_compiles'] == 0} "
          f"({first['wall_s']:.1f}s -> {second['wall_s']:.1f}s)")
    return {"method": args.method, "members": args.members, "steps": args.steps,
            "prior_first_s": t_prior_first, "prior_second_s": t_prior_second,
            "first": first, "second": second}


if __name__ == "__main__":
    main()
