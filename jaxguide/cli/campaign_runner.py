"""A campaign from the command line: ``jaxguide campaign`` and ``jaxguide assimilate --times``.

Sets up jax.distributed, checks the options, shows progress (times done / total, ETA)
and prints the totals; the work is :func:`jaxguide.campaign.run.assimilate_campaign`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from jaxguide.cli.app import enable_compile_cache, is_input_error
from jaxguide.cli.options import RunOptions, parse_latlon_grid
from jaxguide.cli.printing import print_campaign_summary


@dataclasses.dataclass(frozen=True)
class Processes:
    """How the campaign's times are spread over processes (``jaxguide campaign``'s
    ``--distributed``, ``--coordinator``, ``--num-processes``, ``--process-id``,
    ``--barrier-timeout``): ``auto`` starts jax.distributed under Slurm / mpirun, ``off``
    runs one process."""

    distributed: str = "auto"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    barrier_timeout_s: float | None = None


def run_campaign(run: RunOptions, processes: Processes = Processes()) -> None:
    """Assimilate the times of ``run.times`` / ``run.times_file`` into the store ``run.out``."""
    import shlex
    import sys
    import traceback

    from jaxguide.campaign import distributed as dist

    if processes.distributed not in ("auto", "off"):
        raise ValueError(f"--distributed must be auto or off, got {processes.distributed!r}")
    # before anything else touches JAX's backends
    info = dist.initialize(processes.distributed, coordinator=processes.coordinator,
                           num_processes=processes.num_processes, process_id=processes.process_id,
                           barrier_timeout_s=processes.barrier_timeout_s)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import jax

    from jaxguide.campaign.run import assimilate_campaign
    from jaxguide.diffusion.ensemble import describe_devices
    from jaxguide.campaign.times import parse_times, read_times_file
    from jaxguide.io.files import check_writable_dir, write_json_atomic

    if (run.times is None or not run.times) == (run.times_file is None):
        raise ValueError("give the analysis times with exactly one of --times START/END/STEP or --times-file FILE")
    when = read_times_file(run.times_file) if run.times_file is not None else parse_times(run.times)
    settings = run.assimilation_settings()
    enable_compile_cache(not run.no_cache)
    grid = parse_latlon_grid(run.regrid)
    check_writable_dir(Path(run.out).parent)
    if run.json_path is not None:
        check_writable_dir(Path(run.json_path).parent)
    who = f"process {info.index}/{info.count}: " if info.count > 1 else ""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, transient=False) as bar:
            bar.console.print(f"{who}{len(when)} analysis times on {describe_devices(jax.local_devices())}")
            task = bar.add_task(f"{who}analysis times", total=None)

            def progress(p) -> None:
                bar.update(task, total=p.total, completed=p.done,
                           description=f"{who}analysis times (last {p.time:%Y-%m-%dT%H:%M} {p.status}, "
                                       f"ETA {p.eta_s:.0f} s)")

            summary = assimilate_campaign(
                run.model, run.obs, run.out, when, settings, sst=run.sst, regrid=grid, resume=run.resume,
                overwrite=run.overwrite, allow_changed_inputs=run.allow_changed_inputs,
                command=" ".join(shlex.quote(a) for a in ["jaxguide", *sys.argv[1:]]),
                progress=progress, process=info)
    except dist.CampaignAbortedError as e:
        # every process of a multi-process campaign stops with one line naming the failing
        # process and time; that process also shows its error's traceback unless it was bad input
        cause = e.__cause__
        if e.failed_process == info.index and cause is not None and not is_input_error(cause):
            traceback.print_exception(cause)
        typer.echo(f"error: {' '.join(str(e).split())}", err=True)
        raise typer.Exit(1) from None
    print_campaign_summary(summary, run.out, who=who, is_main=info.is_main)
    if run.json_path is not None:
        write_json_atomic(run.json_path, summary)
        typer.echo(f"wrote {run.json_path}")
