"""The class a deferred tensor wears between its block and ``materialize``: ``.data`` is seen.

A write through ``p.data`` (``m.weight.data.normal_(0, 0.02)``, the classic
initialisation idiom, run after the block) goes to a tensor with a version
counter of its own, so nothing on ``p`` shows it, and ``materialize`` would
replay construction's values without a word. While the tensor is deferred
its class is a subclass of its own (:func:`watch`) whose ``.data`` is
``p.detach()``: the same meta tensor, but sharing ``p``'s version counter, so
the write counts as one on ``p`` and ``materialize`` refuses it as any other
in-place change after the block. On a meta tensor nothing else tells the
two apart (neither holds values; both refuse ``set_`` and metadata changes).

``p.data = other`` of another dtype is what ``module.to(dtype)`` does:
:func:`casts` keeps each dtype given, so two casts round as eagerly. One of
the same dtype is not noted: it cannot be told from a copy of the same
values (Lightning's ``ddp_spawn`` launcher does ``t.data = t.data.clone()``).

``nn.Parameter(p)`` gives a plain ``Parameter`` over ``p``'s memory, as for
any ``Parameter`` or ``Tensor`` (``weight_norm`` and ``register_parametrization``
applied after the block call it; their new meta tensors are for a load to
fill): torch would take its path for tensor subclasses, which wants
``detach()`` of the subclass and then marks that result as a parameter; the
class turns it into the ``Parameter`` there. A tensor made by calling the
class (``type(p)(data)``, as accelerate's ``set_module_tensor_to_device``
does) is of the base class.

The class keeps its base's name, pickles and deep-copies as its base (the
copy is watched again when its handle is restored, see ``_deferred._handles``),
and goes when the tensor gets real contents: ``torch.utils.swap_tensors``
swaps classes too, and :func:`unwatch` puts the base back on any tensor that
stops being deferred another way. :func:`tensor_class` is what code building
a tensor "of the same class" must ask for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, NoReturn

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._errors import DeferredCopyError, MetaTensorError

__all__ = [
    "FROM_REAL_ONLY",
    "any_emptied",
    "casts",
    "emptied",
    "holds_values",
    "note_casts",
    "tensor_class",
    "unwatch",
    "watch",
]

# id of a watched tensor -> the dtypes ``.data =`` gave it, in order.
_CASTS: dict[int, list[torch.dtype]] = {}
# id of what ``detach()`` gave ``nn.Parameter.__new__`` -> the class it builds.
_MAKING: dict[int, type] = {}


class _Watched:
    """Mixed into a deferred tensor's class: ``.data`` shares the tensor's version counter."""

    __slots__ = ()
    _watched_base: ClassVar[type]

    @property
    def data(self) -> torch.Tensor:
        return torch.Tensor.detach(self)  # type: ignore[arg-type]

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        t: torch.Tensor = self  # type: ignore[assignment]
        if not isinstance(value, torch.Tensor):
            torch.Tensor.data.__set__(t, value)  # type: ignore[attr-defined]
            return  # torch's TypeError
        if value.device.type != "meta":
            # torch's own error ("incompatible tensor type") names neither side.
            raise MetaTensorError(
                f"`.data = ` a {value.device.type} tensor on a deferred {self._watched_base.__name__} "
                f"of shape {tuple(t.shape)} ({t.dtype}), built under "
                "lightning_meta.deferred_init: it is a meta tensor until materialize, which "
                "cannot take real memory this way. Fix: assign inside the deferred_init block, "
                "or after lightning_meta.materialize; or replace the parameter itself "
                "(module.weight = nn.Parameter(tensor)), which materialize keeps."
            )
        was = t.dtype
        torch.Tensor.data.__set__(t, value)  # type: ignore[attr-defined]
        if value.dtype != was:
            _CASTS.setdefault(id(t), []).append(value.dtype)

    def detach(self) -> torch.Tensor:
        out = torch.Tensor.detach(self)  # type: ignore[arg-type]
        made = _compat.parameter_being_made(1)
        if made is not None and self._watched_base in (torch.Tensor, nn.Parameter):
            out.__class__ = type(self)  # type: ignore[assignment]  # torch's subclass path wants it
            _MAKING[id(out)] = made
        return out

    def __setattr__(self, name: str, value: Any) -> None:
        made = _MAKING.pop(id(self), None) if name == "_is_param" else None
        if made is not None:
            try:
                # What nn.Parameter(t) of a plain tensor gives:
                # torch.Tensor._make_subclass(cls, t.detach(), requires_grad).
                self.__class__ = made
                return
            except TypeError:
                pass  # a Parameter subclass with slots: torch's subclass path's result
        super().__setattr__(name, value)

    # Moving it off meta cannot work (torch: "Cannot copy out of meta tensor",
    # with advice to use to_empty(), which gives uninitialised memory): say
    # what can. Each is what Module.to() / .cpu() / .cuda() / .share_memory()
    # call on every tensor.
    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        device = _compat.target_device(*args, **kwargs)
        if isinstance(device, torch.device) and device.type != "meta":
            _refuse_copy(self, f".to({str(device)!r})")
        return torch.Tensor.to(self, *args, **kwargs)  # type: ignore[call-overload, no-any-return]

    def cpu(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        _refuse_copy(self, ".cpu()")

    def cuda(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        _refuse_copy(self, ".cuda()")

    def share_memory_(self) -> torch.Tensor:
        _refuse_copy(self, ".share_memory_()")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # Results stay plain tensors (as a Parameter's do). An op that makes a
        # real tensor from a deferred one and a real one is refused: torch's
        # CPU matmul kernels (mm, addmm, baddbmm, linear, ...) take a meta
        # operand and return uninitialised memory without an error (x @ W in
        # a forward run before materialize, LightningModule.setup()). Ops
        # whose result stays meta (an embedding with CPU ids, a 0-dim CPU
        # factor) are answered as before: no value is made from nothing.
        if func is torch.empty_like and kwargs and args:
            # Module.to_empty() (Lightning's materialization under ModelParallelStrategy,
            # or called by hand): uninitialised memory where eager has values, without
            # an error before the eighth session's review. Only there: the loader's
            # own empty_like gives a deferred tensor storage that a copy then fills.
            device = kwargs.get("device")
            if (
                device is not None
                and torch.device(device).type != "meta"
                and _compat.module_applying() is not None
            ):
                _refuse_copy(args[0], ".to_empty()")
        if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
            # Getters and methods of the tensor alone (.shape, .detach()):
            # most calls, and nothing real to mix in.
            return _compat.disabled_torch_function(func, types, args, {})
        if not all(issubclass(t, torch.Tensor) for t in types):
            # Another kind of argument takes part (torch.fx's proxies): it
            # answers, as it did when this class had torch's disabled impl.
            return NotImplemented
        leaves = _compat.tree_leaves((args, kwargs))
        real = None if func in FROM_REAL_ONLY else next(filter(holds_values, leaves), None)
        if (
            real is not None
            and kwargs
            and any(map(holds_values, _compat.tree_leaves(kwargs.get("out"))))
        ):
            _refuse_mixed(func, leaves, real)  # before it writes into the real out=
        try:
            out = _compat.disabled_torch_function(func, types, args, kwargs or {})
        except RuntimeError as e:
            if real is not None and not isinstance(e, MetaTensorError) and "device" in str(e):
                # torch's "Tensor on device meta is not on the expected device
                # cpu!" (nn.Linear with its meta bias): the same cause.
                _refuse_mixed(func, leaves, real, e)
            raise
        if real is not None and any(map(holds_values, _compat.tree_leaves(out))):
            _refuse_mixed(func, leaves, real)
        return out

    def __reduce_ex__(self, proto: Any) -> Any:
        with _as_base(self):  # a pickle names the class: the base's, importable anywhere
            return self.__reduce_ex__(proto)  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        with _as_base(self):
            return self.__deepcopy__(memo)  # type: ignore[operator]

    def __repr__(self, **kwargs: Any) -> str:
        with _as_base(self):  # torch prints a subclass's name around the tensor
            return self.__repr__(**kwargs)  # type: ignore[no-any-return]


# Ops whose real result comes from the real argument alone, the deferred one
# giving only its shape or dtype (cpu_x.view_as(W) in a load hook), or that
# write a real tensor's values into a deferred one (load_state_dict's copy_;
# materialize refuses the write later). A template's call watches the same.
FROM_REAL_ONLY = frozenset(
    {
        torch.Tensor.view_as,
        torch.Tensor.expand_as,
        torch.Tensor.reshape_as,
        torch.Tensor.type_as,
        torch.broadcast_tensors,
        torch.Tensor.copy_,
        torch.Tensor.__setitem__,
        torch.Tensor.set_,
        torch.Tensor.data.__set__,  # type: ignore[attr-defined]
        torch.Tensor.grad.__set__,  # type: ignore[attr-defined, union-attr]
    }
)


def holds_values(x: Any) -> bool:
    """Whether ``x`` is a tensor that holds values: not meta, not deferred (meta, and
    asking would come back to ``__torch_function__``), not fake (a FakeTensorMode
    tracing the model)."""
    return (
        isinstance(x, torch.Tensor)
        and not isinstance(x, (_Watched, _compat.FakeTensor))
        and not x.is_meta
    )


def _refuse_mixed(
    func: Any, leaves: list[Any], real: torch.Tensor, failed: RuntimeError | None = None
) -> NoReturn:
    """Raise for ``func`` making (or refusing to make) a real tensor from a deferred one.

    ``leaves``: the call's arguments, flattened; ``real``: the real tensor among them.
    """
    deferred: Any = next(t for t in leaves if isinstance(t, _Watched))
    name = getattr(func, "__name__", None) or str(func)
    what = (
        f"got a real {real.device.type} tensor and a deferred"
        if failed is not None
        else f"computed a real {real.device.type} tensor from a deferred"
    )
    why = (
        f"torch refused the devices ({str(failed).splitlines()[0]})"
        if failed is not None
        else "torch's kernel read memory the meta tensor does not have (uninitialised values, "
        "no error)"
    )
    raise MetaTensorError(
        f"{name} {what} {deferred._watched_base.__name__} of shape {tuple(deferred.shape)} "
        f"({deferred.dtype}), built under lightning_meta.deferred_init, which holds no values "
        f"until lightning_meta.materialize: {why}. Fix: materialize first; under MetaGuard, which "
        "materializes when the strategy is set up (after LightningModule.setup() and "
        "configure_model), compute with the model from on_fit_start on, or call "
        "lightning_meta.materialize(module) where you need it earlier; a module MetaGuard "
        "does not reach from the model (a class attribute, a global) stays deferred: hold it "
        "on the LightningModule, or materialize it yourself. To count FLOPs or follow shapes "
        "without values, pass meta inputs (in eval mode where the model keeps running "
        "statistics, as BatchNorm does: a forward in train mode updates them, which "
        "materialize then refuses)."
    ) from failed


#: the real tensors a refused ``to_empty()`` emptied before it reached a deferred one
#: (``Module._apply`` visits the children first; the DTensors ``fully_shard`` made of
#: deferred parameters are not watched): uninitialised memory, which a later
#: ``materialize`` would keep. With each, its version counters: a tensor written since (a
#: ``load_state_dict`` restoring it) holds values again. Held strongly, not by weak
#: reference: torch refuses to swap a tensor with a weak reference (FSDP2's ``_apply``),
#: and an id alone may be a new tensor's; what a dropped model leaves here is kept until
#: the process ends (a refused ``to_empty()`` is an error path).
_EMPTIED: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}


def _marks(t: torch.Tensor) -> tuple[int, int]:
    # Versions only: a retried to_empty() or a cast gives the tensor new storage
    # (``.data =``), new garbage, and moves neither; a copy_ into it moves them.
    local = t.to_local() if _compat.is_dtensor(t) else t
    return (_compat.version_of(t), _compat.version_of(local))


def any_emptied() -> bool:
    """Whether a ``to_empty()`` was refused after emptying some tensor (see :func:`emptied`)."""
    return bool(_EMPTIED)


def emptied(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of ``tensors`` a refused ``to_empty()`` emptied, not written since."""
    found = []
    for name, t in tensors:
        entry = _EMPTIED.get(id(t))
        if entry is not None and entry[0] is t:
            if entry[1] == _marks(t):
                found.append(name)
            else:
                del _EMPTIED[id(t)]  # written since: values again
    return found


def _record_emptied(t: torch.Tensor, root: nn.Module, recurse: bool) -> list[str]:
    """Record what the ``to_empty()`` of ``root`` refused at ``t`` emptied before it; their
    names (a retry empties them again: recorded anew)."""
    reached: list[str] = []
    for name, other in _compat.apply_order(root, recurse):
        if other is t:
            break
        if not other.is_meta:
            _EMPTIED[id(other)] = (other, _marks(other))
            reached.append(name)
    return reached


def _refuse_copy(t: Any, call: str) -> NoReturn:
    applying = _compat.module_apply_call()
    root = applying[0] if applying is not None else None
    path = None
    if root is not None:
        named = [
            *root.named_parameters(remove_duplicate=False),
            *root.named_buffers(remove_duplicate=False),
        ]
        path = next((name for name, other in named if other is t), None)
    what = f"{type(root).__name__}'s {path!r}" if path is not None else "a deferred tensor"
    gone = ""
    if call == ".to_empty()" and applying is not None:
        reached = _record_emptied(t, *applying)
        if reached:
            gone = (
                f" to_empty() had emptied {len(reached)} tensors of the model before it "
                f"reached this one (first {reached[0]!r}), which hold uninitialised memory "
                "now: build the model again, reloading any real module it held."
            )
    raise DeferredCopyError(
        f"Cannot copy out of meta tensor: {call} of {what} ({t._watched_base.__name__} of shape "
        f"{tuple(t.shape)}, {t.dtype}), built under lightning_meta.deferred_init, which "
        "holds no values until lightning_meta.materialize gives it eager construction's. "
        "Fix: call lightning_meta.materialize(model, device=...) instead; in a Trainer, add "
        "lightning_meta.MetaGuard() to its callbacks; under Fabric, use "
        "lightning_meta.fabric_setup(fabric, model). Not to_empty(): it gives "
        "uninitialised memory." + gone,
        paths=[path] if path is not None else [],
    )


class _as_base:
    """Give a watched tensor its base class for the duration of a ``with`` block."""

    def __init__(self, t: Any) -> None:
        self.t, self.cls = t, type(t)

    def __enter__(self) -> None:
        self.t.__class__ = self.cls._watched_base

    def __exit__(self, *exc: object) -> None:
        self.t.__class__ = self.cls


_CLASSES: dict[type, type] = {}


def _new_as_base(cls: Any, *args: Any, **kwargs: Any) -> Any:
    # A tensor made "of the same class" as a deferred one (type(p)(data,
    # requires_grad), accelerate's set_module_tensor_to_device) is of its base:
    # the watch class belongs to the deferred tensor, not to what replaces it.
    return cls._watched_base(*args, **kwargs)


def watch(t: torch.Tensor) -> None:
    """Give the deferred meta tensor ``t`` a class whose ``.data`` shares its version counter.

    Only ``torch.Tensor`` and ``nn.Parameter`` classes: another subclass has
    its own ``__torch_function__`` and ``.data`` (left as it is; the gap is in
    ``docs/guarantees.md``).
    """
    cls = type(t)
    if issubclass(cls, _Watched) or not (cls is torch.Tensor or issubclass(cls, nn.Parameter)):
        return
    watched = _CLASSES.get(cls)
    if watched is None:
        body: dict[str, Any] = {
            "__slots__": (),
            "_watched_base": cls,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__new__": _new_as_base,
        }
        watched = type(cls.__name__, (_Watched, cls), body)
        _CLASSES[cls] = watched
    try:
        t.__class__ = watched
    except TypeError:
        return  # a Parameter subclass with slots of its own: its layout differs
    _CASTS.pop(id(t), None)  # of a tensor that had this id before


def unwatch(t: torch.Tensor) -> None:
    """Give ``t`` its own class back (it is no longer deferred)."""
    cls = type(t)
    if issubclass(cls, _Watched):
        t.__class__ = cls._watched_base
        _CASTS.pop(id(t), None)


def casts(t: torch.Tensor) -> list[torch.dtype]:
    """The dtypes ``t`` was cast to since it was watched, in order, ending in ``t.dtype``.

    Just ``[t.dtype]`` where no cast went through ``.data =`` (torch's
    ``swap_tensors`` conversions, with ``torch.__future__``'s swap flag on).
    """
    chain = _CASTS.get(id(t))
    return list(chain) if chain and chain[-1] == t.dtype else [t.dtype]


def note_casts(t: torch.Tensor, chain: list[torch.dtype]) -> None:
    """Give the watched ``t`` the casts :func:`casts` gave for the tensor it is a copy of."""
    if len(chain) > 1 and isinstance(t, _Watched):
        _CASTS[id(t)] = list(chain)


def tensor_class(t: torch.Tensor) -> type:
    """The class of ``t`` as model code made it (a deferred tensor's watch class left out)."""
    cls = type(t)
    base: type = cls._watched_base if issubclass(cls, _Watched) else cls
    return base
