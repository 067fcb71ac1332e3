"""``jaxguide campaign``: many analysis times into one zarr store (see :mod:`jaxguide.campaign.run`).

The options of ``assimilate`` (:class:`~jaxguide.cli.options.RunOptions`) and those of
the processes; the run is :func:`jaxguide.cli.campaign_runner.run_campaign`, which
``jaxguide assimilate --times`` also calls.
"""

from __future__ import annotations

import typer

from jaxguide.cli.app import app, handle_errors
from jaxguide.cli.campaign_runner import Processes, run_campaign
from jaxguide.cli.options import PERFORMANCE, RunOptions, shared_options


@app.command("campaign")
@handle_errors
@shared_options
def campaign(
    *,
    run: RunOptions,
    distributed: str = typer.Option("auto", "--distributed", rich_help_panel=PERFORMANCE, help="auto (jax.distributed under Slurm / mpirun) | off"),
    coordinator: str = typer.Option(None, "--coordinator", rich_help_panel=PERFORMANCE, help="HOST:PORT of process 0 (explicit multi-process runs)"),
    num_processes: int = typer.Option(None, "--num-processes", rich_help_panel=PERFORMANCE, help="number of processes (explicit multi-process runs)"),
    process_id: int = typer.Option(None, "--process-id", rich_help_panel=PERFORMANCE, help="this process's id in [0, N) (explicit multi-process runs)"),
    barrier_timeout: float = typer.Option(None, "--barrier-timeout", rich_help_panel=PERFORMANCE, help=(
        "seconds the processes wait at a barrier while none makes progress before they stop, naming the missing "
        "one (default $JAXGUIDE_BARRIER_TIMEOUT, else 1800)")),
) -> None:
    """Assimilate many analysis times into one zarr store: one compile, resumable, over processes."""
    run_campaign(run, Processes(distributed, coordinator=coordinator, num_processes=num_processes,
                                process_id=process_id, barrier_timeout_s=barrier_timeout))
