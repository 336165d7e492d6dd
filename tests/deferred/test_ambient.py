"""Replay runs as recording ran: settings, autocast and generators of the caller stay out.

``materialize`` may run under other process settings than the block (a
Trainer with ``deterministic=True``, ``torch.autocast``, another matmul
precision) and while other threads draw random numbers: none of that may
change a value, nor the numbers those threads get.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import FrameType

import pytest
import torch
from torch import nn

from lightning_meta import MaterializationError, deferred_init, materialize


class _Gram(nn.Module):
    """A buffer computed with a matmul in ``__init__`` (a fixed projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        a = torch.randn(8, 8)
        self.register_buffer("proj", a @ a.T)


@pytest.fixture
def deterministic_off() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def _built(cls: type[nn.Module]) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    eager = cls()
    torch.manual_seed(0)
    with deferred_init():
        deferred = cls()
    return eager, deferred


def test_materialize_under_autocast_replays_without_it() -> None:
    eager, deferred = _built(_Gram)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        materialize(deferred)
    assert deferred.proj.dtype == torch.float32
    assert torch.equal(deferred.proj, eager.proj)


def test_a_block_under_autocast_gives_what_eager_gives_under_it() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, deferred = _built(_Gram)
    materialize(deferred)
    assert deferred.proj.dtype == eager.proj.dtype == torch.bfloat16
    assert torch.equal(deferred.proj, eager.proj)


def test_materialize_under_inference_mode_gives_ordinary_tensors() -> None:
    _, deferred = _built(_Gram)
    with torch.inference_mode():
        materialize(deferred)
    assert not deferred.proj.is_inference()
    with torch.no_grad():
        deferred.lin.weight.add_(1.0)  # an optimizer step: refused on inference tensors


class _Empty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.empty(4))
        self.register_buffer("count", torch.empty(3, dtype=torch.long))


def test_empty_under_deterministic_algorithms_is_its_defined_fill(deterministic_off: None) -> None:
    torch.use_deterministic_algorithms(True)
    eager, deferred = _built(_Empty)
    torch.use_deterministic_algorithms(False)
    materialize(deferred)  # no "uninitialised" refusal: eager fills torch.empty here
    assert torch.isnan(deferred.cache).all()
    assert torch.equal(deferred.count, eager.count)
    assert deferred.count[0] == torch.iinfo(torch.long).max


def test_deterministic_algorithms_at_materialize_do_not_reach_the_replay(
    deterministic_off: None,
) -> None:
    _, deferred = _built(_Empty)
    torch.use_deterministic_algorithms(True)
    with pytest.raises(MaterializationError, match="uninitialised"):
        materialize(deferred)  # still refused: eager construction left it uninitialised
    assert torch.are_deterministic_algorithms_enabled()


class _Tiny(nn.Module):
    """A buffer whose value depends on denormal flushing (``torch.set_flush_denormal``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("tiny", torch.full((3,), 1e-39) * 1.0)


def test_denormal_flushing_of_the_block_is_the_replays() -> None:
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        eager, deferred = _built(_Tiny)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(eager.tiny, torch.zeros(3))
    materialize(deferred)
    assert torch.equal(deferred.tiny, eager.tiny)
    assert (torch.full((1,), 1e-39) * 1.0).item() != 0.0  # the caller's setting is back


def test_replay_never_moves_the_global_generator() -> None:
    """Another thread drawing while materialize runs gets the numbers it would get without it."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    torch.manual_seed(0)
    with deferred_init():
        deferred = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    moved: list[bool] = []

    def watch(frame: FrameType, event: str, arg: object) -> None:
        # After each random op of the replay is set up and after it ran.
        if event == "return" and frame.f_code.co_name in ("enter", "leave"):
            moved.append(not torch.equal(torch.get_rng_state(), state))

    sys.setprofile(watch)
    try:
        materialize(deferred)
    finally:
        sys.setprofile(None)
    assert moved and not any(moved)
    assert torch.equal(torch.get_rng_state(), state)
    for got, want in zip(deferred.parameters(), eager.parameters(), strict=True):
        assert torch.equal(got, want)


def test_every_kind_of_draw_replays_on_the_replays_own_generator() -> None:
    """Random ops get generator= (``randn.generator`` for ``randn.default``): the same numbers."""

    class _Draws(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("a", torch.randn(5))
            self.register_buffer("b", torch.rand(5))
            self.register_buffer("c", torch.randint(0, 9, (5,)))
            self.register_buffer("d", torch.randperm(7))
            self.register_buffer("e", torch.randn_like(self.a))
            self.register_buffer("f", torch.bernoulli(torch.full((5,), 0.5)))

    eager, deferred = _built(_Draws)
    after = torch.rand(3)
    torch.manual_seed(7)
    materialize(deferred)
    for name, want in eager.named_buffers():
        assert torch.equal(getattr(deferred, name), want), name
    torch.manual_seed(0)
    _Draws()
    assert torch.equal(torch.rand(3), after)
