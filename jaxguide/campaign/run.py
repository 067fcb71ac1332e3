"""Campaigns: many analysis times in one run, compiled once, resumable, over processes.

:func:`assimilate_campaign` assimilates each time's observation window and writes it
into one zarr store (:mod:`jaxguide.campaign.store`) with a ``time`` dimension:

- one compile: one :class:`~jaxguide.assimilation.session.Session` (compiled ensemble programs) for
  every time, and every time's observations padded to ONE size (the bucket of the
  largest window of the campaign), so shapes never change;
- reproducible: time ``t`` uses the key :func:`~jaxguide.assimilation.settings.time_key`
  ``(seed, t)`` (the seed rule of every entry point), split into analysis and prior keys, so its result does not depend on
  the order, the process that runs it, or resumes;
- resumable: times are written whole and flagged complete last; ``resume=True`` checks
  the store's settings (:class:`~jaxguide.campaign.store.SettingsMismatchError` names a
  difference) and the contents of the observation and SST files (size and SHA-256, a
  manifest of the partition files for a directory;
  :class:`~jaxguide.campaign.store.InputsChangedError` names a changed file), redoes
  complete times whose chunk files were lost or damaged, and runs the times not yet
  complete;
- skipped times: a failure that is about one time's data is recorded as that time's
  skip with the reason (``completed = 2``, ``skipped_reason``) and the run goes on: a
  window without observations, observations that cannot be used (all rejected, bad rows
  without ``drop_bad``, a per-variable ``sigma_y`` naming a variable the window lacks: any
  :class:`~jaxguide.observations.errors.ObservationError`), an SST field that cannot be
  sea-surface temperature at that time (:class:`~jaxguide.model.sst.SSTValueError`), or
  a non-finite ensemble; times outside the SST file are refused before anything runs;
- several processes: with :mod:`jaxguide.campaign.distributed` initialised, process 0 creates
  (or opens) the store, every process takes every ``count``-th pending time and samples
  its members on its local devices, and each writes only its own times' chunks. Any
  other error in one process is a coordinated abort: it tells the others, and every
  process raises :class:`~jaxguide.campaign.distributed.CampaignAbortedError` naming the
  failing process and time (barriers time out if a process dies without telling); the
  completed times stay, ``resume=True`` continues.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time as _time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd

from jaxguide.campaign.store import ANALYSED, SKIPPED, CampaignStore, normalise_settings
from jaxguide.campaign.distributed import ProcessInfo, abort_on_error, barrier, check_abort, my_share, note_progress
from jaxguide.grid.latlon import LatLonGrid
from jaxguide.io.files import content_identity
from jaxguide.model.sst import SSTValueError, check_sst_covers, read_amip_sst
from jaxguide.observations.sources import ObservationSource, PartitionedSource, TableSource, open_observations
from jaxguide.observations.errors import EmptyTableError, ObservationError
from jaxguide.observations.prepare import bucket_size, prepare
from jaxguide.assimilation.provenance import model_sha256, run_provenance
from jaxguide.assimilation.session import Session
from jaxguide.assimilation.settings import DIVERGED, AssimilationSettings, denoiser_calls, is_diverged, run_keys
from jaxguide.assimilation.dataset import analysis_to_dataset

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CampaignProgress:
    """Reported after each time: ``done`` of ``total`` times of this process, the time
    just finished and how (``"analysed"`` / ``"skipped"``), seconds so far and the
    estimated seconds left (mean seconds per time after the first, which compiles, x
    times left)."""

    done: int
    total: int
    time: pd.Timestamp
    status: str
    elapsed_s: float
    eta_s: float


def _path_id(p) -> str | None:
    return None if p is None else str(Path(p).resolve())


def campaign_settings(settings: AssimilationSettings, dm, *, obs_name: str, sst, regrid: LatLonGrid | None,
                      pad_to: int | None) -> dict[str, Any]:
    """Everything that decides a campaign's numbers, as stored in (and compared with) the
    store: the assimilation settings, the method's options, the model checkpoint, the
    observation and SST sources, the grid and the observation padding."""
    method = settings.guidance_method()
    out = {k: v for k, v in dataclasses.asdict(settings).items() if k != "method"}
    out["method"] = settings.method_name
    out["method_options"] = {k: (np.asarray(v).tolist() if hasattr(v, "shape") else v) for k, v in method.options().items()}
    out["model_sha256"] = model_sha256(dm)
    out["model"] = type(dm).__name__
    out["observations"] = obs_name
    out["sst"] = _path_id(sst)
    out["regrid"] = None if regrid is None else dataclasses.asdict(regrid)
    out["observation_padding"] = pad_to
    return normalise_settings(out)


def _table_identity(table: pd.DataFrame) -> dict[str, Any]:
    import hashlib

    digest = hashlib.sha256(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    digest.update(repr(list(table.columns)).encode())
    return {"rows": len(table), "sha256": digest.hexdigest()}


def input_identity(obs, source: ObservationSource, sst) -> dict[str, Any]:
    """What the campaign's inputs hold, recorded in the store and compared on resume: the
    observation file (size, SHA-256), the partition files of a directory (a manifest of
    names, sizes, hashes) or a table's contents, and the SST file."""
    if isinstance(source, PartitionedSource):
        observations = {"path": str(source.root),
                        "identity": content_identity(source.root, [p.path for p in source.parts])}
    elif isinstance(obs, str | os.PathLike):
        observations = {"path": str(obs), "identity": content_identity(obs)}
    else:
        observations = {"path": _source_name(obs), "identity": _table_identity(source.table)}
    out = {"observations": observations}
    if sst is not None:  # a missing file is named where it is read
        out["sst"] = {"path": str(sst), "identity": content_identity(sst) if Path(sst).is_file() else None}
    return out


def _provenance(settings: AssimilationSettings, dm, command: str) -> dict[str, Any]:
    return run_provenance(settings, dm, command, n_obs="per time: variable n_obs")


def _per_time_vars(ds, n_obs: int, n_rejected: int):
    ds["n_obs"] = ("time", np.array([n_obs], np.int32), {"long_name": "observations assimilated", "units": "1"})
    ds["n_rejected"] = ("time", np.array([n_rejected], np.int32),
                        {"long_name": "observation rows in the window rejected by validation", "units": "1"})
    return ds


def _window(settings: AssimilationSettings, t: pd.Timestamp) -> tuple[pd.Timestamp, pd.Timestamp]:
    w = pd.Timedelta(hours=settings.window_hours)
    return t - w, t + w


def _padding(source: ObservationSource, times: pd.DatetimeIndex, settings: AssimilationSettings) -> int | None:
    """One observation count for the whole campaign: the bucket of the largest window
    (rows before validation, an upper bound), so every time runs the same program."""
    if not settings.pad_observations:
        return None
    most = max((len(source.window(*_window(settings, t))) for t in times), default=0)
    return bucket_size(most)


def _source_name(obs) -> str:
    if isinstance(obs, TableSource | PartitionedSource | pd.DataFrame):
        name = getattr(obs, "name", None) or getattr(obs, "root", None)
        return str(name) if name is not None else "DataFrame"
    return _path_id(obs)


def assimilate_campaign(
    model,
    obs,
    store: str | os.PathLike,
    times: Sequence[Any],
    settings: AssimilationSettings = AssimilationSettings(),
    *,
    sst: str | os.PathLike | None = None,
    regrid: LatLonGrid | None = None,
    resume: bool = False,
    overwrite: bool = False,
    allow_changed_inputs: bool = False,
    command: str = "jaxguide.campaign.run.assimilate_campaign",
    progress: Callable[[CampaignProgress], None] | None = None,
    process: ProcessInfo = ProcessInfo(),
    session: Session | None = None,
) -> dict[str, Any]:
    """Assimilate every time of ``times`` into the zarr store ``store`` (see module doc).

    Args:
      model: converted model directory, a loaded model or a DenoiserModel (as
        :func:`jaxguide.assimilation.pipeline.assimilate` takes it); ignored when ``session`` is given.
      obs: observation file, a time-partitioned Parquet directory, a DataFrame (jaxguide
        or earth2studio layout, :mod:`jaxguide.observations.sources`) or an opened source.
      times: increasing UTC times (whole seconds), e.g. from
        :func:`jaxguide.campaign.times.parse_times`.
      resume: continue an existing store (settings and input contents must match); without
        it an existing store is an error unless ``overwrite``.
      allow_changed_inputs: resume even if the observation or SST files changed since the
        store was made (a warning instead of :class:`~jaxguide.campaign.store.InputsChangedError`);
        the new contents are recorded with the change, so a later resume checks against them.
      progress: called after each of this process's times.
      process: this process's place (:func:`jaxguide.campaign.distributed.initialize`).
    Returns a JSON-friendly summary (this process's times; on process 0 also the
    store's totals after every process has finished).

    Raises :class:`~jaxguide.campaign.distributed.CampaignAbortedError` on every process
    when one of several processes fails (see module doc); with one process an error that is
    not about one time's data passes unchanged.
    """
    with abort_on_error(process, "outside the analysis times (setting up or finishing the campaign)"):
        return _campaign(model, obs, store, times, settings, sst=sst, regrid=regrid, resume=resume,
                         overwrite=overwrite, allow_changed_inputs=allow_changed_inputs, command=command,
                         progress=progress, process=process, session=session)


def _campaign(model, obs, store, times, settings, *, sst, regrid, resume, overwrite, allow_changed_inputs, command,
              progress, process, session) -> dict[str, Any]:
    t_start = _time.perf_counter()
    settings.check()
    method = settings.guidance_method()
    times = pd.DatetimeIndex(times)
    store = Path(store)
    if session is None:
        # no per-call host callbacks: the programs stay cacheable (JAX's persistent cache)
        session = Session(model, devices=jax.local_devices(), report_progress=False)
    dm, fn = session.model_for(settings)
    if dm.member_shape[1] > 1:
        raise ValueError(
            f"campaigns run one analysis per time; this is a video model ({dm.member_shape[1]} frames per window): "
            "assimilate a whole period with `jaxguide assimilate --time START --end END` (chained windows)")
    source = obs if isinstance(obs, TableSource | PartitionedSource) else open_observations(obs, sigma_y=settings.sigma_y)
    pad_to = _padding(source, times, settings)
    if sst is not None:  # every time inside the SST file, before anything runs
        check_sst_covers(read_amip_sst(sst), times)
    config = campaign_settings(settings, dm, obs_name=_source_name(obs), sst=sst, regrid=regrid, pad_to=pad_to)
    inputs = input_identity(obs, source, sst)

    # the store: every process checks it (so that a refusal stops all of them, not only
    # process 0 while the others wait), process 0 creates it, the others open it after
    exists = store.exists()
    changed: tuple[str, ...] = ()
    if exists and resume:  # SettingsMismatchError / InputsChangedError name a difference
        changed = CampaignStore.open(store, times, config, inputs=inputs,
                                     allow_changed_inputs=allow_changed_inputs).changed_inputs
    elif exists and not overwrite:
        raise FileExistsError(f"{str(store)!r} exists (pass --resume to continue that campaign, or --overwrite)")
    barrier("jaxguide-campaign-store-checked", process)  # before process 0 creates it
    if process.is_main:
        if not (exists and resume):
            n_prior = settings.n_prior
            C, T, npix = dm.member_shape
            nan = np.full((settings.members, C, T, npix), np.nan, np.float32)
            template = analysis_to_dataset(nan, channels=list(dm.channels), center=dm.center, scale=dm.scale,
                                           times=times[:1], provenance=_provenance(settings, dm, command),
                                           prior=nan[:1] if n_prior > 0 else None, regrid_latlon=regrid)
            if n_prior > 0:
                template.attrs["n_prior_members"] = n_prior
            CampaignStore.create(store, _per_time_vars(template, 0, 0), times, config, overwrite=overwrite,
                                 inputs=inputs)
        else:  # complete times whose chunk files were lost or damaged are run again
            opened = CampaignStore.open(store)
            if changed:  # allowed: later resumes check against these inputs
                opened.record_inputs(inputs, changed)
            opened.redo_damaged()
    barrier("jaxguide-campaign-store-ready", process)
    st = CampaignStore.open(store, times, config)
    pending = st.pending()
    barrier("jaxguide-campaign-pending-read", process)  # nobody writes before all have read
    mine = my_share(pending, process)
    logger.info("campaign: %d times, %d pending, %d for process %d", len(times), len(pending), len(mine), process.index)

    sampler_kwargs = settings.sampler_kwargs()
    devices = session.devices
    done: list[dict[str, Any]] = []
    t_first = _time.perf_counter()
    for n, i in enumerate(mine, start=1):
        t = st.times[i]
        check_abort(process)  # another process failed: stop here
        t0 = _time.perf_counter()
        with abort_on_error(process, f"at analysis time {t}"):
            entry = _one_time(t, source, st, session, dm, fn, method, settings, sampler_kwargs, devices,
                              sst=sst, regrid=regrid, pad_to=pad_to, command=command)
        entry["seconds"] = _time.perf_counter() - t0
        done.append(entry)
        note_progress(process, n)
        if progress is not None:
            secs = [e["seconds"] for e in done]
            per_time = np.mean(secs[1:]) if len(secs) > 1 else secs[0]  # the first time compiles
            progress(CampaignProgress(n, len(mine), t, entry["status"], _time.perf_counter() - t_first,
                                      float(per_time * (len(mine) - n))))

    barrier("jaxguide-campaign-done", process)
    summary: dict[str, Any] = {
        "store": str(store),
        "process": process.index,
        "processes": process.count,
        "times": len(times),
        "pending_at_start": len(pending),
        "this_process": done,
        "seconds_total": _time.perf_counter() - t_start,
        "denoiser_calls_per_member": denoiser_calls(settings),
    }
    if process.is_main:
        st.consolidate()  # for a store of an earlier jaxguide (made without consolidated metadata)
        status = st.status()
        summary["analysed"] = int(np.sum(status == ANALYSED))
        summary["skipped"] = int(np.sum(status == SKIPPED))
        summary["incomplete"] = int(np.sum(status == 0))
    return summary


def _one_time(t, source, st, session, dm, fn, method, settings, sampler_kwargs, devices, *, sst, regrid, pad_to,
              command) -> dict[str, Any]:
    """Assimilate time ``t`` into the store, or record it as skipped when the failure is
    about its data (observations, a non-finite ensemble); anything else raises."""
    rows = source.window(*_window(settings, t))
    entry: dict[str, Any] = {"time": str(t)}
    skip_reason = None
    n_rejected = len(rows)
    if len(rows) == 0:
        skip_reason = f"no observations within +-{settings.window_hours:g} h"
    else:
        try:
            prepared = prepare(rows, dm.channels, dm.center, dm.scale, time=t, window_hours=settings.window_hours,
                               drop_bad=settings.drop_bad, sigma_y=settings.sigma_y, nside=dm.nside,
                               interpolation=settings.interpolation, pad_to=pad_to,
                               check_plausibility=settings.check_plausibility)
        except EmptyTableError as e:
            skip_reason = f"all {len(rows)} observations rejected ({_counts(e)})"
        except ObservationError as e:
            bad = sum(e.counts.values())
            if e.counts and bad >= len(rows):
                skip_reason = f"all {len(rows)} observations rejected ({_counts(e)})"
            else:
                n_rejected = bad
                hint = " (use drop_bad / --drop-bad to drop them)" if e.counts and not settings.drop_bad else ""
                skip_reason = f"{' '.join(str(e).split())}{hint}"
    if skip_reason is None:
        prepared.obs.check()
        try:
            cond = dm.conditioning(t, sst_path=sst, sst_offset=settings.sst_offset)
        except SSTValueError as e:  # this time's SST field is bad (Inf, a fill value): the others may not be
            skip_reason, n_rejected = str(e), sum(prepared.dropped.values())
    if skip_reason is None:
        key_analysis, key_prior = run_keys(settings.seed, t)  # the seed rule of every entry point

        def run(m, n_members, key, obs_):
            ens = session.programs(fn, key, dm.member_shape, n_members, sampler_kwargs=sampler_kwargs,
                                   devices=devices, chunk_size=settings.chunk_size,
                                   operands=(dm.params, cond, m, obs_))
            ens = np.asarray(jax.block_until_ready(ens))
            if is_diverged(ens):
                raise FloatingPointError(
                    f"non-finite values in the {'analysis' if m is not None else 'prior'} "
                    f"ensemble (method {settings.method_name!r}, guidance scale {settings.guidance_scale}; a run "
                    f"stops at the first denoiser call that leaves {DIVERGED:g} scales): lower --guidance-scale")
            return ens

        try:
            analysis = run(method, settings.members, key_analysis, prepared.obs)
            prior = run(None, settings.n_prior, key_prior, None) if settings.n_prior > 0 else None
        except FloatingPointError as e:  # this time's analysis diverged: the others may not
            skip_reason, n_rejected = str(e), sum(prepared.dropped.values())
    if skip_reason is not None:
        st.skip(t, skip_reason, n_rejected=n_rejected)
        entry.update(status="skipped", reason=skip_reason)
        return entry
    ds = analysis_to_dataset(analysis, channels=list(dm.channels), center=dm.center, scale=dm.scale,
                             times=[t], provenance=_provenance(settings, dm, command), prior=prior,
                             regrid_latlon=regrid)
    n_rejected = sum(prepared.dropped.values())
    st.write_time(_per_time_vars(ds, prepared.n_obs, n_rejected))
    entry.update(status="analysed", n_obs=prepared.n_obs, n_rejected=n_rejected)
    return entry


def _counts(e: ObservationError) -> str:
    return ", ".join(f"{k}: {v}" for k, v in e.counts.items()) or str(e)
