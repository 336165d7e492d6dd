"""Record how every tensor built under :func:`~lightning_meta.deferred_init` came to be.

Construction runs under :class:`~torch._subclasses.fake_tensor.FakeTensorMode`
(tensors report device ``cpu`` and hold no data, so model code that skips its
own initialisation for meta tensors still runs it) with a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` on top that logs every
ATen call as an :class:`Op` over integer value ids (the mode itself is in
``_recorder``). Random ops draw for real while recording (on scratch memory,
see ``_draws``), so every generator moves exactly as in eager construction and
the state each draw starts from is known. Once recording ends the
:class:`Record` holds no fake tensor: only op names, literal arguments, tensor
metadata, captured real tensors and generator states, so it deep-copies and
pickles with the module that refers to it.
"""

from __future__ import annotations

import bisect
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from lightning_meta import _compat
from lightning_meta._deferred._ambient import Ambient

# What torch.tensor([...]) (and torch.as_tensor(list), torch.LongTensor(list)) ends with:
# the recorder notes the block's own constants there, a replay lifts a copy of them.
LIFT_FRESH = "aten.lift_fresh.default"

# In-place draws whose numbers depend only on the generator and the layout of
# the tensor they fill (never on its old values): the recorder keeps the last
# one an initialiser makes, replay can skip one that is overwritten whole, and
# a skipped one can run on scratch memory to move the generator.
RANDOM_FILLS = frozenset(
    {
        "aten.normal_",
        "aten.uniform_",
        "aten.random_",
        "aten.exponential_",
        "aten.cauchy_",
        "aten.log_normal_",
        "aten.geometric_",
    }
)


class Ref:
    """A tensor argument of a recorded op, by value id."""

    __slots__ = ("vid",)

    def __init__(self, vid: int) -> None:
        self.vid = vid

    def __repr__(self) -> str:
        return f"Ref({self.vid})"


class GenRef:
    """An explicit ``torch.Generator`` argument, by stream index."""

    __slots__ = ("stream",)

    def __init__(self, stream: int) -> None:
        self.stream = stream


# NamedTuples, not dataclasses: one is built per recorded op and value, and
# construction time is part of what deferred_init costs over FakeTensorMode.
class Value(NamedTuple):
    """Metadata of one recorded tensor value; ``storage`` identifies aliasing."""

    storage: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype


class Place(NamedTuple):
    """Where a captured tensor's values are read from: ``layout`` (device, dtype, layout,
    shape, strides, offset, conjugate and negative bits), ``storage``,
    held so its identity cannot pass to another storage while the record lives, and that
    storage's ``memory`` (address, size in bytes, whether shared).

    Only ``share_memory_()`` (which a ``torch.multiprocessing`` pickle of the model does to
    the tensors it reaches) moves a storage's memory and keeps its values; ``.data``
    assigned or a cast of the tensor's module gives the tensor another storage, and a
    storage freed and allocated again in place (``untyped_storage().resize_(0)``, as FSDP
    frees unsharded parameters) holds other values or none."""

    layout: tuple[Any, ...]
    storage: torch.UntypedStorage
    memory: tuple[int, int, bool]

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` still reads its values from this place."""
        now = place_of(t)
        if now.layout != self.layout or _compat.storage_id(now.storage) != _compat.storage_id(
            self.storage
        ):
            return False
        (address, size, shared), (address_now, size_now, shared_now) = self.memory, now.memory
        moved_to_share = shared_now and not shared
        return size_now == size and (address_now == address or moved_to_share)


def place_of(t: torch.Tensor) -> Place:
    """Where ``t``'s values are read from (see :class:`Place`); a real or meta tensor of
    strided memory (the only kind a record captures)."""
    with _compat.no_python_dispatch():
        storage = t.untyped_storage()
        memory = (storage.data_ptr(), storage.nbytes(), storage.is_shared())
    layout = (
        t.device,
        t.dtype,
        t.layout,
        tuple(t.shape),
        t.stride(),
        t.storage_offset(),
        t.is_conj(),
        t.is_neg(),
    )
    return Place(layout, storage, memory)


def span(size: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """How many elements of its storage a tensor of ``size`` and ``stride`` reaches, from its offset on."""
    return 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else 0


class Op(NamedTuple):
    """One recorded ATen call.

    ``outs`` lines up with the output (a tensor, or a tuple or list of them;
    ``None`` for non-tensor items); ``touch`` and ``read`` are the storages
    the op writes and reads, ``kills`` the storages it overwrites whole
    without reading what they held (``normal_`` on a whole weight), which is
    all the slicing in ``_replay`` needs. ``stream`` is ``None`` for ops that
    draw no random numbers; ``site`` is the user's ``file:line`` that issued it.
    """

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outs: tuple[int | None, ...]
    writes: tuple[int, ...]
    reads: tuple[int, ...]
    touch: frozenset[int]
    read: frozenset[int]
    site: str
    stream: int | None
    kills: frozenset[int] = frozenset()


@dataclass
class Stream:
    """A generator random ops drew from while recording.

    ``default`` streams stand for the default generator of ``device`` (the
    global CPU generator for CPU tensors); the others for an explicit
    ``torch.Generator`` passed to the op. ``known`` says whether the state
    before each of its draws was noted while recording (always on the CPU).
    """

    device: torch.device
    default: bool
    known: bool


class Graded(NamedTuple):
    """A tensor kept on a module whose eager autograd history reaches the modules' parameters.

    ``made``: the op and ``file:line`` that made it. ``origin``: the value id
    of the one parameter (or buffer) it is a view of, whose gradient it
    feeds; ``None`` when it is no such view (``weight * 2``).
    """

    made: str
    origin: int | None


class NumpyHome:
    """The memory of a storage whose ``.numpy()`` array was still alive when the block ended.

    Eager's array shares the tensor's memory: ``real`` is the array's memory
    (written through it, also after the block). ``whole``: the array covers
    the storage in its own layout, so materialize gives the storage's tensors
    ``real``'s memory; otherwise (an array of a part, a view) that cannot be
    shared, and ``logged`` (the values the record last logged) tells whether
    the array was written after the block.
    """

    __slots__ = ("arrays", "logged", "real", "site", "whole")

    def __init__(
        self,
        real: torch.Tensor,
        whole: bool,
        logged: torch.Tensor | None,
        arrays: list[weakref.ref[Any]],
        site: str,
    ) -> None:
        self.real = real
        self.whole = whole
        self.logged = logged
        self.arrays = arrays
        self.site = site

    def alive(self) -> bool:
        """Whether one of the arrays over ``real`` is still alive."""
        return any(a() is not None for a in self.arrays)

    def copy(self) -> NumpyHome:
        """A copy for a copied record: the values now, shared with no array (as eager's deepcopy)."""
        return NumpyHome(self.real.clone(), self.whole, self.logged, [], self.site)


class Record:
    """The op log of one ``deferred_init`` block plus the replay bookkeeping.

    ``states[key][i]`` is the generator state right before random op ``i`` of
    the stream named ``key`` (``"gen:3"``, or ``"default:cuda:0"`` when a CPU
    stream is redrawn on an accelerator): noted for every draw while
    recording, and for redraws on another device as replays meet them.
    ``dtypes`` holds ``(op index, default dtype)`` from where the default
    dtype took that value; ``garbage`` the value ids of tensors on modules
    that hold uninitialised memory, with the ``file:line`` of the
    ``torch.empty`` that made it; ``graded`` those of tensors on modules that
    carry autograd history in eager construction (``self.row = self.weight[0]``
    outside ``torch.no_grad()``: gradients flow through it into the weight),
    with the op and ``file:line`` that made them.

    ``ambient`` holds ``(op index, settings)`` alike for the settings that
    change what an op computes (deterministic algorithms, matmul precision,
    denormal flushing: see ``_ambient``); ``inference`` whether the block ran
    in inference mode.

    ``pending``, ``materialized``, ``copied`` and ``waiting`` are changed by ``_handles`` only, the one
    owner of that bookkeeping (copying and pickling below rebuild them).
    """

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.values: list[Value] = []
        self.constants: dict[int, tuple[torch.Tensor, int]] = {}
        # Copies of the small constants, to see writes their version counter
        # misses (through .data, or numpy memory shared with torch.from_numpy).
        self.snapshots: dict[int, torch.Tensor] = {}
        # Where each constant's values were when captured (place_of), to see it
        # given other memory since: a cast of its module (teacher.double() sets
        # param.data), or .data assigned; its version counter counts neither.
        self.places: dict[int, Place] = {}
        # The constants torch.tensor([...]) made in the block (through lift_fresh),
        # which only the record holds: model code writes into what it lifted
        # (nn.init.constant_(nn.Parameter(torch.tensor([1.0, 1.0])))), so a replay
        # lifts a copy, leaving the record's own for the next replay.
        self.fresh: set[int] = set()
        self.streams: list[Stream] = []
        self.states: dict[str, dict[int, torch.Tensor]] = {}
        self.ends: dict[str, torch.Tensor] = {}
        self.random_index: dict[int, list[int]] = {}
        self.dtypes: list[tuple[int, torch.dtype]] = []
        # (op index, settings) from where the settings that change values took them.
        self.ambient: list[tuple[int, Ambient]] = []
        self.inference = torch.is_inference_mode_enabled()
        # Whether the block was entered inside a torch.device("meta") context.
        self.outer_meta = False
        self.garbage: dict[int, str] = {}
        self.graded: dict[int, Graded] = {}
        # The value ids held as parameters or buffers when the block ended,
        # by the storage they are in.
        self.owned: dict[int, list[int]] = {}
        self.pid = os.getpid()
        # Handles not yet materialized; weak, so a module that was built but
        # dropped (a prototype deep-copied into a ModuleList) does not hold the
        # record open forever.
        self.pending: weakref.WeakSet[Any] = weakref.WeakSet()  # of _handles.Handle
        self.materialized: dict[int, weakref.ref[torch.Tensor]] = {}
        # Real tensors made for values still pending, which share memory with
        # tensors materialized before them (``_materialize._sharing``).
        self.ahead: dict[int, torch.Tensor] = {}
        # The storage each of ``materialized`` was made with: one given other
        # data since (``.data = ...``) is no base of eager's views any more.
        self.made_in: dict[int, int] = {}
        # The value ids of ``materialized`` holding loaded values that eager
        # loading copies into its tensor: tensors viewing its storage see them.
        self.copied: set[int] = set()
        # Tensors kept on a module that view a tensor a load_state_dict in
        # progress has not reached yet (slot, handle): made views once it has.
        self.waiting: list[tuple[Any, Any]] = []
        # The key a load_state_dict(assign=True) filled each value id from (see
        # _load_hooks), to name a tie's first end when its second gets another value.
        self.loaded_as: dict[int, str] = {}
        # Storage index -> the memory of a numpy array alive when the block ended.
        self.numpy_homes: dict[int, NumpyHome] = {}
        self.released = False
        # A copy by copy.deepcopy, made before its tensors were real: eager's deep copy
        # gives every Parameter memory of its own (Parameter.__deepcopy__ clones), and
        # the other tensors sharing a storage share a copy of it, apart from them.
        self.deep_copied = False
        self.lock = threading.RLock()

    def random_ops(self, stream: int) -> list[int]:
        """Return the indices of the random ops drawing from ``stream``, in order."""
        return self.random_index.get(stream, [])

    def default_dtype_at(self, i: int) -> torch.dtype:
        """Return the default dtype in force when op ``i`` was recorded."""
        marks = self.dtypes
        if len(marks) == 1:  # the default dtype never changed in the block
            return marks[0][1]
        pos = bisect.bisect_right(marks, i, key=lambda m: m[0]) - 1
        return marks[max(pos, 0)][1] if marks else torch.get_default_dtype()

    def ambient_at(self, i: int) -> Ambient | None:
        """Return the settings in force when op ``i`` was recorded (``None``: none noted)."""
        marks = self.ambient
        if len(marks) <= 1:
            return marks[0][1] if marks else None
        pos = bisect.bisect_right(marks, i, key=lambda m: m[0]) - 1
        return marks[max(pos, 0)][1]

    def release(self) -> None:
        """Drop the op log once nothing is pending.

        The record's own method, called by ``_handles.forget`` and by
        ``_replay.complete``.
        """
        self.ops, self.values, self.constants, self.states = [], [], {}, {}
        self.snapshots = {}
        self.places = {}  # their storages, held: a cast teacher's old memory
        self.random_index = {}
        self.ahead = {}
        self.numpy_homes = {}
        self.released = True

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["materialized"] = {}
        state["made_in"] = {}
        state["copied"] = set()
        state["waiting"] = []
        state["loaded_as"] = {}
        state["pending"] = list(self.pending)
        state.pop("lock")
        # Weak references do not pickle; the copy's tensors share no array's memory.
        state["numpy_homes"] = {s: h.copy() for s, h in self.numpy_homes.items()}
        # Storages held by their places would pickle their memory once more: the
        # unpickled record notes the places anew (see __setstate__).
        state.pop("places", None)
        # Only in-place writes since capture matter, and rebuilding a tensor
        # may bump its counter (torch 2.6 does when unpickling): keep the
        # difference, not the absolute count (as ``_handles.Handle`` does).
        state["constants"] = {
            vid: (t, _compat.version_of(t) - version)
            for vid, (t, version) in self.constants.items()
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("ambient", [])  # pickled before settings were noted
        state.setdefault("ahead", {})
        state.setdefault("fresh", set())
        state.setdefault("numpy_homes", {})
        state.setdefault("outer_meta", any(s.device.type == "meta" for s in state["streams"]))
        state.setdefault("inference", False)
        state.setdefault("deep_copied", False)
        state.setdefault("loaded_as", {})
        state["constants"] = {
            vid: (t, _compat.version_of(t) - writes)
            for vid, (t, writes) in state["constants"].items()
        }
        # Unpickled, the constants have new memory: where they are now is where they
        # were captured (as for the version counters, only what changes after counts).
        state["places"] = {vid: place_of(t) for vid, (t, _) in state["constants"].items()}
        self.__dict__.update(state)
        self.pending = weakref.WeakSet(state["pending"])
        self.lock = threading.RLock()

    def __deepcopy__(self, memo: dict[int, Any]) -> Record:
        import copy

        # The op log is never mutated in place once recorded (release rebinds),
        # so copies share it; only the replay bookkeeping is per copy.
        new = Record.__new__(Record)
        memo[id(self)] = new  # before copying handles, which refer back to us
        new.__dict__.update(self.__dict__)
        new.states = {k: dict(v) for k, v in self.states.items()}
        new.ends = dict(self.ends)
        new.pending = weakref.WeakSet(copy.deepcopy(h, memo) for h in list(self.pending))
        new.materialized = {}
        new.ahead = copy.deepcopy(self.ahead, memo)
        new.numpy_homes = {s: h.copy() for s, h in self.numpy_homes.items()}
        new.made_in = {}
        new.copied = set()
        new.waiting = []
        new.deep_copied = True
        new.lock = threading.RLock()
        return new
