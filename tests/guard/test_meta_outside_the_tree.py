"""MetaGuard and `check` judge what will fail: plain meta attributes, not hidden templates.

A meta tensor kept as a plain attribute is not moved by Lightning and makes
`forward` fail: refused before training, flagged by `check`. A meta module kept
in a plain list (the classic template workaround, which plain Lightning trains
fine) is outside the module tree: accepted, with a note pointing at
`MetaTemplate`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.func import functional_call

import lightning_meta as lm
from lightning_meta._guard._check import check_module
from support.guard_models import IN, loader


class PlainMetaAttribute(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(IN, 1)
        self.scale = torch.ones(1, device="meta")  # not a buffer: Lightning never moves it

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.layer(x) * self.scale - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TemplateInAList(L.LightningModule):
    """The seed's workaround: the meta template hides in a list, weights are real."""

    def __init__(self) -> None:
        super().__init__()
        self.templates = [nn.Linear(IN, 1, device="meta")]
        self.weight = nn.Parameter(torch.zeros(1, IN))
        self.bias = nn.Parameter(torch.zeros(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        params = {"weight": self.weight, "bias": self.bias}
        return ((functional_call(self.templates[0], params, (x,)) - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


def test_plain_lightning_fails_inside_forward_on_a_plain_meta_attribute() -> None:
    # What MetaGuard saves the user from: torch's error, deep inside training_step.
    with pytest.raises((NotImplementedError, RuntimeError)) as info:
        trainer().fit(PlainMetaAttribute(), loader())
    assert not isinstance(info.value, lm.MetaTensorError)


def test_metaguard_refuses_a_plain_meta_attribute_before_training() -> None:
    model = PlainMetaAttribute()
    before = model.layer.weight.detach().clone()
    with pytest.raises(lm.MetaTensorError, match=r"(?s)'scale' \(attribute.*forward fails") as info:
        trainer(callbacks=[lm.MetaGuard()]).fit(model, loader())
    assert info.value.paths == ("scale",)
    assert torch.equal(model.layer.weight, before)  # refused before any step


def test_check_flags_a_plain_meta_attribute() -> None:
    rows = [r for r in check_module(PlainMetaAttribute()) if r.path == "scale"]
    assert [r.status for r in rows] == ["problem"]
    assert "forward fails on it" in rows[0].detail


def test_plain_lightning_trains_a_template_hidden_in_a_list() -> None:
    model = TemplateInAList()
    trainer().fit(model, loader())
    assert not torch.equal(model.weight, torch.zeros(1, IN))


def test_metaguard_accepts_a_template_hidden_in_a_list() -> None:
    model = TemplateInAList()
    trainer(callbacks=[lm.MetaGuard()]).fit(model, loader())
    assert not torch.equal(model.weight, torch.zeros(1, IN))
    assert model.templates[0].weight.is_meta  # never materialized, never moved


def test_check_notes_a_hidden_template_and_names_metatemplate() -> None:
    rows = check_module(TemplateInAList())
    hidden = [r for r in rows if r.path.startswith("templates.0.")]
    assert {r.path for r in hidden} == {"templates.0.weight", "templates.0.bias"}
    assert all(r.status == "note" and "MetaTemplate" in r.detail for r in hidden)
    assert not [r for r in rows if r.status == "problem"]


def test_find_marks_modules_outside_the_tree_as_hidden() -> None:
    model = TemplateInAList()
    model.shared = nn.Linear(2, 2, device="meta")  # registered: inside the tree
    model.aliases = [model.shared]  # the same module, also listed
    found = {f.path: f.hidden for f in lm.find_meta_tensors(model)}
    assert found == {
        "templates.0.weight": True,
        "templates.0.bias": True,
        # named by its own path in the tree, not by the list's
        "shared.weight": False,
        "shared.bias": False,
    }
