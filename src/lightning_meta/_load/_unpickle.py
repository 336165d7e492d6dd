"""Unpickling that runs no code: every global a pickle names is looked up in an allow-list.

Unpickling calls whatever the pickle names (``os.system``, a module's
``__reduce__`` target); the only way to make it safe is to hand out nothing
dangerous when the pickle asks for a global. :class:`SafeUnpickler` answers
each request (``GLOBAL``, ``STACK_GLOBAL``, ``INST``, ``OBJ``, ``EXT*``: the
standard library routes all of them through ``find_class``) from a
:class:`Policy`: a small table of harmless objects the format needs, stand-ins
written here for the rest (tensor rebuild functions that only *describe* a
tensor, records of a distributed checkpoint's metadata), and the caller's
``safe_globals``. Anything else gets an inert stand-in class and is reported:
unpickling goes on, so one error lists every global the file needs, and then
:func:`safe_load` refuses the file.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lightning_meta._arguments import spelled
from lightning_meta._errors import MetaTensorError

__all__ = ["Policy", "Record", "SafeUnpickler", "safe_load", "trusted_names", "unsafe_error"]

# Python 2 names the standard library maps when it unpickles (fix_imports).
_RENAMED_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class Refused:
    """An inert stand-in for a global the policy refuses; every pickle operation on it is a no-op."""

    __lightning_meta_refused__ = True

    def __new__(cls, *args: Any, **kwargs: Any) -> Refused:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        """Ignore ``value`` (the ``APPEND`` opcode)."""

    def extend(self, values: Any) -> None:
        """Ignore ``values`` (the ``APPENDS`` opcode)."""


class Record:
    """A stand-in for a class whose instances only carry data (a distributed checkpoint's metadata).

    Unpickling never runs the real class: ``args``, ``kwargs`` and ``state``
    keep what the pickle gave, for the reader to check and interpret.
    """

    cls_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def field(self, name: str, position: int | None = None) -> Any:
        """Return the field ``name`` from the state (a dict, or a tuple at ``position``), else ``None``."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            # (dict state, slots state)
            merged = dict(state[0] or {})
            merged.update(state[1])
            state = merged
        if isinstance(state, dict):
            return state.get(name)
        if isinstance(state, tuple) and position is not None and position < len(state):
            return state[position]
        if position is not None and position < len(self.args):
            return self.args[position]
        return self.kwargs.get(name)

    def __repr__(self) -> str:
        return f"<{self.cls_name} {self.state!r}>"


def record_class(full_name: str) -> type[Record]:
    """Return a fresh :class:`Record` subclass standing in for the class ``full_name``."""
    return type(full_name.rsplit(".", 1)[-1], (Record,), {"cls_name": full_name})


def trusted_names(safe_globals: Iterable[Any]) -> dict[str, Any]:
    """Map each of the caller's ``safe_globals`` to the ``module.Name`` a pickle calls it by.

    ``(obj, "module.Name")`` pairs name themselves; other objects are named
    by ``__module__`` and ``__qualname__`` (and ``__name__``).
    """
    out: dict[str, Any] = {}
    for item in safe_globals:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
            out[item[1]] = item[0]
            continue
        module = getattr(item, "__module__", None)
        for attr in ("__qualname__", "__name__"):
            name = getattr(item, attr, None)
            if isinstance(module, str) and isinstance(name, str):
                out[f"{module}.{name}"] = item
    return out


class Policy:
    """What a format's pickles may name: exact ``module.Name`` entries, then module prefixes.

    Args:
        exact: ``"module.Name"`` to the object handed out.
        prefixes: module prefix (``"torch.distributed.checkpoint."``) to a
            function of ``(module, name)`` returning the object, or ``None``
            to refuse.
        trusted: the caller's ``safe_globals`` (see :func:`trusted_names`),
            consulted last.
    """

    def __init__(
        self,
        exact: Mapping[str, Any],
        prefixes: Mapping[str, Callable[[str, str], Any]] | None = None,
        trusted: Mapping[str, Any] | None = None,
    ) -> None:
        self.exact = dict(exact)
        self.prefixes = dict(prefixes or {})
        self.trusted = dict(trusted or {})

    def with_trusted(self, safe_globals: Sequence[Any]) -> Policy:
        """Return this policy extended by the caller's ``safe_globals``."""
        return Policy(self.exact, self.prefixes, trusted_names(safe_globals))

    def resolve(self, module: str, name: str) -> tuple[bool, Any]:
        """Return ``(True, object)`` for an allowed global, ``(False, None)`` otherwise."""
        full = f"{module}.{name}"
        if full in self.exact:
            return True, self.exact[full]
        for prefix, make in self.prefixes.items():
            if f"{module}.".startswith(prefix):
                obj = make(module, name)
                if obj is not None:
                    return True, obj
        if full in self.trusted:
            return True, self.trusted[full]
        return False, None


class SafeUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose globals come from a :class:`Policy` only.

    Refused globals are collected in :attr:`refused` and replaced by inert
    stand-ins; ``persistent`` answers persistent ids (torch's storages), and
    a pickle with persistent ids and no ``persistent`` is invalid.
    """

    def __init__(
        self,
        file: Any,
        policy: Policy,
        persistent: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(file, encoding="utf-8")
        self.policy, self.persistent = policy, persistent
        self.refused: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        module = _RENAMED_MODULES.get(module, module)
        allowed, obj = self.policy.resolve(module, name)
        if allowed:
            return obj
        self.refused.append(f"{module}.{name}")
        return type(name if name.isidentifier() else "Refused", (Refused,), {})

    def persistent_load(self, pid: Any) -> Any:
        if self.persistent is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self.persistent(pid)


def unsafe_error(where: str, names: Sequence[str], what: str) -> MetaTensorError:
    """Return the refusal of a pickle that names globals beyond the policy."""
    _allow = spelled(
        "with load_checkpoint(..., safe_globals=[TheClass, ...]) (the objects themselves, not "
        "their names)",
        "with --trust module:Name (once per name)",
    )
    needed = sorted(set(names))
    if any(n.startswith("__torch__.") for n in needed):
        # Classes TorchScript compiled into the archive: there is no object to trust.
        return MetaTensorError(
            f"{where!r} is a TorchScript archive (torch.jit.save): {what} names classes "
            f"compiled into the archive ({needed[0]}{', ...' if len(needed) > 1 else ''}), "
            "which no state dict reader loads, trusted or not. Fix: where you trust the "
            "file, load it with torch.jit.load(path, map_location='cpu') and save its "
            "weights, torch.save(scripted.state_dict(), 'weights.pt'), then load that (a "
            "module frozen with torch.jit.freeze keeps its weights as constants, in no "
            "state dict: load the weights saved before it was frozen).",
            paths=[where],
        )
    # On the command line, in the form --trust takes (module:Name).
    listed = spelled(repr(needed), repr([":".join(n.rsplit(".", 1)) for n in needed]))
    modules = ""
    if any(n.startswith("torch.nn.modules.") for n in needed):
        # Not always a whole model: a Lightning checkpoint keeps a loss module
        # in its hyperparameters beside the weights, which trusting loads.
        modules = (
            " Among them are torch.nn modules: the file holds a whole model saved with "
            "torch.save(model), alone or in a dict ({'model': model, 'epoch': 3}), or "
            "modules kept beside the weights (a loss in a checkpoint's hyperparameters); "
            "trusting them loads each such module's parameters and persistent buffers "
            "under its key, as its state_dict names them."
        )
    scripts = ""
    if any(n.startswith("__main__.") for n in needed):
        scripts = spelled(
            " Names in __main__ are classes of the script that saved the file: pass "
            "(TheClass, '__main__.TheClass') where TheClass is not defined in your own "
            "__main__.",
            " Names in __main__ are classes of the script that saved the file: trust them "
            "by that script's path (--trust path/to/script.py:TheClass).",
        )
    return MetaTensorError(
        f"{where!r} cannot be loaded with weights_only=True: unpickling {what} would construct "
        "objects other than tensors and plain containers, which can run arbitrary code. It "
        f"needs: {listed}. lightning_meta never unpickles arbitrary objects.{modules}{scripts} "
        f"Fix: if you trust this file, allow exactly those {_allow}, or re-save only the "
        "state_dict.",
        paths=[where],
    )


def safe_load(
    data: bytes | Any,
    policy: Policy,
    *,
    where: str,
    what: str,
    persistent: Callable[[Any], Any] | None = None,
    subject: str = "",
) -> Any:
    """Unpickle ``data`` (bytes, or a binary file positioned at the pickle) under ``policy``.

    Args:
        data: the pickle.
        policy: what it may name.
        where: the file, for messages.
        what: what the pickle is (``"its data.pkl"``), for messages.
        persistent: the persistent id handler, if the format has persistent ids.
        subject: what a damaged pickle's message says cannot be read
            (default: ``"'<where>' is not a valid checkpoint: <what>"``).

    Returns:
        The unpickled object.

    Raises:
        MetaTensorError: the pickle names globals ``policy`` does not allow
            (every one listed), or is not a valid pickle (truncated, a stray
            opcode, values of the wrong type for the stand-ins).
    """
    file = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    unpickler = SafeUnpickler(file, policy, persistent)
    try:
        obj = unpickler.load()
    except MetaTensorError:
        raise
    except Exception as e:  # any failure inside a pickle means a damaged or hostile file
        if unpickler.refused:
            raise unsafe_error(where, unpickler.refused, what) from e
        subject = subject or f"{where!r} is not a valid checkpoint: {what}"
        raise MetaTensorError(
            f"{subject} cannot be read (truncated or corrupt: {type(e).__name__}: {e}). "
            "Fix: save it again or download it again; the file on disk is incomplete or damaged.",
            paths=[where],
        ) from e
    if unpickler.refused:
        raise unsafe_error(where, unpickler.refused, what)
    return obj
