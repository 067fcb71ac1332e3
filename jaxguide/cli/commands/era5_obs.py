"""``jaxguide era5-obs``: point observations of ERA5 temperature as an observation table."""

from __future__ import annotations

from pathlib import Path

import typer

from jaxguide.cli.app import app, handle_errors


@app.command("era5-obs")
@handle_errors
def era5_obs(
    era5: list[Path] = typer.Argument(..., help="ERA5 temperature on pressure levels: NetCDF (CDS or cfgrib), GRIB (needs the 'grib' extra) or a CDS zip; several files are combined"),
    out: Path = typer.Option(..., "--out", help="observation table to write (.csv, .parquet or .nc)"),
    count: int = typer.Option(None, "--count", help="number of locations drawn with --strategy (or give --points)"),
    points: Path = typer.Option(None, "--points", help="CSV of locations with columns lat, lon (degrees), instead of --count"),
    strategy: str = typer.Option("random", help="random | uniform (jaxguide.observations.strategies)"),
    levels: str = typer.Option("850,500,300", help="pressure levels in hPa, comma separated (variables T850, ...)"),
    times: list[str] = typer.Option(None, "--time", help="valid time, ISO 8601 UTC; repeat for several (default: every time in the file)"),
    member: int = typer.Option(None, "--member", help="ensemble member: a value of the file's 'number' dimension (required for ensemble files)"),
    sigma: float = typer.Option(1.0, "--sigma", help="observation error std in K (the sigma column)"),
    noise: bool = typer.Option(False, "--noise", help="add Gaussian noise of std --sigma to the values"),
    seed: int = typer.Option(0, help="random seed (locations and noise)"),
    overwrite: bool = typer.Option(False, help="replace an existing output"),
) -> None:
    """Point observations of ERA5 temperature (T850, T500, ...) as an observation table."""
    import numpy as np
    import pandas as pd

    from jaxguide.observations.era5 import era5_to_observations, read_era5_temperature
    from jaxguide.io.files import check_writable_dir
    from jaxguide.observations.table import table_format, write_observations

    # every input is checked before the ERA5 file is read or anything is written
    table_format(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} exists (pass --overwrite to replace it)")
    check_writable_dir(out.parent)
    if (count is None) == (points is None):
        raise ValueError("give exactly one of --count N (with --strategy) or --points CSV")
    if count is not None and count < 1:
        raise ValueError(f"--count must be a positive integer, got {count}")
    if count is not None and strategy not in ("random", "uniform"):
        raise ValueError(f"--strategy must be random or uniform, got {strategy!r}")
    if not sigma > 0:
        raise ValueError(f"--sigma must be > 0 (K), got {sigma}")
    try:
        level_list = [int(v) for v in levels.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--levels must be comma-separated integers in hPa (e.g. 850,500,300), got {levels!r}") from None
    if not level_list:
        raise ValueError("--levels is empty (expected e.g. 850,500,300)")
    for t in times or ():
        try:
            pd.Timestamp(t)
        except ValueError:
            raise ValueError(f"--time {t!r} is not an ISO 8601 time (expected e.g. 2020-01-20T00:00)") from None
    where = {}
    if points is not None:
        if not points.is_file():
            raise FileNotFoundError(f"no such points file: {str(points)!r}")
        try:
            pts = pd.read_csv(points)
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise ValueError(f"points file {str(points)!r} is not a readable CSV ({type(e).__name__})") from None
        if not {"lat", "lon"} <= set(pts.columns):
            raise ValueError(f"points file {str(points)!r} needs columns lat, lon (has {list(pts.columns)})")
        where["points"] = pts
    else:
        where.update(strategy=strategy, count=count)

    ds = read_era5_temperature(era5, member=member)
    try:
        table = era5_to_observations(ds, level_list, **where, rng=np.random.default_rng(seed), sigma=sigma,
                                     times=times or None, noise=noise)
    except ValueError as e:  # name the option behind the library's complaint
        opt = {"times": "--time", "levels": "--levels"}.get(str(e).split(" ", 1)[0])
        raise ValueError(f"{opt}: {e}" if opt else str(e)) from None
    write_observations(table, out)
    typer.echo(f"wrote {len(table)} observations to {out}")
