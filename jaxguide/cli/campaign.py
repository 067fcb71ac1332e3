"""``jaxguide campaign``: many analysis times into one zarr store (see :mod:`jaxguide.campaign.run`).

Parses options, sets up jax.distributed, shows progress (times done / total, ETA) and
prints the totals; the work is :func:`jaxguide.campaign.run.assimilate_campaign`.
Registered on the main app by :func:`register` (called from :mod:`jaxguide.cli.commands`).
"""

from __future__ import annotations

from pathlib import Path

import typer


def campaign(
    model: Path = typer.Option(..., "--model", help="converted model directory (jaxguide convert)"),
    obs: Path = typer.Option(..., "--obs", help="observations for all times: one CSV/Parquet/NetCDF table, or a directory of Parquet files partitioned by time; jaxguide or earth2studio layout"),
    out: Path = typer.Option(..., "--out", help="campaign store (.zarr), dims (member, time, pixel)"),
    times: list[str] = typer.Option(None, "--times", help="START/END/STEP, ISO 8601 (e.g. 2020-01-01T00/2020-01-05T00/PT6H, END inclusive); repeat or comma-separate for several ranges"),
    times_file: Path = typer.Option(None, "--times-file", help="file with one ISO 8601 time per line"),
    resume: bool = typer.Option(False, "--resume", help="continue the store: run the times not yet complete (same settings required)"),
    overwrite: bool = typer.Option(False, help="replace an existing store"),
    sst: Path = typer.Option(None, "--sst", help="AMIP SST file (input4MIPs tosbcs NetCDF); required by SST-conditioned models"),
    method: str = typer.Option("mmps", help="mmps | sda | dps | pigdm | regression | replacement"),
    members: int = typer.Option(8, help="ensemble size"),
    steps: int = typer.Option(18, help="sampler steps (cBottle: 18, sigma 200 -> 0.02, Heun)"),
    seed: int = typer.Option(0, help="base random seed; each time's key is derived from it and the time"),
    sigma_y: str = typer.Option(None, "--sigma-y", help="observation error, physical units: 1.0 or T850=1.0,T500=0.8 (default: the table's sigma; required for earth2studio frames)"),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", help="multiplies the guidance step"),
    cg_iters: int = typer.Option(None, "--cg-iters", help="MMPS solver iterations (default 3)"),
    solver: str = typer.Option(None, "--solver", help="MMPS solver: cg | gmres (default cg)"),
    gamma: float = typer.Option(None, "--gamma", help="SDA: V_t = gamma sigma^2 (default 0.01)"),
    norm_matching: bool = typer.Option(False, "--norm-matching", help="regression: scale the step to the score's norm"),
    prior_members: int = typer.Option(None, "--prior-members", help="unguided members for the stored prior mean (default: --members; 0: skip)"),
    window_hours: float = typer.Option(3.0, "--window-hours", help="observations within +- this many hours of each time"),
    drop_bad: bool = typer.Option(False, "--drop-bad", help="drop bad rows instead of failing (a time with none left is recorded as skipped)"),
    label: str = typer.Option("era5", help="dataset label of the conditional model (era5 | icon)"),
    interpolation: str = typer.Option("bilinear", help="observation operator: bilinear | nearest (pixel)"),
    allow_implausible: bool = typer.Option(False, "--allow-implausible", help="assimilate values more than 8 climatological standard deviations from the model's mean (normally an error: a unit mistake)"),
    bf16: bool = typer.Option(False, "--bf16", help="evaluate the network in bfloat16 (guidance stays float32)"),
    remat: bool = typer.Option(False, "--remat", help="recompute each U-Net block in the guidance VJPs (less memory)"),
    chunk_size: int = typer.Option(None, "--chunk-size", help="run members this many at a time (less memory)"),
    regrid: str = typer.Option(None, "--regrid", help="write on a regular NLATxNLON lat/lon grid instead of HEALPix"),
    distributed: str = typer.Option("auto", "--distributed", help="auto (jax.distributed under Slurm / mpirun) | off"),
    coordinator: str = typer.Option(None, "--coordinator", help="HOST:PORT of process 0 (explicit multi-process runs)"),
    num_processes: int = typer.Option(None, "--num-processes", help="number of processes (explicit multi-process runs)"),
    process_id: int = typer.Option(None, "--process-id", help="this process's id in [0, N) (explicit multi-process runs)"),
    json_path: Path = typer.Option(None, "--json", help="also write this process's summary as JSON here"),
    no_cache: bool = typer.Option(False, "--no-cache", help="do not use the persistent compilation cache"),
) -> None:
    """Assimilate many analysis times into one zarr store: one compile, resumable, over processes."""
    import shlex
    import sys

    from jaxguide import cli

    from jaxguide.campaign import distributed as dist

    if distributed not in ("auto", "off"):
        raise ValueError(f"--distributed must be auto or off, got {distributed!r}")
    info = dist.initialize(distributed, coordinator=coordinator, num_processes=num_processes, process_id=process_id)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxguide.campaign.run import assimilate_campaign
    from jaxguide.campaign.times import parse_times, read_times_file
    from jaxguide.io.files import check_writable_dir, write_json_atomic
    from jaxguide.assimilation.settings import AssimilationSettings

    if (times is None or not times) == (times_file is None):
        raise ValueError("give the analysis times with exactly one of --times START/END/STEP or --times-file FILE")
    when = read_times_file(times_file) if times_file is not None else parse_times(times)
    settings = AssimilationSettings(
        method=method, members=members, steps=steps, seed=seed, sigma_y=cli._sigma_y(sigma_y),
        guidance_scale=guidance_scale, cg_iters=cg_iters, solver=solver, gamma=gamma, norm_matching=norm_matching,
        label=label, interpolation=interpolation, window_hours=window_hours, drop_bad=drop_bad,
        prior_members=prior_members, bf16=bf16, remat=remat, chunk_size=chunk_size,
        check_plausibility=not allow_implausible)
    settings.check()
    cli.enable_compile_cache(not no_cache)
    grid = cli._latlon_grid(regrid)
    check_writable_dir(Path(out).parent)
    if json_path is not None:
        check_writable_dir(Path(json_path).parent)
    who = f"process {info.index}/{info.count}: " if info.count > 1 else ""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(f"{who}analysis times", total=None)

        def progress(p) -> None:
            bar.update(task, total=p.total, completed=p.done,
                       description=f"{who}analysis times (last {p.time:%Y-%m-%dT%H:%M} {p.status}, ETA {p.eta_s:.0f} s)")

        summary = assimilate_campaign(
            model, obs, out, when, settings, sst=sst, regrid=grid, resume=resume, overwrite=overwrite,
            command=" ".join(shlex.quote(a) for a in ["jaxguide", *sys.argv[1:]]), progress=progress, process=info)
    mine = summary["this_process"]
    secs = [e["seconds"] for e in mine]
    typer.echo(f"{who}{len(mine)} times in {summary['seconds_total']:.1f} s"
               + (f" (first {secs[0]:.1f} s incl. compilation, then {sum(secs[1:]) / max(len(secs) - 1, 1):.2f} s per time)"
                  if secs else ""))
    for e in mine:
        if e["status"] == "skipped":
            typer.echo(f"skipped {e['time']}: {e['reason']}")
    if info.is_main:
        typer.echo(f"store {out}: {summary['analysed']} analysed, {summary['skipped']} skipped, "
                   f"{summary['incomplete']} incomplete of {summary['times']} times")
    if json_path is not None:
        write_json_atomic(json_path, summary)
        typer.echo(f"wrote {json_path}")


def register(app: typer.Typer) -> None:
    """Add ``campaign`` to ``app`` with the CLI's error handling."""
    from jaxguide.cli.commands import handle_errors

    app.command("campaign")(handle_errors(campaign))
