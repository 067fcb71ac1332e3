"""HEALPix orderings, coordinates and padding against earth2grid's outputs (healpix.npz)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_module
from jaxguide.grid import healpix as hp

ORDERS = ["nest", "ring", "net"]


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return np.load(fixtures_dir / "healpix.npz")


@pytest.mark.parametrize("nside", [4, 8, 64])
def test_permutations_exact(ref, nside):
    for src in ORDERS:
        for dest in ORDERS:
            if src != dest:
                key = f"n{nside}_{src}_index_of_{dest}"
                np.testing.assert_array_equal(hp.permutation(nside, src, dest), ref[key], err_msg=key)


@pytest.mark.parametrize("nside", [4, 8, 64])
def test_lonlat(ref, nside):
    lon, lat = hp.lonlat(nside, "net")
    np.testing.assert_allclose(lon, ref[f"n{nside}_lon_net"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(lat, ref[f"n{nside}_lat_net"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("nside", [4, 8, 64])
@pytest.mark.parametrize("padding", [1, 2])
def test_padding_exact(ref, nside, padding):
    mine = hp.pad_sources(nside, padding)
    theirs = ref[f"n{nside}_pad{padding}_index"]
    # earth2grid marks invalid candidates with assorted negative numbers
    np.testing.assert_array_equal(mine >= 0, theirs >= 0)
    np.testing.assert_array_equal(np.where(mine >= 0, mine, -1), np.where(theirs >= 0, theirs, -1))
    x = ref[f"n{nside}_pad_input_net"]  # (C, npix)
    out = hp.pad(jnp.asarray(x.T)[None], padding)  # (1, 12, m, m, C)
    out = np.moveaxis(np.asarray(out), -1, 2)
    np.testing.assert_array_equal(out, ref[f"n{nside}_pad{padding}_output"])


def _healpy_index_of_net(nside):
    """Independent reference (healpy): the NEST and RING index of every network pixel.

    Network pixel ``p = f n^2 + h n + w`` is face f, row h, column w of earth2grid's
    HEALPIX_PAD_XY image (origin at the north corner, clockwise: fixtures README), i.e.
    HEALPix face coordinates ``ix = n - 1 - h``, ``iy = n - 1 - w`` (healpy's xyf)."""
    healpy = require_module("healpy")
    p = np.arange(12 * nside * nside)
    f, rest = np.divmod(p, nside * nside)
    h, w = np.divmod(rest, nside)
    nest = healpy.xyf2pix(nside, nside - 1 - h, nside - 1 - w, f, nest=True)
    return {"net": p, "nest": nest, "ring": healpy.nest2ring(nside, nest)}


def test_healpy_reference_matches_earth2grid(ref):
    """The healpy-derived reference agrees with earth2grid's permutations (nside 4, 8, 64)."""
    for nside in (4, 8, 64):
        idx = _healpy_index_of_net(nside)
        for src in ORDERS:
            for dest in ORDERS:
                if src != dest:
                    # x_dest[i] = x_src[key[i]]: the src index of the pixel at dest index i
                    want = np.empty(12 * nside**2, np.int64)
                    want[idx[dest]] = idx[src]
                    np.testing.assert_array_equal(want, ref[f"n{nside}_{src}_index_of_{dest}"], err_msg=(nside, src, dest))


@pytest.mark.parametrize("nside", [1, 2, 16])
def test_reorder_against_healpy(nside):
    """reorder moves every pixel's value to that pixel's index in the other order (healpy
    ring2nest/nest2ring and xyf2pix; nside 16 is not in the fixtures), along any axis, for
    NumPy and JAX arrays; and it is its own inverse."""
    idx = _healpy_index_of_net(nside)
    npix = 12 * nside**2
    vals = np.random.default_rng(nside).normal(size=(2, npix))  # values of the physical pixels (net order)
    maps = {}
    for order in ORDERS:  # the same field in each order
        maps[order] = np.empty_like(vals)
        maps[order][:, idx[order]] = vals
    healpy = require_module("healpy")
    np.testing.assert_array_equal(maps["ring"][0][healpy.nest2ring(nside, np.arange(npix))], maps["nest"][0])
    np.testing.assert_array_equal(healpy.reorder(maps["ring"][0], r2n=True), maps["nest"][0])
    for src in ORDERS:
        for dest in ORDERS:
            got = hp.reorder(maps[src], src, dest)
            np.testing.assert_array_equal(got, maps[dest], err_msg=f"{src}->{dest}")
            assert isinstance(got, np.ndarray)
            got_jax = hp.reorder(jnp.asarray(maps[src], jnp.float32), src, dest)
            assert isinstance(got_jax, jax.Array)
            np.testing.assert_array_equal(np.asarray(got_jax), maps[dest].astype(np.float32), err_msg=f"jax {src}->{dest}")
            got_axis0 = hp.reorder(maps[src].T.copy(), src, dest, axis=0)  # (npix, 2)
            np.testing.assert_array_equal(got_axis0, maps[dest].T, err_msg=f"axis 0 {src}->{dest}")
            np.testing.assert_array_equal(hp.reorder(got, dest, src), maps[src])  # round trip


@pytest.mark.parametrize("nside", [4, 8, 64])
def test_reorder_against_earth2grid(ref, nside):
    """reorder applies earth2grid's permutations in the stated direction: x_dest = x_src[..., src_index_of_dest]."""
    x = np.random.default_rng(0).normal(size=(3, 12 * nside**2))
    for src in ORDERS:
        for dest in ORDERS:
            if src != dest:
                want = x[:, ref[f"n{nside}_{src}_index_of_{dest}"]]
                np.testing.assert_array_equal(hp.reorder(x, src, dest), want, err_msg=f"{src}->{dest}")


def test_pad_grad_and_vmap():
    """Gradient values: with the padding as an explicit matrix P (the padded unit vectors),
    VJP(g) = P^T g and grad sum(pad(v)^2) = 2 P^T P v, bit for bit (integer-valued inputs
    and cotangents: every partial sum, and every 0.5-weighted corner average, is exact in
    float32 whatever the order of summation); plus vmap = the batched call."""
    n, p, c = 8, 1, 2
    npix, m = 12 * n * n, n + 2 * p
    eye = jnp.eye(npix, dtype=jnp.float32)[..., None]  # npix maps of 1 channel
    P = np.asarray(jax.jit(hp.pad, static_argnums=1)(eye, p)).reshape(npix, -1).T  # (padded positions, pixels)
    assert P.shape == (12 * m * m, npix)
    # P is a selection with exact 1/2-averages at the corners: every row sums to 1
    assert set(np.unique(P)) <= {0.0, 0.5, 1.0}
    np.testing.assert_array_equal(P.sum(1), 1.0)
    assert np.sum(P == 0.5) > 0  # the test sees averaged corner positions
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(-8, 9, size=(3, npix, c)).astype(np.float32))
    # VJP with a random integer cotangent
    g = rng.integers(-8, 9, size=(12, m, m, c)).astype(np.float32)
    vjp = jax.jit(lambda v, ct: jax.vjp(lambda u: hp.pad(u, p), v)[1](ct)[0])(x[0], jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(vjp), P.T @ g.reshape(-1, c))
    # the gradient of a loss through the padding
    f = lambda v: jnp.sum(hp.pad(v, p) ** 2)  # noqa: E731
    grad_f = jax.jit(jax.grad(f))
    grad = grad_f(x[0])
    np.testing.assert_array_equal(np.asarray(grad), 2.0 * P.T @ (P @ np.asarray(x[0])))
    # real-valued inputs: the same up to float32 summation order
    xr = rng.normal(size=(npix, c)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(grad_f(jnp.asarray(xr))),
                               2.0 * P.T.astype(np.float64) @ (P @ xr.astype(np.float64)), rtol=0, atol=1e-5)
    batched = jax.vmap(lambda v: hp.pad(v, p))(x)
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(hp.pad(x, p)))
    # the forward is P too
    np.testing.assert_array_equal(np.asarray(hp.pad(x[1], p)).reshape(-1, c), P @ np.asarray(x[1]))
    # per-member gradients under vmap
    gb = jax.jit(jax.vmap(jax.grad(f)))(x)
    for k in range(3):
        np.testing.assert_array_equal(np.asarray(gb[k]), 2.0 * P.T @ (P @ np.asarray(x[k])))


def _gather_pad(x, padding):
    """The former :func:`hp.pad`: one gather over every padded position, averaged corners set after."""
    n = hp.nside_of_npix(x.shape[-2])
    primary, avg_pos, avg_src = hp.pad_gather(n, padding)
    out = jnp.take(x, primary, axis=-2)
    if avg_pos.size:
        mean = (jnp.take(x, avg_src[0], axis=-2) + jnp.take(x, avg_src[1], axis=-2)) * 0.5
        out = out.at[..., avg_pos, :].set(mean)
    m = n + 2 * padding
    return out.reshape(*x.shape[:-2], 12, m, m, x.shape[-1])


@pytest.mark.parametrize("nside,padding", [(n, p) for n in (1, 2, 4, 8, 64) for p in (0, 1, 2) if p <= n])
def test_pad_equals_full_gather(nside, padding):
    """Interior reshape + border gather: bit for bit the values of the full gather."""
    rng = np.random.default_rng(nside)
    with jax.enable_x64(True):
        for dtype in (np.float32, np.float64):
            for lead in ((), (2, 3)):
                x = jnp.asarray(rng.standard_normal((*lead, 12 * nside**2, 3)).astype(dtype))
                got = np.asarray(jax.jit(hp.pad, static_argnums=1)(x, padding))
                want = np.asarray(jax.jit(_gather_pad, static_argnums=1)(x, padding))
                assert got.dtype == dtype and got.shape == want.shape
                np.testing.assert_array_equal(got, want, err_msg=f"{dtype.__name__} lead={lead}")


@pytest.mark.parametrize("nside,padding", [(n, p) for n in (1, 2, 4) for p in (1, 2) if p <= n])
def test_pad_vjp_is_dense_transpose(nside, padding):
    """VJP = transpose of the padding matrix (the former pad applied to the identity)."""
    npix = 12 * nside**2
    eye = jnp.eye(npix, dtype=jnp.float32)[..., None]  # npix maps of 1 channel
    dense = np.asarray(jax.jit(_gather_pad, static_argnums=1)(eye, padding)).reshape(npix, -1)  # (pixel, padded pos.)
    rng = np.random.default_rng(7)
    m = nside + 2 * padding
    ct = rng.standard_normal((2, 3, 12, m, m, 1)).astype(np.float32)
    want = np.einsum("ij,abj->abi", dense.astype(np.float64), ct.reshape(2, 3, -1))[..., None]
    x = jnp.zeros((2, 3, npix, 1), jnp.float32)
    vjp_fn = jax.jit(lambda x, ct: jax.vjp(lambda v: hp.pad(v, padding), x)[1](ct)[0])
    np.testing.assert_allclose(np.asarray(vjp_fn(x, jnp.asarray(ct))), want, rtol=0, atol=1e-6)
    # under vmap, and the name the remat path uses
    g = jax.vmap(jax.grad(lambda v, c: jnp.vdot(hp.pad_gather_transposed(v, padding), c)))(x[0], jnp.asarray(ct[0]))
    np.testing.assert_allclose(np.asarray(g), want[0], rtol=0, atol=1e-6)


def test_pad_vjp_has_no_full_size_buffer():
    """The backward is a slice + small gathers: no scatter, no zero-filled (12 n^2, C) array."""
    n, c = 16, 4
    x = jnp.ones((12 * n * n, c))
    ct = jnp.ones((12, n + 2, n + 2, c))
    _, vjp_fn = jax.vjp(lambda v: hp.pad(v, 1), x)
    jaxpr = str(jax.make_jaxpr(vjp_fn)(ct))
    assert "scatter" not in jaxpr
    assert f"f32[{12 * n * n},{c}]=broadcast_in_dim" not in jaxpr.replace(" ", "")
    assert "scatter" not in jax.jit(vjp_fn).lower(ct).as_text()


def test_pad_border_tables():
    """The border is 12 * 4p(n + p) positions; every averaged position lies in it."""
    for n, p in [(1, 1), (4, 1), (4, 3), (64, 1), (64, 2)]:
        index, avg_pos, avg_src = hp.pad_border(n, p)
        assert index.shape == (12 * 4 * p * (n + p),)
        assert avg_pos.shape == avg_src.shape[1:] and np.all(avg_pos < index.size)
        t_index, t_weight = hp.pad_border_transpose(n, p)
        frame = 12 * (n * n - max(n - 2 * p, 0) ** 2)
        assert t_index.shape == t_weight.shape and t_index.shape[0] == frame


def test_bad_npix():
    with pytest.raises(ValueError, match="HEALPix"):
        hp.nside_of_npix(100)
