"""Several processes (and machines) for one campaign, through JAX's own runtime.

``jax.distributed.initialize`` connects the processes; each then uses only its LOCAL
devices (``jax.local_devices()``) for its members and takes its share of the campaign's
times (:func:`my_share`); the processes meet only at barriers (store created, campaign
done). Nothing is sent between processes but small keys in jax.distributed's key-value
store (the coordinator's): barrier arrivals, progress counts and abort messages.

Faults: a process that fails tells the others (:func:`abort_on_error` publishes the
message, naming the process and what it was doing); every other process stops at its
next check (:func:`check_abort`, between times) or barrier and raises
:class:`CampaignAbortedError`, so all of them exit non-zero. A process that dies without
telling (kill -9, a crash) stops sending heartbeats, and JAX's coordination service ends
the others (``heartbeat_timeout_seconds``, 100 s; exit status 134). One that hangs alive
is caught by the barrier's timeout (:func:`barrier_timeout`, ``JAXGUIDE_BARRIER_TIMEOUT``
seconds, default 1800) counted from the last time any process arrived or finished a time
(:func:`note_progress`), so a long campaign is never cut short.

Launching:

- Slurm: ``srun --ntasks=N ... jaxguide assimilate --distributed auto ...``: JAX reads
  the coordinator, process count and id from the Slurm environment (Open MPI's
  ``mpirun`` works the same way).
- Explicitly (any launcher, or several processes on one machine):
  ``--coordinator HOST:PORT --num-processes N --process-id I`` in each process.

On CPU (tests, laptops) JAX 0.10 runs cross-process collectives with gloo, which is
its default ``jax_cpu_collectives_implementation``; the recipe tested here is two
processes on one machine with ``coordinator_address="localhost:PORT"``,
``num_processes=2`` and ``process_id`` 0 and 1, each seeing 1 local CPU device and 2
global devices.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time as _time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import jax
from jax._src import distributed as jax_distributed  # the key-value store's client (no public API in JAX 0.10)
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

# environment variables through which JAX's cluster auto-detection finds a launcher
_CLUSTER_ENV = {"slurm": "SLURM_NTASKS", "openmpi": "OMPI_COMM_WORLD_SIZE", "mpich": "PMI_SIZE"}


class DistributedError(ValueError):
    """jax.distributed could not be set up as asked."""


class CampaignAbortedError(RuntimeError):
    """A process of a multi-process campaign failed (``failed_process``, ``None`` when a
    barrier timed out): every process stops with this error; the times completed stay in
    the store (``--resume`` continues)."""

    def __init__(self, message: str, failed_process: int | None = None):
        super().__init__(message)
        self.failed_process = failed_process


class BarrierTimeoutError(CampaignAbortedError):
    """Some process did not reach a barrier in time (it died, or hangs)."""


BARRIER_TIMEOUT_ENV = "JAXGUIDE_BARRIER_TIMEOUT"
DEFAULT_BARRIER_TIMEOUT_S = 1800.0
_PREFIX = "jaxguide/"
_POLL_S = 0.2
_barrier_count = itertools.count()  # the n-th barrier of every process has the same number


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the campaign: ``index`` in ``[0, count)``;
    ``barrier_timeout_s``: how long its barriers wait without progress (None:
    :func:`barrier_timeout`)."""

    index: int = 0
    count: int = 1
    barrier_timeout_s: float | None = None

    def __post_init__(self):
        if self.barrier_timeout_s is not None and not self.barrier_timeout_s > 0:
            raise DistributedError(f"the barrier timeout must be a number of seconds > 0, got {self.barrier_timeout_s}")

    @property
    def is_main(self) -> bool:
        return self.index == 0


def detected_launcher() -> str | None:
    """``"slurm"`` / ``"openmpi"`` / ``"mpich"`` when launched with more than one task."""
    for name, var in _CLUSTER_ENV.items():
        try:
            if int(os.environ.get(var, "1")) > 1:
                return name
        except ValueError:
            continue
    return None


def initialize(
    mode: Literal["auto", "off", "explicit"] = "auto",
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    barrier_timeout_s: float | None = None,
) -> ProcessInfo:
    """Start jax.distributed if asked or launched by a cluster launcher; call it before
    any other JAX call of the process.

    mode: "off" (one process), "auto" (initialise when :func:`detected_launcher` finds a
      multi-task launch, else one process), "explicit" (``coordinator`` "host:port",
      ``num_processes``, ``process_id`` all given). Giving any of the three selects
      "explicit".
    barrier_timeout_s: seconds a barrier waits with no process making progress (None:
      :func:`barrier_timeout`, ``$JAXGUIDE_BARRIER_TIMEOUT`` or 1800).
    """
    if barrier_timeout_s is not None:
        ProcessInfo(barrier_timeout_s=barrier_timeout_s)  # checks it before anything starts
    if any(v is not None for v in (coordinator, num_processes, process_id)):
        mode = "explicit"
    if mode == "off":
        return ProcessInfo()
    if mode == "explicit":
        if coordinator is None or num_processes is None or process_id is None:
            raise DistributedError(
                "explicit multi-process runs need all of --coordinator HOST:PORT, --num-processes N "
                "and --process-id I (or use --distributed auto under Slurm / mpirun)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        if ":" not in coordinator:
            raise DistributedError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
        if num_processes == 1:
            return ProcessInfo()
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    elif mode == "auto":
        launcher = detected_launcher()
        if launcher is None:
            return ProcessInfo()
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:
            raise DistributedError(f"launched by {launcher} but jax.distributed.initialize() failed: {e}") from e
    else:
        raise DistributedError(f"unknown distributed mode {mode!r}; expected 'auto', 'off' or 'explicit'")
    info = ProcessInfo(jax.process_index(), jax.process_count(), barrier_timeout_s)
    logger.info("process %d of %d, %d local devices of %d", info.index, info.count,
                jax.local_device_count(), jax.device_count())
    return info


def my_share(items: Sequence, info: ProcessInfo) -> list:
    """This process's items: every ``count``-th one from ``index`` (round robin, so the
    pending times of a resumed campaign stay balanced)."""
    return list(items[info.index :: info.count])


def barrier_timeout() -> float:
    """Seconds a barrier waits without any process making progress:
    ``$JAXGUIDE_BARRIER_TIMEOUT``, else 1800."""
    text = os.environ.get(BARRIER_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_BARRIER_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise DistributedError(f"{BARRIER_TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return value


def _client():
    return jax_distributed.global_state.client


def _aborts(client) -> dict[int, str]:
    return {int(k.rsplit("/", 1)[-1]): v for k, v in client.key_value_dir_get(_PREFIX + "abort/")}


def _raise_if_aborted(client, info: ProcessInfo) -> None:
    others = {p: m for p, m in _aborts(client).items() if p != info.index}
    if others:
        first = min(others)
        raise CampaignAbortedError(
            f"{others[first]}; process {info.index} stopped too (completed times are kept: "
            "--resume continues the campaign)", first)


def publish_abort(info: ProcessInfo, message: str) -> None:
    """Tell the other processes that this one failed (``message`` names it and the time)."""
    client = _client()
    if info.count > 1 and client is not None:
        try:
            client.key_value_set(f"{_PREFIX}abort/{info.index}", message, allow_overwrite=True)
        except Exception as e:  # the coordinator is gone: the others time out at their barrier
            logger.error("could not tell the other processes that process %d failed: %s", info.index, e)


def check_abort(info: ProcessInfo) -> None:
    """Raise :class:`CampaignAbortedError` if another process has failed (no-op for one process)."""
    client = _client()
    if info.count > 1 and client is not None:
        _raise_if_aborted(client, info)


def note_progress(info: ProcessInfo, done: int) -> None:
    """Record that this process has finished ``done`` times: a barrier's timeout counts
    from the last progress of any process."""
    client = _client()
    if info.count > 1 and client is not None:
        client.key_value_set(f"{_PREFIX}progress/{info.index}", str(done), allow_overwrite=True)


@contextlib.contextmanager
def abort_on_error(info: ProcessInfo, where: str) -> Iterator[None]:
    """Run a block of a multi-process campaign: an exception in it tells the other
    processes (:func:`publish_abort`) and becomes :class:`CampaignAbortedError` naming this
    process and ``where`` (e.g. "at analysis time 2020-01-01 06:00:00"), from the
    original error. One process: the error passes unchanged."""
    try:
        yield
    except CampaignAbortedError:
        raise
    except (Exception, KeyboardInterrupt) as e:
        if info.count == 1:
            raise
        text = " ".join(str(e).split()) or "(no message)"
        message = f"process {info.index} of {info.count} failed {where}: {type(e).__name__}: {text}"
        publish_abort(info, message)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise CampaignAbortedError(f"{message}; the other processes stop too (completed times are kept: "
                                   "--resume continues the campaign)", info.index) from e


def barrier(name: str, info: ProcessInfo, timeout_s: float | None = None) -> None:
    """Wait until every process reaches ``name`` (no-op for one process).

    Raises :class:`CampaignAbortedError` as soon as another process has failed
    (:func:`publish_abort`), and :class:`BarrierTimeoutError` naming the missing processes
    when ``timeout_s`` (default ``info.barrier_timeout_s``, else :func:`barrier_timeout`) pass with no process arriving or
    making progress (:func:`note_progress`)."""
    if info.count == 1:
        return
    if timeout_s is None:
        timeout_s = info.barrier_timeout_s if info.barrier_timeout_s is not None else barrier_timeout()
    timeout = float(timeout_s)
    client = _client()
    if client is None:  # jax.distributed started by someone else without a client: no timeout
        multihost_utils.sync_global_devices(name)
        return
    here = f"{_PREFIX}barrier/{next(_barrier_count)}:{name}/"
    client.key_value_set(f"{here}{info.index}", "1", allow_overwrite=True)
    seen = None
    last_change = _time.monotonic()
    while True:
        _raise_if_aborted(client, info)
        arrived = {int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(here)}
        if len(arrived) >= info.count:
            return
        state = (frozenset(arrived), tuple(sorted(client.key_value_dir_get(_PREFIX + "progress/"))))
        if state != seen:
            seen, last_change = state, _time.monotonic()
        elif _time.monotonic() - last_change > timeout:
            missing = sorted(set(range(info.count)) - arrived)
            raise BarrierTimeoutError(
                f"process {info.index}: process(es) {missing} did not reach barrier {name!r} and made no progress "
                f"for {timeout:g} s (died or hung?); stopping (completed times are kept: --resume continues the "
                f"campaign; --barrier-timeout or {BARRIER_TIMEOUT_ENV} sets the timeout)")
        _time.sleep(_POLL_S)
