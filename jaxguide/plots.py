"""Figures of analyses (matplotlib, Agg, no downloads; written atomically).

HEALPix fields are drawn by sampling them on an equirectangular raster (by default the
pixel containing each raster cell centre, :mod:`jaxguide.grid_sampling`'s "nearest", so
each HEALPix pixel shows as its own shape; "bilinear" gives the observation operator's
smooth interpolation) and showing the raster on matplotlib's built-in Mollweide
projection. No coastlines (they would need a download). Figures are drawn
on an explicit Agg canvas: no pyplot, no global backend switch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxguide import grid_sampling, healpix
from jaxguide.io import atomic_write


@functools.lru_cache(maxsize=8)
def _raster_stencil(nside: int, order: str, height: int, width: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    lat = 90.0 - 180.0 * (np.arange(height) + 0.5) / height  # north to south
    lon = -180.0 + 360.0 * (np.arange(width) + 0.5) / width
    glon, glat = np.meshgrid(lon, lat)
    pix, w = grid_sampling.stencil(nside, glon, glat, method, order)
    pix.setflags(write=False)
    w.setflags(write=False)
    return pix, w


def healpix_to_image(
    field, *, order: healpix.Order = "nest", height: int = 180, width: int = 360, method: grid_sampling.Method = "nearest"
) -> np.ndarray:
    """(npix,) HEALPix field -> (height, width) equirectangular raster, float64.

    ``method``: "nearest" (the containing pixel) or "bilinear" (the observation
    operator's interpolation). Row 0 is the northernmost row, column 0 starts at
    longitude -180 deg."""
    field = np.asarray(field, np.float64)
    if field.ndim != 1:
        raise ValueError(f"expected one (npix,) field, got shape {field.shape}")
    nside = healpix.nside_of_npix(field.shape[0])
    return grid_sampling.sample(field, *_raster_stencil(nside, order, int(height), int(width), method))


def _save_atomic(fig: Figure, path: str | os.PathLike, dpi: float) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _map_panel(fig: Figure, pos: int, n: int, image: np.ndarray, title: str, cmap: str, symmetric: bool, obs_lonlat, units: str):
    ax = fig.add_subplot(1, n, pos, projection="mollweide")
    h, w = image.shape
    lon_edges = np.radians(np.linspace(-180.0, 180.0, w + 1))
    lat_edges = np.radians(np.linspace(90.0, -90.0, h + 1))
    finite = image[np.isfinite(image)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if symmetric:
        vmax = max(abs(vmin), abs(vmax)) or 1.0
        vmin = -vmax
    mesh = ax.pcolormesh(lon_edges, lat_edges, image, cmap=cmap, vmin=vmin, vmax=vmax, shading="flat", rasterized=True)
    if obs_lonlat is not None:
        olon, olat = obs_lonlat
        olon = (np.asarray(olon, np.float64) + 180.0) % 360.0 - 180.0
        ax.scatter(np.radians(olon), np.radians(np.asarray(olat, np.float64)), s=14, c="k", marker="x", linewidths=0.8, label="observations")
    ax.set_title(title, fontsize=9)
    ax.set_xticklabels([])
    ax.grid(True, linewidth=0.3)
    fig.colorbar(mesh, ax=ax, orientation="horizontal", pad=0.05, shrink=0.8, label=units)


def plot_maps(
    path: str | os.PathLike,
    ensemble,
    *,
    order: healpix.Order = "nest",
    prior=None,
    obs_lon: Sequence[float] | None = None,
    obs_lat: Sequence[float] | None = None,
    name: str = "",
    units: str = "",
    figsize: tuple[float, float] = (15.0, 4.0),
    dpi: float = 100.0,
    raster: tuple[int, int] = (180, 360),
) -> Path:
    """Mollweide maps of the ensemble mean, the increment (mean - prior mean, if
    ``prior`` is given) and the spread (if M >= 2), observations overlaid.

    Args:
      ensemble: (M, npix) or (npix,) one channel, physical units, pixel ``order``.
      prior: (Mp, npix) prior ensemble or (npix,) prior mean, same order/units.
      obs_lon, obs_lat: observation locations (degrees).
    Returns the PNG path (``figsize * dpi`` pixels).
    """
    ens = np.asarray(ensemble, np.float64)
    ens = ens[None] if ens.ndim == 1 else ens
    if ens.ndim != 2:
        raise ValueError(f"ensemble must be (M, npix) or (npix,), got shape {np.shape(ensemble)}")
    mean = ens.mean(axis=0)
    panels = [(mean, f"{name} ensemble mean (M={ens.shape[0]})", "viridis", False)]
    if prior is not None:
        p = np.asarray(prior, np.float64)
        p_mean = p.mean(axis=0) if p.ndim == 2 else p
        if p_mean.shape != mean.shape:
            raise ValueError(f"prior has {p_mean.shape[-1]} pixels, ensemble {mean.shape[-1]}")
        panels.append((mean - p_mean, f"{name} increment (analysis - prior mean)", "RdBu_r", True))
    if ens.shape[0] >= 2:
        panels.append((ens.std(axis=0, ddof=1), f"{name} ensemble spread", "magma", False))
    obs = None if obs_lon is None or obs_lat is None else (obs_lon, obs_lat)
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    for i, (field, title, cmap, sym) in enumerate(panels, start=1):
        img = healpix_to_image(field, order=order, height=raster[0], width=raster[1])
        _map_panel(fig, i, len(panels), img, title, cmap, sym, obs, units)
    return _save_atomic(fig, path, dpi)


def plot_rank_histogram(
    path: str | os.PathLike, counts, *, title: str = "rank histogram", figsize: tuple[float, float] = (5.0, 3.5), dpi: float = 100.0
) -> Path:
    """Bar chart of rank-histogram ``counts`` (M + 1,), with the flat expectation."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"counts must be (M + 1,) with M >= 1, got shape {counts.shape}")
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ranks = np.arange(counts.size)
    ax.bar(ranks, counts, color="tab:blue", width=0.9)
    ax.axhline(counts.sum() / counts.size, color="k", linestyle="--", linewidth=1, label="flat")
    ax.set_xlabel("rank of observation among members")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save_atomic(fig, path, dpi)
