"""``jaxguide evaluate``: scores of an analysis at observations and against a truth field."""

from __future__ import annotations

from pathlib import Path

import typer

from jaxguide.cli.app import app, handle_errors
from jaxguide.cli.printing import print_evaluation


@app.command()
@handle_errors
def evaluate(
    analysis: Path = typer.Argument(..., help="analysis file written by jaxguide (.nc or .zarr)"),
    obs: Path = typer.Option(..., "--obs", help="assimilated observations (CSV: time, lat, lon, variable, value, sigma)"),
    held_out: Path = typer.Option(None, "--held-out", help="held-out observations, same format"),
    truth: Path = typer.Option(None, "--truth", help="truth fields (NetCDF, same variables, NEST pixels)"),
    json_path: Path = typer.Option(None, "--json", help="write the metrics as JSON here"),
    plots_dir: Path = typer.Option(None, "--plots", help="write PNG maps and rank histograms into this directory"),
    seed: int = typer.Option(0, help="seed of the observation-noise draws and the rank histograms' tie-breaking"),
    time_tolerance_hours: float = typer.Option(
        None, "--time-tolerance-hours", help="leave out observations farther than this from every analysed time "
        "[default: the analysis' observation window, else 3 h]"),
) -> None:
    """Score an analysis at assimilated and held-out observations and against a truth field.

    RMSE / CRPS / energy and variogram scores / spread / spread-skill, at observations
    read with the analysis' own observation operator. A trajectory (several frame times, a video
    model's run) is read in time as assimilate did (linear between frames, or the
    nearest frame) and also scored per frame; with linear interpolation, observations
    outside its first..last frame are left out (a note says how many). Only analysed
    times are scored (a campaign's pending and skipped times are left out, with a note),
    observations farther than the time tolerance from every analysed time are left out,
    and the scores use the analysis' --sigma-y where it recorded one."""
    from jaxguide.verification import evaluation
    from jaxguide.io.files import check_writable_dir, read_analysis, write_json_atomic

    # check the outputs before the work, but create nothing until the inputs are read
    if json_path is not None:
        check_writable_dir(Path(json_path).parent)
    if plots_dir is not None:
        if plots_dir.exists() and not plots_dir.is_dir():
            raise FileExistsError(f"--plots {str(plots_dir)!r} exists and is not a directory")
        check_writable_dir(plots_dir if plots_dir.is_dir() else plots_dir.parent)

    ds = read_analysis(analysis)
    sets = {"assimilated": obs} if held_out is None else {"assimilated": obs, "held_out": held_out}
    result = evaluation.evaluate(ds, sets, truth=truth, seed=seed, time_tolerance_hours=time_tolerance_hours)
    if result.times.get("n_not_analysed"):
        t = result.times
        typer.echo(f"note: {t['n_not_analysed']} of the {t['n_times']} times were not analysed and are not scored "
                   f"(pending: {t['pending']}, skipped: {t['skipped']})", err=True)
    if result.sigma.get("sigma_y") is not None:
        typer.echo(f"note: scored with the analysis' sigma_y ({result.sigma['sigma_y']}), not the table's sigma",
                   err=True)
    for name, info in result.skipped.items():
        if "time_tolerance" in info:
            typer.echo(f"note: {name}: left out {info['time_tolerance']['n_obs']} observations "
                       f"{info['time_tolerance']['reason']} (--time-tolerance-hours)", err=True)
        if "variables" in info:
            typer.echo(f"note: {name}: left out {info['n_obs']} observations of variables not in the analysis: "
                       f"{info['variables']}", err=True)
        if "outside_time" in info:
            out_t = info["outside_time"]
            typer.echo(f"note: {name}: left out {out_t['n_obs']} observations outside the analysis times "
                       f"{out_t['first']} to {out_t['last']} (the trajectory is interpolated in time only between "
                       "its frames)", err=True)
    print_evaluation(result)
    if json_path is not None:
        write_json_atomic(json_path, result.to_json(analysis))
        typer.echo(f"wrote {json_path}")
    if plots_dir is not None:
        evaluation.write_plots(result, ds, plots_dir)
        typer.echo(f"wrote plots to {plots_dir}")
