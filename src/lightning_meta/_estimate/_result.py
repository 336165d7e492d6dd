"""The result of :func:`lightning_meta.estimate`, and how a step's record becomes one."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lightning_meta._compat import storage_id
from lightning_meta._estimate._run import StepRecord

__all__ = ["Estimate", "ModuleEstimate", "RankEstimate", "assemble"]


@dataclasses.dataclass(frozen=True)
class ModuleEstimate:
    """One row of the per-module table of an :class:`Estimate`.

    ``name`` is the dotted name from ``named_modules()`` (``""`` for the root),
    ``depth`` its number of components (0 for the root). FLOPs and bytes
    include those of the module's children. ``Estimate.modules`` holds the
    rows down to the ``depth`` given to :func:`~lightning_meta.estimate`.

    Example::

        >>> import torch, lightning_meta as lm
        >>> from torch import nn
        >>> est = lm.estimate(lambda: nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)),
        ...                   "8,16:float32", optimizer=None)
        >>> [(m.name, m.type, m.parameters, m.forward_flops) for m in est.modules]
        [('', 'Sequential', 1348, 20480), ('0', 'Linear', 1088, 16384), ('1', 'ReLU', 0, 0), ('2', 'Linear', 260, 4096)]
        >>> est.modules[1].activation_bytes  # the (8, 64) float32 output kept for backward
        2048
    """

    name: str
    type: str
    depth: int
    parameters: int
    forward_flops: int
    backward_flops: int
    uncounted_flops: int
    activation_bytes: int


@dataclasses.dataclass(frozen=True)
class RankEstimate:
    """How a strategy lays one rank out: the ``rank`` field of a per-rank :class:`Estimate`.

    ``parameters`` and ``parameter_bytes`` are what the rank keeps between
    steps: the whole model under DDP; under FSDP2 its padded shard of every
    parameter (``ceil(rows / data_parallel_size)`` rows of dim 0, of the
    tensor-parallel slice where a layer is split). ``blocks`` is how many
    blocks FSDP2 wraps and activation checkpointing checkpoints one by one,
    ``blocks_found`` where they were found; ``tensor_parallel_layers`` counts
    the split layers. ``forward_flops`` and ``backward_flops`` are what the
    rank computes; they differ from the :class:`Estimate`'s under tensor
    parallelism only, where ``FlopCounterMode`` counts a split layer's
    ``DTensor`` operations at their unsplit size.

    Example::

        >>> import torch, lightning_meta as lm
        >>> from torch import nn
        >>> net = lambda: nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 16))
        >>> rank = lm.estimate(net, "8,16:float32", strategy="fsdp", world_size=4).rank
        >>> rank.strategy, rank.data_parallel_size, rank.blocks
        ('fsdp', 4, 2)
        >>> rank.parameters, rank.parameter_bytes  # a quarter of 2128 parameters, float32
        (532, 2128)
    """

    strategy: str
    world_size: int
    data_parallel_size: int
    tensor_parallel_size: int
    activation_checkpointing: bool
    reshard_after_forward: bool | None
    param_dtype: str | None
    reduce_dtype: str | None
    blocks: int
    blocks_found: str
    tensor_parallel_layers: int
    parameters: int
    parameter_bytes: int
    forward_flops: int
    backward_flops: int


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What one training step of a model costs, as returned by :func:`estimate`.

    All counts are plain ``int`` (bytes, FLOPs, elements). ``forward_flops``
    and ``backward_flops`` are what :class:`torch.utils.flop_counter.FlopCounterMode`
    counts for the real model on the same device; ``uncounted_forward_flops``
    and ``uncounted_backward_flops`` hold the FLOPs of kernels it counts as 0
    (the CPU flash-attention kernel behind ``scaled_dot_product_attention``;
    the fused kernels of ``nn.LSTM``, counted as their matmuls, the backward
    as twice the forward), never folded in. ``peak_breakdown`` splits ``peak_bytes`` by what the
    memory is held for at the moment of the peak; ``peak_phase`` says when
    that moment is (``forward``, ``backward`` or ``optimizer step``).
    ``method`` says how the step was simulated: in full, or for a stack of
    identical blocks, with a few of them and extrapolated exactly.

    With a strategy (``rank`` is a :class:`RankEstimate`), every field of the
    step is one rank's (FLOPs, activation, gradient, optimizer-state, input
    and peak bytes, ``peak_breakdown`` with ``communication`` for the
    collectives' buffers, the per-module table), while ``parameters``,
    ``parameter_bytes``, ``parameters_by_dtype`` and ``buffer_bytes`` still
    describe the whole model; ``rank`` says what the rank holds of it. The
    FLOPs are what ``FlopCounterMode`` counts on the real rank, which sees a
    tensor-parallel layer's ``DTensor`` operations at their unsplit size;
    ``rank.forward_flops`` and ``rank.backward_flops`` are what the rank
    computes. Without a strategy, ``rank`` is ``None`` and left out of
    :meth:`to_dict`.

    ``inputs_read_as_zeros`` lists the value reads (``.item()``, ``bool()``,
    a data-dependent shape) the step answered from zeros standing for an
    input given by shape, as ``"<operator> in <module>, reading <inputs>"``
    with the inputs named by the forward's parameters (``attention_mask``,
    ``batch['labels']``): where the model branches on an input's value, the
    estimate follows the branch that zeros take, which may not be the one
    real data takes. Empty when no such read
    happened (real inputs are read as they are).

    Example::

        >>> import torch, lightning_meta as lm
        >>> from torch import nn
        >>> net = lambda: nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
        >>> est = lm.estimate(net, "8,16:float32", optimizer="adamw")
        >>> est.parameters, est.parameter_bytes, est.optimizer_state_bytes  # AdamW: 2 moments + step
        (1348, 5392, 10800)
        >>> est.flops, est.peak_phase, est.peak_bytes == sum(est.peak_breakdown.values())
        (45056, 'optimizer step', True)
        >>> est.to_dict()["peak_bytes"] == est.peak_bytes, est.rank is None
        (True, True)
    """

    parameters: int
    trainable_parameters: int
    parameter_bytes: int
    parameters_by_dtype: dict[str, int]
    buffer_bytes: int
    forward_flops: int
    backward_flops: int
    loss_flops: int
    uncounted_forward_flops: int
    uncounted_backward_flops: int
    activation_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    input_bytes: int
    peak_bytes: int
    peak_breakdown: dict[str, int]
    peak_phase: str
    modules: tuple[ModuleEstimate, ...]
    optimizer: str | None
    precision: str
    device: str
    method: str = "full step"
    rank: RankEstimate | None = None
    inputs_read_as_zeros: tuple[str, ...] = ()

    @property
    def flops(self) -> int:
        """Forward plus backward FLOPs of one step, as ``FlopCounterMode`` counts them."""
        return self.forward_flops + self.backward_flops

    def to_dict(self) -> dict[str, Any]:
        """Return the estimate as plain JSON-serialisable Python values."""
        out = dataclasses.asdict(self)
        out["modules"] = [dataclasses.asdict(m) for m in self.modules]
        if self.rank is None:
            del out["rank"]
        return out


def _fill_containers(module: nn.Module, values: dict[str, int]) -> dict[str, int]:
    """Give modules that were never called (``ModuleList``, ``ModuleDict``) their children's sum."""
    out = dict(values)

    def visit(name: str, mod: nn.Module) -> int:
        total = 0
        for child_name, child in mod.named_children():
            total += visit(f"{name}.{child_name}" if name else child_name, child)
        if name not in out and total:
            out[name] = total
        return out.get(name, 0)

    visit("", module)
    return out


def module_rows(module: nn.Module, record: StepRecord, depth: int) -> tuple[ModuleEstimate, ...]:
    """Return the per-module table of ``record`` down to ``depth`` (root: 0), in module order.

    Args:
        module: the model the step ran (in full or extrapolated).
        record: what the step measured, per module name.
        depth: the deepest level of the table.

    Returns:
        One :class:`ModuleEstimate` per module, containers given their children's sums.
    """
    forward = _fill_containers(module, record.forward_flops)
    backward = _fill_containers(module, record.backward_flops)
    uncounted = _fill_containers(
        module,
        {
            k: record.uncounted_forward.get(k, 0) + record.uncounted_backward.get(k, 0)
            for k in {*record.uncounted_forward, *record.uncounted_backward}
        },
    )
    activations = _fill_containers(module, record.module_activations)
    rows = []
    for name, mod in module.named_modules():
        level = 0 if not name else name.count(".") + 1
        if level > depth:
            continue
        rows.append(
            ModuleEstimate(
                name=name,
                type=type(mod).__name__,
                depth=level,
                parameters=sum(p.numel() for p in mod.parameters()),
                forward_flops=forward.get(name, 0),
                backward_flops=backward.get(name, 0),
                uncounted_flops=uncounted.get(name, 0),
                activation_bytes=activations.get(name, 0),
            )
        )
    return tuple(rows)


def assemble(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    record: StepRecord,
    *,
    depth: int,
    optimizer: str | None,
    precision: str,
    device: torch.device,
    method: str,
    rank: RankEstimate | None = None,
) -> Estimate:
    """Return the :class:`Estimate` of a simulated step.

    Args:
        module: the model.
        state: stand-ins for its parameters and buffers, by name, shared
            where the model shares them (counted once).
        record: what the step measured.
        depth: the deepest level of the per-module table.
        optimizer: the optimizer's name, ``None`` for none.
        precision: the Lightning precision name.
        device: the device the step was simulated for.
        method: how the step was simulated, for :attr:`Estimate.method`.
        rank: under a strategy, the rank's layout.

    Returns:
        The estimate.
    """
    unique = {id(t): t for t in state.values()}.values()
    params = [t for t in unique if isinstance(t, nn.Parameter)]
    # Buffers by memory: a plain attribute viewing a parameter or buffer (its stand-in
    # is a view of that one's) holds no bytes of its own.
    held = {storage_id(p.untyped_storage()) for p in params}
    buffers: dict[int, int] = {}
    for t in unique:
        if not isinstance(t, nn.Parameter):
            sid = storage_id(t.untyped_storage())
            if sid not in held:
                buffers[sid] = max(buffers.get(sid, 0), t.numel() * t.element_size())
    by_dtype: dict[str, int] = {}
    for p in params:
        key = str(p.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + p.numel()
    return Estimate(
        parameters=sum(p.numel() for p in params),
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        parameter_bytes=sum(p.numel() * p.element_size() for p in params),
        parameters_by_dtype=by_dtype,
        buffer_bytes=sum(buffers.values()),
        forward_flops=record.forward_flops.get("", 0),
        backward_flops=record.backward_flops.get("", 0),
        loss_flops=record.loss_flops,
        uncounted_forward_flops=record.uncounted_forward.get("", 0),
        uncounted_backward_flops=record.uncounted_backward.get("", 0),
        activation_bytes=record.activation_bytes,
        gradient_bytes=record.gradient_bytes,
        optimizer_state_bytes=record.optimizer_state_bytes,
        input_bytes=record.input_bytes,
        peak_bytes=record.peak_bytes,
        peak_breakdown=dict(record.peak_breakdown),
        peak_phase=record.peak_phase,
        modules=module_rows(module, record, depth),
        optimizer=optimizer,
        precision=precision,
        device=str(device),
        method=method,
        rank=rank,
        inputs_read_as_zeros=tuple(record.zero_input_reads),
    )
