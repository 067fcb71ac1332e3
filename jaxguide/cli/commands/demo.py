"""``jaxguide demo`` (an end-to-end experiment on an exact Gaussian prior) and
``jaxguide synthetic-sst`` (an SST file to try SST-conditioned models): nothing to download."""

from __future__ import annotations

from pathlib import Path

import typer

from jaxguide.cli.app import app, enable_compile_cache, handle_errors
from jaxguide.cli.printing import print_demo_summary, print_window_demo_summary


@app.command("synthetic-sst")
@handle_errors
def synthetic_sst(
    out: Path = typer.Argument(..., help="NetCDF file to write (e.g. tosbcs_synthetic.nc)"),
    start: str = typer.Option(..., "--start", help="first analysis time to cover, ISO 8601 (e.g. 2020-01-01)"),
    end: str = typer.Option(..., "--end", help="last analysis time to cover, ISO 8601 (e.g. 2020-12-31)"),
    resolution: float = typer.Option(1.0, "--resolution", help="grid spacing in degrees"),
    overwrite: bool = typer.Option(False, help="replace an existing file"),
) -> None:
    """Write a SYNTHETIC monthly SST file (AMIP tosbcs layout) to try SST-conditioned models.

    A smooth zonal climatology, marked synthetic in its metadata, to try SST-conditioned
    models without downloading the input4MIPs file. Not for real analyses."""
    from jaxguide.model.sst import write_synthetic_sst

    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists (pass --overwrite to replace it)")
    path = write_synthetic_sst(out, start, end, resolution_deg=resolution)
    typer.echo(f"wrote {path} (synthetic SST, tosbcs layout; pass it as --sst)")


@app.command()
@handle_errors
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="output directory (created; its demo files are replaced)"),
    seed: int = typer.Option(0, help="random seed (truth, observations, ensembles)"),
    members: int = typer.Option(None, help="ensemble size (default 64)"),
    steps: int = typer.Option(None, help="sampler (Heun) steps (default 24)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="do not use the persistent compilation cache"),
    window: bool = typer.Option(False, "--window", help="the space-time (video window) experiment instead: "
                                "observations in early frames of a 4-frame window, skill per frame vs the exact "
                                "Kalman smoother (files window_*)"),
) -> None:
    """End-to-end demo on an exact Gaussian prior (no download), verified against the exact posterior.

    Truth, observations, MMPS and regression-guidance ensembles, verification, NetCDF
    files and plots. With --window: a space-time prior on a window of frames, per-frame
    analysis skill."""
    import dataclasses
    import sys
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxguide.demo.experiment import DemoConfig, prepare_out_dir, run_demo

    enable_compile_cache(not no_cache)
    if window:
        from jaxguide.demo.window_experiment import WindowDemoConfig as DemoConfig  # noqa: F811
        from jaxguide.demo.window_experiment import run_window_demo as run_demo  # noqa: F811
    given = {k: v for k, v in (("members", members), ("steps", steps)) if v is not None}
    config = dataclasses.replace(DemoConfig(seed=seed), **given)
    prepare_out_dir(out)  # fail on a bad output path before the progress display starts
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("demo", total=None)

        def progress(i: int, n: int, name: str) -> None:
            bar.update(task, total=n, completed=i, description=f"demo: {name}")

        summary = run_demo(out, config, progress=progress, command=" ".join(["jaxguide", *sys.argv[1:]]))
        bar.update(task, completed=bar.tasks[0].total or 0, description="demo: done")
    (print_window_demo_summary if window else print_demo_summary)(summary, time.perf_counter() - t0)
