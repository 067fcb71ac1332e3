"""The options that ``assimilate`` and ``campaign`` share, each defined once, and their parsing.

:class:`RunOptions` holds them: each field carries its ``typer.Option`` (flag, default,
help, ``--help`` panel). A command takes them all with :func:`shared_options` and one
parameter ``run: RunOptions``; :meth:`RunOptions.assimilation_settings` turns them into
the library's :class:`~jaxguide.assimilation.settings.AssimilationSettings`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path

import typer

# the panels of ``jaxguide assimilate --help`` and ``jaxguide campaign --help``, in this order
INPUTS, VIDEO, METHOD, SAMPLER, OUTPUT, PERFORMANCE = "Inputs", "Video", "Method", "Sampler", "Output", "Performance"


def _option(default, *decls: str, panel: str, help: str):
    """A dataclass field carrying its command-line option (``metadata["option"]``)."""
    return dataclasses.field(metadata={"option": typer.Option(default, *decls, help=help, rich_help_panel=panel)})


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The values of the options shared by ``jaxguide assimilate`` and ``jaxguide campaign``."""

    model: Path = _option(..., "--model", panel=INPUTS, help="converted model directory (jaxguide convert)")
    obs: Path = _option(..., "--obs", panel=INPUTS, help=(
        "observation table: CSV/Parquet/NetCDF with time, lat, lon, variable, value, sigma (physical units); for a "
        "campaign also a directory of Parquet files partitioned by time, in jaxguide or earth2studio layout"))
    sst: Path | None = _option(None, "--sst", panel=INPUTS, help=(
        "AMIP SST file (input4MIPs tosbcs NetCDF); required by SST-conditioned models"))
    times: list[str] | None = _option(None, "--times", panel=INPUTS, help=(
        "a campaign: START/END/STEP, ISO 8601 (e.g. 2020-01-01T00/2020-01-05T00/PT6H, END inclusive) into one "
        ".zarr store; repeat or comma-separate for several ranges (assimilate: instead of --time, as `jaxguide "
        "campaign`, which also runs over several processes)"))
    times_file: Path | None = _option(None, "--times-file", panel=INPUTS, help=(
        "a campaign over the times in this file (one ISO 8601 time per line), instead of --time / --times"))
    allow_changed_inputs: bool = _option(False, "--allow-changed-inputs", panel=INPUTS, help=(
        "a campaign --resume: continue although the observation or SST file changed since the store was made "
        "(normally refused, naming the file; the times already done keep their results; the new contents are "
        "recorded, so the next --resume checks against them)"))
    method: str = _option("mmps", panel=METHOD, help="mmps | sda | dps | pigdm | regression | replacement")
    sigma_y: str | None = _option(None, "--sigma-y", panel=METHOD, help=(
        "observation error override, physical units: 1.0 or T850=1.0,T500=0.8 (default: the table's sigma; "
        "required for earth2studio frames)"))
    guidance_scale: float = _option(1.0, "--guidance-scale", panel=METHOD, help=(
        "multiplies the guidance step (regression: the step in normalised units^2, capped at sigma_y^2 per observation)"))
    cg_iters: int | None = _option(None, "--cg-iters", panel=METHOD, help="MMPS solver iterations (default 3)")
    solver: str | None = _option(None, "--solver", panel=METHOD, help="MMPS solver: cg | gmres (default cg)")
    gamma: float | None = _option(None, "--gamma", panel=METHOD, help="SDA: V_t = gamma sigma^2 (default 0.01)")
    norm_matching: bool = _option(False, "--norm-matching", panel=METHOD, help=(
        "regression: scale the step to the score's norm"))
    window_hours: float = _option(3.0, "--window-hours", panel=METHOD, help=(
        "assimilate observations within +- this many hours of each analysis time"))
    drop_bad: bool = _option(False, "--drop-bad", panel=METHOD, help=(
        "drop bad rows (outside the window, NaN, unknown variable, ...) instead of failing; counts are reported "
        "(a campaign time with none left is recorded as skipped)"))
    label: str = _option("era5", panel=METHOD, help="dataset label of the conditional model (era5 | icon)")
    interpolation: str = _option("bilinear", panel=METHOD, help="observation operator: bilinear | nearest (pixel)")
    allow_implausible: bool = _option(False, "--allow-implausible", panel=METHOD, help=(
        "assimilate values more than 8 climatological standard deviations from the model's mean (normally an "
        "error: a unit mistake such as degrees Celsius for K or hPa for Pa)"))
    members: int = _option(8, panel=SAMPLER, help="ensemble size")
    steps: int = _option(18, panel=SAMPLER, help="sampler steps (cBottle: 18, sigma 200 -> 0.02, Heun)")
    seed: int = _option(0, panel=SAMPLER, help=(
        "random seed (a campaign derives each time's key from it and the time)"))
    prior_members: int | None = _option(None, "--prior-members", panel=SAMPLER, help=(
        "unguided members for the prior fit, the increment and the stored prior mean (default: --members; 0: skip)"))
    out: Path = _option(..., "--out", panel=OUTPUT, help=(
        "analysis file (.nc NetCDF4, or .zarr); a campaign (--times) writes one .zarr store, dims (member, time, "
        "pixel)"))
    resume: bool = _option(False, "--resume", panel=OUTPUT, help=(
        "a campaign: continue the store, running the times not yet complete (same settings required)"))
    overwrite: bool = _option(False, panel=OUTPUT, help="replace an existing output (file or store)")
    regrid: str | None = _option(None, "--regrid", panel=OUTPUT, help=(
        "write on a regular NLATxNLON lat/lon grid instead of HEALPix"))
    json_path: Path | None = _option(None, "--json", panel=OUTPUT, help=(
        "also write the summary as JSON here (a campaign: this process's summary)"))
    bf16: bool = _option(False, "--bf16", panel=PERFORMANCE, help=(
        "evaluate the network in bfloat16 (guidance stays float32)"))
    remat: bool = _option(False, "--remat", panel=PERFORMANCE, help=(
        "recompute each U-Net block in the guidance VJPs instead of storing its activations (less memory, ~1 more "
        "network pass per VJP)"))
    chunk_size: int | None = _option(None, "--chunk-size", panel=PERFORMANCE, help=(
        "run members this many at a time (less memory)"))
    no_cache: bool = _option(False, "--no-cache", panel=PERFORMANCE, help=(
        "do not use the persistent compilation cache (then assimilate's bar counts denoiser calls as they run)"))

    def assimilation_settings(self, **video):
        """The checked :class:`~jaxguide.assimilation.settings.AssimilationSettings` of these
        options; ``video`` adds the video-model settings a command was given
        (``conditioning_frames``, ``time_matching``)."""
        from jaxguide.assimilation.settings import AssimilationSettings  # imports JAX: not at start-up

        settings = AssimilationSettings(
            check_plausibility=not self.allow_implausible, method=self.method, members=self.members,
            steps=self.steps, seed=self.seed, sigma_y=parse_sigma_y(self.sigma_y),
            guidance_scale=self.guidance_scale, cg_iters=self.cg_iters, solver=self.solver, gamma=self.gamma,
            norm_matching=self.norm_matching, label=self.label, interpolation=self.interpolation,
            window_hours=self.window_hours, drop_bad=self.drop_bad, prior_members=self.prior_members,
            bf16=self.bf16, remat=self.remat, chunk_size=self.chunk_size, **video)
        settings.check()
        return settings


def shared_options(command):
    """Give ``command`` the :class:`RunOptions` as command-line options, in place of its
    keyword-only parameter ``run: RunOptions`` (there in ``--help``), and call it with their
    values gathered in one ``run``."""
    names = [f.name for f in dataclasses.fields(RunOptions)]
    types = typing.get_type_hints(RunOptions)
    own = inspect.signature(command, eval_str=True)
    params = []
    for p in own.parameters.values():
        if p.name != "run":
            params.append(p)
            continue
        params += [inspect.Parameter(f.name, p.kind, default=f.metadata["option"], annotation=types[f.name])
                   for f in dataclasses.fields(RunOptions)]

    @functools.wraps(command)
    def wrapper(**kwargs):
        run = RunOptions(**{name: kwargs.pop(name) for name in names})
        return command(run=run, **kwargs)

    wrapper.__signature__ = own.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": own.return_annotation}
    return wrapper


# --------------------------------------------------------------------------------------
# parsing option values


def parse_floats(text: str | None, what: str) -> tuple[float, ...]:
    """``"100,10"`` -> ``(100.0, 10.0)``; None or ``""`` -> ``()``; ``what`` names the option in errors."""
    if not text:
        return ()
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_sigma_y(text: str | None) -> float | dict[str, float] | None:
    """``--sigma-y``: ``1.0`` (every observation) or ``T850=1.0,T500=0.8`` (per variable),
    physical units; None keeps the table's ``sigma``."""
    if text is None:
        return None
    if ":" in text and "=" not in text:
        fixed = text.replace(":", "=")
        raise ValueError(f"--sigma-y: cannot read {text!r}; per variable it is VAR=VALUE, e.g. {fixed!r} "
                         "(or one number for every observation, e.g. 1.0)")
    if "=" not in text:
        values = parse_floats(text, "--sigma-y")
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


def parse_latlon_grid(text: str | None):
    """``--regrid``: ``"181x360"`` (NLATxNLON) -> a :class:`~jaxguide.grid.latlon.LatLonGrid`; None -> None (HEALPix)."""
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
