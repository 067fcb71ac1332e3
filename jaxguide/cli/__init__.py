"""The command line (typer): parses options, calls the library, prints.

The top layer: may import any other.
"""

# the public names of the former module jaxguide.cli
from jaxguide.cli.commands import (  # noqa: F401
    EXPECTED_ERRORS,
    assimilate,
    compile_cache_dir,
    convert,
    demo,
    enable_compile_cache,
    era5_obs,
    evaluate,
    handle_errors,
    is_input_error,
    main,
    synthetic_sst,
)
