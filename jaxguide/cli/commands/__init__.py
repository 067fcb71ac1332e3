"""One module per command; each adds itself to ``jaxguide.cli.app.app`` when imported (``jaxguide/cli/__init__.py`` imports them in the order of ``jaxguide --help``)."""
