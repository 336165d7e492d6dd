"""Checkpoints spread over several files: a Hugging Face index, a distributed checkpoint.

- A sharded Hugging Face index (``*.index.json``) maps every tensor name to a
  shard file, safetensors or torch; every shard is checked against the index
  before any data is read.
- A ``torch.distributed.checkpoint`` directory (``.metadata``) is read with
  ``torch.distributed.checkpoint.load`` into fresh tensors, once every storage
  file is known to hold the bytes the metadata promises.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_meta._errors import MetaTensorError
from lightning_meta._load._source import (
    CORRUPT_FIX,
    Entry,
    MappingSource,
    SafetensorsSource,
    Source,
    head,
    is_safetensors,
    is_torch,
    safetensors_handles,
    state_tensors,
    torch_load,
)

__all__ = ["DcpSource", "check_index", "open_dcp", "open_index"]


def open_index(index: Path, safe_globals: Sequence[Any]) -> Source:
    """Open the sharded checkpoint described by the Hugging Face index ``index``.

    Args:
        index: the ``*.index.json`` file; its shards lie next to it.
        safe_globals: what unpickling torch shards may construct beyond
            ``weights_only=True``'s defaults.

    Returns:
        A ``"sharded"`` source over every shard.

    Raises:
        MetaTensorError: the index is not valid JSON or has no ``weight_map``
            (``paths``: the index), a shard is missing or of an unknown format
            (``paths``: the shards), a shard is invalid, or the index and its
            shards disagree (``paths``: the keys).
    """
    weight_map = _weight_map(index)
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise MetaTensorError(
            f"the index {str(index)!r} refers to shard(s) {missing} that do not exist in "
            f"{str(index.parent)!r}. Fix: download or copy the missing shard(s) next to the index.",
            paths=[str(index.parent / n) for n in missing],
        )
    shards = [index.parent / n for n in names]
    if all(is_safetensors(head(s)) for s in shards):
        handles, owner = safetensors_handles(shards)
        check_index(index, weight_map, owner)
        return SafetensorsSource(index, "sharded", handles, owner, mapped=shards)
    tensors: dict[str, torch.Tensor] = {}
    owner = {}
    for shard in shards:
        first = head(shard)
        if not is_torch(first):
            raise MetaTensorError(
                f"shard {str(shard)!r} of {str(index)!r} is neither safetensors nor a torch file. "
                f"{CORRUPT_FIX}",
                paths=[str(shard)],
            )
        obj, _ = torch_load(shard, safe_globals, zipped=first.startswith(b"PK"))
        # Non-tensor values in a shard are dropped, not listed as unexpected:
        # Hugging Face writes only tensors into shards.
        part, _others = state_tensors(shard, obj)
        owner.update(dict.fromkeys(part, shard.name))
        tensors.update(part)
    check_index(index, weight_map, owner)
    mapped = [s for s in shards if head(s).startswith(b"PK")]
    return MappingSource(index, "sharded", tensors, owner, mapped=mapped)


def _weight_map(index: Path) -> dict[str, str]:
    where = str(index)
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetaTensorError(
            f"the index {where!r} is not valid JSON: {e}. {CORRUPT_FIX}", paths=[where]
        ) from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
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
        lines = [f"  {k!r}: index says {owner[k]!r}, found in {found.get(k)!r}" for k in wrong]
        lines += [f"  {k!r}: in {found[k]!r} but not in the index" for k in extra]
        raise MetaTensorError(
            f"the index {str(index)!r} and its shards disagree:\n"
            + "\n".join(lines)
            + f"\n{CORRUPT_FIX}",
            paths=wrong + extra,
        )


class DcpSource(Source):
    """A ``torch.distributed.checkpoint`` directory; read into fresh tensors in one ``load``."""

    def __init__(self, path: Path, entries: dict[str, Entry], fqns: dict[str, str]) -> None:
        super().__init__(path, "dcp", entries)
        self._fqns = fqns

    def read(self, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        from torch.distributed.checkpoint.filesystem import FileSystemReader
        from torch.distributed.checkpoint.state_dict_loader import load

        state = {
            self._fqns[k]: torch.empty(self.entries[k].shape, dtype=self.entries[k].dtype)
            for k in keys
        }
        where = str(self.path)
        try:
            with warnings.catch_warnings():
                # DCP warns that it loads without a process group; that is the point here.
                warnings.filterwarnings("ignore", message=".*intent is to load in a single process")
                load(state, storage_reader=FileSystemReader(where), no_dist=True)
        except Exception as e:  # DCP's errors have no common base; any failure is a bad file
            raise MetaTensorError(
                f"torch.distributed.checkpoint could not read {where!r}: "
                f"{type(e).__name__}: {e}. {CORRUPT_FIX}",
                paths=[where],
            ) from e
        for k in keys:
            yield k, state[self._fqns[k]]


def open_dcp(p: Path) -> Source:
    """Open the ``torch.distributed.checkpoint`` directory ``p`` (metadata only).

    Lightning's ModelParallelStrategy and FSDP save ``{"state_dict": ...,
    "optimizer_0": ...}``; only the ``state_dict`` belongs to a module, and
    its keys lose that prefix.

    Returns:
        A ``"dcp"`` source; its data is read in one ``load`` on :meth:`~Source.read`.

    Raises:
        MetaTensorError: the metadata cannot be read (``paths``: ``.metadata``),
            or a storage file is missing or shorter than the metadata says
            (``paths``: those files).
    """
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(p)).read_metadata()
    except Exception as e:  # any unpickling or I/O failure means a damaged .metadata
        where = str(p / ".metadata")
        raise MetaTensorError(
            f"the torch.distributed.checkpoint metadata {where!r} cannot be read: "
            f"{type(e).__name__}: {e}. {CORRUPT_FIX}",
            paths=[where],
        ) from e
    _check_storage_sizes(p, metadata.storage_data or {})
    tensors = {
        k: md
        for k, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    lightning = any(k.startswith("state_dict.") for k in tensors)
    entries: dict[str, Entry] = {}
    fqns: dict[str, str] = {}
    for fqn, md in tensors.items():
        if lightning and not fqn.startswith("state_dict."):
            continue
        key = fqn[len("state_dict.") :] if lightning else fqn
        entries[key] = Entry(key, tuple(md.size), md.properties.dtype, ".metadata")
        fqns[key] = fqn
    return DcpSource(p, entries, fqns)


def _check_storage_sizes(p: Path, storage: dict[Any, Any]) -> None:
    # Refuse a truncated checkpoint when it is opened, naming its files, rather
    # than from deep inside DCP's load() once reading has begun.
    sizes: dict[str, int] = {}
    for info in storage.values():
        rel = str(info.relative_path)
        sizes[rel] = max(sizes.get(rel, 0), int(info.offset) + int(info.length))
    short: list[str] = []
    bad_files: list[str] = []
    for rel, needed in sorted(sizes.items()):
        f = p / rel
        have = f.stat().st_size if f.is_file() else None
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
