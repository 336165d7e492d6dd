"""Process-wide settings that change what an op computes: noted while recording, set again in replay.

Eager construction runs every op under the settings in force at that
moment; ``materialize`` runs later, maybe under others (a Trainer with
``deterministic=True``, ``torch.set_float32_matmul_precision("medium")``,
``torch.autocast``, ``torch.no_grad``). Settings that can change values on the CPU (the number of CPU threads
included) are noted per op while recording (:class:`Ambient`) and put back around each replayed
op; autocast and inference mode of the caller are kept out of the replay
(the casts autocast made in the block are in the log already).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.utils.deterministic

from lightning_meta import _compat

__all__ = ["Ambient", "Settings", "flush_denormal", "now", "outside", "put", "settings"]

# Autocast device types torch knows; only those enabled are turned off.
_AUTOCAST_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla")


class Settings(NamedTuple):
    """The settings read before every recorded op (cheap to read)."""

    deterministic: bool
    warn_only: bool
    fill_uninitialized: bool  # torch.empty is filled (NaN, the integer maximum) when deterministic
    matmul_precision: str
    # The CPU LSTM kernel gives other bits with grad mode on than off, and a
    # convolution others with oneDNN off (torch.backends.mkldnn.flags). The
    # defaults: what a block pickled before these were noted ran under.
    grad_enabled: bool = True
    mkldnn: bool = True
    # A reduction over a large tensor splits its sum per thread: other bits on
    # another torch.set_num_threads (Lightning's DDP launchers set it at fit
    # time, after the model was built). 0: not noted (a block pickled before).
    threads: int = 0
    # torch's float32 precision per backend and op (torch 2.9+; see
    # _compat.fp32_precisions), which says what matmul_precision says, and more: noted
    # instead of it there ("" then), since once one is set the legacy getter raises.
    fp32_precision: tuple[str, ...] = ()


class Ambient(NamedTuple):
    """The settings an op ran under: :class:`Settings` plus flushing of denormal numbers."""

    settings: Settings
    flush_denormal: bool

    @property
    def fills_empty(self) -> bool:
        """Whether ``torch.empty`` gives defined values (deterministic algorithms fill it)."""
        return self.settings.deterministic and self.settings.fill_uninitialized


def settings() -> Settings:
    """Return the settings in force now."""
    precisions = _compat.fp32_precisions()
    return Settings(
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        bool(torch.utils.deterministic.fill_uninitialized_memory),  # type: ignore[attr-defined]
        "" if precisions else torch.get_float32_matmul_precision(),
        torch.is_grad_enabled(),
        bool(torch.backends.mkldnn.enabled),
        torch.get_num_threads(),
        precisions,
    )


def _legacy_precision() -> str | None:
    """``torch.get_float32_matmul_precision()``, or ``None`` where torch 2.9+ refuses it (the
    per-backend settings were set apart)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


_TINY: list[torch.Tensor] = []  # one denormal float, made once


def flush_denormal() -> bool:
    """Whether the CPU flushes denormal floats to zero in this thread (``torch.set_flush_denormal``).

    torch has no getter: a denormal input to a multiplication tells.
    """
    with _compat.no_python_dispatch():
        if not _TINY:
            _TINY.append(torch.tensor(1e-40, dtype=torch.float32))
        return (_TINY[0] * 1.0).item() == 0.0


def now() -> Ambient:
    """Return the settings in force now."""
    return Ambient(settings(), flush_denormal())


def put(ambient: Ambient) -> None:
    """Make ``ambient`` the settings in force."""
    s = ambient.settings
    if (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    ) != (s.deterministic, s.warn_only):
        torch.use_deterministic_algorithms(s.deterministic, warn_only=s.warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = s.fill_uninitialized  # type: ignore[attr-defined]
    if s.fp32_precision:
        _compat.set_fp32_precisions(s.fp32_precision)
    elif s.matmul_precision and _legacy_precision() != s.matmul_precision:
        torch.set_float32_matmul_precision(s.matmul_precision)
    if torch.is_grad_enabled() != s.grad_enabled:
        torch.set_grad_enabled(s.grad_enabled)
    if bool(torch.backends.mkldnn.enabled) != s.mkldnn:
        torch.backends.mkldnn.enabled = s.mkldnn  # type: ignore[assignment]
    if s.threads and torch.get_num_threads() != s.threads:
        torch.set_num_threads(s.threads)
    if flush_denormal() != ambient.flush_denormal:
        torch.set_flush_denormal(ambient.flush_denormal)


_KNOWN_TYPES: list[str] = []  # the autocast device types this build knows, found once


def _autocast_types() -> list[str]:
    if not _KNOWN_TYPES:
        for device_type in _AUTOCAST_TYPES:
            try:
                torch.is_autocast_enabled(device_type)
            except (RuntimeError, TypeError):  # a device type this build does not know
                continue
            _KNOWN_TYPES.append(device_type)
    return _KNOWN_TYPES


@contextlib.contextmanager
def outside(inference: bool) -> Iterator[None]:
    """Run the body with autocast off on every device type, and inference mode as ``inference``."""
    with contextlib.ExitStack() as stack:
        for device_type in _autocast_types():
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        if torch.is_inference_mode_enabled() != inference:
            stack.enter_context(torch.inference_mode(inference))
        yield
