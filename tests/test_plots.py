from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from jaxguide import healpix, plots


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])  # width, height


def test_healpix_to_image_matches_coordinates():
    nside = 16
    lon, lat = healpix.lonlat(nside, "nest")
    img = plots.healpix_to_image(lat, order="nest", height=90, width=180)
    assert img.shape == (90, 180)
    row_lat = 90.0 - 2.0 * (np.arange(90) + 0.5)
    # nearest pixel centre is within a pixel size (~3.7 deg at nside 16) of each raster cell
    assert np.max(np.abs(img - row_lat[:, None])) < 4.0
    assert img[0].mean() > 80 and img[-1].mean() < -80
    # net order input gives the same picture as nest order
    img_net = plots.healpix_to_image(healpix.reorder(lat, "nest", "net"), order="net", height=90, width=180)
    np.testing.assert_array_equal(img, img_net)
    # longitude: column 0 is at -180 deg
    lon_img = plots.healpix_to_image(((np.asarray(lon) + 180) % 360) - 180, height=90, width=180)
    assert abs(np.median(lon_img[45:50, 0]) + 180) < 10 or abs(np.median(lon_img[45:50, 0]) - 180) < 10
    assert abs(np.median(lon_img[45:50, 90])) < 10


def test_plot_maps_png_size_and_atomic(tmp_path):
    nside = 8
    lon, lat = healpix.lonlat(nside, "nest")
    rng = np.random.default_rng(0)
    ens = 280 + 10 * np.cos(np.radians(lat)) + rng.normal(size=(4, lon.size))
    out = plots.plot_maps(
        tmp_path / "maps.png", ens, prior=ens - 1.0, obs_lon=[10.0, 200.0], obs_lat=[45.0, -30.0], name="tas", units="K", figsize=(12, 4), dpi=50
    )
    assert png_size(out) == (600, 200)
    assert os.listdir(tmp_path) == ["maps.png"]
    one = plots.plot_maps(tmp_path / "one.png", ens[0], figsize=(4, 3), dpi=50)
    assert png_size(one) == (200, 150)
    with pytest.raises(ValueError):
        plots.plot_maps(tmp_path / "bad.png", ens, prior=np.zeros(10))
    with pytest.raises(FileNotFoundError):
        plots.plot_maps(tmp_path / "missing" / "x.png", ens)
    assert sorted(os.listdir(tmp_path)) == ["maps.png", "one.png"]


def test_plot_rank_histogram(tmp_path):
    out = plots.plot_rank_histogram(tmp_path / "rank.png", [5, 7, 6, 4, 8], figsize=(5, 3.5), dpi=40)
    assert png_size(out) == (200, 140)
    with pytest.raises(ValueError):
        plots.plot_rank_histogram(tmp_path / "r2.png", [3])
