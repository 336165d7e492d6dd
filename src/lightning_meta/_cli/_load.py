"""``lightning-meta load-check``: build a model without memory, fill it from a checkpoint, report.

Examples::

    lightning-meta load-check models.py:Net checkpoints/last.ckpt
    lightning-meta load-check transformers:LlamaForCausalLM ./llama --args @config_args.json
    lightning-meta load-check models.py:Net model.safetensors --dtype bfloat16 --json

The model is built under ``deferred_init`` (``--init meta`` builds it on the
meta device instead), so checking a checkpoint needs no memory beyond one copy
of its weights. Exit status: 0 when the checkpoint loads, 1 when it does not
(the reason is printed), 2 when the command line or the target is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from lightning_meta._errors import MetaTensorError

__all__ = ["add_parser", "run"]

_HELP = "Load a checkpoint into a model built on meta, with a progress bar, and print the report."


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``load-check`` sub-command on ``subparsers`` and return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser("load-check", help=_HELP, description=_HELP)
    p.add_argument(
        "model", help="module class or factory: 'package.module:Name' or 'path/to/file.py:Name'"
    )
    p.add_argument(
        "checkpoint",
        help=".ckpt, .pt/.pth/.bin, .safetensors, a sharded *.index.json or its directory, "
        "or a torch.distributed.checkpoint directory",
    )
    p.add_argument(
        "--args",
        metavar="JSON",
        help="constructor/factory arguments: JSON list, object, or @file.json",
    )
    p.add_argument(
        "--init",
        choices=["deferred", "meta"],
        default="deferred",
        help="how to build the model (default: deferred)",
    )
    p.add_argument("--dtype", help="cast floating point tensors, e.g. bfloat16")
    p.add_argument("--device", help="where the tensors end up (default: cpu)")
    p.add_argument("--prefix", help="checkpoint key prefix to strip (default: detected)")
    p.add_argument("--no-strict", action="store_true", help="load what matches and list the rest")
    p.add_argument(
        "--trust",
        metavar="MODULE:NAME",
        action="append",
        default=[],
        help="allow this global when unpickling (repeatable); only for files you trust",
    )
    p.add_argument(
        "--json", action="store_true", help="print only the JSON report on standard output"
    )
    return p


def _dtype(text: str | None) -> torch.dtype | None:
    if text is None:
        return None
    value = getattr(torch, text.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise MetaTensorError(
            f"--dtype {text!r} is not a torch dtype. Fix: use e.g. bfloat16 or float16."
        )
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``load-check`` for parsed ``args``; print the report and return the exit status."""
    from rich.console import Console

    from lightning_meta._cli._target import load_target, target_factory
    from lightning_meta._deferred._block import deferred_init

    err = Console(stderr=True)

    def fail(e: Exception, status: int) -> int:
        err.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        return status

    try:
        factory = target_factory(args.model, args.args)
        dtype = _dtype(args.dtype)
        trusted = [load_target(t) for t in args.trust]
    except MetaTensorError as e:
        return fail(e, 2)
    try:
        with err.status(f"building {args.model} on meta..."):
            if args.init == "meta":
                with torch.device("meta"):
                    model = factory()
            else:
                model = deferred_init(factory)
    except Exception as e:  # the user's model code: report it, do not hide the type
        return fail(MetaTensorError(f"building {args.model!r} raised {type(e).__name__}: {e}"), 2)
    if not isinstance(model, torch.nn.Module):
        return fail(
            MetaTensorError(f"{args.model!r} built a {type(model).__name__}, not an nn.Module."), 2
        )

    from lightning_meta._load._checkpoint import load_checkpoint

    try:
        report = load_checkpoint(
            model, args.checkpoint, device=args.device, dtype=dtype, strict=not args.no_strict,
            prefix=args.prefix, safe_globals=trusted, progress=True,
        )  # fmt: skip
    except MetaTensorError as e:
        return fail(e, 1)
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        Console().print(str(report), markup=False, highlight=False, soft_wrap=True)
    return 0
