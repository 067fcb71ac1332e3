"""``jaxguide assimilate``: one analysis (or one video run) from observations; with
``--times`` a campaign, as ``jaxguide campaign``.

The work is :func:`jaxguide.assimilation.pipeline.assimilate`; here: the options, the
progress messages and bars, the summary table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from jaxguide.cli.app import app, enable_compile_cache, handle_errors
from jaxguide.cli.campaign_runner import run_campaign
from jaxguide.cli.options import INPUTS, VIDEO, RunOptions, parse_latlon_grid, shared_options
from jaxguide.cli.printing import print_assimilation_summary


@app.command()
@handle_errors
@shared_options
def assimilate(
    time: str = typer.Option(None, "--time", rich_help_panel=INPUTS, help="analysis time, ISO 8601 only: 2020-01-20T00:00 (UTC), 2020-01-20T00:00Z or with an offset, 2020-01-20T02:00+02:00; for a video model the time of the first frame"),
    *,
    run: RunOptions,
    end: str = typer.Option(None, "--end", rich_help_panel=VIDEO, help="video models: time of the last frame of the run, ISO 8601, a whole number of the model's time steps after --time (default: one window); a longer run chains windows"),
    condition: Path = typer.Option(None, "--condition", rich_help_panel=VIDEO, help="video models: NetCDF of known frames (jaxguide analysis layout: HEALPix NEST 'pixel', physical units, the model's variables, optional 'member'); its times on the first window's frames are held fixed"),
    conditioning_frames: int = typer.Option(None, "--conditioning-frames", rich_help_panel=VIDEO, help="video models: frames each chained window takes from the end of the previous one (default 1)"),
    time_matching: str = typer.Option(None, "--time-matching", rich_help_panel=VIDEO, help="video models: linear (an observation between frames is interpolated linearly in time; default) | exact (such a row is an error, or dropped with --drop-bad)"),
    smoother: bool = typer.Option(None, "--smoother/--filter", rich_help_panel=VIDEO, help="video models: sample the whole run --time..--end as one trajectory of overlapping windows, every frame conditioned on every observation (a smoother); --filter (default) chains windows, each conditioned on the previous one"),
    overlap: int = typer.Option(None, "--overlap", rich_help_panel=VIDEO, help="video models, --smoother: frames shared by neighbouring windows (default half a window)"),
) -> None:
    """Sample a posterior ensemble given observations and write an analysis file."""
    video = {"--end": end, "--condition": condition, "--conditioning-frames": conditioning_frames,
             "--time-matching": time_matching, "--smoother/--filter": smoother, "--overlap": overlap}
    video = [opt for opt, v in video.items() if v is not None]
    if run.times or run.times_file is not None:
        if time is not None:
            raise ValueError("give either --time (one analysis) or --times/--times-file (a campaign), not both")
        if video:
            raise ValueError(f"{', '.join(video)} apply to one video run (--time), not to a campaign (--times)")
        # a campaign: the same run as `jaxguide campaign` (one process unless Slurm/mpirun says otherwise)
        return run_campaign(run)
    if time is None:
        raise ValueError("missing --time (one analysis time, ISO 8601) or --times START/END/STEP (a campaign)")
    if run.resume:
        raise ValueError("--resume continues a campaign: it goes with --times or --times-file")
    _assimilate_one(run, time, end, condition, conditioning_frames, time_matching, smoother, overlap)


def _assimilate_one(run: RunOptions, time: str, end: str | None, condition: Path | None,
                    conditioning_frames: int | None, time_matching: str | None, smoother: bool | None = None,
                    overlap: int | None = None) -> None:
    """One analysis time, or one run of a video model from ``time`` to ``end``."""
    import shlex
    import sys
    import time as time_module

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxguide.assimilation import pipeline
    from jaxguide.diffusion.ensemble import describe_devices
    from jaxguide.io.files import check_writable_dir, write_json_atomic
    from jaxguide.observations.table import parse_time

    time = parse_time(time, "--time")
    end_time = None if end is None else parse_time(end, "--end")
    if condition is not None and not condition.is_file():
        raise FileNotFoundError(f"no such conditioning file: {str(condition)!r}")
    if time_matching is not None and time_matching not in ("linear", "exact"):
        raise ValueError(f"--time-matching must be linear or exact, got {time_matching!r}")
    # only the options given: their defaults live in AssimilationSettings
    video_settings = {k: v for k, v in (("conditioning_frames", conditioning_frames),
                                        ("time_matching", time_matching), ("smoother", smoother),
                                        ("overlap", overlap)) if v is not None}
    settings = run.assimilation_settings(**video_settings)
    grid = parse_latlon_grid(run.regrid)
    if run.json_path is not None:
        check_writable_dir(Path(run.json_path).parent)
    cache_dir = enable_compile_cache(not run.no_cache)
    console = Console(stderr=True)
    t0 = time_module.perf_counter()
    console.print(f"[0.0 s] on {describe_devices()}: reading {run.model}, {run.obs} ...")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def on_event(name: str, info) -> None:
            stamp = f"[{time_module.perf_counter() - t0:.1f} s]"
            if name == "known_frames":
                bar.console.print(f"{stamp} known frames from --condition: "
                                  f"{', '.join(str(t)[:16] for t in info['times']) or 'none on the first window'}")
            elif name == "window":
                stage = info.get("stage", "analysis")
                bar.console.print(f"{stamp} {stage}: window {info['index'] + 1}/{info['of']} from {str(info['start'])[:16]}")
                if stage in tasks:  # the bar counts the calls of all windows
                    bar.update(tasks[stage], description=f"{stage}: window {info['index'] + 1}/{info['of']}")
            elif name == "smoother":
                bar.console.print(f"{stamp} smoother: {info['frames']} frames as {info['windows']} windows of "
                                  f"{info['frames_per_window']} sharing {info['overlap']} frames, sampled together")
            elif name == "observations":
                dropped = sum(info["dropped"].values())
                per_window = info.get("per_window")
                bar.console.print(f"{stamp} validated {info['n_obs']} observations"
                                  + (f" ({dropped} bad rows dropped)" if dropped else "")
                                  + (f"; per window: {', '.join(map(str, per_window))}" if per_window else ""))
            elif name == "compiling":
                note = ("the first run of a configuration compiles; later runs load it from the cache "
                        f"{cache_dir}" if cache_dir else "compilation cache off (--no-cache)")
                bar.console.print(f"{stamp} {info['stage']}: compiling the sampler for {info['members']} "
                                  f"members ({note})")
                tasks[info["stage"]] = bar.add_task(f"{info['stage']}: compiling", total=info["calls"])
            elif name == "sampling":
                bar.update(tasks[info["stage"]], description=f"{info['stage']}: sampling (denoiser calls)")
                bar.console.print(f"{stamp} {info['stage']}: compiled in {info['compile_s']:.1f} s; sampling")
            elif name == "sampled":
                task = tasks[info["stage"]]
                bar.update(task, completed=bar.tasks[task].total, description=f"{info['stage']}: done")
            elif name == "writing":
                bar.console.print(f"{stamp} writing {info['path']}")

        def progress(stage: str, done: int, total: int) -> None:
            if stage in tasks:
                bar.update(tasks[stage], completed=done, total=total)

        summary = pipeline.assimilate(
            run.model,
            run.obs,
            run.out,
            time=time,
            end=end_time,
            condition=condition,
            settings=settings,
            sst=run.sst,
            regrid=grid,
            overwrite=run.overwrite,
            command=" ".join(shlex.quote(a) for a in ["jaxguide", *sys.argv[1:]]),
            # per-call progress needs a host callback, which keeps the program out of the cache
            progress=progress if cache_dir is None else None,
            on_event=on_event,
        )
    print_assimilation_summary(summary)
    typer.echo(f"wrote {run.out}")
    if run.json_path is not None:
        write_json_atomic(run.json_path, summary)
        typer.echo(f"wrote {run.json_path}")
