"""The package's exception hierarchy.

Every error raised on bad input derives from :class:`MetaTensorError`, so a
caller can catch the whole family with one ``except`` clause.
"""

from __future__ import annotations

__all__ = ["MaterializationError", "MetaTensorError", "MetaTensorWarning"]


class MetaTensorError(RuntimeError):
    """A meta tensor, template or checkpoint was used in a way that cannot work.

    The message names the object, the dotted path and the fix.
    """


class MaterializationError(MetaTensorError):
    """A deferred tensor cannot be turned into real data exactly."""


class MetaTensorWarning(UserWarning):
    """The result is still correct, but something deserves attention."""
