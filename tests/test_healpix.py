"""HEALPix orderings, coordinates and padding against earth2grid's outputs (healpix.npz)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_reorder_roundtrip():
    x = np.random.default_rng(0).normal(size=(2, 12 * 16 * 16))
    for src in ORDERS:
        for dest in ORDERS:
            back = hp.reorder(hp.reorder(x, src, dest), dest, src)
            np.testing.assert_array_equal(back, x)


def test_pad_grad_and_vmap():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 12 * 8 * 8, 2)))
    f = lambda v: jnp.sum(hp.pad(v, 1) ** 2)
    g = jax.jit(jax.grad(f))(x[0])
    assert g.shape == x[0].shape and bool(jnp.all(jnp.isfinite(g)))
    batched = jax.vmap(lambda v: hp.pad(v, 1))(x)
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(hp.pad(x, 1)))


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
