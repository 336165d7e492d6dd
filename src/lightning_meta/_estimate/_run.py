"""Run one training step of a module on fake tensors and record FLOPs and live bytes.

The step is the one Lightning's automatic optimization runs, in steady state
(optimizer state and last step's gradients already exist)::

    out = model(*inputs)          # under autocast for "*-mixed" precision
    loss = loss_fn(out)
    optimizer.zero_grad()         # set_to_none, *after* the forward pass
    loss.backward()
    optimizer.step()

Everything runs under ``FakeTensorMode`` on the target device, so operators
take the same kernels (and the same SDPA backend) as the real model would,
while no storage of model size is ever allocated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_meta import _compat
from lightning_meta._compat import FakeTensorMode, KeywordModuleTracker, tree_leaves
from lightning_meta._estimate._options import OptimizerFactory, Precision
from lightning_meta._estimate._track import LiveBytes, UncountedFlops

__all__ = ["StepRecord", "fake_state", "simulate_step"]

LossFn = Callable[[Any], torch.Tensor]


@dataclass
class StepRecord:
    """What one simulated training step measured (FLOPs per module name, bytes)."""

    forward_flops: dict[str, int] = field(default_factory=dict)
    loss_flops: int = 0
    backward_flops: dict[str, int] = field(default_factory=dict)
    uncounted_forward: dict[str, int] = field(default_factory=dict)
    uncounted_backward: dict[str, int] = field(default_factory=dict)
    module_activations: dict[str, int] = field(default_factory=dict)
    activation_bytes: int = 0
    gradient_bytes: int = 0
    optimizer_state_bytes: int = 0
    input_bytes: int = 0
    peak_bytes: int = 0
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    peak_phase: str = ""
    # with ``block_prefix``: peak and breakdown per "phase|before/blocks/after" window
    window_peaks: dict[str, tuple[int, dict[str, int]]] = field(default_factory=dict)
    untracked_tensors: int = 0
    # where the step is, for error messages: stage and the modules entered
    stage: str = "setup"
    module_path: list[str] = field(default_factory=list)


def fake_state(
    module: nn.Module, mode: FakeTensorMode, device: torch.device, cast_to: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Return fake stand-ins, on ``device``, for every parameter and buffer of ``module``.

    Tensors shared under several names (tied weights) get one shared stand-in,
    so the step sees the same aliasing as the real model. ``cast_to`` converts
    floating tensors the way ``module.to(dtype)`` would.
    """
    state: dict[str, torch.Tensor] = {}
    made: dict[int, torch.Tensor] = {}
    with mode:
        for named in (module.named_parameters, module.named_buffers):
            for name, t in named(remove_duplicate=False):
                if id(t) not in made:
                    dtype = cast_to if cast_to is not None and t.is_floating_point() else t.dtype
                    fake = torch.empty_strided(
                        t.shape, t.stride(), dtype=dtype, device=device
                    ) if t.is_contiguous() else torch.empty(t.shape, dtype=dtype, device=device)
                    if isinstance(t, nn.Parameter):
                        fake = nn.Parameter(fake, requires_grad=t.requires_grad)
                    made[id(t)] = fake
                state[name] = made[id(t)]
    return state


def _per_module(counts: dict[str, dict[Any, int]], root: str) -> dict[str, int]:
    """Sum per-operator counts per module, named as in ``named_modules`` (root: ``""``).

    The counters name modules ``Root.child.grandchild`` after the root's class;
    the root's own total is taken from ``"Global"``, which also holds FLOPs
    spent outside any module (a loss, say).
    """
    out: dict[str, int] = {}
    for name, ops in counts.items():
        if name == "Global":
            out[""] = sum(ops.values())
        elif name.startswith(root + "."):
            out[name[len(root) + 1 :]] = sum(ops.values())
    return out


def _minus(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


@contextlib.contextmanager
def _activation_hooks(module: nn.Module, tracker: LiveBytes, record: StepRecord) -> Iterator[None]:
    """Add, per module, the bytes its forward calls leave alive (inclusive of children).

    ``record.module_path`` holds the modules entered and not yet left, so
    that after an exception it names the module that raised.
    """
    names = {id(m): n for n, m in module.named_modules(remove_duplicate=False)}
    starts: list[int] = []
    into = record.module_activations

    def pre(mod: nn.Module, args: Any) -> None:
        starts.append(tracker.total)
        record.module_path.append(names.get(id(mod), type(mod).__name__))

    def post(mod: nn.Module, args: Any, output: Any) -> None:
        start = starts.pop() if starts else tracker.total
        if record.module_path:
            record.module_path.pop()
        name = names.get(id(mod))
        # activation checkpointing re-runs forwards during backward: not activations
        if name is not None and tracker.phase == "forward":
            into[name] = into.get(name, 0) + tracker.total - start

    # no always_call: after an exception the path must still name the failing module
    handles = [
        nn.modules.module.register_module_forward_pre_hook(pre),
        nn.modules.module.register_module_forward_hook(post),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _warm_up(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], device: torch.device) -> None:
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
        if "foreach" in group and group["foreach"] is None and not group.get("fused"):
            group["foreach"] = real_default
        chosen.append(group.get("foreach"))
        if "foreach" in group and not group.get("fused"):
            group["foreach"] = True
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    finally:
        for group, foreach in zip(optimizer.param_groups, chosen, strict=False):
            if "foreach" in group:
                group["foreach"] = foreach


@contextlib.contextmanager
def _train_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in training mode, restoring every submodule's flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.train()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def simulate_step(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    mode: FakeTensorMode,
    device: torch.device,
    loss_fn: LossFn,
    optimizer_factory: OptimizerFactory | None,
    precision: Precision,
    zero_grad_before_forward: bool,
    record: StepRecord,
    block_prefix: str | None = None,
) -> None:
    """Run one steady-state training step of ``module`` on fake ``state`` and inputs into ``record``.

    Exceptions from the model, the loss or the optimizer propagate unchanged;
    ``record.stage`` and ``record.module_path`` say where they came from.
    With ``block_prefix`` (the counter's name of a block container followed by
    a dot, such as ``"LlamaForCausalLM.model.layers."``), ``record.window_peaks``
    also holds the peak of each phase before, inside and after its blocks.
    """
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for t in state.values():
        if isinstance(t, nn.Parameter) and t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            params.append(t)

    optimizer: torch.optim.Optimizer | None = None
    record.stage = "optimizer"
    with mode:
        if optimizer_factory is not None and params:
            optimizer = optimizer_factory(params)
            _warm_up(optimizer, params, device)
            if zero_grad_before_forward:
                optimizer.zero_grad(set_to_none=True)
        elif zero_grad_before_forward or not params:
            for p in params:
                p.grad = None
        else:
            for p in params:
                p.grad = torch.zeros_like(p)

    counter = FlopCounterMode(display=False)
    modules = KeywordModuleTracker()
    _compat.set_flop_module_tracker(counter, modules)
    uncounted = UncountedFlops(modules)
    tracker = LiveBytes(uncounted)
    if block_prefix is not None:
        tracker.where = _block_windows(modules, tracker, block_prefix)
    tracker.track_all([t for t in state.values() if isinstance(t, nn.Parameter)], "parameters")
    tracker.track_all([t for t in state.values() if not isinstance(t, nn.Parameter)], "buffers")
    tracker.track_all([args, kwargs], "inputs")
    tracker.track_all([p.grad for p in params if p.grad is not None], "gradients")
    if optimizer is not None:
        tracker.track_all([list(s.values()) for s in optimizer.state.values()], "optimizer_state")
    record.input_bytes = tracker.current["inputs"]
    record.optimizer_state_bytes = tracker.current["optimizer_state"]

    def _grad_ready(p: torch.Tensor) -> None:
        if p.grad is not None:
            tracker.retag(p.grad, "gradients")

    root = type(module).__name__
    autocast = (
        torch.autocast(device.type, dtype=precision.autocast)
        if precision.autocast is not None
        else contextlib.nullcontext()
    )
    hooks = [p.register_post_accumulate_grad_hook(_grad_ready) for p in params]
    try:
        # the tracker is entered last, so it sees operators before the counter
        # decomposes any of them: the same operators a real run allocates for
        with _compat.quiet_fake_tensor_log(), _train_mode(module), mode, counter, tracker:
            tracker.phase = record.stage = "forward"
            with _activation_hooks(module, tracker, record), autocast:
                output = torch.func.functional_call(module, state, args, kwargs)
                after_forward = counter.get_flop_counts()
                unc_forward = uncounted.snapshot()
                record.stage = "loss"
                loss = loss_fn(output)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError(
                        f"the loss must be a one-element tensor, got {type(loss).__name__}"
                        + (f" of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                    )
            after_loss = counter.get_flop_counts()
            record.activation_bytes = tracker.current["activations"]
            if params and loss.requires_grad:
                tracker.phase = record.stage = "backward"
                tracker.allocate_as = "temporaries"
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
                else:
                    for p in params:
                        p.grad = None
                loss.backward()
            after_backward = counter.get_flop_counts()
            unc_backward = uncounted.snapshot()
            # Lightning drops the outputs of training_step before stepping
            del output, loss
            record.gradient_bytes = tracker.current["gradients"]
            if optimizer is not None and params:
                tracker.phase = record.stage = "optimizer step"
                optimizer.step()
    finally:
        for h in hooks:
            h.remove()

    record.forward_flops = _per_module(after_forward, root)
    loss_end = _per_module(after_loss, root)
    record.loss_flops = loss_end.get("", 0) - record.forward_flops.get("", 0)
    record.backward_flops = _minus(_per_module(after_backward, root), loss_end)
    record.uncounted_forward = _per_module(unc_forward, root)
    record.uncounted_backward = _minus(_per_module(unc_backward, root), record.uncounted_forward)
    record.peak_bytes = tracker.peak
    record.peak_breakdown = tracker.peak_breakdown
    record.peak_phase = tracker.peak_phase
    record.window_peaks = tracker.window_peaks
    record.untracked_tensors = tracker.untracked
    record.stage = "done"


def _block_windows(modules: Any, tracker: LiveBytes, prefix: str) -> Callable[[], str]:
    """Return a function naming where the step is: before, inside or after the blocks of a phase.

    ``modules`` is the step's module tracker; its ``parents`` set is replaced
    after each backward, so it is read on every call.
    """
    seen: set[str] = set()

    def where() -> str:
        if any(p.startswith(prefix) for p in modules.parents):
            seen.add(tracker.phase)
            return "blocks"
        return "after" if tracker.phase in seen else "before"

    return where


def default_loss(output: Any) -> torch.Tensor:
    """Return ``output.loss`` if the model computed one, else the sum of its float outputs.

    A sum keeps the step's memory close to a real loss: its backward needs no
    saved tensors and its gradient is an expanded scalar.
    """
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        return loss
    values = output.values() if isinstance(output, dict) else [output]
    tensors = [
        t
        for t in tree_leaves(list(values))
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
    ]
    if not tensors:
        tensors = [t for t in tree_leaves(list(values)) if isinstance(t, torch.Tensor)]
        if not tensors:
            raise TypeError(f"the model returned no tensor ({type(output).__name__})")
        return tensors[0].sum()
    total = tensors[0].sum()
    for t in tensors[1:]:
        total = total + t.sum()
    return total
