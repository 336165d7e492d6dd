"""Torch checkpoint files read without ``torch.load``: zip and legacy layouts, no code run.

``torch.save`` writes a pickle whose tensors are references to storages kept
elsewhere in the file: zip records (``archive/data/0``...) in the zip layout,
raw blocks after the pickle in the legacy one. Here the pickle is read with
:mod:`~lightning_meta._load._unpickle` and torch's rebuild functions replaced
by stand-ins that only *describe* each tensor (:class:`TensorRef`: storage,
offset, shape, strides, dtype); the storages are located in the file and every
size is checked (a record as long as its storage, every tensor inside its
storage) before a byte of tensor data is read. Tensors of kinds the loader
cannot fill a module with (meta, sparse, quantized, nested, subclasses) become
:class:`Unsupported` and are refused by key.

The same reader opens the torch files inside a ``torch.distributed.checkpoint``
(one per item, at an offset of a ``.distcp`` file).
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lightning_meta._errors import MetaTensorError
from lightning_meta._load._files import Region, corrupt, io_error, read_file
from lightning_meta._load._unpickle import Policy, safe_load

__all__ = [
    "Archive",
    "StorageRef",
    "TensorRef",
    "Unsupported",
    "check_storage_bounds",
    "open_archive",
    "open_legacy",
    "tensor_from",
    "torch_policy",
]

# torch.save's legacy layout: these three pickles open the file.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Legacy typed storage classes (the pickle names them) and their element types.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "QInt8Storage": torch.qint8,
    "QUInt8Storage": torch.quint8,
    "QInt32Storage": torch.qint32,
    "QUInt4x2Storage": torch.quint4x2,
    "QUInt2x4Storage": torch.quint2x4,
}
_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
# torch._utils rebuild functions of tensors a module cannot be filled with, by kind.
_UNSUPPORTED_REBUILDS = {
    "_rebuild_sparse_tensor": "sparse",
    "_rebuild_sparse_csr_tensor": "sparse",
    "_rebuild_qtensor": "quantized",
    "_rebuild_meta_tensor_no_storage": "meta",
    "_rebuild_nested_tensor": "nested",
    "_rebuild_wrapper_subclass": "tensor subclass",
    "_rebuild_device_tensor_from_numpy": "device-specific",
    "_rebuild_device_tensor_from_cpu_tensor": "device-specific",
    "_rebuild_xla_tensor": "device-specific",
    "_rebuild_mtia_tensor": "device-specific",
}


class StorageType(NamedTuple):
    """What a pickle's storage class (``torch.FloatStorage``, ``UntypedStorage``) stands for."""

    name: str
    dtype: torch.dtype


class StorageRef(NamedTuple):
    """One storage a pickle refers to: its key in the file, element type and element count."""

    key: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        """Bytes of the storage."""
        return self.numel * self.dtype.itemsize


class TensorRef(NamedTuple):
    """A tensor described, not built: a view of ``storage`` (offsets and strides in elements).

    ``fix`` is ``"conj"`` or ``"neg"`` for a tensor saved with that lazy bit set.
    """

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    fix: str | None = None

    def byte_range(self) -> tuple[int, int]:
        """The bytes of the storage the tensor spans, ``(start, stop)``; ``(0, 0)`` when empty."""
        if any(s == 0 for s in self.shape):
            return 0, 0
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        size = self.dtype.itemsize
        return self.offset * size, (last + 1) * size


class Unsupported(NamedTuple):
    """A tensor of a kind a module cannot be filled with (``kind``); ``shape`` when known."""

    kind: str
    shape: tuple[int, ...] = ()


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"{what} {value!r} is not a tuple of non-negative ints")
    return tuple(value)


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} {value!r} is not a non-negative int")
    return value


def _describe(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None, metadata: Any
) -> TensorRef | Unsupported:
    if not isinstance(storage, StorageRef):
        raise ValueError(f"a tensor's storage is {type(storage).__name__}, not a storage")
    shape, strides = _ints(size, "shape"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"shape {shape} and stride {strides} differ in length")
    dtype = storage.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch.dtype")
    if dtype in _QUANTIZED or storage.dtype in _QUANTIZED:
        return Unsupported("quantized", shape)
    fix = None
    if metadata:
        if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"}:
            return Unsupported(f"tensor with metadata {metadata!r}", shape)
        flags = [k for k, v in metadata.items() if v]
        if len(flags) > 1:
            return Unsupported(f"tensor with metadata {metadata!r}", shape)
        fix = flags[0] if flags else None
    return TensorRef(storage, _int(offset, "storage offset"), shape, strides, dtype, fix)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> Any:
    return _describe(storage, offset, size, stride, None, None)


def _rebuild_tensor_v2(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
    backward_hooks: Any = None, metadata: Any = None,
) -> Any:  # fmt: skip
    return _describe(storage, offset, size, stride, None, metadata)


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
    dtype: Any, metadata: Any = None,
) -> Any:  # fmt: skip
    return _describe(storage, offset, size, stride, dtype, metadata)


def _rebuild_parameter(data: Any, requires_grad: Any = True, backward_hooks: Any = None) -> Any:
    return _tensor_value(data)


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> Any:
    # The state holds Python attributes (``_is_hf_initialized``); the module keeps its own.
    return _tensor_value(data)


def _tensor_value(data: Any) -> Any:
    if not isinstance(data, (TensorRef, Unsupported)):
        raise ValueError(f"a parameter's data is {type(data).__name__}, not a tensor")
    return data


class _TensorType:
    """Stands for ``torch.Tensor`` in a pickle (a type argument, never constructed)."""


class _ParameterType:
    """Stands for ``torch.nn.Parameter`` in a pickle."""


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if not callable(func) or not isinstance(args, tuple):
        raise ValueError("_rebuild_from_type_v2 got a non-callable or non-tuple argument")
    value = func(*args)
    if new_type in (_TensorType, _ParameterType):
        return _tensor_value(value)  # a plain tensor with Python attributes
    name = getattr(new_type, "__qualname__", type(new_type).__name__)
    shape = value.shape if isinstance(value, (TensorRef, Unsupported)) else ()
    return Unsupported(f"tensor subclass {name}", shape)


def _unsupported_rebuild(kind: str, shape_at: int | None) -> Callable[..., Unsupported]:
    def rebuild(*args: Any, **kwargs: Any) -> Unsupported:
        shape: tuple[int, ...] = ()
        if shape_at is not None and shape_at < len(args):
            try:
                shape = _ints(args[shape_at], "shape")
            except ValueError:
                shape = ()
        return Unsupported(kind, shape)

    return rebuild


def _get_layout(name: Any) -> torch.layout:
    value = getattr(torch, str(name).rsplit(".", 1)[-1], None)
    if not isinstance(value, torch.layout):
        raise ValueError(f"unknown layout {name!r}")
    return value


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # protocol 2 pickles bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise ValueError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return text.encode(encoding)


def _torch_value(module: str, name: str) -> Any:
    """``torch.<name>`` when it is a dtype, layout, memory format or quantization scheme."""
    if module != "torch":
        return None
    if name.endswith("Storage") and name in _STORAGE_DTYPES:
        return StorageType(name, _STORAGE_DTYPES[name])
    value = getattr(torch, name, None)
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
        return value
    return None


def torch_policy() -> Policy:
    """What a ``torch.save`` pickle may name: containers, tensor descriptions, dtypes."""
    exact: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "collections.Counter": Counter,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.bytearray": bytearray,
        "builtins.complex": complex,
        "builtins.slice": slice,
        "_codecs.encode": _encode,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": _TensorType,
        "torch.nn.parameter.Parameter": _ParameterType,
        "torch.nn.Parameter": _ParameterType,
        "torch.storage.UntypedStorage": StorageType("UntypedStorage", torch.uint8),
        "torch.UntypedStorage": StorageType("UntypedStorage", torch.uint8),
        "torch.serialization._get_layout": _get_layout,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    }
    shape_at = {
        "_rebuild_meta_tensor_no_storage": 1,
        "_rebuild_qtensor": 2,
        "_rebuild_wrapper_subclass": 2,
    }
    for fn, kind in _UNSUPPORTED_REBUILDS.items():
        exact[f"torch._utils.{fn}"] = _unsupported_rebuild(kind, shape_at.get(fn))
    return Policy(exact, {"torch.": _torch_value})


class _Storages:
    """The persistent id handler of a torch pickle: one :class:`StorageRef` per storage key."""

    def __init__(self, legacy: bool) -> None:
        self.legacy = legacy
        self.refs: dict[str, StorageRef] = {}

    def __call__(self, pid: Any) -> StorageRef:
        if not isinstance(pid, tuple) or not pid:
            raise ValueError(f"persistent id {pid!r} is not a tuple")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise ValueError(f"persistent id of kind {kind!r} (a saved module?)")
        if self.legacy:
            if len(pid) != 6:
                raise ValueError(f"legacy storage id {pid!r} has {len(pid)} fields")
            _, stype, key, _location, numel, view = pid
            if view is not None:
                raise ValueError("legacy storage views (torch < 0.4 files) are not supported")
        else:
            if len(pid) != 5:
                raise ValueError(f"storage id {pid!r} has {len(pid)} fields")
            _, stype, key, _location, numel = pid
        if not isinstance(stype, StorageType):
            raise ValueError(f"storage type {stype!r} is not a torch storage class")
        if isinstance(key, int) and not self.legacy:
            # torch.load names the record f"data/{key}": litgpt's incremental_save
            # (every lit_model.pth convert_hf_checkpoint writes) numbers its storages
            key = str(key)
        if not isinstance(key, str):
            raise ValueError(f"storage key {key!r} is not a str")
        ref = StorageRef(key, stype.dtype, _int(numel, "storage size"))
        known = self.refs.setdefault(key, ref)
        if known != ref:
            raise ValueError(f"storage {key!r} is declared twice differently ({known} and {ref})")
        return known


@dataclass
class Archive:
    """One torch file (or a torch file inside a distributed checkpoint) after its structure is read.

    Attributes:
        path: the file holding it.
        layout: ``"zip"`` or ``"legacy"``.
        obj: the unpickled object, tensors as :class:`TensorRef` / :class:`Unsupported`.
        regions: where each storage's bytes lie, by storage key.
    """

    path: Path
    layout: str
    obj: Any
    regions: dict[str, Region] = field(default_factory=dict)


class _Window(io.RawIOBase):
    """A read-only file view of ``length`` bytes of ``f`` from ``start`` (a zip inside a file)."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._length - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


def open_archive(
    p: Path, policy: Policy, *, start: int = 0, length: int | None = None, where: str | None = None
) -> Archive:
    """Read the structure of the torch zip file ``p`` (or of the one at ``start`` in it).

    The zip directory and ``data.pkl`` are read and checked; every storage's
    record is located and its size compared with the storage's; no tensor
    data is read.

    Args:
        p: the file.
        policy: what ``data.pkl`` may name.
        start, length: the zip's place in ``p`` (a distributed checkpoint item).
        where: the name used in messages (default ``p``).

    Raises:
        MetaTensorError: not a valid torch zip file (bad directory, a
            compressed or missing record, a record whose size is not its
            storage's), or ``data.pkl`` is unsafe or damaged.
    """
    where = where or str(p)
    try:
        # A zip inside a file (a distributed checkpoint item) is read through
        # one buffer (below), not two: the file's own would read ahead into
        # tensor data at every seek.
        with p.open("rb", buffering=-1 if length is None else 0) as raw:
            size = raw.seek(0, 2) if length is None else length
            f: Any = raw if start == 0 and length is None else _Window(raw, start, size)
            if f is not raw:
                f = io.BufferedReader(f)
            return _read_zip(p, f, policy, start, size, where)
    except MetaTensorError:
        raise
    except OSError as e:
        raise io_error(p, e) from e
    except Exception as e:  # zipfile raises many kinds (BadZipFile, EOFError, struct.error...)
        raise corrupt(
            where,
            f"is not a valid torch checkpoint (truncated or corrupt zip: {type(e).__name__}: {e})",
        ) from e


def _read_zip(p: Path, f: Any, policy: Policy, start: int, size: int, where: str) -> Archive:
    with zipfile.ZipFile(f) as z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            dup = sorted(n for n, c in Counter(names).items() if c > 1)
            raise corrupt(where, f"is not a valid torch checkpoint: records {dup} appear twice")
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise corrupt(
                where,
                "is not a torch checkpoint: expected one '<archive>/data.pkl' record, found "
                f"{pickles or 'none'}",
            )
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and z.read(prefix + "byteorder") not in (b"little", b""):
            raise MetaTensorError(
                f"{where!r} was saved on a big-endian machine; lightning_meta reads little-endian "
                "checkpoints only. Fix: torch.load it there and save it again on a "
                "little-endian machine.",
                paths=[where],
            )
        pkl = z.read(pickles[0])  # zipfile checks this record's CRC-32
        storages = _Storages(legacy=False)
        obj = safe_load(pkl, policy, where=where, what="its data.pkl", persistent=storages)
        by_name = {i.filename: i for i in infos}
        regions: dict[str, Region] = {}
        for key, ref in storages.refs.items():
            info = by_name.get(f"{prefix}data/{key}")
            if info is None:
                raise corrupt(
                    where,
                    f"is not a valid torch checkpoint: storage record 'data/{key}' is missing",
                )
            regions[key] = _record_region(p, f, info, start, size, ref, where)
    return Archive(p, "zip", obj, regions)


def _record_region(
    p: Path, f: Any, info: zipfile.ZipInfo, start: int, size: int, ref: StorageRef, where: str
) -> Region:
    name = info.filename.split("/", 1)[-1]
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        # torch.save stores every record; a zip tool can recompress them, and torch.load
        # still reads them. lightning_meta reads (and maps) the records where they lie.
        raise MetaTensorError(
            f"{where!r} holds record {name!r} compressed (zip method {info.compress_type}), "
            "which torch.save never writes: the file was recompressed by a zip tool. "
            "lightning_meta reads each record where it lies in the file. Fix: store its "
            "records again, uncompressed, and load new_path:\n"
            "    import zipfile\n"
            "    with zipfile.ZipFile(path) as old, zipfile.ZipFile(new_path, 'w') as new:\n"
            "        for info in old.infolist():\n"
            "            new.writestr(info.filename, old.read(info.filename))",
            paths=[where],
        )
    if info.file_size != ref.nbytes:
        raise corrupt(
            where,
            f"is damaged: record {name!r} holds {info.file_size} bytes but its storage needs "
            f"{ref.nbytes} ({ref.numel} x {ref.dtype})",
        )
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise corrupt(
            where, f"is not a valid torch checkpoint: record {name!r} has no local header"
        )
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    data_start = info.header_offset + 30 + name_len + extra_len
    if data_start + info.file_size > size:
        raise corrupt(
            where,
            f"is truncated: record {name!r} needs bytes up to {data_start + info.file_size} but "
            f"the file has {size}",
        )
    return Region(p, start + data_start, info.file_size, info.CRC, f"record {name!r}")


def open_legacy(p: Path, policy: Policy) -> Archive:
    """Read the structure of the legacy (``_use_new_zipfile_serialization=False``) torch file ``p``.

    The three header pickles, the object pickle and the storage key list are
    unpickled safely; each storage's block (an 8-byte element count, then
    the data) is located, its count compared with the pickle's, and checked
    to lie inside the file. No tensor data is read.

    Raises:
        MetaTensorError: not a valid legacy torch file, truncated, sizes that
            disagree, or an unsafe or damaged pickle.
    """
    where = str(p)
    try:
        with p.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            return _read_legacy(p, f, policy, size, where)
    except MetaTensorError:
        raise
    except OSError as e:
        raise io_error(p, e) from e
    except Exception as e:  # anything else in the layout itself means a damaged file
        raise corrupt(
            where,
            f"is not a valid torch checkpoint (truncated or corrupt: {type(e).__name__}: {e})",
        ) from e


def _read_legacy(p: Path, f: Any, policy: Policy, size: int, where: str) -> Archive:
    plain = Policy({})
    what = "its header"
    magic = safe_load(f, plain, where=where, what=what)
    if magic != _LEGACY_MAGIC:
        raise corrupt(where, "is not a torch checkpoint (bad magic number)")
    protocol = safe_load(f, plain, where=where, what=what)
    if protocol != _LEGACY_PROTOCOL:
        raise corrupt(where, f"is not a torch checkpoint this loader knows (protocol {protocol!r})")
    info = safe_load(f, plain, where=where, what=what)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        if isinstance(info, dict) and info.get("little_endian") is False:
            raise MetaTensorError(
                f"{where!r} was saved on a big-endian machine; lightning_meta reads little-endian "
                "checkpoints only. Fix: torch.load it there and save it again with the default "
                "(zip) format on a little-endian machine.",
                paths=[where],
            )
        raise corrupt(where, "is not a valid torch checkpoint (bad system information header)")
    storages = _Storages(legacy=True)
    obj = safe_load(f, policy, where=where, what="its pickle", persistent=storages)
    keys = safe_load(f, plain, where=where, what="its storage list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise corrupt(where, "is not a valid torch checkpoint (bad storage list)")
    if sorted(keys) != sorted(storages.refs) or len(set(keys)) != len(keys):
        raise corrupt(
            where, "is damaged: its storage list does not match the storages its tensors use"
        )
    pos = f.tell()
    regions: dict[str, Region] = {}
    for key in keys:
        ref = storages.refs[key]
        header = read_file(p, pos, 8) if pos + 8 <= size else b""
        if len(header) != 8:
            raise corrupt(
                where, f"is truncated: storage {key!r} starts at byte {pos} but the file has {size}"
            )
        (numel,) = struct.unpack("<q", header)
        if numel != ref.numel:
            raise corrupt(
                where,
                f"is damaged: storage {key!r} holds {numel} elements but its tensors say {ref.numel}",
            )
        region = Region(p, pos + 8, ref.nbytes, None, f"storage {key!r}")
        if region.offset + region.nbytes > size:
            raise corrupt(
                where,
                f"is truncated: storage {key!r} needs bytes up to {region.offset + region.nbytes} "
                f"but the file has {size}",
            )
        regions[key] = region
        pos = region.offset + region.nbytes
    return Archive(p, "legacy", obj, regions)


def tensor_from(data: torch.Tensor, ref: TensorRef, start: int) -> torch.Tensor:
    """Build the tensor ``ref`` describes from ``data``, its storage's bytes from byte ``start``.

    Raises:
        ValueError: ``data`` is too short for ``ref`` (callers read what
            :meth:`TensorRef.byte_range` says, so this means a bug).
    """
    lo, hi = ref.byte_range()
    if hi == lo:
        return torch.empty(ref.shape, dtype=ref.dtype)
    if lo < start or hi - start > data.numel():
        raise ValueError(f"bytes {lo}..{hi} are outside the {data.numel()} bytes read from {start}")
    base = data[lo - start : hi - start].view(ref.dtype)
    tensor = base.as_strided(ref.shape, ref.stride)  # from base's own storage offset
    if ref.fix == "conj":
        tensor = torch.conj_physical(tensor)
    elif ref.fix == "neg":
        tensor = torch.neg(tensor)
    return tensor


def check_storage_bounds(refs: Sequence[tuple[str, TensorRef]], where: str) -> None:
    """Raise unless every tensor lies inside its storage.

    Raises:
        MetaTensorError: a tensor reaches past its storage's end (``paths``:
            the file and the keys).
    """
    bad = [(key, ref) for key, ref in refs if ref.byte_range()[1] > ref.storage.nbytes]
    if bad:
        lines = [
            f"{key!r} ({list(ref.shape)} {ref.dtype}) needs {ref.byte_range()[1]} bytes of "
            f"storage {ref.storage.key!r}, which holds {ref.storage.nbytes}"
            for key, ref in bad
        ]
        raise MetaTensorError(
            f"{where!r} is damaged: tensors reach past the end of their storage: "
            + "; ".join(lines)
            + ". Fix: save it again or download it again; the file on disk is incomplete or damaged.",
            paths=[where, *(k for k, _ in bad)],
        )
