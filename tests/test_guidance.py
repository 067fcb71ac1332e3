"""Guidance transforms: jit/vmap/grad, hand formulas, finite-difference gradients, errors.

Small problem: nside 4, 2 channels, Gaussian prior (its exact denoiser plays the
network), 10 point observations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxguide.model import gaussian

from jaxguide.diffusion import guidance, sampler
from jaxguide.diffusion.guidance import DPS, MMPS, SDA, GuidanceInputError, Observations, PiGDM, Regression, Replacement

NSIDE = 4
OPTIONS = {
    "regression": {"scale": 0.01},
    "dps": {},
    "sda": {"gamma": 1e-2},
    "pigdm": {},
    "mmps": {"cg_iters": 3},
    "replacement": {},
}


@pytest.fixture(scope="module")
def prob():
    prior = gaussian.make_prior(NSIDE, [0.0, 0.5], [1.0, 0.6], [[1.0, 0.5], [0.5, 1.0]], 2500.0)
    rng = np.random.default_rng(1)
    px = rng.choice(12 * NSIDE**2, 10, replace=False)
    ch = rng.integers(0, 2, 10)
    A, H = gaussian.point_observations(prior.shape, ch, px)
    y = rng.standard_normal(10) * 0.8
    sigma_y = 0.1 + 0.1 * rng.random(10)
    return prior, A, H, y, sigma_y, ch, px


def _x(prior, key, sigma, dtype=jnp.float32):
    x0 = prior.sample(jax.random.PRNGKey(key), 1, dtype)[0]
    return x0 + sigma * jax.random.normal(jax.random.PRNGKey(key + 100), x0.shape, dtype)


def _krylov_solve(M, b, k):
    """k conjugate-gradient iterations from 0 in exact arithmetic: the minimiser of the
    M-norm error over the Krylov space span(b, M b, ..., M^(k-1) b) (float64)."""
    K = np.stack([np.linalg.matrix_power(M, i) @ b for i in range(k)], 1)
    Q, _ = np.linalg.qr(K)
    return Q @ np.linalg.solve(Q.T @ M @ Q, Q.T @ b)


def _closed_form(method, prior, H, y, sigma_y, x, sigma, cg_iters=None):
    """The guided denoiser of the linear-Gaussian problem in closed form (float64 NumPy),
    with the options of OPTIONS: ``(out, G)``, out (C*T*npix,) at x and G = d out / dx.

    D = mu + J (x - mu), J = Sigma (Sigma + sigma^2 I)^-1 (symmetric); r = y - H D;
    R = diag(sigma_y^2). Every method is ``D + K r`` (docs/guidance.md):
    regression K = J H^T diag(min(scale, sigma_y^2) / sigma_y^2) (the default cap; uncapped
    scale J H^T R^-1); DPS the same with scale sigma^2 (scale 1); SDA and PiGDM
    K = sigma^2 J H^T (R + v I)^-1 with v = gamma sigma^2 resp. sigma^2 / (sigma^2 + 1)
    (data_std 1; H H^T = I for point observations); replacement K = H^T; MMPS
    K r = sigma^2 J H^T w, w = ``cg_iters`` exact CG iterations on
    (R + sigma^2 H J H^T) w = r (converged: the Kalman posterior mean E[x | x_t, y]).
    """
    S = prior.dense_cov()
    N = S.shape[0]
    s2 = float(sigma) ** 2
    J = S @ np.linalg.inv(S + s2 * np.eye(N))
    mu = np.asarray(prior.mu, np.float64).reshape(-1)
    D = mu + J @ (np.asarray(x, np.float64).reshape(-1) - mu)
    r = y - H @ D
    R = np.diag(sigma_y**2)
    if method == "mmps":
        M = R + s2 * H @ J @ H.T
        solve = lambda b: _krylov_solve(M, b, cg_iters)  # noqa: E731  (nonlinear in b for cg_iters < n_obs)
        # d w / d r by central differences of the float64 closed form (smooth, error ~1e-10)
        h = 1e-6 * np.linalg.norm(r)
        dw = np.stack([(solve(r + h * e) - solve(r - h * e)) / (2 * h) for e in np.eye(len(r))], 1)
        return D + s2 * J @ H.T @ solve(r), (np.eye(N) - s2 * J @ H.T @ dw @ H) @ J
    K = {
        # capped (the default): per observation min(scale, sigma_y^2) / sigma_y^2
        "regression": J @ H.T @ np.diag(np.minimum(OPTIONS["regression"]["scale"], sigma_y**2) / sigma_y**2),
        "dps": J @ H.T @ np.diag(np.minimum(s2, sigma_y**2) / sigma_y**2),
        "sda": s2 * J @ H.T @ np.linalg.inv(R + OPTIONS["sda"]["gamma"] * s2 * np.eye(len(y))),
        "pigdm": s2 * J @ H.T @ np.linalg.inv(R + s2 / (s2 + 1.0) * np.eye(len(y))),
        "replacement": H.T,
    }[method]
    return D + K @ r, (np.eye(N) - K @ H) @ J


@pytest.mark.parametrize("method", guidance.METHODS)
def test_jit_vmap_grad_shapes(prob, method):
    """jit, vmap and grad of every method, with values: the guided estimate and the
    gradient of sum(out^2) (= 2 G^T out, G = d out / dx) against the closed forms of the
    linear-Gaussian problem (:func:`_closed_form`), float32 against float64.

    Tolerance 1e-5 x max|closed form| (out) and 1e-5 x max|2 G^T out| (gradient):
    float32 round-off of the spectral denoiser (384 x 384 matmuls) and of the CG
    iterations; measured <= 4.9e-7 (out) and <= 6e-7 (gradient), every method, CPU. The
    methods differ from each other by >= 0.43 of that scale, from the unguided D by
    >= 0.037 (regression, scale 0.01), and MMPS with 3 CG iterations from 2 or 10
    iterations by 0.12 and 0.055."""
    prior, A, H, y, sigma_y, *_ = prob
    den = guidance.make(method, **OPTIONS[method])(prior.denoiser, Observations(A, y, sigma_y))
    xs = jnp.stack([_x(prior, k, 2.0) for k in range(3)])
    out = jax.jit(den)(xs[0], 2.0)
    assert out.shape == xs[0].shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    batched = jax.jit(jax.vmap(den, (0, None)))(xs, 2.0)
    loop = jnp.stack([den(x, 2.0) for x in xs])
    np.testing.assert_allclose(batched, loop, rtol=1e-4, atol=1e-5)  # float32 round-off
    g = jax.grad(lambda x: jnp.sum(den(x, 2.0) ** 2))(xs[0])
    assert g.shape == xs[0].shape and bool(jnp.all(jnp.isfinite(g)))
    # guidance changes the estimate
    assert float(jnp.max(jnp.abs(out - prior.denoiser(xs[0], 2.0)))) > 1e-3
    # the values: each member of the batch against the closed form
    cg = OPTIONS["mmps"]["cg_iters"]
    for k in range(3):
        want, G = _closed_form(method, prior, H, y, sigma_y, xs[k], 2.0, cg)
        tol = 1e-5 * np.max(np.abs(want))
        np.testing.assert_allclose(np.asarray(batched[k], np.float64).reshape(-1), want, rtol=0, atol=tol, err_msg=f"member {k}")
        if k == 0:
            np.testing.assert_allclose(np.asarray(out, np.float64).reshape(-1), want, rtol=0, atol=tol)
            g_want = 2.0 * G.T @ want
            np.testing.assert_allclose(np.asarray(g, np.float64).reshape(-1), g_want, rtol=0, atol=1e-5 * np.max(np.abs(g_want)))
    if method == "mmps":  # with as many CG iterations as observations: the exact posterior mean E[x | x_t, y]
        exact = MMPS(cg_iters=len(y))(prior.denoiser, Observations(A, y, sigma_y))(xs[0], 2.0)
        want, _ = _closed_form("mmps", prior, H, y, sigma_y, xs[0], 2.0, len(y))
        S, xv = prior.dense_cov(), np.asarray(xs[0], np.float64).reshape(-1)  # Kalman update of N(D, 4 J)
        J = S @ np.linalg.inv(S + 4.0 * np.eye(S.shape[0]))
        D = J @ (xv - np.asarray(prior.mu).reshape(-1)) + np.asarray(prior.mu).reshape(-1)
        P = 4.0 * J
        kalman = D + P @ H.T @ np.linalg.solve(H @ P @ H.T + np.diag(sigma_y**2), y - H @ D)
        np.testing.assert_allclose(want, kalman, rtol=0, atol=1e-9 * np.max(np.abs(kalman)))
        np.testing.assert_allclose(np.asarray(exact, np.float64).reshape(-1), kalman, rtol=0, atol=1e-5 * np.max(np.abs(kalman)))  # measured 4.3e-7


def test_regression_hand_formula(prob):
    prior, A, H, y, sigma_y, *_ = prob
    with jax.enable_x64(True):
        x = _x(prior, 0, 1.5, jnp.float64)
        D = np.asarray(prior.denoiser(x, 1.5)).reshape(-1)
        w = (H @ D - y) / sigma_y**2
        # J = I (gradient w.r.t. D only): D - scale H^T (H D - y) / sigma_y^2
        a = Regression(scale=0.03, no_network_grad=True, cap=False)(prior.denoiser, Observations(A, y, sigma_y))(x, 1.5)
        np.testing.assert_allclose(np.asarray(a).reshape(-1), D - 0.03 * H.T @ w, rtol=1e-12, atol=1e-12)
        # through the network: J = Sigma (Sigma + sigma^2 I)^-1 (symmetric)
        S = prior.dense_cov()
        J = S @ np.linalg.inv(S + 1.5**2 * np.eye(S.shape[0]))
        b = Regression(scale=0.03, cap=False)(prior.denoiser, Observations(A, y, sigma_y))(x, 1.5)
        np.testing.assert_allclose(np.asarray(b).reshape(-1), D - 0.03 * J.T @ H.T @ w, rtol=1e-10, atol=1e-10)
        # capped (the default): per observation min(scale, sigma_y^2) / sigma_y^2 <= 1
        b = Regression(scale=0.03)(prior.denoiser, Observations(A, y, sigma_y))(x, 1.5)
        capped = np.minimum(0.03, sigma_y**2) * w
        assert (0.03 > sigma_y**2).any() and (0.03 < sigma_y**2).any()  # both sides of the cap
        np.testing.assert_allclose(np.asarray(b).reshape(-1), D - J.T @ H.T @ capped, rtol=1e-10, atol=1e-10)
        # norm matching: the step has norm scale * sigma * ||(x - D) / sigma||
        c = Regression(scale=0.5, norm_matching=True)(prior.denoiser, Observations(A, y, sigma_y))(x, 1.5)
        step = np.linalg.norm(np.asarray(c).reshape(-1) - D)
        want = 0.5 * 1.5 * np.linalg.norm((np.asarray(x).reshape(-1) - D) / 1.5)
        assert abs(step - want) < 1e-10 * want
        # DPS = regression with scale sigma^2 = SDA with gamma 0
        d1 = DPS(scale=0.7, cap=False)(prior.denoiser, Observations(A, y, sigma_y))(x, 1.5)
        d2 = Regression(scale=0.7 * 1.5**2, cap=False)(prior.denoiser, Observations(A, y, sigma_y))(x, 1.5)
        d3 = SDA(gamma=0.0, scale=0.7)(prior.denoiser, Observations(A, y, sigma_y))(x, 1.5)
        np.testing.assert_allclose(d1, d2, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(d1, d3, rtol=1e-12, atol=1e-12)
        # SDA / PiGDM hand formula (selection: A A^T = I)
        for den, v in [
            (SDA(gamma=0.02)(prior.denoiser, Observations(A, y, sigma_y)), 0.02 * 1.5**2),
            (PiGDM(data_std=0.8)(prior.denoiser, Observations(A, y, sigma_y)), 1.5**2 * 0.64 / (1.5**2 + 0.64)),
        ]:
            want = D + 1.5**2 * J.T @ H.T @ ((y - H @ D) / (sigma_y**2 + v))
            np.testing.assert_allclose(np.asarray(den(x, 1.5)).reshape(-1), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["regression", "dps"])
def test_default_regression_and_dps_cannot_diverge(prob, method):
    """At their defaults (regression scale 1, DPS scale 1, capped) a whole trajectory from
    sigma 200 with sigma_y ~ 0.15 (scale 1 is ~40 x sigma_y^2) stays bounded and pulls the
    observed values toward y; uncapped, the same run blows up (the test can fail)."""
    prior, A, H, y, sigma_y, *_ = prob
    kw = dict(num_steps=12, sigma_min=0.02, sigma_max=200.0)

    def misfit(**options):
        den = guidance.make(method, **options)(prior.denoiser, Observations(A, y, sigma_y))
        x = jax.jit(lambda k: sampler.sample(den, k, prior.shape, **kw))(jax.random.PRNGKey(3))
        return float(jnp.sqrt(jnp.mean((A(x) - y) ** 2)))

    prior_misfit = float(jnp.sqrt(jnp.mean((A(sampler.sample(prior.denoiser, jax.random.PRNGKey(3), prior.shape, **kw))
                                            - y) ** 2)))
    assert misfit() < 0.5 * prior_misfit
    bad = misfit(cap=False)
    assert not bad < 100 * prior_misfit  # NaN/inf or huge


def test_low_rank_obs_covariance(prob):
    prior, A, H, y, sigma_y, *_ = prob
    with jax.enable_x64(True):
        U = np.random.default_rng(3).standard_normal((10, 2)) * 0.1
        x = _x(prior, 1, 0.7, jnp.float64)
        D = np.asarray(prior.denoiser(x, 0.7)).reshape(-1)
        R = np.diag(sigma_y**2) + U @ U.T
        S = prior.dense_cov()
        P = S @ np.linalg.inv(S + 0.49 * np.eye(S.shape[0])) * 0.49  # sigma^2 J
        want = D + P @ H.T @ np.linalg.solve(R + H @ P @ H.T, y - H @ D)
        got = MMPS(cg_iters=10)(prior.denoiser, Observations(A, y, sigma_y, U))(x, 0.7)
        np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=1e-9, atol=1e-9)
        got2 = Regression(scale=0.02, no_network_grad=True, cap=False)(prior.denoiser, Observations(A, y, sigma_y, U))(x, 0.7)
        np.testing.assert_allclose(np.asarray(got2).reshape(-1),
                                   D - 0.02 * H.T @ np.linalg.solve(R, H @ D - y), rtol=1e-10, atol=1e-10)


def test_gmres_equals_cg_when_converged(prob):
    prior, A, H, y, sigma_y, *_ = prob
    with jax.enable_x64(True):
        x = _x(prior, 2, 3.0, jnp.float64)
        a = MMPS(cg_iters=10)(prior.denoiser, Observations(A, y, sigma_y))(x, 3.0)
        b = MMPS(cg_iters=10, solver="gmres")(prior.denoiser, Observations(A, y, sigma_y))(x, 3.0)
        ex = prior.posterior_denoiser(H, y, sigma_y)(x, 3.0)
        np.testing.assert_allclose(a, ex, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(b, ex, rtol=1e-6, atol=1e-6)


def test_cg_loop_equals_unrolled(prob):
    """cg_unroll only changes how the iterations are traced, not the arithmetic."""
    prior, A, H, y, sigma_y, *_ = prob
    with jax.enable_x64(True):
        x = _x(prior, 4, 1.5, jnp.float64)
        a = MMPS(cg_iters=3)(prior.denoiser, Observations(A, y, sigma_y))(x, 1.5)
        b = jax.jit(MMPS(cg_iters=3, cg_unroll=False)(prior.denoiser, Observations(A, y, sigma_y)))(x, 1.5)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        assert not np.allclose(a, prior.denoiser(x, 1.5))  # the guidance did something


def test_replacement_puts_y_at_observed_pixels(prob):
    prior, A, H, y, sigma_y, ch, px = prob
    x = _x(prior, 3, 1.0)
    out = Replacement()(prior.denoiser, Observations(A, y, sigma_y))(x, 1.0)
    np.testing.assert_allclose(np.asarray(out)[ch, 0, px], y, rtol=1e-6, atol=1e-6)
    D = np.asarray(prior.denoiser(x, 1.0))
    mask = np.ones(D.shape, bool)
    mask[ch, 0, px] = False
    np.testing.assert_array_equal(np.asarray(out)[mask], D[mask])  # elsewhere untouched


def _fd(f, v, h):
    return (f(v + h) - f(v - h)) / (2 * h)


def test_grad_of_sample_matches_finite_differences(prob):
    """d(sample)/d(sigma_y, gamma, scale) through 4 Heun steps with churn (x64).

    Central differences with h = 1e-5: truncation ~h^2, tolerance 1e-6 relative."""
    prior, A, H, y, sigma_y, *_ = prob
    nonlin = lambda x: jnp.tanh(A(x))  # noqa: E731  (nonlinear operator)
    with jax.enable_x64(True):
        lat = jax.random.normal(jax.random.PRNGKey(9), prior.shape, jnp.float64)
        w = jax.random.normal(jax.random.PRNGKey(10), prior.shape, jnp.float64)
        kw = dict(num_steps=4, sigma_min=0.05, sigma_max=10.0, S_churn=2.0, latents=lat)

        def loss(method, **opts):
            def f(sy_scale, gamma, scale):
                o = dict(OPTIONS[method])
                if method == "sda":
                    o["gamma"] = gamma
                if method != "replacement":
                    o["scale"] = scale
                den = guidance.make(method, **o)(prior.denoiser, Observations(nonlin, jnp.tanh(y), sigma_y * sy_scale))
                return jnp.sum(w * sampler.sample(den, jax.random.PRNGKey(0), None, **kw))
            return f

        for method in ("regression", "dps", "sda", "pigdm", "mmps"):
            f = jax.jit(loss(method))  # one compile per method; the FD calls reuse it
            p = (1.0, 0.02, 0.01 if method == "regression" else 1.0)
            grads = jax.jit(jax.grad(loss(method), argnums=(0, 1, 2)))(*p)
            for i in range(3):
                if i == 1 and method != "sda":
                    continue
                h = 1e-5 * p[i]
                fd = _fd(lambda v: f(*[v if j == i else p[j] for j in range(3)]), p[i], h)
                assert abs(grads[i] - fd) <= 1e-6 * max(abs(fd), 1e-3), (method, i, grads[i], fd)


def test_gaussian_evidence_exact_and_gradients(prob):
    prior, A, H, y, sigma_y, *_ = prob
    with jax.enable_x64(True):
        x = _x(prior, 4, 1.2, jnp.float64)
        s = 1.2
        ev = guidance.gaussian_evidence(prior.denoiser, Observations(A, y, sigma_y), x, s)
        # exact: y | x_t ~ N(H D, R + H P H^T), P = sigma^2 J
        S = prior.dense_cov()
        P = S @ np.linalg.inv(S + s**2 * np.eye(S.shape[0])) * s**2
        D = np.asarray(prior.denoiser(x, s)).reshape(-1)
        C = np.diag(sigma_y**2) + H @ P @ H.T
        r = y - H @ D
        want = -0.5 * (r @ np.linalg.solve(C, r) + np.linalg.slogdet(C)[1] + len(y) * np.log(2 * np.pi))
        assert abs(float(ev) - want) < 1e-9 * abs(want)

        def f(sy_scale, gamma, scale):
            return guidance.gaussian_evidence(prior.denoiser, Observations(lambda z: jnp.tanh(A(z)), jnp.tanh(y), sigma_y * sy_scale), x, s, gamma=gamma, scale=scale)

        p = (1.3, 0.05, 0.8)
        grads = jax.grad(f, argnums=(0, 1, 2))(*p)
        for i in range(3):
            h = 1e-5 * p[i]
            fd = _fd(lambda v: f(*[v if j == i else p[j] for j in range(3)]), p[i], h)
            assert abs(grads[i] - fd) <= 1e-7 * max(abs(fd), 1.0), (i, grads[i], fd)


def test_evidence_sda_term_is_sdas_for_an_interpolating_operator(prob):
    """gaussian_evidence's gamma term is SDA's (gamma sigma^2 I in observation space): for a
    Gaussian prior and a linear operator that interpolates (A A^T != I) the evidence with
    scale 0 is the closed form log N(y; H D, R + gamma sigma^2 I), and SDA's guided
    denoiser is D + sigma^2 grad_{x_t} of it."""
    prior, _, _, y, sigma_y, ch, px = prob
    n, npix = len(y), 12 * NSIDE**2
    H = np.zeros((n, int(np.prod(prior.shape))))
    flat = ch * npix + px
    H[np.arange(n), flat] = 0.6
    H[np.arange(n), ch * npix + (px + 1) % npix] = 0.4  # bilinear-like rows: (H H^T)_ii = 0.52
    A = lambda z: jnp.asarray(H, z.dtype) @ z.reshape(-1)  # noqa: E731
    gamma, s = 0.3, 0.8
    with jax.enable_x64(True):
        x = _x(prior, 5, s, jnp.float64)
        obs = Observations(A, y, sigma_y)
        ev = guidance.gaussian_evidence(prior.denoiser, obs, x, s, scale=0.0, gamma=gamma)
        D = np.asarray(prior.denoiser(x, s)).reshape(-1)
        C = np.diag(sigma_y**2) + gamma * s**2 * np.eye(n)
        r = y - H @ D
        want = -0.5 * (r @ np.linalg.solve(C, r) + np.linalg.slogdet(C)[1] + n * np.log(2 * np.pi))
        assert abs(float(ev) - want) < 1e-9 * abs(want)
        grad = jax.grad(lambda z: guidance.gaussian_evidence(prior.denoiser, obs, z, s, scale=0.0, gamma=gamma))(x)
        sda = SDA(gamma=gamma)(prior.denoiser, obs)(x, s)
        np.testing.assert_allclose(np.asarray(sda), np.asarray(prior.denoiser(x, s) + s**2 * grad), rtol=1e-9, atol=1e-12)


def test_named_errors(prob):
    prior, A, H, y, sigma_y, *_ = prob
    bad = y.copy()
    bad[3] = np.nan
    for method in guidance.METHODS:
        with pytest.raises(GuidanceInputError, match="NaN"):
            guidance.make(method)(prior.denoiser, Observations(A, bad, sigma_y))
    with pytest.raises(GuidanceInputError, match="sigma_y"):
        MMPS()(prior.denoiser, Observations(A, y, 0.0))
    with pytest.raises(GuidanceInputError, match="sigma_y"):
        SDA()(prior.denoiser, Observations(A, y, -sigma_y))
    with pytest.raises(GuidanceInputError, match="sigma_y"):
        DPS()(prior.denoiser, Observations(A, y, np.inf))
    with pytest.raises(GuidanceInputError, match="unknown guidance method 'kalman'.*mmps"):
        guidance.make("kalman")
    with pytest.raises(GuidanceInputError, match="no option.*gamma"):
        guidance.make("mmps", gamma=0.1)  # an option of another method is not silently dropped
    with pytest.raises(GuidanceInputError, match="cg_iters"):
        MMPS(cg_iters=0)(prior.denoiser, Observations(A, y, sigma_y))
    with pytest.raises(GuidanceInputError, match="solver"):
        MMPS(solver="lu")(prior.denoiser, Observations(A, y, sigma_y))
    with pytest.raises(GuidanceInputError, match="gamma"):
        SDA(gamma=-1.0)(prior.denoiser, Observations(A, y, sigma_y))
    with pytest.raises(GuidanceInputError, match="Observations"):
        MMPS()(prior.denoiser, (A, y, sigma_y))
    x = _x(prior, 0, 1.0)
    for method in guidance.METHODS:
        den = guidance.make(method)(prior.denoiser, Observations(A, y[:7], sigma_y[:7]))
        with pytest.raises(GuidanceInputError, match="shape"):
            den(x, 1.0)
        with pytest.raises(GuidanceInputError, match="shape"):  # also at trace time under jit
            jax.jit(den)(x, 1.0)
    assert issubclass(GuidanceInputError, ValueError)


def test_methods_and_observations_are_jit_arguments(prob):
    """Method hyperparameters (scale, gamma) and observations are traced pytree leaves: new
    values reuse the program; static options (cg_iters) are part of the program."""
    from jaxguide.observations.operator import PointObservationOperator

    prior, A, H, y, sigma_y, ch, px = prob
    op = PointObservationOperator(jnp.asarray(ch, jnp.int32), jnp.stack([jnp.asarray(px, jnp.int32)] * 4, 1),
                                  jnp.tile(jnp.asarray([1.0, 0.0, 0.0, 0.0], jnp.float32), (len(px), 1)))
    x = _x(prior, 5, 1.5)
    traces = []

    @jax.jit
    def run(method, obs, x):
        traces.append(1)
        return method(prior.denoiser, obs)(x, 1.5)

    obs = Observations(op, jnp.asarray(y, jnp.float32), jnp.asarray(sigma_y, jnp.float32))
    a = run(SDA(gamma=0.02, scale=1.0), obs, x)
    b = run(SDA(gamma=0.05, scale=0.5), Observations(op, -obs.y, 2.0 * obs.sigma_y), x)
    assert len(traces) == 1 and not np.allclose(a, b)
    want = SDA(gamma=0.05, scale=0.5)(prior.denoiser, Observations(A, -y, 2.0 * sigma_y))(x, 1.5)
    np.testing.assert_allclose(b, want, rtol=1e-5, atol=1e-6)
    run(MMPS(cg_iters=2), obs, x)
    run(MMPS(cg_iters=2, scale=0.3), obs, x)
    assert len(traces) == 2
    run(MMPS(cg_iters=3), obs, x)
    assert len(traces) == 3


def test_guided_sampler_compiles_once_for_new_observations(prob):
    """y is a jit argument: value checks are skipped on tracers, shapes still checked."""
    prior, A, H, y, sigma_y, *_ = prob
    traces = []

    @jax.jit
    def run(key, y):
        traces.append(1)
        den = MMPS(cg_iters=2)(prior.denoiser, Observations(A, y, sigma_y))
        return sampler.sample(den, key, prior.shape, num_steps=4, sigma_min=0.01, sigma_max=20.0)

    a = run(jax.random.PRNGKey(0), jnp.asarray(y, jnp.float32))
    b = run(jax.random.PRNGKey(1), jnp.asarray(-y, jnp.float32))
    assert len(traces) == 1 and run._cache_size() == 1
    assert not np.allclose(a, b)
