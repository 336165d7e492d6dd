"""Open a checkpoint of any supported format as a :class:`Source` of named tensors.

A :class:`Source` knows every tensor's name, shape and dtype *before* any data
is read, so :func:`~lightning_meta._load.load_checkpoint` can validate the
whole checkpoint against the module and refuse it without touching the module.
Formats are recognised from the content (magic bytes, a ``.metadata`` file, an
index's JSON), not from the file name:

- torch zip (``.pt``, ``.pth``, ``.bin``, Lightning ``.ckpt``): memory-mapped;
- torch legacy (``_use_new_zipfile_serialization=False``): read eagerly (the
  format cannot be mapped);
- ``.safetensors``: memory-mapped by safetensors itself;
- a sharded Hugging Face index (``*.index.json``, or a directory holding one)
  over safetensors or torch shards;
- a ``torch.distributed.checkpoint`` directory (``.metadata``), read with
  ``torch.distributed.checkpoint.load`` into fresh tensors.

Every unpickling uses ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_meta._compat import is_weights_only_refusal
from lightning_meta._errors import MetaTensorError

__all__ = ["Entry", "Source", "open_source"]

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
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
_CORRUPT_FIX = "Fix: save it again or download it again; the file on disk is incomplete or damaged."


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint, known before its data is read."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


class Source:
    """The tensors of one checkpoint: :attr:`entries` up front, data on :meth:`read`."""

    def __init__(self, path: Path, fmt: str, entries: dict[str, Entry]) -> None:
        self.path, self.format, self.entries = path, fmt, entries
        # Non-tensor values found where tensors were expected; listed as unexpected.
        self.others: list[str] = []
        # Memory-mapped files, read ahead by prefetch().
        self.mapped: list[Path] = []

    def prefetch(self) -> None:
        """Ask the kernel to read the mapped files ahead, in file order.

        Mapped tensors are otherwise read page by page in the order the model
        touches them, which on a cold cache is a random walk through the file.
        """
        for f in self.mapped:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue  # only a hint; reading the tensor reports a real problem
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except (AttributeError, OSError):
                pass  # no posix_fadvise on this platform: pages are read on demand
            finally:
                os.close(fd)

    def read(self, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for ``keys``, file by file, in the order data lies on disk."""
        raise NotImplementedError


class _MappingSource(Source):
    """Tensors already in hand (memory-mapped or eagerly read), grouped by file."""

    def __init__(
        self, path: Path, fmt: str, tensors: Mapping[str, torch.Tensor], files: Mapping[str, str]
    ) -> None:
        entries = {k: Entry(k, tuple(t.shape), t.dtype, files[k]) for k, t in tensors.items()}
        super().__init__(path, fmt, entries)
        self._tensors = tensors

    def read(self, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            yield key, self._tensors[key]


class _SafetensorsSource(Source):
    def __init__(self, path: Path, fmt: str, files: dict[str, Any], owner: dict[str, str]) -> None:
        entries: dict[str, Entry] = {}
        for key, name in owner.items():
            sl = files[name].get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise MetaTensorError(
                    f"{name!r} stores {key!r} as {sl.get_dtype()}, which torch cannot hold. "
                    "Fix: convert the checkpoint to a torch dtype."
                )
            entries[key] = Entry(key, tuple(sl.get_shape()), dtype, name)
        super().__init__(path, fmt, entries)
        self._files = files

    def read(self, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in sorted(keys, key=lambda k: self.entries[k].file):
            yield key, self._files[self.entries[key].file].get_tensor(key)


class _DcpSource(Source):
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
        try:
            with warnings.catch_warnings():
                # DCP warns that it loads without a process group; that is the point here.
                warnings.filterwarnings("ignore", message=".*intent is to load in a single process")
                load(state, storage_reader=FileSystemReader(str(self.path)), no_dist=True)
        except Exception as e:
            raise MetaTensorError(
                f"torch.distributed.checkpoint could not read {str(self.path)!r}: "
                f"{type(e).__name__}: {e}. {_CORRUPT_FIX}"
            ) from e
        for k in keys:
            yield k, state[self._fqns[k]]


def open_source(path: str | Path, *, safe_globals: Sequence[Any] = ()) -> Source:
    """Detect the format of ``path`` from its content and open it without reading tensor data.

    Raises:
        MetaTensorError: the path does not exist, its format is not recognised,
            it is structurally invalid (truncated, bad header or index, sizes
            that disagree, a missing shard), or unpickling it needs more than
            ``weights_only=True`` allows.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / ".metadata").is_file():
            return _open_dcp(p)
        for name in _INDEX_NAMES:
            if (p / name).is_file():
                return _open_index(p / name, safe_globals)
        indexes = sorted(p.glob("*.index.json"))
        if len(indexes) == 1:
            return _open_index(indexes[0], safe_globals)
        singles = [p / n for n in _SINGLE_NAMES if (p / n).is_file()]
        if len(singles) == 1:
            return open_source(singles[0], safe_globals=safe_globals)
        raise MetaTensorError(
            f"{str(p)!r} is a directory but holds no torch.distributed.checkpoint '.metadata', "
            f"no single '*.index.json' (found {[i.name for i in indexes]}) and no single "
            f"{' or '.join(_SINGLE_NAMES)}. Fix: pass the checkpoint file or index itself."
        )
    if not p.is_file():
        raise MetaTensorError(f"no checkpoint at {str(p)!r}. Fix: check the path.")
    head = _head(p)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        zipped = head.startswith(b"PK")
        tensors, fmt = _torch_load(p, safe_globals, zipped=zipped)
        source = _from_object(p, fmt, tensors, None)
        source.mapped = [p] if zipped else []
        return source
    if head[8:9] == b"{" or p.suffix == ".safetensors":
        return _open_safetensors(p, [p], None)
    if head.lstrip()[:1] == b"{":
        return _open_index(p, safe_globals)
    raise MetaTensorError(
        f"{str(p)!r} is not a checkpoint format lightning_meta knows (first bytes {head[:8]!r}): "
        "expected a torch zip or legacy file, safetensors, a '*.index.json', or a "
        "torch.distributed.checkpoint directory. Fix: pass one of those."
    )


def _head(p: Path) -> bytes:
    with p.open("rb") as f:
        return f.read(16)


def _torch_load(p: Path, safe_globals: Sequence[Any], *, zipped: bool) -> tuple[Any, str]:
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        if not is_weights_only_refusal(e):
            raise MetaTensorError(
                f"{str(p)!r} is not a valid torch checkpoint: {e}. {_CORRUPT_FIX}"
            ) from e
        raise MetaTensorError(_unsafe_message(p, e, zipped)) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise MetaTensorError(
            f"{str(p)!r} is not a valid torch checkpoint (truncated or corrupt): "
            f"{type(e).__name__}: {e}. {_CORRUPT_FIX}"
        ) from e
    fmt = "torch" if zipped else "torch-legacy"
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        # A Lightning checkpoint: the weights are under "state_dict"; the rest is
        # trainer state (optimizer, loops, callbacks) that a module does not hold.
        return obj["state_dict"], "lightning"
    return obj, fmt


def _unsafe_message(p: Path, e: Exception, zipped: bool) -> str:
    names: list[str] = []
    if zipped:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
        except Exception:  # only improves the message; the refusal stands either way
            names = []
    listed = f" It needs: {names}." if names else ""
    return (
        f"{str(p)!r} cannot be loaded with weights_only=True: unpickling it would construct "
        f"objects other than tensors and plain containers, which can run arbitrary code.{listed} "
        "lightning_meta never unpickles arbitrary objects. Fix: if you trust this file, allow "
        "exactly those with load_checkpoint(..., safe_globals=[TheClass, ...]) (the objects "
        f"themselves, not their names), or re-save only the state_dict. (torch: {e})".replace(
            "\n", " "
        )[:4000]
    )


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], others: list[str]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out, others)
    elif prefix:
        others.append(prefix[:-1])


def _from_object(p: Path, fmt: str, obj: Any, files: dict[str, str] | None) -> Source:
    if not isinstance(obj, Mapping):
        raise MetaTensorError(
            f"{str(p)!r} holds a {type(obj).__name__}, not a state dict. Fix: save "
            "module.state_dict() (or a dict of them), not the module or a tensor."
        )
    tensors: dict[str, torch.Tensor] = {}
    others: list[str] = []
    _flatten(obj, "", tensors, others)
    source = _MappingSource(p, fmt, tensors, files or dict.fromkeys(tensors, p.name))
    source.others = sorted(others)
    return source


def _open_safetensors(p: Path, files: list[Path], owner: dict[str, str] | None) -> Source:
    from safetensors import SafetensorError, safe_open

    handles: dict[str, Any] = {}
    found: dict[str, str] = {}
    for f in files:
        try:
            handles[f.name] = safe_open(str(f), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise MetaTensorError(
                f"{str(f)!r} is not a valid safetensors file (bad header, truncated, or sizes "
                f"that disagree): {e}. {_CORRUPT_FIX}"
            ) from e
        for key in handles[f.name].keys():  # noqa: SIM118 - safe_open is not a Mapping
            found[key] = f.name
    if owner is not None:
        _check_index(p, owner, found)
    source = _SafetensorsSource(p, "safetensors" if owner is None else "sharded", handles, found)
    source.mapped = list(files)
    return source


def _check_index(index: Path, owner: dict[str, str], found: dict[str, str]) -> None:
    wrong = sorted(k for k, f in owner.items() if found.get(k) != f)
    extra = sorted(set(found) - set(owner))
    if wrong or extra:
        lines = [f"  {k!r}: index says {owner[k]!r}, found in {found.get(k)!r}" for k in wrong]
        lines += [f"  {k!r}: in {found[k]!r} but not in the index" for k in extra]
        raise MetaTensorError(
            f"the index {str(index)!r} and its shards disagree:\n"
            + "\n".join(lines)
            + f"\n{_CORRUPT_FIX}"
        )


def _open_index(index: Path, safe_globals: Sequence[Any]) -> Source:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetaTensorError(
            f"the index {str(index)!r} is not valid JSON: {e}. {_CORRUPT_FIX}"
        ) from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise MetaTensorError(
            f"the index {str(index)!r} has no 'weight_map' of tensor names to shard files. "
            f"{_CORRUPT_FIX}"
        )
    shard_names = sorted(set(weight_map.values()))
    missing = [n for n in shard_names if not (index.parent / n).is_file()]
    if missing:
        raise MetaTensorError(
            f"the index {str(index)!r} refers to shard(s) {missing} that do not exist in "
            f"{str(index.parent)!r}. Fix: download or copy the missing shard(s) next to the index."
        )
    shards = [index.parent / n for n in shard_names]
    if all(_head(s)[8:9] == b"{" for s in shards):
        return _open_safetensors(index, shards, weight_map)
    tensors: dict[str, torch.Tensor] = {}
    found: dict[str, str] = {}
    for shard in shards:
        head = _head(shard)
        if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
            raise MetaTensorError(
                f"shard {str(shard)!r} of {str(index)!r} is neither safetensors nor a torch file. "
                f"{_CORRUPT_FIX}"
            )
        obj, _ = _torch_load(shard, safe_globals, zipped=head.startswith(b"PK"))
        part = _from_object(shard, "torch", obj, None)
        for key in part.entries:
            found[key] = shard.name
        tensors.update(part._tensors)  # type: ignore[attr-defined]
    _check_index(index, weight_map, found)
    source = _MappingSource(index, "sharded", tensors, found)
    source.mapped = [s for s in shards if _head(s).startswith(b"PK")]
    return source


def _open_dcp(p: Path) -> Source:
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(p)).read_metadata()
    except Exception as e:  # any unpickling or I/O failure means a damaged .metadata
        raise MetaTensorError(
            f"the torch.distributed.checkpoint metadata {str(p / '.metadata')!r} cannot be read: "
            f"{type(e).__name__}: {e}. {_CORRUPT_FIX}"
        ) from e
    # Check every storage file holds the bytes the metadata promises, before reading any.
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = str(info.relative_path)
        sizes[rel] = max(sizes.get(rel, 0), int(info.offset) + int(info.length))
    short = []
    for rel, needed in sorted(sizes.items()):
        f = p / rel
        have = f.stat().st_size if f.is_file() else None
        if have is None or have < needed:
            short.append(
                f"{rel!r} (needs {needed} bytes, has {have if have is not None else 'no file'})"
            )
    if short:
        raise MetaTensorError(
            f"the torch.distributed.checkpoint {str(p)!r} is incomplete: {', '.join(short)}. "
            f"{_CORRUPT_FIX}"
        )
    tensors = {
        k: md
        for k, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    # Lightning's ModelParallelStrategy / FSDP save {"state_dict": ..., "optimizer_0": ...};
    # only the weights belong to a module.
    lightning = any(k.startswith("state_dict.") for k in tensors)
    entries: dict[str, Entry] = {}
    fqns: dict[str, str] = {}
    for fqn, md in tensors.items():
        if lightning and not fqn.startswith("state_dict."):
            continue
        key = fqn[len("state_dict.") :] if lightning else fqn
        entries[key] = Entry(key, tuple(md.size), md.properties.dtype, ".metadata")
        fqns[key] = fqn
    return _DcpSource(p, entries, fqns)
