"""Process-wide torch settings a test switches for a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(enabled)`` for the block (as
    ``Trainer(deterministic=True)`` sets it, so an ``Ensemble``'s "auto" times nothing), the
    previous setting, ``warn_only`` included, put back after."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
