"""Check the strategy options of :func:`lightning_meta.estimate`: DDP, FSDP2, tensor parallel.

``estimate(..., strategy="fsdp", world_size=64, tensor_parallel=8)`` asks for
one rank of a sharded run. Every option is checked here, before anything runs,
and a combination the device mesh cannot hold is an
:class:`~lightning_meta._errors.ArgumentValueError` naming the fix. What
depends on the model (its blocks, the tensor-parallel plan, head counts) is
checked by :mod:`~lightning_meta._estimate._layout`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_meta._arguments import spelled
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError
from lightning_meta._estimate._specs import parse_dtype

__all__ = ["STRATEGIES", "TP_STYLES", "Parallel", "resolve_parallel"]

#: accepted names -> the strategy simulated ("ddp": DDPStrategy; "fsdp": FSDP2,
#: Lightning's ModelParallelStrategy with ``fully_shard``)
STRATEGIES = {"ddp": "ddp", "fsdp": "fsdp", "fsdp2": "fsdp", "model_parallel": "fsdp"}

#: tensor-parallel styles of a plan (torch's ``ColwiseParallel``, ``RowwiseParallel``,
#: ``ColwiseParallel(output_layouts=Replicate())``; transformers' names) -> what they do
TP_STYLES = {
    "colwise": "colwise",
    "rowwise": "rowwise",
    "colwise_rep": "colwise_gather",
    "colwise_gather_output": "colwise_gather",
    # transformers >= 5.2x splits the embedding by vocabulary rows (RowwiseParallel
    # on an nn.Embedding: rows sharded, partial outputs all-reduced)
    "embedding_rowwise": "rowwise",
    "replicate": "replicate",
}

_FSDP = "strategy='fsdp'"
_DDP = "strategy='ddp'"


@dataclass(frozen=True)
class Parallel:
    """The checked strategy options of one :func:`~lightning_meta.estimate` call.

    ``world_size`` ranks form a ``(data_parallel, tensor_parallel)`` mesh;
    FSDP2 shards over ``data_parallel`` ranks, each holding a
    ``1 / tensor_parallel`` share of the tensor-parallel layers. ``blocks``
    names what is sharded and checkpointed block by block (``None``: found
    in the model, see :func:`~lightning_meta._estimate._layout.find_blocks`).
    """

    strategy: str
    world_size: int
    tensor_parallel: int
    activation_checkpointing: bool
    reshard_after_forward: bool
    param_dtype: torch.dtype | None
    reduce_dtype: torch.dtype | None
    blocks: str | tuple[type[nn.Module], ...] | None
    plan: dict[str, str] | None
    gradient_as_bucket_view: bool
    backend: str = "nccl"
    broadcast_buffers: bool = True

    @property
    def data_parallel(self) -> int:
        """The number of data-parallel ranks (FSDP2 shards over them)."""
        return self.world_size // self.tensor_parallel

    def describe(self) -> str:
        """Return the strategy in words: ``fsdp, 64 ranks (data 8 x tensor 8), checkpointed``."""
        mesh = (
            f" (data {self.data_parallel} x tensor {self.tensor_parallel})"
            if self.tensor_parallel > 1
            else ""
        )
        ac = ", activation checkpointing" if self.activation_checkpointing else ""
        return f"{self.strategy}, {self.world_size} ranks{mesh}{ac}"


def _positive(value: Any, name: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(
            f"estimate: {option(name)} must be an int, got {type(value).__name__} {value!r}. "
            f"Fix: {fix}."
        )
    if value < 1:
        raise ArgumentValueError(f"estimate: {option(name)} must be >= 1, got {value}. Fix: {fix}.")
    return value


def option(name: str) -> str:
    """Argument ``name`` of ``estimate`` as its reader types it: ``world_size`` in Python,
    ``--world-size`` on the command line."""
    flag = {
        "reshard_after_forward": "--no-reshard-after-forward",
        "broadcast_buffers": "--no-broadcast-buffers",
    }.get(name)
    return spelled(name, flag or "--" + name.replace("_", "-"))


def _divisors(n: int) -> str:
    found = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, found[:8])) + (", ..." if len(found) > 8 else "")


def _mixed_precision(value: Any) -> tuple[torch.dtype | None, torch.dtype | None]:
    """Return ``(param_dtype, reduce_dtype)`` of FSDP2's ``MixedPrecisionPolicy``."""
    fix = (
        "pass a dtype for the parameters ('bf16': reduced in float32, as torchtitan does) "
        "or a pair (param_dtype, reduce_dtype) such as " + spelled("('bf16', 'bf16')", "bf16,bf16")
    )

    def one(v: Any) -> torch.dtype | None:
        if v is None or isinstance(v, torch.dtype):
            dtype = v
        elif isinstance(v, str):
            try:
                dtype = parse_dtype(v.removesuffix("-mixed"))
            except ArgumentValueError as e:
                raise ArgumentValueError(f"estimate: mixed_precision: {e}") from e
        else:
            raise ArgumentTypeError(
                f"estimate: mixed_precision holds {type(v).__name__} {v!r}, not a dtype. Fix: {fix}."
            )
        if dtype is not None and not dtype.is_floating_point:
            raise ArgumentValueError(
                f"estimate: mixed_precision dtype {dtype} is not floating point. Fix: {fix}."
            )
        return dtype

    if value is None:
        return None, None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ArgumentValueError(
                f"estimate: mixed_precision={value!r} has {len(value)} items. Fix: {fix}."
            )
        return one(value[0]), one(value[1])
    return one(value), torch.float32


def _blocks(value: Any) -> str | tuple[type[nn.Module], ...] | None:
    if value is None or isinstance(value, str):
        return value
    classes = tuple(value) if isinstance(value, (tuple, list, set, frozenset)) else (value,)
    if not classes or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
        raise ArgumentTypeError(
            f"estimate: blocks={value!r} is neither the dotted name of a container nor "
            "module classes. Fix: pass blocks='model.layers' or blocks=LlamaDecoderLayer "
            "(what Lightning's activation_checkpointing_policy and FSDP's auto_wrap_policy take)."
        )
    return classes


def _plan(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    fix = (
        f"pass a mapping of module names ('*' for one level, as in 'model.layers.*.mlp.up_proj') "
        f"to one of {', '.join(TP_STYLES)}"
    )
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(
            f"estimate: tensor_parallel_plan must be a mapping, got {type(value).__name__}. Fix: {fix}."
        )
    plan: dict[str, str] = {}
    for key, style in value.items():
        if not isinstance(key, str) or not isinstance(style, str):
            raise ArgumentTypeError(
                f"estimate: tensor_parallel_plan entry {key!r}: {style!r} is not text. Fix: {fix}."
            )
        if style.lower() not in TP_STYLES:
            raise ArgumentValueError(
                f"estimate: tensor_parallel_plan gives {key!r} the style {style!r}, which estimate "
                f"does not simulate. Fix: {fix}."
            )
        plan[key] = TP_STYLES[style.lower()]
    return plan


def resolve_parallel(
    *,
    strategy: Any,
    world_size: Any,
    tensor_parallel: Any,
    activation_checkpointing: Any,
    reshard_after_forward: Any,
    mixed_precision: Any,
    blocks: Any,
    tensor_parallel_plan: Any,
    gradient_as_bucket_view: Any,
    backend: Any = None,
    broadcast_buffers: Any = True,
) -> Parallel | None:
    """Check the strategy options of ``estimate``; return them, or ``None`` for one process.

    Args:
        strategy: ``None``, ``"ddp"`` or ``"fsdp"`` (also ``"fsdp2"``,
            ``"model_parallel"``).
        world_size: the number of ranks (required with a strategy).
        tensor_parallel: ranks per tensor-parallel group (FSDP2 only).
        activation_checkpointing: checkpoint every block.
        reshard_after_forward: FSDP2's option for the blocks (``None``: True).
        mixed_precision: FSDP2's ``MixedPrecisionPolicy``: a parameter dtype,
            or ``(param_dtype, reduce_dtype)``.
        blocks: the container of blocks, or their classes.
        tensor_parallel_plan: module name patterns -> style.
        gradient_as_bucket_view: DDP's option.
        broadcast_buffers: DDP's option (``True``, its default: the buffers'
            broadcast before each forward is simulated).
        backend: the process group's backend whose buffers are simulated:
            ``"nccl"`` (the default, whatever device simulates the kernels) or
            ``"gloo"``, which also stages a copy of every all-gather and
            reduce-scatter buffer while it runs.

    Returns:
        The :class:`Parallel`, or ``None`` when ``strategy`` is ``None``.

    Raises:
        ArgumentTypeError: if an option has the wrong type.
        ArgumentValueError: if an option or the combination cannot work: an
            unknown strategy, a world size the mesh cannot divide, tensor
            parallelism or FSDP2 options under DDP, strategy options without
            a strategy.

    Example::

        >>> p = resolve_parallel(strategy="fsdp", world_size=64, tensor_parallel=8,
        ...     activation_checkpointing=True, reshard_after_forward=None,
        ...     mixed_precision="bf16", blocks=None, tensor_parallel_plan=None,
        ...     gradient_as_bucket_view=False)
        >>> p.data_parallel, p.param_dtype, p.describe()
        (8, torch.bfloat16, 'fsdp, 64 ranks (data 8 x tensor 8), activation checkpointing')
    """
    if not isinstance(gradient_as_bucket_view, bool):  # "no" was read as True
        raise ArgumentTypeError(
            f"estimate: gradient_as_bucket_view must be True or False, got "
            f"{gradient_as_bucket_view!r}. Fix: pass True (gradients as views into DDP's "
            "buckets) or False (DDP's default)."
        )
    if not isinstance(broadcast_buffers, bool):
        raise ArgumentTypeError(
            f"estimate: broadcast_buffers must be True or False, got {broadcast_buffers!r}. "
            "Fix: pass False for DDPStrategy(broadcast_buffers=False), or leave it out "
            "(True, DDP's default)."
        )
    given = {
        "world_size": world_size is not None,
        "tensor_parallel": tensor_parallel != 1,
        "activation_checkpointing": bool(activation_checkpointing),
        "reshard_after_forward": reshard_after_forward is not None,
        "mixed_precision": mixed_precision is not None,
        "blocks": blocks is not None,
        "tensor_parallel_plan": tensor_parallel_plan is not None,
        "gradient_as_bucket_view": bool(gradient_as_bucket_view),
        "broadcast_buffers": not broadcast_buffers,
        "backend": backend is not None,
    }
    if strategy is None:
        extra = [option(k) for k, v in given.items() if v]
        if extra:
            raise ArgumentValueError(
                f"estimate: {', '.join(extra)} given without a strategy. Fix: pass "
                + spelled(
                    "strategy='ddp' or strategy='fsdp' (FSDP2, ModelParallelStrategy) with "
                    "world_size=",
                    "--strategy ddp or --strategy fsdp (FSDP2, ModelParallelStrategy) with "
                    "--world-size",
                )
                + ", or leave them out for one process."
            )
        return None
    if not isinstance(strategy, str) or strategy.lower() not in STRATEGIES:
        raise ArgumentValueError(
            f"estimate: unknown strategy {strategy!r}. Fix: use one of {', '.join(STRATEGIES)} "
            "(None for one process)."
        )
    kind = STRATEGIES[strategy.lower()]
    if backend is not None and backend not in ("nccl", "gloo"):
        raise ArgumentValueError(
            f"estimate: unknown backend {backend!r}. Fix: pass 'nccl' (GPUs, the default) or "
            "'gloo' (CPU processes)."
        )
    if world_size is None:
        raise ArgumentValueError(
            f"estimate: {spelled(f'strategy={strategy!r}', f'--strategy {strategy}')} needs "
            f"{option('world_size')}, the number of ranks. Fix: pass "
            f"{spelled('world_size=8', '--world-size 8')} (say) for 8 GPUs."
        )
    world = _positive(world_size, "world_size", "pass the number of ranks, such as 8")
    tp = _positive(tensor_parallel, "tensor_parallel", "pass 1, or the tensor-parallel size")
    if kind == "ddp":
        wrong = [
            k
            for k in (
                "tensor_parallel",
                "reshard_after_forward",
                "mixed_precision",
                "tensor_parallel_plan",
            )
            if given[k]
        ]
        wrong = [option(k) for k in wrong]
        if wrong:
            raise ArgumentValueError(
                f"estimate: {', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply "
                "to DDP, which replicates the model. "
                f"Fix: pass {spelled(_FSDP, '--strategy fsdp')} (FSDP2 and "
                "tensor parallel, Lightning's ModelParallelStrategy), or leave them out."
            )
    elif given["gradient_as_bucket_view"] or given["broadcast_buffers"]:
        name = (
            "gradient_as_bucket_view" if given["gradient_as_bucket_view"] else "broadcast_buffers"
        )
        raise ArgumentValueError(
            f"estimate: {option(name)} is a DDP option. Fix: pass "
            f"{spelled(_DDP, '--strategy ddp')}, or leave it out."
        )
    if world % tp:
        # the nearest multiples of tp around world (only the one above when world < tp)
        near = [m for m in (tp * (world // tp), tp * (world // tp + 1)) if m > 0]
        raise ArgumentValueError(
            f"estimate: {spelled(f'world_size={world}', f'--world-size {world}')} cannot be "
            "divided into a (data_parallel, "
            f"tensor_parallel={tp}) mesh: {world} is not a multiple of {tp}. Fix: pass a "
            f"{option('world_size')} that is a multiple of {tp} (such as "
            f"{' or '.join(map(str, near))}), or a {option('tensor_parallel')} that divides "
            f"{world} ({_divisors(world)})."
        )
    if not isinstance(activation_checkpointing, bool):
        raise ArgumentTypeError(
            f"estimate: activation_checkpointing must be True or False, got "
            f"{activation_checkpointing!r}. Fix: pass activation_checkpointing=True to "
            "checkpoint every block."
        )
    if reshard_after_forward is not None and not isinstance(reshard_after_forward, bool):
        raise ArgumentTypeError(
            f"estimate: reshard_after_forward must be True or False, got "
            f"{reshard_after_forward!r}. Fix: pass True (FSDP2's default) or False."
        )
    param_dtype, reduce_dtype = _mixed_precision(mixed_precision)
    return Parallel(
        strategy=kind,
        world_size=world,
        tensor_parallel=tp,
        activation_checkpointing=activation_checkpointing,
        reshard_after_forward=True if reshard_after_forward is None else reshard_after_forward,
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        blocks=_blocks(blocks),
        plan=_plan(tensor_parallel_plan),
        gradient_as_bucket_view=bool(gradient_as_bucket_view),
        backend=backend or "nccl",
        broadcast_buffers=broadcast_buffers,
    )
