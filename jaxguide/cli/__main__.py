"""``python -m jaxguide.cli``: the ``jaxguide`` command."""

from jaxguide.cli import main

main()
