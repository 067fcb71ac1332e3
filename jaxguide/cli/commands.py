"""Command line: ``jaxguide convert | assimilate | campaign | era5-obs | evaluate | demo``.

Each command is a thin layer over the library (``jaxguide.model.convert.convert_checkpoints``,
``jaxguide.assimilation.pipeline.assimilate``, ``jaxguide.campaign.run`` (via :mod:`jaxguide.cli.campaign`), ``jaxguide.observations.era5``, ``jaxguide.verification.evaluation``,
``jaxguide.demo.experiment``): parse options, show progress, print a table.

Expected failures (missing or malformed files, unwritable outputs) and command-line
usage errors (a value that does not parse, a missing or unknown option) end with one
line ``error: ...`` on stderr and exit status 2, never a traceback or usage panel; an
error about a file names the option that gave it. Inputs are checked before any
output is created.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import typer
from typer._click import exceptions as click_errors  # typer==0.29 vendors click; its usage errors
from typer.core import TyperGroup


def _usage_error_line(e: click_errors.UsageError) -> str:
    """One line for a command-line parsing error: the option, what was wrong, the expected form."""
    param = getattr(e, "param", None)
    if isinstance(e, click_errors.BadParameter) and param is not None:
        if param.param_type_name == "argument":
            opt = str(getattr(param, "display_name_raw", None) or param.name or "argument").upper()
        else:
            opt = "/".join(getattr(param, "opts", None) or [param.name or "?"])
        try:
            form = f"{opt} {param.display_type(e.ctx)}" if not getattr(param, "is_flag", False) else opt
        except Exception:  # the form is a courtesy: never let it hide the error
            form = opt
        help_text = " ".join(str(getattr(param, "help", "") or "").split())
        expected = f"{form}: {help_text}" if help_text else form
        if isinstance(e, click_errors.MissingParameter):
            return f"missing {param.param_type_name} {opt} (expected {expected})"
        return f"invalid value for {opt}: {' '.join(str(e.message).split())} (expected {expected})"
    return " ".join(e.format_message().split())


class _OneLineErrors(TyperGroup):
    """Typer's group with click's usage errors (a value that does not parse, a missing
    or unknown option) as ONE ``error: ...`` line on stderr and exit status 2, like
    every other expected failure of the CLI (typer would print a boxed usage panel)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        import sys

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # bare ``jaxguide``: the help, as before
            typer.echo(e.format_message(), err=True)
            sys.exit(2)
        except click_errors.UsageError as e:
            prefix = f"{e.ctx.command_path}: " if e.ctx is not None and e.ctx.command_path else ""
            typer.echo(f"error: {prefix}{_usage_error_line(e)}", err=True)
            sys.exit(2)
        except click_errors.ClickException as e:
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors, add_completion=False, no_args_is_help=True, help="Score-based data assimilation with cBottle in JAX."
)

EXPECTED_ERRORS = (FileNotFoundError, ValueError, KeyError, OSError, FloatingPointError)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError):
        key = e.args[0] if e.args else None
        if isinstance(key, str) and " " in key.strip():  # a sentence raised as KeyError: say it as it is
            return " ".join(key.split())
        return f"missing key {key!r}" if e.args else "missing key"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.strerror}: {e.filename}"
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _file_options(fn, kwargs: dict[str, Any]) -> dict[str, str]:
    """``{path given: option that gave it}`` for the command's path-valued parameters."""
    import inspect

    out: dict[str, str] = {}
    params = inspect.signature(fn).parameters
    for name, value in kwargs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        info = params[name].default if name in params else None
        decls = [d for d in getattr(info, "param_decls", None) or () if d.startswith("--")]
        if isinstance(info, typer.models.ArgumentInfo):
            opt = name.upper()
        else:
            opt = decls[0] if decls else "--" + name.replace("_", "-")
        for v in values:
            if isinstance(v, Path) and str(v):
                out[str(v)] = opt
    return out


def _name_option(text: str, e: BaseException, files: dict[str, str]) -> str:
    """Prefix ``--opt: `` when the message is about a file given by an option it does not name."""
    import re

    named = str(getattr(e, "filename", "") or "")
    for path in sorted(files, key=len, reverse=True):
        if path in text or path == named:
            opt = files[path]
            said = text.startswith(f"{opt}:") or re.search(re.escape(opt) + r"[: ]+'?" + re.escape(path), text)
            return text if said else f"{opt}: {text}"
    return text


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def is_input_error(e: BaseException) -> bool:
    """An error about the user's input (files, options, data), not a bug.

    File errors (OSError) always are. ValueError / KeyError / FloatingPointError are when
    jaxguide raised them: its own error classes (``ObservationError``, ``ERA5FormatError``,
    ``GuidanceInputError``, ...) or a ``raise`` in jaxguide's code naming the problem. The
    same classes raised inside JAX, NumPy or another library (a shape error in a traced
    program, say) are programming errors: they keep their traceback."""
    if isinstance(e, OSError):
        return True
    if not isinstance(e, EXPECTED_ERRORS):
        return False
    if type(e).__module__.split(".")[0] == "jaxguide":
        return True
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and str(Path(last).resolve()).startswith(_PACKAGE_DIR)


def _debug_requested() -> bool:
    import os

    from typer._click.globals import get_current_context  # typer==0.29 vendors click

    ctx = get_current_context(silent=True)
    flag = bool(ctx is not None and ctx.find_root().meta.get("jaxguide.debug"))
    return flag or os.environ.get("JAXGUIDE_DEBUG", "") not in ("", "0")


def handle_errors(fn):
    """Turn input errors (:func:`is_input_error`) into one ``error: ...`` line and exit
    status 2; an error about a file given on the command line also names the option that
    gave it. Anything else, and everything under ``jaxguide --debug``, keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            if _debug_requested() or not is_input_error(e):
                raise
            _fail(_name_option(_message(e), e, _file_options(fn, kwargs)))

    return wrapper


# --------------------------------------------------------------------------------------
# persistent compilation cache


def compile_cache_dir() -> Path:
    """``$JAXGUIDE_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxguide/xla`` (``~/.cache/jaxguide/xla``)."""
    import os

    if os.environ.get("JAXGUIDE_CACHE_DIR"):
        return Path(os.environ["JAXGUIDE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxguide" / "xla"


def enable_compile_cache(enabled: bool = True) -> Path | None:
    """Turn on JAX's persistent compilation cache (every program that took > 0.5 s to
    compile), so a second run of the same configuration skips XLA. Returns the directory,
    or None when off (``enabled=False`` or ``JAXGUIDE_NO_CACHE=1``, as the tests set)."""
    import os

    import jax

    if not enabled or os.environ.get("JAXGUIDE_NO_CACHE", "") not in ("", "0"):
        return None
    path = compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        typer.echo(f"note: compilation cache off, cannot create {path}: {e.strerror}", err=True)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


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
        from jaxguide.model.convert import convert_checkpoints
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
    if ":" in text and "=" not in text:
        fixed = text.replace(":", "=")
        raise ValueError(f"--sigma-y: cannot read {text!r}; per variable it is VAR=VALUE, e.g. {fixed!r} "
                         "(or one number for every observation, e.g. 1.0)")
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
            raise ValueError(f"--sigma-y: cannot read {part!r}; expected VAR=VALUE, e.g. 'T850=1.0,T500=0.8'") from None
    return out


def _latlon_grid(text: str | None):
    from jaxguide.grid.latlon import LatLonGrid

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
    if summary.get("frames"):
        frames = [str(t)[:16].replace(" ", "T") for t in summary["frames"]]
        shown = ", ".join(frames) if len(frames) <= 8 else f"{', '.join(frames[:3])}, ..., {', '.join(frames[-2:])}"
        console.print(f"trajectory: {len(frames)} frames in {summary.get('windows', 1)} window(s): {shown}")
    if summary["dropped"]:
        console.print(f"dropped observation rows: {summary['dropped']}")
    sampling = summary["seconds_analysis"] + summary["seconds_prior"]
    compile_s = summary.get("seconds_compile", 0.0)
    console.print(
        f"time: total {summary['seconds_total']:.1f} s = compile {compile_s:.1f} s (analysis and prior at once) "
        f"+ sampling {sampling:.1f} s + loading/writing {summary['seconds_total'] - sampling - compile_s:.1f} s"
    )


@app.command()
@handle_errors
def assimilate(
    model: Path = typer.Option(..., "--model", help="converted model directory (jaxguide convert)"),
    obs: Path = typer.Option(..., "--obs", help="observation table: CSV/Parquet/NetCDF with time, lat, lon, variable, value, sigma (physical units)"),
    time: str = typer.Option(None, "--time", help="analysis time, ISO 8601 only: 2020-01-20T00:00 (UTC), 2020-01-20T00:00Z or with an offset, 2020-01-20T02:00+02:00; for a video model the time of the first frame"),
    end: str = typer.Option(None, "--end", help="video models: time of the last frame of the run, ISO 8601, a whole number of the model's time steps after --time (default: one window); a longer run chains windows"),
    condition: Path = typer.Option(None, "--condition", help="video models: NetCDF of known frames (jaxguide analysis layout: HEALPix NEST 'pixel', physical units, the model's variables, optional 'member'); its times on the first window's frames are held fixed"),
    conditioning_frames: int = typer.Option(None, "--conditioning-frames", help="video models: frames each chained window takes from the end of the previous one (default 1)"),
    time_matching: str = typer.Option(None, "--time-matching", help="video models: linear (an observation between frames is interpolated linearly in time; default) | exact (such a row is an error, or dropped with --drop-bad)"),
    out: Path = typer.Option(..., "--out", help="analysis file (.nc NetCDF4, or .zarr); a .zarr campaign store with --times"),
    times: list[str] = typer.Option(None, "--times", help="instead of --time, a campaign: START/END/STEP, ISO 8601 (e.g. 2020-01-01T00/2020-01-05T00/PT6H, END inclusive) into one .zarr store, as `jaxguide campaign` (which also runs over several processes)"),
    times_file: Path = typer.Option(None, "--times-file", help="instead of --time, a campaign over the times in this file (one ISO 8601 time per line)"),
    resume: bool = typer.Option(False, "--resume", help="with --times: continue the store (the times not yet complete; same settings required)"),
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
    allow_implausible: bool = typer.Option(False, "--allow-implausible", help="assimilate values more than 8 "
                                           "climatological standard deviations from the model's mean (normally an "
                                           "error: a unit mistake such as degrees Celsius for K or hPa for Pa)"),
    bf16: bool = typer.Option(False, "--bf16", help="evaluate the network in bfloat16 (guidance stays float32)"),
    remat: bool = typer.Option(False, "--remat", help="recompute each U-Net block in the guidance VJPs instead of storing its activations (less memory, ~1 more network pass per VJP)"),
    chunk_size: int = typer.Option(None, "--chunk-size", help="run members this many at a time (less memory)"),
    regrid: str = typer.Option(None, "--regrid", help="write on a regular NLATxNLON lat/lon grid instead of HEALPix"),
    json_path: Path = typer.Option(None, "--json", help="also write the summary as JSON here"),
    overwrite: bool = typer.Option(False, help="replace an existing output"),
    no_cache: bool = typer.Option(False, "--no-cache", help="do not use the persistent compilation cache "
                                  "(then the bar counts denoiser calls as they run)"),
) -> None:
    """Sample a posterior ensemble given observations and write an analysis file."""
    import shlex
    import sys
    import time as time_module

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxguide.assimilation import pipeline
    from jaxguide.assimilation.settings import AssimilationSettings
    from jaxguide.io.files import check_writable_dir, write_json_atomic

    from jaxguide.observations.table import parse_time

    video = {"--end": end, "--condition": condition, "--conditioning-frames": conditioning_frames,
             "--time-matching": time_matching}
    video = [opt for opt, v in video.items() if v is not None]
    if times or times_file is not None:
        if time is not None:
            raise ValueError("give either --time (one analysis) or --times/--times-file (a campaign), not both")
        if video:
            raise ValueError(f"{', '.join(video)} apply to one video run (--time), not to a campaign (--times)")
        # a campaign: the same run as `jaxguide campaign` (one process unless Slurm/mpirun says otherwise)
        return cli_campaign.campaign(
            model=model, obs=obs, out=out, times=times, times_file=times_file, resume=resume, overwrite=overwrite,
            sst=sst, method=method, members=members, steps=steps, seed=seed, sigma_y=sigma_y,
            guidance_scale=guidance_scale, cg_iters=cg_iters, solver=solver, gamma=gamma,
            norm_matching=norm_matching, prior_members=prior_members, window_hours=window_hours, drop_bad=drop_bad,
            label=label, interpolation=interpolation, allow_implausible=allow_implausible, bf16=bf16, remat=remat,
            chunk_size=chunk_size, regrid=regrid, distributed="auto", coordinator=None, num_processes=None,
            process_id=None, json_path=json_path, no_cache=no_cache)
    if time is None:
        raise ValueError("missing --time (one analysis time, ISO 8601) or --times START/END/STEP (a campaign)")
    if resume:
        raise ValueError("--resume continues a campaign: it goes with --times or --times-file")
    time = parse_time(time, "--time")
    end_time = None if end is None else parse_time(end, "--end")
    if condition is not None and not condition.is_file():
        raise FileNotFoundError(f"no such conditioning file: {str(condition)!r}")
    if time_matching is not None and time_matching not in ("linear", "exact"):
        raise ValueError(f"--time-matching must be linear or exact, got {time_matching!r}")
    # only the options given: their defaults live in AssimilationSettings
    video_settings = {k: v for k, v in (("conditioning_frames", conditioning_frames),
                                        ("time_matching", time_matching)) if v is not None}
    settings = AssimilationSettings(
        check_plausibility=not allow_implausible,
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
        **video_settings,
    )
    settings.check()
    grid = _latlon_grid(regrid)
    if json_path is not None:
        check_writable_dir(Path(json_path).parent)
    cache_dir = enable_compile_cache(not no_cache)
    console = Console(stderr=True)
    t0 = time_module.perf_counter()
    console.print(f"[0.0 s] reading {model}, {obs} ...")
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
            model,
            obs,
            out,
            time=time,
            end=end_time,
            condition=condition,
            settings=settings,
            sst=sst,
            regrid=grid,
            overwrite=overwrite,
            command=" ".join(shlex.quote(a) for a in ["jaxguide", *sys.argv[1:]]),
            # per-call progress needs a host callback, which keeps the program out of the cache
            progress=progress if cache_dir is None else None,
            on_event=on_event,
        )
    _print_assimilation_summary(summary)
    typer.echo(f"wrote {out}")
    if json_path is not None:
        write_json_atomic(json_path, summary)
        typer.echo(f"wrote {json_path}")


@app.command("synthetic-sst")
@handle_errors
def synthetic_sst(
    out: Path = typer.Argument(..., help="NetCDF file to write (e.g. tosbcs_synthetic.nc)"),
    start: str = typer.Option(..., "--start", help="first analysis time to cover, ISO 8601 (e.g. 2020-01-01)"),
    end: str = typer.Option(..., "--end", help="last analysis time to cover, ISO 8601 (e.g. 2020-12-31)"),
    resolution: float = typer.Option(1.0, "--resolution", help="grid spacing in degrees"),
    overwrite: bool = typer.Option(False, help="replace an existing file"),
) -> None:
    """Write a SYNTHETIC monthly SST file in the AMIP tosbcs layout (a smooth zonal
    climatology, marked synthetic in its metadata) to try SST-conditioned models
    without downloading the input4MIPs file. Not for real analyses."""
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
    """End-to-end demo on an exact Gaussian prior (no download): truth, observations,
    MMPS and regression-guidance ensembles, verification, NetCDF files and plots.
    With --window: a space-time prior on a window of frames, per-frame analysis skill."""
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
    (_print_window_summary if window else _print_demo_summary)(summary, time.perf_counter() - t0)


def _print_window_summary(summary: dict[str, Any], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg, w = summary["config"], summary["window"]
    table = Table(title=(f"jaxguide demo --window: {summary['n_obs']} observations in frames 0-"
                         f"{cfg['observed_frames'] - 1} of {w['frames']} ({w['time_step_hours']:g} h apart), "
                         f"{cfg['members']} members, {cfg['steps']} steps; RMS over channels and pixels, K"))
    table.add_column("frame", no_wrap=True)
    table.add_column("hour", justify="right")
    table.add_column("obs", justify="right")
    cols = {"rmse_mmps": "MMPS RMSE", "spread_mmps": "MMPS spread", "rmse_exact": "exact RMSE",
            "std_exact": "exact std", "rmse_prior": "prior RMSE", "mean_error_vs_exact": "err. vs exact",
            "spread_ratio_vs_exact": "spread ratio"}
    for c in cols.values():
        table.add_column(c, justify="right")
    for r in summary["frames"]:
        table.add_row(str(r["frame"]), f"{r['hours']:g}", "yes" if r["observed"] else "no",
                      *(f"{r[k]:.2f}" for k in cols))
    table.caption = ("err. vs exact: RMS of (MMPS mean - exact posterior mean) / prior std; spread ratio: MMPS "
                     "std / exact posterior std")
    con = Console()
    con.print(table)
    ex = summary["exact_posterior"]["mmps"]
    con.print(f"MMPS vs the exact posterior over the window: mean error {ex['mean_error_prior_std']:.3f} prior std "
              f"(Monte-Carlo floor {ex['mc_floor_prior_std']:.3f}), spread ratio {ex['spread_ratio']:.3f}; "
              f"time correlation exp(-lag / {cfg['correlation_hours']:g} h)")
    files = summary["files"]
    con.print(f"wrote {', '.join(Path(v).name for v in files.values())} to {Path(files['summary']).parent} "
              f"in {seconds:.1f} s")


def _print_demo_summary(summary: dict[str, Any], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from jaxguide.demo.experiment import summary_rows

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
# era5-obs


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
    if result.time_rule != "single":
        how = ("linearly between the two frames around each observation" if result.time_rule == "linear"
               else "at the frame nearest each observation")
        console.print(f"time interpolation: {result.time_rule} (the trajectory is read {how}, as assimilate did); "
                      "per frame: the observations nearest each frame")
    for set_name, frames in result.per_frame.items():
        t = Table(title=f"{set_name} per frame (each observation at its nearest frame)", box=box.SIMPLE_HEAD)
        for col in ("frame (UTC)", "variable", "n", "RMSE", "spread", "CRPS"):
            t.add_column(col, justify="left" if col in ("frame (UTC)", "variable") else "right", no_wrap=True)
        for frame, per_var in frames.items():
            for var, s in per_var.items():
                t.add_row(frame[:16], var, str(s["n_obs"]), fmt(s["rmse"]), fmt(s.get("spread")), fmt(s["crps"]))
        console.print(t)
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
    operator) and against a truth field. A trajectory (several frame times, a video
    model's run) is read in time as assimilate did (linear between frames, or the
    nearest frame) and also scored per frame; with linear interpolation, observations
    outside its first..last frame are left out (a note says how many)."""
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
    result = evaluation.evaluate(ds, sets, truth=truth, seed=seed)
    for name, info in result.skipped.items():
        if "variables" in info:
            typer.echo(f"note: {name}: left out {info['n_obs']} observations of variables not in the analysis: "
                       f"{info['variables']}", err=True)
        if "outside_time" in info:
            out_t = info["outside_time"]
            typer.echo(f"note: {name}: left out {out_t['n_obs']} observations outside the analysis times "
                       f"{out_t['first']} to {out_t['last']} (the trajectory is interpolated in time only between "
                       "its frames)", err=True)
    _print_table(result)
    if json_path is not None:
        write_json_atomic(json_path, result.to_json(analysis))
        typer.echo(f"wrote {json_path}")
    if plots_dir is not None:
        evaluation.write_plots(result, ds, plots_dir)
        typer.echo(f"wrote plots to {plots_dir}")




@app.callback()
def _options(ctx: typer.Context,
             debug: bool = typer.Option(False, "--debug", help="show the full traceback of any error (also JAXGUIDE_DEBUG=1)")) -> None:
    """Score-based data assimilation with cBottle in JAX."""
    ctx.meta["jaxguide.debug"] = debug


from jaxguide.cli import campaign as cli_campaign  # noqa: E402

cli_campaign.register(app)  # jaxguide campaign


def main() -> None:
    """Console entry point (``jaxguide``)."""
    app()


if __name__ == "__main__":
    main()
