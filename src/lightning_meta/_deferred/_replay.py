"""Replay a slice of a :class:`~lightning_meta._deferred._record.Record` with real tensors.

Guarantee on random numbers: every random op is replayed in recorded order
from the generator state it met while the model was built, so a value is
bit-identical to eager construction whichever subset is materialized first.
States are known at the block's entry (and wherever the model reseeded) and
are cached at every random op any replay passes; a slice starts from the
nearest known state at or before its first draw and re-draws the ops in
between into scratch tensors of the recorded shape (discarded at once), so
memory stays at the slice plus the largest single tensor.
"""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from lightning_meta import _compat
from lightning_meta._deferred._record import DEFAULT_STREAM, GenRef, Op, Record, Ref
from lightning_meta._deferred._rng import (
    ReplayRng,
    get_default_state,
    set_default_state,
    stream_key,
)
from lightning_meta._errors import MaterializationError

# Random ops whose generator consumption depends only on the metadata of their
# tensor arguments, so skipped draws can run on scratch tensors.
_METADATA_ONLY = frozenset(
    {
        "aten.normal_",
        "aten.uniform_",
        "aten.random_",
        "aten.exponential_",
        "aten.cauchy_",
        "aten.log_normal_",
        "aten.geometric_",
        "aten.randn_like",
        "aten.rand_like",
        "aten.randint_like",
    }
)


@functools.cache
def _resolve(name: str) -> Any:
    """Return the ATen overload named ``name`` (``"aten.add.Tensor"``)."""
    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


def _placeholder_ok(op: Op) -> bool:
    """Whether random op ``op`` can be redrawn on scratch tensors (its draws need metadata only)."""
    if not op.reads:
        return True
    base = op.name.rsplit(".", 1)[0]
    if base.endswith("_like"):
        return base in _METADATA_ONLY
    return (base in _METADATA_ONLY or op.name == "aten.bernoulli_.float") and set(op.reads) <= set(
        op.writes
    )


def _slice(ops: list[Op], storages: set[int]) -> set[int]:
    """Return the ops that contribute to ``storages`` (reverse dependency scan)."""
    needed = set(storages)
    chosen: set[int] = set()
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if needed.isdisjoint(op.touch):
            continue
        chosen.add(i)
        needed.update(op.read)
    return chosen


def _start_index(record: Record, stream: int, first: int, rdev: torch.device) -> int:
    """Return the latest random op at or before ``first`` whose state is known."""
    known = record.states.setdefault(stream_key(stream, rdev), {})
    earlier = [i for i in known if i <= first]
    if earlier:
        return max(earlier)
    head = record.random_ops(stream)[0]
    if stream != DEFAULT_STREAM:
        known[head] = record.streams[stream].start
    elif record.prev is not None:
        known[head] = end_state(record.prev, rdev)
    else:
        # Drawing on an accelerator whose generator was not captured at entry:
        # continue from where it is now (nothing in the block advanced it).
        known[head] = get_default_state(rdev)
    return head


def end_state(record: Record, rdev: torch.device) -> torch.Tensor:
    """Return the default generator state eager construction of the block ends at."""
    key = stream_key(DEFAULT_STREAM, rdev)
    if rdev.type == "cpu" and record.exit_pin is not None:
        return record.exit_pin
    if key in record.ends:
        return record.ends[key]
    if not record.random_ops(DEFAULT_STREAM):
        if record.released and record.prev is None:
            raise MaterializationError(
                f"materialize cannot tell where the {rdev} generator would stand after a "
                "deferred_init block whose record was already released. Fix: materialize "
                "blocks built one after another with the same draw_on."
            )
        state = end_state(record.prev, rdev) if record.prev is not None else get_default_state(rdev)
        record.ends[key] = state
        return state
    if record.released:
        raise MaterializationError(
            f"materialize needs the {rdev} generator state after an earlier deferred_init "
            "block that was already materialized with another draw_on. Fix: use the same "
            "draw_on for every block built one after another."
        )
    replay(record, {}, device=rdev, dtype=None, rdev=rdev, through_end=True)
    return record.ends[key]


def _plan(
    record: Record, targets: set[int], rdev: torch.device, through_end: bool
) -> tuple[list[int], set[int]]:
    """Return the ops to run, in order, and those run on scratch tensors to advance a generator."""
    ops = record.ops
    storages = {record.values[v].storage for v in targets}
    while True:
        full = _slice(ops, storages)
        streams = {ops[i].stream for i in full if ops[i].stream is not None}
        if through_end:
            streams |= {op.stream for op in ops if op.stream is not None}
        walk: set[int] = set()
        extra: set[int] = set()
        for stream in sorted(s for s in streams if s is not None):
            index = record.random_ops(stream)
            drawn = [i for i in index if i in full]
            last = index[-1] if through_end else max(drawn)
            start = _start_index(record, stream, min(drawn) if drawn else last, rdev)
            for j in index[bisect.bisect_left(index, start) : bisect.bisect_right(index, last)]:
                if j in full:
                    continue
                if _placeholder_ok(ops[j]):
                    walk.add(j)
                else:
                    extra |= ops[j].touch
        if not extra:
            return sorted(full | walk), walk
        storages |= extra


def replay(
    record: Record,
    targets: dict[int, str],
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    rdev: torch.device,
    through_end: bool = False,
) -> dict[int, torch.Tensor]:
    """Return real tensors for the value ids in ``targets`` (id -> dotted path).

    Replays on ``rdev`` (the device whose generator draws), then moves each
    result to ``device`` and casts floating point ones to ``dtype`` as soon as
    its last write has run. The default generators of ``cpu`` and ``rdev`` are
    restored afterwards; the caller decides where they end up.
    """
    with record.lock:
        order, scratch = _plan(record, set(targets), rdev, through_end)
        _check_constants(record, order, scratch, targets)
        saved = [(d, get_default_state(d)) for d in {torch.device("cpu"), rdev}]
        try:
            return _execute(record, order, scratch, targets, device, dtype, rdev)
        finally:
            for d, state in saved:
                set_default_state(d, state)


def _check_constants(
    record: Record, order: list[int], scratch: set[int], targets: dict[int, str]
) -> None:
    """Refuse to replay an op reading a captured real tensor modified in place since."""
    for i in order:
        if i in scratch:
            continue
        op = record.ops[i]
        for v in op.reads:
            const = record.constants.get(v)
            if const is not None and _compat.version_of(const[0]) != const[1]:
                hit = _paths_needing(record, i, targets)
                names = ", ".join(repr(p) for p in hit) or "the module"
                raise MaterializationError(
                    f"materialize cannot replay {op.name} issued at {op.site} for {names}: it "
                    "reads a real tensor captured while recording that was modified in place "
                    f"since (version {const[1]} -> {_compat.version_of(const[0])}), so the "
                    "result would differ from eager construction. Fix: pass a clone of the "
                    "tensor into the deferred_init block, or do not modify it before "
                    "materializing.",
                    paths=hit,
                )


def _paths_needing(record: Record, i: int, targets: dict[int, str]) -> list[str]:
    """Return the paths of the ``targets`` whose value op ``i`` contributes to, sorted."""
    return sorted(
        p for t, p in targets.items() if i in _slice(record.ops, {record.values[t].storage})
    )


def _lifetimes(
    record: Record, order: list[int], scratch: set[int], targets: dict[int, str]
) -> tuple[dict[int, int], dict[int, list[int]]]:
    """Return the last op using each value id, and the targets final after each op.

    Values are dropped after their last use, and a target is moved and cast
    once the last op writing its storage has run, so memory stays at what is
    still needed.
    """
    ops, values = record.ops, record.values
    last_use: dict[int, int] = {}
    finalize_at: dict[int, list[int]] = {}
    last_write: dict[int, int] = {}
    for i in order:
        if i in scratch:
            continue
        for v in (*ops[i].reads, *(o for o in ops[i].outs if o is not None)):
            last_use[v] = i
        for s in ops[i].touch:
            last_write[s] = i
    for t in targets:
        finalize_at.setdefault(last_write[values[t].storage], []).append(t)
    return last_use, finalize_at


def _execute(
    record: Record,
    order: list[int],
    scratch: set[int],
    targets: dict[int, str],
    device: torch.device,
    dtype: torch.dtype | None,
    rdev: torch.device,
) -> dict[int, torch.Tensor]:
    """Run the ops in ``order`` (those in ``scratch`` on blank tensors) and return the targets."""
    ops, values = record.ops, record.values
    last_use, finalize_at = _lifetimes(record, order, scratch, targets)
    rng = ReplayRng(record, rdev)
    on_device = rdev.type != "cpu"
    env: dict[int, torch.Tensor] = {}
    results: dict[int, torch.Tensor] = {}

    def fetch(v: int) -> torch.Tensor:
        t = env.get(v)
        if t is None:
            t = record.constants[v][0]
            t = env[v] = t.to(rdev) if on_device else t
        return t

    def blank(v: int) -> torch.Tensor:
        meta = values[v]
        return torch.empty_strided(meta.size, meta.stride, dtype=meta.dtype, device=rdev)

    for i in order:
        op = ops[i]
        if op.stream is not None:
            rng.enter(i, op.stream)
        args, kwargs = _bind(op, blank if i in scratch else fetch, rng, rdev if on_device else None)
        try:
            out = _resolve(op.name)(*args, **kwargs)
        except Exception as e:
            raise _replay_error(record, i, targets, rdev, e) from e
        if op.stream is not None:
            rng.leave(i, op.stream)
        if i in scratch:
            continue
        flat = out if isinstance(out, (list, tuple)) else (out,)
        for leaf, vid in zip(flat, op.outs, strict=True):
            if vid is not None:
                env[vid] = leaf
        for t in finalize_at.pop(i, ()):
            results[t] = _finish(env[t], device, dtype)
        for v in (*op.reads, *(o for o in op.outs if o is not None)):
            if last_use.get(v, -1) <= i and (v not in targets or v in results):
                env.pop(v, None)
    return results


def _replay_error(
    record: Record, i: int, targets: dict[int, str], rdev: torch.device, e: Exception
) -> MaterializationError:
    """Return the error for op ``i`` failing on real tensors, naming the tensors it blocks."""
    op = record.ops[i]
    site = f" issued at {op.site}" if op.site else ""
    # A draw on scratch tensors feeds no target but blocks every one after it.
    paths = _paths_needing(record, i, targets) or sorted(set(targets.values()))
    return MaterializationError(
        f"materialize could not replay {op.name}{site} on {rdev}: "
        f"{type(e).__name__}: {e}. Fix: materialize with draw_on='cpu', or build this "
        "part of the model outside deferred_init.",
        paths=paths,
    )


def _finish(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Return ``t`` on ``device``, cast to ``dtype`` if floating point (itself if already so)."""
    cast = dtype if dtype is not None and t.is_floating_point() else None
    if t.device == device and (cast is None or t.dtype == cast):
        return t
    return t.to(device=device, dtype=cast)


def _bind(
    op: Op,
    tensor: Callable[[int], torch.Tensor],
    rng: ReplayRng,
    move_to: torch.device | None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Return ``op``'s arguments with real tensors, generators and devices in place of the log's."""

    def leaf(x: Any) -> Any:
        if isinstance(x, Ref):
            return tensor(x.vid)
        if isinstance(x, (list, tuple)):
            return type(x)(leaf(y) for y in x)
        if isinstance(x, GenRef):
            return rng.generator(x.stream)
        if move_to is not None and isinstance(x, torch.device) and x.type == "cpu":
            return move_to
        return x

    args = tuple(leaf(a) for a in op.args)
    kwargs = {k: leaf(v) for k, v in op.kwargs.items()}
    if move_to is not None and "device" in kwargs and kwargs["device"] is None:
        kwargs["device"] = move_to
    return args, kwargs


def complete(record: Record, rdev: torch.device) -> None:
    """Settle the generators once every deferred tensor of ``record`` is real, then release it.

    The default generator moves to where eager construction would have left
    it, but only in the process that recorded the block and only if nobody
    reseeded or drew from it since the block exited (then it is left alone).
    Releasing is :meth:`Record.release`, the record's own method, called under
    its lock so two threads cannot both move the generators; which records are
    finished is for :mod:`~lightning_meta._deferred._handles` to say.
    """
    with record.lock:
        if record.released:
            return
        has_draws = bool(record.random_ops(DEFAULT_STREAM)) or record.exit_pin is not None
        if has_draws or record.prev is not None:
            end = end_state(record, rdev)
            if record.pid == os.getpid():
                current = get_default_state(rdev)
                key = stream_key(DEFAULT_STREAM, rdev)
                head = record.random_ops(DEFAULT_STREAM)[:1]
                start = record.states.get(key, {}).get(head[0]) if head else None
                # On the CPU the block parked the generator on ``exit_state``;
                # elsewhere nothing parks it, so compare with where draws began.
                parked = record.exit_state if rdev.type == "cpu" else start
                untouched = parked is not None and torch.equal(current, parked)
                if untouched:
                    set_default_state(rdev, end)
        for k, stream in enumerate(record.streams):
            if stream.owner is None or not torch.equal(stream.owner.get_state(), stream.start):
                continue
            key = stream_key(k, rdev)
            if key not in record.ends:
                replay(record, {}, device=rdev, dtype=None, rdev=rdev, through_end=True)
            stream.owner.set_state(record.ends[key])
        record.release()
