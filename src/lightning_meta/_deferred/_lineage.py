"""What each recorded storage's bytes depend on: random draws, uninitialised memory, or neither.

While a ``deferred_init`` block records, :class:`Lineage` follows every op
over storages (by the recorder's storage indices):

- a storage made by ``torch.empty`` (and its like) starts *uninitialised*;
  an op that overwrites it whole without reading it (``normal_``,
  ``fill_``, ``copy_``) initialises it, a partial overwrite initialises the
  bytes it covers (tracked with a byte map, made only for that case);
- a value computed from uninitialised bytes is *garbage*, one computed
  from random draws is *random*; both spread to every op's outputs and to
  what it writes. Garbage is kept as bytes not written (what an op
  computes from garbage stays uninitialised where it lands), so a later
  write over them cleans them: circular padding copies a corner before it
  is filled, then fills it.

The recorder asks it whether a value can be read while recording (it can if
neither random nor garbage: it depends on Python numbers and captured real
tensors only), which storages an op overwrites whole (replay skips what comes
before), and, when the block ends, which tensors left on modules still hold
uninitialised memory (``materialize`` refuses them unless a checkpoint
fills them first).
"""

from __future__ import annotations

import functools

import torch

from lightning_meta import _compat
from lightning_meta._deferred._record import RANDOM_FILLS, Value

__all__ = ["GARBAGE", "RANDOM", "Lineage", "covers", "op_kind"]

RANDOM = 1
GARBAGE = 2

# Op kinds, by the op's name without overload.
PLAIN, MAKES_UNINIT, READS_METADATA, OVERWRITES = 0, 1, 2, 3

_UNINIT = frozenset(
    {
        "aten.empty",
        "aten.empty_strided",
        "aten.empty_like",
        "aten.new_empty",
        "aten.new_empty_strided",
        "aten.empty_permuted",
    }
)
# In-place ops whose first argument is written whole, its old values unread.
_OVERWRITE = RANDOM_FILLS | {"aten.fill_", "aten.zero_", "aten.copy_", "aten.bernoulli_"}
_METADATA = frozenset({"aten.detach", "aten.alias", "aten.lift_fresh"})
# Ops that never read the values of one tensor argument (by its index among the
# op's tensor arguments): rrelu's noise, which it draws over in training
# (torch.empty_like in F.rrelu) and leaves alone otherwise, and bernoulli with a
# number p, which takes only its input's shape (torch.bernoulli(torch.empty(n),
# 0.8), and dropout's batching rule under torch.func.vmap, on an expanded empty).
_UNREAD_ARGUMENT = {
    "aten.rrelu_with_noise.default": 1,
    "aten.rrelu_with_noise_.default": 1,
    "aten.bernoulli.p": 0,
}


@functools.cache
def op_kind(name: str) -> int:
    """Return how an op (``"aten.normal_.default"``) treats the values of its tensor arguments."""
    base, overload = name.rsplit(".", 1)
    if base in _UNINIT:
        return MAKES_UNINIT
    if base in _OVERWRITE or overload == "out" or overload.endswith("_out"):
        # An out= overload (torch.eye(out=) in nn.init.eye_, torch.arange(out=))
        # writes its result over the whole out tensor, resized to fit.
        return OVERWRITES
    if base in _METADATA or base.endswith("_like") or base.startswith("aten.new_"):
        return READS_METADATA
    return PLAIN


_NOTHING: frozenset[int] = frozenset()


@functools.lru_cache(maxsize=4096)
def covers(value: Value, nbytes: int) -> bool:
    """Whether ``value`` (a view) spans every byte of its storage, each once."""
    itemsize = value.dtype.itemsize
    numel = 1
    for n in value.size:
        numel *= n
    if numel * itemsize != nbytes or value.offset != 0:
        return False
    expected = 1
    for stride, size in sorted(
        (st, n) for st, n in zip(value.stride, value.size, strict=True) if n > 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


class Lineage:
    """The random / garbage flags and the initialised bytes of every storage of one recording.

    Args:
        values: the record's values (read, never changed).
    """

    def __init__(self, values: list[Value]) -> None:
        self.values = values
        self.nbytes: dict[int, int] = {}
        self.flags: dict[int, int] = {}
        # Storage -> None (all bytes uninitialised) or a byte map (1: written).
        self.uninit: dict[int, torch.Tensor | None] = {}
        self.sites: dict[int, str] = {}
        # Deterministic algorithms fill torch.empty (and resize_'s new bytes)
        # with NaN or the integer maximum: defined values, not garbage.
        self.fills_empty = False

    def new_storage(self, storage: int, nbytes: int) -> None:
        """Note a storage first met while recording (initialised, unless an op says otherwise)."""
        self.nbytes[storage] = nbytes

    def grow(self, storage: int, nbytes: int, site: str) -> None:
        """Note that ``resize_`` grew ``storage`` to ``nbytes``: the new bytes are uninitialised."""
        old = self.nbytes.get(storage, 0)
        if nbytes <= old:
            return
        self.nbytes[storage] = nbytes
        if self.fills_empty:
            return
        if storage in self.uninit and self.uninit[storage] is None:
            return  # all of it was uninitialised already
        with _compat.no_python_dispatch():
            grown = torch.zeros(nbytes, dtype=torch.bool)
            written = self.uninit.get(storage)
            if written is None:
                grown[:old] = True
            else:
                grown[:old] = written
        self.uninit[storage] = grown
        self.sites[storage] = f"aten.resize_ at {site}"

    def depends(self, vid: int) -> int:
        """Return the flags of value ``vid``: ``RANDOM``, ``GARBAGE`` (or both, or 0)."""
        value = self.values[vid]
        storage = value.storage
        flags = self.flags.get(storage, 0)
        if storage in self.uninit and not self._written(value):
            flags |= GARBAGE
        return flags

    def site(self, vid: int) -> str:
        """Return where the uninitialised memory behind value ``vid`` was made."""
        return self.sites.get(self.values[vid].storage, "<unknown>")

    def op(
        self,
        name: str,
        random: bool,
        reads: tuple[int, ...],
        writes: tuple[int, ...],
        outs: tuple[int | None, ...],
        site: str,
    ) -> frozenset[int]:
        """Follow one op; return the storages it overwrites whole without reading them."""
        kind = op_kind(name)
        values = self.values
        unread = _UNREAD_ARGUMENT.get(name)
        if unread is not None and unread < len(reads):
            reads = reads[:unread] + reads[unread + 1 :]
        target = writes[0] if kind == OVERWRITES and writes else None
        if target is not None and reads.count(target) > 1:
            target = None  # also an input (torch.add(c, 1, out=c), c.copy_(c)): it reads c
        if target is not None and outs and outs[0] != target:
            # An out= op that resized its target (a new value id, see
            # ValueIds.out): what it wrote is not what the target spanned.
            target = None
        flags = RANDOM if random else 0
        origin = ""
        if kind != READS_METADATA:
            for v in reads:
                if v == target:
                    continue
                storage = values[v].storage
                if storage not in self.flags and storage not in self.uninit:
                    continue  # the common case: a clean value
                f = self.depends(v)
                if f:
                    flags |= f
                    if f & GARBAGE and not origin:
                        origin = self.site(v)
        if not writes and not flags and kind != MAKES_UNINIT:
            return _NOTHING  # new values are clean: nothing to note
        touched = {values[v].storage for v in reads} | {values[v].storage for v in writes}
        garbage = bool(flags & GARBAGE)
        flags &= ~GARBAGE  # kept as unwritten bytes instead (see the module docstring)
        for out in outs:
            if out is None:
                continue
            storage = values[out].storage
            if storage in touched:
                continue  # a view of an argument: the storage's own state holds
            touched.add(storage)
            if flags:
                self.flags[storage] = flags
            if origin:
                self.sites[storage] = origin
            if garbage:
                self.uninit[storage] = None
            if kind == MAKES_UNINIT and not self.fills_empty:
                self.uninit[storage] = None
                self.sites[storage] = f"{name.rsplit('.', 1)[0]} at {site}"
        kills: frozenset[int] = frozenset()
        for v in writes:
            storage = values[v].storage
            if v != target:
                if garbage:
                    self._mark_unwritten(values[v], origin)
                self._taint(storage, flags, origin)
                continue
            copied = garbage and self._copy_bytes(name, reads, values[v], origin)
            if covers(values[v], self.nbytes.get(storage, -1)):
                if copied:
                    pass
                elif garbage:
                    self.uninit[storage] = None
                else:
                    self.uninit.pop(storage, None)
                if flags:
                    self.flags[storage] = flags
                else:
                    self.flags.pop(storage, None)
                if origin:
                    self.sites[storage] = origin
                others = {values[r].storage for r in reads if r != v}
                if storage not in others:
                    kills = frozenset({storage})
            else:
                if garbage and not copied:
                    self._mark_unwritten(values[v], origin)
                elif not garbage:
                    self._mark_written(values[v])
                self._taint(storage, flags, origin)
        return kills

    def _copy_bytes(self, name: str, reads: tuple[int, ...], target: Value, origin: str) -> bool:
        """For ``copy_`` from a partly uninitialised source: each element of ``target``
        is written where its source element was (elementwise, broadcast as copy_ does).

        Returns whether it did; ``False`` leaves the conservative rule (all of
        the target region garbage) to the caller.
        """
        if not name.startswith("aten.copy_.") or len(reads) != 2:
            return False
        source = self.values[reads[1]]
        nbytes = self.nbytes.get(target.storage)
        if (
            nbytes is None
            or self.flags.get(source.storage, 0) & GARBAGE
            or (source.storage == target.storage and self._overlap(source, target))
        ):
            return False
        with _compat.no_python_dispatch():
            if source.storage not in self.uninit:  # an initialised storage
                return False
            bytemap = self.uninit[source.storage]
            if bytemap is None:
                written = torch.zeros(source.size, dtype=torch.bool)
            else:
                written = self._region(bytemap, source).all(-1)
            try:
                written = torch.broadcast_to(written, target.size)
            except RuntimeError:
                return False
            if origin:
                self.sites.setdefault(target.storage, origin)
            if target.storage not in self.uninit:
                self.uninit[target.storage] = torch.ones(nbytes, dtype=torch.bool)
            mine = self.uninit[target.storage]
            if mine is None:
                mine = self.uninit[target.storage] = torch.zeros(nbytes, dtype=torch.bool)
            self._region(mine, target).copy_(written.unsqueeze(-1))
            if bool(mine.all()):
                del self.uninit[target.storage]
        return True

    def _overlap(self, a: Value, b: Value) -> bool:
        """Whether views ``a`` and ``b`` of one storage share a byte."""
        with _compat.no_python_dispatch():
            nbytes = self.nbytes[a.storage]
            marks = torch.zeros(nbytes, dtype=torch.bool)
            self._region(marks, a).fill_(True)
            return bool(self._region(marks, b).any())

    def _taint(self, storage: int, flags: int, origin: str) -> None:
        """Add ``flags`` to what ``storage`` depends on."""
        if flags:
            self.flags[storage] = self.flags.get(storage, 0) | flags
            if origin and storage not in self.sites:
                self.sites[storage] = origin

    def _region(self, bytemap: torch.Tensor, value: Value) -> torch.Tensor:
        itemsize = value.dtype.itemsize
        size = (*value.size, itemsize)
        stride = (*(s * itemsize for s in value.stride), 1)
        return bytemap.as_strided(size, stride, value.offset * itemsize)

    def _written(self, value: Value) -> bool:
        """Whether every byte ``value`` spans was written since its storage was made."""
        if 0 in value.size:
            return True  # it spans no byte (torch.empty(0), nn.Parameter()'s default)
        bytemap = self.uninit.get(value.storage)
        if bytemap is None:
            return False
        with _compat.no_python_dispatch():
            return bool(self._region(bytemap, value).all())

    def _mark_unwritten(self, value: Value, origin: str) -> None:
        """Note that ``value``'s bytes now hold garbage (computed from uninitialised bytes)."""
        storage = value.storage
        nbytes = self.nbytes.get(storage)
        if nbytes is None:  # a storage never met: only the flag can say it
            self.flags[storage] = self.flags.get(storage, 0) | GARBAGE
            return
        if origin:
            self.sites.setdefault(storage, origin)
        with _compat.no_python_dispatch():
            if storage not in self.uninit:
                self.uninit[storage] = torch.ones(nbytes, dtype=torch.bool)
            bytemap = self.uninit[storage]
            if bytemap is not None:
                self._region(bytemap, value).fill_(False)

    def _mark_written(self, value: Value) -> None:
        storage = value.storage
        if storage not in self.uninit:
            return
        with _compat.no_python_dispatch():
            bytemap = self.uninit[storage]
            if bytemap is None:
                bytemap = torch.zeros(self.nbytes[storage], dtype=torch.bool)
                self.uninit[storage] = bytemap
            self._region(bytemap, value).fill_(True)
            if bool(bytemap.all()):
                del self.uninit[storage]
