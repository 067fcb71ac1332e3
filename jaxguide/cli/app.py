"""The typer app, its one-line errors, ``main`` and the persistent compilation cache.

Expected failures (missing or malformed files, unwritable outputs) and command-line
usage errors (a value that does not parse, a missing or unknown option) end with one
line ``error: ...`` on stderr and exit status 2, never a traceback or usage panel; an
error about a file names the option that gave it. Inputs are checked before any
output is created.

The commands live in their own modules (``jaxguide.cli.commands.convert``, ...), each adding
itself with ``@app.command``; ``jaxguide.cli`` imports them all. Nothing here imports
JAX at start-up (``jaxguide --help`` stays fast).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

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


@app.callback()
def _options(ctx: typer.Context,
             debug: bool = typer.Option(False, "--debug", help="show the full traceback of any error (also JAXGUIDE_DEBUG=1)")) -> None:
    """Score-based data assimilation with cBottle in JAX."""
    ctx.meta["jaxguide.debug"] = debug


def main() -> None:
    """Console entry point (``jaxguide``)."""
    app()


# --------------------------------------------------------------------------------------
# errors: one line, naming the option


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


_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # jaxguide/, all of its layers


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
    if isinstance(e, KeyError):
        # jaxguide raises a plain KeyError about input only as a sentence; a bare key is a
        # lookup that failed (``d[key]``), i.e. a bug: it keeps its traceback
        key = e.args[0] if len(e.args) == 1 else None
        if not (isinstance(key, str) and " " in key.strip()):
            return False
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and str(Path(last).resolve()).startswith(_PACKAGE_DIR)


OUT_OF_MEMORY_HINT = ("lower the memory of each device call with --chunk-size N (members per call), "
                      "--remat (recompute the network in the guidance) or --bf16")


def is_out_of_memory(e: BaseException) -> bool:
    """A device out-of-memory error (JAX's ``JaxRuntimeError`` / ``XlaRuntimeError`` with
    RESOURCE_EXHAUSTED or "out of memory"); checked by class name, without importing JAX."""
    names = {c.__name__ for c in type(e).__mro__}
    if not names & {"JaxRuntimeError", "XlaRuntimeError"}:
        return False
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _out_of_memory_line(e: BaseException) -> str:
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    if len(first) > 200:
        first = first[:197] + "..."
    return f"device out of memory ({first}); {OUT_OF_MEMORY_HINT}"


def _debug_requested() -> bool:
    import os

    from typer._click.globals import get_current_context  # typer==0.29 vendors click

    ctx = get_current_context(silent=True)
    flag = bool(ctx is not None and ctx.find_root().meta.get("jaxguide.debug"))
    return flag or os.environ.get("JAXGUIDE_DEBUG", "") not in ("", "0")


def handle_errors(fn):
    """Turn input errors (:func:`is_input_error`) into one ``error: ...`` line and exit
    status 2; an error about a file given on the command line also names the option that
    gave it. A device out-of-memory error (:func:`is_out_of_memory`) is one line with the
    options that lower the memory, exit status 2. Anything else, and everything under
    ``jaxguide --debug``, keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            if _debug_requested() or not is_input_error(e):
                raise
            _fail(_name_option(_message(e), e, _file_options(fn, kwargs)))
        except Exception as e:
            if _debug_requested() or not is_out_of_memory(e):
                raise
            _fail(_out_of_memory_line(e))

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
