"""Custom generators and threads see eager construction's states (issue #11, items 7-8)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch
from test_deferred import assert_same_as_eager, build_deferred, build_eager
from torch import nn

from lightning_meta import deferred_init, materialize
from support import deferred_models as md
from support import program_models as pm


def test_a_custom_generator_reseeded_inside_init_is_replayed() -> None:
    eager, after = build_eager(pm.ReseedsItsGenerator)
    module = build_deferred(pm.ReseedsItsGenerator)
    assert_same_as_eager(eager, materialize(module))
    assert torch.equal(torch.rand(4), after)


def test_a_generator_passed_in_stands_where_eager_construction_leaves_it() -> None:
    gen = torch.Generator().manual_seed(9)
    eager = pm.Truncated(gen)
    after = torch.rand(3, generator=gen)
    gen.manual_seed(9)
    module = deferred_init(pm.Truncated, gen)
    assert torch.equal(torch.rand(3, generator=gen), after)  # before materialize
    gen.manual_seed(123)  # reseeding it afterwards changes nothing of the module
    assert_same_as_eager(eager, materialize(module))


def _two_threads(
    block: Callable[[], contextlib.AbstractContextManager[None]],
) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Thread A builds half a model, thread B a whole one, then A finishes: a fixed interleaving."""
    torch.manual_seed(0)
    a_half, b_done = threading.Event(), threading.Event()
    built: dict[str, nn.Module] = {}

    def a() -> None:
        with block():
            first = nn.Linear(4, 4)
            a_half.set()
            b_done.wait(30)
            built["a"] = nn.Sequential(first, nn.Linear(4, 4))

    def b() -> None:
        a_half.wait(30)
        with block():
            built["b"] = md.NanoGPT()
        b_done.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return built["a"], built["b"], torch.rand(4)


def test_blocks_in_two_threads_are_exact() -> None:
    a_eager, b_eager, after_eager = _two_threads(contextlib.nullcontext)
    a, b, after = _two_threads(deferred_init)
    assert torch.equal(after, after_eager)
    assert_same_as_eager(b_eager, materialize(b))
    assert_same_as_eager(a_eager, materialize(a))


def test_a_thread_outside_any_block_draws_eager_numbers_while_a_block_is_open() -> None:
    def run(
        block: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        opened, drawn = threading.Event(), threading.Event()
        built: dict[str, nn.Module] = {}

        def build() -> None:
            with block():
                first = nn.Linear(3, 3)
                opened.set()
                drawn.wait(30)
                built["m"] = nn.Sequential(first, nn.Linear(3, 3))

        thread = threading.Thread(target=build)
        thread.start()
        opened.wait(30)
        outside = torch.randn(5)  # this thread has no block
        drawn.set()
        thread.join(60)
        return built["m"], outside

    eager, outside_eager = run(contextlib.nullcontext)
    module, outside = run(deferred_init)
    assert torch.equal(outside, outside_eager)
    assert_same_as_eager(eager, materialize(module))
