"""Resolve a command-line TARGET (``package.module:Name`` or ``path/to/file.py:Name``).

Used by the ``estimate`` and ``check`` sub-commands: :func:`load_target` finds
the object, :func:`parse_arguments` reads its JSON arguments, and
:func:`target_factory` combines both into a zero-argument callable that builds
the model.
"""

from __future__ import annotations

import difflib
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_meta._errors import MetaTensorError

__all__ = ["import_file", "load_target", "parse_arguments", "target_factory"]

_SYNTAX = "'package.module:Name' or 'path/to/file.py:Name'"


def _fail(spec: str, problem: str, fix: str) -> MetaTensorError:
    return MetaTensorError(f"target {spec!r}: {problem}. Fix: {fix}.")


def _module_name(path: Path) -> tuple[str, Path]:
    """Return the dotted module name of ``path`` and the directory to import it from.

    A file inside packages (directories with ``__init__.py``) is named from the
    outermost one, so its relative imports work.
    """
    parts = [path.stem]
    root = path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    return ".".join(parts), root


def import_file(path: str | Path, *, spec: str | None = None) -> Any:
    """Import the Python file at ``path`` as a regular module and return it.

    The module is registered in ``sys.modules`` under its own name (the file's
    stem, or its dotted name inside packages), so classes defined there pickle
    and unpickle in this process. ``sys.path`` is extended only while the file
    is imported.

    Raises:
        MetaTensorError: if the file does not exist, fails to import, or its
            name is taken by a different module already imported.
    """
    label = spec or str(path)
    file = Path(path).expanduser().resolve()
    if not file.is_file() or file.suffix != ".py":
        raise _fail(label, f"no Python file at {str(path)!r}", "give the path of an existing .py file")
    name, root = _module_name(file)
    loaded = sys.modules.get(name)
    if loaded is not None:
        loaded_file = getattr(loaded, "__file__", None)
        if loaded_file is not None and Path(loaded_file).resolve() == file:
            return loaded
        raise _fail(
            label,
            f"its module name {name!r} is already taken by {loaded_file or loaded!r}",
            f"rename {file.name} or import it as 'package.module:Name'",
        )
    added = str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(name)
    except Exception as e:
        raise _fail(label, f"importing {str(file)!r} raised {type(e).__name__}: {e}", "fix the error in that file") from e
    finally:
        if added:
            sys.path.remove(str(root))


def load_target(spec: str) -> Any:
    """Return the object named by ``spec`` (a class, a function, a module instance).

    Args:
        spec: ``"package.module:Name"`` or ``"path/to/file.py:Name"``;
            ``Name`` may be dotted (``"Outer.Inner"``).

    Raises:
        MetaTensorError: naming the target and the fix, if the syntax is wrong,
            the module cannot be imported or has no such name.

    Example::

        >>> load_target("torch.nn:Linear")
        <class 'torch.nn.modules.linear.Linear'>
    """
    where, sep, attr = spec.rpartition(":")
    # a Windows drive letter ("C:\\model.py") is not a separator
    if not sep or not where or not attr or (len(where) == 1 and attr.startswith(("\\", "/"))):
        raise _fail(spec, "expected MODULE:NAME", f"write the target as {_SYNTAX}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = import_file(where, spec=spec)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise _fail(
                spec,
                f"no module named {e.name!r}",
                f"install it, add its directory to PYTHONPATH, or use {_SYNTAX}",
            ) from e
        except Exception as e:
            raise _fail(spec, f"importing {where!r} raised {type(e).__name__}: {e}", "fix that module") from e
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([where, *attr.split(".")[:i]]) if i else where
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"use {' or '.join(repr(c) for c in close)}" if close else "check the name"
            raise _fail(spec, f"{owner!r} has no attribute {part!r}", hint)
        obj = getattr(obj, part)
    return obj


def parse_arguments(text: str | None) -> tuple[list[Any], dict[str, Any]]:
    """Parse the JSON arguments of a target: a list (positional), an object (keyword) or one value.

    ``text`` may also be ``@path/to/args.json``.

    Raises:
        MetaTensorError: if the text is not valid JSON or the file is missing.

    Example::

        >>> parse_arguments('{"hidden": 64}')
        ([], {'hidden': 64})
    """
    if text is None or not text.strip():
        return [], {}
    source = text
    if text.startswith("@"):
        try:
            source = Path(text[1:]).read_text()
        except OSError as e:
            raise MetaTensorError(f"target arguments {text!r}: cannot read the file: {e}.") from e
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        raise MetaTensorError(
            f"target arguments {text!r} are not valid JSON ({e}). Fix: pass a JSON list of "
            """positional arguments or an object of keyword arguments, e.g. '{"hidden": 64}'."""
        ) from e
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    return [value], {}


def target_factory(spec: str, arguments: str | None = None) -> Callable[[], Any]:
    """Return a zero-argument callable that builds the target with its JSON arguments.

    A target that is not callable (a module instance defined at module level)
    is returned as is by the callable, and takes no arguments.

    Raises:
        MetaTensorError: as :func:`load_target` and :func:`parse_arguments`, or
            if arguments are given for a target that is not callable.
    """
    obj = load_target(spec)
    args, kwargs = parse_arguments(arguments)
    if not callable(obj) or (hasattr(obj, "forward") and not isinstance(obj, type)):
        if args or kwargs:
            raise _fail(spec, f"it is a {type(obj).__name__} instance, which takes no arguments", "drop the arguments")
        return lambda: obj

    def build() -> Any:
        return obj(*args, **kwargs)

    build.__qualname__ = spec
    return build
