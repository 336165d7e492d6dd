"""Log every ATen call made while building under :func:`~lightning_meta.deferred_init`.

:class:`Recorder` sits on top of the ``FakeTensorMode`` that computes fake
outputs and appends one :class:`~lightning_meta._deferred._record.Op` per call
to the block's :class:`~lightning_meta._deferred._record.Record`. Each call
goes through the same phases, one method each: classify the op
(:func:`_info`), map its tensor arguments to value ids (``_values``) and its
generators to streams (:meth:`Recorder._log_arguments`), run it under the
fake mode (:meth:`Recorder._run_fake`), then record its outputs and writes
(:meth:`Recorder._output_vids`, :meth:`Recorder._log`). Whatever it cannot
record exactly (data-dependent calls, ops without a fake kernel, writes into
captured real tensors) raises at record time, naming the op, the source
``file:line`` and the tensor's path (see ``_record_errors``). The global CPU
generator is watched by :class:`~lightning_meta._deferred._rng.PlaceholderRng`.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._compat import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    TorchDispatchMode,
    UnsupportedOperatorException,
)
from lightning_meta._deferred._record import DEFAULT_STREAM, GenRef, Op, Record, Stream
from lightning_meta._deferred._record_errors import user_site
from lightning_meta._deferred._rng import PlaceholderRng
from lightning_meta._deferred._values import ValueIds

__all__ = ["Recorder"]


@dataclass(frozen=True)
class _OpInfo:
    name: str
    writes: tuple[tuple[int, str], ...]
    random: bool
    returns_tensor: bool


@functools.cache
def _info(func: Any) -> _OpInfo:
    """Classify an ATen overload once: its name, the arguments it writes, whether it draws."""
    writes, returns_tensor = _compat.op_schema(func)
    random = torch.Tag.nondeterministic_seeded in func.tags
    return _OpInfo(str(func), writes, random, returns_tensor)


class _Call:
    """One ATen call's arguments as logged, and the value ids it reads and writes."""

    __slots__ = ("args", "first", "kwargs", "reads", "streams", "writes")

    def __init__(self) -> None:
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.reads: list[int] = []  # value ids of the tensor arguments, in order
        self.streams: list[int] = []  # streams of the explicit generator arguments
        self.writes: tuple[int, ...] = ()
        self.first: torch.Tensor | None = None  # the first tensor argument, named in errors


class Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Log every ATen call on fake tensors into a :class:`Record`.

    Sits on top of the ``FakeTensorMode`` that computes the fake outputs.
    Tensors become value ids through :class:`~lightning_meta._deferred._values.ValueIds`
    (which holds the fake tensors only weakly, and their storages until
    :meth:`close`); the global CPU generator is watched by
    :class:`~lightning_meta._deferred._rng.PlaceholderRng`.

    Args:
        record: the block's op log, filled in place.
        chained: the block continues from the previous block's generator end
            state (see :class:`~lightning_meta._deferred._rng.PlaceholderRng`).
    """

    def __init__(self, record: Record, chained: bool) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.record = record
        self.thread = threading.get_ident()
        self.modules: dict[int, nn.Module] = {}
        self.rng = PlaceholderRng(chained)
        self.values = ValueIds(record, self.modules)
        self._gen_stream: dict[int, int] = {}

    # -- the block's lifetime (deferred_init calls these)
    def open(self) -> None:
        """Note the generator's entry state and move it to this block's first placeholder."""
        self.rng.open()

    def track(self, module: nn.Module, name: str, value: object) -> None:
        """Note a module (and a submodule registered on it) built in this block's thread.

        Installed as torch's global parameter, buffer and module registration hook.
        """
        if threading.get_ident() == self.thread:
            self.modules.setdefault(id(module), module)
            if isinstance(value, nn.Module):
                self.modules.setdefault(id(value), value)

    def vid_at_exit(self, t: torch.Tensor) -> int:
        """Return the value id of ``t``, a tensor found on a module when the block ends."""
        return self.values.vid(t, "deferred_init exit")

    def close(self, finished: bool) -> None:
        """Set the generator where it must be after the block, then drop every fake tensor.

        Args:
            finished: the block's body and conversion ran to the end (else the
                generator goes back to its entry state).

        Raises:
            MaterializationError: the model restored a generator state it read
                inside the block after a draw (see :class:`PlaceholderRng`).
        """
        error = self.rng.close(self.record, finished)
        self.modules.clear()
        self.values.clear()
        if error is not None:
            raise error

    # -- one ATen call, phase by phase
    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        # The hot path of recording: one call per ATen op issued by the model,
        # so the phases avoid generator expressions and share what they can.
        kwargs = kwargs or {}
        info = _info(func)
        call = self._log_arguments(info, args, kwargs)
        out = self._run_fake(func, info, call, args, kwargs)
        outs = self._output_vids(out)
        # A call without tensor outputs or writes (a query such as prim.device)
        # has nothing to replay.
        if call.writes or outs.count(None) != len(outs):
            self._log(info, call, outs)
        return out

    def _log_arguments(self, info: _OpInfo, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        """Return the call with its tensors as value ids and its generators as streams."""
        call = _Call()
        call.args = tuple([self._scan(a, info.name, call) for a in args])
        if kwargs:
            call.kwargs = {k: self._scan(v, info.name, call) for k, v in kwargs.items()}
        if info.writes:
            call.writes = self._writes(info, args, kwargs)
        return call

    def _scan(self, x: Any, op: str, call: _Call) -> Any:
        """Return ``x`` as logged: each tensor as a ``Ref``, each generator as a ``GenRef``."""
        if type(x) in _ATOMIC:
            return x
        if isinstance(x, torch.Tensor):
            vid = self.values.vid(x, op)
            call.reads.append(vid)
            if call.first is None:
                call.first = x
            return self.values.ref(vid)
        if isinstance(x, (list, tuple)):
            return type(x)([self._scan(y, op, call) for y in x]) if _needs_scan(x) else x
        if isinstance(x, torch.Generator):
            stream = self._stream(x)
            call.streams.append(stream)
            return GenRef(stream)
        return x

    def _writes(
        self, info: _OpInfo, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, ...]:
        """Return the value ids of the tensors the op writes in place, per its schema."""
        found: list[int] = []
        for index, name in info.writes:
            value = args[index] if index < len(args) else kwargs.get(name)
            items = value if isinstance(value, (list, tuple)) else (value,)
            found.extend(
                self.values.vid(t, info.name) for t in items if isinstance(t, torch.Tensor)
            )
        return tuple(found)

    def _run_fake(
        self, func: Any, info: _OpInfo, call: _Call, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run ``func`` under the fake mode below; refuse what has no exact fake result."""
        try:
            return func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException) as e:
            raise self.values.error(
                info.name,
                call.first,
                "needs the values of a tensor, which a deferred tensor does not have yet",
                "compute it from Python numbers or configuration, or build this part of "
                "the model outside deferred_init and assign it afterwards",
            ) from e
        except (UnsupportedOperatorException, NotImplementedError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not _compat.lacks_fake_kernel(e):
                raise
            raise self.values.error(
                info.name,
                call.first,
                f"cannot run on a fake tensor ({type(e).__name__}: {e})",
                "build this part of the model outside deferred_init and assign it afterwards",
            ) from e

    def _output_vids(self, out: Any) -> tuple[int | None, ...]:
        """Return the value ids of the outputs (``None`` for non-tensor items)."""
        if isinstance(out, (list, tuple)):
            return tuple([self.values.out(leaf) for leaf in out])
        return (self.values.out(out),)

    def _log(self, info: _OpInfo, call: _Call, outs: tuple[int | None, ...]) -> None:
        """Append the call to the record, after refusing writes into captured real tensors."""
        constants = self.record.constants
        if constants and not constants.keys().isdisjoint(call.writes):
            raise self.values.error(
                info.name,
                None,
                "writes into a real tensor captured from outside the block",
                "clone the tensor before writing into it inside deferred_init",
            )
        stream = self._random_stream(call.streams) if info.random else None
        reads = tuple(call.reads)
        self.record.ops.append(
            Op(
                info.name,
                call.args,
                call.kwargs,
                outs,
                call.writes,
                reads,
                self.values.storages_of([*call.writes, *outs]),
                self.values.storages_of(call.reads),
                # Walking the stack is a sizeable part of recording time; only an
                # op reading a captured real tensor can fail at replay on the CPU.
                user_site() if constants and not constants.keys().isdisjoint(reads) else "",
                stream,
            )
        )

    def _random_stream(self, streams: list[int]) -> int:
        """Return the stream a random op draws from, pinning the global generator if it is that."""
        if streams:
            return streams[0]
        self.rng.pin(self.record, len(self.record.ops))
        return DEFAULT_STREAM

    def _stream(self, gen: torch.Generator) -> int:
        """Return the stream index of an explicit generator, registering it on first use."""
        index = self._gen_stream.get(id(gen))
        if index is None:
            index = len(self.record.streams)
            self.record.streams.append(Stream(gen.device, self.rng.start_of(gen), gen))
            self._gen_stream[id(gen)] = index
        return index


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
