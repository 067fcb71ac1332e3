"""Sampling HEALPix fields at points on the sphere: one definition of each scheme.

Two schemes, used by everything that reads a HEALPix field at a location (the
observation operator, ``jaxguide evaluate``, ``--regrid`` to lat/lon, the plots):

- ``"nearest"``: the pixel that CONTAINS the point (HEALPix ``ang2pix``), not the
  pixel with the nearest centre (they differ for ~9 % of random points);
- ``"bilinear"``: HEALPix's own interpolation (``get_interpol``): four pixel centres on
  the two rings bracketing the point, linear in longitude within each ring and in
  colatitude between them; poleward of the outermost ring the pole value is the mean
  of that ring's four pixels.

:func:`ang2pix` and :func:`interp_weights` are NumPy re-implementations of HEALPix
C++ ``loc2pix`` (ring scheme) and ``get_interpol`` (what ``healpy.ang2pix`` /
``healpy.get_interp_weights`` call) and agree with healpy pixel for pixel. A
:func:`stencil` is four pixels and weights per point (nearest: weights 1, 0, 0, 0), so
one gather + weighted sum (:func:`sample`) serves both schemes, in NumPy or inside
``jit``/``vmap``/``grad``.

The other direction, a regular lat/lon grid read at points (ERA5 at observation points,
the AMIP SST at HEALPix pixel centres), is :func:`bilinear_latlon` (NumPy, earth2grid's
rules for points outside the grid and NaN in the stencil).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from jaxguide.grid.healpix import Order, check_nside, nside_of_npix, permutation

Method = Literal["nearest", "bilinear"]
METHODS: tuple[str, ...] = ("bilinear", "nearest")


def _lonlat_to_theta_phi(lon, lat) -> tuple[np.ndarray, np.ndarray]:
    """Colatitude theta in [0, pi] and longitude phi in [0, 2 pi), radians, float64."""
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    if np.any(~np.isfinite(lat)) or np.any(np.abs(lat) > 90.0):
        raise ValueError("latitude must be finite and within [-90, 90] degrees")
    if np.any(~np.isfinite(lon)):
        raise ValueError("longitude must be finite")
    theta = np.pi / 2 - np.radians(lat)
    theta = np.clip(theta, 0.0, np.pi)
    phi = np.mod(np.radians(lon), 2 * np.pi)
    phi = np.where(phi >= 2 * np.pi, 0.0, phi)
    return theta, phi


def _ring_to(nside: int, order: str, ring_pix: np.ndarray) -> np.ndarray:
    """Map RING pixel indices to ``order`` (int64)."""
    if order == "ring":
        return ring_pix.astype(np.int64)
    # permutation(nside, order, "ring")[r] = index in ``order`` of ring pixel r
    return permutation(nside, order, "ring")[ring_pix].astype(np.int64)


def ang2pix(nside: int, lon, lat, order: Order = "net") -> np.ndarray:
    """Pixel containing each point (healpy ``ang2pix(..., lonlat=True)`` semantics).

    Args:
      lon: (...) degrees, any range (taken modulo 360).
      lat: (...) degrees in [-90, 90].
    Returns:
      (...) int64 pixel indices in ``order``.
    """
    n = check_nside(nside)
    theta, phi = _lonlat_to_theta_phi(lon, lat)
    shape = theta.shape
    theta, phi = theta.ravel(), phi.ravel()
    npix = 12 * n * n
    ncap = 2 * n * (n - 1)
    z = np.cos(theta)
    za = np.abs(z)
    tt = np.mod(phi / (np.pi / 2), 4.0)
    # equatorial belt
    temp1 = n * (0.5 + tt)
    temp2 = n * z * 0.75
    jp = (temp1 - temp2).astype(np.int64)
    jm = (temp1 + temp2).astype(np.int64)
    ir = n + 1 + jp - jm
    kshift = 1 - (ir & 1)
    t1 = jp + jm - n + kshift + 1 + 8 * n
    ip = (t1 >> 1) % (4 * n)
    pix_eq = ncap + (ir - 1) * 4 * n + ip
    # polar caps (near the poles healpy uses sin(theta) for accuracy)
    have_sth = (theta < 0.01) | (theta > 3.14159 - 0.01)
    tp = tt - np.floor(tt)
    with np.errstate(invalid="ignore", divide="ignore"):
        tmp = np.where(
            (za < 0.99) | ~have_sth,
            n * np.sqrt(np.maximum(3 * (1 - za), 0.0)),
            n * np.sin(theta) / np.sqrt((1.0 + za) / 3.0),
        )
    jp = (tp * tmp).astype(np.int64)
    jm = ((1.0 - tp) * tmp).astype(np.int64)
    irc = jp + jm + 1
    ipc = (tt * irc).astype(np.int64) % (4 * irc)
    pix_cap = np.where(z > 0, 2 * irc * (irc - 1) + ipc, npix - 2 * irc * (irc + 1) + ipc)
    ring = np.where(za <= 2.0 / 3.0, pix_eq, pix_cap)
    return _ring_to(n, order, ring).reshape(shape)


def _ring_above(n: int, z: np.ndarray) -> np.ndarray:
    az = np.abs(z)
    eq = (n * (2 - 1.5 * z)).astype(np.int64)
    iring = (n * np.sqrt(3 * (1 - az))).astype(np.int64)
    cap = np.where(z > 0, iring, 4 * n - iring - 1)
    return np.where(az <= 2.0 / 3.0, eq, cap)


def _ring_info(n: int, ring: np.ndarray):
    """(start pixel, pixels in ring, theta of ring, shifted) for ring numbers 1..4n-1."""
    npix = 12 * n * n
    north = np.where(ring > 2 * n, 4 * n - ring, ring)
    cap = north < n
    tmp = north.astype(np.float64) ** 2 * (4.0 / npix)
    theta_cap = np.arctan2(np.sqrt(np.maximum(tmp * (2 - tmp), 0.0)), 1 - tmp)
    with np.errstate(invalid="ignore"):
        theta_eq = np.arccos(np.clip((2 * n - north) * (2.0 / (3.0 * n)), -1.0, 1.0))
    theta = np.where(cap, theta_cap, theta_eq)
    nr = np.where(cap, 4 * north, 4 * n)
    shifted = np.where(cap, True, ((north - n) & 1) == 0)
    start = np.where(cap, 2 * north * (north - 1), 2 * n * (n - 1) + (north - n) * 4 * n)
    south = north != ring
    theta = np.where(south, np.pi - theta, theta)
    start = np.where(south, npix - start - nr, start)
    return start, nr, theta, shifted


def _ring_pair(n: int, ring: np.ndarray, phi: np.ndarray):
    """Two pixels of ``ring`` bracketing ``phi`` and the weight of the second."""
    start, nr, theta, shifted = _ring_info(n, ring)
    dphi = 2 * np.pi / nr
    tmp = phi / dphi - 0.5 * shifted
    i1 = np.where(tmp < 0, np.trunc(tmp).astype(np.int64) - 1, np.trunc(tmp).astype(np.int64))
    w1 = (phi - (i1 + 0.5 * shifted) * dphi) / dphi
    i2 = i1 + 1
    i1 = np.where(i1 < 0, i1 + nr, i1)
    i2 = np.where(i2 >= nr, i2 - nr, i2)
    return start + i1, start + i2, w1, theta


def interp_weights(nside: int, lon, lat, order: Order = "net") -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation pixels and weights (healpy ``get_interp_weights``).

    Four pixel centres on the two rings bracketing the point, linear in longitude
    within each ring and in colatitude between rings; above the first (below the last)
    ring the polar value is the mean of the four ring pixels, as in HEALPix C++.

    Args:
      lon: (...) degrees, any range. lat: (...) degrees in [-90, 90].
    Returns:
      pixels (..., 4) int64 in ``order``; weights (..., 4) float64 summing to 1.
    """
    n = check_nside(nside)
    theta, phi = _lonlat_to_theta_phi(lon, lat)
    shape = theta.shape
    theta, phi = theta.ravel(), phi.ravel()
    npix = 12 * n * n
    z = np.cos(theta)
    ir1 = _ring_above(n, z)
    ir2 = ir1 + 1
    top = ir1 == 0
    bottom = ir2 == 4 * n
    p0, p1, w1a, theta1 = _ring_pair(n, np.where(top, 1, ir1), phi)
    p2, p3, w1b, theta2 = _ring_pair(n, np.where(bottom, 4 * n - 1, ir2), phi)
    w = np.stack([1 - w1a, w1a, 1 - w1b, w1b], axis=-1)
    pix = np.stack([p0, p1, p2, p3], axis=-1)

    # interior: linear in theta between the two rings
    with np.errstate(invalid="ignore", divide="ignore"):
        wt_mid = (theta - theta1) / (theta2 - theta1)
        wt_top = theta / theta2
        wt_bot = (theta - theta1) / (np.pi - theta1)
        w_mid = w * np.stack([1 - wt_mid, 1 - wt_mid, wt_mid, wt_mid], axis=-1)
    # north cap: ring-1 pixels from the lower ring, plus the pole as mean of ring 1
    fac = (1 - wt_top) * 0.25
    w_top = np.stack([fac, fac, w[:, 2] * wt_top + fac, w[:, 3] * wt_top + fac], axis=-1)
    pix_top = np.stack([(p2 + 2) & 3, (p3 + 2) & 3, p2, p3], axis=-1)
    fac = wt_bot * 0.25
    w_bot = np.stack([w[:, 0] * (1 - wt_bot) + fac, w[:, 1] * (1 - wt_bot) + fac, fac, fac], axis=-1)
    pix_bot = np.stack([p0, p1, ((p0 + 2) & 3) + npix - 4, ((p1 + 2) & 3) + npix - 4], axis=-1)

    weights = np.where(top[:, None], w_top, np.where(bottom[:, None], w_bot, w_mid))
    pix = np.where(top[:, None], pix_top, np.where(bottom[:, None], pix_bot, pix))
    pix = _ring_to(n, order, pix)
    return pix.reshape(*shape, 4), weights.reshape(*shape, 4)


# --------------------------------------------------------------------------------------
# stencils: one representation for both schemes


def check_method(method: str) -> str:
    """``method`` if it is a known scheme; else ValueError naming the valid ones."""
    if method not in METHODS:
        raise ValueError(f"unknown interpolation method {method!r}; expected one of {', '.join(METHODS)}")
    return method


def stencil(nside: int, lon, lat, method: Method = "bilinear", order: Order = "net") -> tuple[np.ndarray, np.ndarray]:
    """Pixels and weights that sample a field at points with ``method``.

    Args:
      nside: HEALPix resolution of the field.
      lon: (...) degrees, any range. lat: (...) degrees in [-90, 90].
      method: "bilinear" (:func:`interp_weights`) or "nearest" (:func:`ang2pix`, weights
        1, 0, 0, 0 on the containing pixel).
      order: pixel order of the field ("net", "nest" or "ring").
    Returns:
      pixels (..., 4) int64 in ``order``; weights (..., 4) float64 summing to 1.
    """
    check_method(method)
    if method == "bilinear":
        return interp_weights(nside, lon, lat, order)
    pix0 = ang2pix(nside, lon, lat, order)
    pix = np.repeat(pix0[..., None], 4, axis=-1)
    w = np.zeros(pix.shape, np.float64)
    w[..., 0] = 1.0
    return pix, w


def sample(field, pixels, weights):
    """Field values at the points of a stencil: ``sum_k field[..., pixels[p, k]] * weights[p, k]``.

    Args:
      field: (..., npix) NumPy or JAX array, in the stencil's pixel order.
      pixels, weights: (*P, 4) from :func:`stencil`.
    Returns (..., *P), NumPy for NumPy input (weights cast to the field's float dtype),
    JAX for JAX input (jit/vmap/grad friendly).
    """
    if isinstance(field, np.ndarray) or np.isscalar(field):
        field = np.asarray(field)
        dtype = field.dtype if np.issubdtype(field.dtype, np.floating) else np.float64
        vals = np.take(field, np.asarray(pixels), axis=-1)
        return np.sum(vals * np.asarray(weights, dtype), axis=-1).astype(dtype)
    import jax.numpy as jnp

    vals = jnp.take(field, jnp.asarray(pixels), axis=-1)
    return jnp.sum(vals * jnp.asarray(weights).astype(vals.dtype), axis=-1)


def sample_at(field, lon, lat, method: Method = "bilinear", order: Order = "net"):
    """(..., npix) field at points (lon, lat of shape P) -> (..., *P); see :func:`stencil`."""
    nside = nside_of_npix(np.shape(field)[-1])
    pix, w = stencil(nside, lon, lat, method, order)
    return sample(field, pix, w)


# --------------------------------------------------------------------------------------
# regular lat/lon grids


@dataclass(frozen=True)
class LatLonGrid:
    """Regular grid of cell centres: ``nlat`` latitudes south to north (centres of
    ``180 / nlat`` degree bands), ``nlon`` longitudes from 0 eastwards; sampled with
    ``method`` ("bilinear" or "nearest", see :func:`stencil`)."""

    nlat: int
    nlon: int
    method: Method = "bilinear"

    def __post_init__(self):
        check_method(self.method)
        if self.nlat < 1 or self.nlon < 1:
            raise ValueError(f"a lat/lon grid needs nlat, nlon >= 1, got {self.nlat}x{self.nlon}")

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """(lat (nlat,), lon (nlon,)) in degrees."""
        dlat, dlon = 180.0 / self.nlat, 360.0 / self.nlon
        return -90.0 + dlat * (np.arange(self.nlat) + 0.5), dlon * np.arange(self.nlon)

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """(lon, lat), each (nlat, nlon), of every grid point."""
        lat, lon = self.coords()
        glon, glat = np.meshgrid(lon, lat)
        return glon, glat


def regrid_to_latlon(field, grid: LatLonGrid, order: Order = "nest") -> np.ndarray:
    """(..., npix) HEALPix field in ``order`` -> (..., nlat, nlon) on ``grid``, with the
    same scheme as the observation operator (:func:`stencil`)."""
    field = np.asarray(field)
    glon, glat = grid.points()
    return sample_at(field, glon, glat, grid.method, order)


def bilinear_latlon(
    field: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    qlat: np.ndarray,
    qlon: np.ndarray,
    outside: Literal["nan", "clamp"] = "clamp",
) -> np.ndarray:
    """Bilinear interpolation of a global lat/lon field at points, periodic in lon.

    Args:
      field: (..., nlat, nlon); lat (nlat,) ascending or descending; lon (nlon,)
        covering the globe (any start; sorted internally).
      qlat, qlon: (m,) degrees.
      outside: latitudes poleward of the outermost grid row: ``"clamp"`` uses the
        outermost row, ``"nan"`` gives NaN (earth2grid). A NaN anywhere in a point's
        4-point stencil gives NaN (even at zero weight, as earth2grid's weighted sum).
    Returns:
      (..., m) float64.
    """
    field = np.asarray(field, dtype=np.float64)
    lat = np.asarray(lat, np.float64)
    lon = np.asarray(lon, np.float64) % 360.0
    qlat = np.asarray(qlat, np.float64).ravel()
    qlon = np.asarray(qlon, np.float64).ravel()
    if lat[0] > lat[-1]:
        lat, field = lat[::-1], field[..., ::-1, :]
    order = np.argsort(lon, kind="stable")
    lon, field = lon[order], field[..., order]
    nlat, nlon = lat.size, lon.size
    if nlat < 2 or nlon < 2:
        raise ValueError(f"need at least a 2 x 2 grid, got {nlat} x {nlon}")
    step = np.diff(np.append(lon, lon[0] + 360.0))
    if not np.allclose(step, step[0], rtol=0, atol=1e-3 * abs(step[0])) or step[0] <= 0:
        raise ValueError("longitudes must be a global, evenly spaced grid (regional grids are not supported)")
    lon_ext = np.concatenate([lon, [lon[0] + 360.0]])
    field = np.concatenate([field, field[..., :1]], axis=-1)

    ql = (qlon - lon[0]) % 360.0 + lon[0]
    i0 = np.clip(np.searchsorted(lon_ext, ql, side="right") - 1, 0, nlon - 1)
    wx = (ql - lon_ext[i0]) / (lon_ext[i0 + 1] - lon_ext[i0])

    if outside == "clamp":
        qy = np.clip(qlat, lat[0], lat[-1])
        valid = np.ones(qy.shape, bool)
    elif outside == "nan":
        qy = qlat
        jl = np.searchsorted(lat, qy, side="right") - 1
        valid = (jl >= 0) & (jl <= nlat - 2)
    else:
        raise ValueError(f"outside must be 'nan' or 'clamp', got {outside!r}")
    j0 = np.clip(np.searchsorted(lat, qy, side="right") - 1, 0, nlat - 2)
    wy = np.clip((qy - lat[j0]) / (lat[j0 + 1] - lat[j0]), 0.0, 1.0)

    f00 = field[..., j0, i0]
    f01 = field[..., j0, i0 + 1]
    f10 = field[..., j0 + 1, i0]
    f11 = field[..., j0 + 1, i0 + 1]
    out = (1 - wy) * ((1 - wx) * f00 + wx * f01) + wy * ((1 - wx) * f10 + wx * f11)
    nan_in_stencil = np.isnan(f00) | np.isnan(f01) | np.isnan(f10) | np.isnan(f11)
    return np.where(valid & ~nan_in_stencil, out, np.nan)
