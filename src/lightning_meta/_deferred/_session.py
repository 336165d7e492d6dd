"""One recording session: the fake mode, the recorder and every hook, for the length of a body.

Shared by the ``deferred_init`` block (``_block``) and by
``materialize(fallback="reset_parameters")`` (``_fallback``), which records
a module's ``reset_parameters()`` the same way before replaying it.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from lightning_meta import _compat
from lightning_meta._compat import FakeTensor, FakeTensorMode, OwnedFakeMode, is_swap_refusal
from lightning_meta._deferred._escaped import close_fake_mode
from lightning_meta._deferred._functions import (
    PARAMETER_CLASS,
    conversion_refused,
    value_reads,
    values_only,
)
from lightning_meta._deferred._record import Record
from lightning_meta._deferred._record_errors import path_of, recording_error, torch_refusal
from lightning_meta._deferred._recorder import Recorder
from lightning_meta._errors import MaterializationError

__all__ = ["PARAMETER_CLASS", "close", "recording"]


class _BlockFakeMode(OwnedFakeMode):
    """The fake mode of a recording: an op on its tensors in another thread is refused."""

    refusals: list[MaterializationError]
    modules: dict[int, nn.Module]

    def refusal(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
        name = getattr(func, "__name__", str(func))
        ours = [
            t
            for t in _compat.tree_leaves((args, kwargs))
            if isinstance(t, FakeTensor) and t.fake_mode is self
        ]
        # The owner thread may be adding modules meanwhile: path_of gives None then.
        path = path_of(ours[0], self.modules.values()) if ours else None
        error = recording_error(
            f"aten.{name}",
            f"runs in thread {threading.current_thread().name!r} on a tensor of a deferred_init "
            "block opened in another thread, where the block does not see it: its "
            "initialisation would be lost (a thread pool in __init__)",
            "run the initialisation in the thread that opened the block, or build this part "
            "of the model outside deferred_init and assign it afterwards",
            path=path,
        )
        # Noted for the block's own thread too: a worker whose code catches this would
        # otherwise leave the block to end as if the op had run.
        self.refusals.append(error)
        return error


@contextlib.contextmanager
def recording(record: Record, *, track_modules: bool = True) -> Iterator[Recorder]:
    """Record the body into ``record``; yield the recorder (``recorder.fake`` is its fake mode).

    The caller converts what it needs and then calls :func:`close`, also
    when the body raised.
    """
    recorder = Recorder(record)
    fake = _BlockFakeMode(allow_non_fake_inputs=True)
    fake.owner = recorder.thread
    fake.refusals = recorder.refusals
    fake.modules = recorder.modules
    recorder.fake = fake
    hooks = []
    if track_modules:
        hooks = [
            register_module_parameter_registration_hook(recorder.track),
            register_module_buffer_registration_hook(recorder.track),
            register_module_module_registration_hook(recorder.track),
        ]
    try:
        with warnings.catch_warnings():
            # torch's own Tensor.__deepcopy__ (nn.TransformerEncoder clones its
            # layer) probes data_ptr() of the fake tensors; harmless here.
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            with (
                _compat.parameter_calls(_parameter_hook(recorder, fake)),
                value_reads(fake, recorder),
                values_only(),
                fake,
                recorder,
            ):
                try:
                    yield recorder
                except RuntimeError as e:
                    refused = torch_refusal(e)
                    if refused is not None:
                        raise refused from e
                    if not is_swap_refusal(e):
                        raise
                    raise conversion_refused(str(e)) from e
                else:
                    recorder.finish_arrays()
    finally:
        for hook in hooks:
            hook.remove()


def close(
    recorder: Recorder, converted: dict[int, Callable[[], str]], failed: str | None = None
) -> None:
    """End a recording: close its fake mode on every tensor left out, free what it holds.

    Args:
        recorder: the recording's recorder.
        converted: the fake tensors swapped for deferred meta tensors: ``id`` -> their
            path, named where a reference to one kept elsewhere is used.
        failed: what the block raised (``"ValueError: boom"``), named by the
            refusals of its tensors; ``None`` if it ended normally.
    """
    try:
        # The paths named now, as strings: the escaped tensors outlive the block, and must
        # not keep its modules (the materialized model) alive through them.
        leftovers = [
            (t, recorder.site_of(vid), converted[id(t)]() if id(t) in converted else None)
            for t, vid in recorder.values.alive()
        ]
        close_fake_mode(recorder.fake, leftovers, failed)
    finally:
        recorder.close()


def _parameter_hook(recorder: Recorder, fake: FakeTensorMode) -> Any:
    """Note the Parameter subclass a model asks for (a fake tensor cannot be an instance of it)."""

    def hook(cls: type, made: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if (
            cls is nn.Parameter
            or not isinstance(made, FakeTensor)
            or getattr(made, "fake_mode", None) is not fake
            or isinstance(made, cls)
            or threading.get_ident() != recorder.thread
        ):
            return made
        made.__dict__[PARAMETER_CLASS] = cls
        # type.__call__ skips __init__ for an object not of the class: run it
        # as eager construction would, so the attributes it sets are kept.
        if any(
            "__init__" in vars(k)
            for k in cls.__mro__
            if k is not nn.Parameter and issubclass(k, nn.Parameter)
        ):
            try:
                cls.__init__(made, *args, **kwargs)  # type: ignore[misc]
            except Exception as e:
                raise recording_error(
                    f"{cls.__name__}.__init__",
                    f"cannot run on the fake tensor deferred_init builds the parameter on "
                    f"({type(e).__name__}: {e})",
                    f"set the attributes of {cls.__name__} in __new__, or build this parameter "
                    "outside deferred_init and assign it afterwards",
                ) from e
        return made

    return hook


def fake_parameter_class(t: torch.Tensor) -> type:
    """Return the Parameter class a fake parameter stands for."""
    cls: type = t.__dict__.get(PARAMETER_CLASS, nn.Parameter)
    return cls
