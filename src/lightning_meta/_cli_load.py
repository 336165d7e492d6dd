"""The ``load-check`` sub-command (placeholder until its issue lands)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    subparsers.add_parser("load-check", help="(not available yet)")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("lightning-meta load-check: not available yet")
