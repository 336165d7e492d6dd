"""The package's exception hierarchy.

Every error raised on bad input derives from :class:`MetaTensorError`, so a
caller can catch the whole family with one ``except`` clause. Errors about the
arguments of a call are also ``TypeError`` / ``ValueError`` (as Python's own
are), and every error carries the dotted paths it concerns in ``paths`` so no
code has to read them back out of the message.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ArgumentTypeError",
    "ArgumentValueError",
    "MaterializationError",
    "MetaTensorError",
    "MetaTensorWarning",
]


class MetaTensorError(RuntimeError):
    """A meta tensor, template or checkpoint was used in a way that cannot work.

    The message names the object, the dotted path and the fix; ``paths`` holds
    those dotted paths (tensor or module names, checkpoint keys), sorted.

    Example::

        >>> from lightning_meta import MetaTensorError
        >>> e = MetaTensorError("'fc.weight' is on meta. Fix: ...", paths=["fc.weight"])
        >>> e.paths
        ('fc.weight',)
    """

    def __init__(self, message: str = "", *, paths: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.paths: tuple[str, ...] = tuple(sorted(set(paths)))

    def __reduce__(self) -> tuple[object, ...]:
        # Keep ``paths`` across pickling (errors travel from DDP workers).
        return (_rebuild, (type(self), str(self), self.paths))


def _rebuild(cls: type[MetaTensorError], message: str, paths: tuple[str, ...]) -> MetaTensorError:
    return cls(message, paths=paths)


class MaterializationError(MetaTensorError):
    """A deferred tensor cannot be turned into real data exactly."""


class ArgumentTypeError(MetaTensorError, TypeError):
    """An argument of a public function has the wrong type."""


class ArgumentValueError(MetaTensorError, ValueError):
    """An argument of a public function has the right type but a value that cannot work."""


class MetaTensorWarning(UserWarning):
    """The result is still correct, but something deserves attention."""
