"""The command line (typer): parses options, calls the library, prints.

The top layer: may import any other. ``app`` (:mod:`jaxguide.cli.app`) is the typer
app and ``main`` the ``jaxguide`` entry point; each command lives in its own module
(``convert``, ``assimilate``, ``campaign``, ``demo`` with ``synthetic-sst``, ``era5_obs``,
``evaluate``) and adds itself to ``app`` when imported here, in the order of
``jaxguide --help``. Command modules import :mod:`~jaxguide.cli.app`,
:mod:`~jaxguide.cli.options`, :mod:`~jaxguide.cli.printing` and
:mod:`~jaxguide.cli.campaign_runner`, never each other.

``jaxguide.cli.convert`` (and ``assimilate``, ``demo``, ``era5_obs``, ``evaluate``) is
the command function, as before the package existed; its module is
``sys.modules["jaxguide.cli.convert"]`` (``from jaxguide.cli.convert import ...`` works).
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
from jaxguide.cli.convert import convert  # noqa: F401
from jaxguide.cli.assimilate import assimilate  # noqa: F401
from jaxguide.cli.demo import synthetic_sst, demo  # noqa: F401
from jaxguide.cli.era5_obs import era5_obs  # noqa: F401
from jaxguide.cli.evaluate import evaluate  # noqa: F401
from jaxguide.cli.campaign import campaign as _campaign  # noqa: F401  (jaxguide.cli.campaign stays the module)
