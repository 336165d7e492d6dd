"""Shared pytest set-up: ``tests/`` is on ``sys.path`` (pytest's ``pythonpath``), so every
test imports its models from :mod:`support`; nothing here changes global state beyond
the test that asks for it (``one_thread`` puts the thread count back)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test: tiny ops on several threads mostly wait for each
    other on a busy machine, and an Ensemble's plan timing then reads the thread's CPU
    time, which other processes do not move."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
