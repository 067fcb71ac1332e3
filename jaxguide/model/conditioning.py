"""The conditioning pytree of cBottle for one analysis time (:func:`assemble`) or one video
window (:func:`window_conditioning`): calendar per frame, the SST condition, and for the
video model the frames given to it (:class:`KnownFrames`, :func:`frame_condition`,
cBottle's ``FrameMasker``).

The pieces: :mod:`jaxguide.model.calendar` (calendar inputs), :mod:`jaxguide.model.labels`
(the dataset label), :mod:`jaxguide.model.sst` (the AMIP SST).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import xarray as xr

from jaxguide.model.calendar import calendar_inputs
from jaxguide.model.sst import read_amip_sst, sst_at

logger = logging.getLogger(__name__)


def frame_condition(target: np.ndarray, keep: np.ndarray, sst: np.ndarray | None) -> np.ndarray:
    """The video model's condition ``[target * mask, SST, mask]`` (cBottle's ``FrameMasker``).

    Args:
      target: (..., C, T, npix) normalised frames, network order; only the kept frames
        matter (the others are multiplied by 0; NaN stays NaN as in cBottle, and the
        network turns it into 0). Leading axes (members) are kept.
      keep: (T,) bool, True on the frames given to the model (conditioning frames).
      sst: encoded SST, (T, npix) per frame or (npix,) for all frames (``encode_sst``),
        or None for a model without the SST channel (``[target * mask, mask]``).
    Returns (..., C + 2, T, npix) float32 (C + 1 without SST); a bare (C, T, npix)
    target gives (1, C + 2, T, npix) (cBottle's batch of one).
    """
    target = np.asarray(target, np.float32)
    bare = target.ndim == 3
    if bare:
        target = target[None]
    *lead, c, t, npix = target.shape
    mask = np.asarray(keep, bool).reshape(-1)
    if mask.shape != (t,):
        raise ValueError(f"keep has {mask.size} entries for {t} frames")
    m = np.broadcast_to(mask.astype(np.float32)[:, None], (*lead, 1, t, npix))
    parts = [target * m]
    if sst is not None:
        parts.append(np.broadcast_to(np.asarray(sst, np.float32), (t, npix))[None] * np.ones((*lead, 1, 1, 1), np.float32))
    parts.append(m)
    return np.concatenate(parts, axis=-3).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class KnownFrames:
    """Frames of a video window given to the model (as cBottle's ``VideoAutoregression``
    inserts them): values on the ``keep`` frames, normalised units, network order.

    values: (C, T, npix) for every member, or (M, C, T, npix) one per member (e.g. the
      last frames of each member's previous window in a chained run); entries on frames
      not kept are ignored.
    keep: (T,) bool.
    """

    values: np.ndarray
    keep: np.ndarray

    def __post_init__(self):
        v = np.asarray(self.values, np.float32)
        keep = np.asarray(self.keep, bool).reshape(-1)
        if v.ndim not in (3, 4) or v.shape[-2] != keep.size:
            raise ValueError(f"known frames must be (C, T, npix) or (M, C, T, npix) with T = {keep.size} "
                             f"(the keep mask), got {v.shape}")
        if not np.all(np.isfinite(v[..., keep, :])):
            raise ValueError("known frames have NaN or infinite values on the kept frames")
        object.__setattr__(self, "values", v)
        object.__setattr__(self, "keep", keep)

    @property
    def per_member(self) -> bool:
        return self.values.ndim == 4


def window_conditioning(window, *, channels: int, nside: int = 64, condition_channels: int = 0,
                        known: KnownFrames | None = None, sst_path=None, sst_offset: float = 0.0,
                        sst_data: xr.Dataset | None = None) -> dict[str, np.ndarray]:
    """The conditioning pytree of a video cBottle for one :class:`~jaxguide.model.window.FrameWindow`.

    ``{"second_of_day": (T,), "day_of_year": (T,), "condition": (C + 2, T, npix)}``
    float32, net order: calendar per frame and ``[known * mask, SST, mask]``
    (:func:`frame_condition`; no SST channel when ``condition_channels == C + 1``; mask 0
    everywhere without ``known`` frames: the model generates every frame). With
    per-member ``known`` frames every leaf gets a leading member axis (M, ...).
    SST per frame from ``sst_path`` / ``sst_data`` as :func:`assemble`.
    """
    t = window.length
    sod, doy = calendar_inputs(list(window.times))
    cond: dict[str, np.ndarray] = {"second_of_day": sod.reshape(t), "day_of_year": doy.reshape(t)}
    if condition_channels not in (channels + 1, channels + 2):
        raise ValueError(f"a video model's condition has {channels} + 2 channels (frames, SST, mask) or {channels} + 1 "
                         f"(frames, mask); this one has {condition_channels}")
    sst = None
    if condition_channels == channels + 2:
        if sst_data is None:
            if sst_path is None:
                raise ValueError("this model is conditioned on sea-surface temperature: pass --sst FILE "
                                 "(an input4MIPs/AMIP 'tosbcs' NetCDF covering the window)")
            sst_data = read_amip_sst(sst_path)
        sst = np.stack([sst_at(sst_data, ti, nside=nside, offset=sst_offset).reshape(-1) for ti in window.times])
    elif sst_path is not None or sst_data is not None:
        logger.warning("the model has no SST condition channel; ignoring the SST input %s", sst_path or "")
    npix = 12 * nside**2
    if known is None:
        known = KnownFrames(np.zeros((channels, t, npix), np.float32), np.zeros(t, bool))
    if known.values.shape[-3:] != (channels, t, npix):
        raise ValueError(f"known frames must be ({channels}, {t}, {npix}) per member, got {known.values.shape}")
    cond["condition"] = frame_condition(known.values, known.keep, sst)
    if known.per_member:
        m = known.values.shape[0]
        cond["second_of_day"] = np.broadcast_to(cond["second_of_day"], (m, t)).copy()
        cond["day_of_year"] = np.broadcast_to(cond["day_of_year"], (m, t)).copy()
    else:
        cond["condition"] = cond["condition"][0]
    return cond


def assemble(time, *, nside: int = 64, sst_channels: int = 0, sst_path=None, sst_offset: float = 0.0,
             sst_data: xr.Dataset | None = None) -> dict[str, np.ndarray]:
    """The conditioning pytree of cBottle for one analysis time.

    Returns ``{"second_of_day": (1, 1), "day_of_year": (1, 1)}`` float32, plus
    ``"condition"``: the encoded AMIP SST (1, 1, 1, npix) net order when the model has
    ``sst_channels > 0`` (then ``sst_path`` (an input4MIPs ``tosbcs`` NetCDF) or an
    already read ``sst_data`` is required). Same structure and shapes for every time, so
    one compiled program serves them all. ``sst_offset`` (K) as in :func:`sst_at`.
    """
    sod, doy = calendar_inputs([time])
    cond = {"second_of_day": sod.reshape(1, 1), "day_of_year": doy.reshape(1, 1)}
    if sst_channels > 0:
        if sst_data is None:
            if sst_path is None:
                raise ValueError(
                    "this model is conditioned on sea-surface temperature: pass --sst FILE "
                    "(an input4MIPs/AMIP 'tosbcs' NetCDF covering the analysis time)"
                )
            sst_data = read_amip_sst(sst_path)  # names a missing file, a directory, a non-NetCDF file
        cond["condition"] = sst_at(sst_data, time, nside=nside, offset=sst_offset)
    elif sst_path is not None or sst_data is not None:
        logger.warning("the model has no condition channel; ignoring the SST input %s", sst_path or "")
    return cond
