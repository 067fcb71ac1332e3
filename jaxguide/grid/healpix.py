"""HEALPix grid: pixel orderings, pixel-centre coordinates and face padding.

cBottle's network sees the sphere in earth2grid's ``HEALPIX_PAD_XY`` order (here
called ``"net"``): pixel ``p = f * n**2 + h * n + w`` for face ``f`` (0..11), row
``h`` and column ``w`` of an ``n x n`` image. The relation to the standard HEALPix
face coordinates ``(ix, iy)`` (origin at the face's south corner, ``ix`` towards
north-east, ``iy`` towards north-west, as in NEST) is ``h = n - 1 - ix``,
``w = n - 1 - iy``: the image has its origin at the north corner and runs clockwise.

Everything here is index arithmetic done once in NumPy; what runs inside
``jit``/``vmap``/``grad`` is a gather with these precomputed indices (for the face
padding: a reshape of the faces and small gathers of their borders). Sampling a
field at points (containing pixel, bilinear weights, lat/lon regridding) lives in
:mod:`jaxguide.grid.latlon`.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Order = Literal["nest", "ring", "net"]
ORDERS: tuple[str, ...] = ("nest", "ring", "net")

# Base-resolution layout of the 12 faces (HEALPix convention): the ring number of
# each face's south corner in units of nside, and its longitude index (units of 45 deg).
_FACE_RING = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4])
_FACE_LON = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7])


def nside_of_npix(npix: int) -> int:
    """nside for a map of ``npix`` pixels; raises if npix is not 12 * nside**2."""
    nside = int(round(np.sqrt(npix / 12)))
    if 12 * nside * nside != npix or nside < 1 or nside & (nside - 1):
        raise ValueError(f"{npix} pixels is not a HEALPix map (12 * nside**2, nside a power of 2)")
    return nside


def check_nside(nside: int) -> int:
    """``nside`` as an int; raises ValueError unless it is a power of two."""
    nside = int(nside)
    if nside < 1 or nside & (nside - 1):
        raise ValueError(f"nside must be a power of two, got {nside}")
    return nside


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Interleave zeros between the bits of v (v < 2**30): b2 b1 b0 -> 0b2 0b1 0b0."""
    v = v.astype(np.int64)
    out = np.zeros_like(v)
    for bit in range(30):
        out |= ((v >> bit) & 1) << (2 * bit)
    return out


def _compact_bits(v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_spread_bits`: keep the even bits of v."""
    v = v.astype(np.int64)
    out = np.zeros_like(v)
    for bit in range(30):
        out |= ((v >> (2 * bit)) & 1) << bit
    return out


def xyf_to_nest(nside: int, ix: np.ndarray, iy: np.ndarray, face: np.ndarray) -> np.ndarray:
    return face.astype(np.int64) * nside * nside + _spread_bits(ix) + (_spread_bits(iy) << 1)


def nest_to_xyf(nside: int, pix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pix = np.asarray(pix, dtype=np.int64)
    face, sub = np.divmod(pix, nside * nside)
    return _compact_bits(sub), _compact_bits(sub >> 1), face


def xyf_to_net(nside: int, ix: np.ndarray, iy: np.ndarray, face: np.ndarray) -> np.ndarray:
    h = nside - 1 - np.asarray(ix, dtype=np.int64)
    w = nside - 1 - np.asarray(iy, dtype=np.int64)
    return np.asarray(face, dtype=np.int64) * nside * nside + h * nside + w


def net_to_xyf(nside: int, pix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pix = np.asarray(pix, dtype=np.int64)
    face, sub = np.divmod(pix, nside * nside)
    h, w = np.divmod(sub, nside)
    return nside - 1 - h, nside - 1 - w, face


def _ring_and_phase(nside: int, ix, iy, face):
    """Ring number (1 .. 4n-1, north to south), pixels in that ring's half-cap
    (``nr``) and the integer phase ``t`` with phi = pi * t / (4 * nr)."""
    jr = _FACE_RING[face] * nside - ix - iy - 1
    nr = np.where(jr < nside, jr, np.where(jr > 3 * nside, 4 * nside - jr, nside))
    t = _FACE_LON[face] * nr + ix - iy
    t = np.where(t < 0, t + 8 * nr, t)
    return jr, nr, t


def xyf_to_ring(nside: int, ix, iy, face) -> np.ndarray:
    jr, nr, t = _ring_and_phase(nside, np.asarray(ix, np.int64), np.asarray(iy, np.int64), np.asarray(face, np.int64))
    npix = 12 * nside * nside
    north = 2 * jr * (jr - 1)
    equator = 2 * nside * (nside - 1) + (jr - nside) * 4 * nside
    south = npix - 2 * nr * (nr + 1)
    start = np.where(jr < nside, north, np.where(jr > 3 * nside, south, equator))
    # phi / (2 pi / (4 nr)) = t / 2; shifted rings (t odd) start half a pixel east of 0.
    return start + (t // 2) % (4 * nr)


def xyf_to_lonlat(nside: int, ix, iy, face) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre longitude in [0, 360) and latitude, degrees, float64."""
    jr, nr, t = _ring_and_phase(nside, np.asarray(ix, np.int64), np.asarray(iy, np.int64), np.asarray(face, np.int64))
    npix = 12 * nside * nside
    z_cap = 1.0 - nr.astype(np.float64) ** 2 * 4.0 / npix
    z_eq = (2 * nside - jr) * 2.0 / (3.0 * nside)
    z = np.where(jr < nside, z_cap, np.where(jr > 3 * nside, -z_cap, z_eq))
    phi = np.pi * t / (4.0 * nr)
    lat = np.degrees(np.arcsin(np.clip(z, -1.0, 1.0)))
    lon = np.degrees(phi) % 360.0
    return lon, lat


def _xyf_of_all(nside: int, order: str):
    pix = np.arange(12 * nside * nside, dtype=np.int64)
    if order == "nest":
        return nest_to_xyf(nside, pix)
    if order == "net":
        return net_to_xyf(nside, pix)
    if order == "ring":
        ix, iy, f = nest_to_xyf(nside, pix)
        ring = xyf_to_ring(nside, ix, iy, f)
        inv = np.empty_like(ring)
        inv[ring] = pix  # inv[ring pixel] = nest pixel
        return nest_to_xyf(nside, inv)
    raise ValueError(f"unknown pixel order {order!r}; expected one of {ORDERS}")


def _index_in(nside: int, order: str, ix, iy, f) -> np.ndarray:
    if order == "nest":
        return xyf_to_nest(nside, ix, iy, f)
    if order == "net":
        return xyf_to_net(nside, ix, iy, f)
    if order == "ring":
        return xyf_to_ring(nside, ix, iy, f)
    raise ValueError(f"unknown pixel order {order!r}; expected one of {ORDERS}")


@functools.lru_cache(maxsize=None)
def permutation(nside: int, src: Order, dest: Order) -> np.ndarray:
    """Index ``i`` with ``x_dest = x_src[..., i]`` (int32, read-only)."""
    nside = check_nside(nside)
    ix, iy, f = _xyf_of_all(nside, dest)
    idx = _index_in(nside, src, ix, iy, f).astype(np.int32)
    idx.setflags(write=False)
    return idx


def reorder(x, src: Order, dest: Order, axis: int = -1):
    """Reorder the pixel axis of ``x`` (NumPy or JAX array) from ``src`` to ``dest`` order."""
    if src == dest:
        return x
    nside = nside_of_npix(x.shape[axis])
    idx = permutation(nside, src, dest)
    if isinstance(x, np.ndarray):
        return np.take(x, idx, axis=axis)
    return jnp.take(x, idx, axis=axis)


@functools.lru_cache(maxsize=None)
def lonlat(nside: int, order: Order = "net") -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre (lon, lat) in degrees (lon in [0, 360)), float64, in ``order``."""
    nside = check_nside(nside)
    lon, lat = xyf_to_lonlat(nside, *_xyf_of_all(nside, order))
    lon.setflags(write=False)
    lat.setflags(write=False)
    return lon, lat


# --------------------------------------------------------------------------------------
# Padding of the 12 faces (what cBottle's HEALPix 3x3 convolutions see).
#
# Each face is an n x n image; a convolution needs a border of width p taken from the
# neighbouring faces. Across an edge the neighbour's pixels continue the image (with a
# rotation for the edges between two polar faces). At the face corners where only three
# faces meet (the vertices at |z| = 2/3), earth2grid's HEALPix padding fills the missing
# quarter by shifting the rows of the two adjacent polar faces into it, and averages
# the two candidates on the diagonal. We reproduce that convention exactly.

# Neighbour table in origin-S face coordinates. Key: (face row, dx, dy) where dx, dy in
# {-1, 0, 1} say on which side of the face the point lies (dx < 0: ix < 0, ...).
# Value: (face offset rule, number of 90-degree counter-clockwise turns of the
# coordinates). Face rows: 0 north polar, 1 equatorial, 2 south polar.
# "M" marks the missing quarters next to the equatorial faces' north/south corners.
def _neighbour(face: np.ndarray, dx: np.ndarray, dy: np.ndarray):
    """Neighbouring face (or a 'missing' marker >= 12) and rotation for each point."""
    k = face % 4
    row = face // 4
    nb = np.full(face.shape, -1, dtype=np.int64)
    turns = np.zeros(face.shape, dtype=np.int64)

    def put(mask, value, rot=0):
        nonlocal nb, turns
        nb = np.where(mask, value, nb)
        turns = np.where(mask, rot, turns)

    n_, e_, s_ = row == 0, row == 1, row == 2
    # north polar faces
    put(n_ & (dx == -1) & (dy == -1), 8 + k)  # south corner: the south face below
    put(n_ & (dx == -1) & (dy == 0), 4 + k)  # SW edge: equatorial face to the west
    put(n_ & (dx == 0) & (dy == -1), 4 + (k + 1) % 4)  # SE edge: equatorial face to the east
    put(n_ & (dx == 1) & (dy == -1), (k + 1) % 4)  # east corner (3 faces meet)
    put(n_ & (dx == 1) & (dy == 0), (k + 1) % 4, 3)  # NE edge: next polar face, rotated
    put(n_ & (dx == 1) & (dy == 1), (k + 2) % 4, 2)  # beyond the pole
    put(n_ & (dx == 0) & (dy == 1), (k + 3) % 4, 1)  # NW edge: previous polar face, rotated
    put(n_ & (dx == -1) & (dy == 1), (k + 3) % 4)  # west corner (3 faces meet)
    # equatorial faces
    put(e_ & (dx == -1) & (dy == -1), 16 + k)  # south corner: missing quarter
    put(e_ & (dx == -1) & (dy == 0), 8 + (k + 3) % 4)  # SW edge
    put(e_ & (dx == 0) & (dy == -1), 8 + k)  # SE edge
    put(e_ & (dx == 1) & (dy == -1), 4 + (k + 1) % 4)  # east corner: next equatorial face
    put(e_ & (dx == 1) & (dy == 0), k)  # NE edge
    put(e_ & (dx == 1) & (dy == 1), 12 + k)  # north corner: missing quarter
    put(e_ & (dx == 0) & (dy == 1), (k + 3) % 4)  # NW edge
    put(e_ & (dx == -1) & (dy == 1), 4 + (k + 3) % 4)  # west corner: previous equatorial face
    # south polar faces
    put(s_ & (dx == -1) & (dy == -1), 8 + (k + 2) % 4, 2)  # beyond the pole
    put(s_ & (dx == -1) & (dy == 0), 8 + (k + 3) % 4, 3)  # SW edge: previous south face, rotated
    put(s_ & (dx == 0) & (dy == -1), 8 + (k + 1) % 4, 1)  # SE edge: next south face, rotated
    put(s_ & (dx == 1) & (dy == -1), 8 + (k + 1) % 4)  # east corner (3 faces meet)
    put(s_ & (dx == 1) & (dy == 0), 4 + (k + 1) % 4)  # NE edge
    put(s_ & (dx == 1) & (dy == 1), k)  # north corner: the north face above
    put(s_ & (dx == 0) & (dy == 1), 4 + k)  # NW edge
    put(s_ & (dx == -1) & (dy == 1), 8 + (k + 3) % 4)  # west corner (3 faces meet)
    return nb, turns


def _turn(nside: int, turns: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Rotate face coordinates ``turns`` quarter turns counter-clockwise."""
    n = nside
    out_x = np.select([turns == 1, turns == 2, turns == 3], [n - 1 - y, n - 1 - x, y], x)
    out_y = np.select([turns == 1, turns == 2, turns == 3], [x, n - 1 - y, n - 1 - x], y)
    return out_x, out_y


def _fill_missing(nside: int, x, y, face):
    """Two candidate sources for points in a missing quarter (face >= 12).

    Returns ``((x1, y1, f1), (x2, y2, f2))``; a candidate whose face is still >= 12 is
    invalid. Outside the missing quarters both candidates equal the input.
    """
    n = nside
    north = (face >= 12) & (face < 16)
    south = face >= 16
    # north missing quarter k: between polar faces k-1 (west) and k (east)
    west = (face - 13) % 4
    east = (west + 1) % 4
    f1 = np.where(north & (x <= y), west, face)
    x1 = np.where(north & (x < y), (x - y) % n, np.where(north & (x == y), n - 1, x))
    y1 = y
    f2 = np.where(north & (y <= x), east, face)
    y2 = np.where(north & (y < x), (y - x) % n, np.where(north & (x == y), n - 1, y))
    x2 = x
    # south missing quarter k: between south faces 8+k (east) and 8+k-1 (west)
    s_east = (face - 16) % 4 + 8
    s_west = (s_east - 9) % 4 + 8
    g1 = np.where(south & (x1 >= y1), s_east, f1)
    xx1 = np.where(south & (x1 > y1), (x1 - y1 - 1) % n, np.where(south & (x1 == y1), 0, x1))
    g2 = np.where(south & (y2 >= x2), s_west, f2)
    yy2 = np.where(south & (y2 > x2), (y2 - x2 - 1) % n, np.where(south & (x2 == y2), 0, y2))
    return (xx1, y1, g1), (x2, yy2, g2)


@functools.lru_cache(maxsize=None)
def pad_sources(nside: int, padding: int) -> np.ndarray:
    """Two candidate source pixels (net order) for every position of the padded faces.

    Shape ``(2, 12, n + 2p, n + 2p)`` int32 indexed ``[candidate, face, h, w]``; -1 marks
    an invalid candidate. The padded value is the mean of the valid candidates.
    """
    n = check_nside(nside)
    p = int(padding)
    if not 0 <= p <= n:
        raise ValueError(f"padding must be in [0, nside], got {padding}")
    face, h, w = np.meshgrid(np.arange(12), np.arange(-p, n + p), np.arange(-p, n + p), indexing="ij")
    ix = n - 1 - h
    iy = n - 1 - w
    dx = np.floor_divide(ix, n)
    dy = np.floor_divide(iy, n)
    nb, turns = _neighbour(face, dx, dy)
    inside = (dx == 0) & (dy == 0)
    nb = np.where(inside, face, nb)
    x, y = _turn(n, np.where(inside, 0, turns), ix, iy)
    x, y = x % n, y % n
    out = []
    for cx, cy, cf in _fill_missing(n, x, y, nb):
        valid = cf < 12
        out.append(np.where(valid, xyf_to_net(n, cx, cy, np.where(valid, cf, 0)), -1))
    result = np.stack(out).astype(np.int32)
    result.setflags(write=False)
    return result


@functools.lru_cache(maxsize=None)
def pad_gather(nside: int, padding: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padding as one gather plus a few averaged positions.

    Returns ``(index, avg_pos, avg_src)``: ``index`` (12 (n+2p)^2,) is one valid source
    per padded position (flattened ``[face, h, w]``); at the positions ``avg_pos``
    (k,) the value is the mean of the two sources ``avg_src`` (2, k).
    """
    src = pad_sources(nside, padding).reshape(2, -1)
    a, b = src
    if np.any((a < 0) & (b < 0)):
        raise AssertionError("padding position without a source")
    primary = np.where(a >= 0, a, b).astype(np.int32)
    both = np.nonzero((a >= 0) & (b >= 0) & (a != b))[0].astype(np.int32)
    return primary, both, np.stack([a[both], b[both]]).astype(np.int32)


def _frame(size: int, width: int):
    """Border pieces of a ``size x size`` image with a border ``width`` wide.

    Returns ``(pieces, centre)``: ``pieces`` the (row start, row stop, column start,
    column stop) of the top, left, right and bottom strips (top and bottom span the full
    width, left and right the rows between them), ``centre`` those of the rest. When the
    border covers the whole image (size <= 2 width) the only piece is the whole image
    and ``centre`` is None.
    """
    s, q = size, width
    if s <= 2 * q:
        return ((0, s, 0, s),), None
    return ((0, q, 0, s), (q, s - q, 0, q), (q, s - q, s - q, s), (s - q, s, 0, s)), (q, s - q, q, s - q)


@functools.lru_cache(maxsize=None)
def _frame_positions(size: int, width: int) -> np.ndarray:
    """Flat ``[face, h, w]`` indices (into 12 size^2) of the border pieces of :func:`_frame`,
    piece after piece, each (12, rows, columns) row-major. int32 (B,)."""
    grid = np.arange(12 * size * size, dtype=np.int32).reshape(12, size, size)
    pieces, _ = _frame(size, width)
    return np.concatenate([grid[:, r0:r1, c0:c1].ravel() for r0, r1, c0, c1 in pieces])


def _split_frame(border: jnp.ndarray, size: int, width: int) -> list[jnp.ndarray]:
    """(..., B, C) border values in :func:`_frame_positions` order -> the pieces (..., 12, r, c, C)."""
    *lead, _, c = border.shape
    out, start = [], 0
    for r0, r1, c0, c1 in _frame(size, width)[0]:
        count = 12 * (r1 - r0) * (c1 - c0)
        out.append(border[..., start:start + count, :].reshape(*lead, 12, r1 - r0, c1 - c0, c))
        start += count
    return out


def _join_frame(pieces: list[jnp.ndarray], centre: jnp.ndarray | None) -> jnp.ndarray:
    """Inverse of the split: pieces (..., 12, r, c, C) around centre -> (..., 12, s, s, C)."""
    if centre is None:
        return pieces[0]
    top, left, right, bottom = pieces
    middle = jnp.concatenate([left, centre, right], axis=-2)
    return jnp.concatenate([top, middle, bottom], axis=-3)


@functools.lru_cache(maxsize=None)
def pad_border(nside: int, padding: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`pad_gather` restricted to the border of the padded faces.

    Returns ``(index, avg_pos, avg_src)``: ``index`` (B,) one source pixel for each
    border position, in the order of ``_frame_positions(n + 2p, p)`` (top, left, right,
    bottom strips of every face; B = 12 * 4p(n + p)); at the border positions
    ``avg_pos`` (k,) the value is the mean of the two pixels ``avg_src`` (2, k). The rest
    of a padded face is the face itself.
    """
    primary, avg_pos, avg_src = pad_gather(nside, padding)
    positions = _frame_positions(nside + 2 * padding, padding)
    where = np.full(primary.size, -1, np.int64)
    where[positions] = np.arange(positions.size)
    if np.any(where[avg_pos] < 0):
        raise AssertionError("averaged padding position inside a face")
    index, pos = primary[positions], where[avg_pos].astype(np.int32)
    for a in (index, pos, avg_src):
        a.setflags(write=False)
    return index, pos, avg_src


@functools.lru_cache(maxsize=None)
def pad_border_transpose(nside: int, padding: int) -> tuple[np.ndarray, np.ndarray]:
    """The transpose of :func:`pad` for the pixels near the face edges, as a gather.

    Returns ``(index, weight)``, both (F, K): :func:`pad_transpose_table` restricted to
    the pixels of ``_frame_positions(n, p)`` (the strips ``p`` wide along the edges of
    every face, F = 12 (n^2 - (n - 2p)^2), or all pixels when n <= 2p), which are the
    only pixels a border position reads; the others only receive their own position.
    """
    index, weight = pad_transpose_table(nside, padding)
    rows = _frame_positions(nside, padding)
    m = nside + 2 * padding
    grid = np.arange(12 * m * m).reshape(12, m, m)
    interior = grid[:, padding:padding + nside, padding:padding + nside].ravel()
    inner = np.ones(12 * nside * nside, bool)
    inner[rows] = False
    if np.any(index[inner, 1:] < 12 * m * m) or np.any(index[inner, 0] != interior[inner]):
        raise AssertionError("a border position reads a pixel away from the face edges")
    k = int(np.max(np.sum(weight[rows] != 0, axis=1)))
    out_index, out_weight = np.ascontiguousarray(index[rows, :k]), np.ascontiguousarray(weight[rows, :k])
    out_index.setflags(write=False)
    out_weight.setflags(write=False)
    return out_index, out_weight


def _pad_values(x: jnp.ndarray, padding: int) -> jnp.ndarray:
    """:func:`pad` without its VJP rule: interior reshape + border gather, concatenated."""
    *lead, npix, c = x.shape
    n = nside_of_npix(npix)
    if padding == 0:
        return x.reshape(*lead, 12, n, n, c)
    index, avg_pos, avg_src = pad_border(n, padding)
    border = jnp.take(x, index, axis=-2)
    if avg_pos.size:
        mean = (jnp.take(x, avg_src[0], axis=-2) + jnp.take(x, avg_src[1], axis=-2)) * 0.5
        border = border.at[..., avg_pos, :].set(mean)
    pieces = _split_frame(border, n + 2 * padding, padding)
    return _join_frame(pieces, x.reshape(*lead, 12, n, n, c))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def pad(x: jnp.ndarray, padding: int) -> jnp.ndarray:
    """Pad HEALPix faces for a convolution. jit/vmap/grad friendly (reverse mode only).

    The interior of each padded face is the face itself (a reshape: in net order faces
    are contiguous and row-major); only the border (about 4p/n of the output) is
    gathered from the neighbouring faces. The VJP is the interior's slice plus, for the
    pixels along the face edges, a small gather of the border's cotangent: no scatter
    into a zero-initialised full-size buffer (XLA may allocate such buffers early and
    keep them for the whole program, which defeats rematerialisation).

    Args:
      x: (..., 12 * n**2, C) in net order (pixels then channels).
      padding: border width p, 0 <= p <= n.
    Returns:
      (..., 12, n + 2p, n + 2p, C).
    """
    return _pad_values(x, padding)


def _pad_fwd(x, padding):
    return _pad_values(x, padding), None


def _pad_bwd(padding, _, ct):
    """ct (..., 12, m, m, C) -> ((..., 12 n^2, C),)."""
    *lead, faces, m, _m, c = ct.shape
    p = padding
    n = m - 2 * p
    if p == 0:
        return (ct.reshape(*lead, faces * n * n, c),)
    index, weight = pad_border_transpose(n, p)
    flat = ct.reshape(*lead, faces * m * m, c)
    edges = None
    # one gather per slot k, not one (..., F, K, C) gather reduced over K: XLA:CPU ran
    # that reduction 20x slower; and no einsum, which GPUs may round to TF32
    for k in range(index.shape[1]):
        part = jnp.take(flat, index[:, k], axis=-2, mode="fill", fill_value=0)  # (..., F, C)
        if np.any((weight[:, k] != 0) & (weight[:, k] != 1)):
            part = part * jnp.asarray(weight[:, k, None], ct.dtype)
        edges = part if edges is None else edges + part
    _, centre = _frame(n, p)
    if centre is not None:
        r0, r1, c0, c1 = centre
        centre = ct[..., p + r0:p + r1, p + c0:p + c1, :]
    dx = _join_frame(_split_frame(edges, n, p), centre)
    return (dx.reshape(*lead, faces * n * n, c),)


pad.defvjp(_pad_fwd, _pad_bwd)


@functools.lru_cache(maxsize=None)
def pad_transpose_table(nside: int, padding: int) -> tuple[np.ndarray, np.ndarray]:
    """The transpose of :func:`pad` as a gather: ``(index, weight)``, both (12 n^2, K).

    Pixel p receives ``sum_k weight[p, k] * padded[index[p, k]]`` (flattened padded
    positions; index = 12 (n+2p)^2, out of range, where weight is 0). K = the most
    padded positions that read one pixel.
    """
    primary, avg_pos, avg_src = pad_gather(nside, padding)
    q = np.arange(primary.size)
    single = np.ones(primary.size, bool)
    single[avg_pos] = False
    rows = np.concatenate([q[single], avg_pos, avg_pos])
    cols = np.concatenate([primary[single], avg_src[0], avg_src[1]])
    wts = np.concatenate([np.ones(single.sum()), np.full(2 * avg_pos.size, 0.5)])
    order = np.argsort(cols, kind="stable")
    rows, cols, wts = rows[order], cols[order], wts[order]
    npix = 12 * nside * nside
    counts = np.bincount(cols, minlength=npix)
    slot = np.arange(cols.size) - np.repeat(np.cumsum(counts) - counts, counts)
    index = np.full((npix, counts.max()), primary.size, np.int32)
    weight = np.zeros((npix, counts.max()), np.float32)
    index[cols, slot] = rows
    weight[cols, slot] = wts
    index.setflags(write=False)
    weight.setflags(write=False)
    return index, weight


# The former name of the padding with a gather-like backward (rematerialised blocks used
# it): :func:`pad` itself now has a backward without a zero-initialised full-size buffer.
pad_gather_transposed = pad
