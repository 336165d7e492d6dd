"""The ``check`` sub-command: walk a LightningModule's lifecycle and report meta problems.

Exit status (see :mod:`lightning_meta._cli._main`): 0 when no meta-related
problem was found (notes, such as a meta module held in a plain list, do not
count), 1 when one was, 2 when the target cannot be imported or built.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_meta._cli._main import write_out, writing_output

__all__ = ["HiddenModule", "add_parser", "hidden_modules", "run"]

_STYLE = {"ok": "green", "info": "cyan", "note": "yellow", "problem": "bold red"}

#: why a meta module held outside the module tree deserves a note, and its fix
TEMPLATE_WHY = (
    "Lightning never sees it, so this works, but lightning_meta.MetaTemplate(module) is the "
    "supported form: it stays on meta through deepcopy, pickle and checkpoints, builds on "
    "demand from a factory, and is called with real tensors as template(params, *inputs)"
)
TEMPLATE_FIX = "hold lightning_meta.MetaTemplate(module) there instead of the module"


def add_parser(subparsers: Any) -> None:
    """Register ``check TARGET [ARGS_JSON] [--json]``."""
    parser = subparsers.add_parser(
        "check",
        help="walk a LightningModule's lifecycle and report meta tensors that would break it",
        description=(
            "Instantiate TARGET and walk the lifecycle a Trainer would (setup('fit'), configure_model, "
            "materialization, device transfer, state-dict round trip, optimizer construction, "
            "deepcopy, pickle, summary) without training."
        ),
        epilog=(
            "Exit status: 0 no meta problem (notes do not count); 1 meta problems found; 2 a bad "
            "command line, or a TARGET that cannot be imported or built; 130 interrupted."
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


@dataclass
class HiddenModule:
    """A meta module reached only through a plain attribute or container (``self.teachers = [net]``)."""

    path: str
    type: str
    tensors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "type": self.type,
            "tensors": list(self.tensors),
            "detail": TEMPLATE_WHY + ".",
            "fix": TEMPLATE_FIX[0].upper() + TEMPLATE_FIX[1:] + ".",
        }


def _step_into(obj: Any, part: str) -> Any:
    """Return the value at one component of a dotted path, as ``find_meta_tensors`` names them."""
    from torch import nn

    if isinstance(obj, nn.Module):
        children = dict(obj.named_children())
        return children[part] if part in children else vars(obj)[part]
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if str(key) == part:
                return value
        raise KeyError(part)
    if isinstance(obj, (list, tuple)):
        return obj[int(part)]
    return vars(obj)[part]


def hidden_modules(module: Any) -> list[HiddenModule]:
    """Return the meta modules held outside ``module``'s tree, each with its meta tensors.

    A module is named by the shortest path that reaches it (``templates.0``);
    its tensors by their full paths (``templates.0.weight``).
    """
    from torch import nn

    from lightning_meta._guard._find import find_meta_tensors

    tree = {id(m) for m in module.modules()}
    found: dict[str, HiddenModule] = {}
    for f in find_meta_tensors(module):
        # (a deferred one left is a problem the check's rows name, not a template)
        if not getattr(f, "hidden", False) or getattr(f, "deferred", False):
            continue
        parts = f.path.split(".")
        obj: Any = module
        root, kind = ".".join(parts[:-1]), "module"
        for i, part in enumerate(parts[:-1]):
            try:
                obj = _step_into(obj, part)
            except (KeyError, IndexError, ValueError, TypeError):
                break
            if isinstance(obj, nn.Module) and id(obj) not in tree:
                root, kind = ".".join(parts[: i + 1]), type(obj).__name__
                break
        found.setdefault(root, HiddenModule(root, kind)).tensors.append(f.path)
    return list(found.values())


def run(args: argparse.Namespace) -> int:
    """Run the check and return the exit status; failures are raised for ``main`` to report.

    Raises:
        TargetError: if the target cannot be imported or built, or is not a module.
    """
    from torch import nn

    from lightning_meta._cli._target import TargetError, target_factory, user_code
    from lightning_meta._guard._check import check_module

    module = target_factory(args.target, args.arguments, given_by="ARGS_JSON")()
    if not isinstance(module, nn.Module):
        raise TargetError(
            f"target {args.target!r} built a {type(module).__name__}, not an nn.Module. "
            "Fix: point TARGET at a LightningModule (or any nn.Module) class or factory."
        )
    with user_code():  # configure_model, configure_optimizers... may print
        rows = check_module(module)
        hidden = hidden_modules(module)
    status = 1 if any(r.status == "problem" for r in rows) else 0
    if args.json:
        doc = {
            "target": args.target,
            "status": status,
            "findings": [r.to_dict() for r in rows],
            "hidden_modules": [h.to_dict() for h in hidden],
        }
        with writing_output():
            write_out(json.dumps(doc, indent=2) + "\n")
        return status
    with writing_output():
        _print_table(args.target, type(module).__name__, rows, hidden, status)
    return status


def _collapsed(rows: list[Any], hidden: list[HiddenModule]) -> list[tuple[str, str, str, str]]:
    """Return the table's rows, with the rows of each hidden module's tensors as one row."""
    owner = {t: h for h in hidden for t in h.tensors}
    out: list[tuple[str, str, str, str]] = []
    shown: set[str] = set()
    for r in rows:
        h = owner.get(r.path) if r.step == "find meta tensors" else None
        if h is None:
            out.append((r.step, r.status, r.path, r.detail))
        elif h.path not in shown:
            shown.add(h.path)
            count = f"{len(h.tensors)} meta tensor{'s' if len(h.tensors) != 1 else ''}"
            detail = (
                f"meta {h.type} ({count}) held outside the module tree: works, but "
                "lightning_meta.MetaTemplate(module) is the supported form (see the note below)"
            )
            out.append((r.step, r.status, h.path, detail))
    return out


def _print_table(
    target: str, name: str, rows: list[Any], hidden: list[HiddenModule], status: int
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"lightning-meta check {target} ({name})", show_lines=False)
    for column in ("check", "result", "path", "detail / fix"):
        table.add_column(column, overflow="fold")
    for step, result, path, detail in _collapsed(rows, hidden):
        table.add_row(escape(step), f"[{_STYLE[result]}]{result}[/]", escape(path), escape(detail))
    console = Console(width=max(Console().width, 160))
    console.print(table)
    from lightning_meta._guard._find import FIX

    problems = sum(r.status == "problem" for r in rows)
    if status and any(r.status == "problem" and "Fix:" in r.detail for r in rows):
        console.print(f"{problems} meta problem(s) found: the fix of each is in its row.")
    elif status:
        console.print(f"{problems} meta problem(s) found. {FIX}", markup=False)
    else:
        console.print("No meta problem found.")
    if hidden:
        paths = ", ".join(h.path for h in hidden)
        console.print(
            f"Note: {len(hidden)} meta module(s) held in a plain attribute or container "
            f"({paths}): {TEMPLATE_WHY}. Fix: {TEMPLATE_FIX}.",
            markup=False,
            highlight=False,
        )
