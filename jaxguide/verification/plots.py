"""Figures of analyses (matplotlib, Agg, no downloads; written atomically).

HEALPix fields are drawn by sampling them on an equirectangular raster (by default the
pixel containing each raster cell centre, :mod:`jaxguide.grid.latlon`'s "nearest", so
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

from jaxguide.grid import latlon as grid_sampling, healpix
from jaxguide.io.files import atomic_write


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


# observation markers: a light face with a dark edge stays visible on every colormap
_MARKERS = {
    "assimilated": dict(marker="o", s=22, facecolors="white", edgecolors="black", linewidths=0.9),
    "held out": dict(marker="^", s=30, facecolors="#ff00ff", edgecolors="black", linewidths=0.9),
}


def _map_panel(fig: Figure, pos: int, n: int, image: np.ndarray, title: str, cmap: str, symmetric: bool,
               stations: dict, units: str):
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
    for label, (olon, olat) in stations.items():
        olon = (np.asarray(olon, np.float64) + 180.0) % 360.0 - 180.0
        ax.scatter(np.radians(olon), np.radians(np.asarray(olat, np.float64)), label=f"{label} ({olon.size})",
                   zorder=3, **_MARKERS[label])
    if stations and pos == 1:
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, -0.05), fontsize=7, framealpha=0.9)
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
    held_out_lon: Sequence[float] | None = None,
    held_out_lat: Sequence[float] | None = None,
    name: str = "",
    units: str = "",
    valid_time=None,
    figsize: tuple[float, float] = (15.0, 4.0),
    dpi: float = 100.0,
    raster: tuple[int, int] = (180, 360),
) -> Path:
    """Mollweide maps of the ensemble mean, the increment (mean - prior mean, if
    ``prior`` is given) and the spread (if M >= 2), observations overlaid.

    Args:
      ensemble: (M, npix) or (npix,) one channel, physical units, pixel ``order``.
      prior: (Mp, npix) prior ensemble or (npix,) prior mean, same order/units.
      obs_lon, obs_lat: assimilated observation locations (degrees); white circles.
      held_out_lon, held_out_lat: held-out (verification) locations; magenta triangles.
      valid_time: the analysis time, shown in the title (anything ``pandas.Timestamp`` reads).
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
    stations = {}
    if obs_lon is not None and obs_lat is not None:
        stations["assimilated"] = (obs_lon, obs_lat)
    if held_out_lon is not None and held_out_lat is not None:
        stations["held out"] = (held_out_lon, held_out_lat)
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (field, title, cmap, sym) in enumerate(panels, start=1):
        img = healpix_to_image(field, order=order, height=raster[0], width=raster[1])
        _map_panel(fig, i, len(panels), img, title, cmap, sym, stations, units)
    if valid_time is not None:
        import pandas as pd

        fig.suptitle(f"{name} valid {pd.Timestamp(valid_time).strftime('%Y-%m-%d %H:%M')} UTC".strip(), fontsize=11)
    return _save_atomic(fig, path, dpi)


def rank_bins(n_ranks: int, n_obs: int, per_bin: float = 5.0) -> np.ndarray:
    """Edges (k + 1,) grouping ``n_ranks`` = M + 1 ranks into k contiguous bins of
    near-equal size so that a flat histogram expects >= ``per_bin`` counts per bin
    (k = M + 1 when there are enough observations, never fewer than 2 bins)."""
    k = int(np.clip(np.floor(n_obs / per_bin), 2, n_ranks))
    return np.round(np.linspace(0, n_ranks, k + 1)).astype(int)


def plot_rank_histogram(
    path: str | os.PathLike, counts, *, title: str = "rank histogram", figsize: tuple[float, float] = (5.0, 3.5),
    dpi: float = 100.0, per_bin: float = 5.0,
) -> Path:
    """Bar chart of rank-histogram ``counts`` (M + 1,), with the flat expectation.

    With few observations for the ensemble size, adjacent ranks are merged
    (:func:`rank_bins`) so that each bar expects >= ``per_bin`` counts; bars span the
    ranks they hold, and the flat expectation is drawn per bar."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"counts must be (M + 1,) with M >= 1, got shape {counts.shape}")
    n = float(counts.sum())
    edges = rank_bins(counts.size, int(n), per_bin)
    binned = np.add.reduceat(counts, edges[:-1])
    widths = np.diff(edges)
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    left = edges[:-1] - 0.5
    ax.bar(left, binned, width=widths * 0.95, align="edge", color="tab:blue")
    ax.stairs(n * widths / counts.size, edges - 0.5, color="k", linestyle="--", linewidth=1, label="flat")
    ax.set_xlabel("rank of observation among members" + (f" ({len(widths)} bins)" if len(widths) < counts.size else ""))
    ax.set_ylabel("count")
    ax.set_title(f"{title}, n = {int(n)}", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    return _save_atomic(fig, path, dpi)


def plot_frame_skill(
    path: str | os.PathLike, hours, series: dict[str, Sequence[float]], *, observed=None, title: str = "skill per frame",
    units: str = "K", figsize: tuple[float, float] = (6.0, 3.8), dpi: float = 100.0,
) -> Path:
    """Lines of per-frame scores (e.g. RMSE and spread) against the frame's time in hours.

    hours: (T,) frame offsets from the window start; series: label -> (T,) values (a
    label containing "spread" or "std" is dashed); observed: (T,) bool, frames that
    have observations (shaded)."""
    h = np.asarray(hours, np.float64)
    if h.ndim != 1 or h.size < 1:
        raise ValueError(f"hours must be (T,) with T >= 1, got shape {h.shape}")
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if observed is not None:
        obs = np.asarray(observed, bool)
        step = float(np.diff(h).min()) if h.size > 1 else 1.0
        for t in h[obs]:
            ax.axvspan(t - step / 2, t + step / 2, color="0.9", zorder=0)
    for label, values in series.items():
        v = np.asarray(values, np.float64)
        if v.shape != h.shape:
            raise ValueError(f"series {label!r} has shape {v.shape}, expected {h.shape}")
        dashed = "spread" in label or "std" in label
        ax.plot(h, v, marker="o", linestyle="--" if dashed else "-", label=label)
    ax.set_xlabel("hours from the window start" + (" (shaded: frames with observations)" if observed is not None else ""))
    ax.set_ylabel(units)
    ax.set_xticks(h)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save_atomic(fig, path, dpi)
