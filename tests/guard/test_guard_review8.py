"""Hostile sweep of 2026-12-05 (evening) of MetaGuard and ``check``: a meta tensor, or a
deferred module, held where the search did not look (a ``__slots__`` object, a deque,
a ``functools.partial``, a default argument, a bound method of a helper). CPU matmuls
with a meta operand return uninitialised memory: the run trained on it."""

from __future__ import annotations

import collections
import functools
import threading
import types
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_meta as lm
from support.guard_models import IN, loader, trainer
from support.processes import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Slotted:
    __slots__ = ("w",)

    def __init__(self, w: Any) -> None:
        self.w = w


class Applies:
    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


def _kw_only(x: torch.Tensor, *, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _holder(kind: str, w: Any) -> Any:
    """``w`` (a tensor or a module) held as ``kind`` says, and the expected path below it."""
    return {
        "slots": lambda: Slotted(w),
        "deque": lambda: collections.deque([w]),
        "partial_arg": lambda: functools.partial(F.linear, w),
        "partial_keyword": lambda: functools.partial(F.linear, weight=w),
        "default": lambda: lambda x, w=w: F.linear(x, w),
        "keyword_default": lambda: types.FunctionType(
            _kw_only.__code__, _kw_only.__globals__, "_kw_only", None, None
        ),
        "bound_method": lambda: Applies(w).apply,
    }[kind]()


PATHS = {
    "slots": "helper.w",
    "deque": "helper.0",
    "partial_arg": "helper.args.0",
    "partial_keyword": "helper.keywords.weight",
    "default": "helper.<default <lambda>: w>",
    "keyword_default": "helper.<default _kw_only: w>",
    "bound_method": "helper.__self__.w",
}


def _with_keyword_default(kind: str, helper: Any, w: Any) -> Any:
    if kind == "keyword_default":
        helper.__kwdefaults__ = {"w": w}
    return helper


@pytest.mark.parametrize("kind", sorted(PATHS))
def test_find_meta_tensors_reaches_tensors_held_in_these_shapes(kind: str) -> None:
    module = nn.Module()
    w = torch.empty(IN, IN, device="meta")
    module.helper = _with_keyword_default(kind, _holder(kind, w), w)
    assert [f.path for f in lm.find_meta_tensors(module)] == [PATHS[kind]]


class HeldWeight(L.LightningModule):
    """A deferred ``lin`` and a meta weight that was never deferred, held as ``kind`` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        with lm.deferred_init():
            self.lin = nn.Linear(IN, IN)
        w = torch.empty(IN, IN, device="meta")
        self.helper = _with_keyword_default(kind, _holder(kind, w), w)
        self.kind = kind
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        h = self.helper
        w = h.w if self.kind == "slots" else h[0] if self.kind == "deque" else None
        out = F.linear(self.lin(batch[0]), w) if w is not None else h(self.lin(batch[0]))
        return out.pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.lin.parameters(), lr=0.1)


@pytest.mark.parametrize("kind", ["slots", "deque", "partial_keyword", "default", "bound_method"])
def test_metaguard_refuses_them_before_the_first_step(kind: str) -> None:
    model = HeldWeight(kind)
    with pytest.raises(lm.MetaTensorError, match="not deferred") as e:
        trainer(max_steps=2).fit(model, loader())
    assert e.value.paths == (PATHS[kind],)
    assert model.steps == 0


class HeldModule(L.LightningModule):
    """A frozen projector built in the block, held as ``kind`` says (outside the tree)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        with lm.deferred_init():
            self.lin = nn.Linear(IN, IN)
            proj = nn.Linear(IN, IN, bias=False)
        self.helper = {
            "slots": lambda: Slotted(proj),
            "deque": lambda: collections.deque([proj]),
            "partial": lambda: functools.partial(lambda m, x: m(x), proj),
            "dotted_key": lambda: {"a": {"b": {"c": {"d": {"enc.0": proj}}}}},
        }[kind]()
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.lin.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("kind", "reason", "fix"),
    [
        ("slots", "model.helper is a Slotted object", "model.helper.w"),
        ("deque", "model.helper is a deque object", "model.helper[0]"),
        ("partial", "model.helper is a partial object", "model.helper.args[0]"),
        (
            "dotted_key",
            "held 5 lists, tuples or dicts deep",
            "model.helper['a']['b']['c']['d']['enc.0']",
        ),
    ],
)
def test_a_deferred_module_held_so_is_refused_with_the_reason_and_the_call(
    kind: str, reason: str, fix: str
) -> None:
    # The deque and the partial made the explanation raise AttributeError (it
    # followed the path with getattr); a dict key with a dot lost the reason and fix.
    model = HeldModule(kind)
    with pytest.raises(lm.MetaTensorError, match="left without data") as e:
        trainer(max_steps=2).fit(model, loader())
    assert reason in str(e.value)
    assert f"Fix: lightning_meta.materialize({fix})" in str(e.value)
    assert model.steps == 0
    # ... and the call given fills it.
    model = HeldModule(kind)
    held = eval(fix, {"model": model})  # the expression the message wrote
    lm.materialize(held)
    trainer(max_steps=2).fit(model, loader())
    assert model.steps == 2


def test_check_reports_a_meta_tensor_in_a_slots_object(tmp_path: Path) -> None:
    # `lightning-meta check` printed "No meta problem found." and exited 0.
    (tmp_path / "slotted.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Slotted:\n    __slots__ = ('w',)\n\n    def __init__(self, w):\n"
        "        self.w = w\n\n"
        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.lin = nn.Linear(4, 4)\n"
        "        self.helper = Slotted(torch.empty(4, 4, device='meta'))\n"
    )
    proc = run_cli("check", "slotted.py:Net", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "helper.w" in proc.stdout + proc.stderr


def test_a_module_of_the_tree_held_again_is_named_by_its_own_path() -> None:
    # Reached first through a list attribute (and now a bound method or a partial),
    # the module's tensors were named 'holder.0.weight' instead of 'enc.weight'.
    module = nn.Module()
    module.enc = nn.Linear(2, 2, device="meta")
    module.forward_of_enc = module.enc.forward
    module.partial = functools.partial(module.enc)
    module.holder = [module.enc]
    assert [f.path for f in lm.find_meta_tensors(module)] == ["enc.weight", "enc.bias"]


def test_a_deque_another_thread_fills_is_searched_without_an_error() -> None:
    # A replay buffer an actor thread appends to: iterating the deque itself raised
    # "deque mutated during iteration" in every search (MetaGuard's setup crashed).
    module = nn.Module()
    module.replay = collections.deque([(torch.zeros(2), 0.0)] * 5000, maxlen=5000)
    stop = threading.Event()

    def actor() -> None:
        while not stop.is_set():
            module.replay.append((torch.zeros(2), 0.0))

    thread = threading.Thread(target=actor)
    thread.start()
    try:
        for _ in range(10):
            assert lm.find_meta_tensors(module) == []
    finally:
        stop.set()
        thread.join()


class _Base:
    __slots__ = ("_v",)


class _Shadowed(_Base):
    __slots__ = ()

    @property  # type: ignore[misc]
    def _v(self) -> Any:
        raise RuntimeError("the property ran")


def test_a_slot_is_read_without_running_a_property_of_the_same_name() -> None:
    module = nn.Module()
    module.helper = _Shadowed()
    _Base._v.__set__(module.helper, torch.empty(2, device="meta"))  # type: ignore[attr-defined]
    assert [f.path for f in lm.find_meta_tensors(module)] == ["helper._v"]
