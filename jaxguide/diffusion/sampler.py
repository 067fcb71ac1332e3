"""EDM sampler (Karras et al. 2022) as cBottle's ``edm_sampler_from_sigma`` runs it.

The sampler only sees a denoiser ``D(x, sigma) -> x0_hat``; guidance enters through the
denoiser it is given (see :mod:`jaxguide.diffusion.guidance`). The whole trajectory is one
``lax.scan`` whose body is a single program (no Python branching on traced values), so
``jax.jit(lambda ...: sample(...))`` compiles once per configuration, and the sampler
works under ``jax.vmap`` (ensemble members) and ``jax.grad``.

Facts taken from cBottle (checked against ``sampler_toy.npz``):

* schedule ``sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``,
  ``i = 0..N-1``, computed in float64, then a trailing 0 (``round_sigma`` = identity);
* churn ``gamma = min(S_churn/N, sqrt(2)-1)`` when ``S_min <= t_cur <= S_max`` else 0,
  ``t_hat = t_cur + gamma t_cur``, ``x_hat = x_cur + sqrt(t_hat^2 - t_cur^2) S_noise eps``;
* Euler step ``x_next = x_hat + (t_next - t_hat) (x_hat - D(x_hat, t_hat)) / t_hat``;
  Heun adds the trapezoidal correction on every step but the last (whose ``t_next = 0``);
* ``reverse=True`` (encoding, data -> noise): the N sigmas are flipped (no trailing 0),
  N-1 steps, all with the Heun correction; the initial state is the data itself.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Denoiser = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]

SOLVERS = ("heun", "euler")


def sigma_schedule(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """The N noise levels of the EDM schedule (float64, decreasing, no trailing 0).

    Matches cBottle's ``edm_sampler_from_sigma`` bit for bit (same float64 formula).
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    i = np.arange(num_steps, dtype=np.float64)
    smax = float(sigma_max) ** (1.0 / rho)
    smin = float(sigma_min) ** (1.0 / rho)
    return (smax + i / (num_steps - 1) * (smin - smax)) ** rho


def _step_plan(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, reverse):
    """Static per-step arrays (float64 NumPy): t_cur, t_hat, t_next, heun flag."""
    sig = sigma_schedule(num_steps, sigma_min, sigma_max, rho)
    t = sig[::-1].copy() if reverse else np.concatenate([sig, [0.0]])
    t_cur, t_next = t[:-1], t[1:]
    g = min(S_churn / num_steps, np.sqrt(2.0) - 1.0)
    gamma = np.where((S_min <= t_cur) & (t_cur <= S_max), g, 0.0)
    t_hat = t_cur + gamma * t_cur
    # cBottle: correction if i < num_steps - 1 (never false in reverse, N-1 steps)
    heun = np.arange(len(t_cur)) < num_steps - 1
    return t_cur, t_hat, t_next, heun


def sample(
    denoiser: Denoiser,
    key: jax.Array | None,
    shape: tuple[int, ...] | None,
    *,
    num_steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    solver: str = "heun",
    reverse: bool = False,
    latents: jnp.ndarray | None = None,
    noise: jnp.ndarray | None = None,
    return_trajectory: bool = False,
    dtype=None,
    stop_above: float | None = None,
):
    """Run the EDM sampler; returns ``x_0`` of ``shape`` (and the trajectory if asked).

    Args:
      denoiser: ``(x, sigma) -> x0_hat``, x of ``shape``, sigma a scalar of the state dtype.
      key: PRNG key for the initial noise (when ``latents`` is None) and churn draws.
      shape: state shape; may be None when ``latents`` is given.
      latents: forward: unit-variance noise, the initial state is ``latents * sigma_max``
        (product in the latents' dtype, as cBottle); reverse: the data itself.
      noise: recorded standard-normal draws, shape ``(n_steps, *shape)`` with
        ``n_steps = num_steps`` (forward) or ``num_steps - 1`` (reverse), used instead of
        the key (replays a PyTorch trajectory draw for draw).
      return_trajectory: also return the state at the start of every step,
        ``(n_steps, *shape)``.
      dtype: state dtype; default the latents' dtype, else JAX's default float.
      stop_above: stop a diverging run: checked from the first denoiser call on, at the
        first call whose estimate exceeds ``stop_above`` in absolute value (state units),
        or whose new state is non-finite or beyond ``stop_above + 10 t`` at its noise
        level ``t``, the remaining calls are skipped and the result is NaN. The loop is then a
        ``lax.while_loop`` (forward-differentiable only; no ``return_trajectory``);
        under ``vmap`` it ends when every member has stopped or finished.

    Cost: ``2 num_steps - 1`` denoiser calls (Heun, forward), ``num_steps`` for Euler,
    ``2 (num_steps - 1)`` for reverse Heun.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    if latents is None and shape is None:
        raise ValueError("give `shape` or `latents`")
    if latents is not None:
        latents = jnp.asarray(latents)
        shape = tuple(latents.shape) if shape is None else tuple(shape)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents shape {latents.shape} != shape {shape}")
        if dtype is None:
            dtype = latents.dtype
    shape = tuple(shape)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be floating, got {dtype}")

    t_cur, t_hat, t_next, heun = _step_plan(
        num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, reverse
    )
    n_steps = len(t_cur)
    churn_coef = np.sqrt(t_hat**2 - t_cur**2) * S_noise  # float64, static
    use_noise = bool(np.any(churn_coef != 0.0))
    use_heun = solver == "heun"

    if key is None and (latents is None or (use_noise and noise is None)):
        raise ValueError("a PRNG `key` is needed (no latents, or churn without `noise`)")
    if key is not None:
        k_init, k_steps = jax.random.split(key)

    # Initial state.
    if reverse:
        if latents is None:
            raise ValueError("reverse=True needs `latents` (the data to encode)")
        x0 = latents.astype(dtype)
    elif latents is not None:
        x0 = (latents * jnp.asarray(sigma_max, latents.dtype)).astype(dtype)
    else:
        x0 = jax.random.normal(k_init, shape, dtype) * jnp.asarray(sigma_max, dtype)

    if noise is not None:
        noise = jnp.asarray(noise)
        if noise.shape != (n_steps, *shape):
            raise ValueError(f"noise shape {noise.shape} != {(n_steps, *shape)}")
        draws = noise.astype(dtype)
        step_keys = None
    else:
        draws = None
        step_keys = jax.random.split(k_steps, n_steps) if use_noise else None

    # One scan over the 2N-1 (Heun) denoiser evaluations: each step is a predictor
    # evaluation at (x_hat, t_hat), followed by a corrector evaluation at
    # (x_euler, t_next) unless t_next is 0 (the forward sampler's last step) or the
    # solver is Euler. The body calls the denoiser once, so the compiled program holds
    # one copy of it and no evaluation is wasted.
    corr = heun if use_heun else np.zeros_like(heun)
    step_of = np.repeat(np.arange(n_steps), np.where(corr, 2, 1))  # evaluation -> step
    predictor = np.ones(step_of.size, bool)
    predictor[1:] = step_of[1:] != step_of[:-1]
    as_dt = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    xs = {
        "predictor": jnp.asarray(predictor),
        "t_eval": as_dt(np.where(predictor, t_hat[step_of], t_next[step_of])),
        "t_hat": as_dt(t_hat[step_of]),
        "t_next": as_dt(t_next[step_of]),
        "coef": as_dt(churn_coef[step_of]),
    }
    if draws is not None:
        xs["eps"] = draws[step_of]
    elif step_keys is not None:
        xs["key"] = step_keys[step_of]

    def evaluate(carry, s):
        """One denoiser evaluation: the new carry and the denoised estimate."""
        x_cur, x_hat_prev, d_prev = carry  # x_cur: the state, or x_euler before a corrector
        if use_noise:
            eps = s["eps"] if "eps" in s else jax.random.normal(s["key"], shape, dtype)
            x_hat_new = x_cur + s["coef"] * eps
        else:
            x_hat_new = x_cur
        pred = s["predictor"]
        x_hat = jnp.where(pred, x_hat_new, x_hat_prev)
        x_eval = jnp.where(pred, x_hat_new, x_cur)
        te = s["t_eval"]
        denoised = denoiser(x_eval, te).astype(dtype)
        d = (x_eval - denoised) / te
        dt = s["t_next"] - s["t_hat"]
        x_euler = x_hat + dt * d
        x_heun = x_hat + dt * (0.5 * d_prev + 0.5 * d)
        return (jnp.where(pred, x_euler, x_heun), x_hat, d), denoised

    init = (x0, x0, jnp.zeros_like(x0))
    if stop_above is None:
        def body(carry, s):
            new, _ = evaluate(carry, s)
            return new, (carry[0] if return_trajectory else None)

        (x, _, _), traj = jax.lax.scan(body, init, xs)
        if return_trajectory:
            return x, traj[np.flatnonzero(predictor)]
        return x
    if return_trajectory:
        raise ValueError("stop_above runs a while loop: it cannot return the trajectory")
    n_eval = int(step_of.size)

    def running(state):
        i, _, stopped = state
        return (i < n_eval) & ~stopped

    def step(state):
        i, carry, _ = state
        s = jax.tree.map(lambda a: a[i], xs)
        new, denoised = evaluate(carry, s)
        # the estimate beyond the bound, or the new state (noise level t_next) beyond bound + 10 t_next
        diverged = (~jnp.all(jnp.isfinite(new[0])) | (jnp.max(jnp.abs(denoised)) > stop_above)
                    | (jnp.max(jnp.abs(new[0])) > stop_above + 10.0 * s["t_next"]))
        return i + 1, new, diverged

    _, (x, _, _), stopped = jax.lax.while_loop(running, step, (jnp.int32(0), init, jnp.bool_(False)))
    return jnp.where(stopped, jnp.asarray(jnp.nan, dtype), x)
