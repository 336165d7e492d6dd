"""A checkpoint as the loader sees it, and the single-file sources: torch and safetensors.

A :class:`Source` lists every tensor's name, shape and dtype (:class:`Entry`)
*before* any data is read, so the loader can validate the whole checkpoint
against the module and refuse it without touching the module. Its
:meth:`Source.read` then reads the tensors asked for, file by file in the
order they lie on disk, into memory the process owns (see
:mod:`~lightning_meta._load._files`). Nothing here unpickles with
``pickle.load`` or ``torch.load``: torch files are read by
:mod:`~lightning_meta._load._torchfile`, safetensors headers are parsed here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_meta._compat import children_of, non_persistent_of, tensor_tables
from lightning_meta._errors import MetaTensorError
from lightning_meta._load._files import (
    CORRUPT_FIX,
    FileStamp,
    Reader,
    Region,
    corrupt,
    head,
    read_file,
    stamps_of,
)
from lightning_meta._load._torchfile import (
    Archive,
    TensorRef,
    Unsupported,
    check_storage_bounds,
    open_archive,
    open_legacy,
    tensor_from,
    torch_policy,
)

__all__ = [
    "CORRUPT_FIX",
    "CompositeSource",
    "Entry",
    "SafetensorsSource",
    "Source",
    "SuppliedEntry",
    "TorchSource",
    "castable",
    "head",
    "is_safetensors",
    "is_torch",
    "open_safetensors",
    "two_values_error",
    "open_torch",
    "state_tensors",
    "torch_archive",
]

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Dtypes newer torch versions have (as safetensors.torch guards them).
for _name, _attr in (
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
):
    if isinstance(getattr(torch, _attr, None), torch.dtype):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
# Sub-byte dtypes: safetensors counts their shape in elements, torch in packed
# bytes (two 4-bit values per element of the last dimension).
_SAFETENSORS_PACKED: dict[str, tuple[torch.dtype, int]] = {}
if isinstance(getattr(torch, "float4_e2m1fn_x2", None), torch.dtype):
    _SAFETENSORS_PACKED["F4"] = (torch.float4_e2m1fn_x2, 2)
# Every dtype name the safetensors format defines (safetensors 0.6): a name among
# them that this torch lacks is refused as such; any other marks a damaged header.
_SAFETENSORS_NAMES = frozenset(
    {
        *_SAFETENSORS_DTYPES,
        "F8_E4M3FNUZ",
        "F8_E5M2FNUZ",
        "F8_E8M0",
        "F4",
        "F6_E2M3",
        "F6_E3M2",
    }
)
# safetensors' own limit on the JSON header
_MAX_HEADER = 100_000_000

DENSE = "dense"
# The key every checkpoint Lightning's Trainer saves holds (Lightning 1.x and 2.x).
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint, known before its data is read.

    ``kind`` is ``"dense"`` for a tensor the loader can read; anything else
    (``"meta"``, ``"sparse"``, ``"quantized"``, ``"nested"``, ``"tensor
    subclass ..."``) names a tensor a module cannot be filled with, refused
    when a module name asks for it.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    kind: str = DENSE

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class SuppliedEntry(Entry):
    """A value the module's own load code puts in place of a key the checkpoint lacks
    (see :meth:`Source.supply`); no byte of it is read from the checkpoint."""

    @property
    def nbytes(self) -> int:
        """None of its bytes come from the checkpoint."""
        return 0


class Source:
    """The tensors of one checkpoint: :attr:`entries` up front, data on :meth:`read`.

    Attributes:
        path: the file, index or directory opened.
        format: the :attr:`~lightning_meta.LoadReport.format` name.
        entries: every tensor by checkpoint key.
        others: keys of non-tensor values found where tensors were expected;
            the plan lists them as unexpected.
        stamps: each file read, as it was when opened; a file that differs
            when it is read is refused.
        versions: the saved state dict's ``_metadata`` (module path to
            ``{"version": n}``), which ``load_state_dict`` hands each module's
            ``_load_from_state_dict``; ``None`` where the file keeps none
            (safetensors, a dict built from a state dict), as torch then sees it.
        own_versions: whether loading the format eagerly gives the modules
            their own versions (a distributed checkpoint is loaded into
            ``model.state_dict()``), whatever :attr:`versions` says.
        under_state_dict: whether the tensors are the file's ``"state_dict"``
            entry (a Lightning checkpoint), not the whole file.
        mapping: the state dict as the file nests it (its tensors described, not
            read), where the format has one: how a fix reaches a prefix's keys.
    """

    own_versions = False

    def __init__(
        self,
        path: Path,
        fmt: str,
        entries: dict[str, Entry],
        *,
        others: Iterable[str] = (),
        stamps: Mapping[Path, FileStamp] | None = None,
    ) -> None:
        self.path, self.format, self.entries = path, fmt, entries
        self.others = sorted(others)
        # keys a torch file holds two values under (see state_tensors), with that file
        self.clashes: dict[str, Path] = {}
        self.stamps: dict[Path, FileStamp] = dict(stamps or {})
        self.versions: Mapping[str, Any] | None = None
        self.under_state_dict = False
        self.mapping: Mapping[Any, Any] | None = None
        self._supplied: dict[str, torch.Tensor] = {}

    def supply(self, key: str, value: torch.Tensor) -> Entry:
        """Add ``key`` with ``value``: what a module's own load code puts in the state dict
        for a key the file lacks (``nn.BatchNorm``'s ``num_batches_tracked``)."""
        entry = SuppliedEntry(key, tuple(value.shape), value.dtype, "(the module's load code)")
        self.entries[key] = entry
        self._supplied[key] = value
        return entry

    def read(
        self,
        keys: Sequence[str],
        *,
        verify: bool = False,
        mapped: bool = False,
        cast: Mapping[str, torch.dtype] | None = None,
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        """Yield ``(key, tensor)`` for ``keys``, file by file, in the order data lies on disk.

        Each tensor has the checkpoint's shape, dtype and values, on the CPU,
        in memory of its own (``mapped=True``: mapped from the file,
        copy-on-write).

        Args:
            keys: the keys to read (all in :attr:`entries`, all ``"dense"``).
            verify: check the CRC-32 of every zip record read.
            mapped: map instead of reading.
            cast: the dtype some keys should arrive in; a source may cast
                while it reads (piece by piece, so no full-size temporary of
                the checkpoint's dtype exists) or leave it to the caller.

        Raises:
            MetaTensorError: the data cannot be read: a file is truncated,
                damaged (a CRC differs, with ``verify``), unreadable, or
                changed since it was opened.
        """
        cast = dict(cast or {})
        for key in [k for k in keys if k in self._supplied]:
            value = self._supplied[key]
            yield key, value.to(cast.get(key, value.dtype), copy=True)
        with Reader(self.stamps, verify=verify, mapped=mapped) as reader:
            yield from self.read_with([k for k in keys if k not in self._supplied], reader, cast)

    def read_with(
        self, keys: list[str], reader: Reader, cast: dict[str, torch.dtype]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for ``keys`` using ``reader`` (see :meth:`read`)."""
        raise NotImplementedError


class TorchSource(Source):
    """Torch files (zip or legacy): tensors described by their pickles, read storage by storage."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        refs: dict[str, tuple[Archive, TensorRef | Unsupported | torch.Tensor]],
        *,
        others: Iterable[str] = (),
    ) -> None:
        entries: dict[str, Entry] = {}
        for key, (archive, ref) in refs.items():
            if isinstance(ref, Unsupported):
                entries[key] = Entry(key, ref.shape, torch.uint8, archive.path.name, ref.kind)
            elif isinstance(ref, TensorRef):
                entries[key] = Entry(key, ref.shape, ref.dtype, archive.path.name)
            else:
                entries[key] = Entry(
                    key, tuple(ref.shape), ref.dtype, archive.path.name, _kind(ref)
                )
        files = {a.path for a, _ in refs.values()}
        super().__init__(path, fmt, entries, others=others, stamps=stamps_of(files))
        self._refs = refs
        #: the file's whole object, where the source is one torch file (see open_torch)
        self.archive: Archive | None = None

    def described(self, key: str) -> tuple[TensorRef, Region] | None:
        """``key``'s tensor as its pickle describes it, and the file region of its storage.

        ``None`` for a tensor a ``safe_globals`` function built (it is already in memory).
        """
        archive, ref = self._refs[key]
        if not isinstance(ref, TensorRef):
            return None
        return ref, archive.regions[ref.storage.key]

    def read_with(
        self, keys: list[str], reader: Reader, cast: dict[str, torch.dtype]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        # One read per storage (several keys may view one), in file order.
        groups: dict[tuple[int, str], list[tuple[str, TensorRef]]] = {}
        archives: dict[int, Archive] = {}
        for key in keys:
            archive, ref = self._refs[key]
            if isinstance(ref, torch.Tensor):
                yield key, ref  # built by a safe_globals function the caller trusts
                continue
            assert isinstance(ref, TensorRef), key
            archives[id(archive)] = archive
            groups.setdefault((id(archive), ref.storage.key), []).append((key, ref))

        def order(item: tuple[tuple[int, str], list[tuple[str, TensorRef]]]) -> tuple[str, int]:
            (aid, skey), _ = item
            region = archives[aid].regions[skey]
            return str(region.file), region.offset

        plan: list[tuple[Region, int, int, list[tuple[str, TensorRef]]]] = []
        for (aid, skey), members in sorted(groups.items(), key=order):
            spans = [ref.byte_range() for _, ref in members]
            used = [s for s in spans if s[1] > s[0]]
            lo = min((s[0] for s in used), default=0)
            hi = max((s[1] for s in used), default=0)
            plan.append((archives[aid].regions[skey], lo, hi, members))
        reader.prefetch((region, lo, hi) for region, lo, hi, _ in plan)
        for region, lo, hi, members in plan:
            if len(members) == 1 and castable(members[0][1], lo, hi, cast.get(members[0][0])):
                key, ref = members[0]
                flat = reader.read_cast(region, lo, hi, ref.dtype, cast[key])
                yield key, flat.view(ref.shape)
                del flat
                continue
            data = reader.read(region, lo, hi) if hi > lo else torch.empty(0, dtype=torch.uint8)
            for key, ref in members:
                try:
                    yield key, tensor_from(data, ref, lo)
                except (RuntimeError, ValueError) as e:
                    raise corrupt(
                        region.file, f"cannot hold {key!r} as its pickle describes it ({e})"
                    ) from e
            # Let the buffer go before the next one is read: with a cast, the
            # read (checkpoint dtype) tensors are temporaries.
            del data


def castable(ref: TensorRef, lo: int, hi: int, dtype: torch.dtype | None) -> bool:
    """Whether ``ref`` can be read cast to ``dtype`` piece by piece: contiguous, filling ``[lo, hi)``."""
    if dtype is None or dtype == ref.dtype or ref.fix is not None or hi <= lo:
        return False
    expected, step = [], 1
    for n in reversed(ref.shape):
        expected.append(step)
        step *= n
    contiguous = all(
        s == e or n == 1 for s, e, n in zip(ref.stride, reversed(expected), ref.shape, strict=True)
    )
    return contiguous and hi - lo == step * ref.dtype.itemsize


def _kind(t: torch.Tensor) -> str:
    """The :attr:`Entry.kind` of a tensor a trusted ``safe_globals`` function built."""
    if t.is_meta:
        return "meta"
    if t.is_quantized:
        return "quantized"
    if t.is_nested:
        return "nested"
    if t.layout != torch.strided:
        return "sparse"
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"tensor subclass {type(t).__qualname__}"
    return DENSE


def is_torch(first: bytes) -> bool:
    """Whether a file starting with ``first`` is a torch zip or legacy pickle file."""
    if first.startswith(b"PK\x03\x04"):
        return True
    # A legacy file is a pickle: the PROTO opcode, then protocol 2 to 5. Its
    # first object, torch's magic number, leaves no "{" at byte 8, where a
    # safetensors file starting with the same two bytes (a header length of
    # 0x..0280, say: about one file in 32 has 0x80 as its low byte) has one.
    return first[:1] == b"\x80" and first[1:2] in _PICKLE_PROTOCOLS and not is_safetensors(first)


_PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")


def is_safetensors(first: bytes) -> bool:
    """Whether a file starting with ``first`` is safetensors (a length, then a JSON header)."""
    return first[8:9] == b"{"


def torch_archive(p: Path, safe_globals: Sequence[Any]) -> Archive:
    """Read the structure of the torch file ``p`` (zip or legacy) without reading tensor data.

    Raises:
        MetaTensorError: see :func:`~lightning_meta._load._torchfile.open_archive`
            and :func:`~lightning_meta._load._torchfile.open_legacy`.
    """
    policy = torch_policy().with_trusted(safe_globals)
    if head(p).startswith(b"PK"):
        return open_archive(p, policy)
    return open_legacy(p, policy)


def open_torch(p: Path, safe_globals: Sequence[Any], prefix: str | None = None) -> Source:
    """Open the torch zip or legacy file ``p`` (a Lightning ``.ckpt`` included).

    A file holding a ``"state_dict"`` mapping (a Lightning checkpoint, timm's
    ``train.py`` layout) gives that state dict; the rest of it is trainer
    state a module does not hold. A given ``prefix`` that matches keys of the
    whole file (``"state_dict_ema."``) gives the whole file instead, so that
    its other mappings can be reached. The format is ``"lightning"`` only
    for a Lightning checkpoint (it records ``"pytorch-lightning_version"``).

    Args:
        p: the file.
        safe_globals: what unpickling may construct beyond tensors and plain containers.
        prefix: the caller's key prefix, or ``None`` (detected later).

    Returns:
        A source of ``p``'s state dict; nothing of tensor data read yet.

    Raises:
        MetaTensorError: see :func:`torch_archive` and :func:`state_tensors`;
            or a tensor reaches past its storage.
    """
    archive = torch_archive(p, safe_globals)
    obj = state = archive.obj
    if isinstance(obj, torch.nn.Module):  # torch.save(model), its classes trusted
        obj = state = _module_tensors(obj)
    fmt = "torch" if archive.layout == "zip" else "torch-legacy"
    clashes: list[str] = []
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        if LIGHTNING_VERSION_KEY in obj:
            fmt = "lightning"
        leaves, others = state_tensors(p, obj, clashes)
        given = prefix if not prefix or prefix.endswith(".") else prefix + "."
        if not given or not any(k.startswith(given) for k in [*leaves, *others]):
            clashes.clear()
            leaves, others = state_tensors(p, obj["state_dict"], clashes)
            state = obj["state_dict"]
    else:
        leaves, others = state_tensors(p, obj, clashes)
    check_storage_bounds([(k, v) for k, v in leaves.items() if isinstance(v, TensorRef)], str(p))
    refs = {k: (archive, v) for k, v in leaves.items()}
    source = TorchSource(p, fmt, refs, others=others)
    source.archive = archive  # the whole file, for a LightningModule's on_load_checkpoint
    source.under_state_dict = state is not obj
    source.mapping = state
    source.clashes = dict.fromkeys(clashes, p)
    source.versions = saved_versions(state)
    return source


def norm_fills_counter(versions: Any, path: str) -> bool:
    """Whether a norm layer at ``path`` puts its own ``num_batches_tracked`` into a state
    dict saved with ``versions`` (a ``_metadata``) that lacks it, as torch's ``_NormBase``
    does for a version below 2 or none recorded."""
    entry = versions.get(path) if isinstance(versions, Mapping) else None
    version = entry.get("version") if isinstance(entry, Mapping) else None
    return not (isinstance(version, int) and version >= 2)


def saved_versions(state: Any) -> dict[str, Any] | None:
    """The ``_metadata`` of ``state`` and of every mapping nested in it, by module path
    from ``state``'s root: ``{"model": model.state_dict()}`` (``fabric.save``, a training
    script's checkpoint) gives the model's under ``model``, which eager loading hands the
    modules as ``torch.load(path)["model"]``. ``None`` where none keeps any."""
    out: dict[str, Any] = {}
    found = False
    pending: list[tuple[Mapping[Any, Any], str, int]] = [(state, "", 0)]
    while pending:
        obj, path, depth = pending.pop()
        versions = getattr(obj, "_metadata", None)
        if isinstance(versions, Mapping):
            found = True
            for key, value in versions.items():
                where = f"{path}.{key}" if path and key else path or str(key)
                out.setdefault(where, value)  # an outer mapping's entry comes first
        if depth < _MAX_NESTING:
            pending.extend(
                (v, f"{path}.{k}" if path else str(k), depth + 1)
                for k, v in obj.items()
                if isinstance(v, Mapping)
            )
    return out if found else None


def state_tensors(
    p: Path, obj: Any, clashes: list[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Flatten the state dict ``obj`` read from ``p`` into dotted keys.

    Nested dicts (a dict of state dicts) give dotted keys, as ``state_dict`` does.
    Two values under one key (the int ``0`` beside the string ``'0'``) are
    refused, or, given ``clashes``, listed there (the first value kept), for
    the caller to refuse those under the prefix it loads.

    Returns:
        The tensors (:class:`TensorRef`, :class:`Unsupported`, or tensors a
        trusted global built) by key, and the keys of values that are not tensors.

    Raises:
        MetaTensorError: ``obj`` is not a mapping (a saved module or tensor).
    """
    if not isinstance(obj, Mapping):
        kind = "Tensor" if isinstance(obj, (TensorRef, Unsupported)) else type(obj).__name__
        raise MetaTensorError(
            f"{str(p)!r} holds a {kind}, not a state dict. Fix: save "
            "module.state_dict() (or a dict of them), not the module or a tensor.",
            paths=[str(p)],
        )
    tensors: dict[str, Any] = {}
    others: list[str] = []
    found: list[str] = []
    flat = _flatten(obj, "", tensors, others, found)
    if found and clashes is None:
        raise two_values_error(p, found)
    if clashes is not None:
        clashes.extend(found)
    if not flat:
        raise MetaTensorError(
            f"{str(p)!r} nests mappings more than {_MAX_NESTING} levels deep, which no "
            "state dict does. Fix: load a file written by torch.save(module.state_dict()).",
            paths=[str(p)],
        )
    return tensors, others


# Deeper than any state dict (a module path is one level here); a hostile file
# nesting further would exhaust Python's recursion limit.
_MAX_NESTING = 256


def two_values_error(p: Path, keys: list[str]) -> MetaTensorError:
    """The refusal of a torch file holding two values under each of ``keys``."""
    return MetaTensorError(
        f"{str(p)!r} holds two values under the keys {sorted(set(keys))[:5]} (keys that are "
        "not strings, such as the int 0 beside the string '0', or a nested key spelling a "
        "dotted one); loading would keep one of them and drop the other without a word. "
        "Fix: save a state dict whose keys are distinct strings (module.state_dict() is one).",
        paths=[str(p)],
    )


def _flatten(
    obj: Any,
    prefix: str,
    out: dict[str, Any],
    others: list[str],
    clashes: list[str],
    depth: int = 0,
) -> bool:
    """Put ``obj``'s tensors in ``out`` by dotted key, its other leaves in ``others``, keys
    met twice in ``clashes``; ``False`` if it nests deeper than ``_MAX_NESTING``."""
    if isinstance(obj, (TensorRef, Unsupported, torch.Tensor)):
        if prefix[:-1] in out:
            clashes.append(prefix[:-1])
        else:
            out[prefix[:-1]] = obj
    elif isinstance(obj, Mapping):
        if depth >= _MAX_NESTING:
            return False
        for k, v in obj.items():
            if not _flatten(v, f"{prefix}{k}.", out, others, clashes, depth + 1):
                return False
    elif isinstance(obj, torch.nn.Module):
        # A whole module the caller trusted (safe_globals), kept beside other state
        # (torch.save({"model": model, "epoch": 3})): its tensors under its key, as its
        # state_dict names them. Before 2026-12-07 (seventh session) it was one
        # unexpected key, and the prefix the refusal suggested matched nothing.
        return _flatten(_module_tensors(obj), prefix, out, others, clashes, depth + 1)
    elif prefix:
        others.append(prefix[:-1])
    return True


def _module_tensors(module: torch.nn.Module, depth: int = 0) -> dict[str, Any]:
    """The parameters and persistent buffers of an unpickled module (tensors still as the
    file describes them), nested by submodule, as ``state_dict`` names them (without its
    hooks, which the unpickled module's tensors could not run)."""
    parameters, buffers = tensor_tables(module)
    skipped = non_persistent_of(module)
    out: dict[str, Any] = {k: v for k, v in parameters.items() if v is not None}
    out.update({k: v for k, v in buffers.items() if v is not None and k not in skipped})
    if type(module).get_extra_state is not torch.nn.Module.get_extra_state:
        # state_dict would hold it under _extra_state: a value that is not a tensor, which
        # the load refuses by its key as it refuses it in a state dict file (a third look:
        # it was dropped without a word)
        out["_extra_state"] = "<extra state>"

    if depth < _MAX_NESTING:
        for name, child in children_of(module).items():
            if child is not None:
                out[name] = _module_tensors(child, depth + 1)
    return out


class SafetensorsSource(Source):
    """One safetensors file, its JSON header parsed and checked here; tensors read on demand."""

    def __init__(self, path: Path, fmt: str = "safetensors") -> None:
        where = str(path)
        stamps = stamps_of([path])
        size = stamps[path].size
        if size < 8:
            raise self._bad(where, "shorter than its 8-byte header length")
        n = int.from_bytes(read_file(path, 0, 8), "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise self._bad(where, f"header length {n} does not fit in the file's {size} bytes")
        header = self._header(where, read_file(path, 8, n))
        data_start = 8 + n
        entries: dict[str, Entry] = {}
        self._regions: dict[str, Region] = {}
        spans: list[tuple[int, int, str]] = []
        for key, info in header.items():
            if key == "__metadata__":
                # safetensors refuses any other kind of metadata; so do we
                if info is not None and not (
                    isinstance(info, dict) and all(isinstance(v, str) for v in info.values())
                ):
                    raise self._bad(
                        where, f"its __metadata__ is not a map of strings to strings: {info!r:.200}"
                    )
                continue
            entry, begin, end = self._entry(where, path, key, info)
            entries[key] = entry
            spans.append((begin, end, key))
            self._regions[key] = Region(
                path, data_start + begin, end - begin, None, f"tensor {key!r}"
            )
        spans.sort()
        edge = 0
        for begin, end, key in spans:
            if begin != edge:
                raise self._bad(
                    where, f"{key!r} starts at byte {begin} of the data, expected {edge}"
                )
            edge = end
        if data_start + edge != size:
            raise self._bad(
                where,
                f"its tensors need {data_start + edge} bytes but the file has {size} "
                + (
                    "(truncated?)"
                    if size < data_start + edge
                    else f"({size - data_start - edge} bytes after the last tensor: appended to?)"
                ),
            )
        super().__init__(path, fmt, entries, stamps=stamps)

    @staticmethod
    def _bad(where: str, problem: str) -> MetaTensorError:
        return MetaTensorError(
            f"{where!r} is not a valid safetensors file (bad header, truncated, or sizes that "
            f"disagree): {problem}. {CORRUPT_FIX}",
            paths=[where],
        )

    def _header(self, where: str, raw: bytes) -> dict[str, Any]:
        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [k for k, _ in pairs]
            if len(set(keys)) != len(keys):
                dup = sorted({k for k in keys if keys.count(k) > 1})
                raise ValueError(f"keys {dup} appear twice")
            return dict(pairs)

        def no_constant(name: str) -> Any:
            # Python's json reads NaN and Infinity; JSON, and safetensors, refuse them.
            raise ValueError(f"{name} is not JSON")

        try:
            header = json.loads(
                raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant
            )
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._bad(where, f"its JSON header cannot be read ({e})") from e
        if not isinstance(header, dict):
            raise self._bad(where, "its header is not a JSON object")
        return header

    def _entry(self, where: str, path: Path, key: str, info: Any) -> tuple[Entry, int, int]:
        if not isinstance(info, dict):
            raise self._bad(where, f"the header entry of {key!r} is not an object")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (
            isinstance(shape, list)
            and all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in shape
            )
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise self._bad(where, f"the header entry of {key!r} has a bad shape or data_offsets")
        dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        packed = _SAFETENSORS_PACKED.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None and packed is None and dtype_name not in _SAFETENSORS_NAMES:
            raise self._bad(
                where,
                f"the header entry of {key!r} has the dtype {dtype_name!r}, which is not a "
                "safetensors dtype",
            )
        if dtype is None and packed is None:
            raise MetaTensorError(
                f"{path.name!r} stores {key!r} as {dtype_name}, which torch "
                f"{torch.__version__} cannot hold. Fix: convert the checkpoint to a torch dtype.",
                paths=[key],
            )
        if packed is not None:
            dtype, per = packed
            if not shape or shape[-1] % per:
                raise self._bad(
                    where,
                    f"{key!r} is {dtype_name} of shape {shape}, whose last dimension is not a "
                    f"multiple of {per} (the values it packs into one byte)",
                )
            shape = [*shape[:-1], shape[-1] // per]
        assert dtype is not None
        entry = Entry(key, tuple(shape), dtype, path.name)
        begin, end = offsets
        if end - begin != entry.nbytes:
            raise self._bad(
                where,
                f"{key!r} ({shape} {dtype_name}) needs {entry.nbytes} bytes but its data_offsets "
                f"give {end - begin}",
            )
        return entry, begin, end

    def region(self, key: str) -> Region:
        """Return where the data of tensor ``key`` lies in the file."""
        return self._regions[key]

    def read_with(
        self, keys: list[str], reader: Reader, cast: dict[str, torch.dtype]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        keys = sorted(keys, key=lambda k: self._regions[k].offset)
        reader.prefetch((self._regions[k], 0, self._regions[k].nbytes) for k in keys)
        for key in keys:
            entry = self.entries[key]
            region = self._regions[key]
            want = cast.get(key, entry.dtype)
            if want != entry.dtype and region.nbytes:
                flat = reader.read_cast(region, 0, region.nbytes, entry.dtype, want)
                yield key, flat.view(entry.shape)
                del flat
                continue
            data = reader.read(region)
            yield key, data.view(entry.dtype).reshape(entry.shape)
            del data  # before the next read (see TorchSource.read_with)


def open_safetensors(p: Path) -> Source:
    """Open the single safetensors file ``p``; tensors are read when asked for.

    Raises:
        MetaTensorError: a bad header, a truncated file, sizes that disagree,
            or a dtype torch lacks.
    """
    return SafetensorsSource(p)


class CompositeSource(Source):
    """Several sources read as one (the shards of an index); every key in exactly one of them."""

    def __init__(self, path: Path, fmt: str, parts: list[Source]) -> None:
        entries: dict[str, Entry] = {}
        owner: dict[str, Source] = {}
        stamps: dict[Path, FileStamp] = {}
        twice: dict[str, list[str]] = {}
        for part in parts:
            for key, entry in part.entries.items():
                if key in entries:
                    twice.setdefault(key, [entries[key].file]).append(entry.file)
                    continue
                entries[key] = entry
                owner[key] = part
            stamps.update(part.stamps)
        if twice:
            lines = [f"{k!r} in {files}" for k, files in sorted(twice.items())]
            raise MetaTensorError(
                f"the checkpoint {str(path)!r} holds keys in more than one shard, so which value "
                f"is meant is ambiguous: {'; '.join(lines)}. Fix: remove the stale shard or "
                "re-save the checkpoint.",
                paths=[*twice, *(f for fs in twice.values() for f in fs)],
            )
        # Non-tensor values of the shards (a module's extra state) stay visible:
        # refused as extra state, or listed as unexpected.
        others = sorted({o for part in parts for o in part.others})
        super().__init__(path, fmt, entries, others=others, stamps=stamps)
        self._owner = owner
        self._parts = parts

    def part_of(self, key: str) -> Source:
        """Return the shard that holds tensor ``key``."""
        return self._owner[key]

    def read_with(
        self, keys: list[str], reader: Reader, cast: dict[str, torch.dtype]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for part in self._parts:
            mine = [k for k in keys if self._owner[k] is part]
            if mine:
                yield from part.read_with(mine, reader, cast)
