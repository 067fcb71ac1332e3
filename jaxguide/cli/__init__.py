"""The command line (typer): parses options, calls the library, prints.

The top layer: may import any other. ``app`` (:mod:`jaxguide.cli.app`) is the typer
app and ``main`` the ``jaxguide`` entry point; each command lives in its own module of
:mod:`jaxguide.cli.commands` (``convert``, ``assimilate``, ``campaign``, ``demo`` with ``synthetic-sst``, ``era5_obs``,
``evaluate``) and adds itself to ``app`` when imported here, in the order of
``jaxguide --help``. Command modules import :mod:`~jaxguide.cli.app`,
:mod:`~jaxguide.cli.options`, :mod:`~jaxguide.cli.printing` and
:mod:`~jaxguide.cli.campaign_runner`, never each other.

``jaxguide.cli.convert`` (and ``assimilate``, ``campaign``, ``demo``, ``era5_obs``,
``evaluate``) is the command function, as in the former module ``jaxguide.cli``.
"""

from jaxguide.cli.app import (  # noqa: F401
    EXPECTED_ERRORS,
    app,
    compile_cache_dir,
    enable_compile_cache,
    handle_errors,
    is_input_error,
    main,
)

# the commands, registered on ``app`` in this order; the public names of the former module jaxguide.cli
from jaxguide.cli.commands.convert import convert  # noqa: F401
from jaxguide.cli.commands.assimilate import assimilate  # noqa: F401
from jaxguide.cli.commands.demo import synthetic_sst, demo  # noqa: F401
from jaxguide.cli.commands.era5_obs import era5_obs  # noqa: F401
from jaxguide.cli.commands.evaluate import evaluate  # noqa: F401
from jaxguide.cli.commands.campaign import campaign  # noqa: F401
