"""``jaxguide --help``: every command with a one-sentence summary; option panels in ``assimilate`` and ``campaign``."""

from __future__ import annotations

import re
import subprocess
import sys

from typer.testing import CliRunner

from jaxguide.cli import app

COMMANDS = ("convert", "assimilate", "synthetic-sst", "demo", "era5-obs", "evaluate", "campaign")
PANELS = ("Inputs", "Method", "Sampler", "Output", "Performance")


def _summaries(text: str) -> dict[str, str]:
    """``{command: summary}`` from the Commands panel of the rich help (wrapped lines joined)."""
    panel = text.split("Commands", 1)[1]
    out: dict[str, str] = {}
    name = None
    for line in panel.splitlines():
        body = line.strip().strip("│").strip()
        if not body or body.startswith("╰"):
            continue
        m = re.match(r"(\S+)\s{2,}(.*)", body)
        if m and m.group(1) in COMMANDS:
            name = m.group(1)
            out[name] = m.group(2).strip()
        elif name is not None:
            out[name] += " " + body
    return out


def test_help_lists_every_command_with_one_sentence():
    res = CliRunner().invoke(app, ["--help"], terminal_width=100)
    assert res.exit_code == 0, res.output
    summaries = _summaries(res.stdout)
    assert set(summaries) == set(COMMANDS), res.stdout
    for name, text in summaries.items():
        assert text.endswith(".") and not text.endswith("...") and "…" not in text, (name, text)
        assert text.count(". ") == 0, (name, text)  # one sentence, not the docstring's whole first paragraph


def test_assimilate_and_campaign_help_panels():
    runner = CliRunner()
    for cmd, extra in (("assimilate", ("Video",)), ("campaign", ())):
        res = runner.invoke(app, [cmd, "--help"], terminal_width=120)
        assert res.exit_code == 0, res.output
        for panel in PANELS + extra:
            assert re.search(rf"─ {panel} ─", res.stdout), (cmd, panel)
    res = runner.invoke(app, ["assimilate", "--help"], terminal_width=120)
    inputs = res.stdout.split("─ Inputs ─", 1)[1].split("╰", 1)[0]
    assert "--model" in inputs and "--obs" in inputs and "--time " in inputs
    video = res.stdout.split("─ Video ─", 1)[1].split("╰", 1)[0]
    assert "--end" in video and "--condition" in video


def test_help_does_not_import_jax():
    """``jaxguide --help`` stays fast: the commands import JAX only when they run."""
    code = ("import sys; from jaxguide.cli import app; from typer.testing import CliRunner; "
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0; "
            "assert CliRunner().invoke(app, ['assimilate', '--help']).exit_code == 0; "
            "print(sorted(m for m in ('jax', 'numpy', 'pandas') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
