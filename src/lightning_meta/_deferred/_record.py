"""Record how every tensor built under :func:`~lightning_meta.deferred_init` came to be.

Construction runs under :class:`~torch._subclasses.fake_tensor.FakeTensorMode`
(tensors report device ``cpu`` and hold no data, so model code that skips its
own initialisation for meta tensors still runs it) with a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` on top that logs every
ATen call as an :class:`Op` over integer value ids (the mode itself is in
``_recorder``). Once recording ends the
:class:`Record` holds no fake tensor: only op names, literal arguments, tensor
metadata, captured real tensors and generator states, so it deep-copies and
pickles with the module that refers to it.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

DEFAULT_STREAM = -1


class Ref:
    """A tensor argument of a recorded op, by value id."""

    __slots__ = ("vid",)

    def __init__(self, vid: int) -> None:
        self.vid = vid

    def __repr__(self) -> str:
        return f"Ref({self.vid})"


class GenRef:
    """An explicit ``torch.Generator`` argument, by stream index."""

    __slots__ = ("stream",)

    def __init__(self, stream: int) -> None:
        self.stream = stream


# NamedTuples, not dataclasses: one is built per recorded op and value, and
# construction time is part of what deferred_init costs over FakeTensorMode.
class Value(NamedTuple):
    """Metadata of one recorded tensor value; ``storage`` identifies aliasing."""

    storage: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype


class Op(NamedTuple):
    """One recorded ATen call.

    ``outs`` lines up with the output (a tensor, or a tuple or list of them;
    ``None`` for non-tensor items); ``touch`` and ``read`` are the storages
    the op writes and reads, which is all the slicing in
    ``_replay`` needs. ``stream`` is ``None`` for ops that draw no
    random numbers.
    """

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outs: tuple[int | None, ...]
    writes: tuple[int, ...]
    reads: tuple[int, ...]
    touch: frozenset[int]
    read: frozenset[int]
    site: str
    stream: int | None


@dataclass
class Stream:
    """An explicit generator passed to a random op while recording."""

    device: torch.device
    start: torch.Tensor
    owner: torch.Generator | None


class Record:
    """The op log of one ``deferred_init`` block plus the replay bookkeeping.

    ``states[key][i]`` is the generator state right before random op ``i`` of
    the stream named ``key`` (``"default:cpu"``, ``"default:cuda:0"``,
    ``"gen:3"``); pins made while recording (the generator was reseeded) and
    states met during any replay accumulate there, so any later slice starts
    from the nearest known state instead of from the block's entry.

    ``pending`` and ``materialized`` are changed by ``_handles`` only, the one
    owner of that bookkeeping (copying and pickling below rebuild them).
    """

    def __init__(self, prev: Record | None) -> None:
        self.ops: list[Op] = []
        self.values: list[Value] = []
        self.constants: dict[int, tuple[torch.Tensor, int]] = {}
        self.streams: list[Stream] = []
        self.prev = prev
        self.states: dict[str, dict[int, torch.Tensor]] = {}
        self.ends: dict[str, torch.Tensor] = {}
        self.exit_state: torch.Tensor | None = None
        self.exit_pin: torch.Tensor | None = None
        self.pid = os.getpid()
        # Handles not yet materialized; weak, so a module that was built but
        # dropped (a prototype deep-copied into a ModuleList) does not hold the
        # record open forever.
        self.pending: weakref.WeakSet[Any] = weakref.WeakSet()  # of _handles.Handle
        self.materialized: dict[int, weakref.ref[torch.Tensor]] = {}
        self.released = False
        self.lock = threading.RLock()

    def random_ops(self, stream: int) -> list[int]:
        """Return the indices of the random ops drawing from ``stream``, in order."""
        cached: dict[int, list[int]] | None = self.__dict__.get("_random_index")
        if cached is None:
            cached = {}
            for i, op in enumerate(self.ops):
                if op.stream is not None:
                    cached.setdefault(op.stream, []).append(i)
            self.__dict__["_random_index"] = cached
        return cached.get(stream, [])

    def release(self) -> None:
        """Drop the op log; keep the generator end states later blocks chain to.

        The record's own method, called once nothing is pending: by
        ``_handles.forget`` and, after settling the generators, by
        ``_replay.complete``.
        """
        self.ops, self.values, self.constants, self.states = [], [], {}, {}
        self.__dict__.pop("_random_index", None)
        self.released = True

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["materialized"] = {}
        state["pending"] = list(self.pending)
        state.pop("lock")
        state.pop("_random_index", None)
        state["streams"] = [Stream(s.device, s.start, None) for s in self.streams]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.pending = weakref.WeakSet(state["pending"])
        self.lock = threading.RLock()

    def __deepcopy__(self, memo: dict[int, Any]) -> Record:
        # The op log is never mutated in place once recorded (release rebinds),
        # so copies share it; only the replay bookkeeping is per copy.
        new = Record.__new__(Record)
        memo[id(self)] = new  # before copying handles, which refer back to us
        new.__dict__.update(self.__dict__)
        new.prev = copy.deepcopy(self.prev, memo)
        new.states = {k: dict(v) for k, v in self.states.items()}
        new.ends = dict(self.ends)
        new.pending = weakref.WeakSet(copy.deepcopy(h, memo) for h in list(self.pending))
        new.materialized = {}
        new.lock = threading.RLock()
        return new
