"""Give every tensor met while recording a value id, and every storage an index.

The op log refers to tensors by integer value ids (one
:class:`~lightning_meta._deferred._record.Value` each, with the storage index
that tells aliasing tensors apart), never by the fake tensors themselves, so
the record holds no fake tensor once the block ends. Real tensors read inside
the block are captured as constants; a fake tensor reached without a recorded
op (``.data`` assignment) is logged as a view of the storage it shares.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._compat import FakeTensor
from lightning_meta._deferred._handles import handle_of
from lightning_meta._deferred._lineage import Lineage
from lightning_meta._deferred._record import Op, Record, Ref, Value, place_of
from lightning_meta._deferred._record_errors import path_of, recording_error, user_site
from lightning_meta._errors import MaterializationError

__all__ = ["ValueIds"]

# Captured real tensors up to this size are copied, so that replay sees a
# write after the block that their version counter does not count.
_SNAPSHOT_BYTES = 1 << 20


def _uncapturable(t: torch.Tensor) -> tuple[str, str] | None:
    """Why the record cannot hold ``t``, a real tensor read in a block, as a constant (it
    holds strided memory of its own, with a version counter), and the fix; ``None`` if it
    can. torch's own errors for these named neither the tensor nor the fix, and copying a
    wrapper without its dispatch crashed the interpreter (SIGSEGV)."""
    outside, cannot = "captured from outside the block", "which the record cannot hold"
    if t.is_nested:  # both layouts: a strided one has no sizes, a jagged one is a wrapper
        return (
            f"reads a nested tensor (torch.nested), {cannot}",
            "make nested tensors outside deferred_init (after materialize), and pass a "
            "nested tensor's components (t.unbind()) or a padded tensor "
            "(t.to_padded_tensor(0.0)) into the block",
        )
    if _compat.is_dtensor(t):
        return (
            f"reads a {type(t).__name__} (a sharded tensor: made by fully_shard, "
            "parallelize_module or distribute_tensor inside the block, or captured from "
            f"outside it), {cannot}",
            "shard after the block: fully_shard / parallelize_module the deferred model, then "
            "lightning_meta.materialize(model) gives every rank eager's shard (a DTensor from "
            "outside the block: pass t.full_tensor(), or t.to_local() for this rank's shard)",
        )
    if _compat.wrapper_subclass(t):
        return (
            f"reads a {type(t).__name__} {outside} (a tensor around others, such as a "
            f"sharded one), {cannot}",
            "pass a plain tensor into the deferred_init block (for a DTensor: "
            "t.full_tensor(), or t.to_local() for this rank's shard)",
        )
    if t.layout != torch.strided:
        return f"reads a {t.layout} tensor {outside}, {cannot}", "pass t.to_dense() into the block"
    if t.is_inference():
        return (
            "reads an inference tensor (made under torch.inference_mode(), with no version "
            f"counter to see a later write by) {outside}, {cannot}",
            "pass a clone made outside inference mode (t.clone()) into the block",
        )
    return None


class ValueIds:
    """The value ids and storage indices of one recording.

    Keeps every storage it has seen alive until :meth:`clear`, so storage ids
    (``_compat.storage_id``) cannot be reused while recording, but holds the
    fake tensors themselves only weakly: a strong reference to the output of a
    factory call (``torch.empty``) makes torch's ``make_variable`` see a
    shared tensor and re-wrap it through a Python ``detach``, which costs a
    second trip through both modes and a second fake tensor for every
    parameter (measured: ~2x FakeTensorMode's construction time).

    Args:
        record: the op log whose ``values``, ``constants`` and ``ops`` grow.
        modules: the modules built so far (by ``id``), to name a tensor in errors.
        lineage: told the size of every storage met.
    """

    def __init__(self, record: Record, modules: dict[int, nn.Module], lineage: Lineage) -> None:
        self.record = record
        self.modules = modules
        self.lineage = lineage
        # The op that made each value (its index in the log), to say where a
        # fake tensor that escaped the block was created.
        self.producer: list[int] = []
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self._vid_cdata: list[int] = []
        self._cdata_storage: dict[int, int] = {}
        self._storages: list[torch.UntypedStorage] = []  # keeps their storage ids unique
        self._meta_cdatas: set[int] = set()  # storages of fake tensors on the meta device
        self._storage_vid: dict[int, int] = {}
        self._refs: dict[int, Ref] = {}
        self._fsets: dict[int | None, frozenset[int]] = {}
        # Storage address of a real tensor -> the numpy arrays made over it in the block.
        self._numpy_arrays: dict[int, list[weakref.ref[Any]]] = {}

    def vid(self, t: torch.Tensor, op: str) -> int:
        """Return the value id of ``t``, capturing real tensors as constants.

        Raises:
            MaterializationError: ``t`` is a fake tensor of another recording,
                or reinterprets a recorded storage with another dtype.
        """
        seen = self._seen.get(id(t))
        if not isinstance(t, FakeTensor):
            if seen is not None and seen[0]() is t:
                return seen[1]
            if t.is_meta and handle_of(t) is not None:
                # Its values come from another block's record, which this
                # record cannot replay: materialize would fail on meta data.
                raise recording_error(
                    op,
                    "reads a deferred tensor of another deferred_init block (built in an "
                    "earlier block and not materialized yet), which has no values and which "
                    "this block's record cannot replay",
                    "build both modules in one deferred_init block, or materialize the first "
                    "module before entering this block",
                )
            refused = _uncapturable(t)
            if refused is not None:
                raise recording_error(op, *refused)
            vid = self._new_value(t, -1 - len(self.record.constants), None)
            # Holding ``t`` keeps its id unique.
            self.record.constants[vid] = (t, _compat.version_of(t))
            self.record.places[vid] = place_of(t)
            if not t.is_meta and (  # a meta tensor has no data to compare
                t.numel() * t.element_size() <= _SNAPSHOT_BYTES or self._numpy_shares(t)
            ):
                self._snapshot(vid, t)
            return vid
        owner = t.untyped_storage()
        cdata = _compat.storage_id(owner)
        if seen is not None and seen[0]() is t and self._vid_cdata[seen[1]] == cdata:
            return seen[1]
        return self._rebuild_view(t, op, cdata, owner)

    def share_with_numpy(self, t: torch.Tensor, array: object) -> None:
        """Note that ``array`` shares the memory of ``t``, a real tensor, while it lives.

        A write through it does not count in the version counter: every
        capture of that memory gets a copy to compare with at materialize,
        whatever its size, also one made before.
        """
        with _compat.no_python_dispatch():
            if t.layout != torch.strided or t.is_meta:
                return
            ptr = t.untyped_storage().data_ptr()
            self._numpy_arrays.setdefault(ptr, []).append(weakref.ref(array))
            for vid, (c, _) in self.record.constants.items():
                if (
                    vid not in self.record.snapshots
                    and not c.is_meta
                    and c.untyped_storage().data_ptr() == ptr
                ):
                    self._snapshot(vid, c)

    def _numpy_shares(self, t: torch.Tensor) -> bool:
        """Whether a live numpy array made in the block shares the memory of real tensor ``t``."""
        if not self._numpy_arrays:
            return False
        with _compat.no_python_dispatch():
            refs = self._numpy_arrays.get(t.untyped_storage().data_ptr(), ())
        return any(r() is not None for r in refs)

    def _snapshot(self, vid: int, t: torch.Tensor) -> None:
        with _compat.no_python_dispatch():
            self.record.snapshots[vid] = t.detach().clone()

    def out(self, leaf: Any, op: str) -> int | None:
        """Return the value id of an op's output item (``None`` if it is not a tensor).

        Raises:
            MaterializationError: ``op`` made a tensor without strided memory
                (sparse), which the record cannot hold.
        """
        if not isinstance(leaf, torch.Tensor):
            return None
        seen = self._seen.get(id(leaf))
        if seen is not None and seen[0]() is leaf:
            value = self.record.values[seen[1]]
            if (
                leaf.shape == value.size
                and leaf.stride() == value.stride
                and leaf.storage_offset() == value.offset
            ) or not isinstance(leaf, FakeTensor):
                return seen[1]
            # The op changed the tensor's layout in place (t_, unsqueeze_,
            # resize_, as_strided_): what follows reads a new value, with
            # the new layout, on the same storage. Under the old id replay
            # would make a stand-in of the old shape for it.
        if isinstance(leaf, FakeTensor):
            try:
                owner = leaf.untyped_storage()
            except NotImplementedError as e:  # "Cannot access storage of SparseTensorImpl"
                raise self.error(
                    op,
                    None,
                    f"makes a {leaf.layout} tensor, which the record cannot hold (it keeps "
                    "tensors with strided memory only)",
                    "build this part of the model outside deferred_init and assign it afterwards",
                ) from e
            vid = self._new_value(leaf, _compat.storage_id(owner), owner)
            if seen is not None:  # resize_ may have grown the storage
                self.lineage.grow(self.record.values[vid].storage, int(owner.nbytes()), user_site())
            return vid
        return self.vid(leaf, "output")

    def ref(self, vid: int) -> Ref:
        """Return the one :class:`Ref` of ``vid`` (immutable, shared by every op reading it)."""
        ref = self._refs.get(vid)
        if ref is None:
            ref = self._refs[vid] = Ref(vid)
        return ref

    def cdata_of(self, vid: int) -> int:
        """Return the storage id (``_compat.storage_id``) value ``vid`` was seen on."""
        return self._vid_cdata[vid]

    def has_storage(self, cdata: int) -> bool:
        """Whether storage id ``cdata`` (``_compat.storage_id``) is one this recording met."""
        return cdata in self._cdata_storage

    def on_meta(self, cdata: int) -> bool:
        """Whether storage ``cdata`` is that of a fake tensor on the meta device (an eager
        meta tensor, without memory)."""
        return cdata in self._meta_cdatas

    def storages_of(self, vids: list[int | None] | list[int]) -> frozenset[int]:
        """Return the storages of ``vids`` (``None`` skipped), sharing the common sets."""
        values = self.record.values
        storages = [values[v].storage for v in vids if v is not None]
        if len(storages) > 1:
            return frozenset(storages)
        key = storages[0] if storages else None
        shared = self._fsets.get(key)
        if shared is None:
            shared = self._fsets[key] = frozenset(storages)
        return shared

    def error(
        self,
        op: str,
        tensor: torch.Tensor | None,
        what: str,
        fix: str,
        sources: frozenset[int] = frozenset(),
    ) -> MaterializationError:
        """Return the error refusing ``op``, naming ``tensor``'s path when it is on a module.

        ``sources`` are the storage indices ``tensor`` was computed from: one
        of those on a module is named when ``tensor`` itself is not.
        """
        cdatas = frozenset(c for c, s in self._cdata_storage.items() if s in sources)
        path = path_of(tensor, self.modules.values(), cdatas) if tensor is not None else None
        return recording_error(op, what, fix, path=path)

    def alive(self) -> list[tuple[torch.Tensor, int]]:
        """Return every fake tensor of this recording still alive, with its value id."""
        out: list[tuple[torch.Tensor, int]] = []
        for ref, vid in self._seen.values():
            t = ref()
            if isinstance(t, FakeTensor):
                out.append((t, vid))
        return out

    def clear(self) -> None:
        """Drop every fake tensor and storage held (the record keeps what it logged)."""
        self._seen.clear()
        self.producer.clear()
        self._vid_cdata.clear()
        self._cdata_storage.clear()
        self._meta_cdatas.clear()
        self._storages.clear()
        self._refs.clear()
        self._fsets.clear()
        self._storage_vid.clear()
        self._numpy_arrays.clear()

    def _rebuild_view(
        self, t: torch.Tensor, op: str, cdata: int, owner: torch.UntypedStorage
    ) -> int:
        """Log ``t`` as a view of the recorded storage it shares, and return its value id.

        It was reached without a recorded op: a ``.data`` assignment, or a
        tensor that aliases a known storage.
        """
        storage = self._cdata_storage.get(cdata)
        if storage is None:
            raise self.error(
                op,
                t,
                "uses a fake tensor this recording never produced",
                "build every tensor of the module inside the same deferred_init block",
            )
        base = self._storage_vid[storage]
        if self.record.values[base].dtype != t.dtype:
            raise self.error(
                op,
                t,
                "reinterprets a recorded storage with another dtype",
                "use tensor.view(dtype) instead of assigning .data",
            )
        vid = self._new_value(t, cdata, owner)
        view = Op(
            "aten.as_strided.default",
            (Ref(base), tuple(t.shape), tuple(t.stride()), t.storage_offset()),
            {},
            (vid,),
            (),
            (base,),
            frozenset({storage}),
            frozenset({storage}),
            user_site(),
            None,
        )
        self.record.ops.append(view)
        return vid

    def _new_value(self, t: torch.Tensor, cdata: int, owner: torch.UntypedStorage | None) -> int:
        """Log the metadata of ``t`` as a new value on storage ``cdata`` and return its id."""
        storage = self._cdata_storage.get(cdata)
        if storage is None:
            storage = self._cdata_storage[cdata] = len(self._cdata_storage)
            if owner is not None:
                self._storages.append(owner)
            held = owner if owner is not None else t.untyped_storage()
            self.lineage.new_storage(storage, int(held.nbytes()))
            if t.device.type == "meta":
                self._meta_cdatas.add(cdata)
        vid = len(self.record.values)
        self.producer.append(len(self.record.ops))
        self.record.values.append(
            Value(storage, tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.dtype)
        )
        self._vid_cdata.append(cdata)
        self._seen[id(t)] = (weakref.ref(t), vid)
        self._storage_vid[storage] = vid
        return vid
