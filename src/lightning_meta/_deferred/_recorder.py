"""Log every ATen call made while building under :func:`~lightning_meta.deferred_init`.

:class:`Recorder` sits on top of the ``FakeTensorMode`` that computes fake
outputs and appends one :class:`~lightning_meta._deferred_record.Op` per call
to the block's :class:`~lightning_meta._deferred_record.Record`. Whatever it
cannot record exactly (data-dependent calls, ops without a fake kernel, writes
into captured real tensors) raises at record time, naming the op, the source
``file:line`` and the tensor's path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from types import CodeType
from typing import Any

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._compat import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    TorchDispatchMode,
    UnsupportedOperatorException,
)
from lightning_meta._deferred._record import DEFAULT_STREAM, GenRef, Op, Record, Ref, Stream, Value
from lightning_meta._errors import MaterializationError

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_STDLIB_WRAPPERS = (os.sep + "contextlib.py", os.sep + "functools.py")
_INTERNAL: dict[CodeType, bool] = {}


def user_site(depth: int = 2) -> str:
    """Return ``file:line`` of the innermost frame outside torch and this package."""
    frame = sys._getframe(depth)
    while frame is not None:
        code = frame.f_code
        internal = _INTERNAL.get(code)
        if internal is None:
            name = code.co_filename
            internal = name.startswith((_TORCH_DIR, _OWN_DIR)) or name.endswith(_STDLIB_WRAPPERS)
            _INTERNAL[code] = internal
        if not internal:
            return f"{code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "<unknown>"


@dataclass(frozen=True)
class _OpInfo:
    name: str
    writes: tuple[tuple[int, str], ...]
    random: bool
    returns_tensor: bool


@functools.cache
def _info(func: Any) -> _OpInfo:
    writes, returns_tensor = _compat.op_schema(func)
    random = torch.Tag.nondeterministic_seeded in func.tags
    return _OpInfo(str(func), writes, random, returns_tensor)


class Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Log every ATen call on fake tensors into a :class:`Record`.

    Sits on top of the ``FakeTensorMode`` that computes the fake outputs. It
    keeps every storage it has seen alive until :meth:`close`, so storage ids
    (``untyped_storage()._cdata``) cannot be reused while recording, but holds
    the fake tensors themselves only weakly: a strong reference to the output
    of a factory call (``torch.empty``) makes torch's ``make_variable`` see a
    shared tensor and re-wrap it through a Python ``detach``, which costs a
    second trip through both modes and a second fake tensor for every
    parameter (measured: ~2x FakeTensorMode's construction time).
    """

    def __init__(self, record: Record, chained: bool) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.record = record
        self.thread = threading.get_ident()
        self.modules: dict[int, nn.Module] = {}
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self._vid_cdata: list[int] = []
        self._cdata_storage: dict[int, int] = {}
        self._storages: list[torch.UntypedStorage] = []  # keeps their ``_cdata`` unique
        self._storage_vid: dict[int, int] = {}
        self._gen_stream: dict[int, int] = {}
        self._refs: dict[int, Ref] = {}
        self._fsets: dict[int | None, frozenset[int]] = {}
        # While recording, the physical CPU generator holds a placeholder state
        # of this block, a fresh one after every draw from it (a token: the
        # ``k``-th placeholder stands for the state after the ``k``-th draw),
        # so any reseed, even to the state the generator had before the block,
        # moves it away from the current placeholder; :meth:`open` installs the
        # first, :meth:`close` puts a real state back.
        self._chained = chained
        self._entry = torch.empty(0, dtype=torch.uint8)  # real state at entry
        self._buf = self._entry  # the placeholder; its first 8 bytes count draws
        self._rest = b""  # the placeholder's bytes after the count
        self._salt = 0
        self._count = -1
        self._physical_key = b""
        # A chained block continues from the previous block's end state, so its
        # first draw is not pinned unless the generator was reseeded meanwhile;
        # an unchained one pins its entry state at its first draw.
        self._entry_pending = not chained

    def open(self) -> None:
        """Note the generator's entry state and move it to this block's first placeholder."""
        self._entry = torch.get_rng_state()
        digest = hashlib.blake2b(self._entry.numpy().tobytes(), digest_size=8, person=b"lm-rng")
        self._salt = int.from_bytes(digest.digest(), "little")
        self._buf = torch.Generator().manual_seed(self._salt >> 1).get_state()
        # Bytes 0-7 of a CPU state are its initial seed, which set_state keeps
        # as is: the count goes there, the Mersenne Twister state stays valid.
        self._rest = _state_key(self._buf)[8:]
        self._install()

    def _install(self) -> None:
        # One call per draw from the global generator: kept to a few calls.
        self._count += 1
        head = (self._salt ^ self._count).to_bytes(8, "little")
        _compat.write_seed_bytes(self._buf, head)
        torch.default_generator.set_state(self._buf)
        self._physical_key = head + self._rest

    def _resolve(self, state: torch.Tensor, key: bytes) -> torch.Tensor:
        """Return the real state behind ``state``, which is not the current placeholder.

        An earlier placeholder means the model restored a state it read inside
        the block (``torch.random.fork_rng``, ``get_rng_state`` then
        ``set_rng_state``): only the first one, read before any draw, has a
        real value known while recording (the entry state of an unchained block).
        """
        if key[8:] != self._rest:
            return state
        if int.from_bytes(key[:8], "little") ^ self._salt == 0 and not self._chained:
            return self._entry
        raise self.error(
            "torch.set_rng_state",
            None,
            "restores a generator state read inside the block after random draws (for "
            "example torch.random.fork_rng around a reseed), whose real value is not known "
            "while recording",
            "seed explicitly with torch.manual_seed(k) instead, or read the state before "
            "entering deferred_init",
        )

    # -- module tracking (global registration hooks, installed by deferred_init)
    def track(self, module: nn.Module, name: str, value: object) -> None:
        if threading.get_ident() == self.thread:
            self.modules.setdefault(id(module), module)
            if isinstance(value, nn.Module):
                self.modules.setdefault(id(value), value)

    # -- value ids
    def _new_value(self, t: torch.Tensor, cdata: int, owner: torch.UntypedStorage | None) -> int:
        storage = self._cdata_storage.get(cdata)
        if storage is None:
            storage = self._cdata_storage[cdata] = len(self._cdata_storage)
            if owner is not None:
                self._storages.append(owner)
        vid = len(self.record.values)
        self.record.values.append(
            Value(storage, tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.dtype)
        )
        self._vid_cdata.append(cdata)
        self._seen[id(t)] = (weakref.ref(t), vid)
        self._storage_vid[storage] = vid
        return vid

    def vid(self, t: torch.Tensor, op: str) -> int:
        """Return the value id of ``t``, capturing real tensors as constants."""
        seen = self._seen.get(id(t))
        if not isinstance(t, FakeTensor):
            if seen is not None and seen[0]() is t:
                return seen[1]
            vid = self._new_value(t, -1 - len(self.record.constants), None)
            self.record.constants[vid] = (t, _compat.version_of(t))  # holds ``t``: its id stays unique
            return vid
        owner = t.untyped_storage()
        cdata = _compat.storage_id(owner)
        if seen is not None and seen[0]() is t and self._vid_cdata[seen[1]] == cdata:
            return seen[1]
        # Reached without a recorded op: ``.data`` assignment or a tensor that
        # aliases a known storage. Rebuild it as a view of that storage.
        storage = self._cdata_storage.get(cdata)
        if storage is None:
            raise self.error(
                op,
                t,
                "uses a fake tensor this recording never produced",
                "build every tensor of the module inside the same deferred_init block",
            )
        base = self._storage_vid[storage]
        if self.record.values[base].dtype != t.dtype:
            raise self.error(
                op,
                t,
                "reinterprets a recorded storage with another dtype",
                "use tensor.view(dtype) instead of assigning .data",
            )
        vid = self._new_value(t, cdata, owner)
        view = Op(
            "aten.as_strided.default",
            (Ref(base), tuple(t.shape), tuple(t.stride()), t.storage_offset()),
            {},
            (vid,),
            (),
            (base,),
            frozenset({storage}),
            frozenset({storage}),
            user_site(3),
            None,
        )
        self.record.ops.append(view)
        return vid

    def _stream(self, gen: torch.Generator) -> int:
        index = self._gen_stream.get(id(gen))
        if index is None:
            index = len(self.record.streams)
            start = gen.get_state()
            if gen.device.type == "cpu":
                key = _state_key(start)
                if self._rest and key[8:] == self._rest:  # copied from the global generator
                    start = self._resolve(start, key)
                    gen.set_state(start)
            self.record.streams.append(Stream(gen.device, start, gen))
            self._gen_stream[id(gen)] = index
        return index

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        # The hot path of recording: one call per ATen op issued by the model,
        # so it avoids generator expressions and per-op allocations it can share.
        kwargs = kwargs or {}
        info = _info(func)
        reads: list[int] = []
        found: list[torch.Tensor] = []
        streams: list[int] = []

        def scan(x: Any) -> Any:
            if type(x) in _ATOMIC:
                return x
            if isinstance(x, torch.Tensor):
                v = self.vid(x, info.name)
                reads.append(v)
                found.append(x)
                return self._ref(v)
            if isinstance(x, (list, tuple)):
                return type(x)([scan(y) for y in x]) if _needs_scan(x) else x
            if isinstance(x, torch.Generator):
                streams.append(self._stream(x))
                return GenRef(streams[-1])
            return x

        largs = tuple([scan(a) for a in args])
        lkwargs = {k: scan(v) for k, v in kwargs.items()} if kwargs else {}
        writes = self._writes(info, args, kwargs) if info.writes else ()
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException) as e:
            raise self.error(
                info.name,
                found[0] if found else None,
                "needs the values of a tensor, which a deferred tensor does not have yet",
                "compute it from Python numbers or configuration, or build this part of "
                "the model outside deferred_init and assign it afterwards",
            ) from e
        except (UnsupportedOperatorException, NotImplementedError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not _compat.lacks_fake_kernel(e):
                raise
            raise self.error(
                info.name,
                found[0] if found else None,
                f"cannot run on a fake tensor ({type(e).__name__}: {e})",
                "build this part of the model outside deferred_init and assign it afterwards",
            ) from e
        if isinstance(out, (list, tuple)):
            outs = tuple([self._out(leaf) for leaf in out])
        else:
            outs = (self._out(out),)
        if not writes and all(o is None for o in outs):
            return out  # a query such as prim.device: nothing to replay
        constants = self.record.constants
        if constants:
            for w in writes:
                if w in constants:
                    raise self.error(
                        info.name,
                        None,
                        "writes into a real tensor captured from outside the block",
                        "clone the tensor before writing into it inside deferred_init",
                    )
        stream: int | None = None
        if info.random:
            stream = streams[0] if streams else DEFAULT_STREAM
            if stream == DEFAULT_STREAM:
                self._pin(len(self.record.ops))
        self.record.ops.append(
            Op(
                info.name,
                largs,
                lkwargs,
                outs,
                writes,
                tuple(reads),
                self._storages_of([*writes, *outs]),
                self._storages_of(reads),
                # Walking the stack is a sizeable part of recording time; only an
                # op reading a captured real tensor can fail at replay on the CPU.
                user_site(2) if constants and any(r in constants for r in reads) else "",
                stream,
            )
        )
        return out

    def _ref(self, vid: int) -> Ref:
        # Refs are immutable: one per value, shared by every op that reads it.
        ref = self._refs.get(vid)
        if ref is None:
            ref = self._refs[vid] = Ref(vid)
        return ref

    def _storages_of(self, vids: list[int | None] | list[int]) -> frozenset[int]:
        """Return the storages of ``vids`` (``None`` skipped), sharing the common sets."""
        values = self.record.values
        storages = [values[v].storage for v in vids if v is not None]
        if len(storages) > 1:
            return frozenset(storages)
        key = storages[0] if storages else None
        shared = self._fsets.get(key)
        if shared is None:
            shared = self._fsets[key] = frozenset(storages)
        return shared

    def _out(self, leaf: Any) -> int | None:
        if not isinstance(leaf, torch.Tensor):
            return None
        seen = self._seen.get(id(leaf))
        if seen is not None and seen[0]() is leaf:
            return seen[1]
        return self._new_out(leaf)

    def _new_out(self, t: torch.Tensor) -> int:
        if isinstance(t, FakeTensor):
            owner = t.untyped_storage()
            return self._new_value(t, _compat.storage_id(owner), owner)
        return self.vid(t, "output")

    def _writes(
        self, info: _OpInfo, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, ...]:
        found: list[int] = []
        for index, name in info.writes:
            value = args[index] if index < len(args) else kwargs.get(name)
            items = value if isinstance(value, (list, tuple)) else (value,)
            found.extend(self.vid(t, info.name) for t in items if isinstance(t, torch.Tensor))
        return tuple(found)

    def _pin(self, index: int) -> None:
        # Fake ops never advance the real generator, so a changed state means
        # the model reseeded (or drew real numbers) here: replay must too.
        # The generator holds a placeholder of this block while recording, so
        # even a reseed to the state it had before the block is a change.
        state = torch.get_rng_state()
        key = _state_key(state)
        if key == self._physical_key:
            if self._entry_pending:
                self._entry_pending = False
                self.record.states.setdefault("default:cpu", {})[index] = self._entry
        else:
            state = self._resolve(state, key)
            self._entry_pending = False
            self.record.states.setdefault("default:cpu", {})[index] = state
        self._install()

    def close(self, finished: bool) -> None:
        """Note the generator at exit, park it on a placeholder, drop every fake tensor.

        Eager construction would have advanced the global generator past the
        block's draws. Until :func:`materialize` knows that end state, the
        generator holds a placeholder derived from the block, so a reseed (or
        a later block continuing this one) can be told apart from "nothing
        happened", and seeded runs stay reproducible. A block without draws
        leaves it where the model set it (or at the entry state), a failed
        block at the entry state: no recording placeholder outlives the block.
        Raises when the model restored a placeholder it read after a draw.
        """
        record = self.record
        error: MaterializationError | None = None
        state = torch.get_rng_state()
        key = _state_key(state)
        changed: torch.Tensor | None = None  # a state the model set after its last draw
        if self._entry.numel() and key != self._physical_key:
            try:
                changed = self._resolve(state, key)
            except MaterializationError as e:
                error = e if finished else None
                finished = False
        has_draws = bool(record.random_ops(DEFAULT_STREAM))
        if finished and changed is not None and (self._chained or has_draws):
            record.exit_pin = changed
        if finished and (has_draws or record.exit_pin is not None):
            digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=8)
            digest.update(str(len(record.ops)).encode())
            parked = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
            record.exit_state = parked.get_state()
        elif finished and self._entry.numel():
            # No draw to account for: where the model left it, or where it was.
            record.exit_state = changed if changed is not None else self._entry
        elif self._entry.numel():
            record.exit_state = self._entry  # failed: back to the entry state
        else:
            record.exit_state = state  # never opened
        torch.set_rng_state(record.exit_state)
        self.modules.clear()
        self._seen.clear()
        self._vid_cdata.clear()
        self._cdata_storage.clear()
        self._storages.clear()
        self._refs.clear()
        self._fsets.clear()
        self._storage_vid.clear()
        if error is not None:
            raise error

    def vid_at_exit(self, t: torch.Tensor) -> int:
        return self.vid(t, "deferred_init exit")

    # -- error reporting
    def error(
        self, op: str, tensor: torch.Tensor | None, what: str, fix: str
    ) -> MaterializationError:
        site = user_site(3)
        where = ""
        if tensor is not None:
            path = self._path_of(tensor)
            if path:
                where = f" on {path!r}"
        return MaterializationError(
            f"deferred_init cannot record {op}{where} issued at {site}: it {what}. Fix: {fix}."
        )

    def _path_of(self, tensor: torch.Tensor) -> str | None:
        with contextlib.suppress(Exception):
            cdata = _compat.storage_id(tensor.untyped_storage())
            parents: dict[int, tuple[nn.Module, str]] = {}
            for m in self.modules.values():
                for child_name, child in m.named_children():
                    parents[id(child)] = (m, child_name)
            for m in self.modules.values():
                for name, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)):
                    if _compat.storage_id(t.untyped_storage()) == cdata:
                        parts = [name]
                        node = m
                        while id(node) in parents:
                            node, child_name = parents[id(node)]
                            parts.append(child_name)
                        return f"{type(node).__name__}." + ".".join(reversed(parts))
        return None


# Argument types that are never a tensor, a generator or a sequence: checked by
# exact type first, since ``isinstance(x, torch.Generator)`` runs a Python-level
# metaclass ``__instancecheck__`` (about 1 us) for every shape entry.
_ATOMIC = frozenset(
    {
        int,
        float,
        bool,
        complex,
        str,
        type(None),
        torch.dtype,
        torch.device,
        torch.layout,
        torch.memory_format,
    }
)


def _state_key(state: torch.Tensor) -> bytes:
    """Return the bytes of a CPU generator state, to compare without dispatching.

    ``torch.equal`` would go to the fake mode below the recorder unless wrapped
    in ``no_dispatch()``, which costs ten times more than this copy.
    """
    return _compat.state_bytes(state)


def _needs_scan(seq: list[Any] | tuple[Any, ...]) -> bool:
    """Return whether ``seq`` holds a tensor or generator, at any depth."""
    for y in seq:
        if type(y) in _ATOMIC:
            continue
        if isinstance(y, (torch.Tensor, torch.Generator)):
            return True
        if isinstance(y, (list, tuple)) and _needs_scan(y):
            return True
    return False
