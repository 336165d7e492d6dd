"""The ``lightning-meta`` command line: ``check``, ``estimate``, ``load-check``."""

from lightning_meta._cli._main import main

__all__ = ["main"]
