"""The ``lightning-meta`` command line (also ``python -m lightning_meta``).

Each sub-command lives in a module of its own that exposes
``add_parser(subparsers)`` and ``run(args) -> int``; this module only wires
them together, so importing it stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# sub-command name -> module implementing it
_COMMANDS: dict[str, str] = {
    "check": "lightning_meta._cli._check",
    "estimate": "lightning_meta._cli._estimate",
    "load-check": "lightning_meta._cli._load",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="lightning-meta",
        description="Meta-device modules that just work in PyTorch Lightning.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status.

    Exit status 2 means the command line or its target was wrong (argparse's
    convention); each sub-command documents its other statuses.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(_COMMANDS[args.command])
    status: int = module.run(args)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
