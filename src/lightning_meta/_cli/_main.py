"""The ``lightning-meta`` command line (also ``python -m lightning_meta``).

Each sub-command lives in a module of its own that exposes
``add_parser(subparsers)`` and ``run(args) -> int``; this module wires them
together, so importing it stays cheap, and is the one place that turns an
exception into an exit status and a message (:func:`run_command`).

Exit status, for every sub-command:

* ``0``: done, nothing wrong found;
* ``1``: a problem was found in the model, its inputs or the file (the
  command names it), or the command failed on the model for a reason of its
  own (an unexpected exception, a ``sys.exit`` in the model's forward), or
  standard output cannot take the report (a full disk: :func:`writing_output`);
* ``2``: the command line is wrong (an unknown option or value, a bad
  ``--input`` spec, an unknown device), or the TARGET cannot be imported or
  built (whatever its code raises, ``sys.exit`` included);
* ``130``: interrupted (Ctrl-C);
* ``141``: standard output was closed by its reader (``| head``), with no
  message.

Every failure is one message on standard error, without a traceback (set the
environment variable ``LIGHTNING_META_TRACEBACK=1`` to add it); with
``--json``, standard output then stays empty. That holds for a command line
argparse refuses too (:class:`Parser`): one line naming the sub-command and
pointing at its ``--help``, instead of argparse's usage block.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TextIO

from lightning_meta._errors import (
    ArgumentTypeError,
    ArgumentValueError,
    MetaTensorError,
    MetaTensorWarning,
)

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_USAGE",
    "TargetError",
    "exit_status",
    "main",
    "report_failure",
    "run_command",
]

EXIT_OK = 0
#: a problem found in the model, its inputs or the file
EXIT_PROBLEM = 1
#: a bad command line, or a TARGET that cannot be imported or built
EXIT_USAGE = 2
#: stopped by Ctrl-C (the shell's convention, 128 + SIGINT)
EXIT_INTERRUPTED = 130
#: standard output closed by its reader (`| head`): the shell's convention, 128 + SIGPIPE
EXIT_BROKEN_PIPE = 141

# sub-command name -> module implementing it
_COMMANDS: dict[str, str] = {
    "check": "lightning_meta._cli._check",
    "estimate": "lightning_meta._cli._estimate",
    "load-check": "lightning_meta._cli._load",
}

_TRACEBACK_ENV = "LIGHTNING_META_TRACEBACK"


class TargetError(MetaTensorError):
    """A command-line TARGET (or its arguments) cannot be imported or built: exit status 2.

    Raised by :mod:`lightning_meta._cli._target`, whatever the user's code
    raised (``SystemExit`` included), with the original as ``__cause__``.
    """


def exit_status(e: BaseException) -> int:
    """Return the exit status for exception ``e`` escaping a sub-command.

    ``ArgumentTypeError`` / ``ArgumentValueError`` (a bad option or value)
    and ``TargetError`` (a TARGET that cannot be imported or built) give
    :data:`EXIT_USAGE`; ``KeyboardInterrupt`` gives :data:`EXIT_INTERRUPTED`;
    every other exception, :class:`~lightning_meta.MetaTensorError` or not,
    gives :data:`EXIT_PROBLEM`.

    Example::

        >>> from lightning_meta._errors import ArgumentValueError, MetaTensorError
        >>> exit_status(ArgumentValueError("bad")), exit_status(MetaTensorError("bad"))
        (2, 1)
    """
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if _broken_pipe(e):
        return EXIT_BROKEN_PIPE
    if isinstance(e, (ArgumentTypeError, ArgumentValueError, TargetError)):
        return EXIT_USAGE
    return EXIT_PROBLEM


def write_out(text: str) -> None:
    """Write a command's own output (its JSON document) to standard output, if it has one:
    with descriptor 1 closed (``>&-``) or under ``pythonw``, ``sys.stdout`` is ``None``
    and the exit status alone is the answer, as ``check``'s table (rich) already did
    (``estimate`` and ``load-check`` failed there, "unexpected AttributeError", blamed on
    the model, before 2026-12-07, fourth session)."""
    if sys.stdout is not None:
        sys.stdout.write(text)


class OutputError(MetaTensorError):
    """Standard output cannot take the command's report (a full disk, ``> /dev/full``): exit 1."""


@contextlib.contextmanager
def writing_output() -> Iterator[None]:
    """Write the command's report in the body: an ``OSError`` there (standard output full
    or failing) is standard output's, said so, not "unexpected" and blamed on the model
    (before 2026-12-07, fifth session). A reader closing the pipe stays exit 141."""
    try:
        yield
        if sys.stdout is not None:
            sys.stdout.flush()  # what the buffer still holds fails here, not at exit
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        reason = e.strerror or str(e)
        raise OutputError(
            f"cannot write the report to standard output ({reason}). Fix: send it where "
            "there is room (> another file), or free space there."
        ) from e


def _broken_pipe(e: BaseException) -> bool:
    """Whether ``e`` is standard output closed by its reader (``lightning-meta ... | head``):
    a ``BrokenPipeError``, or the ``SystemExit(1)`` rich raises on one (its ``__context__``)."""
    return isinstance(e, BrokenPipeError) or (
        isinstance(e, SystemExit) and isinstance(e.__context__, BrokenPipeError)
    )


def _message(e: BaseException) -> str:
    if isinstance(e, MetaTensorError):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted."
    if isinstance(e, MetaTensorWarning):
        # a warning the process's filters turn into an error (python -W error, PYTHONWARNINGS)
        return (
            f"{str(e).rstrip('.')} (a MetaTensorWarning, raised as an error by this process's "
            "warning filters, such as python -W error or PYTHONWARNINGS=error; without them it "
            "is a warning)."
        )
    if isinstance(e, SystemExit):
        # the package never exits: the model's own code did, after it was built
        return (
            f"the model's code called sys.exit({e.code!r}) while the command ran. Fix: raise an "
            "exception instead of exiting, or guard that call."
        )
    text = " ".join(str(e).split())
    return (
        f"unexpected {type(e).__name__}{': ' + text if text else ''} (raised by the model's "
        f"code or by lightning-meta; set {_TRACEBACK_ENV}=1 to see where)."
    )


def report_failure(command: str, e: BaseException) -> int:
    """Print ``e`` as one message on standard error and return its exit status.

    The message is ``lightning-meta COMMAND: error: ...``; with the
    environment variable ``LIGHTNING_META_TRACEBACK=1``, the traceback comes
    first. For sub-commands that catch an exception themselves and want the
    same words and status as :func:`run_command` gives.
    """
    status = exit_status(e)
    if status == EXIT_BROKEN_PIPE:
        # Not a failure: the reader took what it wanted (`| head -1`). Nothing
        # more is written to the closed pipe (Python's advice: point stdout at
        # devnull, so its flush at exit does not raise again).
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return status
    try:
        if os.environ.get(_TRACEBACK_ENV, "") not in ("", "0"):
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        from rich.console import Console

        message = _message(e).removeprefix(f"{command}: ")  # the API's own prefix, once is enough
        Console(stderr=True).print(
            f"lightning-meta {command}: error: {message}",
            style="red",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    except Exception:  # a closed or broken stderr must not hide the status  # pragma: no cover
        pass
    return status


def run_command(command: str, body: Callable[[], int]) -> int:
    """Run ``body`` (a sub-command) and return its exit status, or that of what it raised.

    Every exception, ``SystemExit`` and ``KeyboardInterrupt`` included,
    becomes one message on standard error (:func:`report_failure`) and the
    status of :func:`exit_status`; nothing escapes as a traceback.
    ``main`` runs every sub-command through it.

    Example::

        >>> from lightning_meta._errors import ArgumentValueError
        >>> def bad() -> int:
        ...     raise ArgumentValueError("--depth must be >= 0")
        >>> run_command("demo", bad)
        2
    """
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _shown_for(command, warnings.showwarning)
            return int(body())
    except BaseException as e:  # the one place a failure becomes a status
        return report_failure(command, e)


def _shown_for(command: str, show: Callable[..., None]) -> Callable[..., None]:
    """Show the package's own warnings as one line of the command's, others as Python does.

    Python's format names the line of the CLI's code that called the API
    (``.../_cli/_estimate.py:392: MetaTensorWarning: ...`` and that line
    again), which says nothing to a user of the command.
    """

    def shown(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, MetaTensorWarning):
            text = str(message).removeprefix(f"{command}: ")  # the API's name, the command's
            print(f"lightning-meta {command}: warning: {text}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return shown


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, as every other failure is.

    ``lightning-meta estimate: error: unrecognized arguments: --bogus. Fix:
    see 'lightning-meta estimate --help'.`` on standard error, exit status 2
    (argparse would print the usage block first). Sub-parsers are of this
    class too (argparse makes them of their parent's class); ``commands``
    maps each sub-command's name to its parser.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line on standard error and exit with status 2."""
        self.exit(
            EXIT_USAGE,
            f"{self.prog}: error: {message.rstrip('.')}. Fix: see '{self.prog} --help'.\n",
        )


def _version() -> str:
    """This package's version with those of torch and Lightning it runs with."""
    from importlib.metadata import version

    import torch

    import lightning_meta

    # torch's own version string names its build (+cpu, +cu124); the metadata may not.
    return (
        f"lightning-meta {lightning_meta.__version__} (torch {torch.__version__}, "
        f"lightning {version('lightning')}, Python {sys.version.split()[0]})"
    )


def build_parser() -> Parser:
    """Return the argument parser with every sub-command registered."""
    parser = Parser(
        prog="lightning-meta",
        description="Meta-device modules that just work in PyTorch Lightning.",
        epilog=(
            "Exit status: 0 ok; 1 a problem found in the model, its inputs or the file; "
            "2 a bad command line, or a TARGET that cannot be imported or built; 130 interrupted; "
            "141 standard output closed by its reader (| head)."
        ),
    )
    parser.add_argument(
        "--version",
        action="version",
        version=_version(),
        help="print the versions of lightning-meta, torch, Lightning and Python (for a bug report)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    parser.commands.update(subparsers.choices)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status (see the module's docstring).

    ``--help`` returns 0 and a command line argparse refuses returns 2,
    rather than exiting.
    """
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            # argparse blames the top-level parser for a sub-command's unknown
            # option; the sub-command's own parser names it and its --help
            parser.commands.get(args.command, parser).error(
                f"unrecognized arguments: {' '.join(unknown)}"
            )
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    module = importlib.import_module(_COMMANDS[args.command])
    return run_command(args.command, lambda: module.run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
