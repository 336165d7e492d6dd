"""Review 4 of MetaGuard and ``find_meta_tensors``: nothing past the search's bounds is skipped.

Each plain object is searched a few plain objects deep and a few thousand
objects far, to stay cheap; a deferred module past those bounds was neither
materialized nor refused, and a CPU matmul with its meta weight trained on
uninitialised memory.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta._guard import _find
from support.guard_models import IN, loader, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Box:
    """A plain object holding one thing."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner


class Table:
    """A plain object holding a long list (a table of data) and, at its end, a module."""

    def __init__(self, inner: Any) -> None:
        self.rows: list[Any] = [*range(2000), inner]


def _boxed(module: nn.Module, depth: int) -> Any:
    obj: Any = module
    for _ in range(depth):
        obj = Box(obj)
    return obj


class Distill(L.LightningModule):
    """A student trained towards a frozen teacher held ``depth`` plain objects deep."""

    def __init__(self, depth: int, deferred: bool = True) -> None:
        super().__init__()
        with lm.deferred_init() if deferred else _nothing():
            self.student = nn.Linear(IN, 1)
            teacher = nn.Linear(IN, 1, bias=False).requires_grad_(False)
        self.helpers = _boxed(teacher, depth)
        self.depth = depth
        self.targets: list[torch.Tensor] = []

    def teacher(self) -> nn.Module:
        o = self.helpers
        for _ in range(self.depth):
            o = o.inner
        assert isinstance(o, nn.Module)
        return o

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        with torch.no_grad():
            target = self.teacher()(x)
        self.targets.append(target)
        return (self.student(x) - target).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=0.1)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("depth", [5, 8])
def test_a_module_held_deeper_than_the_search_goes_is_refused_with_a_fix_that_works(
    depth: int,
) -> None:
    path = "helpers." + "inner." * depth + "weight"
    torch.manual_seed(0)
    eager = Distill(depth, deferred=False)
    trainer(max_steps=2).fit(eager, loader())
    torch.manual_seed(0)
    model = Distill(depth)
    with pytest.raises(lm.MetaTensorError, match="left without data after materializing") as e:
        trainer(max_steps=2).fit(model, loader())
    assert list(e.value.paths) == [path]
    assert model.targets == []  # before the first step
    fix = "lightning_meta.materialize(model.helpers" + ".inner" * depth + ")"
    assert f"Fix: {fix}" in str(e.value)
    torch.manual_seed(0)
    model = Distill(depth)
    lm.materialize(model.teacher())
    trainer(max_steps=2).fit(model, loader())
    for a, b in zip(eager.targets, model.targets, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(eager.student.weight, model.student.weight)


def _reported_once(model: nn.Module, path: str) -> None:
    """``find_meta_tensors`` and ``assert_no_meta`` both name the one hidden deferred tensor."""
    found = lm.find_meta_tensors(model)
    assert [(f.path, f.deferred, f.hidden) for f in found] == [(path, True, True)]
    with pytest.raises(lm.MetaTensorError, match="holds 1 meta tensor") as e:
        lm.assert_no_meta(model)
    assert list(e.value.paths) == [path]


@pytest.mark.parametrize(
    ("holder", "path"),
    [
        (lambda m: _boxed(m, 5), "holder.inner.inner.inner.inner.inner.weight"),
        (Table, "holder.rows.2000.weight"),  # a list of more than 1000 items in a plain object
        # Past the 10,000 objects searched below one plain object.
        (lambda m: Box([Box(i) for i in range(11_000)] + [m]), "holder.inner.11000.weight"),
    ],
)
def test_find_meta_tensors_and_assert_no_meta_see_past_their_bounds(holder: Any, path: str) -> None:
    with lm.deferred_init():
        model = nn.Sequential(nn.Linear(2, 2))
        hidden = nn.Linear(2, 2, bias=False)
    model.holder = holder(hidden)
    lm.materialize(model)  # reaches modules in containers only: the hidden one stays
    assert hidden.weight.is_meta
    _reported_once(model, path)
    lm.materialize(hidden)
    lm.assert_no_meta(model)


def test_a_deferred_model_only_held_elsewhere_is_not_found_past_the_bounds() -> None:
    # A teacher built for later is kept by the script, not by the model: the
    # search past the bounds looks for deferred tensors the model reaches only.
    with lm.deferred_init():
        model = nn.Sequential(nn.Linear(2, 2))
        later = nn.Linear(2, 2)
    model.holder = _boxed(nn.Linear(2, 2), 6)  # real, past the bounds
    lm.materialize(model)
    assert later.weight.is_meta
    assert lm.find_meta_tensors(model) == []
    lm.assert_no_meta(model)


class Tokenizer:
    """A plain object with a large vocabulary: the search stops at its bounds."""

    def __init__(self) -> None:
        self.vocab = {f"w{i}": i for i in range(50_000)}
        self.merges = [("a", "b")] * 5000


@pytest.mark.parametrize("first", ["forward", "backward"])
@pytest.mark.parametrize(
    ("holder", "path"),
    [
        (lambda m: _boxed(m, 6), "holder.inner.inner.inner.inner.inner.inner.weight"),
        (Table, "holder.rows.2000.weight"),
        (lambda m: Box([Box(i) for i in range(11_000)] + [m]), "holder.inner.11000.weight"),
        (lambda m: Box([Tokenizer(), m]), "holder.inner.1.weight"),
    ],
)
def test_the_search_from_the_model_and_the_trace_back_find_the_same(
    monkeypatch: pytest.MonkeyPatch, first: str, holder: Any, path: str
) -> None:
    # Past the bounds, the search from the model and the trace back from the
    # deferred tensors take turns by time: whichever finishes first decides.
    # Each one alone (the other given no time) finds the same, and neither
    # reports the teacher held elsewhere.
    monkeypatch.setattr(_find, "_FORWARD_HEAD_START", 1e9 if first == "forward" else -1e9)
    with lm.deferred_init():
        model = nn.Sequential(nn.Linear(2, 2))
        hidden = nn.Linear(2, 2, bias=False)
        later = nn.Linear(2, 2)
    model.holder = holder(hidden)
    model.also = _boxed(hidden, 7)  # found under its first path only
    lm.materialize(model)
    _reported_once(model, path)
    lm.materialize(hidden)
    assert lm.find_meta_tensors(model) == []
    assert later.weight.is_meta
