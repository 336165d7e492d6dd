"""Log every ATen call made while building under :func:`~lightning_meta.deferred_init`.

:class:`Recorder` sits on top of the ``FakeTensorMode`` that computes fake
outputs and appends one :class:`~lightning_meta._deferred._record.Op` per call
to the block's :class:`~lightning_meta._deferred._record.Record`. Each call
goes through the same phases, one method each: classify the op
(:func:`_info`), map its tensor arguments to value ids (``_values``) and its
generators to streams (:meth:`Recorder._log_arguments`), run it under the
fake mode (:meth:`Recorder._run_fake`), draw its random numbers for real
(``_rng.LiveDraws``), then record its outputs and writes
(:meth:`Recorder._output_vids`, :meth:`Recorder._log`), following what each
storage depends on (``_lineage``).

Construction that reads values is recorded too: a value computed from
Python numbers and captured real tensors only (``torch.linspace(...)``,
``.tolist()``) is computed for real by replaying the part of the log it
needs, and so is one an initialiser of ``torch.nn.init`` reads to decide
how often to draw (``trunc_normal_`` redraws until every value is in range).
What still cannot be recorded exactly (reading the values of weights
elsewhere, uninitialised memory, ops without a fake kernel, writes into
captured real tensors) raises at record time, naming the op, the source
``file:line`` and the tensor's path (see ``_record_errors``).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.utils.parametrize
from torch import nn

from lightning_meta import _compat
from lightning_meta._compat import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    RecordingDispatchMode,
    UnsupportedFakeTensorException,
    UnsupportedOperatorException,
)
from lightning_meta._deferred import _ambient
from lightning_meta._deferred._ambient import Ambient
from lightning_meta._deferred._functions import conversion_refused, eager_vectors
from lightning_meta._deferred._lineage import GARBAGE, RANDOM, Lineage
from lightning_meta._deferred._record import (
    LIFT_FRESH,
    RANDOM_FILLS,
    GenRef,
    NumpyHome,
    Op,
    Record,
    Stream,
)
from lightning_meta._deferred._record_errors import (
    forget_refusal,
    path_of,
    user_site,
)
from lightning_meta._deferred._replay import replay, same_bits, slice_ops
from lightning_meta._deferred._rng import DRAW_LOCK, LiveDraws, default_generator, stream_key
from lightning_meta._deferred._values import ValueIds
from lightning_meta._errors import MaterializationError

__all__ = ["Recorder"]

# Ops that draw random numbers but lack torch's ``nondeterministic_seeded`` tag.
_UNTAGGED_RANDOM = frozenset({"aten.random_", "aten.random"})
# In-place draws whose numbers depend only on the generator and the layout of
# the tensor they fill: the last one an initialiser makes is kept (see ``_draw``).
_KEEPABLE = RANDOM_FILLS
_INIT_FILE = torch.nn.init.__file__
_IS_SET_TO = torch.ops.aten.is_set_to.default
# ATen namespaces of torch.distributed's collectives (c10d.scatter_, _c10d_functional.*).
_COLLECTIVES = ("c10d.", "_c10d_functional.", "c10d_functional.")
_VALUE_READ = "aten._local_scalar_dense.default"  # what .item(), bool(), int(), float() run
# Ops that only check values and raise eager's error (torch.linalg.cholesky of a matrix that
# is not positive-definite, inv of a singular one): the fake mode does not check, and with no
# output nothing was logged, so the block and materialize went on with NaN where eager raises.
_VALUE_CHECKS = frozenset(
    {
        "aten._linalg_check_errors.default",
        "aten._assert_async.default",
        "aten._assert_async.msg",
        # Checked inside the kernel: eigh and svd of a matrix holding NaN do not converge.
        "aten._linalg_eigh.default",
        "aten._linalg_svd.default",
    }
)
# Likewise, with check_errors=True.
_CHECKED_ON_REQUEST = frozenset({"aten.linalg_cholesky_ex.default", "aten.linalg_inv_ex.default"})
# Deterministic in-place fills every module constructor makes (biases, norms'
# weights, running statistics).
_FILLS = frozenset({"aten.zero_.default", "aten.fill_.Scalar"})


@dataclass(frozen=True)
class _OpInfo:
    name: str
    writes: tuple[tuple[int, str], ...]
    random: bool
    returns_tensor: bool
    converts: bool  # what Tensor.to() runs: refused when Module.to() issues it
    keepable: bool  # an in-place draw of ``_KEEPABLE``: fills ``self`` and returns it
    fill: bool  # ``zero_`` or ``fill_`` with a number: fills ``self`` and returns it
    sets_storage: bool  # ``set_`` onto a storage: how torch.load rebuilds a tensor
    collective: bool  # an op of torch.distributed (refused: see __torch_dispatch__)
    lifts: bool  # ``lift_fresh``: what torch.tensor([...]) ends with
    func: Any


@functools.cache
def _info(func: Any) -> _OpInfo:
    """Classify an ATen overload once: its name, the arguments it writes, whether it draws."""
    writes, returns_tensor = _compat.op_schema(func)
    name = str(func)
    base = name.rsplit(".", 1)[0]
    random = torch.Tag.nondeterministic_seeded in func.tags or base in _UNTAGGED_RANDOM
    keepable = base in _KEEPABLE and writes == ((0, "self"),)
    fill = name in _FILLS and writes == ((0, "self"),)
    converts = name == "aten._to_copy.default"
    sets_storage = base == "aten.set_" and "Storage" in name
    collective = name.startswith(_COLLECTIVES)
    return _OpInfo(
        name,
        writes,
        random,
        returns_tensor,
        converts,
        keepable,
        fill,
        sets_storage,
        collective,
        name == LIFT_FRESH,
        func,
    )


@functools.cache
def _fill_allowed(dtype: torch.dtype, size: int, kind: str, value: float) -> bool:
    """Whether eager ``fill_(value)`` on ``size`` elements of ``dtype`` succeeds (no overflow)."""
    try:
        _fill_real(dtype, size, value)
    except RuntimeError:
        return False
    return True


def _fill_real(dtype: torch.dtype, size: int, value: float) -> None:
    # Eager checks the value against the dtype except on one element (a
    # separate kernel): ``size`` is 0, 1 or 2 for "more than one".
    with _compat.no_python_dispatch():
        torch.empty(size, dtype=dtype).fill_(value)


def _plain_fill(args: tuple[Any, ...]) -> bool:
    """Whether a ``zero_`` / ``fill_`` call fills dense memory with a plain number.

    Raises:
        RuntimeError: what eager ``fill_`` raises for the value (it overflows
            the dtype), which the fake mode does not check.
    """
    t = args[0]
    # The check below runs eager's CPU kernel: meta tensors (whose kernel checks
    # nothing) and accelerators (other kernels) keep the fake mode's path.
    if t.device.type != "cpu" or not t.is_contiguous():
        return False
    if len(args) == 1:
        return True
    value = args[1]
    if type(value) not in (int, float, bool):
        return False
    size = min(t.numel(), 2)
    # The kind keeps True, 1 and 1.0 (equal keys) apart.
    if not _fill_allowed(t.dtype, size, type(value).__name__, value):
        _fill_real(t.dtype, size, value)
    return True


class _NumpyArray:
    """A block tensor's values handed out by ``.numpy()``: the array's memory, and what was logged.

    Eager's array shares the tensor's memory; the block's is over ``real``, a
    copy of the recorded value (in the tensor's layout: with ``whole``, the
    tensor covers its storage, and materialize can give it this memory). A
    write through it is logged as a ``copy_`` of ``real`` into the tensor
    before the next op that uses the tensor's memory (see
    :meth:`Recorder._numpy_writes`); ``logged`` is what was logged last (the
    only copy kept: the record holds it as the ``copy_``'s source).
    """

    __slots__ = ("arrays", "cdata", "fake", "logged", "real", "site", "storage", "whole")

    def __init__(
        self, fake: torch.Tensor, storage: int, real: torch.Tensor, array: object, whole: bool
    ) -> None:
        self.fake = fake
        self.storage = storage
        self.cdata = _compat.storage_id(fake.untyped_storage())
        self.real = real
        self.whole = whole
        with _compat.no_python_dispatch():
            self.logged = real.clone()
        self.arrays = [weakref.ref(array)]
        self.site = user_site(1)

    def alive(self) -> bool:
        """Whether one of the arrays over ``real`` is still alive."""
        return any(a() is not None for a in self.arrays)


class _Call:
    """One ATen call's arguments as logged, and the value ids it reads and writes."""

    __slots__ = ("args", "first", "generators", "kwargs", "reads", "streams", "writes")

    def __init__(self) -> None:
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.reads: list[int] = []  # value ids of the tensor arguments, in order
        self.streams: list[int] = []  # streams of the explicit generator arguments
        self.generators: list[torch.Generator] = []
        self.writes: tuple[int, ...] = ()
        self.first: torch.Tensor | None = None  # the first tensor argument, named in errors


def _script_objects(out: Any) -> bool:
    """Whether an op's result is, or holds, a TorchScript object (a custom class instance)."""
    if isinstance(out, (list, tuple)):
        return any(isinstance(o, torch.ScriptObject) for o in out)
    return isinstance(out, torch.ScriptObject)


def _in_module_apply() -> bool:
    """Whether ``nn.Module._apply`` (``.to()``, ``.half()``, ``.float()``) is a near caller."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        if _compat.is_module_apply(frame.f_code):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


_PARAMETRIZE_DIR = os.path.dirname(torch.nn.utils.parametrize.__file__) + os.sep + "parametriz"


def _in_parametrization() -> bool:
    """Whether torch's ``parametrize`` or ``parametrizations`` code is running (up the stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_PARAMETRIZE_DIR):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def in_initializer() -> bool:
    """Whether a ``torch.nn.init`` function is running (somewhere up the caller's stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == _INIT_FILE:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class Recorder(RecordingDispatchMode):
    """Log every ATen call on fake tensors into a :class:`Record`.

    Sits on top of the ``FakeTensorMode`` that computes the fake outputs.
    Tensors become value ids through :class:`~lightning_meta._deferred._values.ValueIds`
    (which holds the fake tensors only weakly, and their storages until
    :meth:`close`); random ops draw for real through
    :class:`~lightning_meta._deferred._rng.LiveDraws`.

    Args:
        record: the block's op log, filled in place.
    """

    def __init__(self, record: Record) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.record = record
        self.thread = threading.get_ident()
        # The refusals raised while recording (see _record_errors.refusals_noted).
        self.refusals: list[MaterializationError] = []
        # Stand-in addresses of the storages data_ptr() was asked about: storage id ->
        # (address, bytes), and the next free one (64-byte aligned, as the CPU allocator's).
        self._addresses: dict[int, tuple[int, int]] = {}
        self._next_address = 1 << 40
        self.modules: dict[int, nn.Module] = {}
        self.lineage = Lineage(record.values)
        self.values = ValueIds(record, self.modules, self.lineage)
        self.draws = LiveDraws()
        self._streams: dict[int | torch.device, int] = {}
        self._generators: list[torch.Generator] = []  # keeps their ids unique while recording
        self._dtype: torch.dtype | None = None
        self._settings: _ambient.Settings | None = None
        # Read once: torch has no getter, and the test costs a real op.
        self._flush = _ambient.flush_denormal()
        # The last draw of an initialiser, by op index, and the one not logged yet:
        # ``trunc_normal_`` reads what it just drew, and the read copies it.
        self._kept: tuple[int, torch.Tensor] | None = None
        self._pending: torch.Tensor | None = None
        self.fake: Any = None  # the FakeTensorMode below, set by ``_session``
        self._arrays: list[_NumpyArray] = []  # .numpy() of the block's tensors, until they die
        # Captured real tensor's value id -> the fake mode's copy of it.
        self._constant_aliases: dict[int, torch.Tensor] = {}
        self._constant_cdatas: set[int] = set()  # their storage ids
        self._logging_array = False

    # -- the block's lifetime (deferred_init calls these)
    def track(self, module: nn.Module, name: str, value: object) -> None:
        """Note a module (and a submodule registered on it) built in this block's thread.

        Installed as torch's global parameter, buffer and module registration hook.
        """
        if threading.get_ident() == self.thread:
            self.modules.setdefault(id(module), module)
            if isinstance(value, nn.Module):
                self.modules.setdefault(id(value), value)

    def vid_at_exit(self, t: torch.Tensor) -> int:
        """Return the value id of ``t``, a tensor found on a module when the block ends."""
        return self.values.vid(t, "deferred_init exit")

    def garbage_site(self, vid: int) -> str | None:
        """Return where the uninitialised memory value ``vid`` holds was made, if it holds any."""
        if self.lineage.depends(vid) & GARBAGE:
            return self.lineage.site(vid)
        return None

    def site_of(self, vid: int) -> str:
        """Return the ``file:line`` of the op that made value ``vid``."""
        index = self.values.producer[vid]
        ops = self.record.ops
        return ops[index].site if index < len(ops) else "<unknown>"

    def made_by(self, vid: int) -> str:
        """Return the op and ``file:line`` that made value ``vid`` (``"aten.select.int at m.py:3"``)."""
        index = self.values.producer[vid]
        ops = self.record.ops
        return f"{ops[index].name} at {ops[index].site}" if index < len(ops) else "<unknown>"

    def close(self) -> None:
        """Drop every fake tensor, storage and scratch buffer held (the record keeps its log)."""
        self.draws.close()
        self._kept = self._pending = None
        self._arrays = []
        self.modules.clear()
        self.values.clear()
        self._generators.clear()

    # -- values read while recording
    def read_values(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """Return the real value of ``t``, which model code reads (``.item()``, ``.tolist()``).

        Raises:
            MaterializationError: ``t`` depends on uninitialised memory, or on
                random draws outside a ``torch.nn.init`` initialiser (the
                values of weights, which are only drawn at materialize).
        """
        if self._arrays:
            self._log_array_writes((t,), {})
        vid = self.values.vid(t, op)
        flags = self.lineage.depends(vid)
        if flags & GARBAGE:
            raise self.values.error(
                op,
                t,
                f"reads uninitialised memory (made by {self.lineage.site(vid)} and never "
                "filled), whose values eager "
                "construction does not define either",
                "fill the tensor before reading it",
                self._sources(vid),
            )
        if flags & RANDOM and not in_initializer():
            call = " (.item(), bool(), int() or float())" if op == _VALUE_READ else ""
            fix = (
                "compute it from Python numbers or configuration, or build this part of "
                "the model outside deferred_init and assign it afterwards"
            )
            if _in_parametrization():
                # torch's own parametrizations (orthogonal) read the weight they wrap.
                fix = (
                    "register the parametrization (torch.nn.utils.parametrizations.orthogonal, "
                    "parametrize.register_parametrization) after materialize, on the real "
                    "module; or " + fix
                )
            raise self.values.error(
                op,
                t,
                f"needs the values of a tensor{call} computed from random draws (a weight, "
                "or draws the code reads back), which a deferred tensor does not have yet "
                "(only torch.nn.init's initialisers may read their own draws)",
                fix,
                self._sources(vid),
            )
        return self.real_value(t)

    def numpy_of(self, t: torch.Tensor, make: Callable[[torch.Tensor], Any]) -> Any:
        """Return ``make(real)`` (``Tensor.numpy``) for fake tensor ``t``, ``real`` its value.

        Writes through the array are logged before the next op using the
        tensor's memory; a later op writing the tensor while the array lives
        is refused (eager's array would see it, this one cannot). An array
        still alive when the block ends becomes the tensor's memory at
        materialize (see :meth:`finish_arrays`).

        Raises:
            MaterializationError: ``t``'s value cannot be read while recording
                (see :meth:`read_values`), or an array of another tensor on its
                memory is still alive.
        """
        vid = self.values.vid(t, "Tensor.numpy")
        storage = self.record.values[vid].storage
        for held in self._arrays:
            if held.storage != storage or not held.alive():
                continue
            if held.fake is t:
                # A second array over the same memory, as eager's two share the tensor's.
                with _compat.no_python_dispatch():
                    array = make(held.real)
                held.arrays.append(weakref.ref(array))
                return array
            raise self.values.error(
                "Tensor.numpy",
                t,
                f"shares memory with the numpy array Tensor.numpy returned at {held.site}, "
                "which is still alive: eager's two arrays share the tensor's memory, the "
                "block's are copies of its values",
                "index the first array instead, or let it go (del it) before calling .numpy() "
                "again",
            )
        real = self.read_values(t, "Tensor.numpy")
        held_bytes = t.untyped_storage().nbytes()
        with _compat.no_python_dispatch():
            real = real.clone()  # the array's own memory, never a captured tensor's
            array = make(real)
            # A tensor covering its storage in this layout: materialize can
            # give the storage the array's memory, as eager's array shares it.
            whole = (
                t.storage_offset() == 0
                and real.stride() == t.stride()
                and real.untyped_storage().nbytes() == held_bytes
            )
        self._arrays.append(_NumpyArray(t, storage, real, array, whole))
        return array

    def finish_arrays(self) -> None:
        """At the end of the block: log what was written through arrays; keep the live ones' memory.

        Runs with the block's modes active: the ``copy_`` is recorded like
        any other op. An array still alive shares its tensor's memory in
        eager construction for as long as it lives; materialize gives the
        tensor the array's memory (see ``_replay._numpy_memory``).
        """
        alive = [held for held in self._arrays if held.alive()]
        for fake, new in self._numpy_writes(self._arrays):
            self._logging_array = True
            try:
                with torch.no_grad():
                    fake.copy_(new)
            finally:
                self._logging_array = False
        for held in alive:
            logged = None if held.whole else held.logged
            home = NumpyHome(held.real, held.whole, logged, held.arrays, held.site)
            self.record.numpy_homes[held.storage] = home
        self._arrays = []

    def _numpy_writes(self, due: list[_NumpyArray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return (tensor, new values) for each of ``due`` written since last looked at.

        Forgets the dead ones among ``due``.
        """
        found: list[tuple[torch.Tensor, torch.Tensor]] = []
        with _compat.no_python_dispatch():
            for held in due:
                if not same_bits(held.real, held.logged):
                    held.logged = held.real.clone()  # also the copy_'s source the record keeps
                    found.append((held.fake, held.logged))
        dead = {id(held) for held in due if not held.alive()}
        if dead:
            self._arrays = [held for held in self._arrays if id(held) not in dead]
        return found

    def _due(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[_NumpyArray]:
        """Return the arrays whose writes must be logged before an op taking ``args`` and ``kwargs``.

        Those over the memory of a tensor argument (comparing every array on
        every op cost a whole pass over each array per op), and dead ones,
        whose last writes are logged once and which are then forgotten.
        """
        cdatas: set[int] = set()
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, torch.Tensor):
                if isinstance(arg, FakeTensor):
                    cdatas.add(_compat.storage_id(arg.untyped_storage()))
            elif isinstance(arg, (list, tuple)):
                for item in arg:
                    if isinstance(item, FakeTensor):
                        cdatas.add(_compat.storage_id(item.untyped_storage()))
        return [held for held in self._arrays if held.cdata in cdatas or not held.alive()]

    def _log_array_writes(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Log writes through ``.numpy()`` arrays, as ``copy_`` ops, before an op using their memory."""
        if self._logging_array:
            return
        due = self._due(args, kwargs)
        if not due:
            return
        copy = torch.ops.aten.copy_.default
        for fake, new in self._numpy_writes(due):
            self._logging_array = True
            try:
                self.__torch_dispatch__(copy, (), (fake, new), {})
            finally:
                self._logging_array = False

    def _refuse_write_under_array(self, info: _OpInfo, call: _Call) -> None:
        """Refuse an op writing a tensor whose ``.numpy()`` array is alive (it would not see it)."""
        written = self.values.storages_of(list(call.writes))
        for held in self._arrays:
            if held.storage in written and held.alive():
                raise self.values.error(
                    info.name,
                    held.fake,
                    f"writes a tensor whose values Tensor.numpy returned at {held.site}, and that "
                    "array is still alive: eager's array shares the tensor's memory and sees "
                    "this write, the block's holds a copy and cannot",
                    "make the torch writes before calling .numpy(), or let the array go (del "
                    "it) before them",
                )

    def shares_with_numpy(self, t: torch.Tensor, array: object) -> None:
        """Note ``array``, made by ``.numpy()`` over the memory of ``t``, a real tensor."""
        self.values.share_with_numpy(t, array)

    def _sources(self, vid: int) -> frozenset[int]:
        """Return the storages value ``vid`` was computed from (to name a weight in errors)."""
        values = self.record.values
        chosen, _ = slice_ops(self.record.ops, {values[vid].storage}, {vid}, values)
        found: set[int] = set()
        for i in chosen:
            found |= self.record.ops[i].read | self.record.ops[i].touch
        return frozenset(found)

    def real_value(self, t: torch.Tensor) -> torch.Tensor:
        """Return the real value of fake tensor ``t`` by replaying the part of the log it needs."""
        vid = self.values.vid(t, "read")
        with _compat.no_python_dispatch():
            device = t.device
            targets = {vid: "<value read while recording>"}
            return replay(self.record, targets, device=device, preset=self._kept)[vid]

    def stand_in_address(self, t: torch.Tensor) -> int:
        """An address for ``t``'s memory (a fake tensor of this block), for ``data_ptr()``:
        each storage gets a range of its own, as large as its bytes, so that the addresses of
        tensors on different storages never meet, and those on one storage differ by their
        offsets, as eager's do. They point at nothing. 0 where eager's is: a tensor without
        memory, or on the meta device."""
        if t.device.type == "meta":
            return 0
        base = self._storage_address(t.untyped_storage())
        return base + int(t.storage_offset()) * t.element_size() if base else 0

    def stand_in_storage_address(self, storage: torch.UntypedStorage) -> int | None:
        """:meth:`stand_in_address` of the storage of a fake tensor of this block (its
        ``untyped_storage().data_ptr()``, which is 0, on meta, for every fake tensor);
        ``None`` for a storage this block did not make."""
        key = _compat.storage_id(storage)
        if not self.values.has_storage(key):
            return None
        return 0 if self.values.on_meta(key) else self._storage_address(storage)

    @staticmethod
    def _is_set_to(t: torch.Tensor, other: torch.Tensor) -> bool:
        """``t.is_set_to(other)`` as eager answers it: the same storage, offset, shape and
        strides. FakeTensorMode answers ``False`` even for a tensor and itself, so a tie
        checked that way (``head.weight.is_set_to(emb.weight)``) took the untied branch
        in a block: 2.95 off (before 2026-12-07, third session)."""
        with _compat.no_python_dispatch():
            same = _compat.storage_id(t.untyped_storage()) == _compat.storage_id(
                other.untyped_storage()
            )
        return (
            same
            and t.storage_offset() == other.storage_offset()
            and t.shape == other.shape
            and t.stride() == other.stride()
        )

    def _storage_address(self, storage: torch.UntypedStorage) -> int:
        size = storage.nbytes()
        if size == 0:
            return 0
        key = _compat.storage_id(storage)
        base = self._addresses.get(key)
        if base is None or base[1] < size:  # new, or another storage made where one was freed
            base = (self._next_address, size)
            self._addresses[key] = base
            self._next_address += (size + 127) // 64 * 64
        return base[0]

    def _check_values(
        self, func: Any, info: _OpInfo, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Run a check of values (``_VALUE_CHECKS``) on the real values of its fake inputs, so
        that it raises here what eager construction raises here (model code may catch it:
        ``try: L = torch.linalg.cholesky(A) except RuntimeError: ...``). The values are
        replayed from the log, draws included, as an initialiser's reads are."""

        def real(x: Any) -> Any:
            if not isinstance(x, FakeTensor):
                return x
            vid = self.values.vid(x, info.name)
            if self.lineage.depends(vid) & GARBAGE:
                raise self.values.error(
                    info.name,
                    x,
                    f"checks values computed from uninitialised memory (made by "
                    f"{self.lineage.site(vid)} and never filled), whose values eager "
                    "construction does not define either",
                    "fill the tensor before the check",
                    self._sources(vid),
                )
            return self.real_value(x)

        real_args = tuple(real(a) for a in args)
        real_kwargs = {k: real(v) for k, v in kwargs.items()}
        with _compat.no_python_dispatch():
            func(*real_args, **real_kwargs)

    # -- one ATen call, phase by phase
    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        # The hot path of recording: one call per ATen op issued by the model,
        # so the phases avoid generator expressions and share what they can.
        kwargs = kwargs or {}
        args, kwargs = eager_vectors(func, args, kwargs)
        if func is _IS_SET_TO:
            return self._is_set_to(*args, **kwargs)
        if self._arrays:
            self._log_array_writes(args, kwargs)
        info = _info(func)
        if info.collective:
            # The Work object of c10d.scatter_ was refused as a TorchScript object
            # (quantize's message); a functional collective would be replayed by one
            # rank alone at materialize, waiting for the others.
            raise self.values.error(
                info.name,
                None,
                "runs a collective (distribute_tensor, parallelize_module or fully_shard "
                "inside the block, or the model's own torch.distributed call), which a "
                "replay on one rank cannot run",
                "shard after the block: fully_shard / parallelize_module the deferred model, "
                "then lightning_meta.materialize(model) gives every rank eager's shard; or "
                "make the model's own collective after materialize",
            )
        if torch.is_inference_mode_enabled() and not self.record.inference:
            raise self.values.error(
                info.name,
                None,
                "runs under torch.inference_mode() entered inside the block: the tensors made "
                "there keep no version counter, which deferred tensors need to see a write "
                "after the block",
                "use torch.no_grad() inside the block instead (the values are the same), or "
                "build this part of the model outside deferred_init and assign it afterwards",
            )
        if info.converts and _in_module_apply():
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            path = path_of(first, self.modules.values()) if first is not None else None
            what = f"{str(path)!r}" if path is not None else "a parameter or buffer"
            raise conversion_refused(
                f"{info.name} converts {what}, issued at {user_site(1)}",
                paths=(path.dotted,) if path is not None else (),
            )
        if info.sets_storage and not self.record.outer_meta and _meta_storage(args):
            if any(
                isinstance(a, torch.UntypedStorage)
                and self.values.has_storage(_compat.storage_id(a))
                for a in args
            ):
                # The storage of another tensor of the block (flat-parameter code), not
                # a load: the message said "loads a tensor" (before 2026-12-07).
                raise self.values.error(
                    info.name,
                    None,
                    "puts a tensor onto the storage of another tensor made in the block "
                    "(Tensor.set_(other.untyped_storage(), offset, size), as flat-parameter "
                    "code does, and as torch does to write through a storage: "
                    "t.untyped_storage().fill_(v) or .copy_(src)), which the block does "
                    "not record",
                    "take views of the other tensor instead (`p.data = flat[o:o + n]"
                    ".view_as(p)`, which the block records and replays with eager's "
                    "sharing), write through the tensor rather than its storage "
                    "(t.data.fill_(v)), or do it after materialize",
                )
            raise self.values.error(
                info.name,
                None,
                "loads a tensor (torch.load, pickle.loads, a tensor unpickled on its way in), "
                "which torch builds on the meta device inside a deferred_init block (it sees "
                "the block's fake tensor mode): its values would be lost",
                "load it before the block and use the loaded tensor inside it (a real tensor "
                "from outside the block is kept as it is), or load it after materialize",
            )
        dtype = torch.get_default_dtype()
        if dtype is not self._dtype:
            self.record.dtypes.append((len(self.record.ops), dtype))
            self._dtype = dtype
        settings = _ambient.settings()
        if settings != self._settings:
            ambient = Ambient(settings, self._flush)
            self.record.ambient.append((len(self.record.ops), ambient))
            self._settings = settings
            self.lineage.fills_empty = ambient.fills_empty
        if info.lifts:
            captured = len(self.record.constants)
            call = self._log_arguments(info, args, kwargs)
            if len(self.record.constants) > captured:
                self._note_fresh(call, args)
        else:
            call = self._log_arguments(info, args, kwargs)
        if call.writes and self.record.constants:
            # Before the fake mode runs it: on a real tensor, out= and set_
            # raise torch's own AssertionError there.
            self._refuse_constant_writes(info, call)
        stream: int | None = None
        state: torch.Tensor | None = None
        if info.keepable and self._fills_own_fake(call, args):
            # ``normal_`` and the like on one of our fake tensors: the fake
            # mode would only run the meta kernel and return ``self`` (about
            # as long as the draw itself), so the live draw on real scratch
            # memory stands in for it, and its checks (dtype, bounds) too.
            with DRAW_LOCK:
                try:
                    stream, state = self._draw(func, info, call, args, kwargs, args[0])
                except MaterializationError as e:
                    # Raise what eager construction raises for bad arguments, if anything:
                    # that error, not the refusal, is what model code may then catch.
                    try:
                        self._run_fake(func, info, call, args, kwargs)
                    except BaseException:
                        forget_refusal(e)
                        raise
                    raise
            self._log(info, call, (call.reads[0],), stream, state)
            self._pending = None
            return args[0]
        if info.fill and self._fills_own_fake(call, args) and _plain_fill(args):
            # Likewise for a fill: the fake mode would only return ``self``
            # (and let a value that overflows the dtype through, which
            # _plain_fill refuses as eager does).
            self._log(info, call, (call.reads[0],), None, None)
            self._pending = None
            return args[0]
        if info.random:
            with DRAW_LOCK:
                out = self._run_fake(func, info, call, args, kwargs)
                stream, state = self._draw(func, info, call, args, kwargs, out)
        elif info.name in _VALUE_CHECKS or (
            info.name in _CHECKED_ON_REQUEST and kwargs.get("check_errors", False)
        ):
            self._check_values(func, info, args, kwargs)
            out = self._run_fake(func, info, call, args, kwargs)
        else:
            out = self._run_fake(func, info, call, args, kwargs)
        if call.reads and _script_objects(out):
            # quantized::linear_prepack_fp16 and the like pack their tensors
            # into a TorchScript object: no value id reaches inside it, so a
            # replay could not fill it and it would keep the fake's zeros.
            raise self.values.error(
                info.name,
                call.first,
                "packs tensors of the block into a TorchScript object (such as "
                "torch.ao.quantization.quantize_dynamic's packed weights), which no replay "
                "can fill: it would keep placeholder values",
                "quantize (or pack) after materialize, or build this part of the model outside "
                "deferred_init and assign it afterwards",
            )
        outs = self._output_vids(out, info.name)
        # A call without tensor outputs or writes (a query such as prim.device)
        # has nothing to replay.
        if call.writes or outs.count(None) != len(outs):
            self._log(info, call, outs, stream, state)
        self._pending = None
        return out

    def _note_fresh(self, call: _Call, args: tuple[Any, ...]) -> None:
        """Note the constant that ``lift_fresh`` just captured as the block's own, if it is.

        ``torch.tensor([...])`` (and ``torch.LongTensor(list)``, ``torch.as_tensor(list)``)
        copies its data into new memory that nothing else holds before lifting it;
        memory of numpy's or another library's (``torch.as_tensor(array)``,
        ``torch.from_dlpack``) is borrowed: not resizable, and it stays a constant
        captured from outside, whose writes are refused.
        """
        t = args[0] if len(args) == 1 else None
        if (
            type(t) is torch.Tensor
            and len(call.reads) == 1
            and call.reads[0] in self.record.constants
            and self.record.constants[call.reads[0]][0] is t
            and not t.is_meta
            and t.layout == torch.strided
            and t.untyped_storage().resizable()
        ):
            self.record.fresh.add(call.reads[0])

    def _refuse_constant_writes(self, info: _OpInfo, call: _Call) -> None:
        """Refuse a write into a real tensor captured from outside the block, or into a view
        of one (``table[0] = 5.0``: the fake mode's view of it has a storage of its own)."""
        constants = self.record.constants
        aliases, cdatas = self._constant_aliases, self._constant_cdatas
        if len(aliases) != len(constants):
            for vid in constants:
                if vid not in aliases:
                    # The fake mode's memo: the copy its ops on the tensor use. Held,
                    # so its storage id is not reused by another while recording.
                    fake = aliases[vid] = self.fake.from_tensor(constants[vid][0])
                    if not constants[vid][0].is_meta and vid not in self.record.fresh:
                        cdatas.add(_compat.storage_id(fake.untyped_storage()))
        for vid in call.writes:
            # A meta tensor holds no values to change (torch.tensor(0, device="meta"), as
            # nn.BatchNorm1d(8, device="meta") makes its counter, which its zero_() was
            # refused for before 2026-12-07, third session): it stays meta, as eagerly.
            if (
                vid in constants and not constants[vid][0].is_meta and vid not in self.record.fresh
            ) or (self.values.cdata_of(vid) in cdatas):
                raise self.values.error(
                    info.name,
                    None,
                    "writes into a real tensor captured from outside the block (or a view of "
                    "one), which eager construction changes and a deferred one cannot",
                    "clone the tensor before writing into it inside deferred_init, or make the "
                    "write before the block",
                )

    def _log_arguments(self, info: _OpInfo, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        """Return the call with its tensors as value ids and its generators as streams."""
        call = _Call()
        scan, name = self._scan, info.name
        call.args = tuple([a if type(a) in _ATOMIC else scan(a, name, call) for a in args])
        if kwargs:
            call.kwargs = {k: self._scan(v, info.name, call) for k, v in kwargs.items()}
        if info.writes:
            call.writes = self._writes(info, args, kwargs)
        return call

    def _fills_own_fake(self, call: _Call, args: tuple[Any, ...]) -> bool:
        """Whether an in-place draw fills a fake tensor of this recording and reads no other.

        A fake tensor holding a constant (``torch.tensor([1.0])``) is left to
        the fake mode, which forgets the constant when it is written.
        """
        t = args[0] if args else None
        return (
            len(call.reads) == 1
            and type(t) is FakeTensor
            and t.fake_mode is self.fake
            and getattr(t, "constant", None) is None
        )

    def _scan(self, x: Any, op: str, call: _Call) -> Any:
        """Return ``x`` as logged: each tensor as a ``Ref``, each generator as a ``GenRef``."""
        if type(x) in _ATOMIC:
            return x
        if isinstance(x, torch.Tensor):
            vid = self.values.vid(x, op)
            call.reads.append(vid)
            if call.first is None:
                call.first = x
            return self.values.ref(vid)
        if isinstance(x, (list, tuple)):
            return type(x)([self._scan(y, op, call) for y in x]) if _needs_scan(x) else x
        if isinstance(x, torch.Generator):
            stream = self._stream(x, x.device, default=False, known=True)
            call.streams.append(stream)
            call.generators.append(x)
            return GenRef(stream)
        return x

    def _writes(
        self, info: _OpInfo, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, ...]:
        """Return the value ids of the tensors the op writes in place, per its schema (and
        per its kernel, where the schema does not say: a batch norm's running statistics)."""
        found: list[int] = []
        for index, name in _compat.call_writes(info.func, args, kwargs):
            value = args[index] if index < len(args) else kwargs.get(name)
            items = value if isinstance(value, (list, tuple)) else (value,)
            found.extend(
                self.values.vid(t, info.name) for t in items if isinstance(t, torch.Tensor)
            )
        return tuple(found)

    def _run_fake(
        self, func: Any, info: _OpInfo, call: _Call, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run ``func`` under the fake mode below; compute for real what needs values."""
        try:
            return func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException) as e:
            return self._run_real(func, info, call, args, kwargs, e)
        except (UnsupportedOperatorException, NotImplementedError, RuntimeError) as e:
            # Both are RuntimeErrors: an op without a fake kernel (nested tensors), a
            # tensor kind fake tensors cannot stand for (per-channel quantized).
            unsupported = (UnsupportedOperatorException, UnsupportedFakeTensorException)
            if (
                isinstance(e, RuntimeError)
                and not isinstance(e, unsupported)
                and not _compat.lacks_fake_kernel(e)
            ):
                raise
            raise self.values.error(
                info.name,
                call.first,
                # The first line: the dispatcher's errors go on to list every backend.
                f"cannot run on a fake tensor ({type(e).__name__}: {str(e).splitlines()[0]})",
                "build this part of the model outside deferred_init and assign it afterwards",
            ) from e

    def _run_real(
        self,
        func: Any,
        info: _OpInfo,
        call: _Call,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        cause: Exception,
    ) -> Any:
        """Run an op whose result depends on values (``.item()``, ``nonzero``) on real values.

        Its inputs are computed by replaying the log (see :meth:`read_values`);
        tensor outputs come back as fake tensors of the real result's shape,
        and the op is logged like any other, so replay computes it again.
        """
        real_inputs: dict[int, torch.Tensor] = {}

        def real(x: Any) -> Any:
            if isinstance(x, FakeTensor):
                if id(x) not in real_inputs:
                    real_inputs[id(x)] = self.read_values(x, info.name)
                return real_inputs[id(x)]
            if isinstance(x, (list, tuple)):
                return type(x)(real(y) for y in x)
            return x

        try:
            real_args = tuple(real(a) for a in args)
            real_kwargs = {k: real(v) for k, v in kwargs.items()}
        except MaterializationError as e:
            raise e from cause
        with _compat.no_python_dispatch():
            out = func(*real_args, **real_kwargs)

        def fake(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
            if isinstance(x, (list, tuple)):
                return type(x)(fake(y) for y in x)
            return x

        return fake(out)  # under the fake mode below: fake tensors, not logged

    def _draw(
        self,
        func: Any,
        info: _OpInfo,
        call: _Call,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        out: Any,
    ) -> tuple[int, torch.Tensor | None]:
        """Draw a random op's numbers for real; return its stream and the state it started from."""
        target: torch.Tensor | None = None
        if info.writes:
            index, name = info.writes[0]
            target = args[index] if index < len(args) else kwargs.get(name)
        if call.generators:
            gen: torch.Generator | None = call.generators[0]
            stream = call.streams[0]
        else:
            made = target if target is not None else _first_tensor(out)
            device = made.device if made is not None else torch.device("cpu")
            gen = default_generator(device)
            stream = self._stream(device, device, default=True, known=gen is not None)
        if gen is None:
            return stream, None
        state = gen.get_state()
        # Keep a whole-tensor draw an initialiser may read next (trunc_normal_
        # checks its draws against the bounds): the read then copies it instead
        # of drawing the same numbers again. One more scratch buffer at most.
        keep = (
            target is not None
            and info.keepable
            and set(call.reads) <= set(call.writes)
            and target.is_contiguous()
            and in_initializer()
        )
        if keep:
            self._kept = None  # its memory is drawn into again
        try:
            self._pending = self.draws.draw(
                info.name, func, args, kwargs, target, self.real_value, keep
            )
        except MaterializationError:
            raise
        except Exception as e:
            error = self.values.error(
                info.name,
                call.first,
                f"could not draw its random numbers for real ({type(e).__name__}: {e})",
                "build this part of the model outside deferred_init and assign it afterwards",
            )
            # The draw ran on the real values, as eager's: what it raised (torch.multinomial
            # of negative weights) eager raises too, and model code catching it takes
            # eager's path. Not a refusal the block must fail for.
            forget_refusal(error)
            raise error from e
        return stream, state

    def _output_vids(self, out: Any, name: str) -> tuple[int | None, ...]:
        """Return the value ids of the outputs (``None`` for non-tensor items)."""
        if isinstance(out, (list, tuple)):
            return tuple([self.values.out(leaf, name) for leaf in out])
        return (self.values.out(out, name),)

    def _log(
        self,
        info: _OpInfo,
        call: _Call,
        outs: tuple[int | None, ...],
        stream: int | None,
        state: torch.Tensor | None,
    ) -> None:
        """Append the call to the record."""
        record = self.record
        if self._arrays and call.writes and not self._logging_array:
            self._refuse_write_under_array(info, call)
        reads = tuple(call.reads)
        site = user_site()
        kills = self.lineage.op(info.name, info.random, reads, call.writes, outs, site)
        index = len(record.ops)
        if self._pending is not None:
            self._kept = (index, self._pending)
            self._pending = None
        record.ops.append(
            Op(
                info.name,
                call.args,
                call.kwargs,
                outs,
                call.writes,
                reads,
                self.values.storages_of([*call.writes, *outs]),
                self.values.storages_of(call.reads),
                site,
                stream,
                kills,
            )
        )
        if stream is not None:
            record.random_index.setdefault(stream, []).append(index)
            if state is not None:
                record.states.setdefault(stream_key(stream), {})[index] = state

    def _stream(
        self, key: torch.Generator | torch.device, device: torch.device, default: bool, known: bool
    ) -> int:
        """Return the stream of a generator (or of a device's default one), registering it once."""
        ident: int | torch.device = key if isinstance(key, torch.device) else id(key)
        index = self._streams.get(ident)
        if index is None:
            index = len(self.record.streams)
            self.record.streams.append(Stream(device, default, known))
            self._streams[ident] = index
            if isinstance(key, torch.Generator):
                self._generators.append(key)
        return index


def _meta_storage(args: tuple[Any, ...]) -> bool:
    """Whether ``args`` hold a storage on the meta device (what torch.load makes under a fake mode)."""
    return any(isinstance(a, torch.UntypedStorage) and a.device.type == "meta" for a in args)


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        for leaf in out:
            if isinstance(leaf, torch.Tensor):
                return leaf
    return None


# Argument types that are never a tensor, a generator or a sequence: checked by
# exact type first, since ``isinstance(x, torch.Generator)`` runs a Python-level
# metaclass ``__instancecheck__`` (about 1 us) for every shape entry.
_ATOMIC = frozenset(
    {
        int,
        float,
        bool,
        complex,
        str,
        type(None),
        torch.dtype,
        torch.device,
        torch.layout,
        torch.memory_format,
    }
)


def _needs_scan(seq: list[Any] | tuple[Any, ...]) -> bool:
    """Return whether ``seq`` holds a tensor or generator, at any depth."""
    for y in seq:
        if type(y) in _ATOMIC:
            continue
        if isinstance(y, (torch.Tensor, torch.Generator)):
            return True
        if isinstance(y, (list, tuple)) and _needs_scan(y):
            return True
    return False
