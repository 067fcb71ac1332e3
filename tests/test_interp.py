"""ang2pix / interp_weights against healpy (exact pixel indices, weights to 1e-12)."""

from __future__ import annotations

import healpy as hp
import numpy as np
import pytest

from jaxguide import healpix as H


def _points(rng, n):
    lon = rng.uniform(-180.0, 360.0, n)
    lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    # poles, near-poles, cap/belt boundary (|z| = 2/3), lon wrap, equator
    extra_lat = [90, -90, 89.999999, -89.9999999, 89.5, -89.5, 0.0, 41.8103148958, -41.8103148958, 10, -10]
    extra_lon = [0, 10, 200, 300, 359.9999999, -0.0000001, 0, 45, 45, 360.0, -180.0]
    return np.concatenate([lon, extra_lon]), np.concatenate([lat, extra_lat])


@pytest.mark.parametrize("nside", [1, 2, 8, 64])
def test_ang2pix_matches_healpy(nside):
    lon, lat = _points(np.random.default_rng(nside), 20000)
    np.testing.assert_array_equal(H.ang2pix(nside, lon, lat, "ring"), hp.ang2pix(nside, lon, lat, lonlat=True))
    np.testing.assert_array_equal(
        H.ang2pix(nside, lon, lat, "nest"), hp.ang2pix(nside, lon, lat, lonlat=True, nest=True)
    )


@pytest.mark.parametrize("nside", [1, 4, 64])
def test_interp_weights_match_healpy(nside):
    lon, lat = _points(np.random.default_rng(10 + nside), 20000)
    pix, w = H.interp_weights(nside, lon, lat, "ring")
    hpix, hw = hp.get_interp_weights(nside, lon, lat, lonlat=True)
    np.testing.assert_array_equal(pix, hpix.T)
    np.testing.assert_allclose(w, hw.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)


def test_interp_values_net_order_match_healpy():
    nside = 64
    rng = np.random.default_rng(3)
    field_ring = rng.normal(size=12 * nside**2)
    field_net = H.reorder(field_ring, "ring", "net")
    lon, lat = _points(rng, 5000)
    pix, w = H.interp_weights(nside, lon, lat, "net")
    got = (field_net[pix] * w).sum(-1)
    want = hp.get_interp_val(field_ring, lon, lat, lonlat=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    # nearest: the containing pixel, mapped to net order
    np.testing.assert_array_equal(
        field_net[H.ang2pix(nside, lon, lat, "net")], field_ring[hp.ang2pix(nside, lon, lat, lonlat=True)]
    )


def test_pixel_centres_are_exact():
    nside = 16
    lon, lat = H.lonlat(nside, "net")
    pix, w = H.interp_weights(nside, lon, lat, "net")
    best = np.argmax(w, axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(pix, best[:, None], -1)[:, 0], np.arange(lon.size))
    np.testing.assert_allclose(w.max(-1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(H.ang2pix(nside, lon, lat, "net"), np.arange(lon.size))


def test_bad_latitude_raises():
    with pytest.raises(ValueError, match="latitude"):
        H.ang2pix(4, [0.0], [91.0])
    with pytest.raises(ValueError, match="latitude"):
        H.interp_weights(4, [0.0], [np.nan])
