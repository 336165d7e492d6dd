"""Materialize a deferred model where a strategy needs it: whole, shard by shard, or unit by unit.

Torch only; the Lightning callback in ``_guard`` decides when to call these.
The sequence (torchtitan's meta -> shard -> materialize) is:

1. refuse meta parameters and buffers that were never deferred
   (:func:`refuse_strays`), before anything is allocated;
2. replay the deferred tensors that are plain tensors on the root device
   (:func:`materialize_model`);
3. for parameters ``fully_shard`` (FSDP2) turned into meta ``DTensor``\\ s:
   the public ``materialize`` allocates only the local shards, then replays
   each full tensor in turn and copies this rank's shard out of it. Peak
   memory is the shards plus one full tensor.

For FSDP1 (``strategy="fsdp"``), torch materializes a wrapped unit at a time
through ``param_init_fn``; :func:`fsdp_param_init_fn` replays the deferred
tensors of each module it is given.
"""

from __future__ import annotations

import collections
import logging
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_meta._deferred._handles import (
    deferred_slots,
    handle_of,
    handles_of,
    on_meta_on_purpose,
)
from lightning_meta._deferred._materialize import (
    DrawOn,
    materialize_beyond,
    materialize_paths,
    outer_meta_refusal,
    refuse_replaced,
    sharded_slots,
)
from lightning_meta._deferred._reach import MAX_DEPTH, MAX_ITEMS
from lightning_meta._errors import MetaTensorError
from lightning_meta._guard._find import (
    MetaFinding,
    count_meta,
    explain,
    find_meta_tensors,
    first_paths,
)
from lightning_meta._slots import buffer_names, iter_slots, parameter_names, tensor_at

__all__ = [
    "deepspeed_refusal",
    "fsdp_param_init_fn",
    "materialize_model",
    "refuse_left",
    "refuse_strays",
]

logger = logging.getLogger(__name__)

REACHES = (
    "Lightning would fail on them when it moves the model to the device, wraps it for "
    "distributed training, builds the optimizer or saves a checkpoint; forward fails on "
    "any of them it uses (a plain tensor attribute is not moved by Lightning either)."
)


def deepspeed_refusal(what: str, fix: str) -> str:
    """The message refusing DeepSpeed (MetaGuard and ``fabric_setup``): ``what`` cannot, why, ``fix``."""
    return (
        f"{what} under DeepSpeedStrategy: DeepSpeed partitions and initialises parameters its "
        "own way (ZeRO stage 3 builds them inside deepspeed.zero.Init), which the deferred "
        f"record does not reach, so exact values cannot be promised. Fix: {fix}"
    )


# What LightningModule.save_hyperparameters keeps: copied into checkpoints (which
# MetaGuard checks when they are saved), never computed with by forward.
HYPERPARAMETERS = frozenset({"_hparams", "_hparams_initial"})


def strays(module: nn.Module) -> list[MetaFinding]:
    """Return the meta tensors of ``module`` that no replay can fill and training would touch.

    Parameters, buffers and plain tensor attributes of the module tree (forward
    uses those as data). Modules held outside the tree in a plain container
    (``self.templates = [net]``) are left alone: Lightning never sees them, and
    ``torch.func.functional_call`` runs them with real tensors.
    """
    return [
        f
        for f in find_meta_tensors(module)
        if f.kind in ("parameter", "buffer", "attribute")
        and not f.deferred
        and not f.hidden
        and f.path.split(".", 1)[0] not in HYPERPARAMETERS
    ]


def refuse_strays(module: nn.Module, owner: str | None = None) -> None:
    """Raise :class:`MetaTensorError` naming every meta parameter or buffer that was not deferred.

    One that took a deferred tensor's place after the block (``module.to(torch.bfloat16)``
    casting a buffer), or that a weight utility made from deferred ones there
    (``prune``, a parametrization), gets :func:`materialize`'s message, which names the
    cause; any other next to deferred tensors is told to be made inside the block or
    after materialize, rather than to build the module inside ``deferred_init``, which
    it was.
    """
    found = strays(module)
    if found:
        paths = {f.path for f in found}
        slots = list(iter_slots(module))
        # A block entered inside torch.device("meta") made these (torch.tensor(5) there is a
        # plain meta tensor): the context is the cause to name, not the strays.
        outer = [
            s.path for s in slots if (h := handle_of(s.tensor)) is not None and h.record.outer_meta
        ]
        if outer:
            raise outer_meta_refusal([*outer, *paths])
        purposed = sorted(s.path for s in slots if s.path in paths and on_meta_on_purpose(s))
        if purposed and len(purposed) == len(paths):
            raise MetaTensorError(
                f"{owner or type(module).__name__} holds {purposed}, made on the meta device "
                "inside its deferred_init block (device='meta', or a torch.device('meta') "
                "context inside the block), which eager construction leaves without values "
                "too; Lightning would fail on them. Fix: build them without the meta device "
                "(deferred_init already keeps the model on meta until it is materialized), or "
                "keep such a module as lightning_meta.MetaTemplate(module), which Lightning "
                "never sees.",
                paths=purposed,
            )
        refuse_replaced(s for s in slots if s.path in paths)
        beside = any(s.path not in paths and handle_of(s.tensor) is not None for s in slots)
        raise explain(found, owner or type(module).__name__, REACHES, beside_deferred=beside)


def refuse_left(
    module: nn.Module,
    owner: str | None = None,
    *,
    only_deferred: bool = False,
) -> None:
    """Raise :class:`MetaTensorError` naming every tensor materializing left without data.

    After :func:`materialize_model` (or ``fabric_setup``'s materialize),
    nothing deferred may be left anywhere ``module`` reaches, nor any meta
    tensor in its tree: a CPU matmul with a meta weight returns uninitialised
    memory instead of raising. Meta tensors of modules kept outside the tree
    that were never deferred (a template in a list, on purpose) stay.
    ``only_deferred``: refuse only deferred tensors (the ``check`` command
    reports the rest itself).
    """
    found = find_meta_tensors(module)
    left = [
        f
        for f in found
        if f.problem
        and (f.deferred or (not only_deferred and (f.escaped is not None or not f.hidden)))
        and f.path.split(".", 1)[0] not in HYPERPARAMETERS
    ]
    if not left:
        return
    name = owner or type(module).__name__
    lines = ["They were left without data after materializing; training would compute with them."]
    reasons = [r for f in left if f.deferred for r in [_why_left(module, f.path)] if r]
    lines += [f"  {why}" for why in dict.fromkeys(why for why, _ in reasons)]
    fixes = [fix for _, fix in reasons]
    if fixes:
        lines.append(
            "Fix: " + "; ".join(dict.fromkeys(fixes)) + " before the run (or hold the module as "
            f"a submodule, or in a list, tuple or dict attribute at most {MAX_DEPTH} containers "
            f"deep with at most {MAX_ITEMS} items, where materialize reaches it)."
        )
    raise explain(left, name, "\n".join(lines), left=True)


def refuse_hyperparameters(module: nn.Module, owner: str) -> None:
    """Raise :class:`MetaTensorError` for meta tensors ``save_hyperparameters`` kept.

    Left out of :func:`refuse_left` (a checkpoint's copy, never a layer's), but a
    forward may compute with them (``x @ self.hparams.proj``: uninitialised memory
    on the CPU), and every checkpoint would save them: refused before the first
    step, as ``lightning-meta check`` reports them.
    """
    kept = {name: vars(module)[name] for name in sorted(HYPERPARAMETERS) if name in vars(module)}
    found = [
        f
        for f in (find_meta_tensors(kept) if kept else [])
        # a module's own (a template passed to __init__ and saved with the rest) is
        # computed with through torch.func, not read: the checkpoint's save refuses it
        if f.kind in ("tensor", "attribute")
    ]
    if found:
        raise MetaTensorError(
            f"{owner} holds {count_meta(found)} in its hyperparameters ({first_paths(found)}), "
            "which hold no data: a forward reading them "
            "(self.hparams....) computes with uninitialised memory on the CPU, and every "
            "checkpoint would save them. Fix: pass a real tensor to save_hyperparameters, or "
            "leave it out (save_hyperparameters(ignore=[...])).",
            paths=[f.path for f in found],
        )


def _why_left(root: nn.Module, path: str) -> tuple[str, str] | None:
    """Why materialize did not reach the deferred tensor at ``path``, and the call that fills it.

    Follows ``path`` (as :func:`find_meta_tensors` writes it) from ``root``; a dict key
    with a dot in it is matched whole. Where the path goes through what no
    expression reaches (a closure's variable, a set's item, a partial's argument),
    the call names ``<that module>``.
    """
    node: Any = root
    expr = "model"
    module_expr = None
    containers = 0
    reason = None
    parts = path.split(".")
    i = 0
    while i < len(parts) - 1:
        part = parts[i]
        step = 1
        if isinstance(node, nn.Module):
            module_expr, containers = expr, 0
            children = dict(node.named_children())
            child = children[part] if part in children else vars(node).get(part)
            expr = f"{expr}.{part}"
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            containers += 1
            reason = reason or _too_long(node, expr)
            child, expr = node[int(part)], f"{expr}[{part}]"
        elif isinstance(node, collections.deque) and part.isdigit() and int(part) < len(node):
            reason = reason or _not_searched(node, expr)
            child, expr = node[int(part)], f"{expr}[{part}]"
        elif isinstance(node, dict):
            # The longest run of the remaining parts that is a key ("enc.0" is one key).
            named = {str(k): k for k in node}
            step = next(
                (
                    n
                    for n in range(len(parts) - 1 - i, 0, -1)
                    if ".".join(parts[i : i + n]) in named
                ),
                0,
            )
            if not step:
                return None
            key = named[".".join(parts[i : i + step])]
            containers += 1
            reason = reason or _too_long(node, expr)
            child, expr = node[key], f"{expr}[{key!r}]"
        else:
            reason = reason or _not_searched(node, expr)
            child = _attribute(node, part)
            if part.startswith("<") or child is _UNREACHED:
                # A closure's variable, a default argument, a set's item, a partial's
                # argument: no expression reaches it.
                return (f"{path!r}: {reason}", "lightning_meta.materialize(<that module>)")
            expr = f"{expr}.{part}"
        if containers > MAX_DEPTH and reason is None:
            reason = (
                f"it is held {containers} lists, tuples or dicts deep below {module_expr}, and "
                f"materialize looks at most {MAX_DEPTH} deep"
            )
        node = child
        i += step
    if reason is None or not isinstance(node, nn.Module):
        return None
    return (f"{expr}: {reason}", f"lightning_meta.materialize({expr})")


_UNREACHED = object()


def _attribute(node: Any, name: str) -> Any:
    """``node``'s attribute ``name`` as ``find_meta_tensors`` read it, without running a
    property; ``_UNREACHED`` where an expression ``node.name`` would not give it."""
    try:
        value = vars(node).get(name, _UNREACHED)
    except TypeError:  # no __dict__: a __slots__ object, a bound method
        value = _UNREACHED
    if value is _UNREACHED and isinstance(node, types.MethodType) and name == "__self__":
        value = node.__self__
    if value is _UNREACHED:
        for klass in type(node).__mro__:
            slot = klass.__dict__.get(name)
            if isinstance(slot, types.MemberDescriptorType):
                value = getattr(node, name, _UNREACHED)
                break
    return value


def _not_searched(node: Any, expr: str) -> str:
    return (
        f"{expr} is a {type(node).__name__} object, and materialize searches only "
        "modules, lists, tuples and dicts"
    )


def _too_long(node: Any, expr: str) -> str | None:
    if len(node) <= MAX_ITEMS:
        return None
    return (
        f"{expr} holds {len(node)} items, and materialize does not search "
        f"containers of more than {MAX_ITEMS} items"
    )


def materialize_model(
    module: nn.Module,
    device: torch.device,
    *,
    on_device: frozenset[int] = frozenset(),
    allow_uninitialized: bool = False,
) -> int:
    """Materialize every deferred tensor of ``module`` on ``device``; return how many.

    Args:
        module: the model, possibly with parameters sharded by ``fully_shard``.
        device: the root device of this process.
        on_device: ``id``\\ s of deferred tensors built directly on ``device``
            (in ``configure_model`` under Lightning's device context); they
            are replayed with that device's generator, like eager construction
            there. Others are drawn on the CPU and moved, like a model built
            in ``__init__`` and moved by Lightning.
        allow_uninitialized: see :func:`~lightning_meta.materialize`.
    """
    refuse_strays(module)
    # Sharded ones first: materializing the plain ones drops every handle
    # whose slot now holds another tensor (the DTensors) as stale.
    sharded = sharded_slots(module)
    if sharded:
        materialize_paths(
            module,
            [s.path for s in sharded],
            device=device,
            allow_uninitialized=allow_uninitialized,
        )
    count = len(sharded)
    plain = deferred_slots(module)
    for draw_on in ("cpu", "device"):
        names = [s.path for s in plain if (id(s.tensor) in on_device) == (draw_on == "device")]
        if names:
            materialize_paths(
                module,
                names,
                device=device,
                draw_on=draw_on,
                allow_uninitialized=allow_uninitialized,
            )
            count += len(names)
    materialize_beyond(
        module, device=device, on_device=on_device, allow_uninitialized=allow_uninitialized
    )
    refuse_left(module)
    logger.debug("MetaGuard materialized %d deferred tensors on %s", count, device)
    return count


def fsdp_param_init_fn(
    device: torch.device, draw_on: DrawOn = "cpu", allow_uninitialized: bool = False
) -> Callable[[nn.Module], None]:
    """Return a ``param_init_fn`` for torch's ``FullyShardedDataParallel`` (FSDP1).

    FSDP1 calls it on each module of a unit that holds meta tensors, right
    before flattening and sharding that unit; it replays the module's own
    deferred tensors on ``device`` (drawing as ``draw_on`` says, see
    :func:`~lightning_meta.materialize`, as ``allow_uninitialized``) and
    refuses any other meta tensor (which FSDP would otherwise
    ``reset_parameters()`` into different values).
    """

    def init(module: nn.Module) -> None:
        tensors = {
            n: tensor_at(module, n) for n in (*parameter_names(module), *buffer_names(module))
        }
        own = [n for n, t in tensors.items() if t is not None and t.is_meta]
        own += [n for n in handles_of(module) if n not in own]
        held = {n: tensor_at(module, n) for n in own}
        deferred = [n for n, t in held.items() if t is not None and handle_of(t) is not None]
        if len(deferred) != len([n for n, t in held.items() if t is not None and t.is_meta]):
            refuse_strays(module)
        if deferred:
            materialize_paths(
                module,
                deferred,
                device=device,
                draw_on=draw_on,
                allow_uninitialized=allow_uninitialized,
            )

    return init
