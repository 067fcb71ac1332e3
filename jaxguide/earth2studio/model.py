"""``CBottleDA``: a converted cBottle model (image or video) as an earth2studio
data-assimilation model.

earth2studio's DA models (``earth2studio.models.da``: HealDA, InterpEquirectangular,
StormCast SDA) take observation frames (pandas, columns ``time, lat, lon, observation,
variable``, lon in [0, 360), the analysis time in ``obs.attrs["request_time"]``) and return
a tuple of DataArrays. :class:`CBottleDA` follows them:

- ``model(obs)`` -> ``(analysis,)``: the analysis ensemble at each request time, dims
  ``(ensemble, time, variable, npix)`` (HEALPix NEST pixel index, as jaxguide's files; or
  ``lat, lon`` with ``regrid``); video models add ``lead_time`` after ``time`` (the
  window's frames: ``time`` is its first frame, as earth2studio's prognostic models).
  Variables carry earth2studio names (``t850``, ``t2m``, ``msl``; a channel without an
  earth2studio name of the same units keeps its cBottle name, e.g. ``rlut``) in physical
  units (the ``units`` coordinate along ``variable``).
- ``create_generator()``: the same on one :class:`~jaxguide.assimilation.session.Session`,
  so its compiled programs serve every frame sent (``None`` in, ``None`` out).
- the values are those of ``jaxguide assimilate`` for the same observations, time and
  seed: both come from :func:`jaxguide.assimilation.analysis.analysis_dataset`.

Rows are taken per request time as earth2studio's models do (``filter_time_range``):
within +- ``window_hours`` of the time for image models, within the window's frames for
video models.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Generator, Sequence
from typing import Any

import jax
import numpy as np
import pandas as pd
import xarray as xr

from jaxguide.assimilation.analysis import analysis_dataset
from jaxguide.assimilation.dataset import REQUIRED_PROVENANCE
from jaxguide.assimilation.session import Session
from jaxguide.assimilation.settings import AnalysisInputs, AssimilationSettings
from jaxguide.grid.latlon import LatLonGrid
from jaxguide.model.channels import channel_info
from jaxguide.observations.sources import channel_earth2studio

try:
    from earth2studio.models.da.utils import filter_time_range, validate_observation_fields
    from earth2studio.utils.type import CoordSystem, FrameSchema
except ImportError as e:  # the optional extra
    raise ImportError(
        f"jaxguide.earth2studio needs earth2studio ({e}): pip install -e '.[earth2studio]' "
        "(or ./setup.sh, which installs it)") from None

logger = logging.getLogger(__name__)

FIELDS = ("time", "lat", "lon", "observation", "variable")
COMMAND = "jaxguide.earth2studio.CBottleDA"
_SETTINGS = frozenset(f.name for f in dataclasses.fields(AssimilationSettings))


def jax_devices(device: Any) -> tuple[Any, ...]:
    """The JAX devices for an earth2studio-style device: ``"cpu"``, ``"cuda"``,
    ``"cuda:1"``, ``"gpu"``, a ``torch.device``, a JAX device or a sequence of JAX devices."""
    if isinstance(device, Sequence) and not isinstance(device, str):
        return tuple(d for dev in device for d in jax_devices(dev))
    if isinstance(device, jax.Device):
        return (device,)
    text = str(device)  # torch.device prints as "cuda:0" / "cpu"
    kind, _, index = text.partition(":")
    platform = {"cuda": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(kind.strip().lower())
    if platform is None:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N', 'gpu' or JAX devices")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        hint = " (install JAX's CUDA plugin: pip install -e '.[cuda12]')" if platform == "gpu" else ""
        raise ValueError(f"device {device!r}: JAX has no {platform} backend here; it has "
                         f"{[str(d) for d in jax.devices()]}{hint}") from None
    if not index:
        return (devices[0],)
    if not index.isdigit() or int(index) >= len(devices):
        raise ValueError(f"device {device!r}: JAX has {len(devices)} {platform} device(s)")
    return (devices[int(index)],)


def _request_times(request_time) -> np.ndarray:
    """earth2studio's ``request_time`` (one time or an array) -> (N,) datetime64[ns]."""
    times = np.atleast_1d(np.asarray(request_time)).astype("datetime64[ns]")
    if times.ndim != 1 or times.size == 0 or np.isnat(times).any():
        raise ValueError(f"request_time must be one time or a 1-d array of times, got {request_time!r}")
    return times


def _latlon_grid(regrid) -> LatLonGrid | None:
    """None (HEALPix), a :class:`LatLonGrid`, ``(nlat, nlon)`` or ``"181x360"``."""
    if regrid is None or isinstance(regrid, LatLonGrid):
        return regrid
    if isinstance(regrid, str):
        try:
            regrid = tuple(int(v) for v in regrid.lower().split("x"))
        except ValueError:
            raise ValueError(f"regrid must look like '181x360' (NLATxNLON), got {regrid!r}") from None
    if len(regrid) != 2:
        raise ValueError(f"regrid must be (nlat, nlon), got {regrid!r}")
    return LatLonGrid(int(regrid[0]), int(regrid[1]))


class CBottleDA:
    """A converted cBottle model as an earth2studio ``AssimilationModel``.

    ``CBottleDA(model_dir, **options)``: ``model_dir`` a converted model directory
    (``jaxguide convert``) or a loaded model (:func:`jaxguide.load_model`). Options:
    ``sst`` (AMIP SST file, for SST-conditioned models), ``regrid`` (None: HEALPix
    ``npix``; ``(nlat, nlon)``, ``"181x360"`` or a :class:`LatLonGrid`: ``lat, lon``),
    ``devices`` (JAX devices or a device name; default all of ``jax.devices()``), and
    every field of :class:`~jaxguide.assimilation.settings.AssimilationSettings` under
    its name: ``method`` and its options (``cg_iters``, ``solver``, ``gamma``,
    ``guidance_scale``, ``norm_matching``), ``members``, ``steps``, ``seed``, ``sigma_y``
    (physical units; required for frames without a ``sigma`` column, i.e. earth2studio's),
    ``window_hours`` (image models: the rows taken around each request time), ``bf16``,
    ``remat``, ... ``prior_members`` is 0: the unguided prior is not part of the output.
    """

    def __init__(self, model, *, sst: str | os.PathLike | None = None, regrid=None, devices=None, **options):
        unknown = sorted(set(options) - _SETTINGS)
        if unknown:
            raise TypeError(f"CBottleDA got unknown options {unknown}; options: sst, regrid, devices and "
                            f"{sorted(_SETTINGS - {'prior_members'})}")
        if options.get("prior_members", 0) != 0:
            raise ValueError("CBottleDA returns the analysis ensemble only: prior_members must be 0")
        self.settings = AssimilationSettings(**{**options, "prior_members": 0})
        self.settings.check()
        self.sst = sst
        self.regrid = _latlon_grid(regrid)
        self.session = Session(model, devices=None if devices is None else jax_devices(devices))
        dm, _ = self.session.model_for(self.settings)
        self.channels: tuple[str, ...] = tuple(dm.channels)
        self.variables: tuple[str, ...] = tuple(channel_earth2studio(c) for c in self.channels)
        _, self.frames, self.npix = dm.member_shape
        self.time_step_hours = getattr(dm, "time_step_hours", None) if self.frames > 1 else None

    @classmethod
    def load_model(cls, package, **options) -> CBottleDA:
        """earth2studio's loading convention (its eval recipe calls ``load_model(package=...)``):
        ``package`` an ``earth2studio.models.auto.Package`` rooted at a converted model
        directory, or the directory itself."""
        return cls(getattr(package, "root", package), **options)

    @property
    def video(self) -> bool:
        return self.frames > 1

    # -- earth2studio's AssimilationModel protocol ---------------------------------------

    def init_coords(self) -> None:
        """No initial state: every analysis samples from the model's prior."""
        return None

    def input_coords(self) -> tuple[FrameSchema]:
        """One observation frame: earth2studio's fields; ``variable`` lists the model's
        channels under their earth2studio names (each can be observed)."""
        return (FrameSchema({
            "time": np.empty(0, dtype="datetime64[ns]"),
            "lat": np.empty(0, dtype=np.float32),
            "lon": np.empty(0, dtype=np.float32),
            "observation": np.empty(0, dtype=np.float32),
            "variable": np.array(self.variables, dtype=str),
        }),)

    def output_coords(self, input_coords: tuple[FrameSchema | CoordSystem, ...], request_time=None,
                      **kwargs: Any) -> tuple[CoordSystem]:
        """The analysis' coordinates at ``request_time`` (NaT when not given, as HealDA):
        ensemble, time, [lead_time for video models], variable, npix | lat, lon."""
        times = (np.array([np.datetime64("NaT")], dtype="datetime64[ns]") if request_time is None
                 else _request_times(request_time))
        coords = OrderedDict(ensemble=np.arange(self.settings.members), time=times)
        if self.video:
            step = np.timedelta64(int(round(self.time_step_hours * 3600)), "s").astype("timedelta64[ns]")
            coords["lead_time"] = np.arange(self.frames) * step
        coords["variable"] = np.array(self.variables, dtype=str)
        if self.regrid is None:
            coords["npix"] = np.arange(self.npix)
        else:
            coords["lat"], coords["lon"] = self.regrid.coords()
        return (CoordSystem(coords),)

    def to(self, device) -> CBottleDA:
        """Run on ``device`` (see :func:`jax_devices`); a new device means a new session
        (its programs compile again on first use)."""
        devices = jax_devices(device)
        if devices != self.session.devices:
            self.session = Session(self.session.model, devices=devices)
        return self

    def __call__(self, obs: pd.DataFrame | None) -> tuple[xr.DataArray]:
        """Analysis ensemble at each ``obs.attrs["request_time"]`` -> ``(DataArray,)``."""
        if obs is None:
            raise ValueError("CBottleDA needs an observation frame (None is for create_generator's send)")
        times = self._check_frame(obs)
        (coords,) = self.output_coords(self.input_coords(), request_time=times)
        parts = [self._analysis(obs, t) for t in times]
        data = np.stack([p[0] for p in parts], axis=1)  # (M, N, [T,] C, space)
        da = xr.DataArray(data, dims=list(coords), coords=dict(coords), attrs=parts[0][1])
        da = da.assign_coords(
            units=("variable", [channel_info(c).units or "" for c in self.channels]),
            channel=("variable", list(self.channels)),
            n_obs=("time", [p[2] for p in parts]))
        if self.regrid is None:
            da.attrs["pixel_order"] = "HEALPix nested"
        return (da,)

    def create_generator(self) -> Generator[tuple[xr.DataArray] | None, pd.DataFrame | tuple | None, None]:
        """Send observation frames (or 1-tuples of one), receive ``(analysis,)``; ``None``
        gives ``None``. Prime with ``send(None)``. Every frame runs on this model's session:
        the programs compile for the first frame only (the same member count and an
        observation count in the same power-of-two bucket)."""
        obs = yield None
        while True:  # close() ends it at a yield (GeneratorExit); the session stays with the model
            if isinstance(obs, tuple):
                if len(obs) != 1:
                    raise ValueError(f"CBottleDA takes one observation frame, got a tuple of {len(obs)}")
                (obs,) = obs
            obs = yield None if obs is None else self(obs)

    # -- internals -------------------------------------------------------------------------

    def _check_frame(self, obs: pd.DataFrame) -> np.ndarray:
        """earth2studio's field check, then the variables and the request time; -> times."""
        if not isinstance(obs, pd.DataFrame):
            raise TypeError(f"CBottleDA takes a pandas DataFrame (earth2studio observation frame), got "
                            f"{type(obs).__name__}")
        validate_observation_fields(obs, required_fields=list(FIELDS))
        unknown = sorted(set(obs["variable"].astype(str)) - set(self.variables))
        if unknown:
            raise ValueError(f"observation frame has variables {unknown} this model cannot assimilate; "
                             f"it assimilates {list(self.variables)} (input_coords()[0]['variable'])")
        if obs.attrs.get("request_time") is None:
            raise ValueError("observation frame has no 'request_time' in obs.attrs (earth2studio data "
                             "sources set it; else set obs.attrs['request_time'] = the analysis time)")
        return _request_times(obs.attrs["request_time"])

    def _rows(self, obs: pd.DataFrame, time: np.datetime64) -> pd.DataFrame:
        """The frame's rows this analysis assimilates (earth2studio's ``filter_time_range``)."""
        if self.video:
            last = np.timedelta64(int(round(self.time_step_hours * 3600 * (self.frames - 1))), "s")
            tolerance = (np.timedelta64(0, "s"), last)
        else:
            half = np.timedelta64(int(round(self.settings.window_hours * 3600)), "s")
            tolerance = (-half, half)
        rows = filter_time_range(obs, time, tolerance, time_column="time")
        if rows.empty:
            raise ValueError(f"no observations in the window {tolerance[0]} .. {tolerance[1]} of request time "
                             f"{time} ({len(obs)} rows in the frame)")
        if len(rows) < len(obs):
            logger.info("request time %s: %d of %d rows in its window", time, len(rows), len(obs))
        return rows

    def _analysis(self, obs: pd.DataFrame, time: np.datetime64) -> tuple[np.ndarray, dict[str, Any], int]:
        """One analysis -> (values (M, [T,] C, space) float32 physical, attrs, n_obs)."""
        inputs = AnalysisInputs(self._rows(obs, time), None, time=pd.Timestamp(time), settings=self.settings,
                                sst=self.sst, regrid=self.regrid, command=COMMAND)
        ds, summary = analysis_dataset(self.session, inputs)
        logger.info("analysis %s: %s", time, {k: summary[k] for k in ("n_obs", "analysis", "seconds_total")})
        # (member, T, space) per channel -> (M, [T,] C, space)
        values = np.stack([ds[c].values for c in self.channels], axis=2)
        if not self.video:
            values = values[:, 0]
        attrs = {k: ds.attrs[k] for k in REQUIRED_PROVENANCE if k != "n_obs"}
        attrs["source"] = ds.attrs["source"]
        return values, attrs, int(summary["n_obs"])

