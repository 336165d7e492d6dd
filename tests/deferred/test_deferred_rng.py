"""Reseeds inside a deferred_init block are replayed even when they leave the state unchanged.

Random ops draw for real while recording, so the generator inside the block is
the real one: a model that reseeds to the very state the caller seeded
(``torch.manual_seed(0)`` before the block and again in ``__init__``), restores
a state it read, or forks the generator, gets what eager construction gets.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_deferred import assert_same_as_eager, build_deferred, build_eager
from torch import nn

from lightning_meta import deferred_init, materialize


class Reseeding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        torch.manual_seed(0)  # the seed the caller used
        self.b = nn.Linear(4, 4)


class ReseedingTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        torch.manual_seed(0)
        self.b = nn.Linear(4, 4)
        torch.manual_seed(0)
        self.c = nn.Linear(4, 4)


ENTRY_STATE: list[torch.Tensor] = []


class RestoresEntryState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        torch.set_rng_state(ENTRY_STATE[0])
        self.b = nn.Linear(4, 4)


class GeneratorMethodReseed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        torch.default_generator.manual_seed(0)
        self.b = nn.Linear(4, 4)


class ForkAtStart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)


class GeneratorFromGlobal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator()
        gen.set_state(torch.get_rng_state())
        self.a = nn.Linear(4, 4)
        nn.init.normal_(self.a.weight, generator=gen)


class RestoresStateReadBeforeDraws(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        state = torch.get_rng_state()
        self.a = nn.Linear(4, 4)
        torch.set_rng_state(state)
        self.b = nn.Linear(4, 4)


class ReseedLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        torch.manual_seed(0)


def _entry_state_builder() -> nn.Module:
    return RestoresEntryState()


@pytest.fixture(autouse=True)
def _entry_state() -> None:
    torch.manual_seed(0)
    ENTRY_STATE[:] = [torch.get_rng_state()]


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "reseed_same_seed": Reseeding,
    "reseed_same_seed_twice": ReseedingTwice,
    "set_rng_state_to_entry": _entry_state_builder,
    "default_generator_manual_seed": GeneratorMethodReseed,
    "fork_rng_at_start": ForkAtStart,
    "generator_copied_from_global": GeneratorFromGlobal,
    "reseed_after_last_draw": ReseedLast,
    "restore_state_read_before_draws": RestoresStateReadBeforeDraws,
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_reseed_to_unchanged_state_is_replayed(name: str) -> None:
    build = BUILDERS[name]
    eager, after = build_eager(build)
    module = build_deferred(build)
    assert_same_as_eager(eager, materialize(module))
    assert torch.equal(torch.rand(4), after)


@pytest.mark.parametrize("name", ["reseed_same_seed", "reseed_same_seed_twice"])
def test_reseed_to_unchanged_state_per_submodule_reversed(name: str) -> None:
    build = BUILDERS[name]
    eager, after = build_eager(build)
    module = build_deferred(build)
    for child in reversed(list(module.children())):
        materialize(child)
    assert_same_as_eager(eager, module)
    assert torch.equal(torch.rand(4), after)


def test_reseed_to_unchanged_state_in_a_chained_block() -> None:
    torch.manual_seed(0)
    first_eager, second_eager = nn.Linear(3, 3), Reseeding()
    after = torch.rand(4)
    torch.manual_seed(0)
    with deferred_init():
        first = nn.Linear(3, 3)
    with deferred_init():
        second = Reseeding()
    materialize(second)
    materialize(first)
    assert_same_as_eager(first_eager, first)
    assert_same_as_eager(second_eager, second)
    assert torch.equal(torch.rand(4), after)


def test_reseed_to_unchanged_state_in_nested_blocks() -> None:
    eager, after = build_eager(Reseeding)
    torch.manual_seed(0)
    with deferred_init(), deferred_init():
        module = Reseeding()
    assert_same_as_eager(eager, materialize(module))
    assert torch.equal(torch.rand(4), after)


def _draw_then_fail() -> None:
    nn.Linear(3, 3)
    raise ValueError("boom")


def _reseed_then_fail() -> None:
    nn.Linear(3, 3)
    torch.manual_seed(4)
    nn.Linear(3, 3)
    raise ValueError("boom")


@pytest.mark.parametrize("build", [_draw_then_fail, _reseed_then_fail])
def test_generator_after_a_failed_block_is_where_eager_construction_leaves_it(
    build: Callable[[], None],
) -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="boom"):
        build()
    eager = torch.get_rng_state()
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="boom"):
        deferred_init(build)
    assert torch.equal(torch.get_rng_state(), eager)


def test_block_without_draws_leaves_the_generator_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with deferred_init():
        norm = nn.LayerNorm(4)
    assert torch.equal(torch.rand(3), expected)
    materialize(norm)

    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with deferred_init():
        torch.manual_seed(3)
        norm = nn.LayerNorm(4)
    assert torch.equal(torch.rand(3), expected)


def _fork_around_a_reseed() -> nn.Module:
    first = nn.Linear(3, 3)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        second = nn.Linear(3, 3)
    return nn.Sequential(first, second, nn.Linear(3, 3))


def _save_and_restore() -> nn.Module:
    first = nn.Linear(3, 3)
    state = torch.get_rng_state()
    second = nn.Linear(3, 3)
    torch.set_rng_state(state)
    return nn.Sequential(first, second, nn.Linear(3, 3))


@pytest.mark.parametrize("build", [_fork_around_a_reseed, _save_and_restore])
def test_restoring_a_state_read_after_draws_inside_the_block_is_exact(
    build: Callable[[], nn.Module],
) -> None:
    # The generator is real inside the block: what model code reads is what it restores.
    eager, after = build_eager(build)
    module = build_deferred(build)
    assert_same_as_eager(eager, materialize(module))
    assert torch.equal(torch.rand(4), after)


def test_explicit_generator_seeded_like_the_caller_is_unaffected() -> None:
    def build() -> nn.Module:
        gen = torch.Generator().manual_seed(0)
        m = nn.Linear(4, 4)
        nn.init.normal_(m.weight, generator=gen)
        torch.manual_seed(0)
        nn.init.normal_(m.bias)
        return m

    eager, after = build_eager(build)
    module = build_deferred(build)
    assert_same_as_eager(eager, materialize(module))
    assert torch.equal(torch.rand(4), after)
