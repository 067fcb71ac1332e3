"""Several processes (and machines) for one campaign, through JAX's own runtime.

``jax.distributed.initialize`` connects the processes; each then uses only its LOCAL
devices (``jax.local_devices()``) for its members and takes its share of the campaign's
times (:func:`my_share`); the processes meet only at barriers (store created, campaign
done). Nothing is sent between processes but the barrier.

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

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import jax

logger = logging.getLogger(__name__)

# environment variables through which JAX's cluster auto-detection finds a launcher
_CLUSTER_ENV = {"slurm": "SLURM_NTASKS", "openmpi": "OMPI_COMM_WORLD_SIZE", "mpich": "PMI_SIZE"}


class DistributedError(ValueError):
    """jax.distributed could not be set up as asked."""


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the campaign: ``index`` in ``[0, count)``."""

    index: int = 0
    count: int = 1

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
) -> ProcessInfo:
    """Start jax.distributed if asked or launched by a cluster launcher; call it before
    any other JAX call of the process.

    mode: "off" (one process), "auto" (initialise when :func:`detected_launcher` finds a
      multi-task launch, else one process), "explicit" (``coordinator`` "host:port",
      ``num_processes``, ``process_id`` all given). Giving any of the three selects
      "explicit".
    """
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
    info = ProcessInfo(jax.process_index(), jax.process_count())
    logger.info("process %d of %d, %d local devices of %d", info.index, info.count,
                jax.local_device_count(), jax.device_count())
    return info


def my_share(items: Sequence, info: ProcessInfo) -> list:
    """This process's items: every ``count``-th one from ``index`` (round robin, so the
    pending times of a resumed campaign stay balanced)."""
    return list(items[info.index :: info.count])


def barrier(name: str, info: ProcessInfo) -> None:
    """Wait until every process reaches ``name`` (no-op for one process)."""
    if info.count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
