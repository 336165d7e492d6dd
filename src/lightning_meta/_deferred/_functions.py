"""Tensor methods a ``deferred_init`` block answers before they reach ATen.

``.numpy()`` and ``.tolist()`` on a fake tensor never reach a dispatch mode
as one call (``.numpy()`` raises torch's own error first; ``.tolist()``
reads element by element). While at least one block is open,
:func:`value_reads` puts wrappers for those two methods on the fake tensor
class (restored when the last block ends, whatever thread opened it): on a
fake tensor of an open block they return the real value when it can be
known while recording (see
:meth:`~lightning_meta._deferred._recorder.Recorder.read_values`), and
raise a :class:`~lightning_meta.MaterializationError` naming the call, the
tensor's path and the ``file:line`` otherwise; on any other fake tensor they
are torch's own methods. ``torch.Tensor.__deepcopy__`` is wrapped alike: a
real tensor deep-copied inside a block (``save_hyperparameters`` copies the
arguments of ``__init__``) gets a real copy, as in eager construction, and
so is ``torch.Tensor.numpy`` (and ``np.asarray``, which calls it): torch's
``.numpy()`` detaches through the dispatcher, which inside a block would
hand a real tensor to the fake mode and build the array on a fake tensor's
memory; a real tensor gets eager's array over its own memory instead (see
:meth:`~lightning_meta._deferred._recorder.Recorder.shares_with_numpy`).
A fake tensor of the block deep-copied there (``nn.TransformerEncoder``
cloning its layer) gets eager's copy in the block's mode, not torch's,
which copies the fake mode with it (see :func:`_fake_deepcopy`). (A
``TorchFunctionMode`` would see them too, but it costs every tensor call of
the model a trip through Python.)

``torch.Tensor.data`` is a property of this module's for the same time:
``t.data = fake`` of a block's tensor onto any other tensor runs no
dispatcher op, and would silently leave ``t`` on meta (see :func:`_set_data`).
And ``isinstance(p, SubclassOfParameter)`` holds for a block's fake
parameter made as that subclass (see :func:`_parameter_instancecheck`).

:func:`conversion_refused` is the error for ``Module.to()`` /
``.half()`` / ``.float()`` inside a block, raised the same way on every torch
version (see ``Recorder``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from lightning_meta import _compat
from lightning_meta._compat import FakeTensor
from lightning_meta._deferred._record_errors import recording_error
from lightning_meta._errors import MaterializationError

__all__ = [
    "PARAMETER_CLASS",
    "conversion_refused",
    "eager_vectors",
    "value_in_block",
    "value_reads",
    "values_only",
]


class Reads(Protocol):
    """What a block answers value reads with (its recorder)."""

    def read_values(self, t: torch.Tensor, op: str) -> torch.Tensor: ...

    def shares_with_numpy(self, t: torch.Tensor, array: object) -> None: ...

    def numpy_of(self, t: torch.Tensor, make: Callable[[torch.Tensor], Any]) -> Any: ...

    def stand_in_address(self, t: torch.Tensor) -> int: ...

    def stand_in_storage_address(self, storage: torch.UntypedStorage) -> int | None: ...


# ``__dlpack__`` (torch.from_dlpack) would hand out a bogus data pointer, and
# ``__reduce_ex__`` (torch.save, pickle) fails on the fake mode it refers to:
# both get the real value, as ``.numpy()`` does.
_METHODS = ("numpy", "tolist", "__dlpack__", "__reduce_ex__")
# Methods that run a Python function over a CPU tensor's memory without an ATen op (no
# mode sees them): on a fake tensor, whose memory is not there, the interpreter crashed.
_PYTHON_MAPS = ("apply_", "map_", "map2_")
_READERS: dict[int, Reads] = {}  # id of an open block's fake mode -> its reader
_SAVED: dict[str, Any] = {}
_LOCK = threading.Lock()


def conversion_refused(detail: str, paths: tuple[str, ...] = ()) -> MaterializationError:
    """Return the error for ``Module.to()`` and the like inside a block (``paths``: the tensors)."""
    return MaterializationError(
        f"deferred_init cannot record Module.to()/.half()/.float()/.to_empty() inside the "
        f"block ({detail}): torch cannot swap the fake tensors it builds on, even for a "
        "conversion that changes nothing. Fix: pass dtype= (and device=) to materialize, or "
        "convert after it. torch.nn.utils.skip_init(cls, ...) is to_empty() of a module "
        "built on meta: call it before the block (a real module from outside is kept as it "
        "is), or build cls(...) plainly inside the block, whose default initialisation then "
        "draws from the generator where skip_init's does not (later draws differ from "
        "eager's)",
        paths=paths,
    )


# Where a fake Parameter keeps the Parameter subclass the model asked for.
PARAMETER_CLASS = "_lightning_meta_parameter_class"


def _fake_deepcopy(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    """What eager's deep copy of ``t`` does, for a fake tensor of an open block.

    torch's own copies the fake tensor's ``__dict__``, its fake mode with it:
    a second mode holding copies of the first's weak storage references,
    each freed twice when both are collected (the heap corrupted, a
    segmentation fault later: a constant such as ``torch.tensor(1.0)`` made
    in the block, then ``nn.TransformerEncoder`` cloning its layer).
    """
    known = memo.get(id(t))
    if known is not None:
        return known  # type: ignore[no-any-return]
    with torch.no_grad():
        if t.__dict__.get("_is_param"):
            # nn.Parameter.__deepcopy__: the class again, around a clone of the
            # data (through the block's Parameter hook, as eager's call).
            cls = t.__dict__.get(PARAMETER_CLASS, torch.nn.Parameter)
            new = cls(t.data.clone(memory_format=torch.preserve_format), t.requires_grad)
        else:
            # torch.Tensor.__deepcopy__ of a subclass without data: a copy of
            # its storage, shared with every other tensor of that storage the
            # same copy reaches (a buffer and its views stay views of one
            # memory), and the attributes the model set on it (not the fake
            # tensor's own).
            new = _storage_copy(t, memo)
            if t.requires_grad:
                new.requires_grad_()
            if t.grad is not None:
                new.grad = copy.deepcopy(t.grad, memo)
            own = {k: v for k, v in vars(t).items() if k not in vars(new)}
            vars(new).update(copy.deepcopy(own, memo))
    memo[id(t)] = new
    return new  # type: ignore[no-any-return]


def _storage_copy(t: torch.Tensor, memo: dict[Any, Any]) -> torch.Tensor:
    """``t`` over a copy of its storage made once per deep copy (``memo``), as eager's
    ``Tensor.__deepcopy__`` copies the storage through the memo."""
    key = ("lightning_meta storage", _compat.storage_id(t.untyped_storage()))
    whole: torch.Tensor | None = memo.get(key)
    if whole is not None:
        if whole.dtype != t.dtype:  # the storage read as another dtype (.view(dtype), view_as_real)
            whole = whole.view(-1).view(t.dtype)
        return whole.as_strided(t.shape, t.stride(), t.storage_offset())
    size = t.untyped_storage().nbytes() // t.element_size()
    if t.storage_offset() == 0 and t.is_contiguous() and t.numel() == size:
        # The whole storage (the base buffer of later views): a tensor of its own, as eagerly.
        memo[key] = new = t.clone()
        return new
    memo[key] = whole = t.as_strided((size,), (1,), 0).clone()
    return whole.as_strided(t.shape, t.stride(), t.storage_offset())


def _real_deepcopy(original: Any) -> Any:
    """``torch.Tensor.__deepcopy__`` giving a real tensor a real copy inside a block, and a
    fake tensor of a block a fake copy in that block (see :func:`_fake_deepcopy`)."""

    def __deepcopy__(self: torch.Tensor, memo: dict[int, Any]) -> Any:
        if (
            isinstance(self, FakeTensor)
            and self.is_leaf
            and id(getattr(self, "fake_mode", None)) in _READERS
        ):
            return _fake_deepcopy(self, memo)
        if type(self) is torch.Tensor and id(_compat.active_fake_mode()) in _READERS:
            # Eager construction copies a real tensor (save_hyperparameters copies
            # the arguments of __init__): a real copy. Recorded, torch's copy
            # would put the real storage it makes on a fake tensor, which fails.
            with _compat.no_python_dispatch():
                return original(self, memo)
        return original(self, memo)

    return __deepcopy__


def _stand_in_data_ptr(original: Any) -> Any:
    """``Tensor.data_ptr`` answering, for a fake tensor of an open block, an address that is
    the same for tensors sharing memory at the same place and differs otherwise.

    Model code tells tensors that share memory apart by it (``if head.weight.data_ptr() !=
    emb.weight.data_ptr(): nn.init.normal_(head.weight)``), or compares address ranges
    (transformers' ``_find_disjoint``). A fake tensor's is 0, so every pair looked shared
    and the block skipped eager's draw (other values, without an error). Each storage
    gets a range of its own (:meth:`Recorder.stand_in_address`); 0 for a tensor without
    memory, as eager's. It points at nothing.
    """

    def data_ptr(self: torch.Tensor) -> int:
        reader = _READERS.get(id(getattr(self, "fake_mode", None)))
        if reader is None:
            return int(original(self))
        return reader.stand_in_address(self)

    data_ptr.__name__ = "data_ptr"
    data_ptr.__doc__ = getattr(original, "__doc__", None)
    return data_ptr


def _stand_in_storage_data_ptr(original: Any) -> Any:
    """``UntypedStorage.data_ptr`` answering, for the storage of a fake tensor of an open
    block, :func:`_stand_in_data_ptr`'s address of its start (``TypedStorage.data_ptr``
    goes through it). Model code compares storages by it (transformers' and accelerate's
    ``id_tensor_storage``); every fake tensor's storage is on meta, at 0."""

    def data_ptr(self: torch.UntypedStorage) -> int:
        if self.device.type == "meta":
            for reader in list(_READERS.values()):
                address = reader.stand_in_storage_address(self)
                if address is not None:
                    return address
        return int(original(self))

    data_ptr.__name__ = "data_ptr"
    data_ptr.__doc__ = getattr(original, "__doc__", None)
    return data_ptr


def _real_numpy(original: Any) -> Any:
    """``torch.Tensor.numpy`` giving a real tensor eager's array over its memory inside a block."""

    def numpy(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        reads = _READERS.get(id(_compat.active_fake_mode()))
        if reads is None or isinstance(self, FakeTensor):
            return original(self, *args, **kwargs)
        # torch's .numpy() detaches through the dispatcher: under the block's
        # modes the detach of a real tensor comes back fake, and the array
        # would be built on its (uninitialised) memory.
        with _compat.no_python_dispatch():
            array = original(self, *args, **kwargs)
        reads.shares_with_numpy(self, array)
        return array

    numpy.__name__ = "numpy"
    numpy.__doc__ = getattr(original, "__doc__", None)
    return numpy


def _wrapper(name: str, original: Any) -> Any:
    def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        reader = _READERS.get(id(getattr(self, "fake_mode", None)))
        if reader is None:
            return original(self, *args, **kwargs)
        if name == "numpy":
            return reader.numpy_of(self, lambda real: original(real, *args, **kwargs))
        real = reader.read_values(self, f"Tensor.{name}")
        with _compat.no_python_dispatch():
            return original(real, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = getattr(original, "__doc__", None)
    return method


def _refused_map(name: str, original: Any) -> Any:
    """``Tensor.apply_`` (``map_``, ``map2_``) refusing a fake tensor of an open block, whose
    values the Python function would read from memory that is not there (a segmentation
    fault, before 2026-12-07, third session)."""

    def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if id(getattr(self, "fake_mode", None)) not in _READERS:
            return original(self, *args, **kwargs)
        raise recording_error(
            f"Tensor.{name}",
            "runs a Python function over the tensor's values, which a tensor made inside "
            "the block does not hold (no ATen op runs, so nothing could replay it)",
            "compute it with torch operations (`t ** 2 + 1` for "
            "`t.apply_(lambda x: x ** 2 + 1)`), or make that tensor before the block (a real "
            "tensor from outside is kept as it is) or after materialize",
        )

    method.__name__ = name
    method.__doc__ = getattr(original, "__doc__", None)
    return method


# torch.Tensor.data as torch defines it (on torch._C.TensorBase).
_DATA = inspect.getattr_static(torch.Tensor, "data")


def _get_data(self: torch.Tensor) -> torch.Tensor:
    return _DATA.__get__(self)  # type: ignore[no-any-return]


def _set_data(self: torch.Tensor, value: torch.Tensor) -> None:
    """``t.data = value``, refusing a fake tensor of an open block given to any other tensor.

    No dispatcher op runs there, so the recorder never sees it: the tensor
    would silently take the fake's meta storage and stay on meta after
    ``materialize``, where eager construction gives it the new values.
    """
    if (
        isinstance(value, FakeTensor)
        and not isinstance(self, FakeTensor)
        and id(getattr(value, "fake_mode", None)) in _READERS
    ):
        raise recording_error(
            "Tensor.data = ...",
            f"gives a tensor from outside the block ({tuple(self.shape)}, {self.dtype}, on "
            f"{self.device}) a tensor made in the block, which has no values until "
            "materialize: it would stay on the meta device",
            "assign .data after materialize, or make the tensor a parameter or buffer of a "
            "module built in the block",
        )
    _DATA.__set__(self, value)


def _del_data(self: torch.Tensor) -> None:
    _DATA.__delete__(self)  # torch's own error


# The metaclass of nn.Parameter and its subclasses (torch.nn.parameter._ParameterMeta).
_PARAMETER_META = type(torch.nn.Parameter)


def _parameter_instancecheck(original: Any) -> Any:
    """``isinstance(p, cls)`` for ``nn.Parameter`` and its subclasses, also true for a fake
    parameter of an open block that the model made as ``cls`` (or a subclass of it).

    A fake tensor cannot be an instance of the subclass (the block notes the
    class in :data:`PARAMETER_CLASS`), and ``__init__`` code choosing by class
    (``if isinstance(p, NoDecay): nn.init.ones_(p)``) would take the other
    branch than eager construction: other values without an error.
    """

    def __instancecheck__(cls: type, instance: Any) -> bool:
        if original(cls, instance):
            return True
        if (
            not isinstance(instance, FakeTensor)
            or id(getattr(instance, "fake_mode", None)) not in _READERS
        ):
            return False
        made = instance.__dict__.get(PARAMETER_CLASS)
        return made is not None and issubclass(made, cls)

    return __instancecheck__


def value_in_block(t: torch.Tensor, op: str) -> torch.Tensor | None:
    """The real value of ``t``, a tensor of an open block, as ``.tolist()`` reads it there;
    ``None`` for any other tensor.

    Raises:
        MaterializationError: the value is not known while recording (random
            draws, uninitialised memory), naming ``op``.
    """
    reader = _READERS.get(id(getattr(t, "fake_mode", None))) if isinstance(t, FakeTensor) else None
    return None if reader is None else reader.read_values(t, op)


@contextlib.contextmanager
def value_reads(fake_mode: object, reader: Reads) -> Iterator[None]:
    """Answer ``.numpy()`` and ``.tolist()`` of ``fake_mode``'s tensors with ``reader`` for the body
    (and refuse ``t.data = fake`` on any other tensor, see :func:`_set_data`)."""
    with _LOCK:
        if not _READERS:
            for name in _METHODS:
                _SAVED[name] = vars(FakeTensor).get(name)
                setattr(FakeTensor, name, _wrapper(name, getattr(FakeTensor, name)))
            for name in _PYTHON_MAPS:
                _SAVED[name] = vars(FakeTensor).get(name)
                setattr(FakeTensor, name, _refused_map(name, getattr(FakeTensor, name)))
            _SAVED["data_ptr"] = vars(FakeTensor).get("data_ptr")
            FakeTensor.data_ptr = _stand_in_data_ptr(FakeTensor.data_ptr)  # type: ignore[method-assign]
            _SAVED["UntypedStorage.data_ptr"] = vars(torch.UntypedStorage).get("data_ptr")
            torch.UntypedStorage.data_ptr = _stand_in_storage_data_ptr(  # type: ignore[method-assign]
                torch.UntypedStorage.data_ptr
            )
            _SAVED["__deepcopy__"] = vars(torch.Tensor)["__deepcopy__"]
            torch.Tensor.__deepcopy__ = _real_deepcopy(_SAVED["__deepcopy__"])  # type: ignore[method-assign]
            # Defined on torch._C.TensorBase: torch.Tensor gets its own for the body.
            _SAVED["Tensor.numpy"] = vars(torch.Tensor).get("numpy")
            torch.Tensor.numpy = _real_numpy(torch.Tensor.numpy)  # type: ignore[method-assign]
            _SAVED["Tensor.data"] = vars(torch.Tensor).get("data")
            torch.Tensor.data = property(_get_data, _set_data, _del_data)  # type: ignore[assignment]
            _SAVED["Parameter.__instancecheck__"] = vars(_PARAMETER_META)["__instancecheck__"]
            _PARAMETER_META.__instancecheck__ = _parameter_instancecheck(  # type: ignore[method-assign]
                _SAVED["Parameter.__instancecheck__"]
            )
        _READERS[id(fake_mode)] = reader
    try:
        yield
    finally:
        with _LOCK:
            del _READERS[id(fake_mode)]
            if not _READERS:
                for name in (*_METHODS, *_PYTHON_MAPS):
                    own = _SAVED.pop(name)
                    if own is None:
                        delattr(FakeTensor, name)
                    else:
                        setattr(FakeTensor, name, own)
                data_ptr = _SAVED.pop("data_ptr")
                if data_ptr is None:
                    del FakeTensor.data_ptr
                else:
                    FakeTensor.data_ptr = data_ptr  # type: ignore[method-assign]
                storage_ptr = _SAVED.pop("UntypedStorage.data_ptr")
                if storage_ptr is None:
                    del torch.UntypedStorage.data_ptr
                else:
                    torch.UntypedStorage.data_ptr = storage_ptr  # type: ignore[method-assign]
                torch.Tensor.__deepcopy__ = _SAVED.pop("__deepcopy__")  # type: ignore[method-assign]
                numpy = _SAVED.pop("Tensor.numpy")
                if numpy is None:
                    del torch.Tensor.numpy
                else:
                    torch.Tensor.numpy = numpy  # type: ignore[method-assign]
                _PARAMETER_META.__instancecheck__ = _SAVED.pop("Parameter.__instancecheck__")  # type: ignore[method-assign]
                data = _SAVED.pop("Tensor.data")
                if data is None:
                    del torch.Tensor.data
                else:
                    torch.Tensor.data = data


# torch's functions that return only values (singular values, eigenvalues, norms made of
# them) and ask ATen for the vectors too when their input is a tensor subclass, so that
# the result could be differentiated (``_may_require_fw_or_bw_grad`` in torch's
# BatchLinearAlgebra.cpp): on a block's fake tensor ``svdvals`` records
# ``_linalg_svd(compute_uv=True)``, whose singular values differ from those of eager's
# ``compute_uv=False`` in the last bits (LAPACK runs another routine).
_VALUES_ONLY = frozenset(
    {
        torch.linalg.svdvals,
        torch.linalg.eigvalsh,
        torch.linalg.matrix_norm,
        torch.linalg.norm,
        torch.linalg.cond,
        torch.linalg.matrix_rank,
        torch.nuclear_norm,
        torch.norm,
        torch.functional.norm,
        torch.Tensor.norm,
    }
)


# torch.svd(A, some, compute_uv=False) is values-only too, and its vectors flag is its own
_SVD = frozenset({torch.svd, torch.Tensor.svd})
# what the block's mode looks at: one lookup per torch call of the model's __init__
_WATCHED = _VALUES_ONLY | _SVD
_CALLS = threading.local()


def _values_only_call(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether eager's ``func(*args, **kwargs)``, ``func`` one of ``_WATCHED``, asks ATen
    for values only."""
    if func in _SVD:
        compute_uv = args[2] if len(args) > 2 else kwargs.get("compute_uv", True)
        if compute_uv is not False:
            return False
    first = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(first, torch.Tensor):
        return False
    # eager asks for the vectors itself where the result could be differentiated: the
    # input needs a gradient, carries a forward-mode tangent, or is a torch.func
    # transform's tensor (vmap, grad, jvp), each a tensor subclass there
    if torch.is_grad_enabled() and first.requires_grad:
        return False
    if _compat.transform_level() is not None:
        return False
    return torch.autograd.forward_ad.unpack_dual(first).tangent is None


class _ValuesOnly(torch.overrides.TorchFunctionMode):
    """Note, for the recorder, a values-only function whose eager call asks for no vectors."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _WATCHED or not _values_only_call(func, args, kwargs):
            return func(*args, **kwargs)
        depth = getattr(_CALLS, "depth", 0)
        _CALLS.depth = depth + 1
        try:
            return func(*args, **kwargs)
        finally:
            _CALLS.depth = depth


def values_only() -> contextlib.AbstractContextManager[Any]:
    """A block's ``TorchFunctionMode``: see :func:`eager_vectors`."""
    return _ValuesOnly()


def eager_vectors(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``func``'s arguments as eager passes them: ``_linalg_svd`` / ``_linalg_eigh`` called
    by a values-only function (``svdvals``, ``eigvalsh``, ``matrix_norm(ord=2)``...) ask
    for no vectors, as on a real tensor."""
    flag = _compat.VECTORS_FLAG.get(func)
    if flag is None or not getattr(_CALLS, "depth", 0):
        return args, kwargs
    index, name = flag
    if len(args) > index:
        return (*args[:index], False, *args[index + 1 :]), kwargs
    return args, {**kwargs, name: False}
