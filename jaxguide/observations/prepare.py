"""Observations ready for the sampler: :func:`prepare` validates, overrides sigma,
checks plausibility, normalises, locates and (optionally) pads a table in one call.

Padding (:func:`pad`, :func:`bucket_size`) appends zero-weight rows so that different
observation counts share one compiled program.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxguide.diffusion.guidance import Observations
from jaxguide.grid import latlon as grid_sampling
from jaxguide.model.window import FrameWindow
from jaxguide.observations.errors import EmptyTableError, ObservationTimeError
from jaxguide.observations.operator import PointObservationOperator, build_operator, normalise
from jaxguide.observations.table import parse_time
from jaxguide.observations.validation import check_plausible, override_sigma, validate_observations

logger = logging.getLogger(__name__)


def bucket_size(n: int, minimum: int = 32) -> int:
    """The padded observation count for ``n`` rows: the next power of two >= max(n, minimum)."""
    return max(int(minimum), 1 << max(int(n) - 1, 0).bit_length())


def pad(obs: Observations, size: int) -> Observations:
    """``obs`` with zero rows appended up to ``size`` (weight 0, y 0, sigma_y 1).

    A zero-weight row adds exactly nothing to any guidance method (see
    :mod:`jaxguide.diffusion.guidance`), so counts padded to one size share one compiled program.
    The concatenation runs in NumPy: no JAX operation on the unpadded shapes (each new
    shape would compile a small program).
    """
    A = obs.A
    if not isinstance(A, PointObservationOperator):
        raise TypeError("pad needs a PointObservationOperator")
    y = np.asarray(obs.y, np.float32)
    n = y.shape[0]
    if size < n:
        raise ValueError(f"cannot pad {n} observations to {size}")
    k = size - n

    def cat(a, fill=0):
        a = np.asarray(a)
        return jnp.asarray(np.concatenate([a, np.full((k, *a.shape[1:]), fill, a.dtype)]))

    return Observations(
        A=PointObservationOperator(cat(A.channel), cat(A.pixel), cat(A.weight),
                                   None if A.frame is None else cat(A.frame)),
        y=cat(y),
        sigma_y=cat(np.broadcast_to(np.asarray(obs.sigma_y, np.float32), (n,)), 1),
        cov_factor=None if obs.cov_factor is None else cat(obs.cov_factor),
    )


@dataclasses.dataclass(frozen=True)
class PreparedObservations:
    """Observations ready for guidance, in the network's units.

    obs: :class:`~jaxguide.diffusion.guidance.Observations` (A on (C, T, npix) net-order states;
      y, sigma_y (n_padded,) float32 normalised); rows >= ``n_obs`` are padding.
    table: the clean rows (physical units plus ``value_n`` / ``sigma_n``), row i = y[i].
    dropped: rows rejected per reason (only with ``drop_bad``).
    """

    obs: Observations
    table: pd.DataFrame
    dropped: dict[str, int]

    @property
    def n_obs(self) -> int:
        return len(self.table)


def prepare(
    table: pd.DataFrame,
    channels: Sequence[str],
    center: Sequence[float],
    scale: Sequence[float],
    *,
    time=None,
    window_hours: float = 3.0,
    drop_bad: bool = False,
    sigma_y=None,
    nside: int = 64,
    interpolation: grid_sampling.Method = "bilinear",
    pad_to: int | Literal["bucket"] | None = None,
    check_plausibility: bool = True,
    window: FrameWindow | None = None,
    time_matching: Literal["linear", "exact"] = "linear",
) -> PreparedObservations:
    """Validate, override sigma, check plausibility, normalise, locate and (optionally)
    pad a table.

    time: the analysis time; rows outside ``+- window_hours`` are rejected (None: no
      time check). drop_bad: drop rejected rows instead of raising (see
      :func:`validate_observations`). sigma_y: see :func:`override_sigma` (physical
      units, applied before normalising). center/scale: the model's (C,) normalisation.
      pad_to: None (no padding), a size, or ``"bucket"`` (:func:`bucket_size`).
      check_plausibility: refuse values far from the model's climatology
      (:func:`check_plausible`; a unit mistake).
      window: a video model's frames (instead of ``time``): rows must lie between its
        first and last frame; each is placed at its fractional frame position (column
        ``frame_position``) and the operator reads (C, T, npix) states, linear in time
        between the two nearest frames, or, with ``time_matching="exact"``, a row off
        the frame times is an :class:`ObservationTimeError` (dropped and counted as
        ``time_between_frames`` with ``drop_bad``).
    """
    if time_matching not in ("linear", "exact"):
        raise ValueError(f"unknown time matching {time_matching!r}; expected 'linear' or 'exact'")
    span, description = None, None
    if window is not None:
        if time is not None:
            raise ValueError("pass the analysis time or the video window, not both")
        span = (window.start, window.end)
        fmt = "%Y-%m-%dT%H:%M"
        description = (f"the video window's {window.length} frames run from {window.start.strftime(fmt)} to "
                       f"{window.end.strftime(fmt)} UTC ({window.time_step_hours:g} h apart); observations must lie "
                       "within it: move the window start (--time) or the end of the run (--end)")
    elif time is not None:
        t = parse_time(time, "analysis time")
        span = (t - pd.Timedelta(hours=window_hours), t + pd.Timedelta(hours=window_hours))
    clean, dropped = validate_observations(table, channels, time_window=span, drop_bad=drop_bad,
                                           window_description=description)
    position = None
    if window is not None:
        position = window.position(clean["time"].to_numpy())
        nearest = np.round(position)
        off = np.abs(position - nearest) * window.time_step_hours * 3600.0 > 0.5  # more than half a second
        if time_matching == "exact":
            if off.any() and not drop_bad:
                example = clean.loc[off, "time"].iloc[0]
                raise ObservationTimeError(
                    f"{int(off.sum())} of {len(clean)} observations fall between the model's frames (e.g. {example}; "
                    f"frames are {window.time_step_hours:g} h apart from {window.start}); exact time matching was "
                    "asked for: use linear interpolation in time (--time-matching linear) or drop them (--drop-bad)",
                    {"time_between_frames": int(off.sum())})
            if off.any():
                logger.warning("dropped %d observations between frames (exact time matching)", int(off.sum()))
                dropped = {**dropped, "time_between_frames": int(off.sum())}
                clean = clean.loc[~off].reset_index(drop=True)
                position = nearest[~off]
                if len(clean) == 0:
                    raise EmptyTableError("no observations left: every one falls between the model's frames",
                                          dropped)
            else:
                position = nearest
        clean = clean.assign(frame_position=position)
    clean = override_sigma(clean, sigma_y)
    if check_plausibility:
        check_plausible(clean, channels, center, scale)
    norm = normalise(clean, channels, center, scale)
    # NumPy leaves until padded (see :func:`pad`)
    obs = Observations(
        A=build_operator(norm, channels, nside=nside, method=interpolation, as_numpy=True, frame_position=position,
                         n_frames=1 if window is None else window.length),
        y=norm["value_n"].to_numpy(np.float32),
        sigma_y=norm["sigma_n"].to_numpy(np.float32),
    )
    if pad_to is None:
        obs = jax.tree_util.tree_map(jnp.asarray, obs)
    else:
        obs = pad(obs, bucket_size(len(norm)) if pad_to == "bucket" else int(pad_to))
    return PreparedObservations(obs=obs, table=norm, dropped=dict(dropped))
