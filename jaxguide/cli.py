"""Command line: ``jaxguide convert | assimilate | evaluate | demo``.

Each command is a thin layer over the library (``convert.convert_checkpoints``,
``jaxguide.pipeline.assimilate``, ``jaxguide.metrics``, ``jaxguide.demo``): parse
options, show progress, print a table.

Expected failures (missing or malformed files, unwritable outputs) end with one line
``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
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
    from jaxguide.io import LatLonGrid

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
    cg_iters: int = typer.Option(None, "--cg-iters", help="MMPS solver iterations (default 3)"),
    solver: str = typer.Option(None, "--solver", help="MMPS solver: cg | gmres (default cg)"),
    gamma: float = typer.Option(None, "--gamma", help="SDA: V_t = gamma sigma^2 (default 0.01)"),
    norm_matching: bool = typer.Option(False, "--norm-matching", help="regression: scale the step to the score's norm"),
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
        solver=solver,
        gamma=gamma,
        norm_matching=norm_matching,
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


def read_observations(path: Path):
    """Observation table (CSV, Parquet or NetCDF; columns ``jaxguide.observations.COLUMNS``, physical
    units) for verification: every row must be usable; variables the analysis lacks are
    left out later, with a note."""
    from jaxguide.observations import read_observations as read

    table = read(path)
    if len(table) == 0:
        raise ValueError(f"observation file {str(path)!r} has no observations")
    bad = {
        "time": int(table["time"].isna().sum()),
        "lat": int((~(np.abs(table["lat"]) <= 90)).sum()),
        "lon": int((~np.isfinite(table["lon"])).sum()),
        "value": int((~np.isfinite(table["value"])).sum()),
        "sigma": int((~(table["sigma"] > 0)).sum()),
    }
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise ValueError(f"observation file {str(path)!r} has unusable rows (column: count) {bad}")
    return table


def _time_index(ds_times: np.ndarray, obs_times) -> np.ndarray:
    if ds_times.size == 1:
        return np.zeros(len(obs_times), dtype=np.int64)
    t = np.asarray(obs_times, dtype="datetime64[ns]").astype(np.int64)
    d = np.asarray(ds_times, dtype="datetime64[ns]").astype(np.int64)
    return np.argmin(np.abs(t[:, None] - d[None, :]), axis=1)


def ensemble_at_observations(ds, table) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, Any]]:
    """Per variable: (ensemble (M, n), obs (n,), sigma (n,), rows) at the nearest NEST pixel.

    Observations of variables not in the analysis are left out (listed under ``""``)."""
    from jaxguide import healpix
    from jaxguide.io import channel_variables, nearest_pixels

    if "pixel" not in ds.dims:
        raise ValueError("evaluate needs an analysis on the HEALPix grid (dimension 'pixel')")
    nside = healpix.nside_of_npix(ds.sizes["pixel"])
    channels = set(channel_variables(ds))
    pix = nearest_pixels(nside, table["lon"].to_numpy(), table["lat"].to_numpy(), "nest")
    tidx = _time_index(ds["time"].values, table["time"])
    out = {}
    for var, rows in table.groupby("variable", sort=True):
        if var not in channels:
            continue
        sel = rows.index.to_numpy()
        field = ds[var].transpose("member", "time", "pixel").values
        pos = table.index.get_indexer(sel)
        out[var] = (field[:, tidx[pos], pix[pos]], rows["value"].to_numpy(np.float64), rows["sigma"].to_numpy(np.float64), rows)
    return out


def _truth_metrics(ds, truth_path: Path) -> dict[str, dict]:
    import xarray as xr

    from jaxguide import metrics
    from jaxguide.io import channel_variables

    if not Path(truth_path).exists():
        raise FileNotFoundError(f"no such truth file: {str(truth_path)!r}")
    with xr.open_dataset(truth_path) as t:
        truth = t.load()
    out = {}
    for var in channel_variables(ds):
        if var not in truth:
            continue
        tv = truth[var]
        if "member" in tv.dims:
            tv = tv.isel(member=0)
        tv = tv.transpose("time", "pixel").values
        ev = ds[var].transpose("member", "time", "pixel").values
        if tv.shape != ev.shape[1:]:
            raise ValueError(f"truth {var} has shape {tv.shape}, analysis {ev.shape[1:]}")
        out[var] = metrics.summarize(ev.reshape(ev.shape[0], -1), tv.reshape(-1))
    if not out:
        raise ValueError(f"truth file {str(truth_path)!r} shares no variable with the analysis")
    return out


def _print_table(results: dict[str, dict[str, dict]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="analysis verification")
    for col in ("set", "variable", "n", "RMSE", "bias", "CRPS", "spread", "spread/skill"):
        table.add_column(col, justify="right" if col not in ("set", "variable") else "left")

    def fmt(v):
        return "-" if v is None else f"{v:.4g}"

    for set_name, per_var in results.items():
        for var, s in per_var.items():
            table.add_row(set_name, var, str(s["n_obs"]), fmt(s["rmse"]), fmt(s["bias"]), fmt(s["crps"]), fmt(s.get("spread")), fmt(s.get("spread_skill")))
    Console().print(table)


@app.command()
@handle_errors
def evaluate(
    analysis: Path = typer.Argument(..., help="analysis file written by jaxguide (.nc or .zarr)"),
    obs: Path = typer.Option(..., "--obs", help="assimilated observations (CSV: time, lat, lon, variable, value, sigma)"),
    held_out: Path = typer.Option(None, "--held-out", help="held-out observations, same format"),
    truth: Path = typer.Option(None, "--truth", help="truth fields (NetCDF, same variables, NEST pixels)"),
    json_path: Path = typer.Option(None, "--json", help="write the metrics as JSON here"),
    plots_dir: Path = typer.Option(None, "--plots", help="write PNG maps and rank histograms into this directory"),
    seed: int = typer.Option(0, help="seed of the rank histograms' tie-breaking"),
) -> None:
    """RMSE / CRPS / spread / spread-skill of an analysis at assimilated and held-out observations."""
    from jaxguide import metrics
    from jaxguide.io import PRIOR_SUFFIX, check_writable_dir, read_analysis, write_json_atomic

    # check the outputs before the work
    if json_path is not None:
        check_writable_dir(Path(json_path).parent)
    if plots_dir is not None:
        if not plots_dir.is_dir():
            if not plots_dir.parent.is_dir():
                raise FileNotFoundError(f"output directory {str(plots_dir.parent)!r} does not exist")
            check_writable_dir(plots_dir.parent)
            plots_dir.mkdir()
        check_writable_dir(plots_dir)

    ds = read_analysis(analysis)
    sets = {"assimilated": read_observations(obs)}
    if held_out is not None:
        sets["held_out"] = read_observations(held_out)

    results: dict[str, dict[str, dict]] = {}
    samples = {}
    for name, table in sets.items():
        per_var = ensemble_at_observations(ds, table)
        if not per_var:
            raise ValueError(f"none of the {name} observation variables {sorted(set(table['variable']))} is in the analysis")
        samples[name] = per_var
        skipped = sorted(set(table["variable"]) - set(per_var))
        if skipped:
            n_skip = int(table["variable"].isin(skipped).sum())
            typer.echo(f"note: {name}: left out {n_skip} observations of variables not in the analysis: {skipped}", err=True)
        results[name] = {
            var: metrics.summarize(ens, y, obs_sigma=sig, seed=seed) for var, (ens, y, sig, _) in per_var.items()
        }
    if truth is not None:
        results["truth"] = _truth_metrics(ds, truth)

    _print_table(results)
    if json_path is not None:
        write_json_atomic(json_path, {"analysis": str(analysis), "metrics": results})
        typer.echo(f"wrote {json_path}")
    if plots_dir is not None:
        from jaxguide import plots

        for var in sorted({v for per in samples.values() for v in per}):
            assim = samples["assimilated"].get(var)
            prior_name = var + PRIOR_SUFFIX
            prior = ds[prior_name].isel(time=0).values if prior_name in ds else None
            lon = assim[3]["lon"].to_numpy() if assim else None
            lat = assim[3]["lat"].to_numpy() if assim else None
            plots.plot_maps(
                plots_dir / f"{var}_maps.png",
                ds[var].isel(time=0).transpose("member", "pixel").values,
                order="nest",
                prior=prior,
                obs_lon=lon,
                obs_lat=lat,
                name=var,
                units=str(ds[var].attrs.get("units", "")),
            )
        for set_name, per_var in results.items():
            for var, s in per_var.items():
                plots.plot_rank_histogram(plots_dir / f"{var}_{set_name}_rank.png", s["rank_histogram"], title=f"{var} ({set_name})")
        typer.echo(f"wrote plots to {plots_dir}")


def main() -> None:
    """Console entry point (``jaxguide``)."""
    app()


if __name__ == "__main__":
    main()
