"""Checkpoints spread over several files: a Hugging Face index, a distributed checkpoint.

- A sharded Hugging Face index (``*.index.json``) maps every tensor name to a
  shard file, safetensors or torch; every shard is opened and checked against
  the index (each key in exactly the shard the index names, in no other)
  before any data is read.
- A ``torch.distributed.checkpoint`` directory (``.metadata``) is read here,
  not with ``torch.distributed.checkpoint.load``: its metadata is unpickled
  safely (:mod:`~lightning_meta._load._unpickle`, the DCP classes replaced by
  records), every item is checked to lie inside its ``.distcp`` file, every
  tensor's chunks to tile it exactly, and each item (a small torch zip file at
  an offset of a ``.distcp`` file) is read like a torch file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_meta._errors import MetaTensorError
from lightning_meta._load._files import (
    CORRUPT_FIX,
    Reader,
    Region,
    corrupt,
    head,
    io_error,
    stamps_of,
)
from lightning_meta._load._source import (
    CompositeSource,
    Entry,
    SafetensorsSource,
    Source,
    TorchSource,
    castable,
    is_safetensors,
    is_torch,
    state_tensors,
    torch_archive,
)
from lightning_meta._load._torchfile import (
    TensorRef,
    check_storage_bounds,
    open_archive,
    tensor_from,
    torch_policy,
)
from lightning_meta._load._unpickle import Policy, Record, record_class, safe_load

__all__ = ["DcpSource", "check_index", "dcp_policy", "open_dcp", "open_index"]


def open_index(index: Path, safe_globals: Sequence[Any]) -> Source:
    """Open the sharded checkpoint described by the Hugging Face index ``index``.

    Args:
        index: the ``*.index.json`` file; its shards lie next to it.
        safe_globals: what unpickling torch shards may construct beyond
            tensors and plain containers.

    Returns:
        A ``"sharded"`` source over every shard.

    Raises:
        MetaTensorError: the index is not valid JSON or has no ``weight_map``
            (``paths``: the index), a shard is missing, outside the index's
            directory or of an unknown format (``paths``: the shards), a shard
            is invalid, a key is in two shards (``paths``: the key and both
            files), or the index and its shards disagree (``paths``: the keys).
    """
    weight_map = _weight_map(index)
    outside = sorted({n for n in weight_map.values() if not _inside(n)})
    if outside:
        raise MetaTensorError(
            f"the index {str(index)!r} names shard(s) {outside} outside its directory "
            f"{str(index.parent)!r}; lightning_meta reads only files next to the index. "
            "Fix: use plain file names in the index's weight_map.",
            paths=[str(index), *outside],
        )
    # './shard' and 'dir/shard' name files inside the directory, as
    # transformers joins them: one spelling per file from here on.
    weight_map = {k: os.path.normpath(v) for k, v in weight_map.items()}
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        odd = [n for n in missing if (index.parent / n).exists()]
        not_files = f" ({', '.join(odd)}: not a regular file, a directory say)" if odd else ""
        raise MetaTensorError(
            f"the index {str(index)!r} refers to shard(s) {missing} that do not exist in "
            f"{str(index.parent)!r} as files{not_files}. Fix: download or copy the missing "
            "shard(s) next to the index.",
            paths=[str(index.parent / n) for n in missing],
        )
    parts: list[Source] = []
    # Non-tensor values of torch shards (a module's extra state) are kept as
    # the source's others: refused as extra state, or listed as unexpected.
    other_files: dict[str, str] = {}
    for name in names:
        shard = index.parent / name
        first = head(shard)
        if is_safetensors(first):
            parts.append(SafetensorsSource(shard, "sharded"))
        elif is_torch(first):
            archive = torch_archive(shard, safe_globals)
            clashes: list[str] = []
            leaves, others = state_tensors(shard, archive.obj, clashes)
            check_storage_bounds(
                [(k, v) for k, v in leaves.items() if isinstance(v, TensorRef)], str(shard)
            )
            part = TorchSource(
                shard, "sharded", {k: (archive, v) for k, v in leaves.items()}, others=others
            )
            part.clashes = dict.fromkeys(clashes, shard)
            parts.append(part)
            other_files.update(dict.fromkeys(others, name))
        else:
            raise MetaTensorError(
                f"shard {str(shard)!r} of {str(index)!r} is neither safetensors nor a torch file. "
                f"{CORRUPT_FIX}",
                paths=[str(shard)],
            )
    source = CompositeSource(index, "sharded", parts)  # refuses a key in two shards
    source.clashes = {k: f for part in parts for k, f in part.clashes.items()}
    found = {k: name for name, part in zip(names, parts, strict=True) for k in part.entries}
    # An index may name a non-tensor value's shard too; one it leaves out is no damage.
    found.update({k: f for k, f in other_files.items() if k in weight_map})
    check_index(index, weight_map, found)
    return source


def _inside(name: str) -> bool:
    # Judged by the name alone, not by where a symlink points: the Hugging Face
    # hub cache keeps every file as snapshots/<rev>/<name> -> ../../blobs/<hash>.
    # A name that climbs out ('..'), is absolute or is the directory itself is refused.
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        return False
    return os.path.normpath(name) not in (".", "")


def _weight_map(index: Path) -> dict[str, str]:
    where = str(index)
    try:
        data = json.loads(index.read_text())
    except OSError as e:
        raise io_error(index, e) from e
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MetaTensorError(
            f"the index {where!r} is not valid JSON: {e}. {CORRUPT_FIX}", paths=[where]
        ) from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if weight_map is None and not index.name.endswith(".index.json"):
        # Another JSON file (a model's config.json), passed where a checkpoint goes.
        raise MetaTensorError(
            f"{where!r} is a JSON file without a 'weight_map', so not a checkpoint index "
            "(model.safetensors.index.json): it holds no tensors. Fix: pass the checkpoint "
            "itself: the folder save_pretrained wrote, its .safetensors file, or its "
            "*.index.json.",
            paths=[where],
        )
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise MetaTensorError(
            f"the index {where!r} has no 'weight_map' of tensor names to shard files. "
            f"{CORRUPT_FIX}",
            paths=[where],
        )
    return weight_map


def check_index(index: Path, owner: dict[str, str], found: dict[str, str]) -> None:
    """Raise unless every key lies in the shard the index names, and no shard holds more.

    Args:
        index: the index file, for the message.
        owner: the index's ``weight_map`` (key to shard file name).
        found: where each key was actually found.

    Raises:
        MetaTensorError: they disagree; ``paths`` holds every key that does.
    """
    wrong = sorted(k for k, f in owner.items() if found.get(k) != f)
    extra = sorted(set(found) - set(owner))
    if wrong or extra:
        lines = [
            f"  {k!r}: index says {owner[k]!r}, "
            + (f"found in {found[k]!r}" if k in found else "in no shard the index lists")
            for k in wrong
        ]
        lines += [f"  {k!r}: in {found[k]!r} but not in the index" for k in extra]
        raise MetaTensorError(
            f"the index {str(index)!r} and its shards disagree:\n"
            + "\n".join(lines)
            + f"\n{CORRUPT_FIX}",
            paths=wrong + extra,
        )


# -- torch.distributed.checkpoint ------------------------------------------------

_DCP_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.")


def _dcp_record(module: str, name: str) -> Any:
    return record_class(f"{module}.{name}")


def _path_str(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise ValueError("a path in the metadata is not a str")
    return "/".join(parts)


def dcp_policy() -> Policy:
    """What a distributed checkpoint's ``.metadata`` may name: its own classes (as records), torch values."""
    torch_values = torch_policy()
    exact: dict[str, Any] = {
        k: v
        for k, v in torch_values.exact.items()
        if k.startswith(
            ("collections.", "builtins.", "_codecs.", "torch.Size", "torch.serialization.")
        )
    }
    for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        exact[f"pathlib.{cls}"] = _path_str
        exact[f"pathlib._local.{cls}"] = _path_str
    prefixes = {p: _dcp_record for p in _DCP_MODULES}
    prefixes.update(torch_values.prefixes)  # dtypes, layouts, memory formats
    return Policy(exact, prefixes)


class _Chunk:
    """One stored piece of a tensor: where it sits in the tensor and where its item lies."""

    __slots__ = ("offsets", "region", "sizes")

    def __init__(self, offsets: tuple[int, ...], sizes: tuple[int, ...], region: Region) -> None:
        self.offsets, self.sizes, self.region = offsets, sizes, region


class DcpSource(Source):
    """A ``torch.distributed.checkpoint`` directory, its items read like small torch files."""

    own_versions = True

    def __init__(
        self,
        path: Path,
        entries: dict[str, Entry],
        chunks: dict[str, list[_Chunk]],
        files: list[Path],
        safe_globals: Sequence[Any],
        *,
        others: Sequence[str] = (),
    ) -> None:
        super().__init__(path, "dcp", entries, others=others, stamps=stamps_of(files))
        self._chunks = chunks
        self._policy = torch_policy().with_trusted(safe_globals)

    def chunks(self, key: str) -> list[_Chunk]:
        """Return the stored pieces of tensor ``key`` (each one's box and item region)."""
        return self._chunks[key]

    @property
    def policy(self) -> Policy:
        """The unpickling policy items are opened with (torch's, plus ``safe_globals``)."""
        return self._policy

    def read_with(
        self, keys: list[str], reader: Reader, cast: dict[str, torch.dtype]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        def first(k: str) -> tuple[str, int]:
            r = self._chunks[k][0].region if self._chunks[k] else Region(Path(), 0, 0)
            return str(r.file), r.offset

        keys = sorted(keys, key=first)
        reader.prefetch((c.region, 0, c.region.nbytes) for k in keys for c in self._chunks[k])
        for key in keys:
            entry = self.entries[key]
            chunks = self._chunks[key]
            want = cast.get(key, entry.dtype)
            if len(chunks) == 1 and chunks[0].sizes == entry.shape:
                yield key, self._item(key, entry, chunks[0], reader, want)
                continue
            full = torch.empty(entry.shape, dtype=want)
            for chunk in chunks:
                part = self._item(key, entry, chunk, reader, want)
                view = full
                for dim, (o, n) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                    view = view.narrow(dim, o, n)
                view.copy_(part)
            yield key, full

    def _item(
        self, key: str, entry: Entry, chunk: _Chunk, reader: Reader, want: torch.dtype
    ) -> torch.Tensor:
        region = chunk.region
        where = f"{region.file}@{region.offset}"
        archive = open_archive(
            region.file, self._policy, start=region.offset, length=region.nbytes, where=where
        )
        ref = archive.obj
        if not isinstance(ref, TensorRef):
            raise corrupt(
                region.file,
                f"is damaged: the item of {key!r} at byte {region.offset} is not a tensor",
            )
        if ref.shape != chunk.sizes or ref.dtype != entry.dtype:
            raise corrupt(
                region.file,
                f"is damaged: the item of {key!r} at byte {region.offset} holds "
                f"{list(ref.shape)} {ref.dtype} but the metadata says {list(chunk.sizes)} {entry.dtype}",
            )
        check_storage_bounds([(key, ref)], str(region.file))
        lo, hi = ref.byte_range()
        storage_region = archive.regions[ref.storage.key]
        if castable(ref, lo, hi, want):
            return reader.read_cast(storage_region, lo, hi, ref.dtype, want).view(ref.shape)
        data = reader.read(storage_region, lo, hi) if hi > lo else torch.empty(0, dtype=torch.uint8)
        try:
            return tensor_from(data, ref, lo).contiguous()
        except (RuntimeError, ValueError) as e:
            raise corrupt(
                region.file, f"cannot hold {key!r} as its metadata describes it ({e})"
            ) from e


def open_dcp(p: Path, safe_globals: Sequence[Any] = ()) -> Source:
    """Open the ``torch.distributed.checkpoint`` directory ``p`` (metadata only).

    Lightning's ModelParallelStrategy and FSDP save ``{"state_dict": ...,
    "optimizer_0": ...}``; only the ``state_dict`` belongs to a module, and
    its keys lose that prefix.

    Returns:
        A ``"dcp"`` source; items are read on :meth:`~Source.read`.

    Raises:
        MetaTensorError: the metadata is unsafe, damaged or inconsistent
            (``paths``: ``.metadata``), a storage file is missing, outside the
            directory, or shorter than the metadata says (``paths``: those
            files), or a tensor's chunks do not tile it.
    """
    where = str(p / ".metadata")
    try:
        raw = (p / ".metadata").read_bytes()
    except OSError as e:
        raise io_error(p / ".metadata", e) from e
    metadata = safe_load(
        raw,
        dcp_policy().with_trusted(safe_globals),
        where=where,
        what="its metadata",
        subject=f"the torch.distributed.checkpoint metadata {where!r}",
    )
    try:
        tensors, storage, others = _interpret(metadata)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise MetaTensorError(
            f"the torch.distributed.checkpoint metadata {where!r} cannot be read: {e}. {CORRUPT_FIX}",
            paths=[where],
        ) from e
    files = _check_storage(p, storage)
    lightning = any(k.startswith("state_dict.") for k in tensors)
    entries: dict[str, Entry] = {}
    chunks: dict[str, list[_Chunk]] = {}
    for fqn, (shape, dtype, pieces) in tensors.items():
        if lightning and not fqn.startswith("state_dict."):
            continue
        key = fqn[len("state_dict.") :] if lightning else fqn
        entries[key] = Entry(key, shape, dtype, ".metadata")
        chunks[key] = []
        for offsets, sizes in pieces:
            info = storage.get((fqn, offsets))
            if info is None:
                raise MetaTensorError(
                    f"the torch.distributed.checkpoint metadata {where!r} has no storage for the "
                    f"chunk of {fqn!r} at {list(offsets)}. {CORRUPT_FIX}",
                    paths=[where, key],
                )
            rel, offset, length = info
            chunks[key].append(
                _Chunk(offsets, sizes, Region(p / rel, offset, length, None, f"item of {fqn!r}"))
            )
        _check_tiling(where, key, shape, chunks[key])
    # Non-tensor items of the module's state (extra state) go to the plan: the
    # extra-state refusal, or unexpected; Lightning's trainer state is not the module's.
    kept = [
        o[len("state_dict.") :] if lightning else o
        for o in others
        if not lightning or o.startswith("state_dict.")
    ]
    source = DcpSource(p, entries, chunks, files, safe_globals, others=kept)
    source.under_state_dict = lightning
    return source


def _record(value: Any, name: str) -> Record:
    if not isinstance(value, Record) or not value.cls_name.endswith("." + name):
        raise ValueError(f"expected a {name}, found {type(value).__name__}")
    return value


def _size(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"{what} {value!r} is not a tuple of non-negative ints")
    return tuple(value)


Tensors = dict[
    str, tuple[tuple[int, ...], torch.dtype, list[tuple[tuple[int, ...], tuple[int, ...]]]]
]
Storage = dict[tuple[str, tuple[int, ...]], tuple[str, int, int]]


def _interpret(metadata: Any) -> tuple[Tensors, Storage, list[str]]:
    """Return each tensor's (shape, dtype, chunks), each chunk's (file, offset, length),
    and the keys of the items that are not tensors."""
    md = _record(metadata, "Metadata")
    state = md.field("state_dict_metadata", 0)
    storage_data = md.field("storage_data", 2) or {}
    if not isinstance(state, dict) or not isinstance(storage_data, dict):
        raise ValueError("state_dict_metadata or storage_data is not a dict")
    tensors: Tensors = {}
    others: list[str] = []
    for fqn, item in state.items():
        if not isinstance(fqn, str):
            raise ValueError(f"key {fqn!r} is not a str")
        if not isinstance(item, Record) or not item.cls_name.endswith(".TensorStorageMetadata"):
            others.append(fqn)  # bytes (non-tensor) items: extra state, or not a module's
            continue
        props = _record(item.field("properties", 0), "TensorProperties")
        dtype = props.field("dtype", 0)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"the dtype of {fqn!r} is {dtype!r}")
        layout = props.field("layout", 1)
        if layout is not None and layout != torch.strided:
            raise ValueError(f"{fqn!r} has layout {layout}; only dense tensors can be loaded")
        shape = _size(item.field("size", 1), f"the size of {fqn!r}")
        pieces = []
        for chunk in item.field("chunks", 2) or []:
            c = _record(chunk, "ChunkStorageMetadata")
            offsets = _size(c.field("offsets", 0), f"a chunk offset of {fqn!r}")
            sizes = _size(c.field("sizes", 1), f"a chunk size of {fqn!r}")
            pieces.append((offsets, sizes))
        tensors[fqn] = (shape, dtype, pieces)
    storage: Storage = {}
    for index, info in storage_data.items():
        idx = _record(index, "MetadataIndex")
        fqn = idx.field("fqn", 0)
        offset = idx.field("offset", 1)
        info = _record(info, "_StorageInfo")
        rel, start, length = (
            info.field("relative_path", 0),
            info.field("offset", 1),
            info.field("length", 2),
        )
        if not isinstance(fqn, str) or not isinstance(rel, str):
            raise ValueError("a storage entry has a non-str key or file")
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (start, length)
        ):
            raise ValueError(f"the storage of {fqn!r} has offset {start!r} and length {length!r}")
        transforms = info.field("transform_descriptors", 3)
        if transforms:
            raise ValueError(
                f"the storage of {fqn!r} is transformed by {transforms!r} (a DCP extension such as "
                "compression), which lightning_meta does not read; load it with "
                "torch.distributed.checkpoint and re-save without extensions"
            )
        key = (fqn, _size(offset, f"the chunk offset of {fqn!r}") if offset is not None else ())
        storage[key] = (rel, start, length)
    return tensors, storage, others


def _check_storage(p: Path, storage: Storage) -> list[Path]:
    # Refuse a truncated checkpoint, or one naming files outside it, when it is
    # opened, naming its files.
    sizes: dict[str, int] = {}
    for rel, start, length in storage.values():
        sizes[rel] = max(sizes.get(rel, 0), start + length)
    outside = sorted(rel for rel in sizes if not _inside(rel))
    if outside:
        raise MetaTensorError(
            f"the torch.distributed.checkpoint {str(p)!r} names storage files {outside} outside "
            f"its directory. {CORRUPT_FIX}",
            paths=[str(p / ".metadata")],
        )
    short: list[str] = []
    bad_files: list[str] = []
    for rel, needed in sorted(sizes.items()):
        f = p / rel
        try:
            have: int | None = f.stat().st_size if f.is_file() else None
        except OSError:
            have = None
        if have is None or have < needed:
            short.append(
                f"{rel!r} (needs {needed} bytes, has {have if have is not None else 'no file'})"
            )
            bad_files.append(str(f))
    if short:
        raise MetaTensorError(
            f"the torch.distributed.checkpoint {str(p)!r} is incomplete: {', '.join(short)}. "
            f"{CORRUPT_FIX}",
            paths=bad_files,
        )
    return [p / rel for rel in sorted(sizes)]


def _check_tiling(where: str, key: str, shape: tuple[int, ...], chunks: list[_Chunk]) -> None:
    """Raise unless ``chunks`` cover the tensor of ``shape`` exactly once."""
    problem = ""
    total = 1
    for s in shape:
        total *= s
    covered = 0
    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            problem = f"a chunk of rank {len(c.sizes)} in a tensor of rank {len(shape)}"
            break
        if any(o + n > s for o, n, s in zip(c.offsets, c.sizes, shape, strict=True)):
            problem = (
                f"a chunk at {list(c.offsets)} of size {list(c.sizes)} reaches past {list(shape)}"
            )
            break
        n = 1
        for s in c.sizes:
            n *= s
        covered += n
    if not problem:
        for i, a in enumerate(chunks):
            for b in chunks[i + 1 :]:
                if all(
                    ao < bo + bn and bo < ao + an
                    for ao, an, bo, bn in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
                ) and all(n > 0 for n in (*a.sizes, *b.sizes)):
                    problem = f"chunks at {list(a.offsets)} and {list(b.offsets)} overlap"
                    break
            if problem:
                break
    if not problem and covered != total:
        problem = f"its chunks hold {covered} of its {total} elements"
    if problem:
        raise MetaTensorError(
            f"the torch.distributed.checkpoint metadata {where!r} describes {key!r} "
            f"({list(shape)}) inconsistently: {problem}. {CORRUPT_FIX}",
            paths=[where, key],
        )
