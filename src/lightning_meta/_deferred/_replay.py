"""Replay a slice of a :class:`~lightning_meta._deferred._record.Record` with real tensors.

Guarantee on random numbers: every random op is replayed from the generator
state it met while the model was built (noted for every draw while
recording), so a value is bit-identical to eager construction whichever
subset is materialized first, and only the draws a value needs are made:
a draw overwritten whole later (``kaiming_uniform_`` in ``nn.Linear``, then
the model's own ``normal_``) is skipped. Each op runs under the default
dtype it was recorded under. Memory stays at the slice plus what is still
needed: every value is dropped after its last use.

Streams whose states were not noted (a CPU stream redrawn on an accelerator
with ``draw_on="device"``) start from the nearest known state at or before
their first draw and redraw the ops in between into scratch tensors of the
recorded shape.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import torch

from lightning_meta import _compat
from lightning_meta._deferred import _ambient
from lightning_meta._deferred._record import LIFT_FRESH, RANDOM_FILLS, GenRef, Op, Record, Ref
from lightning_meta._deferred._rng import ReplayRng, set_default_state
from lightning_meta._errors import MaterializationError

__all__ = ["complete", "replay", "replay_inputs", "same_bits", "slice_ops"]

# Random ops whose generator consumption depends only on the metadata of their
# tensor arguments, so skipped draws can run on scratch tensors.
_METADATA_ONLY = RANDOM_FILLS | {"aten.randn_like", "aten.rand_like", "aten.randint_like"}


@functools.cache
def _resolve(name: str) -> Any:
    """Return the ATen overload named ``name`` (``"aten.add.Tensor"``), looked up once."""
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


def slice_ops(
    ops: list[Op], storages: set[int], vids: set[int], values: list[Any]
) -> tuple[set[int], set[int]]:
    """Return the ops that contribute to ``storages`` and the ops that only make a tensor.

    A reverse scan. An op that overwrites a storage whole without reading it
    (``Op.kills``) ends the need for what came before in that storage; an op
    still needed only because it makes a tensor object a later op writes
    into is returned in the second set when its outputs are new storages:
    replay makes blank tensors of the recorded layout instead of running it.
    """
    needed = set(storages)
    undefined = set(vids)
    chosen: set[int] = set()
    blanks: set[int] = set()
    for i in range(len(ops) - 1, -1, -1):
        if not needed and not undefined:
            break  # nothing earlier can contribute or define: reads stay cheap
        op = ops[i]
        contributes = not needed.isdisjoint(op.touch)
        defines = False
        if not contributes:
            for o in op.outs:
                # An in-place op returns the tensor it was given: it does not
                # make that tensor, so a draw overwritten whole later is skipped.
                if o is not None and o in undefined and o not in op.reads:
                    defines = True
                    break
            if not defines:
                continue
        for o in op.outs:
            if o is not None and (contributes or o not in op.reads):
                undefined.discard(o)
        if not contributes and op.read.isdisjoint(
            values[o].storage for o in op.outs if o is not None
        ):
            blanks.add(i)
            continue
        chosen.add(i)
        undefined.update(op.reads)
        if contributes:
            needed.difference_update(op.kills)
            needed.update(op.read - op.kills)
    return chosen, blanks


def _plan(
    record: Record, targets: set[int], rng: ReplayRng, through_end: bool
) -> tuple[list[int], set[int], set[int]]:
    """Return the ops to run in order, those run on scratch tensors, and those made blank."""
    ops, values = record.ops, record.values
    storages = {values[v].storage for v in targets}
    while True:
        chosen, blanks = slice_ops(ops, storages, set(targets), values)
        streams = {ops[i].stream for i in chosen if ops[i].stream is not None}
        if through_end:
            streams |= set(record.random_index)
        walk: set[int] = set()
        extra: set[int] = set()
        for stream in sorted(s for s in streams if s is not None):
            if rng.known(stream):
                continue
            index = record.random_ops(stream)
            drawn = [i for i in index if i in chosen]
            last = index[-1] if through_end else max(drawn)
            start = _start_index(record, rng, stream, min(drawn) if drawn else last)
            for j in index[bisect.bisect_left(index, start) : bisect.bisect_right(index, last)]:
                if j in chosen:
                    continue
                blanks.discard(j)
                if _placeholder_ok(ops[j]):
                    walk.add(j)
                else:
                    extra |= ops[j].touch
        if not extra:
            return sorted(chosen | walk | blanks), walk, blanks - walk
        storages |= extra


def _start_index(record: Record, rng: ReplayRng, stream: int, first: int) -> int:
    """Return the latest random op at or before ``first`` whose state is known."""
    known = record.states.setdefault(rng.key(stream), {})
    earlier = [i for i in known if i <= first]
    if earlier:
        return max(earlier)
    head = record.random_ops(stream)[0]
    # Drawing on an accelerator whose generator was not noted while recording:
    # continue from where it is now (nothing in the block advanced it).
    known[head] = rng.current(stream)
    return head


def replay_inputs(record: Record, targets: set[int], remap: torch.device | None) -> bytes:
    """A digest of what a replay of ``targets`` takes from outside the op log.

    The generator state set before each of its draws (the first state only,
    for a stream whose states were not noted: see ``_start_index``), the
    captured real tensors it reads, and each op with its arguments other
    than tensors and devices (a scale of ``1.0 + rank``, ``arange(rank, ...)``).
    Ops and values are numbered within the replay, not the record: an op one
    rank alone ran that the replay does not need changes nothing. Equal
    digests mean equal results: tensor parallel materialize compares them
    between ranks.
    """
    digest = hashlib.sha256()
    local: dict[int, int] = {}  # value id -> its number in this replay
    with record.lock:
        rng = ReplayRng(record, remap)
        order, _, blanks = _plan(record, targets, rng, False)
        for k, i in enumerate(order):
            if i in blanks:
                continue
            op = record.ops[i]
            args = _stable((op.args, op.kwargs), local)
            outs = [local.setdefault(o, len(local)) if o is not None else -1 for o in op.outs]
            digest.update(f"o{k}:{op.name}:{args}:{outs};".encode())
            if op.stream is not None and not rng.on_meta(op.stream):
                state = record.states.get(rng.key(op.stream), {}).get(i)
                if state is not None:
                    digest.update(b"s%d:" % k + state.numpy().tobytes())
            for v in op.reads:
                const = record.constants.get(v)
                if const is not None:
                    data = const[0].detach().reshape(-1).cpu().contiguous()
                    digest.update(
                        b"c%d:" % local.setdefault(v, len(local))
                        + data.view(torch.uint8).numpy().tobytes()
                    )
    return digest.digest()


def _stable(x: Any, local: dict[int, int]) -> str:
    """``x`` spelled the same in every process: tensors by their number in ``local``
    (given in order of first use), generators by stream, devices left out (each rank
    replays on its own)."""
    if isinstance(x, Ref):
        return f"R{local.setdefault(x.vid, len(local))}"
    if isinstance(x, GenRef):
        return f"G{x.stream}"
    if isinstance(x, torch.device):
        return "D"
    if isinstance(x, (list, tuple)):
        return "(" + ",".join(_stable(y, local) for y in x) + ")"
    if isinstance(x, dict):
        return "{" + ",".join(f"{k}={_stable(v, local)}" for k, v in sorted(x.items())) + "}"
    return repr(x)


def replay(
    record: Record,
    targets: dict[int, str],
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    remap: torch.device | None = None,
    through_end: bool = False,
    preset: tuple[int, torch.Tensor] | None = None,
) -> dict[int, torch.Tensor]:
    """Return real tensors for the value ids in ``targets`` (id -> dotted path).

    Each result is moved to ``device`` and floating point ones cast to
    ``dtype`` as soon as its last write has run. ``remap`` redraws CPU
    default streams on that device's generator (``draw_on="device"``).
    Random ops draw from the replay's own generators, never the global ones
    (see ``_rng``); the default dtype and the settings of ``_ambient`` are
    restored afterwards.
    ``preset`` is ``(i, drawn)``: random op ``i`` (an in-place draw that
    reads nothing but the tensor it fills, from a known state) already ran
    for real while recording and gave ``drawn``, so it is copied, not redrawn.
    """
    with record.lock:
        rng = ReplayRng(record, remap)
        order, scratch, blanks = _plan(record, set(targets), rng, through_end)
        _check_constants(record, order, scratch | blanks, targets)
        default_dtype = torch.get_default_dtype()
        # The settings in force, then those each op ran under (see _execute).
        ambient = [_ambient.now()] * 2
        try:
            # Ops run as they were recorded: autocast (whose casts, if the
            # block ran under it, are in the log already) and inference mode
            # of the caller stay out, the settings of the block come back.
            with _ambient.outside(record.inference):
                # What the ops start from: leaving the caller's inference mode
                # turns grad mode back on.
                ambient[1] = _ambient.now()
                results = _execute(
                    record,
                    order,
                    scratch,
                    blanks,
                    targets,
                    device,
                    dtype,
                    rng,
                    remap,
                    preset,
                    ambient,
                )
            if record.numpy_homes:
                _numpy_memory(record, results, targets, device, dtype)
            return results
        finally:
            torch.set_default_dtype(default_dtype)
            if ambient[1] != ambient[0]:
                _ambient.put(ambient[0])


def _numpy_memory(
    record: Record,
    results: dict[int, torch.Tensor],
    targets: dict[int, str],
    device: torch.device,
    dtype: torch.dtype | None,
) -> None:
    """Give the results on a storage a numpy array of the block shares that array's memory.

    Eager's array and tensor share memory: a write through the array, also
    after the block, is the tensor's. The array's memory holds the replayed
    values plus those writes (torch writes were refused while it lived), so it
    becomes the tensors' memory; moved or cast, they are ``module.to()``'s
    copies of it. An array of a part of the storage cannot be its memory.

    Raises:
        MaterializationError: such an array is still alive, or was written
            after the block.
    """
    values = record.values
    for vid in list(results):
        meta = values[vid]
        home = record.numpy_homes.get(meta.storage)
        if home is None:
            continue
        if home.whole:
            with torch.no_grad():
                shared = torch.empty(0, dtype=meta.dtype).set_(
                    home.real.untyped_storage(), meta.offset, meta.size, meta.stride
                )
            results[vid] = _finish(shared, device, dtype)
            continue
        assert home.logged is not None
        if home.alive():
            how = "is still alive, and eager's shares the tensor's memory"
        elif not same_bits(home.real, home.logged):
            how = "was written after the block, which eager's tensor would hold"
        else:
            continue
        path = targets[vid]
        raise MaterializationError(
            f"materialize cannot give {path!r} the memory of the numpy array Tensor.numpy "
            f"returned at {home.site} for a part of it (a view of its memory): that array "
            f"{how}; the block's array holds a copy of that part only. Fix: call .numpy() on "
            "the whole tensor and index the array, or let the array go (del it) before the "
            "block ends, or call .numpy() after materialize.",
            paths=[path],
        )


def _check_constants(
    record: Record, order: list[int], skipped: set[int], targets: dict[int, str]
) -> None:
    """Refuse to replay an op reading a captured real tensor modified in place since."""
    for i in order:
        if i in skipped:
            continue
        op = record.ops[i]
        for v in op.reads:
            const = record.constants.get(v)
            if const is None:
                continue
            now = _compat.version_of(const[0])
            place = record.places.get(v)
            if place is not None and not place.holds(const[0]):
                how = (
                    "given other memory since (its module cast or moved: .to(), .double(); "
                    "its .data assigned; or its storage resized or freed: resize_())"
                )
            elif now != const[1]:
                how = f"modified in place since (version {const[1]} -> {now})"
            elif v in record.snapshots and not same_bits(record.snapshots[v], const[0]):
                how = "changed since (through .data or memory shared with numpy)"
            else:
                continue
            hit = _paths_needing(record, i, targets)
            names = ", ".join(repr(p) for p in hit) or "the module"
            raise MaterializationError(
                f"materialize cannot replay {op.name} issued at {op.site} for {names}: it "
                f"reads a real tensor captured while recording that was {how}, so the "
                "result would differ from eager construction. Fix: pass a clone of the "
                "tensor into the deferred_init block, or do not modify it before "
                "materializing.",
                paths=hit,
            )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same bits (NaN included), shape and dtype alike."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(_bits(a), _bits(b))


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Dense, in order, with conjugate and negative bits applied: a captured view
    # (w[:, ::2], w.conj()) cannot be viewed as bytes as it is.
    return t.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def _paths_needing(record: Record, i: int, targets: dict[int, str]) -> list[str]:
    """Return the paths of the ``targets`` whose value op ``i`` contributes to, sorted."""
    found = []
    for t, p in targets.items():
        chosen, _ = slice_ops(record.ops, {record.values[t].storage}, {t}, record.values)
        if i in chosen:
            found.append(p)
    return sorted(found)


def _lifetimes(
    record: Record, order: list[int], skipped: set[int], targets: dict[int, str]
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
        if i in skipped:
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
    blanks: set[int],
    targets: dict[int, str],
    device: torch.device,
    dtype: torch.dtype | None,
    rng: ReplayRng,
    remap: torch.device | None,
    preset: tuple[int, torch.Tensor] | None = None,
    ambient: list[_ambient.Ambient] | None = None,
) -> dict[int, torch.Tensor]:
    """Run the ops in ``order`` (``scratch`` ones on blank tensors, ``blanks`` not at all).

    ``ambient``: the settings in force at entry and (kept up to date here)
    those the last op ran under.
    """
    ops, values = record.ops, record.values
    last_use, finalize_at = _lifetimes(record, order, scratch, targets)
    # Redraws on scratch that also make a tensor a later op writes into.
    defines = {i for i in scratch if any(o in last_use for o in ops[i].outs if o is not None)}
    env: dict[int, torch.Tensor] = {}
    results: dict[int, torch.Tensor] = {}
    current_dtype: torch.dtype | None = None
    ambient = ambient if ambient is not None else [_ambient.now()] * 2

    captured = {id(t) for t, _ in record.constants.values()}

    def fetch(v: int) -> torch.Tensor:
        t = env.get(v)
        if t is None:
            t = record.constants[v][0]
            t = env[v] = t.to(remap) if remap is not None else t
        return t

    def blank(v: int) -> torch.Tensor:
        meta = values[v]
        where = remap if remap is not None else torch.device("cpu")
        return torch.empty_strided(meta.size, meta.stride, dtype=meta.dtype, device=where)

    for i in order:
        op = ops[i]
        if i in blanks:
            for vid in op.outs:
                if vid is not None:
                    meta = values[vid]
                    env[vid] = torch.empty_strided(
                        meta.size, meta.stride, dtype=meta.dtype, device=_out_device(op, remap)
                    )
            continue
        if op.name == LIFT_FRESH and i not in scratch and op.reads[0] in record.fresh:
            # torch.tensor([...])'s own memory, which model code may write into next:
            # a copy, so that the record's constant stays as captured for another
            # replay (the one-element case wrote into it, and the next replay refused).
            out = fetch(op.reads[0]).clone()
        elif op.name == _DETACH and i not in scratch and len(op.args) == 1:
            # nn.Parameter(t) records one per parameter: Tensor.detach() is the
            # same op, without the generic argument binding and dispatch.
            out = fetch(op.reads[0]).detach()
        elif preset is not None and i == preset[0] and _copies(op, rng, remap, i in scratch):
            # The same numbers from the same state into the same layout: a copy.
            out = fetch(op.writes[0]).copy_(preset[1])
        else:
            wanted = record.default_dtype_at(i)
            if wanted is not current_dtype:
                torch.set_default_dtype(wanted)
                current_dtype = wanted
            settings = record.ambient_at(i)
            if settings is not None and settings != ambient[1]:
                _ambient.put(settings)
                ambient[1] = settings
            args, kwargs = _bind(op, blank if i in scratch else fetch, rng, remap)
            run, lent = _resolve(op.name), None
            if op.stream is not None:
                rng.enter(i, op.stream)
                run, args, lent = _with_generator(op, rng, args, kwargs)
            try:
                if lent is None:
                    out = run(*args, **kwargs)
                else:
                    with lent:
                        out = run(*args, **kwargs)
            except Exception as e:
                raise _replay_error(record, i, targets, e, on_cpu=remap is None) from e
            if op.stream is not None:
                rng.leave(i, op.stream)
        if i in scratch and i not in defines:
            continue
        flat = out if isinstance(out, (list, tuple)) else (out,)
        for leaf, vid in zip(flat, op.outs, strict=True):
            if vid is not None:
                env[vid] = leaf
        for t in finalize_at.pop(i, ()):
            value = env[t]
            if id(value) in captured:
                # The captured tensor itself (torch.tensor(0)'s, through lift_fresh): the
                # module gets an alias of its memory, so that taking it over (a load puts
                # its contents into the deferred object) leaves the record's own tensor,
                # which a later replay may read (a deep copy of it kept in a dict:
                # torchmetrics' _defaults, which a load replays after the module's tensors).
                value = value.detach()
            results[t] = _finish(value, device, dtype)
        for v in (*op.reads, *(o for o in op.outs if o is not None)):
            if last_use.get(v, -1) <= i and (v not in targets or v in results):
                env.pop(v, None)
    return results


def _with_generator(
    op: Op, rng: ReplayRng, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, tuple[Any, ...], Any]:
    """Return the overload running random op ``op`` on the replay's own generator, and its args.

    ``kwargs`` gets the generator where ``args`` does not. The third item is
    ``None``, or, for an op that takes no generator, a context lending the
    global generator to it for its one call.
    """
    assert op.stream is not None
    if not rng.record.streams[op.stream].default:
        return _resolve(op.name), args, None  # its GenRef is bound to the replay's generator
    gen = rng.generator(op.stream)
    if gen is None:  # on meta: nothing is drawn
        return _resolve(op.name), args, None
    where = _compat.generator_overload(_resolve(op.name))
    if where is None:
        return _resolve(op.name), args, rng.lent(op.stream)
    name, index = where
    if index is not None and index < len(args):
        args = (*args[:index], gen, *args[index + 1 :])
    else:
        kwargs["generator"] = gen
    return _resolve(name), args, None


def _copies(op: Op, rng: ReplayRng, remap: torch.device | None, on_scratch: bool) -> bool:
    """Whether preset op ``op`` can be copied: one in-place draw, from a known state, no remap."""
    return (
        remap is None
        and not on_scratch
        and op.stream is not None
        and rng.known(op.stream)
        and len(op.writes) == 1
        and op.outs == op.writes
        and set(op.reads) <= set(op.writes)
    )


def _out_device(op: Op, remap: torch.device | None) -> torch.device:
    """Return the device a blank stand-in for ``op``'s outputs goes on."""
    where = op.kwargs.get("device")
    if isinstance(where, torch.device) and where.type != "cpu":
        return where
    return remap if remap is not None else torch.device("cpu")


def _replay_error(
    record: Record, i: int, targets: dict[int, str], e: Exception, *, on_cpu: bool
) -> MaterializationError:
    """Return the error for op ``i`` failing on real tensors, naming the tensors it blocks.

    ``on_cpu``: replayed where eager construction ran it, on the same tensors, so eager
    construction fails the same way (a dtype the CPU kernel lacks: ``linalg_qr`` in bfloat16).
    """
    op = record.ops[i]
    site = f" issued at {op.site}" if op.site else ""
    # A draw on scratch tensors feeds no target but blocks every one after it.
    paths = _paths_needing(record, i, targets) or sorted(set(targets.values()))
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    if on_cpu:
        fix = (
            "Eager construction runs this op on the same tensors on the CPU and raises there "
            "too: either that error stopped it as well, or the model's code caught it (a "
            "try/except around the op) and went on another way, which the block could not "
            "see (the op checks values only when it runs for real). Fix: for a dtype the op "
            "lacks, build the model in float32 (materialize(model, dtype=...) casts the "
            "result); for code that catches the error, build that part of the model outside "
            "deferred_init and assign it afterwards, or change that initialisation."
        )
    else:
        fix = (
            "Fix: materialize with draw_on='cpu', or build this part of the model outside "
            "deferred_init."
        )
    return MaterializationError(
        f"materialize could not replay {op.name}{site} (for {shown}): "
        f"{type(e).__name__}: {e}. {fix}",
        paths=paths,
    )


def _finish(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Return ``t`` on ``device``, cast to ``dtype`` if floating point or complex (itself if already so).

    As ``module.to(dtype)`` casts (complex to real drops the imaginary part,
    with torch's own warning).
    """
    cast = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else None
    if t.device == device and (cast is None or t.dtype == cast):
        return t
    return t.to(device=device, dtype=cast)


_DETACH = "aten.detach.default"

# Argument types replayed as logged (never a Ref, a GenRef, a sequence or a device).
_LITERAL = frozenset({int, float, bool, complex, str, type(None), torch.dtype, torch.layout})


def _bind(
    op: Op,
    tensor: Callable[[int], torch.Tensor],
    rng: ReplayRng,
    move_to: torch.device | None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Return ``op``'s arguments with real tensors, generators and devices in place of the log's."""
    args = tuple(_leaf(a, tensor, rng, move_to) for a in op.args)
    kwargs = {k: _leaf(v, tensor, rng, move_to) for k, v in op.kwargs.items()}
    if move_to is not None and "device" in kwargs and kwargs["device"] is None:
        kwargs["device"] = move_to
    return args, kwargs


def _leaf(
    x: Any,
    tensor: Callable[[int], torch.Tensor],
    rng: ReplayRng,
    move_to: torch.device | None,
) -> Any:
    # A module-level function, not a closure in _bind: a closure calling itself
    # for nested lists is a reference cycle, which kept the replay's values and
    # its record (and so weak references to the materialized tensors, which
    # torch.utils.swap_tensors refuses) alive until the garbage collector ran.
    cls = type(x)
    if cls in _LITERAL:  # most arguments: sizes, scalars, dtypes
        return x
    if cls is Ref:
        return tensor(x.vid)
    if isinstance(x, (list, tuple)):
        return cls([_leaf(y, tensor, rng, move_to) for y in x])
    if isinstance(x, GenRef):
        return rng.generator(x.stream)
    if move_to is not None and isinstance(x, torch.device) and x.type == "cpu":
        return move_to
    return x


def end_state(record: Record, rng: ReplayRng, stream: int) -> torch.Tensor:
    """Return the state of an unknown-state stream after its last draw (replaying if needed)."""
    key = rng.key(stream)
    if key not in record.ends:
        replay(record, {}, device=rng.device(stream), remap=rng.remap, through_end=True)
    return record.ends[key]


def complete(record: Record, remap: torch.device | None) -> None:
    """Settle the generators once every deferred tensor of ``record`` is real, then release it.

    Generators that drew while recording already stand where eager
    construction left them. A CPU stream redrawn on an accelerator
    (``draw_on="device"``) moves that accelerator's default generator past
    the block's draws, as eager construction directly on it would, but only
    in the process that recorded the block and only if nobody used the
    generator since the first redraw. Releasing is :meth:`Record.release`,
    the record's own method, called under its lock so two threads cannot
    both move a generator.
    """
    with record.lock:
        if record.released:
            return
        rng = ReplayRng(record, remap)
        for stream in range(len(record.streams)):
            if rng.known(stream) or not record.streams[stream].default:
                continue
            index = record.random_ops(stream)
            if not index or record.pid != os.getpid():
                continue
            start = record.states.get(rng.key(stream), {}).get(index[0])
            end = end_state(record, rng, stream)
            if start is not None and torch.equal(rng.current(stream), start):
                set_default_state(rng.device(stream), end)
        record.release()
