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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_meta import _compat
from lightning_meta._compat import FakeTensorMode, StepModuleTracker, tree_leaves
from lightning_meta._errors import MetaTensorError
from lightning_meta._estimate._kernels import RealKernels
from lightning_meta._estimate._optimizer import (
    prepare_optimizer,
    state_tensors,
    trainable_parameters,
)
from lightning_meta._estimate._options import LossFn, OptimizerFactory, Precision
from lightning_meta._estimate._track import (
    CATEGORIES,
    RANK_CATEGORIES,
    KernelScratch,
    LiveBytes,
    UncountedFlops,
)
from lightning_meta._estimate._values import Values

if TYPE_CHECKING:
    from lightning_meta._estimate._ranks import RankStep

__all__ = ["StepRecord", "Watch", "default_loss", "simulate_step", "trace_forward", "watch_step"]


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
    # under a strategy: the FLOPs the rank computes itself (``forward_flops``
    # and ``backward_flops`` count split layers as FlopCounterMode sees them)
    rank_forward_flops: int = 0
    rank_backward_flops: int = 0
    # value reads answered from zeros standing for inputs given by shape: "<op> in <module>"
    zero_input_reads: list[str] = field(default_factory=list)
    # live bytes plus an upper bound of a kernel's internal scratch, at its worst
    # call, and the kernels ("kernel in module 'name'") whose bound exceeds the peak
    scratch_bound_bytes: int = 0
    scratch_kernels: list[str] = field(default_factory=list)
    rnn_workspace_bytes: int = 0
    # where the step is, for error messages: stage and the modules entered
    stage: str = "setup"
    module_path: list[str] = field(default_factory=list)


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
        starts.append(tracker.current["activations"])
        record.module_path.append(names.get(id(mod), type(mod).__name__))

    def post(mod: nn.Module, args: Any, output: Any) -> None:
        start = starts.pop() if starts else tracker.current["activations"]
        if record.module_path:
            record.module_path.pop()
        name = names.get(id(mod))
        # activation checkpointing re-runs forwards during backward: not activations
        if name is not None and tracker.phase == "forward":
            # the activations' own bytes: a strategy's buffers, gathered and
            # freed in forward, are no module's activations
            into[name] = into.get(name, 0) + tracker.current["activations"] - start

    # no always_call: after an exception the path must still name the failing module;
    # hooks per module, not global ones (a torch.compile'd module warns of those),
    # prepended to run where global hooks would: before the module's own
    handles = []
    for m in module.modules():
        handles.append(m.register_forward_pre_hook(pre, prepend=True))
        handles.append(m.register_forward_hook(post, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _trainer_modes(module: nn.Module) -> Iterator[None]:
    """Run a training step as Lightning's ``Trainer.fit`` does: every submodule in the mode it
    is in (Lightning >= 2.2 calls no ``.train()``: a transformers model as ``from_pretrained``
    returns it, in eval mode, trains with dropout off), gradients on whatever the caller's
    grad mode (a validation hook, a notebook under ``torch.no_grad()``), every flag the step
    changes put back afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


@dataclass
class Watch:
    """The instruments of one step, and the FLOPs they had counted at the end of each phase."""

    counter: FlopCounterMode
    uncounted: UncountedFlops
    tracker: LiveBytes
    modules: Any = None
    flops: dict[str, dict[str, dict[Any, int]]] = field(default_factory=dict)
    uncounted_flops: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    def mark(self, phase: str) -> None:
        """Keep the FLOPs counted so far as those at the end of ``phase``."""
        self.flops[phase] = self.counter.get_flop_counts()
        self.uncounted_flops[phase] = self.uncounted.snapshot()


def watch_step(
    state: dict[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer | None,
    record: StepRecord,
    block_prefix: str | None,
    device: torch.device | None = None,
    values: Values | None = None,
    rank: RankStep | None = None,
    module: nn.Module | None = None,
) -> Watch:
    """Set up the FLOP counters and the byte tracker, with what is alive before the step.

    Args:
        state: the fake parameters and buffers.
        args: the fake positional inputs.
        kwargs: the fake keyword inputs.
        params: the trainable parameters (their gradients are alive).
        optimizer: the warmed-up optimizer (its state is alive), or ``None``.
        record: receives ``input_bytes`` and ``optimizer_state_bytes``.
        block_prefix: see :func:`simulate_step`.
        device: the simulated device; the forward's operators are then checked
            against the real kernels' dtype rules (:class:`RealKernels`).
            ``None`` (a real step, measured) checks nothing.
        values: the values the step follows (see :class:`Values`).
        rank: under a strategy, the rank's step: the parameters it holds are
            tracked (FSDP2: its shards, not what the forward computes with).
        module: the model: FLOPs are attributed with hooks on its modules;
            ``None``: with global module hooks, on every module called.

    Returns:
        The :class:`Watch`; enter its counter and tracker around the step.
    """
    counter = FlopCounterMode(display=False)
    modules = StepModuleTracker(module)
    _compat.set_flop_module_tracker(counter, modules)
    uncounted = UncountedFlops(modules)
    tracker = LiveBytes(
        uncounted,
        RealKernels(device) if device is not None else None,
        values,
        RANK_CATEGORIES if rank is not None else CATEGORIES,
    )
    if device is not None and device.type == "cpu":
        tracker.scratch = KernelScratch(modules)
    if block_prefix is not None:
        tracker.where = _block_windows(
            modules, tracker, block_prefix, rank.block_count(block_prefix) if rank else None
        )
    held = (
        rank.held
        if rank is not None
        else [t for t in state.values() if isinstance(t, nn.Parameter)]
    )
    tracker.track_all(held, "parameters")
    for t in rank.unsharded if rank is not None else ():
        tracker.ignore(t)  # FSDP2: what the forward computes with is counted as it is gathered
    tracker.track_all([t for t in state.values() if not isinstance(t, nn.Parameter)], "buffers")
    tracker.track_all([args, kwargs], "inputs")
    tracker.track_all([p.grad for p in params if p.grad is not None], "gradients")
    if optimizer is not None:
        tracker.track_all(state_tensors(optimizer), "optimizer_state")
    record.input_bytes = tracker.current["inputs"]
    record.optimizer_state_bytes = tracker.current["optimizer_state"]
    return Watch(counter, uncounted, tracker, modules)


@contextlib.contextmanager
def _gradients_tagged(params: list[nn.Parameter], tracker: LiveBytes) -> Iterator[None]:
    """Count each gradient as ``gradients`` once accumulated; it is allocated as a temporary."""

    def ready(p: torch.Tensor) -> None:
        if p.grad is not None:
            tracker.retag(p.grad, "gradients")

    hooks = [p.register_post_accumulate_grad_hook(ready) for p in params]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _forward(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    loss_fn: LossFn,
    autocast: contextlib.AbstractContextManager[Any],
    watch: Watch,
    record: StepRecord,
) -> tuple[Any, torch.Tensor]:
    """Run forward and loss; return both, the output being alive until after backward.

    ``module`` already holds ``state`` (for the whole step), so it is called as it is.
    """
    watch.tracker.phase = record.stage = "forward"
    with _activation_hooks(module, watch.tracker, record), autocast:
        output = module(*args, **kwargs)
        watch.mark("forward")
        record.stage = "loss"
        loss = loss_fn(output)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(
                f"the loss must be a one-element tensor, got {type(loss).__name__}"
                + (f" of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            )
    watch.mark("loss")
    record.activation_bytes = watch.tracker.current["activations"]
    return output, loss


def _backward(
    loss: torch.Tensor,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer | None,
    watch: Watch,
    record: StepRecord,
    rank: RankStep | None = None,
) -> None:
    """Drop last step's gradients, as Lightning's ``zero_grad`` does, and run backward."""
    if params and loss.requires_grad:
        watch.tracker.phase = record.stage = "backward"
        watch.tracker.allocate_as = "temporaries"
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            for p in params:
                p.grad = None
        loss.backward()
        if rank is not None:
            rank.after_backward()
    watch.mark("backward")


def _optimizer_step(
    optimizer: torch.optim.Optimizer | None, watch: Watch, record: StepRecord
) -> None:
    """Run ``optimizer.step()`` on the gradients backward left, if there is an optimizer."""
    if optimizer is not None:
        watch.tracker.phase = record.stage = "optimizer step"
        optimizer.step()


def _record(record: StepRecord, watch: Watch, root: str) -> None:
    """Write what ``watch`` measured into ``record``; ``root`` is the model's class name."""
    record.forward_flops = _per_module(watch.flops["forward"], root)
    loss_end = _per_module(watch.flops["loss"], root)
    record.loss_flops = loss_end.get("", 0) - record.forward_flops.get("", 0)
    record.backward_flops = _minus(_per_module(watch.flops["backward"], root), loss_end)
    record.uncounted_forward = _per_module(watch.uncounted_flops["forward"], root)
    record.uncounted_backward = _minus(
        _per_module(watch.uncounted_flops["backward"], root), record.uncounted_forward
    )
    tracker = watch.tracker
    record.peak_bytes = tracker.peak
    record.peak_breakdown = tracker.peak_breakdown
    record.peak_phase = tracker.peak_phase
    record.window_peaks = tracker.window_peaks
    record.untracked_tensors = tracker.untracked
    record.rnn_workspace_bytes = tracker.rnn_workspace
    if tracker.scratch is not None:
        record.scratch_bound_bytes = tracker.scratch.worst
        record.scratch_kernels = [
            k for k, v in tracker.scratch.kernels.items() if v > record.peak_bytes
        ]
    record.stage = "done"


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
    values: Values | None = None,
    rank: RankStep | None = None,
) -> None:
    """Run one steady-state training step of ``module`` on fake ``state`` and inputs into ``record``.

    Exceptions from the model, the loss or the optimizer propagate unchanged;
    ``record.stage`` and ``record.module_path`` say where they came from. An
    operator of the forward or the loss whose real kernel refuses the dtypes
    of its inputs (a fake kernel does not check them) raises a
    :class:`~lightning_meta._estimate._kernels.KernelRefusal`, which is also
    the kind of exception torch raises for it.

    Args:
        module: the model; its own tensors are never used.
        state: fake parameters and buffers by name, made under ``mode``.
        args: fake positional inputs.
        kwargs: fake keyword inputs.
        mode: the ``FakeTensorMode`` of ``state`` and the inputs.
        device: the simulated device.
        loss_fn: takes the output, returns a one-element tensor.
        optimizer_factory: builds the optimizer; ``None`` for none.
        precision: the Lightning precision (autocast around forward and loss).
        zero_grad_before_forward: ``loop="plain"``: last step's gradients are
            dropped before the forward pass rather than after it.
        record: receives the measurements.
        block_prefix: the counter's name of a block container followed by a
            dot, such as ``"LlamaForCausalLM.model.layers."``; then
            ``record.window_peaks`` also holds the peak of each phase before,
            inside and after its blocks.
        values: the values of the inputs, followed through the step so that
            reads of them are answered (:class:`Values`); ``None``: none known.
        rank: under a strategy, one rank's step (:class:`RankStep`): ``state``
            is then its ``state``, the optimizer steps its ``optimizer_params``
            and its hooks add the strategy's buffers and collectives.
    """
    params = rank.optimizer_params if rank is not None else trainable_parameters(state)
    record.stage = "optimizer"
    optimizer = prepare_optimizer(
        params,
        mode=mode,
        device=device,
        optimizer_factory=optimizer_factory,
        zero_grad_before_forward=zero_grad_before_forward,
        model=module,
    )
    watch = watch_step(
        state, args, kwargs, params, optimizer, record, block_prefix, device, values, rank, module
    )
    if rank is not None:
        rank.setup(mode, watch.tracker)
    autocast: contextlib.AbstractContextManager[Any] = (
        torch.autocast(device.type, dtype=precision.autocast)
        if precision.autocast is not None
        else contextlib.nullcontext()
    )
    # the tracker is entered last, so it sees operators before the counter
    # decomposes any of them: the same operators a real run allocates for
    with (
        _gradients_tagged(rank.grad_params if rank is not None else params, watch.tracker),
        # the model holds the fake tensors for the whole step, not only for the
        # forward: activation checkpointing (the strategy's, or the model's own
        # torch.utils.checkpoint and transformers' gradient_checkpointing_enable)
        # recomputes forwards in backward, which must see the same tensors
        _compat.reparametrized(module, state),
        rank.hooks(watch.tracker, watch.modules) if rank is not None else contextlib.nullcontext(),
        _compat.quiet_fake_tensor_log(),
        _compat.transformers_runs_real_path(mode, _real_path(values)),
        _trainer_modes(module),
        mode,
        watch.counter,
        watch.tracker,
    ):
        output, loss = _forward(module, args, kwargs, loss_fn, autocast, watch, record)
        if params and not loss.requires_grad:
            raise _loss_without_grad(module, state, params)
        _backward(loss, params, optimizer, watch, record, rank)
        _refuse_sparse_gradients(state, params)
        # Lightning drops the outputs of training_step before stepping
        del output, loss
        record.gradient_bytes = watch.tracker.current["gradients"]
        _optimizer_step(optimizer, watch, record)
    _record(record, watch, type(module).__name__)
    if rank is not None:
        rank.count_as_dtensor(record)


def _refuse_sparse_gradients(state: dict[str, torch.Tensor], params: list[nn.Parameter]) -> None:
    """Raise if backward gave a parameter a sparse gradient (``F.embedding(...,
    sparse=True)`` in a forward's own code; the layers are refused before the step): the
    optimizer's warm-up held it dense, so the step's gradient terms would be a dense one's."""
    ids = {id(p) for p in params if p.grad is not None and p.grad.layout != torch.strided}
    if not ids:
        return
    names = [n for n, t in state.items() if id(t) in ids]
    raise MetaTensorError(
        f"estimate: backward gave {names} sparse gradients (an embedding lookup with "
        "sparse=True), which estimate does not simulate: they would be counted as dense "
        "tensors of the weights' size. Fix: estimate the model with sparse=False, whose step "
        "holds dense gradients instead.",
        paths=names,
    )


def _loss_without_grad(
    module: nn.Module, state: dict[str, torch.Tensor], params: list[nn.Parameter]
) -> MetaTensorError:
    """Return the error for a loss that no trainable parameter reaches (backward would fail)."""
    ids = {id(p) for p in params}
    names = [n for n, t in state.items() if id(t) in ids]
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return MetaTensorError(
        f"estimate: the loss of {type(module).__name__} does not require grad, while the model "
        f"has {len(params)} trainable parameters ({shown}): the real step's loss.backward() "
        "fails ('element 0 of tensors does not require grad'), so there is no training step "
        "to estimate. Fix: compute the loss from the model's output without .detach(), "
        ".item() or torch.no_grad(); or, for a model that is not trained, freeze its "
        "parameters (requires_grad_(False)).",
        paths=names[:3],
    )


def trace_forward(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    mode: FakeTensorMode,
    device: torch.device,
    loss_fn: LossFn,
    precision: Precision,
    values: Values,
    into: list[Any],
) -> None:
    """Run the forward and the loss of ``module`` as :func:`simulate_step` does, listing each operator.

    Nothing is counted and nothing is checked: ``into`` receives, in order,
    ``(operator, shapes and dtypes of its results)`` for every operator (see
    :class:`LiveBytes`), and whatever hooks of the caller add to it. The
    arguments are those of :func:`simulate_step`; exceptions propagate.
    """
    tracker = LiveBytes(values=values)
    tracker.trace = into
    tracker.phase = "forward"
    autocast: contextlib.AbstractContextManager[Any] = (
        torch.autocast(device.type, dtype=precision.autocast)
        if precision.autocast is not None
        else contextlib.nullcontext()
    )
    with (
        _compat.quiet_fake_tensor_log(),
        _compat.transformers_runs_real_path(mode, _real_path(values)),
        _trainer_modes(module),
        mode,
        tracker,
        autocast,
    ):
        loss_fn(torch.func.functional_call(module, state, args, kwargs))


def _real_path(values: Values | None) -> Callable[[object], bool]:
    """Which of the step's fakes transformers may take for real tensors, and so run the
    branch a real run takes (see ``_compat.transformers_runs_real_path``): a floating
    tensor (activations: Mamba's hidden states, a ViT's embeddings, whose branches read
    shapes), and one whose values the estimate follows (an attention mask or position ids
    of at most ``MAX_ELEMENTS``, whose branch reads them: ``mask.all()``). A larger mask,
    which the real branch would read without the estimate knowing its values, keeps
    transformers' ``torch.export`` path (a full 4-D mask), as every mask did before
    2026-12-07: over, not refused."""

    def real(t: object) -> bool:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return True
        return values is not None and values.of(t) is not None

    return real


def _block_windows(
    modules: Any, tracker: LiveBytes, prefix: str, count: int | None = None
) -> Callable[[], str]:
    """Return a function naming where the step is: before, inside or after the blocks of a phase.

    ``modules`` is the step's module tracker; its ``parents`` set is replaced
    after each backward, so it is read on every call. With ``count`` (the
    number of blocks, under a strategy), the blocks are told apart by role,
    ``blocks:first``, ``blocks:middle`` and ``blocks:last``: FSDP2's buffers
    differ between them, so each window's peak grows linearly with depth.
    """
    seen: set[str] = set()
    start = len(prefix)

    def where() -> str:
        inside = [p for p in modules.parents if p.startswith(prefix)]
        if inside:
            seen.add(tracker.phase)
            if count is None:
                return "blocks"
            index = inside[0][start:].partition(".")[0]
            if not index.isdigit():
                return "blocks"
            i = int(index)
            return (
                "blocks:first" if i == 0 else "blocks:last" if i == count - 1 else "blocks:middle"
            )
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
