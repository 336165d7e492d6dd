"""Generators: draw for real while recording, set the recorded states while replaying.

Fake ops never touch a generator, so a block that only recorded would leave
every generator where it was, and any draw after the block (or a reseed
inside it) would see another state than in eager construction.
:class:`LiveDraws` therefore runs every random op of the block for real, on
scratch memory of the recorded shape, with the generator the op would use
eagerly (the default generator of its device, or the explicit one it was
given), and notes that generator's state right before each draw. So the
global generator is at every moment where eager construction would have it:
inside the block (a reseed, ``fork_rng`` or ``get_rng_state`` is the real
thing), between blocks and after them, in this thread and in any other;
the cost is the time of eager construction's draws, and scratch memory for
the largest tensor drawn (twice: the last draw of an initialiser is kept so
that reading it back, as ``trunc_normal_`` does, copies it).

:class:`ReplayRng` sets those states again when ``_replay`` re-runs a random
op, on private ``torch.Generator`` objects handed to the op (``generator=``),
never on the global ones: another thread drawing while ``materialize`` runs
gets the numbers it would get without it. A default generator that could
not draw while recording (an accelerator this process does not have), or a
CPU stream redrawn on an accelerator (``draw_on="device"``), has unknown
states: replay continues from the device generator's current state and
notes states as it meets them. Draws on the meta device consume nothing,
eagerly too: their streams have no state at all.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lightning_meta import _compat
from lightning_meta._compat import FakeTensor
from lightning_meta._deferred._record import Record, span

__all__ = [
    "DRAW_LOCK",
    "LiveDraws",
    "ReplayRng",
    "default_generator",
    "get_default_state",
    "set_default_state",
    "stream_key",
]

# Held from reading a generator's state until the draw that follows it has
# run, by every recording thread: blocks in several threads draw in some
# order, each from the state it noted.
DRAW_LOCK = threading.RLock()

# Random ops whose number of draws depends on their inputs' values: their
# scratch inputs must hold the real values (computed by the recorder).
_VALUE_DEPENDENT = frozenset(
    {
        "aten.multinomial",
        "aten.poisson",
        "aten._standard_gamma",
        "aten.binomial",
        "aten._sample_dirichlet",
        "aten.rrelu_with_noise",
        "aten.rrelu_with_noise_",
        "aten.rrelu_with_noise_functional",
    }
)


def stream_key(stream: int, remap: torch.device | None = None) -> str:
    """Return the key of ``stream`` in ``Record.states`` (``remap``: redrawn on that device)."""
    return f"gen:{stream}" if remap is None else f"remap:{remap}:{stream}"


def default_generator(device: torch.device) -> torch.Generator | None:
    """Return the default generator of ``device``, or ``None`` if this process has none."""
    if device.type == "cpu":
        return torch.default_generator
    module = getattr(torch, device.type, None)
    gens = getattr(module, "default_generators", None)
    try:
        if module is None or not module.is_available() or gens is None:
            return None
        index = device.index if device.index is not None else module.current_device()
        gen: torch.Generator = gens[index]
        return gen
    except (RuntimeError, IndexError, AttributeError):
        return None


def get_default_state(rdev: torch.device) -> torch.Tensor:
    """Return the state of ``rdev``'s default generator."""
    if rdev.type == "cpu":
        return torch.get_rng_state()
    state: torch.Tensor = torch.get_device_module(rdev.type).get_rng_state(rdev)
    return state


def set_default_state(rdev: torch.device, state: torch.Tensor) -> None:
    """Set the state of ``rdev``'s default generator."""
    if rdev.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(rdev.type).set_rng_state(state, rdev)


@functools.cache
def _needs_values(name: str) -> bool:
    """Whether op ``name``'s number of draws depends on its inputs' values."""
    return name.rsplit(".", 1)[0] in _VALUE_DEPENDENT


def _any_tensor(args: tuple[Any, ...], start: int) -> bool:
    """Whether ``args[start:]`` holds a tensor or a sequence (which may hold one)."""
    return any(isinstance(a, (torch.Tensor, list, tuple)) for a in args[start:])


class LiveDraws:
    """Run the random ops of one recording for real, on scratch memory, in program order.

    The written tensor of an in-place draw gets uninitialised scratch memory
    (reused from one draw to the next, so drawing a model costs one tensor
    of memory, two with the kept draw of ``draw(keep=True)``); the other tensor arguments are zeros (a ``std`` or a
    probability of 0 is valid), except for the few ops whose number of draws
    depends on their inputs' values, which get the real values.
    """

    def __init__(self) -> None:
        # Two pools per device: 0 for draws nobody reads, 1 for the kept draw.
        self._memory: dict[tuple[torch.device, int], torch.Tensor] = {}
        # Views of the memory by layout: models repeat a few shapes many times.
        self._views: dict[tuple[Any, ...], torch.Tensor] = {}

    def draw(
        self,
        name: str,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        target: torch.Tensor | None,
        real_value: Callable[[torch.Tensor], torch.Tensor],
        keep: bool = False,
    ) -> torch.Tensor | None:
        """Run ``func`` on real stand-ins for its fake arguments; its results are dropped.

        With ``keep``, the written tensor is drawn into a second scratch
        buffer and returned, valid until the next kept draw: the recorder
        keeps the last draw of an initialiser, which the initialiser usually
        reads right away (``trunc_normal_``), so reading it copies instead of
        drawing again.

        Args:
            name: the op's name.
            func: the ATen overload.
            args: the op's arguments, with fake tensors.
            kwargs: its keyword arguments.
            target: the fake tensor it writes (``None``: none).
            real_value: returns the real value of a fake tensor argument.
            keep: return the written tensor (``None`` when nothing is written).
        """
        needs_values = _needs_values(name)
        if (
            not needs_values
            and target is not None
            and args
            and args[0] is target
            and not kwargs
            and not _any_tensor(args, 1)
        ):
            # The common case (``normal_``, ``uniform_`` on a weight): only the
            # written tensor is a tensor, so it alone gets scratch memory.
            with _compat.no_python_dispatch():
                view = self._scratch(target, 1 if keep else 0)
                func(view, *args[1:])
            return view if keep else None
        kept: list[torch.Tensor] = []

        def real(x: Any) -> Any:
            if isinstance(x, FakeTensor):
                if needs_values:
                    value = real_value(x)
                    return value.clone() if x is target else value
                if x is target:
                    view = self._scratch(x, 1 if keep else 0)
                    if keep:
                        kept.append(view)
                    return view
                zeros = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
                return zeros.zero_()
            if isinstance(x, (list, tuple)):
                return type(x)(real(y) for y in x)
            return x

        with _compat.no_python_dispatch():
            real_args = tuple(real(a) for a in args)
            real_kwargs = {k: real(v) for k, v in kwargs.items()}
            func(*real_args, **real_kwargs)
        return kept[0] if kept else None

    def _scratch(self, like: torch.Tensor, pool: int = 0) -> torch.Tensor:
        """Return uninitialised memory of ``pool`` laid out like ``like`` (same sizes and strides)."""
        size, stride, dtype, device = tuple(like.shape), like.stride(), like.dtype, like.device
        key = (size, stride, dtype, device, pool)
        view = self._views.get(key)
        if view is not None:
            return view
        extent = span(size, stride)
        nbytes = extent * dtype.itemsize
        memory = self._memory.get((device, pool))
        if memory is None or memory.numel() < nbytes:
            memory = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            self._memory[device, pool] = memory
            self._views = {k: v for k, v in self._views.items() if k[3:] != (device, pool)}
        view = memory[:nbytes].view(dtype).as_strided(size, stride)
        self._views[key] = view
        return view

    def close(self) -> None:
        """Free the scratch memory."""
        self._memory.clear()
        self._views.clear()


class ReplayRng:
    """Get and set generator states by stream while one replay runs.

    Known states come from the recording; where a stream's states are unknown
    (see the module docstring), every state met right before a random op is
    noted in ``record.states`` (and the state after the last one in
    ``record.ends``), so a later replay of any slice starts from the nearest
    known state.

    Args:
        record: the record replayed.
        remap: the device CPU default streams are redrawn on (``draw_on="device"``
            with an accelerator), else ``None``.
    """

    def __init__(self, record: Record, remap: torch.device | None) -> None:
        self.record, self.remap = record, remap
        self.gens: dict[int, torch.Generator] = {}
        self._keys: dict[int, str] = {}

    def key(self, stream: int) -> str:
        """Return the ``Record.states`` key of ``stream`` in this replay."""
        key = self._keys.get(stream)
        if key is None:
            key = self._keys[stream] = stream_key(
                stream, self.remap if self.remapped(stream) else None
            )
        return key

    def known(self, stream: int) -> bool:
        """Whether the state before every draw of ``stream`` was noted while recording.

        True for a meta stream too: there is no state to note or follow.
        """
        if self.on_meta(stream):
            return True
        return self.record.streams[stream].known and not self.remapped(stream)

    def remapped(self, stream: int) -> bool:
        """Whether ``stream`` is a CPU default stream redrawn on another device here."""
        s = self.record.streams[stream]
        return self.remap is not None and s.default and s.device.type == "cpu"

    def device(self, stream: int) -> torch.device:
        """Return the device whose generator draws ``stream`` in this replay."""
        if self.remapped(stream):
            assert self.remap is not None
            return self.remap
        return self.record.streams[stream].device

    def on_meta(self, stream: int) -> bool:
        """Whether ``stream`` draws on the meta device, where nothing is drawn (eagerly too)."""
        return self.record.streams[stream].device.type == "meta"

    def generator(self, stream: int) -> torch.Generator | None:
        """Return the replay's own generator standing in for ``stream`` (``None`` on meta).

        Default streams get one too: setting the global generator to a
        recorded state would hand those numbers to any other thread drawing
        meanwhile, and undo that thread's own draws when restored.
        """
        gen = self.gens.get(stream)
        if gen is None:
            if self.on_meta(stream):
                return None
            gen = self.gens[stream] = torch.Generator(device=self.device(stream))
        return gen

    def current(self, stream: int) -> torch.Tensor:
        """Return the state the generator ``stream`` stands for has now (outside the replay)."""
        if not self.record.streams[stream].default:
            return self._own(stream).get_state()
        return get_default_state(self.device(stream))

    def get(self, stream: int) -> torch.Tensor:
        """Return the replay's current state of ``stream``."""
        return self._own(stream).get_state()

    def set(self, stream: int, state: torch.Tensor) -> None:
        """Set the replay's state of ``stream``."""
        self._own(stream).set_state(state)

    def _own(self, stream: int) -> torch.Generator:
        gen = self.generator(stream)
        assert gen is not None, "meta streams have no state"
        return gen

    @contextlib.contextmanager
    def lent(self, stream: int) -> Iterator[None]:
        """Run the body with the global generator of ``stream`` in the replay's state.

        For the few random ops that take no generator argument
        (``native_dropout``): the global generator moves for the length of
        one op, under :data:`DRAW_LOCK`, and is put back after it.
        """
        with DRAW_LOCK:
            device = self.device(stream)
            saved = get_default_state(device)
            set_default_state(device, self.get(stream))
            try:
                yield
            finally:
                self.set(stream, get_default_state(device))
                set_default_state(device, saved)

    def enter(self, i: int, stream: int) -> None:
        """Before random op ``i``: set the state known for it, or note the current one."""
        if self.on_meta(stream):
            return
        known = self.record.states.setdefault(self.key(stream), {})
        state = known.get(i)
        if state is not None:
            self.set(stream, state)
        else:
            known[i] = self.get(stream)

    def leave(self, i: int, stream: int) -> None:
        """After random op ``i``: note the state the next random op of ``stream`` starts from."""
        if self.known(stream) or self.on_meta(stream):
            return
        key = self.key(stream)
        index = self.record.random_ops(stream)
        pos = bisect.bisect_left(index, i)
        state = self.get(stream)
        if pos == len(index) - 1:
            self.record.ends.setdefault(key, state)
        else:
            self.record.states.setdefault(key, {}).setdefault(index[pos + 1], state)
