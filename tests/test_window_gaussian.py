"""The exact test in 4D: a space-time Gaussian prior on HEALPix x frames.

Prior (nside 4, channels T850/T500 with their own center/scale in K, T = 4 frames 6 h
apart): ``Sigma = (S R S) kron K_time kron K_space``, K_time = exp(-|lag| / 24 h) (AR(1),
lag-one correlation 0.78), K_space squared-exponential 3000 km. Its exact denoiser,
its dense covariance and its Kalman posterior are checked against independent float64
references (a dense Sigma built from the kernels directly, the forward Kalman filter +
RTS smoother over frames); then MMPS ensembles (the prior as a
:class:`~jaxguide.model.gaussian.GaussianModel` through :func:`jaxguide.diffusion.guided.guided_denoiser`
and :class:`~jaxguide.diffusion.ensemble.EnsembleSampler`) with observations from an observation
TABLE, times on and between frames, put through ``observations.prepare(window=...)``,
are checked against the exact posterior (computed with an H built here from the
bilinear stencil and linear time weights, not from the operator under test). The two
ensemble tests are marked slow (~20-40 s each on 2 cores); the exact window demo test in
tests/test_demo_window.py runs the same comparison fast on a smaller ensemble.

Measures (all in prior-std units, over every (channel, frame, pixel) of the state):
mean error = RMS of (ensemble mean - posterior mean) / prior std; spread ratio = mean of
ensemble std / posterior std; per-frame move = RMS over (channel, pixel) of (mean -
prior mean) / prior std in one frame.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from jaxguide.diffusion import ensemble, guidance, guided

from jaxguide.model import gaussian

from jaxguide.grid import latlon as grid_sampling

from jaxguide import observations
from jaxguide.model.conditioning import KnownFrames
from jaxguide.model.window import FrameWindow

NSIDE = 4
NPIX = 12 * NSIDE**2
CHANNELS = ("T850", "T500")
CENTER = np.array([281.13, 258.50])  # K
SCALE = np.array([12.34, 10.94])  # K
STDS = np.array([0.8, 0.6])  # normalised
CORR = np.array([[1.0, 0.6], [0.6, 1.0]])
LENGTH_KM = 3000.0
T = 4
STEP_H = 6.0
TAU_H = 24.0
START = pd.Timestamp("2022-01-01T00:00")
SIGMA_Y_K = 0.5
MEMBERS = 256
SAMPLER = dict(num_steps=32, sigma_min=0.002, sigma_max=800.0)


def _prior(correlation_hours=TAU_H, max_modes=None, time_length=T):
    return gaussian.make_prior(NSIDE, [0.3, -0.2], STDS, CORR, LENGTH_KM, max_modes=max_modes,
                               time_length=time_length, time_step_hours=STEP_H, correlation_hours=correlation_hours)


def _dense_reference(correlation_hours=TAU_H) -> np.ndarray:
    """Sigma straight from the kernels (no eigendecompositions), (C*T*npix,)^2 float64."""
    lag = np.abs(np.subtract.outer(np.arange(T), np.arange(T))) * STEP_H
    kt = np.exp(-lag / correlation_hours) if correlation_hours > 0 else np.eye(T)
    ks = gaussian.kernel_matrix(NSIDE, LENGTH_KM) + 1e-6 * np.eye(NPIX)
    return np.kron(np.kron(STDS[:, None] * CORR * STDS[None, :], kt), ks)


@pytest.fixture(scope="module")
def prior():
    return _prior()


# --------------------------------------------------------------------------------------
# (a) the space-time prior itself


def test_time_factor_reduces_to_one_time():
    """T = 1 is the same code with K_time = [[1]]: the default prior is unchanged."""
    a = gaussian.make_prior(NSIDE, [0.3, -0.2], STDS, CORR, LENGTH_KM, max_modes=40)
    b = gaussian.make_prior(NSIDE, [0.3, -0.2], STDS, CORR, LENGTH_KM, max_modes=40, time_length=1,
                            time_step_hours=3.0, correlation_hours=5.0)
    assert a.shape == (2, 1, NPIX)
    for f in dataclasses.fields(a):
        np.testing.assert_array_equal(np.asarray(getattr(a, f.name)), np.asarray(getattr(b, f.name)), err_msg=f.name)
    np.testing.assert_array_equal(a.time_vecs, [[1.0]])
    np.testing.assert_array_equal(a.time_vals, [1.0])
    with pytest.raises(ValueError, match="time factor"):
        dataclasses.replace(a, time_vecs=np.eye(2), time_vals=np.ones(2))
    with pytest.raises(ValueError, match="numerically singular"):
        gaussian.time_factor(8, 6.0, 500.0, "squared_exponential")
    with pytest.raises(ValueError, match="time kernel"):
        gaussian.time_factor(4, 6.0, 24.0, "matern")


@pytest.mark.parametrize("max_modes", [None, 60])
def test_denoiser_matches_dense_float64(max_modes):
    """Exact denoiser mu + Sigma (Sigma + s^2 I)^-1 (x - mu) for T = 4 vs dense linear
    algebra in float64; std and dense_cov vs the kernels themselves (all modes) or the
    dense form (truncated modes + floor). Tolerance 1e-9 relative (float64 round-off)."""
    prior = _prior(max_modes=max_modes)
    assert prior.shape == (2, T, NPIX)
    sig = _dense_reference() if max_modes is None else prior.dense_cov()
    if max_modes is None:
        np.testing.assert_allclose(prior.dense_cov(), sig, atol=1e-10)
    np.testing.assert_allclose(prior.std().reshape(-1), np.sqrt(np.diag(sig)), rtol=1e-10)
    np.testing.assert_allclose(gaussian.pointwise_std(prior), prior.std(), rtol=1e-10)
    mu = np.asarray(prior.mu).reshape(-1)
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        for s in (0.05, 0.7, 6.0):
            x = mu + rng.standard_normal(mu.size) * np.sqrt(np.diag(sig) + s**2)
            ref = mu + sig @ np.linalg.solve(sig + s**2 * np.eye(mu.size), x - mu)
            got = np.asarray(prior.denoiser(jnp.asarray(x.reshape(prior.shape)), s)).reshape(-1)
            assert np.linalg.norm(got - ref) < 1e-9 * np.linalg.norm(ref - mu), s
            # the covariance itself, through the spectral form
            z = rng.standard_normal(mu.size)
            np.testing.assert_allclose(np.asarray(prior.apply_cov(jnp.asarray(z.reshape(prior.shape)))).reshape(-1),
                                       sig @ z, atol=1e-10)


def test_samples_have_the_time_correlation(prior):
    """Lag-k correlation of prior draws, pooled over channels and pixels, vs exp(-6 k / 24)
    (0.78, 0.61, 0.47). 4000 draws: the pooled estimate's error is ~0.01 (smooth fields:
    ~ a few tens of independent pixels per draw); tolerance 0.03."""
    x = np.asarray(prior.sample(jax.random.PRNGKey(5), 4000), np.float64) - np.asarray(prior.mu)
    for k in (1, 2, 3):
        a, b = x[:, :, :-k], x[:, :, k:]
        r = np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))
        assert abs(r - np.exp(-STEP_H * k / TAU_H)) < 0.03, (k, r)


def _rts_smoother(prior, frames, chans, pixels, y, sigma_y):
    """Forward Kalman filter + Rauch-Tung-Striebel smoother over the T frames of an AR(1)
    space-time field (state (C*npix,) per frame, x_{t+1} = rho x_t + w), observations at
    frame times only. Returns mean (C, T, npix) and pointwise std."""
    rho = np.exp(-STEP_H / TAU_H)
    p0 = np.kron(STDS[:, None] * CORR * STDS[None, :], gaussian.kernel_matrix(NSIDE, LENGTH_KM) + 1e-6 * np.eye(NPIX))
    q = (1.0 - rho**2) * p0
    mu = np.asarray(prior.mu, np.float64)[:, 0].reshape(-1)  # the same mean in every frame
    n = mu.size
    mf, pf, mp, pp = [], [], [], []
    m, p = mu.copy(), p0.copy()
    for t in range(T):
        if t > 0:
            m, p = mu + rho * (m - mu), rho**2 * p + q
        mp.append(m), pp.append(p)
        sel = frames == t
        if sel.any():
            H = np.zeros((sel.sum(), n))
            H[np.arange(sel.sum()), chans[sel] * NPIX + pixels[sel]] = 1.0
            S = H @ p @ H.T + np.diag(sigma_y[sel] ** 2)
            K = np.linalg.solve(S, H @ p).T
            m, p = m + K @ (y[sel] - H @ m), p - K @ H @ p
        mf.append(m), pf.append(p)
    ms, ps = [mf[-1]], [pf[-1]]
    for t in range(T - 2, -1, -1):
        G = rho * pf[t] @ np.linalg.inv(pp[t + 1])
        ms.insert(0, mf[t] + G @ (ms[0] - mp[t + 1]))
        ps.insert(0, pf[t] + G @ (ps[0] - pp[t + 1]) @ G.T)
    mean = np.stack([v.reshape(2, NPIX) for v in ms], axis=1)
    std = np.stack([np.sqrt(np.diag(v)).reshape(2, NPIX) for v in ps], axis=1)
    return mean, std


def test_posterior_is_the_kalman_smoother(prior):
    """prior.posterior (one dense update of the whole window), kalman_marginals and
    posterior_denoiser at sigma -> infinity vs the filter + RTS smoother over frames: 1e-8 prior
    std (float64), 1e-4 for kalman_marginals (float32 Sigma H^T)."""
    rng = np.random.default_rng(1)
    n = 30
    frames = rng.choice([0, 1, 3], n)  # frame 2 has no observations
    chans = rng.integers(0, 2, n)
    pixels = rng.choice(NPIX, n, replace=False)
    sigma_y = 0.1 + 0.1 * rng.random(n)
    A, H = gaussian.point_observations(prior.shape, chans, pixels, frames)
    truth = np.asarray(prior.sample(jax.random.PRNGKey(2), 1)[0], np.float64)
    y = H @ truth.reshape(-1) + sigma_y * rng.standard_normal(n)
    np.testing.assert_allclose(np.asarray(A(jnp.asarray(truth))), H @ truth.reshape(-1), rtol=1e-6)
    ref_mean, ref_std = _rts_smoother(prior, frames, chans, pixels, y, sigma_y)
    pstd = prior.std()
    mean, cov = prior.posterior(H, y, sigma_y)
    assert np.max(np.abs(mean - ref_mean) / pstd) < 1e-8
    assert np.max(np.abs(np.sqrt(np.diag(cov)).reshape(prior.shape) - ref_std) / pstd) < 1e-8
    km, ks = gaussian.kalman_marginals(prior, H, y, sigma_y)
    assert np.max(np.abs(km - ref_mean) / pstd) < 1e-4 and np.max(np.abs(ks - ref_std) / pstd) < 1e-4
    with jax.enable_x64(True):  # sigma 1e4: x_t carries no information, E[x | x_t, y] -> E[x | y]
        d = np.asarray(prior.posterior_denoiser(H, y, sigma_y)(jnp.asarray(prior.mu), 1e4))
    assert np.max(np.abs(d - ref_mean) / pstd) < 1e-6
    # the unobserved frame 2 is informed through frames 1 and 3
    move = np.sqrt(np.mean(((ref_mean - np.asarray(prior.mu)) / pstd) ** 2, axis=(0, 2)))
    assert move[2] > 0.2, move


def test_gaussian_model_window_conditioning(prior):
    model = gaussian.GaussianModel(prior, CHANNELS, CENTER, SCALE, NSIDE, time_step_hours=STEP_H)
    assert model.member_shape == (2, T, NPIX) and model.time_length == T
    w = model.window(START)
    assert w.length == T and w.time_step_hours == STEP_H
    assert model.window_conditioning(w) == {} and model.conditioning(START) == {}
    known = KnownFrames(np.ones((2, 2, T, NPIX)), [True, False, False, False])
    cond = model.window_conditioning(w, known=known)
    assert cond["known"].shape == (2, 2, T, NPIX) and cond["keep"].shape == (2, T)
    with pytest.raises(ValueError, match="3 frames"):
        model.window_conditioning(FrameWindow(START, STEP_H, 3))
    with pytest.raises(ValueError, match="3 h apart"):
        model.window_conditioning(FrameWindow(START, 3.0, T))


# --------------------------------------------------------------------------------------
# (b), (c) MMPS ensembles vs the exact posterior, observations from a table


def _table(truth, positions, seed):
    """Noisy observations (K) of ``truth`` at random points and the fractional frame
    ``positions`` (n,), and the dense H (n, C*T*npix) built here: bilinear stencil (net
    order) x linear weights between the two frames around each time."""
    rng = np.random.default_rng(seed)
    n = positions.size
    lon, lat = rng.uniform(0.0, 360.0, n), np.degrees(np.arcsin(rng.uniform(-0.95, 0.95, n)))
    ch = np.arange(n) % 2
    pix, w = grid_sampling.stencil(NSIDE, lon, lat, "bilinear", "net")
    H = np.zeros((n, 2 * T * NPIX))
    f0 = np.minimum(np.floor(positions), T - 2).astype(int)
    for f, wt in ((f0, 1.0 - (positions - f0)), (f0 + 1, positions - f0)):
        np.add.at(H, (np.arange(n)[:, None], (ch[:, None] * T + f[:, None]) * NPIX + pix), w * wt[:, None])
    value_n = H @ truth.reshape(-1)
    value = value_n * SCALE[ch] + CENTER[ch] + SIGMA_Y_K * rng.standard_normal(n)
    times = START + pd.to_timedelta(positions * STEP_H, unit="h")
    table = pd.DataFrame({"time": times, "lat": lat, "lon": lon, "variable": np.array(CHANNELS)[ch],
                          "value": value, "sigma": SIGMA_Y_K})
    return table, H, ch


def _run(prior_for_sampling, table, programs, fn, key=11):
    window = FrameWindow(START, STEP_H, T)
    prep = observations.prepare(table, CHANNELS, CENTER, SCALE, window=window, nside=NSIDE, pad_to="bucket")
    model = gaussian.GaussianModel(prior_for_sampling, CHANNELS, CENTER, SCALE, NSIDE, time_step_hours=STEP_H)
    ens = programs(fn, jax.random.PRNGKey(key), model.member_shape, MEMBERS, sampler_kwargs=SAMPLER,
                   operands=(model.params, model.window_conditioning(window), guidance.MMPS(cg_iters=16), prep.obs),
                   devices=jax.devices()[:1])
    return np.asarray(ens, np.float64), prep


def _scores(ens, prior, post_mean, post_std):
    pstd = prior.std()
    d = (ens.mean(0) - post_mean) / pstd
    return {
        "mean_error": float(np.sqrt(np.mean(d**2))),
        "mean_error_frame": np.sqrt(np.mean(d**2, axis=(0, 2))),
        "spread": float(np.mean(ens.std(0, ddof=1) / post_std)),
        "mc_floor": float(np.sqrt(np.mean((post_std / pstd) ** 2) / ens.shape[0])),
    }


def _move(mean, prior):
    """Per-frame RMS over (channel, pixel) of (mean - prior mean) / prior std, (T,)."""
    return np.sqrt(np.mean(((mean - np.asarray(prior.mu)) / prior.std()) ** 2, axis=(0, 2)))


def _err(mean, truth, prior):
    return np.sqrt(np.mean(((mean - truth) / prior.std()) ** 2, axis=(0, 2)))


@pytest.fixture(scope="module")
def sampling():
    """One sampler and guided-denoiser function: every ensemble below reuses one program."""
    return ensemble.EnsembleSampler(), guided.guided_denoiser(
        gaussian.GaussianModel(_prior(), CHANNELS, CENTER, SCALE, NSIDE, time_step_hours=STEP_H))


@pytest.mark.slow
def test_mmps_window_matches_exact_posterior(prior, sampling):
    """48 observations spread over the window (positions uniform in [0, 3]: nearly all
    between frames), 256 members, 32 steps, 16 CG iterations: mean error <= 0.1 prior
    std, spread ratio in [0.9, 1.1] (Monte-Carlo floor of the mean error 0.044; measured
    0.048 and 1.03)."""
    truth = np.asarray(prior.sample(jax.random.PRNGKey(3), 1)[0], np.float64)
    positions = np.random.default_rng(4).uniform(0.0, T - 1, 48)
    positions[:4] = [0.0, 1.0, 2.0, 3.0]  # and some on frame times
    table, H, ch = _table(truth, positions, seed=4)
    ens, prep = _run(prior, table, *sampling)
    # the operator built from the table is the H built here (frame stencil, time weights)
    np.testing.assert_allclose(prep.obs.A.dense(prior.shape)[: len(table)], H, atol=1e-6)
    np.testing.assert_allclose(prep.table["frame_position"].to_numpy(), positions, atol=1e-9)
    sigma_n = SIGMA_Y_K / SCALE[ch]
    y_n = (table["value"].to_numpy() - CENTER[ch]) / SCALE[ch]
    post_mean, post_cov = prior.posterior(H, y_n, sigma_n)
    post_std = np.sqrt(np.diag(post_cov)).reshape(prior.shape)
    s = _scores(ens, prior, post_mean, post_std)
    print(f"4D MMPS: mean error {s['mean_error']:.4f} prior std (MC floor {s['mc_floor']:.4f}), per frame "
          f"{np.round(s['mean_error_frame'], 4)}; spread ratio {s['spread']:.4f}")
    assert s["mean_error"] <= 0.1
    assert 0.9 <= s["spread"] <= 1.1
    # the observations matter: the prior mean is far from the posterior mean
    assert np.sqrt(np.mean(((np.asarray(prior.mu) - post_mean) / prior.std()) ** 2)) > 5 * s["mean_error"]
    # control: an operator that ignored the frame (everything in frame 0) gives another posterior
    H0 = H.reshape(len(table), 2, T, NPIX).sum(axis=2, keepdims=True) * np.eye(T)[0][None, None, :, None]
    wrong_mean, _ = prior.posterior(H0.reshape(len(table), -1), y_n, sigma_n)
    assert np.sqrt(np.mean(((wrong_mean - post_mean) / prior.std()) ** 2)) > 0.3


@pytest.mark.slow
def test_information_propagates_to_unobserved_frames(prior, sampling):
    """Observations in frames 0 and 1 only (positions in [0, 1]): the exact smoother moves
    frames 2 and 3 toward the truth by rho^k of what it does in frame 1; the MMPS mean
    does the same. Per frame: |MMPS - exact| <= 0.1 prior std for the move from the
    prior mean and for the error vs the truth, while the exact moves in frames 2 and 3
    are > 0.3. Control: the same observations with K_time = I (correlation time 0) give
    exactly no move there (exact), and the MMPS ensemble of that prior stays put
    (<= 0.1), i.e. a sampler that dropped the time kernel fails the first check."""
    truth = np.asarray(prior.sample(jax.random.PRNGKey(8), 1)[0], np.float64)
    positions = np.random.default_rng(9).uniform(0.0, 1.0, 60)
    positions[:2] = [0.0, 1.0]
    table, H, ch = _table(truth, positions, seed=9)
    sigma_n = SIGMA_Y_K / SCALE[ch]
    y_n = (table["value"].to_numpy() - CENTER[ch]) / SCALE[ch]
    post_mean, post_cov = prior.posterior(H, y_n, sigma_n)
    ens, _ = _run(prior, table, *sampling)
    move_exact, move_mmps = _move(post_mean, prior), _move(ens.mean(0), prior)
    err_prior, err_exact, err_mmps = (_err(m, truth, prior) for m in (np.asarray(prior.mu), post_mean, ens.mean(0)))
    print(f"move from prior mean per frame: exact {np.round(move_exact, 3)}, MMPS {np.round(move_mmps, 3)}; "
          f"error vs truth: prior {np.round(err_prior, 3)}, exact {np.round(err_exact, 3)}, MMPS {np.round(err_mmps, 3)}")
    assert np.all(move_exact[2:] > 0.3), move_exact
    assert np.all(err_exact[2:] < err_prior[2:] - 0.1), (err_exact, err_prior)  # closer to the truth
    np.testing.assert_array_less(np.abs(move_mmps - move_exact), 0.1)
    np.testing.assert_array_less(np.abs(err_mmps - err_exact), 0.1)
    s = _scores(ens, prior, post_mean, np.sqrt(np.diag(post_cov)).reshape(prior.shape))
    assert s["mean_error"] <= 0.1 and 0.9 <= s["spread"] <= 1.1, s

    # control: no time correlation, no information flow
    iid = _prior(correlation_hours=0.0)
    iid_mean, _ = iid.posterior(H, y_n, sigma_n)
    assert np.max(_move(iid_mean, iid)[2:]) < 1e-12


def test_given_frames_is_the_exact_conditional(prior):
    """Conditioning the prior on whole frames (given_frames) = the dense Gaussian
    conditional of the other frames, and the known frames become exact (zero variance)."""
    rng = np.random.default_rng(5)
    known = rng.normal(size=(2, T, NPIX))
    keep = np.array([1.0, 1.0, 0.0, 0.0])
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), prior)
        cond = gaussian.given_frames(p64, jnp.asarray(known), jnp.asarray(keep))
        sig = prior.dense_cov()
        mu = np.asarray(prior.mu, np.float64).reshape(-1)
        k = np.zeros((2, T, NPIX), bool)
        k[:, keep > 0] = True
        k = k.reshape(-1)
        gain = np.linalg.solve(sig[np.ix_(k, k)], sig[np.ix_(k, ~k)]).T
        mean_u = mu[~k] + gain @ (known.reshape(-1)[k] - mu[k])
        cov_u = sig[np.ix_(~k, ~k)] - gain @ sig[np.ix_(k, ~k)]
        got_mean = np.asarray(cond.mu).reshape(-1)
        np.testing.assert_allclose(got_mean[~k], mean_u, atol=1e-8)
        np.testing.assert_allclose(got_mean[k], known.reshape(-1)[k], atol=1e-10)
        got_cov = cond.dense_cov()
        np.testing.assert_allclose(got_cov[np.ix_(~k, ~k)], cov_u, atol=1e-8)
        assert np.abs(got_cov[k]).max() < 1e-10
        # the denoiser of the conditional: known frames come back exactly at any sigma
        x = rng.normal(size=(2, T, NPIX))
        d = np.asarray(gaussian.GaussianModel(prior, CHANNELS, CENTER, SCALE, NSIDE).denoise(
            p64, jnp.asarray(x), 3.0, {"known": jnp.asarray(known), "keep": jnp.asarray(keep)}))
        np.testing.assert_allclose(d[:, :2], known[:, :2], atol=1e-8)
