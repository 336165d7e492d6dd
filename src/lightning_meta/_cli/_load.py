"""``lightning-meta load-check``: build a model without memory, fill it from a checkpoint, report.

Examples::

    lightning-meta load-check models.py:Net checkpoints/last.ckpt
    lightning-meta load-check hf_models.py:llama ./llama  # def llama(): return LlamaForCausalLM(LlamaConfig(...))
    lightning-meta load-check models.py:Net model.safetensors --dtype bfloat16 --json
    lightning-meta load-check models.py:Net model.pt --verify

The model is built under ``deferred_init`` (``--init meta`` builds it on the
meta device instead), so checking a checkpoint needs no memory beyond one copy
of its weights; a LightningModule's own ``configure_model`` is then called, as
Lightning's ``load_from_checkpoint`` calls it (see :func:`_configure`). Reading
the checkpoint runs no code from it.

Exit status (see :mod:`~lightning_meta._cli._main`, which turns what
:func:`run` raises into one message on standard error):

- 0: the checkpoint loads into the model (the report is printed);
- 1: a problem in the checkpoint: it does not fit the model (missing,
  unexpected or mis-shaped keys), is truncated or damaged (with ``--verify``,
  a CRC that differs), unreadable, or unsafe to unpickle;
- 2: the command line is wrong (an unknown option, a ``--dtype`` that is not
  a floating point dtype, a ``--device`` this machine lacks, a ``--prefix``
  matching no key, a bad ``--trust``), or the target cannot be imported or
  built (a target that calls ``sys.exit`` included).

Standard output holds the report (with ``--json``, only the JSON document),
and nothing when the command fails; the progress bar goes to standard error,
only when it is a terminal and ``--json`` is not given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

import torch

from lightning_meta._cli._main import write_out, writing_output
from lightning_meta._errors import ArgumentValueError, MetaTensorError

__all__ = ["add_parser", "run"]

_HELP = "Load a checkpoint into a model built on meta, with a progress bar, and print the report."
_EXIT = (
    "Exit status: 0 the checkpoint loads into the model; 1 it does not fit the model (missing, "
    "unexpected or mis-shaped keys), is truncated, damaged, unreadable or unsafe to unpickle; "
    "2 a bad command line (an unknown option, a --dtype that is not a floating point dtype, a "
    "--device this machine lacks, a --prefix matching no key, a bad --trust), or a MODEL that "
    "cannot be imported or built; 130 interrupted."
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``load-check`` sub-command on ``subparsers`` and return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "load-check", help=_HELP, description=_HELP, epilog=_EXIT
    )
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
        help="how to build the model (default: deferred); with meta, what the checkpoint "
        "lacks (a non-persistent buffer such as a rotary inv_freq) stays on meta and is "
        "listed under 'left on meta', not a problem of the checkpoint (exit status 0)",
    )
    p.add_argument("--dtype", help="cast floating point tensors, e.g. bfloat16")
    p.add_argument("--device", help="where the tensors end up (default: cpu)")
    p.add_argument("--prefix", help="checkpoint key prefix to strip (default: detected)")
    p.add_argument("--no-strict", action="store_true", help="load what matches and list the rest")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also check the CRC-32 of every zip record read (torch files, DCP items)",
    )
    p.add_argument(
        "--allow-uninitialized",
        action="store_true",
        help="give tensors the model leaves uninitialised (torch.empty never filled) and the "
        "checkpoint lacks uninitialised memory, as eager construction does, instead of refusing",
    )
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
        raise ArgumentValueError(
            f"--dtype {text!r} is not a torch dtype. Fix: use e.g. bfloat16 or float16."
        )
    if not value.is_floating_point:
        raise ArgumentValueError(
            f"--dtype {text!r} is not a floating point dtype; only floating point tensors are "
            "cast. Fix: use e.g. bfloat16, float16 or float32."
        )
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``load-check`` for parsed ``args``; print the report and return 0.

    Raises:
        ArgumentValueError: ``--dtype``, ``--device`` or ``--prefix`` cannot
            be used (exit status 2).
        TargetError: the target or a ``--trust`` name cannot be imported, or
            the model cannot be built (exit status 2).
        MetaTensorError: the checkpoint cannot be loaded into the model (exit
            status 1).
    """
    from lightning_meta._arguments import command_line_spelling, real_device
    from lightning_meta._cli._target import parse_arguments, target_factory, user_code
    from lightning_meta._load._checkpoint import load_checkpoint

    dtype = _dtype(args.dtype)
    with command_line_spelling():  # its fix names --device
        device = real_device(args.device, "load-check")
    trusted = [obj for name in args.trust for obj in _trusted(name, args.model)]
    factory = _lightning_factory(args, trusted) or target_factory(args.model, args.args)
    model = _build(args, factory)
    from lightning_meta._load._lightning_hooks import HYPERPARAMETER_OVERRIDES

    _, overrides = parse_arguments(args.args)
    token = HYPERPARAMETER_OVERRIDES.set(overrides or None)  # the hook sees --args too
    try:
        # user_code: the model's load hooks run, and may print.
        with command_line_spelling(), user_code():  # its messages name --no-strict, --prefix
            report = load_checkpoint(
                model,
                args.checkpoint,
                device=device,
                dtype=dtype,
                strict=False if args.no_strict else None,
                prefix=args.prefix,
                safe_globals=trusted,
                progress=not args.json and sys.stderr.isatty(),
                verify=args.verify,
                allow_uninitialized=args.allow_uninitialized,
            )
    finally:
        HYPERPARAMETER_OVERRIDES.reset(token)
    with writing_output():
        if args.json:
            write_out(json.dumps(report.to_dict(), indent=2) + "\n")
        else:
            from rich.console import Console

            Console().print(str(report), markup=False, highlight=False, soft_wrap=True)
    return 0


def _lightning_factory(args: argparse.Namespace, trusted: list[Any]) -> Any:
    """A factory building a LightningModule class with its checkpoint's ``hyper_parameters``.

    Lightning's ``load_from_checkpoint`` builds the class with what
    ``save_hyperparameters`` stored (``--args`` overriding them, as its keyword
    arguments do, and only the names ``__init__`` takes unless it takes
    ``**kwargs``); built with its defaults instead, a model saved with other
    sizes is refused as not matching its own checkpoint. ``None`` where TARGET
    is not a LightningModule class or the file holds no hyperparameters (the
    load reports an unreadable file itself); a note on standard error names
    the values used.

    Raises:
        TargetError: the hyperparameters cannot be passed (a tensor among
            them, or LightningCLI's instantiator, which re-parses a config).
    """
    import inspect

    from lightning_meta._cli._target import (
        TargetError,
        guarded_build,
        load_target,
        parse_arguments,
    )
    from lightning_meta._guard._check import is_lightning_module_class

    cls = load_target(args.model)
    if not is_lightning_module_class(cls):
        return None
    saved = _saved_hyperparameters(args.checkpoint, trusted)
    if saved is None:
        return None
    values, saved_name = saved
    positional, given = parse_arguments(args.args)
    if "_instantiator" in values:
        if args.args is not None:
            sys.stderr.write(
                f"lightning-meta load-check: note: {cls.__name__} built with --args alone: the "
                "checkpoint's hyper_parameters were saved by LightningCLI, which builds the "
                "model from its config.\n"
            )
            return None
        raise TargetError(
            f"target {args.model!r}: the checkpoint's hyper_parameters were saved by "
            "LightningCLI, which builds the model from its config (their class_path and "
            "init_args), not with them as keyword arguments. Fix: pass the model's "
            "arguments with --args (the config's init_args as a JSON object)."
        )
    init = inspect.signature(cls.__init__).parameters
    names = [
        n for n, p in list(init.items())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in init.values())
    if isinstance(saved_name, str) and saved_name in names:
        values = {saved_name: values}  # save_hyperparameters(config): one argument
    bound = names[: len(positional)]  # --args given as a list fill these
    kwargs = {k: v for k, v in values.items() if k not in bound and (takes_any or k in names)}
    kwargs.update(given)
    if not any(k in values for k in kwargs if k not in given):
        return None  # none of the saved values reaches the constructor
    held = [
        t for k, v in kwargs.items() if k not in given for t in _tensors(v, f"hyper_parameters.{k}")
    ]
    if held:
        raise TargetError(
            f"target {args.model!r}: the checkpoint's {held[0]} is a tensor, which load-check "
            "does not read to build the model. Fix: pass that argument with --args (it "
            "overrides the saved one)."
        )
    used = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k not in given and k in values)
    sys.stderr.write(
        f"lightning-meta load-check: note: {cls.__name__} built with the checkpoint's "
        f"hyper_parameters ({used if len(used) <= 200 else used[:197] + '...'}), as Lightning's "
        "load_from_checkpoint builds it; --args overrides them.\n"
    )
    return guarded_build(args.model, lambda: cls(*positional, **kwargs))


def _tensors(value: Any, path: str) -> list[str]:
    """The paths of the tensors (as the safe reader describes them) inside ``value``."""
    from lightning_meta._load._torchfile import TensorRef, Unsupported

    if isinstance(value, (TensorRef, Unsupported)):
        return [path]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _tensors(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [t for i, v in enumerate(value) for t in _tensors(v, f"{path}[{i}]")]
    return []


def _saved_hyperparameters(
    checkpoint: str, trusted: list[Any]
) -> tuple[dict[str, Any], object] | None:
    """The ``hyper_parameters`` and ``hparams_name`` of a Lightning checkpoint file, read safely.

    ``None`` where the path is not a torch file holding a mapping of them, or
    cannot be read: the load that follows reports that file's problem.
    """
    from pathlib import Path

    from lightning_meta._load._files import head
    from lightning_meta._load._source import is_torch, torch_archive

    p = Path(checkpoint).expanduser()
    try:
        if not p.is_file() or not is_torch(head(p)):
            return None
        obj = torch_archive(p, trusted).obj
    except (OSError, MetaTensorError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("hyper_parameters"), dict):
        return None
    # Lightning's order: the keys of its first versions, then this one's
    old = [obj.get(k) for k in ("hparams", "module_arguments")]
    values = {
        **{k: v for o in old if isinstance(o, dict) for k, v in o.items()},
        **obj["hyper_parameters"],
    }
    return values, obj.get("hparams_name")


def _trusted(name: str, target: str) -> list[Any]:
    """What ``--trust name`` allows the unpickler; its errors say ``--trust``, not "target".

    A class of the script that saved the checkpoint is pickled as ``__main__.Name``,
    which no import finds here: ``--trust script.py:Name`` allows it under that name
    too, and ``--trust __main__:Name`` looks ``Name`` up in TARGET's file.
    """
    from lightning_meta._cli._target import TargetError, load_target, names_a_file

    where, _, attr = name.rpartition(":")
    if where == "__main__":
        file = target.rpartition(":")[0]
        try:
            if not names_a_file(file):
                raise TargetError(f"TARGET {target!r} is not a file")
            return _as_main(load_target(f"{file}:{attr}"), attr)
        except TargetError as e:
            raise TargetError(
                f"--trust {name!r}: {attr!r} is a class of the script that saved the file "
                f"(run as __main__), which TARGET's file does not define. Fix: --trust "
                f"path/to/that_script.py:{attr}."
            ) from e
    try:
        obj = load_target(name)
    except TargetError as e:
        text = str(e).removeprefix(f"target {name!r}")
        raise TargetError(f"--trust {name!r}{text}") from e
    return _as_main(obj, attr) if names_a_file(where) else [obj]


def _as_main(obj: Any, attr: str) -> list[Any]:
    """``obj``, and ``obj`` under the name a saving script's own class is pickled with."""
    return [obj, (obj, f"__main__.{getattr(obj, '__qualname__', attr)}")]


def _build(args: argparse.Namespace, factory: Any) -> torch.nn.Module:
    from lightning_meta._cli._target import TargetError
    from lightning_meta._deferred._block import deferred_init

    how = "on meta" if args.init == "meta" else "under deferred_init"
    try:
        if args.init == "meta":
            with torch.device("meta"):
                model = factory()
        else:
            model = deferred_init(factory)
    except TargetError:
        raise
    except MetaTensorError as e:  # the recorder refusing the model's code
        raise TargetError(f"target {args.model!r}: building it {how} failed: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise TargetError(
            f"target {args.model!r} built a {type(model).__name__}, not an nn.Module. Fix: name "
            "the model class or a function returning the model."
        )
    _configure(args, model, how)
    return model


def _configure(args: argparse.Namespace, model: torch.nn.Module, how: str) -> None:
    """Call a LightningModule's own ``configure_model``, as Lightning's ``load_from_checkpoint``
    does: the layers it builds (the pattern for sharded models) are in the checkpoint.

    The deferred floating-point buffers no checkpoint holds (non-persistent: a rotary
    ``inv_freq``) are materialized first, so that a cast in ``configure_model`` casts
    their values, as ``load_from_checkpoint``'s eager build does; it runs outside any
    ``deferred_init`` block, as a Trainer calls it, and its own block inside (the
    recipes' pattern) keeps what it builds deferred. With ``--init meta`` it runs on
    meta. One that needs a Trainer (``self.device_mesh`` to shard layers ``__init__``
    built) leaves the module as it stands, which a note on standard error says; where
    that holds no tensor, the target is refused.
    """
    from lightning_meta._deferred._handles import deferred_slots
    from lightning_meta._deferred._materialize import materialize_paths
    from lightning_meta._guard._check import own_configure_model

    configure = own_configure_model(model)
    if configure is None:
        return
    if args.init != "meta":
        # The buffers no checkpoint holds, made real first: a cast in configure_model
        # then casts their values, as eagerly (module.to gives a deferred buffer a new
        # meta tensor, which no record fills); parameters and persistent buffers stay
        # deferred for the load to fill (a cast of those is recorded, or filled).
        unsaved = [
            s.path
            for s in deferred_slots(model)
            if s.kind == "buffer" and not s.persistent and s.tensor.is_floating_point()
        ]
        if unsaved:
            materialize_paths(model, unsaved, allow_uninitialized=args.allow_uninitialized)
    # Lightning's load_from_checkpoint resolves strict from strict_loading before it calls
    # configure_model: a value set there does not decide this load either.
    strict_loading = vars(model).get("_strict_loading")
    try:
        _configured(args, model, how, configure)
    finally:
        if vars(model).get("_strict_loading") != strict_loading:
            vars(model)["_strict_loading"] = strict_loading


def _configured(args: argparse.Namespace, model: torch.nn.Module, how: str, configure: Any) -> None:
    """Run ``configure``, the model's own ``configure_model``, as :func:`_configure` says."""
    from lightning_meta._cli._target import TargetError, user_code

    try:
        with (
            user_code(),  # what it prints goes to standard error
            torch.device("meta") if args.init == "meta" else contextlib.nullcontext(),
        ):
            configure()
    except KeyboardInterrupt:
        raise
    except MetaTensorError as e:
        raise TargetError(
            f"target {args.model!r}: its configure_model (the model built {how}) failed: {e}"
        ) from e
    except Exception as e:
        cause = f"{type(e).__name__}: {e}"
        if any(True for _ in model.parameters()) or any(True for _ in model.buffers()):
            sys.stderr.write(
                f"lightning-meta load-check: note: the configure_model of {args.model!r}, "
                f"which Lightning's load_from_checkpoint calls, raised {cause} (it may need a "
                "Trainer, where load_from_checkpoint fails); the checkpoint is loaded into the "
                "module as it stands: its __init__'s layers, and what configure_model changed "
                "before it raised.\n"
            )
            return
        raise TargetError(
            f"target {args.model!r}: its configure_model, which load-check calls as "
            f"Lightning's load_from_checkpoint does, raised {cause}, and its __init__ builds "
            "no layer. Fix: if it needs a Trainer (self.device_mesh, self.trainer), point "
            "TARGET at a function returning the nn.Module configure_model assigns (such as "
            "self.model), built unsharded: def build(): return Net(); load-check finds the "
            "checkpoint's prefix (or pass --prefix)."
        ) from e
    except BaseException as e:  # sys.exit(...), the user's own BaseException subclasses
        raise TargetError(
            f"target {args.model!r}: its configure_model raised {type(e).__name__}"
            f"{f': {e}' if str(e) else ''}."
        ) from e
