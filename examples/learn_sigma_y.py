"""Learn the observation error and the guidance scale by gradient through the sampler.

Why: the assumed observation-error std ``sigma_y`` and the guidance scale are the two
knobs every score-based assimilation has to set, and they are usually guessed. Because
the whole guided sampler is a differentiable JAX program, they can instead be fitted:
sample a small guided ensemble with a FIXED key, score it on held-out observations
with a proper score (CRPS), and follow the gradient of that score through every
sampler step and every CG iteration of MMPS.

Problem: the exact Gaussian random-field prior of :mod:`jaxguide.model.gaussian` (HEALPix
nside 8, 3 correlated channels, unit-ish variance, 2000 km correlation length; the
exact denoiser plays the network, so each step is cheap). A truth is drawn from the
prior and observed at random points with noise of std ``--true-sigma`` (prior units).
The observations are split three ways:

* assimilated: enter MMPS guidance with the ASSUMED error std ``sigma_y``;
* validation: the training loss is their mean CRPS;
* test: only for the report (never seen by the optimiser).

The network is dense on purpose (300 of the 2304 state values assimilated, pixels
~800 km apart against a 2000 km correlation length): a held-out observation only
carries information about sigma_y when the assimilated ones constrain the state at its
location. With a sparse network (40/40/40 tried first) the held-out points sit where
the posterior is ~ the prior, the loss is flat in sigma_y (within the ensemble's
sampling noise) and the optimiser drifted AWAY from the truth (sigma_y -> 0, with the
scale dropping to ~0.4 to compensate); see examples/README.md.

Predictive distribution of a held-out observation: member value plus observation noise,
``z_i = A x_i + sigma_y eps_i`` (the same error model as the assimilated stations, with
fixed draws eps_i). The loss is the fair ensemble CRPS of z,
``mean_i |z_i - y| - sum_ij |z_i - z_j| / (2 M (M - 1))``, a.e. differentiable.

Parameters: ``log sigma_y`` (starts ``--init-factor`` times the true noise) and
``log scale`` (guidance scale, starts at ``--init-scale``; 1 is exact for MMPS with a
Gaussian prior). Optimiser: optax Adam, the whole step under ``jax.jit``. Before and
after, the CRPS is evaluated with a FRESH key and a larger ensemble; the exact Kalman
posterior with the true noise gives the best achievable CRPS for reference.

Run::

    python examples/learn_sigma_y.py --steps 60 --members 16
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxguide.model import gaussian

from jaxguide.diffusion import guidance, sampler

from jaxguide.verification import metrics

SIGMA_MIN, SIGMA_MAX = 0.01, 80.0  # prior std <= 1: sigma_max = 80 starts from ~pure noise


# --------------------------------------------------------------------------------------
# problem


def make_problem(nside: int, n_obs: tuple[int, int, int], true_sigma: float, seed: int) -> dict[str, Any]:
    """Prior, truth (3, 1, npix), and the three observation sets (operators, y, dense H).

    ``n_obs = (assimilated, validation, test)``; points are distinct (channel, pixel)
    pairs drawn at random; y = truth at the point + N(0, true_sigma^2).
    """
    prior = gaussian.make_prior(
        nside, [0.0, 0.0, 0.0], [1.0, 0.7, 0.5],
        [[1.0, 0.6, 0.3], [0.6, 1.0, 0.5], [0.3, 0.5, 1.0]], 2000.0, max_modes=128)
    C, _, npix = prior.shape
    rng = np.random.default_rng(seed)
    flat = rng.choice(C * npix, size=sum(n_obs), replace=False)
    ch, px = flat // npix, flat % npix
    truth = np.asarray(prior.sample(jax.random.PRNGKey(seed), 1)[0])
    y_all = truth[ch, 0, px] + true_sigma * rng.standard_normal(flat.size)
    sets = {}
    start = 0
    for name, n in zip(("assim", "val", "test"), n_obs):
        sl = slice(start, start + n)
        A, H = gaussian.point_observations(prior.shape, ch[sl], px[sl])
        sets[name] = {"A": A, "H": H, "y": jnp.asarray(y_all[sl])}
        start += n
    return {"prior": prior, "truth": truth, "sets": sets, "true_sigma": float(true_sigma)}


# --------------------------------------------------------------------------------------
# differentiable guided ensemble and score


def guided_ensemble(theta: dict[str, jax.Array], prob: dict[str, Any], key: jax.Array, members: int,
                    num_steps: int, cg_iters: int) -> jax.Array:
    """(members, 3, 1, npix) MMPS-guided samples given the assimilated observations.

    theta: {"log_sigma_y": (), "log_scale": ()}; differentiable in both.
    """
    prior, obs = prob["prior"], prob["sets"]["assim"]
    method = guidance.MMPS(cg_iters=cg_iters, scale=jnp.exp(theta["log_scale"]))
    den = method(prior.denoiser, guidance.Observations(obs["A"], obs["y"], jnp.exp(theta["log_sigma_y"])))
    keys = jax.random.split(key, members)
    return jax.vmap(lambda k: sampler.sample(den, k, prior.shape, num_steps=num_steps,
                                             sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX))(keys)


def predictive(ens: jax.Array, A, sigma_y: jax.Array, key: jax.Array) -> jax.Array:
    """Predictive draws (M, n) of the observations: member value + N(0, sigma_y^2)."""
    at_obs = jax.vmap(A)(ens)
    return at_obs + sigma_y * jax.random.normal(key, at_obs.shape, at_obs.dtype)


def crps_fair(z: jax.Array, y: jax.Array) -> jax.Array:
    """Mean over observations of the fair ensemble CRPS; z (M, n), y (n,). Differentiable."""
    m = z.shape[0]
    skill = jnp.mean(jnp.abs(z - y[None]), axis=0)
    pair = jnp.sum(jnp.abs(z[:, None] - z[None, :]), axis=(0, 1)) / (2.0 * m * (m - 1))
    return jnp.mean(skill - pair)


def heldout_crps(theta, prob, key, members, num_steps, cg_iters, split: str) -> jax.Array:
    """CRPS of the predictive distribution at the ``split`` observations (prior units)."""
    k_ens, k_noise = jax.random.split(key)
    ens = guided_ensemble(theta, prob, k_ens, members, num_steps, cg_iters)
    obs = prob["sets"][split]
    return crps_fair(predictive(ens, obs["A"], jnp.exp(theta["log_sigma_y"]), k_noise), obs["y"])


def oracle_crps(prob: dict[str, Any], split: str, members: int, seed: int) -> float:
    """CRPS of the exact Kalman posterior predictive (true sigma_y): the attainable floor."""
    prior, s = prob["prior"], prob["true_sigma"]
    H_a, y_a = prob["sets"]["assim"]["H"], np.asarray(prob["sets"]["assim"]["y"], np.float64)
    mean, cov = prior.posterior(H_a, y_a, s)
    H = prob["sets"][split]["H"]
    m, c = H @ mean.reshape(-1), H @ cov @ H.T + s**2 * np.eye(H.shape[0])
    z = np.random.default_rng(seed).multivariate_normal(m, c, size=members)
    return float(np.mean(metrics.crps_ensemble(z, np.asarray(prob["sets"][split]["y"]))))


# --------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimisation steps (Adam)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (log-parameters)")
    p.add_argument("--members", type=int, default=16, help="training ensemble size (fixed key)")
    p.add_argument("--eval-members", type=int, default=64, help="evaluation ensemble size (fresh key)")
    p.add_argument("--sampler-steps", type=int, default=8, help="EDM (Heun) steps")
    p.add_argument("--cg-iters", type=int, default=16, help="MMPS CG iterations")
    p.add_argument("--nside", type=int, default=8)
    p.add_argument("--n-obs", type=int, nargs=3, default=(300, 100, 100), metavar=("ASSIM", "VAL", "TEST"))
    p.add_argument("--true-sigma", type=float, default=0.3, help="true observation-error std (prior units)")
    p.add_argument("--init-factor", type=float, default=0.2, help="initial sigma_y / true sigma")
    p.add_argument("--init-scale", type=float, default=1.0, help="initial guidance scale")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment; returns losses, parameters and CRPS before/after.

    Runs in float64: the gradient goes through every sampler step and CG iteration,
    and the problem is small enough that double precision costs little.
    """
    args = parse_args(argv)
    with jax.enable_x64(True):
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """The experiment (called under float64)."""
    prob = make_problem(args.nside, tuple(args.n_obs), args.true_sigma, args.seed)
    theta = {"log_sigma_y": jnp.asarray(np.log(args.init_factor * args.true_sigma)),
             "log_scale": jnp.asarray(np.log(args.init_scale))}
    k_train, k_eval = jax.random.split(jax.random.PRNGKey(args.seed + 1))
    static = dict(num_steps=args.sampler_steps, cg_iters=args.cg_iters)

    @jax.jit
    def evaluate(th, key):
        return {split: heldout_crps(th, prob, key, args.eval_members, split=split, **static)
                for split in ("val", "test")}

    def loss_fn(th):
        return heldout_crps(th, prob, k_train, args.members, split="val", **static)

    opt = optax.adam(args.lr)

    @jax.jit
    def step(th, state):
        loss, grads = jax.value_and_grad(loss_fn)(th)
        updates, state = opt.update(grads, state, th)
        return optax.apply_updates(th, updates), state, loss

    before = {k: float(v) for k, v in evaluate(theta, k_eval).items()}
    state = opt.init(theta)
    losses, sigmas, scales = [], [], []
    t0 = time.perf_counter()
    for i in range(args.steps):
        sigmas.append(float(jnp.exp(theta["log_sigma_y"])))
        scales.append(float(jnp.exp(theta["log_scale"])))
        theta, state, loss = step(theta, state)
        losses.append(float(loss))
        print(f"step {i:3d}  loss (val CRPS, train key) {losses[-1]:.4f}  sigma_y {sigmas[-1]:.4f}  "
              f"scale {scales[-1]:.3f}", flush=True)
    train_s = time.perf_counter() - t0
    after = {k: float(v) for k, v in evaluate(theta, k_eval).items()}
    sigma_final, scale_final = float(jnp.exp(theta["log_sigma_y"])), float(jnp.exp(theta["log_scale"]))
    oracle = {split: oracle_crps(prob, split, args.eval_members, args.seed) for split in ("val", "test")}
    # the training loss at the final parameters (the loop's losses are before each update)
    final_loss = float(jax.jit(loss_fn)(theta))

    print(f"sigma_y: true {args.true_sigma:.4f}, start {sigmas[0]:.4f}, learned {sigma_final:.4f}; "
          f"scale: start {scales[0]:.3f}, learned {scale_final:.3f}")
    print(f"loss {losses[0]:.4f} -> {final_loss:.4f} ({args.steps} steps, {train_s:.1f}s incl. compile)")
    for split in ("val", "test"):
        print(f"{split} CRPS (fresh key, {args.eval_members} members): before {before[split]:.4f}, "
              f"after {after[split]:.4f}; exact posterior {oracle[split]:.4f}")
    return {"losses": losses, "final_loss": final_loss, "sigma_y": sigmas + [sigma_final],
            "scale": scales + [scale_final], "true_sigma": args.true_sigma,
            "crps_before": before, "crps_after": after, "crps_oracle": oracle, "train_s": train_s}


if __name__ == "__main__":
    main()
