"""A checkpoint as the loader sees it, and the readers of one torch or safetensors file.

A :class:`Source` lists every tensor's name, shape and dtype (:class:`Entry`)
*before* any data is read, so the loader can validate the whole checkpoint
against the module and refuse it without touching the module. The readers
here open one file; the single-file formats and the shards of an index
(:mod:`~lightning_meta._load._sharded`) share them. Every unpickling uses
``weights_only=True``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_meta._compat import is_weights_only_refusal
from lightning_meta._errors import MetaTensorError

__all__ = [
    "CORRUPT_FIX",
    "Entry",
    "MappingSource",
    "SafetensorsSource",
    "Source",
    "head",
    "is_safetensors",
    "is_torch",
    "open_safetensors",
    "open_torch",
    "safetensors_handles",
    "state_tensors",
    "torch_load",
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
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CORRUPT_FIX = "Fix: save it again or download it again; the file on disk is incomplete or damaged."


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint, known before its data is read."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


class Source:
    """The tensors of one checkpoint: :attr:`entries` up front, data on :meth:`read`.

    Attributes:
        path: the file, index or directory opened.
        format: the :attr:`~lightning_meta.LoadReport.format` name.
        entries: every tensor by checkpoint key.
        others: keys of non-tensor values found where tensors were expected;
            the plan lists them as unexpected.
        mapped: memory-mapped files, read ahead by :meth:`prefetch`.
    """

    def __init__(
        self,
        path: Path,
        fmt: str,
        entries: dict[str, Entry],
        *,
        others: Iterable[str] = (),
        mapped: Iterable[Path] = (),
    ) -> None:
        self.path, self.format, self.entries = path, fmt, entries
        self.others = sorted(others)
        self.mapped = list(mapped)

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
        """Yield ``(key, tensor)`` for ``keys``, file by file, in the order data lies on disk.

        Raises:
            MetaTensorError: the data cannot be read (formats read lazily only).
        """
        raise NotImplementedError


class MappingSource(Source):
    """Tensors already in hand (memory-mapped or read eagerly by ``torch.load``)."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        tensors: Mapping[str, torch.Tensor],
        files: Mapping[str, str],
        *,
        others: Iterable[str] = (),
        mapped: Iterable[Path] = (),
    ) -> None:
        entries = {k: Entry(k, tuple(t.shape), t.dtype, files[k]) for k, t in tensors.items()}
        super().__init__(path, fmt, entries, others=others, mapped=mapped)
        self._tensors = tensors

    def read(self, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            yield key, self._tensors[key]


class SafetensorsSource(Source):
    """Safetensors files opened with ``safe_open``; each tensor is mapped when read."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        handles: dict[str, Any],
        owner: dict[str, str],
        *,
        mapped: Iterable[Path] = (),
    ) -> None:
        entries: dict[str, Entry] = {}
        for key, name in owner.items():
            sl = handles[name].get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise MetaTensorError(
                    f"{name!r} stores {key!r} as {sl.get_dtype()}, which torch cannot hold. "
                    "Fix: convert the checkpoint to a torch dtype.",
                    paths=[key],
                )
            entries[key] = Entry(key, tuple(sl.get_shape()), dtype, name)
        super().__init__(path, fmt, entries, mapped=mapped)
        self._handles = handles

    def read(self, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in sorted(keys, key=lambda k: self.entries[k].file):
            yield key, self._handles[self.entries[key].file].get_tensor(key)


def head(p: Path) -> bytes:
    """Return the first 16 bytes of the file ``p``, from which its format is told."""
    with p.open("rb") as f:
        return f.read(16)


def is_torch(first: bytes) -> bool:
    """Whether a file starting with ``first`` is a torch zip or legacy pickle file."""
    return first.startswith((b"PK\x03\x04", b"\x80"))


def is_safetensors(first: bytes) -> bool:
    """Whether a file starting with ``first`` is safetensors (a length, then a JSON header)."""
    return first[8:9] == b"{"


def open_torch(p: Path, safe_globals: Sequence[Any]) -> Source:
    """Open the torch zip or legacy file ``p`` (a Lightning ``.ckpt`` included).

    Args:
        p: the file.
        safe_globals: what unpickling may construct beyond ``weights_only=True``'s defaults.

    Returns:
        A source of ``p``'s state dict, memory-mapped when ``p`` is a zip file.

    Raises:
        MetaTensorError: see :func:`torch_load` and :func:`state_tensors`.
    """
    zipped = head(p).startswith(b"PK")
    obj, fmt = torch_load(p, safe_globals, zipped=zipped)
    tensors, others = state_tensors(p, obj)
    return MappingSource(
        p, fmt, tensors, dict.fromkeys(tensors, p.name), others=others, mapped=[p] if zipped else []
    )


def torch_load(p: Path, safe_globals: Sequence[Any], *, zipped: bool) -> tuple[Any, str]:
    """Unpickle ``p`` with ``weights_only=True``; return its state dict and format name.

    A Lightning checkpoint gives its ``"state_dict"`` (format ``"lightning"``);
    the rest of it is trainer state a module does not hold.

    Raises:
        MetaTensorError: ``p`` is truncated or corrupt, or needs globals
            ``weights_only=True`` refuses (the message lists them). ``paths``
            holds the file.
    """
    where = str(p)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        if not is_weights_only_refusal(e):
            raise MetaTensorError(
                f"{where!r} is not a valid torch checkpoint: {e}. {CORRUPT_FIX}", paths=[where]
            ) from e
        raise MetaTensorError(_unsafe_message(p, e, zipped), paths=[where]) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise MetaTensorError(
            f"{where!r} is not a valid torch checkpoint (truncated or corrupt): "
            f"{type(e).__name__}: {e}. {CORRUPT_FIX}",
            paths=[where],
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"], "lightning"
    return obj, "torch" if zipped else "torch-legacy"


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


def state_tensors(p: Path, obj: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Flatten the state dict ``obj`` read from ``p`` into dotted keys.

    Nested dicts (a dict of state dicts) give dotted keys, as ``state_dict`` does.

    Returns:
        The tensors by key, and the keys of values that are not tensors.

    Raises:
        MetaTensorError: ``obj`` is not a mapping (a saved module or tensor).
    """
    if not isinstance(obj, Mapping):
        raise MetaTensorError(
            f"{str(p)!r} holds a {type(obj).__name__}, not a state dict. Fix: save "
            "module.state_dict() (or a dict of them), not the module or a tensor.",
            paths=[str(p)],
        )
    tensors: dict[str, torch.Tensor] = {}
    others: list[str] = []
    _flatten(obj, "", tensors, others)
    return tensors, others


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], others: list[str]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out, others)
    elif prefix:
        others.append(prefix[:-1])


def open_safetensors(p: Path) -> Source:
    """Open the single safetensors file ``p``; tensors are mapped when read.

    Raises:
        MetaTensorError: see :func:`safetensors_handles`, or a dtype torch lacks.
    """
    handles, owner = safetensors_handles([p])
    return SafetensorsSource(p, "safetensors", handles, owner, mapped=[p])


def safetensors_handles(files: Sequence[Path]) -> tuple[dict[str, Any], dict[str, str]]:
    """Open every safetensors file of ``files`` (reading headers only).

    Returns:
        The ``safe_open`` handles by file name, and the file name holding each key.

    Raises:
        MetaTensorError: a file has a bad header, is truncated, or its sizes
            disagree; ``paths`` holds the file.
    """
    from safetensors import SafetensorError, safe_open

    handles: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for f in files:
        try:
            handles[f.name] = safe_open(str(f), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise MetaTensorError(
                f"{str(f)!r} is not a valid safetensors file (bad header, truncated, or sizes "
                f"that disagree): {e}. {CORRUPT_FIX}",
                paths=[str(f)],
            ) from e
        for key in handles[f.name].keys():  # noqa: SIM118 - safe_open is not a Mapping
            owner[key] = f.name
    return handles, owner
