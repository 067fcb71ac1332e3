"""grid_sampling against healpy: the containing pixel (ang2pix) and HEALPix bilinear
interpolation (get_interp_weights / get_interp_val), exact pixel indices and weights to
1e-12, at random points plus points near the poles and across the lon wraparound.

And the consumers agree with each other: the observation operator, ``--regrid`` and the
plots sample a field exactly like the scheme they name (on the old code ``--regrid``
used a second bilinear scheme that differed poleward of the outermost rings).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_module
from jaxguide.grid import latlon as G
from jaxguide.grid import healpix as H
from jaxguide import io, observations
from jaxguide.verification import plots

hp = require_module("healpy")


def _points(rng, n):
    """Uniform points on the sphere, points within 1 deg of each pole, points within
    1e-6 deg of the 0/360 meridian (from both sides, in both lon conventions) and the
    exact poles, cap/belt boundaries (|z| = 2/3) and lon = 360, -180."""
    lon = rng.uniform(-180.0, 360.0, n)
    lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    k = n // 4
    pole_lat = np.concatenate([rng.uniform(89.0, 90.0, k), rng.uniform(-90.0, -89.0, k)])
    pole_lon = rng.uniform(0.0, 360.0, 2 * k)
    wrap_lon = np.concatenate([rng.uniform(-1e-6, 0.0, k), rng.uniform(360 - 1e-6, 360.0, k), rng.uniform(0.0, 1e-6, k)])
    wrap_lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, 3 * k)))
    extra_lat = [90, -90, 89.999999, -89.9999999, 89.5, -89.5, 0.0, 41.8103148958, -41.8103148958, 10, -10]
    extra_lon = [0, 10, 200, 300, 359.9999999, -0.0000001, 0, 45, 45, 360.0, -180.0]
    return np.concatenate([lon, pole_lon, wrap_lon, extra_lon]), np.concatenate([lat, pole_lat, wrap_lat, extra_lat])


@pytest.mark.parametrize("nside", [1, 8, 16, 64])
def test_nearest_is_healpy_ang2pix(nside):
    lon, lat = _points(np.random.default_rng(nside), 20000)
    np.testing.assert_array_equal(G.ang2pix(nside, lon, lat, "ring"), hp.ang2pix(nside, lon, lat, lonlat=True))
    want_nest = hp.ang2pix(nside, lon, lat, lonlat=True, nest=True)
    np.testing.assert_array_equal(G.ang2pix(nside, lon, lat, "nest"), want_nest)
    pix, w = G.stencil(nside, lon, lat, "nearest", "nest")
    np.testing.assert_array_equal(pix[:, 0], want_nest)
    np.testing.assert_array_equal(w, np.broadcast_to([1.0, 0.0, 0.0, 0.0], w.shape))


@pytest.mark.parametrize("nside", [1, 8, 16, 64])
def test_bilinear_is_healpy_get_interp_weights(nside):
    lon, lat = _points(np.random.default_rng(10 + nside), 20000)
    for order, nest in (("ring", False), ("nest", True)):
        pix, w = G.stencil(nside, lon, lat, "bilinear", order)
        hpix, hw = hp.get_interp_weights(nside, lon, lat, lonlat=True, nest=nest)
        np.testing.assert_array_equal(pix, hpix.T)
        np.testing.assert_allclose(w, hw.T, rtol=0, atol=1e-12)
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)


@pytest.mark.parametrize("nside", [8, 16, 64])
def test_sample_values_match_healpy_in_every_order(nside):
    rng = np.random.default_rng(3 + nside)
    field_ring = rng.normal(size=12 * nside**2)
    lon, lat = _points(rng, 5000)
    want_bilinear = hp.get_interp_val(field_ring, lon, lat, lonlat=True)
    want_nearest = field_ring[hp.ang2pix(nside, lon, lat, lonlat=True)]
    for order in ("ring", "nest", "net"):
        field = H.reorder(field_ring, "ring", order)
        np.testing.assert_allclose(G.sample_at(field, lon, lat, "bilinear", order), want_bilinear, rtol=0, atol=1e-10)
        np.testing.assert_array_equal(G.sample_at(field, lon, lat, "nearest", order), want_nearest)
    # the JAX path of sample (what runs under jit) gives the same values
    pix, w = G.stencil(nside, lon, lat, "bilinear", "net")
    got = G.sample(jnp.asarray(H.reorder(field_ring, "ring", "net"), jnp.float32), pix, w)
    np.testing.assert_allclose(np.asarray(got), want_bilinear, rtol=0, atol=1e-5)


def test_pixel_centres_are_exact():
    nside = 16
    lon, lat = H.lonlat(nside, "net")
    pix, w = G.interp_weights(nside, lon, lat, "net")
    best = np.argmax(w, axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(pix, best[:, None], -1)[:, 0], np.arange(lon.size))
    np.testing.assert_allclose(w.max(-1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(G.ang2pix(nside, lon, lat, "net"), np.arange(lon.size))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="latitude"):
        G.ang2pix(4, [0.0], [91.0])
    with pytest.raises(ValueError, match="latitude"):
        G.interp_weights(4, [0.0], [np.nan])
    with pytest.raises(ValueError, match="interpolation"):
        G.stencil(4, [0.0], [0.0], "cubic")
    with pytest.raises(ValueError, match="interpolation"):
        G.LatLonGrid(4, 8, "kdtree")


def _operator_values(field_net: np.ndarray, lon, lat, method: str) -> np.ndarray:
    """What assimilate's observation operator reads from a one-channel field."""
    op = observations.build_operator({"lon": lon.ravel(), "lat": lat.ravel(), "variable": np.zeros(lon.size, int)},
                                     ["x"], nside=H.nside_of_npix(field_net.size), method=method)
    return np.asarray(op(jnp.asarray(field_net[None, None], jnp.float32)), np.float64).reshape(lon.shape)


@pytest.mark.parametrize("nside", [8, 16])
def test_regrid_is_the_observation_operator(nside):
    """``--regrid`` (io.regrid_to_latlon) samples like the operator of ``assimilate``,
    poleward of the outermost rings too. Failed on the old code: io.bilinear_weights, a
    second scheme, differed by up to 1.25 (nside 8) on a unit-variance white-noise field in
    the rows poleward of the outermost rings, and the KD-tree "nearest" read another pixel
    at 11.5 % of the grid points."""
    rng = np.random.default_rng(nside)
    field_nest = rng.normal(size=12 * nside**2)
    field_net = H.reorder(field_nest, "nest", "net")
    for method in ("bilinear", "nearest"):
        grid = G.LatLonGrid(90, 180, method)  # 2-degree rows: several poleward of the outermost ring
        got = G.regrid_to_latlon(field_nest, grid)
        glat, glon = grid.coords()
        lon2, lat2 = np.meshgrid(glon, glat)
        want = _operator_values(field_net, lon2, lat2, method)
        assert got.shape == (90, 180)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32 operator weights
    # and both are healpy's interpolation
    got = G.regrid_to_latlon(field_nest, G.LatLonGrid(90, 180, "bilinear"))
    np.testing.assert_allclose(got, hp.get_interp_val(field_nest, lon2, lat2, nest=True, lonlat=True), rtol=0, atol=1e-12)


def test_regrid_bilinear_accuracy():
    """Bilinear regridding keeps a constant exactly and beats nearest on a smooth field."""
    nside = 8
    lon_p, lat_p = H.lonlat(nside, "nest")
    grid_b = G.LatLonGrid(20, 40, "bilinear")
    glat, glon = grid_b.coords()
    g_lon, g_lat = np.meshgrid(glon, glat)
    f = np.cos(np.radians(lat_p)) * np.sin(np.radians(2 * lon_p))
    truth = np.cos(np.radians(g_lat)) * np.sin(np.radians(2 * g_lon))
    err_b = np.abs(G.regrid_to_latlon(f, grid_b) - truth).max()
    err_n = np.abs(G.regrid_to_latlon(f, G.LatLonGrid(20, 40, "nearest")) - truth).max()
    assert err_b < 0.05 and err_b < 0.5 * err_n
    const = G.regrid_to_latlon(np.full(lon_p.size, 3.5), grid_b)
    np.testing.assert_allclose(const, 3.5, rtol=0, atol=1e-12)


def test_plots_raster_is_the_containing_pixel():
    nside = 16
    field = np.arange(12 * nside**2, dtype=np.float64)  # value = NEST index
    img = plots.healpix_to_image(field, order="nest", height=45, width=90)
    lat = 90.0 - 4.0 * (np.arange(45) + 0.5)
    lon = -180.0 + 4.0 * (np.arange(90) + 0.5)
    glon, glat = np.meshgrid(lon, lat)
    np.testing.assert_array_equal(img, hp.ang2pix(nside, glon, glat, nest=True, lonlat=True))
    smooth = plots.healpix_to_image(field, order="nest", height=45, width=90, method="bilinear")
    np.testing.assert_allclose(smooth, hp.get_interp_val(field, glon, glat, nest=True, lonlat=True), rtol=0, atol=1e-9)
