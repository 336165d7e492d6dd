"""Bring the optimizer of a simulated step to its steady state: as after a previous step.

A training step in steady state starts with the optimizer's state (Adam's
moments, SGD's momentum) and, in Lightning's loop, last step's gradients
alive; both weigh as much as the parameters, so the step is simulated from
there rather than from a fresh optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._arguments import describe
from lightning_meta._compat import FakeTensor, FakeTensorMode
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError
from lightning_meta._estimate._options import OptimizerFactory

__all__ = ["prepare_optimizer", "state_tensors", "trainable_parameters"]


def trainable_parameters(state: dict[str, torch.Tensor]) -> list[nn.Parameter]:
    """Return the parameters of ``state`` that need gradients, each once, in order."""
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for t in state.values():
        if isinstance(t, nn.Parameter) and t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            params.append(t)
    return params


def state_tensors(optimizer: object) -> list[object]:
    """What ``optimizer`` keeps between steps: its ``state`` and that of the optimizers it
    holds (a wrapper stepping two; Lookahead's inner one), each optimizer once.

    An optimizer wrapper need not subclass ``Optimizer`` (Lightning's duck typing), and
    its own ``state`` may be empty while the optimizers it steps hold the moments:
    reading ``optimizer.state`` alone counted none of them (a review measured 1.18x the
    estimate for a wrapper over Adam and SGD, ``optimizer_state_bytes`` 0).
    """
    held: list[object] = []
    seen: set[int] = set()

    def walk(o: object) -> None:
        if id(o) in seen:
            return
        seen.add(id(o))
        state = getattr(o, "state", None)
        if isinstance(state, Mapping):
            held.extend(list(v.values()) if isinstance(v, Mapping) else v for v in state.values())
        for value in vars(o).values() if hasattr(o, "__dict__") else ():
            if isinstance(value, (list, tuple)):
                inner: Iterable[object] = value
            elif isinstance(value, dict):
                inner = value.values()
            else:
                inner = (value,)
            for i in inner:
                if _is_optimizer(i):
                    walk(i)

    walk(optimizer)
    return held


def _is_optimizer(o: object) -> bool:
    """An optimizer, by Lightning's duck typing: it steps and has ``param_groups``."""
    return callable(getattr(o, "step", None)) and isinstance(getattr(o, "param_groups", None), list)


def prepare_optimizer(
    params: list[nn.Parameter],
    *,
    mode: FakeTensorMode,
    device: torch.device,
    optimizer_factory: OptimizerFactory | None,
    zero_grad_before_forward: bool,
    model: nn.Module | None = None,
) -> torch.optim.Optimizer | None:
    """Bring optimizer and gradients to their steady state: as after a previous step.

    Args:
        params: the trainable fake parameters.
        mode: the step's ``FakeTensorMode``.
        device: the simulated device (it decides ``foreach``).
        optimizer_factory: builds the optimizer; ``None`` for none.
        zero_grad_before_forward: drop the previous step's gradients now
            (``loop="plain"``) instead of after the forward pass.
        model: the module estimated, to name its tensors in a refusal.

    Returns:
        The optimizer with its state created, or ``None``.
    """
    optimizer: torch.optim.Optimizer | None = None
    with mode:
        if optimizer_factory is not None and params:
            optimizer = optimizer_factory(params)
            _check_built_over(optimizer, params, optimizer_factory, model)
            _warm_up(optimizer, params, device)
            if zero_grad_before_forward:
                optimizer.zero_grad(set_to_none=True)
        elif zero_grad_before_forward or not params:
            for p in params:
                p.grad = None
        else:
            for p in params:
                p.grad = torch.zeros_like(p)
    return optimizer


def _check_built_over(
    optimizer: object,
    params: list[nn.Parameter],
    factory: OptimizerFactory,
    model: nn.Module | None,
) -> None:
    """Refuse an optimizer whose ``param_groups`` are not the stand-ins it was given.

    A factory that ignores its argument (``lambda p: model.configure_optimizers()``)
    returns an optimizer over the real parameters: its state would not be counted, and
    the simulated step would clear, or with weight decay change, the real tensors.
    Only ``param_groups`` is read: tensors an optimizer keeps elsewhere are its own.
    """
    # Duck typing, as Lightning's: an optimizer wrapper need not subclass Optimizer,
    # but it steps and has param_groups.
    groups = getattr(optimizer, "param_groups", None)
    if not callable(getattr(optimizer, "step", None)) or not isinstance(groups, list):
        raise ArgumentTypeError(
            f"estimate: optimizer {describe(factory)} returned {type(optimizer).__name__}, "
            "not an optimizer (one with step() and param_groups). Fix: pass a callable "
            "that takes the parameters and returns one optimizer, such as lambda params: "
            "torch.optim.AdamW(params, lr=1e-3)."
        )
    if not callable(getattr(optimizer, "zero_grad", None)):
        # Lightning's step calls it: without it the refusal blamed the model's backward
        raise ArgumentTypeError(
            f"estimate: optimizer {describe(factory)} returned {type(optimizer).__name__}, "
            "which has step() and param_groups but no zero_grad(), which Lightning's "
            "training step calls (as estimate's does). Fix: give it one, such as def "
            "zero_grad(self, set_to_none=True) calling the zero_grad of the optimizers it "
            "steps."
        )
    given = {id(p) for p in params}
    held = [t for g in groups if isinstance(g, dict) for t in g.get("params", ())]
    foreign = [t for t in held if id(t) not in given]
    if not foreign and held:
        return
    if foreign and all(isinstance(t, FakeTensor) for t in foreign):
        raise ArgumentValueError(
            f"estimate: optimizer {describe(factory)} was given the {len(params)} "
            f"parameters estimate simulates, and {len(foreign)} of the {len(held)} tensors "
            "its param_groups hold are tensors it made from them (float32 master copies, "
            "say), whose memory estimate does not count as the optimizer's state. Fix: "
            "estimate with the optimizer it wraps (such as optimizer='adamw') and add the "
            "copies' size (4 bytes per parameter for float32 copies)."
        )
    if foreign:
        names = {id(t): n for n, t in model.named_parameters()} if model is not None else {}
        first = foreign[0]
        shown = names.get(id(first))
        what = (
            f"{len(foreign)} of its {len(held)} tensors are not among them (the first: "
            + (f"the model's own {shown!r}" if shown else f"{tuple(first.shape)} on {first.device}")
            + ")"
        )
    else:
        what = "its param_groups hold none of them"
    raise ArgumentValueError(
        f"estimate: optimizer {describe(factory)} was given the {len(params)} "
        f"parameters estimate simulates, and {what}: it was built over other tensors "
        "(the model's own, from configure_optimizers() or a closure, or copies made on "
        "another device, as an offloading wrapper does), whose state estimate cannot "
        "count and whose values its simulated step would change; nothing was stepped. "
        "Fix: build "
        "the optimizer from the parameters the callable receives, such as lambda params: "
        "torch.optim.AdamW(params, lr=1e-3)."
    )


def _warm_up(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], device: torch.device
) -> None:
    """Create the optimizer's state with one step on zero gradients, as after a real first step.

    Fake parameters are ``FakeTensor`` instances, not ``Parameter``, so torch's
    default implementation choice (``foreach`` on CUDA, single-tensor on CPU)
    would always fall back to single-tensor; set what real parameters on
    ``device`` would get. The warm-up itself uses ``foreach``: its memory is
    not measured and it dispatches one operator per kind instead of one per
    parameter.
    """
    supported = _compat.foreach_supported_devices()
    real_default = device.type in supported
    chosen = []
    for group in optimizer.param_groups:
        # torch's foreach kernels refuse a tensor lr (or other hyperparameter) unless
        # capturable, and torch's default does not pick them then (adam's "Do not flip
        # on foreach"): such a group warms up and steps single-tensor.
        held = any(isinstance(v, torch.Tensor) for k, v in group.items() if k != "params")
        held = held and not group.get("capturable")
        if "foreach" in group and group["foreach"] is None and not group.get("fused"):
            group["foreach"] = real_default and not held
        chosen.append(group.get("foreach"))
        if "foreach" in group and not group.get("fused") and not held:
            group["foreach"] = True
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    finally:
        for group, foreach in zip(optimizer.param_groups, chosen, strict=False):
            if "foreach" in group:
                group["foreach"] = foreach
