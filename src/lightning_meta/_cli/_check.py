"""The ``check`` sub-command: walk a LightningModule's lifecycle and report meta problems.

Exit status: 0 when no meta-related problem was found, 1 when one was (other
failures are printed as notes and do not change it), 2 when the target cannot
be loaded or built.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser", "run"]

_STYLE = {"ok": "green", "info": "cyan", "note": "yellow", "problem": "bold red"}


def add_parser(subparsers: Any) -> None:
    """Register ``check TARGET [ARGS_JSON] [--json]``."""
    parser = subparsers.add_parser(
        "check",
        help="walk a LightningModule's lifecycle and report meta tensors that would break it",
        description=(
            "Instantiate TARGET and walk the lifecycle a Trainer would (configure_model, "
            "materialization, device transfer, state-dict round trip, optimizer construction, "
            "deepcopy, pickle, summary) without training. Exit 0: no meta problem; 1: meta "
            "problems found; 2: bad target."
        ),
    )
    parser.add_argument(
        "target", metavar="TARGET", help="package.module:Class or path/to/file.py:Class"
    )
    parser.add_argument(
        "arguments",
        metavar="ARGS_JSON",
        nargs="?",
        default=None,
        help='constructor arguments as JSON: a list, an object ({"hidden": 64}) or @file.json',
    )
    parser.add_argument(
        "--json", action="store_true", help="print the findings as JSON on standard output"
    )


def run(args: argparse.Namespace) -> int:
    """Run the check and return the exit status."""
    from lightning_meta._cli._target import target_factory
    from lightning_meta._errors import MetaTensorError
    from lightning_meta._guard._check import check_module

    try:
        module = target_factory(args.target, args.arguments)()
    except MetaTensorError as e:
        print(f"lightning-meta check: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the target's own constructor failed
        print(
            f"lightning-meta check: building {args.target!r} raised {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return 2
    from torch import nn

    if not isinstance(module, nn.Module):
        print(
            f"lightning-meta check: {args.target!r} built a {type(module).__name__}, not a "
            "LightningModule. Fix: point TARGET at a LightningModule class or factory.",
            file=sys.stderr,
        )
        return 2
    rows = check_module(module)
    status = 1 if any(r.status == "problem" for r in rows) else 0
    if args.json:
        json.dump(
            {"target": args.target, "status": status, "findings": [r.to_dict() for r in rows]},
            sys.stdout,
            indent=2,
        )
        print()
        return status
    _print_table(args.target, type(module).__name__, rows, status)
    return status


def _print_table(target: str, name: str, rows: list[Any], status: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lightning-meta check {target} ({name})", show_lines=False)
    for column in ("check", "result", "path", "detail / fix"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r.step, f"[{_STYLE[r.status]}]{r.status}[/]", r.path, r.detail)
    console = Console(width=max(Console().width, 160))
    console.print(table)
    from lightning_meta._guard._find import FIX

    problems = sum(r.status == "problem" for r in rows)
    if status:
        console.print(f"{problems} meta problem(s) found. {FIX}", markup=False)
    else:
        console.print("No meta problem found.")
