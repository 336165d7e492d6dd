"""Estimate a deep stack of identical blocks from steps with 2, 3 and 4 of them.

A fake training step costs about 0.2 ms of Python per operator, so the 80
decoder layers of a 70B Llama (some 60,000 operators) take 15-20 s, almost
all of it repeating the same block. When a ``ModuleList`` (or ``Sequential``)
holds at least :data:`MIN_BLOCKS` structurally identical blocks, the step is
simulated with the container cut to its first 2, 3 and 4 blocks. Every
count of a :class:`~lightning_meta._estimate._run.StepRecord` must then grow
by the same amount per block (FLOPs, bytes, and the peak of every window of
the step: before, inside and after the blocks of forward, backward and the
optimizer step), and the per-module values of the first, the middle and the
last block must not depend on the depth; then the record of the full depth
follows exactly, block rows (``model.layers.37``) included.

The cut model stands for the full one only if the full forward is the cut
one with more blocks: before the sample steps, the forward (and loss) of the
full model and of the model cut to 2 blocks are run once more, uncounted,
listing every operator with the shapes and dtypes of its results. The full
list must be the cut one with the same block and the same stretch between
two blocks repeated: each block called once, in order, every block running
the same operators, the same operators between any two of them, and the same
before and after. A forward that skips blocks (``self.layers[:6]``), adds a
module every sixth block, or makes a block behave by its index fails that.
Anything else, an operator that fails, a count that is not linear, and the
caller runs the full model instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._estimate._run import StepRecord

__all__ = ["MIN_BLOCKS", "RANK_SAMPLES", "SAMPLES", "Repeat", "extrapolate_step", "find_repeat"]

logger = logging.getLogger(__name__)

#: Fewest blocks worth extrapolating: the three sample steps run 2 + 3 + 4 blocks.
MIN_BLOCKS = 10
#: Depths the step is simulated at.
SAMPLES = (2, 3, 4)
#: Depths under a strategy: FSDP2's buffers of a block depend on whether it is
#: the first, a middle or the last one in backward (prefetch, reduce-scatter
#: kept for the next block), so every sample needs a middle block.
RANK_SAMPLES = (3, 4, 5)

_SCALARS = (
    "loss_flops",
    "activation_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "input_bytes",
    "untracked_tensors",
    "scratch_bound_bytes",
    "rnn_workspace_bytes",
    "rank_forward_flops",
    "rank_backward_flops",
)
_PER_MODULE = (
    "forward_flops",
    "backward_flops",
    "uncounted_forward",
    "uncounted_backward",
    "module_activations",
)


class Refused(Exception):
    """The sample steps do not determine the full step; the reason is the message."""


@dataclasses.dataclass(frozen=True)
class Repeat:
    """A container of ``count`` identical blocks, at dotted ``name`` (``""``: the root)."""

    name: str
    container: nn.Module
    count: int

    def block(self, index: int) -> str:
        """Return the dotted name of block ``index``."""
        return f"{self.name}.{index}" if self.name else str(index)


# The prefix of the ``__dict__`` entries this package keeps on a module
# (``_lightning_meta_deferred``, ``_lightning_meta_load_hooks``).
_OWN_PREFIX = "_lightning_meta_"


def _attributes(block: nn.Module, depth: int = 0) -> list[tuple[str, Any]]:
    """Return the plain attributes of ``block`` and its submodules, tensors by shape and dtype
    (see :func:`_compared`)."""
    out: list[tuple[str, Any]] = []
    for path, mod in block.named_modules(remove_duplicate=False):
        out.append((f"{path}:type", type(mod)))
        for key, value in vars(mod).items():
            if key in ("_parameters", "_buffers", "_modules", "training") or key.startswith(
                _OWN_PREFIX
            ):
                # deferred_init's own entries (every block's tensors have handles of
                # their own) say nothing of what a block computes
                continue
            if key.endswith("_hooks"):
                out.append((f"{path}.{key}", len(value)))
                continue
            out.append((f"{path}.{key}", _compared(value, depth)))
        for named in (mod.named_parameters, mod.named_buffers):
            for name, t in named(recurse=False):
                out.append(
                    (
                        f"{path}.{name}",
                        (
                            tuple(t.shape),
                            t.stride(),
                            t.dtype,
                            t.device.type,
                            t.requires_grad,
                            isinstance(t, nn.Parameter),
                        ),
                    )
                )
    return out


def _compared(value: Any, depth: int) -> Any:
    """``value`` as blocks are compared by: a tensor by shape, dtype and device; a module
    held in a plain attribute by its class and attributes, not by its identity (transformers
    5.25 gives every attention layer a kernel function module of its own in the dict
    ``_kernel_funcs``), two modules deep; lists, tuples and dicts item by item."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, nn.Module):
        return (type(value), _attributes(value, depth + 1) if depth < 2 else None)
    if type(value) in (list, tuple):
        return type(value)(_compared(v, depth) for v in value)
    if type(value) is dict:
        return {k: _compared(v, depth) for k, v in value.items()}
    return value


def _same(values: list[Any]) -> bool:
    first = values[0]
    for v in values[1:]:
        if v is first:
            continue
        try:
            if type(v) is not type(first) or not bool(v == first):
                return False
        except Exception:
            return False
    return True


def _identical(container: nn.Module) -> str | None:
    """Return why the blocks of ``container`` differ, or ``None`` if they are alike.

    An integer attribute may differ only by being the block's own index
    (``layer_idx``); any other attribute, parameter, buffer or submodule
    must agree in type, shape, dtype, stride and value.
    """
    blocks = list(container.children())
    described = [_attributes(b) for b in blocks]
    keys = [[k for k, _ in d] for d in described]
    if any(k != keys[0] for k in keys[1:]):
        return "the blocks have different submodules, parameters or attributes"
    for j, key in enumerate(keys[0]):
        values = [d[j][1] for d in described]
        if _same(values):
            continue
        if all(type(v) is int and v == i for i, v in enumerate(values)):
            continue  # the block's index (layer_idx), used to address caches
        return f"the blocks differ in {key.lstrip('.:')!r}"
    return None


def _varies_in_config(module: nn.Module, n: int) -> str | None:
    """Why a per-block setting in a ``config`` makes the blocks differ, or ``None``.

    Blocks that look alike can still behave differently when their forward
    reads ``config.layer_types[self.layer_idx]`` (transformers' sliding and
    full attention layers); the sample steps would then not represent the
    others, so any ``config`` attribute with one differing value per block
    refuses extrapolation.
    """
    configs = {id(c): c for m in module.modules() if (c := getattr(m, "config", None)) is not None}
    for config in configs.values():
        for key, value in sorted(getattr(config, "__dict__", {}).items()):
            if isinstance(value, (list, tuple)) and len(value) == n and not _same(list(value)):
                return f"config.{key} differs between blocks"
    return None


def find_repeat(module: nn.Module) -> tuple[Repeat | None, str]:
    """Return the largest container of at least ``MIN_BLOCKS`` identical blocks, and why if none.

    Blocks must be the container's items ``"0"`` to ``"N-1"``, alike (see
    :func:`_identical`), and own their tensors: none may be shared with
    another block or with the rest of the model (tied weights).
    """
    counts: dict[int, int] = {}
    for named in (module.named_parameters, module.named_buffers):
        for _, t in named(remove_duplicate=False):
            counts[id(t)] = counts.get(id(t), 0) + 1
    reason = ""
    candidates = [
        (name, mod)
        for name, mod in module.named_modules()
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= MIN_BLOCKS
    ]
    candidates.sort(key=lambda c: -len(c[1]))
    for name, mod in candidates:
        where = name or "the root"
        if list(_compat.children_of(mod)) != [str(i) for i in range(len(mod))]:
            reason = reason or f"{where}: items are not named 0 to N-1"
            continue
        why = _identical(mod) or _varies_in_config(module, len(mod))
        if why is None and any(counts[id(t)] > 1 for t in [*mod.parameters(), *mod.buffers()]):
            why = "a block shares a tensor with another module"
        if why is not None:
            reason = reason or f"{where}: {why}"
            continue
        return Repeat(name, mod, len(mod)), ""
    return None, reason


@contextlib.contextmanager
def _cut(rep: Repeat, k: int) -> Iterator[list[int]]:
    """Leave only the first ``k`` blocks in the container; yield how often each one ran."""
    saved = dict(_compat.children_of(rep.container))
    calls = [0] * k

    def counter(i: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any) -> None:
            calls[i] += 1

        return hook

    blocks = list(saved.values())[:k]
    handles = [
        b.register_forward_pre_hook(counter(i)) for i, b in enumerate(blocks) if b is not None
    ]
    try:
        with _compat.children_replaced(rep.container, dict(list(saved.items())[:k])):
            yield calls
    finally:
        for h in handles:
            h.remove()


_ENTER, _EXIT = "enter", "exit"


def _schedule(rep: Repeat, trace: Callable[[list[Any]], None], k: int) -> list[Any]:
    """Run ``trace`` with the container's first ``k`` blocks marking where they start and end."""
    events: list[Any] = []

    def marker(kind: str, i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            events.append((kind, i))

        return hook

    blocks = list(_compat.children_of(rep.container).values())[:k]
    handles = []
    try:
        for i, b in enumerate(blocks):
            if b is not None:
                handles.append(b.register_forward_pre_hook(marker(_ENTER, i)))
                handles.append(b.register_forward_hook(marker(_EXIT, i)))
        trace(events)
    finally:
        for h in handles:
            h.remove()
    return events


def _segments(
    events: list[Any], k: int
) -> tuple[list[Any], list[list[Any]], list[list[Any]], list[Any]]:
    """Split a schedule into (before, each block's operators, each stretch between two, after)."""
    before: list[Any] = []
    inside: list[list[Any]] = []
    between: list[list[Any]] = []
    current, entered = before, None
    for event in events:
        if event[0] == _ENTER:
            if entered is not None or event[1] != len(inside):
                raise Refused(
                    f"the forward does not call each block once per step, in order "
                    f"(block {event[1]} after {len(inside)} finished)"
                )
            if inside:
                between.append(current)
            current, entered = [], event[1]
        elif event[0] == _EXIT:
            inside.append(current)
            current, entered = [], None
        else:
            current.append(event)
    if entered is not None or len(inside) != k:
        raise Refused(
            f"the forward does not call each block once per step ({len(inside)} of {k} called)"
        )
    return before, inside, between, current


def _same_schedule(cut: list[Any], full: list[Any], k: int, n: int) -> None:
    """Refuse unless the full forward is the cut one with its block and stretch between repeated."""
    before, inside, between, after = _segments(full, n)
    cut_before, cut_inside, cut_between, cut_after = _segments(cut, k)
    if any(ops != cut_inside[0] for ops in [*cut_inside, *inside]):
        first = next(i for i, ops in enumerate(inside) if ops != cut_inside[0])
        raise Refused(
            f"block {first} runs other operators than block 0, or the same with gradients "
            "off or under activation checkpointing"
        )
    if any(ops != cut_between[0] for ops in [*cut_between, *between]):
        first = next(i for i, ops in enumerate(between) if ops != cut_between[0])
        raise Refused(f"the forward runs other operators after block {first} than after block 0")
    if before != cut_before or after != cut_after:
        where = "before" if before != cut_before else "after"
        raise Refused(f"the forward runs other operators {where} the blocks with all {n} of them")


def _line(values: list[int], what: str, n: int, first: int = SAMPLES[0]) -> int:
    """Return the value at depth ``n`` of ``values`` taken at consecutive depths from ``first``, if linear."""
    slope = values[1] - values[0]
    for a, b in itertools.pairwise(values):
        if b - a != slope:
            raise Refused(f"{what} is not linear in the number of blocks ({values})")
    return values[0] + (n - first) * slope


def _split(rep: Repeat, name: str) -> tuple[int, str] | None:
    """Return ``(block index, rest)`` for a module name inside a block, else ``None``."""
    prefix = f"{rep.name}." if rep.name else ""
    if not name.startswith(prefix):
        return None
    head, _, rest = name[len(prefix) :].partition(".")
    return (int(head), rest) if head.isdigit() else None


def _per_module(
    rep: Repeat,
    dicts: list[dict[str, int]],
    what: str,
    n: int,
    samples: tuple[int, ...] = SAMPLES,
) -> dict[str, int]:
    """Extrapolate per-module counts: linear outside the blocks, by role (first/middle/last) inside."""
    outside: set[str] = set()
    rests: set[str] = set()
    for d in dicts:
        for name in d:
            found = _split(rep, name)
            if found is None:
                outside.add(name)
            else:
                rests.add(found[1])
    out: dict[str, int] = {}
    for name in sorted(outside):
        value = _line(
            [d.get(name, 0) for d in dicts], f"{what} of {name or 'the model'!r}", n, samples[0]
        )
        if value:
            out[name] = value
    for rest in sorted(rests):
        roles: dict[str, set[int]] = {"first": set(), "middle": set(), "last": set()}
        for k, d in zip(samples, dicts, strict=True):
            for i in range(k):
                role = "first" if i == 0 else "last" if i == k - 1 else "middle"
                full = rep.block(i) + (f".{rest}" if rest else "")
                roles[role].add(d.get(full, 0))
        if any(len(v) > 1 for v in roles.values()):
            raise Refused(f"{what} of block {rest or 'itself'!r} depends on the depth ({roles})")
        first, middle, last = (next(iter(roles[r])) for r in ("first", "middle", "last"))
        for i in range(n):
            value = first if i == 0 else last if i == n - 1 else middle
            if value:
                out[rep.block(i) + (f".{rest}" if rest else "")] = value
    return out


def _peak(
    records: list[StepRecord], n: int, first: int = SAMPLES[0]
) -> tuple[int, dict[str, int], str]:
    """Extrapolate the peak of every window of the step; return the largest, first in time."""
    windows = list(records[-1].window_peaks)
    if any(list(r.window_peaks) != windows for r in records):
        raise Refused("the step passes through different windows at different depths")
    for r in records:
        if r.peak_bytes != max((v[0] for v in r.window_peaks.values()), default=0):
            raise Refused("the peak lies outside the windows followed")
    best: tuple[int, dict[str, int], str] | None = None
    for window in windows:
        total = _line(
            [r.window_peaks[window][0] for r in records], f"the peak of {window!r}", n, first
        )
        categories = records[-1].window_peaks[window][1]
        breakdown = {
            cat: _line(
                [r.window_peaks[window][1].get(cat, 0) for r in records],
                f"{cat} at {window!r}",
                n,
                first,
            )
            for cat in categories
        }
        if sum(breakdown.values()) != total:
            raise Refused(f"the breakdown of {window!r} does not add up")
        if best is None or total > best[0]:
            best = (total, breakdown, window.partition("|")[0])
    if best is None:
        raise Refused("no allocation was seen")
    return best


def extrapolate_step(
    rep: Repeat,
    run: Callable[[str], StepRecord],
    trace: Callable[[list[Any]], None],
    root: str,
    samples: tuple[int, ...] = SAMPLES,
) -> tuple[StepRecord | None, str]:
    """Simulate the step at depths ``samples`` and return the record at full depth, or why not.

    Args:
        rep: the container of identical blocks.
        run: runs the step of the (cut) model with the given block prefix,
            returning its record; may raise.
        trace: runs the forward and loss of the (cut) model, appending every
            operator to the list given (see
            :func:`~lightning_meta._estimate._run.trace_forward`); may raise.
        root: the class name of the model, as the FLOP counter names it.
        samples: three consecutive depths (:data:`SAMPLES`, or
            :data:`RANK_SAMPLES` under a strategy).

    Returns:
        ``(record, "")`` for the full depth, or ``(None, reason)`` if the
        sample steps do not determine it.
    """
    prefix = f"{root}.{rep.name}." if rep.name else f"{root}."
    k = SAMPLES[0]
    try:
        full = _schedule(rep, trace, rep.count)
        with _cut(rep, k):
            cut = _schedule(rep, trace, k)
        _same_schedule(cut, full, k, rep.count)
    except Refused as e:
        logger.info("estimate: not extrapolating %s: %s", rep.name or "the root", e)
        return None, str(e)
    except Exception as e:  # the full run reports it, named
        return None, f"the forward failed while its operators were listed ({type(e).__name__})"
    records = []
    for k in samples:
        with _cut(rep, k) as calls:
            try:
                records.append(run(prefix))
            except Exception as e:  # the full run reports it, named
                return None, f"the step with {k} blocks failed ({type(e).__name__})"
        if len(set(calls)) != 1 or calls[0] == 0:
            return None, f"the forward does not call each block once per step (calls: {calls})"
    try:
        out = StepRecord()
        n = rep.count
        for name in _SCALARS:
            setattr(out, name, _line([getattr(r, name) for r in records], name, n, samples[0]))
        for name in _PER_MODULE:
            dicts = [getattr(r, name) for r in records]
            setattr(out, name, _per_module(rep, dicts, name, n, samples))
        out.peak_bytes, out.peak_breakdown, out.peak_phase = _peak(records, n, samples[0])
        out.zero_input_reads = list(dict.fromkeys(x for r in records for x in r.zero_input_reads))
        out.scratch_kernels = list(dict.fromkeys(x for r in records for x in r.scratch_kernels))
    except Refused as e:
        logger.info("estimate: not extrapolating %s: %s", rep.name or "the root", e)
        return None, str(e)
    out.stage = "done"
    return out, ""
