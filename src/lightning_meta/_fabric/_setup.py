"""``fabric_setup``: ``fabric.setup`` for models built under ``deferred_init``, exactly.

Fabric materializes meta models with ``to_empty()`` + ``reset_parameters()``
(values that differ from eager construction) under sharded strategies, and
fails with "Cannot copy out of meta tensor" under the others. This module
replays the deferred record at the point each strategy needs real tensors:

- single device, DDP (any strategy that moves a whole model): on
  ``fabric.device`` before ``fabric.setup``; optimizers built on the deferred
  parameters are pointed at the real ones;
- ``ModelParallelStrategy`` (FSDP2 / tensor parallel): buffers before
  ``fabric.setup`` (its precision casts them before ``parallelize_fn``), the
  rest right after the user's ``parallelize_fn``, shard by shard (the
  strategy instance's function is wrapped for the length of the call only);
  Fabric's own materializer then finds no meta tensor and does nothing;
- ``FSDPStrategy`` (FSDP1): through torch's ``param_init_fn``, unit by unit.

Fabric is never imported: the strategy is recognised by its class names (from
the ``lightning`` or the standalone ``lightning_fabric`` package), so this
module stays in the torch-only core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_meta._arguments import check_flag
from lightning_meta._deferred._escaped import escaped_site
from lightning_meta._deferred._handles import deferred_slots, handle_of, made_for
from lightning_meta._deferred._identity import stale_reason
from lightning_meta._deferred._materialize import (
    DrawOn,
    check_draw_on,
    converted_batchnorm,
    converted_batchnorm_message,
    materialize,
    materialize_paths,
    refuse_recast,
)
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError, MaterializationError
from lightning_meta._guard._find import find_meta_tensors
from lightning_meta._guard._materialize import (
    deepspeed_refusal,
    fsdp_param_init_fn,
    refuse_left,
    refuse_strays,
)
from lightning_meta._slots import iter_slots

__all__ = ["fabric_setup"]

# Strategies come from the ``lightning`` package or the standalone ``lightning_fabric`` one.
_LIGHTNING_PACKAGES = ("lightning.", "lightning_fabric.")


def fabric_setup(
    fabric: Any,
    module: nn.Module,
    *optimizers: torch.optim.Optimizer,
    draw_on: DrawOn = "cpu",
    allow_uninitialized: bool = False,
    **setup_kwargs: Any,
) -> Any:
    """``fabric.setup(module, *optimizers, **setup_kwargs)`` for a model built under ``deferred_init``.

    The deferred tensors of ``module`` become real with the exact values of
    eager construction with the same seed, under every strategy that
    supports it, and Fabric then sets the model up as usual:

    - single device and DDP: materialized on ``fabric.device`` first;
      optimizers created on the deferred parameters are pointed at the real
      ones (their ``param_groups`` are updated in place);
    - ``ModelParallelStrategy``: materialized right after your
      ``parallelize_fn`` (``fully_shard``, ``parallelize_module``), each rank
      filling only its own shards; create the optimizers afterwards, as
      FSDP2 requires;
    - ``FSDPStrategy`` (FSDP1): materialized unit by unit as FSDP wraps it.

    Real tensors are never re-initialised. A model without deferred tensors
    is passed to ``fabric.setup`` unchanged.

    Args:
        fabric: a launched ``lightning.fabric.Fabric``.
        module: the model, built under :func:`deferred_init` (possibly inside
            ``fabric.init_module()``).
        *optimizers: optimizers to set up with it (not under
            ``ModelParallelStrategy`` or ``FSDPStrategy`` when they hold
            deferred parameters: create those after this call and set them
            up with ``fabric.setup_optimizers``).
        draw_on: as in :func:`materialize`: ``"cpu"`` (default) gives the
            values of a model built on the CPU and moved, ``"device"`` those
            of a model built on ``fabric.device`` (inside
            ``fabric.init_module()`` on an accelerator).
        allow_uninitialized: as in :func:`materialize`: tensors the model
            leaves uninitialised (``torch.empty`` never filled) get
            uninitialised memory instead of a ``MaterializationError``.
        **setup_kwargs: passed to ``fabric.setup`` (``scheduler``,
            ``move_to_device``, ...). With ``move_to_device=False``, single
            device and DDP materialize on the CPU (where eager construction
            outside ``fabric.init_module()`` leaves the model), and
            ``draw_on="device"`` is refused.

    Returns:
        What ``fabric.setup`` returns: the wrapped module, or a tuple of it,
        the optimizers and the scheduler.

    Raises:
        ArgumentTypeError: ``fabric`` is not a Fabric, ``module`` is not
            an ``nn.Module``, or ``allow_uninitialized`` is not a bool.
        ArgumentValueError: ``draw_on="device"`` with ``move_to_device=False``.
        MetaTensorError: a meta parameter or buffer of ``module`` was not
            built under ``deferred_init`` (before anything is allocated).
        MaterializationError: the strategy is DeepSpeed, an optimizer holds
            deferred parameters that cannot be carried over (or tensors a
            ``load_state_dict``, such as ``fabric.load_raw``'s, replaced),
            or :func:`materialize` refuses a tensor.

    Example::

        >>> import torch, lightning as L, lightning_meta as lm
        >>> fabric = L.Fabric(accelerator="cpu", devices=1)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> with lm.deferred_init():
        ...     net = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> net, optimizer = lm.fabric_setup(fabric, net, optimizer)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> torch.equal(net.weight, torch.nn.Linear(4, 2).weight)
        True
    """
    strategy = _check(fabric, module)
    check_flag(allow_uninitialized, "allow_uninitialized", "fabric_setup")
    check_draw_on(draw_on, "fabric_setup")
    _refuse_stale_optimizers(optimizers)
    _refuse_meta_optimizer_state(optimizers)
    names = _class_names(strategy)
    owner = type(module).__name__
    if "DeepSpeedStrategy" in names:
        _refuse_deepspeed(module)
    if not _has_meta(module) and not any(f.deferred for f in find_meta_tensors(module)):
        # (deferred tensors can be held outside the tree too: a module in a list)
        return fabric.setup(module, *optimizers, **setup_kwargs)
    _refuse_converted_batchnorm(module)
    slots = list(iter_slots(module))
    refuse_recast(slots, "fabric_setup", slots)
    if "ModelParallelStrategy" in names:
        _refuse_meta_optimizers(optimizers, "ModelParallelStrategy")
        refuse_strays(module, owner)
        _materialize_buffers(module, strategy.root_device, draw_on, allow_uninitialized)
        with _materialize_after_parallelize(strategy, draw_on, allow_uninitialized):
            return fabric.setup(module, *optimizers, **setup_kwargs)
    if "FSDPStrategy" in names:
        _refuse_meta_optimizers(optimizers, "FSDPStrategy")
        refuse_strays(module, owner)
        with _param_init_fn(strategy, draw_on, allow_uninitialized):
            return fabric.setup(module, *optimizers, **setup_kwargs)
    device = _plain_device(fabric, draw_on, setup_kwargs)
    refuse_strays(module, owner)
    _check_optimizers(module, optimizers)
    old = {id(p): path for path, p in _parameters(module)}
    materialize(module, device=device, draw_on=draw_on, allow_uninitialized=allow_uninitialized)
    refuse_left(module, owner)
    _repoint(optimizers, old, dict(_parameters(module)))
    return fabric.setup(module, *optimizers, **setup_kwargs)


def _refuse_converted_batchnorm(module: nn.Module) -> None:
    """Refuse a model converted to SyncBatchNorm after its block, naming the two orders that work."""
    plain = [s for s in iter_slots(module) if s.tensor.is_meta and handle_of(s.tensor) is None]
    converted = converted_batchnorm(plain, module.modules())
    if converted:
        raise MaterializationError(
            converted_batchnorm_message("fabric_setup", converted), paths=converted
        )


def _materialize_buffers(
    module: nn.Module, device: torch.device, draw_on: DrawOn, allow_uninitialized: bool
) -> None:
    """Make the deferred buffers real before ``fabric.setup`` (``ModelParallelStrategy``).

    Fabric casts the model with its precision (``bf16-true``: ``module.to(
    torch.bfloat16)``) before ``parallelize_fn``. On meta, that replaces each
    floating-point buffer by a new meta tensor, which no record gives values
    for; a real buffer is cast as eager's is (a float32 ``inv_freq`` of a
    rotary embedding becomes bf16). Parameters keep their objects through the
    cast, and ``fully_shard`` and the tensor parallel styles shard parameters,
    not buffers, so only these are made real early; ``fully_shard`` moves
    buffers to the device, where they are made.
    """
    names = [s.path for s in deferred_slots(module) if s.kind == "buffer"]
    if names:
        materialize_paths(
            module, names, device=device, draw_on=draw_on, allow_uninitialized=allow_uninitialized
        )


def _check(fabric: Any, module: nn.Module) -> Any:
    if not isinstance(module, nn.Module):
        raise ArgumentTypeError(
            f"fabric_setup got module={type(module).__name__}; expected the torch.nn.Module "
            "built under deferred_init. Fix: pass fabric_setup(fabric, model, *optimizers)."
        )
    strategy = getattr(fabric, "strategy", None)
    if strategy is None or not callable(getattr(fabric, "setup", None)):
        raise ArgumentTypeError(
            f"fabric_setup got fabric={type(fabric).__name__}; expected a "
            "lightning.fabric.Fabric. Fix: pass fabric_setup(fabric, model, *optimizers)."
        )
    return strategy


def _class_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__ if c.__module__.startswith(_LIGHTNING_PACKAGES)}


def _plain_device(fabric: Any, draw_on: DrawOn, setup_kwargs: dict[str, Any]) -> torch.device:
    """Where single device and DDP materialize: ``fabric.device``, or the CPU if the model stays."""
    if setup_kwargs.get("move_to_device", True):
        return torch.device(fabric.device)
    if draw_on == "device":
        raise ArgumentValueError(
            "fabric_setup got draw_on='device' with move_to_device=False: the model stays where "
            "it is, on the CPU for a deferred model, so no device generator can draw its values. "
            "Fix: drop move_to_device=False, or pass draw_on='cpu'."
        )
    return torch.device("cpu")


def _has_meta(module: nn.Module) -> bool:
    return any(s.tensor.is_meta for s in iter_slots(module))


def _parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return module.named_parameters(remove_duplicate=True)


def _refuse_deepspeed(module: nn.Module) -> None:
    if _has_meta(module):
        raise MaterializationError(
            deepspeed_refusal(
                f"fabric_setup cannot materialize {type(module).__name__}",
                "use ModelParallelStrategy (FSDP2) for sharded training, or, for ZeRO stage 1 "
                "or 2, call lm.materialize(model) before fabric.setup.",
            )
        )


def _refuse_stale_optimizers(optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
    """Refuse optimizers holding tensors a load or materialize left behind, before any step.

    An optimizer built on the deferred model before ``fabric.load_raw`` (or
    ``load_state_dict``) holds the meta tensors it replaced by new objects,
    where eager's load copies into the old ones; its first step would raise.
    """
    for i, opt in enumerate(optimizers):
        stale = [r for g in opt.param_groups for p in g["params"] if (r := stale_reason(p))]
        if stale:
            paths = sorted(path for path, _, _ in stale)
            _, why, by = stale[0]
            after, other = by, ""
            if by == "load_state_dict":
                after = "load_state_dict (or fabric.load_raw, which calls it)"
                other = (
                    ", or load with lm.load_checkpoint(model, path) (strict=False for a "
                    "partial checkpoint), which keeps the module's tensor objects"
                )
            fix = f"create the optimizer after {after}, from model.parameters(){other}"
            if opt.state:
                # Its state may have come from the same load (fabric.load of model and
                # optimizer), which a new optimizer would drop silently; or from its
                # own constructor (Adagrad's): the fix above then applies.
                fix += (
                    ". If its state came from that same load (fabric.load(path, {'model': "
                    "model, 'optimizer': optimizer})), a new optimizer would drop it: to "
                    "resume both, create the model (deferred is fine) and the optimizer from "
                    "model.parameters(), call lm.fabric_setup(fabric, model, optimizer), "
                    "then fabric.load"
                )
            raise MaterializationError(
                f"fabric_setup got optimizer {i} ({type(opt).__name__}) holding {len(stale)} "
                f"tensors that stood for {paths} before {by}, which it was created before: "
                f"{why}, so they hold no values and its first step would fail. Fix: {fix}.",
                paths=paths,
            )


def _refuse_meta_optimizers(optimizers: tuple[torch.optim.Optimizer, ...], strategy: str) -> None:
    held = [
        i
        for i, opt in enumerate(optimizers)
        if next(_meta_params(opt.param_groups), None) is not None
    ]
    if held:
        raise MaterializationError(
            f"fabric_setup got optimizers {held} (by position) holding deferred parameters, "
            f"but {strategy} replaces every parameter when it shards the model, so they would "
            "train nothing. Fix: model = lm.fabric_setup(fabric, model), then create the "
            "optimizer from model.parameters() and call fabric.setup_optimizers(optimizer)."
        )


def _meta_params(groups: list[dict[str, Any]]) -> Iterator[torch.Tensor]:
    for group in groups:
        for p in group["params"]:
            if isinstance(p, torch.Tensor) and p.is_meta:
                yield p


def _check_optimizers(module: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
    """Refuse optimizers whose meta parameters cannot be pointed at real ones."""
    own = {id(p) for _, p in _parameters(module) if handle_of(p) is not None}
    for i, opt in enumerate(optimizers):
        inside = [p for g in opt.param_groups for p in g["params"] if escaped_site(p) is not None]
        if inside:
            # The block's own fake parameters, which it replaced on the modules by
            # deferred ones: nothing can repoint them, and steps on them do nothing.
            raise MaterializationError(
                f"fabric_setup got optimizer {i} ({type(opt).__name__}) created inside the "
                f"deferred_init block, at {escaped_site(inside[0])}: it holds {len(inside)} "
                "tensors of the block, not the model's deferred parameters. Fix: create the "
                "optimizer after the block, from model.parameters()."
            )
        stray = [p for p in _meta_params(opt.param_groups) if id(p) not in own]
        if stray:
            raise MaterializationError(_stray_message(i, opt, module, stray))
        stateful = [p for p in opt.state if isinstance(p, torch.Tensor) and p.is_meta]
        if stateful:
            raise MaterializationError(
                f"fabric_setup got optimizer {i} ({type(opt).__name__}) with state for "
                f"{len(stateful)} deferred parameters (it has stepped on meta tensors, or "
                "its state was loaded while they were meta). Fix: create the optimizer fresh, "
                "before any step; to resume, load its state after fabric_setup."
            )


def _refuse_meta_optimizer_state(optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
    """Refuse optimizers whose state is on meta for parameters that are real now.

    ``Optimizer.load_state_dict`` moves the state to each parameter's device:
    loaded while the parameters were meta (``fabric.load`` before the model was
    filled), it stays meta once they are real, and the first step fails with
    torch's device error.
    """
    for i, opt in enumerate(optimizers):
        meta = [
            p
            for p, state in opt.state.items()
            if not (isinstance(p, torch.Tensor) and p.is_meta)
            and isinstance(state, dict)
            and any(isinstance(v, torch.Tensor) and v.is_meta for v in state.values())
        ]
        if meta:
            raise MaterializationError(
                f"fabric_setup got optimizer {i} ({type(opt).__name__}) whose state is on meta "
                f"for {len(meta)} parameters that have data: it was loaded "
                "(Optimizer.load_state_dict, fabric.load) while they were meta, which moves "
                "the state there, or made by its constructor on them (Adagrad's), and the "
                "first step would fail. Fix: load the optimizer's "
                "state after the model has data (lm.load_checkpoint(model, path) or "
                "lm.fabric_setup(fabric, model) first, then "
                "fabric.load(path, {'optimizer': optimizer})); an optimizer whose constructor "
                "makes state: create it from model.parameters() once they have data."
            )


def _stray_message(
    i: int, opt: torch.optim.Optimizer, module: nn.Module, stray: list[torch.Tensor]
) -> str:
    """Why optimizer ``i``'s meta parameters outside ``module``'s deferred ones cannot become real."""
    what = f"fabric_setup got optimizer {i} ({type(opt).__name__}) holding {len(stray)} meta parameters"
    name = type(module).__name__
    # Each model set up first, then one optimizer over all of them: what works
    # for an optimizer that spans several models (a GAN's, a shared one).
    spanning = (
        "Fix: set up every model it trains first (a = lm.fabric_setup(fabric, a), then "
        "b = lm.fabric_setup(fabric, b)), then create the optimizer from their parameters "
        "and call fabric.setup_optimizers(optimizer)."
    )
    if any(made_for(p) is not None for p in stray):
        return (
            f"{what} that were materialized elsewhere (by an earlier fabric_setup, materialize "
            "or load): it was created before, and holds references that still have no data "
            f"while real tensors took their places. {spanning}"
        )
    if any(handle_of(p) is not None for p in stray):
        return (
            f"{what} that are deferred parameters of another model than {name} (an optimizer "
            "spanning several models): fabric_setup materializes only the model it is given, "
            f"so the others would stay without data. {spanning}"
        )
    return (
        f"{what} that are not deferred parameters of {name}: they cannot become real. "
        "Fix: create the optimizer from model.parameters() of the model you pass."
    )


def _repoint(
    optimizers: tuple[torch.optim.Optimizer, ...],
    old: dict[int, str],
    new: dict[str, nn.Parameter],
) -> None:
    """Point each optimizer's deferred parameters at the real ones now in their places."""
    for opt in optimizers:
        for group in opt.param_groups:
            # In place: optimizers keep the list itself too (LBFGS's ``_params``).
            group["params"][:] = [new[old[id(p)]] if id(p) in old else p for p in group["params"]]


def _private(strategy: Any, name: str, what: str, fix: str) -> Any:
    """Read a private attribute of a Lightning strategy (the only place this module does).

    Lightning 2.4 to 2.6 keep ``_parallelize_fn`` and ``_fsdp_kwargs`` there; a
    later version may not, and then the fallback is named instead of failing
    with an ``AttributeError``.
    """
    value = getattr(strategy, name, None)
    if value is None:
        raise MaterializationError(
            f"fabric_setup cannot find the {what} of {type(strategy).__name__} "
            f"(strategy.{name}) in this Lightning version. Fix: {fix}"
        )
    return value


@contextmanager
def _materialize_after_parallelize(
    strategy: Any, draw_on: DrawOn, allow_uninitialized: bool
) -> Iterator[None]:
    """Wrap the strategy instance's ``parallelize_fn`` so materialize runs right after it."""
    original: Callable[..., nn.Module] = _private(
        strategy,
        "_parallelize_fn",
        "parallelize_fn",
        "call lm.materialize(model, device=fabric.device) as the last step of your "
        "parallelize_fn and use fabric.setup as usual; under a precision that casts "
        "the model (bf16-true, 16-true), which Fabric does before parallelize_fn, first "
        "make the modules holding floating-point buffers (a rotary inv_freq) real before "
        "fabric.setup, as fabric_setup does: lm.materialize(model.get_submodule(path)) "
        "for each (the whole model where it holds one itself).",
    )

    def parallelize(module: nn.Module, mesh: Any) -> nn.Module:
        out = original(module, mesh)
        if isinstance(out, nn.Module):
            materialize(
                out,
                device=strategy.root_device,
                draw_on=draw_on,
                allow_uninitialized=allow_uninitialized,
            )
            refuse_left(out)
        return out

    had = "_parallelize_fn" in vars(strategy)
    strategy._parallelize_fn = parallelize
    try:
        yield
    finally:
        if had:
            strategy._parallelize_fn = original
        else:  # pragma: no cover (Fabric sets it in __init__)
            del strategy._parallelize_fn


@contextmanager
def _param_init_fn(strategy: Any, draw_on: DrawOn, allow_uninitialized: bool) -> Iterator[None]:
    """Hand FSDP1 a ``param_init_fn`` that replays each unit, for the length of the call."""
    kwargs: dict[str, Any] = _private(
        strategy,
        "_fsdp_kwargs",
        "FSDP keyword arguments",
        "call lm.materialize(model, device=fabric.device) before fabric.setup (each rank "
        "then holds the whole model until FSDP shards it).",
    )
    if kwargs.get("param_init_fn") is not None:
        raise MaterializationError(
            "fabric_setup cannot install its param_init_fn: FSDPStrategy already has one, "
            "which would re-initialise the replayed weights. Fix: drop param_init_fn from "
            "FSDPStrategy, or materialize the model yourself in it."
        )
    had = "param_init_fn" in kwargs
    kwargs["param_init_fn"] = fsdp_param_init_fn(strategy.root_device, draw_on, allow_uninitialized)
    try:
        yield
    finally:
        if had:
            kwargs["param_init_fn"] = None
        else:
            kwargs.pop("param_init_fn", None)
