"""Command line: ``jaxguide convert | assimilate | evaluate | demo``.

Each command is a thin layer over the library (``convert.convert_checkpoints``,
``jaxguide.pipeline.assimilate``, ``jaxguide.evaluation``, ``jaxguide.demo``): parse
options, show progress, print a table.

Expected failures (missing or malformed files, unwritable outputs) end with one line
``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Score-based data assimilation with cBottle in JAX.")

EXPECTED_ERRORS = (FileNotFoundError, ValueError, KeyError, OSError, FloatingPointError)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"missing key {e.args[0]!r}" if e.args else "missing key"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.strerror}: {e.filename}"
    text = " ".join(str(e).split())
    return text or type(e).__name__


def handle_errors(fn):
    """Turn expected error classes into one ``error: ...`` line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            _fail(_message(e))

    return wrapper


# --------------------------------------------------------------------------------------
# convert


def _floats(text: str | None, what: str) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


@app.command()
@handle_errors
def convert(
    checkpoints: list[Path] = typer.Argument(..., help="cBottle checkpoint(s) (.checkpoint zip); several = experts of a mixture, highest sigma first"),
    out: Path = typer.Option(..., "--out", help="output directory for the JAX parameters"),
    sigma_thresholds: str = typer.Option(None, "--sigma-thresholds", help="mixture: sigma boundaries between consecutive experts, comma separated (e.g. 100,10)"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Convert a cBottle PyTorch checkpoint (or the experts of a mixture) to jaxguide parameters."""
    try:
        from convert import convert_checkpoints
    except ImportError as e:
        raise ValueError(f"the converter needs PyTorch: pip install 'jaxguide[convert]' ({e})") from None
    for ck in checkpoints:
        if not ck.is_file():
            raise FileNotFoundError(f"no such checkpoint: {str(ck)!r}")
    thresholds = _floats(sigma_thresholds, "--sigma-thresholds")
    with _status(f"converting {len(checkpoints)} checkpoint(s)"):
        path = convert_checkpoints(checkpoints, out, sigma_thresholds=thresholds, overwrite=overwrite)
    typer.echo(f"wrote {path}")


# --------------------------------------------------------------------------------------
# assimilate


def _status(text: str):
    from rich.console import Console

    return Console(stderr=True).status(text)


def _sigma_y(text: str | None):
    """``1.0`` (every observation) or ``T850=1.0,T500=0.8`` (per variable); None keeps the table's."""
    if text is None:
        return None
    if "=" not in text:
        values = _floats(text, "--sigma-y")
        if len(values) != 1:
            raise ValueError(f"--sigma-y takes one value or VAR=VALUE pairs, got {text!r}")
        return values[0]
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--sigma-y: cannot read {part!r} (expected VAR=VALUE)") from None
    return out


def _latlon_grid(text: str | None):
    from jaxguide.grid_sampling import LatLonGrid

    if text is None:
        return None
    try:
        nlat, nlon = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--regrid must look like 181x360 (NLATxNLON), got {text!r}") from None
    if nlat < 2 or nlon < 2:
        raise ValueError(f"--regrid needs at least 2x2 points, got {text!r}")
    return LatLonGrid(nlat, nlon)


def _print_assimilation_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"observation fit ({summary['n_obs']} obs, method {summary['method']})")
    for col in ("variable", "n", "prior RMSE", "analysis RMSE", "analysis spread"):
        table.add_column(col, justify="left" if col == "variable" else "right")
    prior = summary.get("prior") or {}
    for var, a in summary["analysis"].items():
        p = prior.get(var, {})
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        table.add_row(var, str(a["n_obs"]), fmt(p.get("rmse")), fmt(a["rmse"]), fmt(a.get("spread")))
    console = Console()
    console.print(table)
    if summary["dropped"]:
        console.print(f"dropped observation rows: {summary['dropped']}")
    console.print(
        f"sampling: analysis {summary['seconds_analysis']:.1f} s, prior {summary['seconds_prior']:.1f} s "
        f"(incl. compilation); total {summary['seconds_total']:.1f} s"
    )


@app.command()
@handle_errors
def assimilate(
    model: Path = typer.Option(..., "--model", help="converted model directory (jaxguide convert)"),
    obs: Path = typer.Option(..., "--obs", help="observation table: CSV/Parquet/NetCDF with time, lat, lon, variable, value, sigma (physical units)"),
    time: str = typer.Option(..., "--time", help="analysis time, ISO 8601, UTC (e.g. 2020-01-20T00:00)"),
    out: Path = typer.Option(..., "--out", help="analysis file (.nc NetCDF4, or .zarr)"),
    sst: Path = typer.Option(None, "--sst", help="AMIP SST file (input4MIPs tosbcs NetCDF); required by SST-conditioned models"),
    method: str = typer.Option("mmps", help="mmps | sda | dps | pigdm | regression | replacement"),
    members: int = typer.Option(8, help="ensemble size"),
    steps: int = typer.Option(18, help="sampler steps (cBottle: 18, sigma 200 -> 0.02, Heun)"),
    seed: int = typer.Option(0, help="random seed"),
    sigma_y: str = typer.Option(None, "--sigma-y", help="observation error override, physical units: 1.0 or T850=1.0,T500=0.8 (default: the table's sigma)"),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", help="multiplies the guidance step (regression usually needs << 1)"),
    cg_iters: int = typer.Option(3, "--cg-iters", help="MMPS conjugate-gradient iterations"),
    prior_members: int = typer.Option(None, "--prior-members", help="unguided members for the prior fit and increment (default: --members; 0: skip)"),
    window_hours: float = typer.Option(3.0, "--window-hours", help="assimilate observations within +- this many hours of --time"),
    drop_bad: bool = typer.Option(False, "--drop-bad", help="drop bad rows (outside the window, NaN, unknown variable, ...) instead of failing; counts are reported"),
    label: str = typer.Option("era5", help="dataset label of the conditional model (era5 | icon)"),
    interpolation: str = typer.Option("bilinear", help="observation operator: bilinear | nearest (pixel)"),
    bf16: bool = typer.Option(False, "--bf16", help="evaluate the network in bfloat16 (guidance stays float32)"),
    remat: bool = typer.Option(False, "--remat", help="recompute the network in the guidance VJPs (less memory)"),
    chunk_size: int = typer.Option(None, "--chunk-size", help="run members this many at a time (less memory)"),
    regrid: str = typer.Option(None, "--regrid", help="write on a regular NLATxNLON lat/lon grid instead of HEALPix"),
    json_path: Path = typer.Option(None, "--json", help="also write the summary as JSON here"),
    overwrite: bool = typer.Option(False, help="replace an existing output"),
) -> None:
    """Sample a posterior ensemble given observations and write an analysis file."""
    import shlex
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxguide import pipeline
    from jaxguide.io import check_writable_dir, write_json_atomic

    settings = pipeline.AssimilationSettings(
        method=method,
        members=members,
        steps=steps,
        seed=seed,
        sigma_y=_sigma_y(sigma_y),
        guidance_scale=guidance_scale,
        cg_iters=cg_iters,
        label=label,
        interpolation=interpolation,
        window_hours=window_hours,
        drop_bad=drop_bad,
        prior_members=prior_members,
        bf16=bf16,
        remat=remat,
        chunk_size=chunk_size,
    )
    settings.check()
    grid = _latlon_grid(regrid)
    if json_path is not None:
        check_writable_dir(Path(json_path).parent)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{stage} (sampler steps)", total=total)
            bar.update(tasks[stage], completed=done)

        summary = pipeline.assimilate(
            model,
            obs,
            out,
            time=time,
            settings=settings,
            sst=sst,
            regrid=grid,
            overwrite=overwrite,
            command=" ".join(shlex.quote(a) for a in ["jaxguide", *sys.argv[1:]]),
            progress=progress,
        )
    _print_assimilation_summary(summary)
    typer.echo(f"wrote {out}")
    if json_path is not None:
        write_json_atomic(json_path, summary)
        typer.echo(f"wrote {json_path}")


@app.command()
@handle_errors
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="output directory (created; its demo files are replaced)"),
    seed: int = typer.Option(0, help="random seed (truth, observations, ensembles)"),
    members: int = typer.Option(None, help="ensemble size (default 64)"),
    steps: int = typer.Option(None, help="sampler (Heun) steps (default 24)"),
) -> None:
    """End-to-end demo on an exact Gaussian prior (no download): truth, observations,
    MMPS and regression-guidance ensembles, verification, NetCDF files and plots."""
    import dataclasses
    import sys
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxguide.demo import DemoConfig, prepare_out_dir, run_demo

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
    _print_demo_summary(summary, time.perf_counter() - t0)


def _print_demo_summary(summary: dict[str, Any], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from jaxguide.demo import summary_rows

    cfg, ex = summary["config"], summary["exact_posterior"]
    table = Table(title=(f"jaxguide demo: {summary['n_obs']['assimilated']} assimilated / "
                         f"{summary['n_obs']['held_out']} held-out observations, {cfg['members']} members, "
                         f"{cfg['steps']} steps"))
    table.add_column("method", no_wrap=True)
    table.add_column("set", no_wrap=True)
    for col in ("RMSE held out (K)", "RMSE assim. (K)", "CRPS held out (K)", "spread / skill held out",
                "mean err. vs exact (prior std)", "spread ratio vs exact"):
        table.add_column(col, justify="right")
    for r in summary_rows(summary):
        table.add_row(r["method"], r["set"], *(f"{r[k]:.3f}" for k in (
            "rmse_held_out", "rmse_assimilated", "crps_held_out", "spread_skill_held_out", "mean_error_vs_exact",
            "spread_ratio_vs_exact")))
    con = Console()
    con.print(table)
    mc = summary["methods"]["mmps"]["exact_posterior"]["all"]["mc_floor_prior_std"]
    con.print(f"exact posterior mean: RMSE held-out {ex['held_out_rmse_of_mean']:.3f} K, assimilated "
              f"{ex['assimilated_rmse_of_mean']:.3f} K; Monte-Carlo floor of the mean error {mc:.3f} prior std")
    con.print(f"spread-skill includes the observation error; MMPS cg_iters={cfg['cg_iters']}; regression scale "
              f"{summary['methods']['regression']['options']['scale']:.4g} "
              f"({summary['methods']['regression']['options']['scale_rule']})")
    files = summary["files"]
    out_dir = Path(files["summary"]).parent
    con.print(f"wrote {', '.join(Path(v).name for k, v in files.items() if k != 'plots')} "
              f"and {len(files['plots'])} plots to {out_dir} in {seconds:.1f} s")


# --------------------------------------------------------------------------------------
# evaluate


def _print_table(result) -> None:
    """Two tables (they fit 80 columns): ensemble mean and spread, then the proper scores."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    def fmt(v):
        return "-" if v is None else f"{v:.4g}"

    def table(title: str, cols: tuple[str, ...], row) -> Table:
        t = Table(title=title, box=box.SIMPLE_HEAD)
        for col in ("set", "variable", *cols):
            t.add_column(col, justify="left" if col in ("set", "variable") else "right", no_wrap=True)
        for set_name, per_var in result.metrics.items():
            for var, s in per_var.items():
                t.add_row(set_name, var, *(fmt(v) if not isinstance(v, str) else v for v in row(s)))
        return t

    console = Console()
    console.print(table(
        f"analysis verification (observation operator: {result.operator})",
        ("n", "RMSE", "bias", "spread", "spread/skill"),
        lambda s: (str(s["n_obs"]), s["rmse"], s["bias"], s.get("spread"), s.get("spread_skill_obs", s.get("spread_skill"))),
    ))
    console.print(table(
        "proper scores (lower is better)",
        ("CRPS", "energy score", "variogram score"),
        lambda s: (s["crps"], s["energy_score"], s.get("variogram_score")),
    ))
    if any(s.get("obs_noise_in_scores") for per in result.metrics.values() for s in per.values()):
        console.print("At observations, CRPS, energy and variogram scores and rank histograms score the members plus "
                      "N(0, sigma^2) noise, and spread/skill = sqrt((M+1)/M spread^2 + sigma^2) / RMSE. The energy "
                      "and variogram (p = 0.5) scores treat a set's observations of a variable as one vector.")


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
) -> None:
    """RMSE / CRPS / energy and variogram scores / spread / spread-skill of an analysis at
    assimilated and held-out observations (read with the analysis' own observation
    operator) and against a truth field."""
    from jaxguide import evaluation
    from jaxguide.io import check_writable_dir, read_analysis, write_json_atomic

    # check the outputs before the work
    if json_path is not None:
        check_writable_dir(Path(json_path).parent)
    if plots_dir is not None:
        evaluation.prepare_plots_dir(plots_dir)

    ds = read_analysis(analysis)
    sets = {"assimilated": obs} if held_out is None else {"assimilated": obs, "held_out": held_out}
    result = evaluation.evaluate(ds, sets, truth=truth, seed=seed)
    for name, info in result.skipped.items():
        typer.echo(f"note: {name}: left out {info['n_obs']} observations of variables not in the analysis: "
                   f"{info['variables']}", err=True)
    _print_table(result)
    if json_path is not None:
        write_json_atomic(json_path, result.to_json(analysis))
        typer.echo(f"wrote {json_path}")
    if plots_dir is not None:
        evaluation.write_plots(result, ds, plots_dir)
        typer.echo(f"wrote plots to {plots_dir}")


def main() -> None:
    """Console entry point (``jaxguide``)."""
    app()


if __name__ == "__main__":
    main()
