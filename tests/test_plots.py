from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from jaxguide.grid import healpix

from jaxguide.verification import plots


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


def _captured(monkeypatch):
    """Record the figures plots would save (to read titles, legends and markers)."""
    figs = []
    real = plots._save_atomic

    def save(fig, path, dpi):
        figs.append(fig)
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "_save_atomic", save)
    return figs


def test_maps_title_legend_and_markers(tmp_path, monkeypatch):
    figs = _captured(monkeypatch)
    nside = 8
    lon, lat = healpix.lonlat(nside, "nest")
    ens = 280 + 10 * np.cos(np.radians(lat)) + np.random.default_rng(0).normal(size=(3, lon.size))
    plots.plot_maps(tmp_path / "m.png", ens, prior=ens - 1.0, obs_lon=[10.0, 200.0], obs_lat=[45.0, -30.0],
                    held_out_lon=[100.0], held_out_lat=[0.0], name="T850", units="K",
                    valid_time="2020-01-20T06:00", figsize=(12, 4), dpi=40)
    fig = figs[-1]
    assert "2020-01-20 06:00 UTC" in fig._suptitle.get_text()
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert labels == ["assimilated (2)", "held out (1)"]
    # every panel draws both station sets with a dark edge around a light or bright face
    for ax in [a for a in fig.axes if a.name == "mollweide"]:
        sets = ax.collections[1:]  # [0] is the field
        assert len(sets) == 2
        for s in sets:
            assert np.allclose(s.get_edgecolor()[0][:3], 0.0) and s.get_facecolor()[0][:3].max() == 1.0
    assert fig.get_layout_engine() is not None  # constrained layout: nothing overlaps or is cut


def test_rank_bins_follow_the_number_of_observations(tmp_path, monkeypatch):
    assert plots.rank_bins(9, 1000).tolist() == list(range(10))  # enough data: one bar per rank
    edges = plots.rank_bins(65, 23)  # 64 members, 23 observations: 4 bins of ~16 ranks
    assert len(edges) == 5 and edges[0] == 0 and edges[-1] == 65 and np.ptp(np.diff(edges)) <= 1
    assert len(plots.rank_bins(65, 3)) == 3  # never fewer than 2 bins
    figs = _captured(monkeypatch)
    counts = np.zeros(65, int)
    counts[[0, 10, 30, 64]] = [5, 6, 7, 5]
    plots.plot_rank_histogram(tmp_path / "r.png", counts, dpi=40)
    ax = figs[-1].axes[0]
    bars = [p for p in ax.patches if hasattr(p, "get_height")]
    assert len(bars) == 4 and sum(b.get_height() for b in bars) == counts.sum()
    assert "n = 23" in ax.get_title()
