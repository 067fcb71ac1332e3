"""``jaxguide convert``: cBottle PyTorch checkpoints to jaxguide parameters (needs the 'convert' extra)."""

from __future__ import annotations

from pathlib import Path

import typer

from jaxguide.cli.app import app, handle_errors
from jaxguide.cli.options import parse_floats


def _status(text: str):
    """A spinner with ``text`` on stderr while a step runs."""
    from rich.console import Console

    return Console(stderr=True).status(text)


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
    thresholds = parse_floats(sigma_thresholds, "--sigma-thresholds")
    with _status(f"converting {len(checkpoints)} checkpoint(s)"):
        path = convert_checkpoints(checkpoints, out, sigma_thresholds=thresholds, overwrite=overwrite)
    typer.echo(f"wrote {path}")
