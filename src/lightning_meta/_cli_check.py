"""The ``check`` sub-command (placeholder until its issue lands)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    subparsers.add_parser("check", help="(not available yet)")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("lightning-meta check: not available yet")
