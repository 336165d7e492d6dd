"""``lightning-meta estimate``: parameters, FLOPs and training memory of a model, from the shell.

Examples::

    lightning-meta estimate torch.nn:Linear --args '[4096, 4096]' --input 8,4096:float32
    lightning-meta estimate models.py:Net --input 8,3,224,224 --precision bf16-mixed --json
    lightning-meta estimate --hf-config config.json --input 1,4096:int64 --optimizer adamw
    lightning-meta estimate --hf-config config.json --input 1,4096:int64 --strategy fsdp \
        --world-size 64 --tensor-parallel 8 --activation-checkpointing --mixed-precision bf16
    lightning-meta estimate --hf-config config.json --input 1,4096:int64 --strategy fsdp \
        --world-size 64 --memory 80GiB --fit batch

Exit status (see :mod:`lightning_meta._cli._main`): 0 on success; 1 when
the model cannot be estimated with these inputs (they do not fit its
forward, a real kernel would refuse their dtypes, the model reads tensor
values); 2 when the command line is wrong (an unknown optimizer, precision
or device, a bad ``--input``) or the target cannot be imported or built.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_meta._cli._main import write_out, writing_output
from lightning_meta._errors import ArgumentValueError

__all__ = ["add_parser", "run"]

_HELP = "Estimate parameters, FLOPs and peak training memory of a model without allocating it."
_EXIT = (
    "Exit status: 0 done; 1 the model cannot be estimated with these inputs (they do not fit "
    "its forward, a real kernel would refuse their dtypes, an index is out of range), or "
    "nothing fits --memory with --fit (the answer is still printed); 2 a bad command line (an "
    "unknown option, optimizer, precision or device, a bad --input, no inputs), or a TARGET "
    "that cannot be imported or built; 130 interrupted."
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``estimate`` sub-command on ``subparsers`` and return its parser."""
    from lightning_meta._estimate._options import OPTIMIZERS, PRECISIONS

    p: argparse.ArgumentParser = subparsers.add_parser(
        "estimate", help=_HELP, description=_HELP, epilog=_EXIT
    )
    p.add_argument(
        "target",
        nargs="?",
        help="module class or factory: 'package.module:Name' or 'path/to/file.py:Name'; "
        "with --hf-config, a transformers class name (default: the config's architecture)",
    )
    p.add_argument(
        "--args",
        metavar="JSON",
        help="constructor/factory arguments: JSON list, object, or @file.json",
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="SHAPE:DTYPE",
        help="one positional input, e.g. 8,16:float32 or 1,4096:int64 (repeat for several); "
        "default: the LightningModule's example_input_array",
    )
    p.add_argument(
        "--optimizer", default="adamw", help=f"{', '.join(OPTIMIZERS)}, none, or MODULE:CLASS"
    )
    p.add_argument("--precision", default="32-true", help=", ".join(PRECISIONS))
    p.add_argument("--device", default="cpu", help="device the model would train on (default: cpu)")
    p.add_argument(
        "--depth", type=int, default=2, help="depth of the per-module table (default: 2)"
    )
    p.add_argument(
        "--loop",
        choices=["lightning", "plain"],
        default="lightning",
        help="when gradients are zeroed",
    )
    p.add_argument(
        "--no-extrapolate",
        action="store_true",
        help="simulate every block of a deep stack instead of 2, 3 and 4 of them (slower, same result)",
    )
    p.add_argument(
        "--hf-config",
        metavar="PATH_OR_JSON",
        help="a transformers config file, directory or JSON text; never fetched from a hub",
    )
    ranks = p.add_argument_group(
        "per rank", "estimate one rank of a multi-process run (no process is started)"
    )
    ranks.add_argument(
        "--strategy",
        choices=["ddp", "fsdp", "fsdp2", "model_parallel"],
        help="ddp (DDPStrategy) or fsdp (FSDP2: fully_shard per block and root, "
        "ModelParallelStrategy)",
    )
    ranks.add_argument("--world-size", type=int, metavar="N", help="number of ranks")
    ranks.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="ranks per tensor-parallel group (fsdp; default 1)",
    )
    ranks.add_argument(
        "--activation-checkpointing", action="store_true", help="checkpoint every block"
    )
    ranks.add_argument(
        "--no-reshard-after-forward",
        action="store_true",
        help="FSDP2: keep blocks unsharded from forward to backward",
    )
    ranks.add_argument(
        "--mixed-precision",
        metavar="DTYPE[,DTYPE]",
        help="FSDP2 MixedPrecisionPolicy: param dtype (reduced in float32), or param,reduce",
    )
    ranks.add_argument(
        "--blocks",
        metavar="NAME",
        help="the container of blocks, e.g. model.layers (default: found)",
    )
    ranks.add_argument(
        "--tensor-parallel-plan",
        metavar="JSON",
        help='module patterns to colwise/rowwise/colwise_rep, e.g. \'{"layers.*.q": "colwise"}\' '
        "(default: the plan transformers applies, the model's tp_plan)",
    )
    ranks.add_argument(
        "--gradient-as-bucket-view", action="store_true", help="DDP: gradients live in the buckets"
    )
    ranks.add_argument(
        "--no-broadcast-buffers",
        action="store_true",
        help="DDP: the buffers are not broadcast before each forward (broadcast_buffers=False)",
    )
    ranks.add_argument(
        "--backend",
        choices=["nccl", "gloo"],
        help="the collectives' backend whose buffers are simulated (default nccl)",
    )
    fits = p.add_argument_group("what fits", "search against a memory budget per device")
    fits.add_argument(
        "--memory", metavar="SIZE", help="memory of one device, e.g. 80GiB (GB = 10**9 bytes)"
    )
    fits.add_argument(
        "--fit",
        choices=["batch", "sequence", "world-size"],
        help="the largest batch or sequence length, or the smallest world size, that fits",
    )
    fits.add_argument(
        "--global-batch",
        type=int,
        metavar="N",
        help="with --fit world-size: samples per step over all data-parallel ranks",
    )
    p.add_argument(
        "--json", action="store_true", help="print only the JSON document on standard output"
    )
    return p


def _clip(text: str) -> str:
    """``repr`` of an argument for a message, cut to a readable length (JSON text can be long)."""
    return repr(text) if len(text) <= 80 else repr(text[:77] + "...")


def _hf_factory(config_text: str, class_name: str | None) -> Callable[[], Any]:
    """Return a factory building a transformers model from a local config, never from a hub.

    Args:
        config_text: a config file, a directory holding ``config.json``, or JSON text.
        class_name: a transformers class; ``None`` takes the config's architecture.

    Returns:
        A factory named after the class and the model type, for messages.

    Raises:
        TargetError: if transformers is not installed; the factory raises it
            if the model cannot be built.
        ArgumentValueError: if the config cannot be read or built, or the class is unknown.
    """
    from lightning_meta._cli._target import TargetError, guarded_build, user_code

    try:
        with user_code():
            import transformers
    except ImportError as e:
        raise TargetError("--hf-config needs transformers. Fix: pip install transformers.") from e
    path = Path(config_text).expanduser()
    if not config_text.lstrip().startswith("{") and not path.exists():
        # not JSON text: a path, and it is not there ("Expecting value" would mislead)
        raise ArgumentValueError(
            f"--hf-config {_clip(config_text)}: no such file or directory (nor JSON text, which "
            "starts with '{'). Fix: pass the path of a config.json, of the folder holding it, "
            "or its JSON content."
        )
    if path.is_dir():
        if not os.path.lexists(path / "config.json"):
            raise ArgumentValueError(
                f"--hf-config {_clip(config_text)} is a folder without a config.json. Fix: pass "
                "the folder save_pretrained wrote, or the config file's own path."
            )
        path = path / "config.json"
    try:
        raw = path.read_text() if os.path.lexists(path) else config_text
        data = json.loads(raw)
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise ArgumentValueError(
            f"--hf-config {_clip(config_text)} is neither a readable config file nor JSON text ({e}). "
            "Fix: pass the path of a config.json or its JSON content."
        ) from e
    if not isinstance(data, dict) or "model_type" not in data:
        raise ArgumentValueError(
            f'--hf-config {_clip(config_text)} has no \'model_type\'. Fix: add it, e.g. "model_type": "llama".'
        )
    model_type = data.pop("model_type")
    try:
        config = transformers.AutoConfig.for_model(model_type, **data)
    except Exception as e:
        raise ArgumentValueError(
            f"--hf-config: transformers cannot build a {model_type!r} config: {e}. Fix: correct "
            "the config's fields, or check the model_type."
        ) from e
    architectures: list[str] = list(getattr(config, "architectures", None) or [])
    name = class_name or (architectures[0] if architectures else None)
    if name is None:
        cls: Any = transformers.AutoModelForCausalLM
    else:
        cls = getattr(transformers, name, None)
        if cls is None:
            raise ArgumentValueError(
                f"--hf-config: transformers has no class {name!r}. Fix: give a model class such as "
                "LlamaForCausalLM as TARGET."
            )

    def build() -> Any:
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)

    return guarded_build(
        f"{getattr(cls, '__name__', cls)}({model_type} config)", build, arguments="--hf-config"
    )


def _factory(args: argparse.Namespace) -> Callable[[], Any]:
    """Return the factory of the model named by TARGET, or by ``--hf-config``.

    Raises:
        ArgumentValueError: if TARGET is missing or does not fit ``--hf-config``.
        TargetError: if the target cannot be imported.
    """
    from lightning_meta._cli._target import target_factory

    if args.hf_config is not None:
        if args.target is not None and ":" in args.target:
            raise ArgumentValueError(
                f"estimate: with --hf-config, TARGET {args.target!r} must be a transformers class "
                "name such as LlamaForCausalLM. Fix: drop TARGET or give the class name."
            )
        return _hf_factory(args.hf_config, args.target)
    if args.target is None:
        raise ArgumentValueError(
            "estimate: no TARGET. Fix: give 'package.module:Name', 'file.py:Name' or --hf-config."
        )
    return target_factory(args.target, args.args)


def _optimizer(text: str) -> Any:
    """Return ``--optimizer`` as ``estimate`` takes it: ``None``, a loaded target, or the name."""
    if text.lower() == "none":
        return None
    if ":" in text:
        from lightning_meta._cli._target import load_target

        return load_target(text)
    return text


def _strategy_options(args: argparse.Namespace) -> dict[str, Any]:
    """Return the per-rank options of ``estimate`` given on the command line (none: {})."""
    options: dict[str, Any] = {}
    if args.strategy is not None:
        options["strategy"] = args.strategy
    if args.world_size is not None:
        options["world_size"] = args.world_size
    if args.tensor_parallel != 1:
        options["tensor_parallel"] = args.tensor_parallel
    if args.activation_checkpointing:
        options["activation_checkpointing"] = True
    if args.no_reshard_after_forward:
        options["reshard_after_forward"] = False
    if args.mixed_precision is not None:
        parts = [p.strip() for p in args.mixed_precision.split(",")]
        options["mixed_precision"] = parts[0] if len(parts) == 1 else tuple(parts)
    if args.blocks is not None:
        options["blocks"] = args.blocks
    if args.tensor_parallel_plan is not None:
        text = args.tensor_parallel_plan
        try:
            raw = Path(text[1:]).read_text() if text.startswith("@") else text
            options["tensor_parallel_plan"] = json.loads(raw)
        except (OSError, ValueError) as e:
            raise ArgumentValueError(
                f"--tensor-parallel-plan {_clip(text)} is neither JSON nor a readable @file ({e}). "
                'Fix: pass \'{"layers.*.attn.q": "colwise"}\' or @plan.json.'
            ) from e
    if args.gradient_as_bucket_view:
        options["gradient_as_bucket_view"] = True
    if args.no_broadcast_buffers:
        options["broadcast_buffers"] = False
    if args.backend is not None:
        options["backend"] = args.backend
    return options


def _check_fit(args: argparse.Namespace) -> None:
    if (args.memory is None) != (args.fit is None):
        raise ArgumentValueError(
            "estimate: --memory and --fit go together. Fix: pass both, e.g. --memory 80GiB "
            "--fit batch, or neither."
        )
    if args.global_batch is not None and args.fit != "world-size":
        raise ArgumentValueError(
            "estimate: --global-batch applies to --fit world-size. Fix: drop it, or pass "
            "--fit world-size."
        )


def run(args: argparse.Namespace) -> int:
    """Run ``estimate`` for parsed ``args``; print a table (or JSON) and return the exit status.

    The status is 0, or 1 when ``--fit`` finds that nothing fits ``--memory``.

    Failures are raised for ``main`` to report with their exit status.

    Raises:
        ArgumentValueError: a bad option or ``--input`` (exit status 2).
        TargetError: the target or ``--optimizer MODULE:CLASS`` cannot be
            imported or built (exit status 2).
        MetaTensorError: the model cannot be estimated with these inputs
            (exit status 1).
    """
    from rich.console import Console

    from lightning_meta._arguments import command_line_spelling
    from lightning_meta._cli._target import user_code
    from lightning_meta._estimate._estimate import estimate
    from lightning_meta._estimate._specs import parse_input_spec

    _check_fit(args)
    options = _strategy_options(args)
    factory = _factory(args)
    optimizer = _optimizer(args.optimizer)
    inputs = tuple(parse_input_spec(s) for s in args.input) or None
    err = Console(stderr=True)
    common: dict[str, Any] = dict(
        optimizer=optimizer,
        precision=args.precision,
        device=args.device,
        depth=args.depth,
        loop=args.loop,
        extrapolate=not args.no_extrapolate,
        **options,
    )
    title = args.target or "transformers model"
    if args.fit is not None:
        from lightning_meta._estimate._fit import find_fit

        vary = args.fit.replace("-", "_")
        with (
            user_code(),
            command_line_spelling(),  # its fixes name --device, --optimizer
            err.status(f"searching the {vary.replace('_', ' ')} that fits..."),
        ):
            answer = find_fit(
                factory,
                inputs,
                memory=args.memory,
                vary=vary,
                global_batch=args.global_batch,
                **common,
            )
        # nothing fits: a problem found (status 1), after the answer is printed
        status = 0 if answer.value is not None else 1
        if args.json:
            with writing_output():
                write_out(json.dumps(answer.to_dict(), indent=2) + "\n")
            return status
        from lightning_meta._estimate._table import render, render_fit

        with writing_output():
            render_fit(answer, Console())
            if answer.fits is not None:
                render(answer.fits, Console(), title=title)
        return status
    with (
        user_code(),
        command_line_spelling(),
        err.status("building the model on meta and simulating one training step..."),
    ):
        result = estimate(factory, inputs, **common)
    if args.json:
        with writing_output():
            write_out(json.dumps(result.to_dict(), indent=2) + "\n")
        return 0
    from lightning_meta._estimate._table import render

    with writing_output():
        render(result, Console(), title=title)
    return 0
