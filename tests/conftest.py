"""Shared pytest set-up: ``tests/`` is on ``sys.path`` (pytest's ``pythonpath``), so every
test imports its models from :mod:`support`; nothing here changes global state beyond
the test that asks for it (``one_thread`` puts the thread count back)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test another checkout's code: a venv shared between checkouts (a symlink,
    or one set up from another clone) imports the package it was installed from, and every
    test, the worker processes' included, would then pass or fail for that code."""
    import lightning_meta

    here = os.path.join(str(session.config.rootpath), "src", "lightning_meta")
    got = os.path.dirname(os.path.abspath(lightning_meta.__file__))
    if os.path.isdir(here) and not os.path.samefile(got, here):
        raise pytest.UsageError(
            f"lightning_meta is imported from {got}, not from this checkout's {here}. Fix: "
            "run bash scripts/setup.sh here (or the compat script that made this venv), "
            f"or put {os.path.dirname(here)} first on PYTHONPATH."
        )


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test: tiny ops on several threads mostly wait for each
    other on a busy machine, and an Ensemble's plan timing then reads the thread's CPU
    time, which other processes do not move."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
