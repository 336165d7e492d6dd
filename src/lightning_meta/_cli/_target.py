"""Resolve a command-line TARGET (``package.module:Name`` or ``path/to/file.py:Name``).

Used by the ``estimate``, ``check`` and ``load-check`` sub-commands:
:func:`load_target` finds the object, :func:`parse_arguments` reads its JSON
arguments, and :func:`target_factory` combines both into a zero-argument
callable that builds the model.

Whatever the user's code does while it is imported or builds the model
(raises any exception, calls ``sys.exit``, raises a ``BaseException`` of its
own) becomes a :class:`TargetError` naming the target, which the command line
turns into exit status 2; only ``KeyboardInterrupt`` passes through. What it
prints goes to standard error (:func:`user_code`), so that standard output
holds only the command's own output.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lightning_meta._cli._main import TargetError
from lightning_meta._errors import MetaTensorError

__all__ = [
    "TargetError",
    "guarded_build",
    "import_file",
    "load_target",
    "names_a_file",
    "parse_arguments",
    "target_factory",
    "user_code",
]

_SYNTAX = "'package.module:Name' or 'path/to/file.py:Name'"


def _fail(spec: str, problem: str, fix: str) -> TargetError:
    # a problem quoting a message ends with its own full stop: one is enough
    return TargetError(f"target {spec!r}: {problem.rstrip('.')}. Fix: {fix.rstrip('.')}.")


@contextlib.contextmanager
def user_code() -> Iterator[None]:
    """Send what the user's code prints to standard error while the body runs.

    Standard output then holds only what the command itself writes (the JSON
    document with ``--json``): ``print`` is redirected, and so is file
    descriptor 1 itself, for what is written below Python (a subprocess the
    model starts, C code's ``printf``; C's buffers are flushed before it is
    put back).
    """
    if sys.stdout is not None:  # None under pythonw, or with descriptor 1 closed
        with contextlib.suppress(ValueError):  # a closed stream: nothing to flush
            sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 (closed): nothing below Python can reach it either
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.stderr.flush()
            _flush_c_streams()
            os.dup2(saved, 1)
            os.close(saved)


def _flush_c_streams() -> None:
    # C's stdout buffer, filled while descriptor 1 was standard error, would
    # otherwise be written to standard output at exit, inside the JSON.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


def _raised(e: BaseException) -> str:
    """Say what ``e`` is, for 'importing X ...' / 'building X ...': one line."""
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r})"
    text = " ".join(str(e).split())
    kind = type(e).__name__ if isinstance(e, Exception) else f"{type(e).__name__} (a BaseException)"
    return f"raised {kind}: {text}" if text else f"raised {kind}"


def _import_fix(e: BaseException, what: str) -> str:
    if isinstance(e, SystemExit):
        return f'put the script part of {what} under `if __name__ == "__main__":`'
    return f"fix the error in {what}"


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


def _shadowed(name: str, root: Path) -> str | None:
    """What importing the file at ``root`` as ``name`` would get wrong, if anything: a
    package of the same name beside it (imported instead of the file), or an installed
    package of the same top-level name (hidden from everything imported later: rich,
    which the report is printed with; yaml).

    Only installed packages (``site-packages``) count: a file named after a standard
    library module nothing imports (``test.py``) or a module in the working directory
    imports as before. A file inside a package whose installed copy holds the same file
    (the user's own package, also ``pip install``-ed) imports the local one, as
    ``python -m`` from the project's root would; any other installed module of that name
    is refused, since what the process imports later is not known beforehand (torchmetrics
    imports transformers, which imports click, when they are installed).
    """
    top = name.partition(".")[0]
    if "." not in name and (root / top / "__init__.py").is_file():
        return f"the package {str(root / top)!r} beside it, which Python imports instead"
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if found is None or found.origin is None or not found.has_location:
        return None  # nothing installed there, or a namespace package
    origin = Path(found.origin).resolve()
    if not {"site-packages", "dist-packages"} & set(origin.parts):
        return None
    ours = {(root / f"{top}.py").resolve(), (root / top / "__init__.py").resolve()}
    if origin in ours:
        return None
    if "." in name and origin.name == "__init__.py":
        *inner, leaf = name.split(".")[1:]
        if origin.parent.joinpath(*inner, f"{leaf}.py").is_file():
            return None  # an installed copy of the same package
    return f"the installed module at {str(origin)!r}, which it hides"


def import_file(path: str | Path, *, spec: str | None = None) -> Any:
    """Import the Python file at ``path`` as a regular module and return it.

    The module is registered in ``sys.modules`` under its own name (the file's
    stem, or its dotted name inside packages), so classes defined there pickle
    and unpickle in this process. ``sys.path`` is extended only while the file
    is imported.

    Raises:
        TargetError: if the file does not exist, fails to import (whatever it
            raises, ``SystemExit`` included), or its name is taken by a
            different module already imported.
    """
    label = spec or str(path)
    file = Path(path).expanduser().resolve()
    if not file.is_file() or file.suffix != ".py":
        raise _fail(
            label, f"no Python file at {str(path)!r}", "give the path of an existing .py file"
        )
    if "." in file.stem:
        raise _fail(
            label,
            f"the file name {file.name!r} has a dot before '.py', which Python's import "
            "reads as a package",
            f"rename it (e.g. {file.stem.replace('.', '_')}.py)",
        )
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
    shadowed = _shadowed(name, root)
    if shadowed is not None:
        raise _fail(
            label,
            f"its module name {name.partition('.')[0]!r} is also the name of {shadowed}",
            f"rename {file.name}"
            if "." not in name
            else f"rename the package {str(root / name.partition('.')[0])!r}",
        )
    added = str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    try:
        with user_code():
            return importlib.import_module(name)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit and the user's own BaseExceptions too
        raise _fail(
            label, f"importing {str(file)!r} {_raised(e)}", _import_fix(e, "that file")
        ) from e
    finally:
        if added and str(root) in sys.path:
            sys.path.remove(str(root))


def names_a_file(where: str) -> bool:
    """Whether the part of a ``MODULE:NAME`` spec before the colon is a file's path
    (``model.py``, ``src/model``), not a module's dotted name."""
    return where.endswith(".py") or "/" in where or "\\" in where


def load_target(spec: str) -> Any:
    """Return the object named by ``spec`` (a class, a function, a module instance).

    Args:
        spec: ``"package.module:Name"`` or ``"path/to/file.py:Name"``;
            ``Name`` may be dotted (``"Outer.Inner"``).

    Raises:
        TargetError: naming the target and the fix, if the syntax is wrong,
            the module cannot be imported (whatever it raises, ``SystemExit``
            included) or has no such name.

    Example::

        >>> load_target("torch.nn:Linear")
        <class 'torch.nn.modules.linear.Linear'>
    """
    where, sep, attr = spec.rpartition(":")
    # a Windows drive letter ("C:\\model.py") is not a separator
    if not sep or not where or not attr or (len(where) == 1 and attr.startswith(("\\", "/"))):
        raise _fail(spec, "expected MODULE:NAME", f"write the target as {_SYNTAX}")
    if names_a_file(where):
        module = import_file(where, spec=spec)
    else:
        try:
            with user_code():
                module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise _fail(
                spec,
                f"no module named {e.name!r}",
                f"install it, add its directory to PYTHONPATH, or use {_SYNTAX}",
            ) from e
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # SystemExit and the user's own BaseExceptions too
            raise _fail(
                spec, f"importing {where!r} {_raised(e)}", _import_fix(e, "that module")
            ) from e
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
        TargetError: if the text is not valid JSON or the file is missing.

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
        except (OSError, UnicodeDecodeError) as e:
            raise TargetError(
                f"target arguments {text!r}: cannot read the file: {e}. Fix: give the path of "
                "a readable JSON file after '@'."
            ) from e
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        raise TargetError(
            f"target arguments {text!r} are not valid JSON ({e}). Fix: pass a JSON list of "
            """positional arguments or an object of keyword arguments, e.g. '{"hidden": 64}'."""
        ) from e
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    return [value], {}


def guarded_build(
    spec: str, build: Callable[[], Any], *, arguments: str = "--args"
) -> Callable[[], Any]:
    """Return ``build`` wrapped so that whatever it raises becomes a :class:`TargetError`.

    ``SystemExit`` and the user's own ``BaseException`` subclasses included;
    ``KeyboardInterrupt`` passes through. What the build prints goes to
    standard error. The wrapper keeps the name ``spec`` for messages;
    ``arguments`` names where the command takes the constructor's arguments
    (``"--args"``, ``"ARGS_JSON"``, ``"--hf-config"``), for the fix. Built
    under ``torch.device("meta")`` (``estimate``, ``load-check --init
    meta``), the message says so; a :class:`~lightning_meta.MetaTensorError`
    whose message has its own "Fix:" keeps it as the only one.

    Example::

        >>> import sys
        >>> guarded_build("demo:exits", lambda: sys.exit(3))()
        Traceback (most recent call last):
        ...
        lightning_meta._cli._main.TargetError: target 'demo:exits': building it called sys.exit(3)...
    """

    def guarded() -> Any:
        try:
            with user_code():
                return build()
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            from lightning_meta._compat import default_device, is_torch_meta_error

            on_meta = default_device().type == "meta"
            if isinstance(e, MetaTensorError) and "Fix:" in str(e):
                # the package's own refusal already says what to do; say where it ran
                where = (
                    " under torch.device('meta') (where this command builds models, shape only)"
                    if on_meta
                    else ""
                )
                raise TargetError(
                    f"target {spec!r}: building it{where} {_raised(e)}", paths=e.paths
                ) from e
            problem = f"building it {_raised(e)}" + (
                " (run under torch.device('meta'))" if on_meta else ""
            )
            if isinstance(e, SystemExit):
                fix = "make the constructor return the model instead of exiting"
            else:
                fix = f"fix the model's constructor or the arguments it gets ({arguments})"
                if isinstance(e, TypeError) and "required" in str(e) and "argument" in str(e):
                    # Lightning's pattern: save_hyperparameters(ignore=["backbone"]) and
                    # load_from_checkpoint(path, backbone=...), which JSON cannot spell
                    fix += (
                        "; an argument JSON cannot hold (a module, such as a backbone left out "
                        "of save_hyperparameters) needs a factory: point TARGET at a function "
                        "of yours that builds the model with it, e.g. mymodule:build with "
                        "def build(num_classes=3): return MyModel(backbone=nn.Linear(8, 8), "
                        "num_classes=num_classes), and give the rest with --args"
                    )
            if on_meta and is_torch_meta_error(e):
                fix += (
                    "; on meta it must not read tensor values (.item(), .tolist(), printing "
                    "tensors, data-dependent branches)"
                )
            raise _fail(spec, problem, fix) from e

    guarded.__qualname__ = spec
    return guarded


def target_factory(
    spec: str, arguments: str | None = None, *, given_by: str = "--args"
) -> Callable[[], Any]:
    """Return a zero-argument callable that builds the target with its JSON arguments.

    A module instance defined at module level is returned as is by the
    callable, and takes no arguments; any other object that is not callable
    (a constant) is refused.
    ``given_by`` names the command's option (or positional) that carries
    ``arguments``, for messages.

    Raises:
        TargetError: as :func:`load_target` and :func:`parse_arguments`, if
            the target is neither callable nor a module, or if arguments are
            given for a target that is not callable. The
            callable raises it too if building fails (see :func:`guarded_build`).
    """
    from torch import nn

    obj = load_target(spec)
    args, kwargs = parse_arguments(arguments)
    if not callable(obj) and not isinstance(obj, nn.Module):
        shown = repr(obj)
        raise _fail(
            spec,
            f"it is {shown if len(shown) <= 40 else shown[:37] + '...'}, of type "
            f"{type(obj).__name__}, not a model",
            "point TARGET at an nn.Module (or LightningModule) class, a function that "
            "returns one, or a module instance",
        )
    if not callable(obj) or (hasattr(obj, "forward") and not isinstance(obj, type)):
        if args or kwargs:
            raise _fail(
                spec,
                f"it is a {type(obj).__name__} instance, which takes no arguments",
                "drop the arguments",
            )

        def instance() -> Any:
            return obj

        instance.__qualname__ = spec  # messages name the target, not this function
        return instance
    return guarded_build(spec, lambda: obj(*args, **kwargs), arguments=given_by)
