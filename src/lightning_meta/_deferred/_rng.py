"""Generator states: watched while a ``deferred_init`` block records, driven while replaying.

Fake ops never advance the real generator, so a reseed inside the block (even
to the state the generator already had) would be invisible. While recording,
the generator therefore holds a *placeholder* state of this block, a fresh one
after every draw from it (a token: the ``k``-th placeholder stands for the
state after the ``k``-th draw), so any reseed moves it away from the current
placeholder. :class:`PlaceholderRng` installs the first placeholder when the
block opens, notes every reseed as a pin in the record, and puts a real (or
parked) state back when the block closes. :class:`ReplayRng` gets and sets
the states of the default and explicit generators, stream by stream, while
``_replay`` re-runs the random ops.
"""

from __future__ import annotations

import bisect
import hashlib

import torch

from lightning_meta import _compat
from lightning_meta._deferred._record import DEFAULT_STREAM, Record
from lightning_meta._deferred._record_errors import recording_error
from lightning_meta._errors import MaterializationError

__all__ = [
    "PlaceholderRng",
    "ReplayRng",
    "get_default_state",
    "set_default_state",
    "state_key",
    "stream_key",
]


def state_key(state: torch.Tensor) -> bytes:
    """Return the bytes of a CPU generator state, to compare without dispatching.

    ``torch.equal`` would go to the fake mode below the recorder unless wrapped
    in ``no_dispatch()``, which costs ten times more than this copy.
    """
    return _compat.state_bytes(state)


def stream_key(stream: int, rdev: torch.device) -> str:
    """Return the key of ``stream`` in ``Record.states`` when replaying on ``rdev``."""
    return f"default:{rdev}" if stream == DEFAULT_STREAM else f"gen:{stream}"


# The key of the global CPU generator's pins, needed on every draw: computed once.
_DEFAULT_CPU = stream_key(DEFAULT_STREAM, torch.device("cpu"))


class PlaceholderRng:
    """Hold the global CPU generator on placeholder states while one block records.

    Args:
        chained: the block continues from the previous block's end state (the
            generator still sat where that block left it), so its first draw is
            not pinned unless the generator was reseeded meanwhile; an
            unchained block pins its entry state at its first draw.
    """

    def __init__(self, chained: bool) -> None:
        self._chained = chained
        self._entry = torch.empty(0, dtype=torch.uint8)  # real state at entry
        self._buf = self._entry  # the placeholder; its first 8 bytes count draws
        self._rest = b""  # the placeholder's bytes after the count
        self._salt = 0
        self._count = -1
        self._physical_key = b""
        self._entry_pending = not chained

    def open(self) -> None:
        """Note the generator's entry state and move it to this block's first placeholder."""
        self._entry = torch.get_rng_state()
        digest = hashlib.blake2b(self._entry.numpy().tobytes(), digest_size=8, person=b"lm-rng")
        self._salt = int.from_bytes(digest.digest(), "little")
        self._buf = torch.Generator().manual_seed(self._salt >> 1).get_state()
        # Bytes 0-7 of a CPU state are its initial seed, which set_state keeps
        # as is: the count goes there, the Mersenne Twister state stays valid.
        self._rest = state_key(self._buf)[8:]
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

        Raises:
            MaterializationError: ``state`` is a later placeholder.
        """
        if key[8:] != self._rest:
            return state
        if int.from_bytes(key[:8], "little") ^ self._salt == 0 and not self._chained:
            return self._entry
        raise recording_error(
            "torch.set_rng_state",
            "restores a generator state read inside the block after random draws (for "
            "example torch.random.fork_rng around a reseed), whose real value is not known "
            "while recording",
            "seed explicitly with torch.manual_seed(k) instead, or read the state before "
            "entering deferred_init",
        )

    def start_of(self, gen: torch.Generator) -> torch.Tensor:
        """Return the state an explicit generator starts from when a random op first uses it.

        A CPU generator whose state was copied from the global one holds a
        placeholder: it gets the real state back, which is also what is returned.

        Raises:
            MaterializationError: the copied placeholder has no known real state.
        """
        start = gen.get_state()
        if gen.device.type == "cpu":
            key = state_key(start)
            if self._rest and key[8:] == self._rest:
                start = self._resolve(start, key)
                gen.set_state(start)
        return start

    def pin(self, record: Record, index: int) -> None:
        """Before random op ``index`` draws from the global generator, note any reseed.

        Raises:
            MaterializationError: the model restored a placeholder read after a draw.
        """
        # Fake ops never advance the real generator, so a changed state means
        # the model reseeded (or drew real numbers) here: replay must too.
        # The generator holds a placeholder of this block while recording, so
        # even a reseed to the state it had before the block is a change.
        state = torch.get_rng_state()
        key = state_key(state)
        if key == self._physical_key:
            if self._entry_pending:
                self._entry_pending = False
                record.states.setdefault(_DEFAULT_CPU, {})[index] = self._entry
        else:
            state = self._resolve(state, key)
            self._entry_pending = False
            record.states.setdefault(_DEFAULT_CPU, {})[index] = state
        self._install()

    def close(self, record: Record, finished: bool) -> MaterializationError | None:
        """Note the generator at exit in ``record`` and set it where it must be after the block.

        Eager construction would have advanced the global generator past the
        block's draws. Until :func:`materialize` knows that end state, the
        generator holds a placeholder derived from the block, so a reseed (or
        a later block continuing this one) can be told apart from "nothing
        happened", and seeded runs stay reproducible. A block without draws
        leaves it where the model set it (or at the entry state), a failed
        block at the entry state: no recording placeholder outlives the block.

        Returns:
            The error to raise once the recorder is torn down (the model
            restored a placeholder it read after a draw), else ``None``.
        """
        error: MaterializationError | None = None
        state = torch.get_rng_state()
        changed: torch.Tensor | None = None  # a state the model set after its last draw
        key = state_key(state)
        if self._entry.numel() and key != self._physical_key:
            try:
                changed = self._resolve(state, key)
            except MaterializationError as e:
                error = e if finished else None
                finished = False
        record.exit_state = self._exit_state(record, finished, state, changed)
        torch.set_rng_state(record.exit_state)
        return error

    def _exit_state(
        self,
        record: Record,
        finished: bool,
        state: torch.Tensor,
        changed: torch.Tensor | None,
    ) -> torch.Tensor:
        """Return where to leave the generator; pin ``changed`` in ``record`` if it counts."""
        opened = bool(self._entry.numel())
        if not finished:
            return self._entry if opened else state  # failed: back to the entry state
        has_draws = bool(record.random_ops(DEFAULT_STREAM))
        if changed is not None and (self._chained or has_draws):
            record.exit_pin = changed
        if has_draws or record.exit_pin is not None:
            digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=8)
            digest.update(str(len(record.ops)).encode())
            parked = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
            return parked.get_state()
        if opened:
            # No draw to account for: where the model left it, or where it was.
            return changed if changed is not None else self._entry
        return state  # never opened


class ReplayRng:
    """Get and set generator states by stream while one replay runs.

    Every state met right before a random op is noted in ``record.states``
    (and the state after the last one in ``record.ends``), so a later replay
    of any slice starts from the nearest known state.

    Args:
        record: the record replayed.
        rdev: the device whose default generator draws.
    """

    def __init__(self, record: Record, rdev: torch.device) -> None:
        self.record, self.rdev = record, rdev
        self.gens: dict[int, torch.Generator] = {}

    def generator(self, stream: int) -> torch.Generator:
        """Return the replay's own generator standing in for explicit generator ``stream``."""
        gen = self.gens.get(stream)
        if gen is None:
            gen = self.gens[stream] = torch.Generator(device=self.record.streams[stream].device)
        return gen

    def get(self, stream: int) -> torch.Tensor:
        """Return the current state of ``stream``."""
        if stream != DEFAULT_STREAM:
            return self.generator(stream).get_state()
        return get_default_state(self.rdev)

    def set(self, stream: int, state: torch.Tensor) -> None:
        """Set the state of ``stream``."""
        if stream != DEFAULT_STREAM:
            self.generator(stream).set_state(state)
        else:
            set_default_state(self.rdev, state)

    def enter(self, i: int, stream: int) -> None:
        """Before random op ``i``: set the state known for it, or note the current one."""
        known = self.record.states.setdefault(stream_key(stream, self.rdev), {})
        state = known.get(i)
        if state is not None:
            self.set(stream, state)
        else:
            known[i] = self.get(stream)

    def leave(self, i: int, stream: int) -> None:
        """After random op ``i``: note the state the next random op of ``stream`` starts from."""
        key = stream_key(stream, self.rdev)
        index = self.record.random_ops(stream)
        pos = bisect.bisect_left(index, i)
        state = self.get(stream)
        if pos == len(index) - 1:
            self.record.ends.setdefault(key, state)
        else:
            self.record.states.setdefault(key, {}).setdefault(index[pos + 1], state)


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
