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
    """A meta tensor cannot be turned into real data exactly, so nothing was filled.

    Raised by :func:`~lightning_meta.materialize` (and where it runs:
    ``MetaGuard``, ``fabric_setup``, ``load_checkpoint`` replaying what a
    checkpoint lacks) for meta tensors never built under
    :func:`~lightning_meta.deferred_init`, or deferred tensors changed in
    place after the block; and inside a ``deferred_init`` block, at record
    time, for construction that reads tensor values or uses an operator that
    cannot be recorded, naming the op and the ``file:line``. ``paths`` holds
    the tensors' dotted names.

    Example::

        >>> import torch, lightning_meta as lm
        >>> with torch.device("meta"):  # not deferred_init: the values are unknown
        ...     net = torch.nn.Linear(4, 2)
        >>> try:
        ...     lm.materialize(net)
        ... except lm.MaterializationError as e:
        ...     print(e.paths)
        ('bias', 'weight')
    """


class DeferredCopyError(MetaTensorError, NotImplementedError):
    """A deferred tensor was moved off the meta device (``.to(device)``, ``.cpu()``).

    A :class:`MetaTensorError` that is also the ``NotImplementedError`` torch
    raises for any meta tensor ("Cannot copy out of meta tensor"), so code
    that catches torch's error catches this one; the message names the tensor
    and the fix (:func:`~lightning_meta.materialize`, ``MetaGuard``). Not
    exported: catch ``MetaTensorError`` or ``NotImplementedError``.
    """


class ArgumentTypeError(MetaTensorError, TypeError):
    """An argument of a public function has the wrong type.

    Also a ``TypeError``, so ``except TypeError`` catches it as it would
    Python's own; raised before the function touches anything.

    Example::

        >>> import torch, lightning_meta as lm
        >>> try:
        ...     lm.materialize(torch.zeros(2))  # a tensor where a module goes
        ... except lm.ArgumentTypeError as e:
        ...     print(isinstance(e, TypeError), isinstance(e, lm.MetaTensorError))
        True True
    """


class ArgumentValueError(MetaTensorError, ValueError):
    """An argument of a public function has the right type but a value that cannot work.

    Also a ``ValueError``; raised before the function touches anything. The
    command line exits with status 2 on it (a bad option or ``--input``).

    Example::

        >>> import torch, lightning_meta as lm
        >>> try:
        ...     lm.estimate(lambda: torch.nn.Linear(16, 4), "8x16")  # not a shape: '8,16'
        ... except lm.ArgumentValueError as e:
        ...     print(str(e).split(". Fix:")[0])
        input spec '8x16': the shape must be comma-separated non-negative integers
    """


class MetaTensorWarning(UserWarning):
    """The result is still correct, but something deserves attention.

    Issued by :func:`~lightning_meta.estimate` (so also by
    :func:`~lightning_meta.find_fit`, which runs it), pointing at its caller:
    when CPU kernels of the model allocate scratch memory inside themselves
    that a shape-only run cannot see, the warning names the kernel and module
    and bounds by how much ``peak_bytes`` may be too low; and when sparse or
    nested tensors are left out of ``peak_bytes``. Issued by a load
    (:func:`~lightning_meta.load_checkpoint`, ``load_state_dict``, a
    ``ckpt_path=`` resume) that fills deferred tensors changed after their
    block: the values are the checkpoint's, but random numbers the change
    draws eagerly were not drawn. Filter it like any warning
    category: ``warnings.filterwarnings("ignore", category=lm.MetaTensorWarning)``,
    or ``-W error::lightning_meta.MetaTensorWarning`` to make it an error.

    Example::

        >>> import warnings, torch, lightning_meta as lm
        >>> conv = lambda: torch.nn.Conv2d(3, 8, 3)  # a batch of 1: the slow im2col kernel
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     est = lm.estimate(conv, "1,3,32,32:float32", optimizer=None)
        >>> [type(w.message).__name__ for w in caught]
        ['MetaTensorWarning']
        >>> with warnings.catch_warnings():
        ...     warnings.filterwarnings("ignore", category=lm.MetaTensorWarning)
        ...     est = lm.estimate(conv, "1,3,32,32:float32", optimizer=None)
    """
