"""Say where a recording failed: the user's ``file:line`` and the tensor's dotted path.

Everything :class:`~lightning_meta._deferred._recorder.Recorder` and the
placeholder generator of :mod:`~lightning_meta._deferred._rng` cannot record
exactly is refused at record time with one message shape, built here:
``deferred_init cannot record <op> [on '<Model.path>'] issued at <file:line>:
it <what>. Fix: <fix>.``
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator
from types import CodeType
from typing import NamedTuple

import torch
from torch import nn

from lightning_meta import _compat, _watched
from lightning_meta._errors import MaterializationError
from lightning_meta._slots import buffer_names, parameter_names, tensor_at

__all__ = [
    "TensorPath",
    "caught_refusal",
    "forget_refusal",
    "note_refusal",
    "path_of",
    "recording_error",
    "refusals_noted",
    "torch_refusal",
    "user_site",
]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Wrappers between the user's line and the op: the stdlib's, typing_extensions'
# @deprecated (torch.nn.utils.weight_norm), this package's patched Parameter
# constructor (nn.Parameter() itself calls torch.empty), and a deferred
# tensor's .data and detach() (see _watched).
_STDLIB_WRAPPERS = (
    os.sep + "contextlib.py",
    os.sep + "functools.py",
    os.sep + "typing_extensions.py",
    os.path.abspath(_compat.__file__),
    os.path.abspath(_watched.__file__),
)
# The methods through which torch hands a call to a mode or tensor subclass.
_INTERCEPTORS = frozenset({"__torch_function__", "__torch_dispatch__"})
# Whether a code object is torch's, this subpackage's or a stdlib wrapper's:
# cached, since an op reading a captured real tensor asks on every call.
_INTERNAL: dict[CodeType, bool] = {}


# ``file:line`` by (code object, instruction offset): a model issues the same
# few call sites again and again (one per layer), and ``frame.f_lineno``
# decodes the line table on every read.
_SITES: dict[tuple[CodeType, int], str] = {}


def user_site(depth: int = 1) -> str:
    """Return ``file:line`` of the innermost frame outside torch and this subpackage.

    Args:
        depth: the frame to start from (1: the caller). Frames of torch, of
            this subpackage, of wrappers (``contextlib``, ``functools``,
            ``typing_extensions``' ``@deprecated``, ``_compat``) and of any
            ``__torch_function__`` / ``__torch_dispatch__`` are skipped,
            so any start at or below the user's frame gives the same answer.

    Returns:
        ``"path/to/file.py:LINE"``, or ``"<unknown>"`` when every frame is internal.
    """
    frame = sys._getframe(depth)
    while frame is not None:
        code = frame.f_code
        internal = _INTERNAL.get(code)
        if internal is None:
            name = code.co_filename
            internal = (
                name.startswith((_TORCH_DIR, _OWN_DIR))
                or name.endswith(_STDLIB_WRAPPERS)
                # A mode or subclass passing the call on (Lightning's _EmptyInit,
                # active in fabric.init_module() and around configure_model).
                or code.co_name in _INTERCEPTORS
            )
            _INTERNAL[code] = internal
        if not internal:
            key = (code, frame.f_lasti)
            site = _SITES.get(key)
            if site is None:
                site = _SITES[key] = f"{code.co_filename}:{frame.f_lineno}"
            return site
        frame = frame.f_back  # type: ignore[assignment]
    return "<unknown>"


class TensorPath(NamedTuple):
    """Where a recorded tensor lives: the outermost module's class and the dotted path in it."""

    root: str
    dotted: str

    def __str__(self) -> str:
        return f"{self.root}.{self.dotted}"


def path_of(
    tensor: torch.Tensor, modules: Iterable[nn.Module], sources: frozenset[int] = frozenset()
) -> TensorPath | None:
    """Return the path of the parameter or buffer of ``modules`` sharing ``tensor``'s storage.

    Failing that, the path of one whose storage is in ``sources`` (the storages
    ``tensor``'s value was computed from). Only used to word an error, so any
    failure to find it (a tensor that is not on a module yet, a half-built
    module) gives ``None``.
    """
    with contextlib.suppress(Exception):
        mods = list(modules)
        cdata = _compat.storage_id(tensor.untyped_storage())
        parents: dict[int, tuple[nn.Module, str]] = {}
        for m in mods:
            for child_name, child in m.named_children():
                parents[id(child)] = (m, child_name)
        for wanted in ({cdata}, sources):
            for m in mods:
                for name in (*parameter_names(m), *buffer_names(m)):
                    t = tensor_at(m, name)
                    if t is not None and _compat.storage_id(t.untyped_storage()) in wanted:
                        return _climb(m, name, parents)
    return None


def _climb(module: nn.Module, name: str, parents: dict[int, tuple[nn.Module, str]]) -> TensorPath:
    """Return the path of ``module.name`` from the outermost module above it."""
    parts = [name]
    node = module
    while id(node) in parents:
        node, child_name = parents[id(node)]
        parts.append(child_name)
    return TensorPath(type(node).__name__, ".".join(reversed(parts)))


def recording_error(
    op: str, what: str, fix: str, *, path: TensorPath | None = None
) -> MaterializationError:
    """Return the error for an op ``deferred_init`` cannot record, naming where it was issued.

    Args:
        op: the ATen op (``"aten.nonzero.default"``) or Python call refused.
        what: why, completing "it ..." (no final period).
        fix: what to do instead (no final period).
        path: the tensor concerned, if known; its dotted path goes to ``paths``.

    Returns:
        A :class:`MaterializationError` for the caller to raise.
    """
    where = f" on {str(path)!r}" if path is not None else ""
    error = MaterializationError(
        f"deferred_init cannot record {op}{where} issued at {user_site(2)}: it {what}. Fix: {fix}.",
        paths=(path.dotted,) if path is not None else (),
    )
    return note_refusal(error)


# The refusals made while a block records in this thread (None: no block open).
_NOTED = threading.local()


@contextlib.contextmanager
def refusals_noted(noted: list[MaterializationError]) -> Iterator[None]:
    """Note every refusal :func:`recording_error` makes in this thread in ``noted`` for the body.

    A refusal is a ``RuntimeError``, which model code may catch (``try: scale =
    float(w.max()) except Exception: scale = 1.0``) and go on: eager construction does
    not raise there, so the block then records another program than eager's, and
    ``materialize`` gave other values without an error. The block refuses at its end
    instead (:func:`caught_refusal`).
    """
    before = getattr(_NOTED, "refusals", None)
    _NOTED.refusals = noted
    try:
        yield
    finally:
        _NOTED.refusals = before


def note_refusal(error: MaterializationError) -> MaterializationError:
    """Note ``error``, a refusal about to be raised, where a block records in this thread."""
    refusals = getattr(_NOTED, "refusals", None)
    if refusals is not None:
        refusals.append(error)
    return error


def forget_refusal(error: MaterializationError) -> None:
    """Take back a noted refusal that the package itself replaced by another error (torch's own,
    which eager construction raises too)."""
    refusals = getattr(_NOTED, "refusals", None)
    if refusals is not None:
        for i, noted in enumerate(refusals):
            if noted is error:
                del refusals[i]
                break


def caught_refusal(first: MaterializationError) -> MaterializationError:
    """The error a block raises at its end when model code caught ``first``, a refusal."""
    said = str(first).splitlines()[0] if str(first) else type(first).__name__
    return MaterializationError(
        "deferred_init refused an op inside the block, and the model's own code caught the "
        "refusal (a try/except around it) and went on: eager construction does not raise "
        "there, so the code after it ran down another path than eager's, and materialize "
        "would give other values. Fix: what the caught refusal says, or build this part of "
        f"the model outside deferred_init and assign it afterwards. The caught refusal: {said}",
        paths=first.paths,
    )


def _raised_at(e: BaseException) -> str:
    """Return ``file:line`` of the innermost frame of ``e``'s traceback outside torch and this package."""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        name = frame.filename
        if not (name.startswith((_TORCH_DIR, _OWN_DIR)) or name.endswith(_STDLIB_WRAPPERS)):
            return f"{name}:{frame.lineno}"
    return "<unknown>"


def _torch_call(e: BaseException) -> str | None:
    """The innermost line of torch's own Python in ``e``'s traceback (``file:line: code``),
    where torch called the C++ that failed; ``None`` when the user's code called it."""
    frames = traceback.extract_tb(e.__traceback__)
    while frames and frames[-1].filename.startswith(_OWN_DIR):
        frames.pop()  # the block's TorchFunctionMode passing torch's call on
    if not frames or not frames[-1].filename.startswith(_TORCH_DIR):
        return None
    last = frames[-1]
    where = os.path.relpath(last.filename, os.path.dirname(_TORCH_DIR.rstrip(os.sep)))
    return f"{where}:{last.lineno}: {(last.line or '').strip()}"


def torch_refusal(e: BaseException) -> MaterializationError | None:
    """Return the package's error for torch failing on the block's fake tensors outside dispatch.

    What torch's C++ does without an ATen call the recorder sees: reading a
    tensor's memory (``torch.tensor([t0, t1])``, an op without a fake kernel
    such as ``torch.quasirandom.SobolEngine``'s), making a tensor subclass
    (``t.as_subclass(MyTensor)``), swapping tensors the block holds weak
    references to (``torch.utils.swap_tensors``). ``None`` when ``e`` is none of these.
    """
    if _compat.is_unallocated_read(e):
        inner = _torch_call(e)
        if inner is not None:
            how = (
                f"torch's own code at {inner}, which reads the memory of tensors it made (an "
                "op without a FakeTensor kernel)"
            )
            fix = (
                "build this part of the model outside deferred_init and assign it afterwards "
                "(or after materialize)"
            )
        else:
            how = "torch.tensor() or torch.as_tensor() of tensors, or a list of them"
            fix = (
                "combine tensors with torch.stack or torch.cat, compute the values from "
                "Python numbers, or build this part of the model outside deferred_init and "
                "assign it afterwards"
            )
        return MaterializationError(
            f"deferred_init cannot record a read of tensor values by torch's C++ code "
            f"({how}) issued at {_raised_at(e)}: the tensors of a deferred_init block hold no "
            f"data. Fix: {fix}."
        )
    if _compat.is_weakref_swap_refusal(e):
        return MaterializationError(
            f"deferred_init cannot record torch.utils.swap_tensors issued at {_raised_at(e)}: "
            "the block keeps a weak reference to every tensor it makes (to find it again at "
            "materialize), and swap_tensors refuses a tensor with one. Fix: swap what the "
            "modules hold instead (self.a.weight, self.b.weight = self.b.weight, "
            "self.a.weight), or call torch.utils.swap_tensors after materialize."
        )
    if _compat.is_subclass_refusal(e) and "Uninitialized" not in str(e):  # lazy modules: _block
        return MaterializationError(
            f"deferred_init cannot record making a tensor subclass (Tensor.as_subclass, "
            f"Tensor._make_subclass) issued at {_raised_at(e)}: the tensors of a deferred_init "
            "block are FakeTensors, which cannot become another class. Fix: keep a plain "
            "tensor in the module and wrap it in forward, or build this tensor after "
            "materialize and assign it then."
        )
    if _compat.is_share_memory_refusal(e):
        what = "Tensor.share_memory_()"
        tb = e.__traceback__
        while tb is not None:  # the outermost Module.share_memory() names the module
            code = tb.tb_frame.f_code
            if code.co_name == "share_memory" and code.co_filename.startswith(_TORCH_DIR):
                what = f"{type(tb.tb_frame.f_locals.get('self')).__name__}.share_memory()"
                break
            tb = tb.tb_next
        return MaterializationError(
            f"deferred_init cannot record {what} issued at {_raised_at(e)}: the tensors of a "
            "deferred_init block hold no memory to share, and materialize would give "
            "tensors that are not shared. Fix: call share_memory() on the module after "
            "materialize (or after MetaGuard or fabric_setup has materialized it)."
        )
    return None
