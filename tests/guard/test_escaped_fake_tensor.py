"""A tensor made in a deferred_init block but kept outside its modules: found, flagged, refused.

Such a tensor is a fake tensor of the finished block, not a meta tensor: it
holds no data and materialize cannot fill it (issue #11, item 2). Without
MetaGuard, training raises on its first use, deep inside ``training_step``;
with MetaGuard, ``fit`` refuses before the first step, naming the attribute
and the line that created it. ``find_meta_tensors`` and ``check`` list it.
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta._cli import main
from lightning_meta._guard._check import check_module
from support.guard_models import IN, loader

_SCALE_LINE = "scale = torch.ones(1) * 2  # escapes"


class EscapedScale(L.LightningModule):
    """The layer is deferred; ``scale`` was made in the block and assigned after it."""

    def __init__(self) -> None:
        super().__init__()
        with lm.deferred_init():
            self.layer = nn.Linear(IN, 1)
            scale = torch.ones(1) * 2  # escapes
        self.scale = scale  # a plain attribute: never converted, never materialized

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.layer(x) * self.scale - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _site() -> str:
    with open(__file__) as f:
        line = next(i for i, text in enumerate(f, 1) if text.strip() == _SCALE_LINE)
    return f"{__file__}:{line}"


def trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


def test_find_meta_tensors_lists_an_escaped_tensor_with_its_creation_site() -> None:
    model = EscapedScale()
    assert not model.scale.is_meta  # a fake tensor of the closed block, not a meta tensor
    found = {f.path: f for f in lm.find_meta_tensors(model)}
    scale = found["scale"]
    assert (scale.kind, scale.shape, scale.dtype) == ("attribute", (1,), torch.float32)
    assert scale.escaped == _site() and not scale.deferred and scale.problem
    assert f"created in a deferred_init block at {_site()}" in scale.describe()
    assert found["layer.weight"].deferred and found["layer.weight"].escaped is None
    with pytest.raises(lm.MetaTensorError, match=r"(?s)'scale' \(attribute.*register it") as info:
        lm.assert_no_meta(lm.materialize(model))
    assert info.value.paths == ("scale",)


def test_find_meta_tensors_lists_escaped_tensors_in_containers_and_optimizers() -> None:
    kept: list[torch.Tensor] = []
    with lm.deferred_init():
        net = nn.Linear(2, 2)
        kept.append(torch.zeros(3))
    found = lm.find_meta_tensors({"net": lm.materialize(net), "kept": kept})
    assert [(f.path, f.escaped is not None) for f in found] == [("kept.0", True)]


def test_plain_lightning_fails_inside_training_step_on_an_escaped_tensor() -> None:
    # What MetaGuard saves the user from: even with the deferred layer materialized
    # by hand, the error comes from the first step, deep inside training_step.
    model = lm.materialize(EscapedScale())
    with pytest.raises(lm.MetaTensorError, match="after the block ended") as info:
        trainer().fit(model, loader())
    assert _site() in str(info.value)


def test_metaguard_refuses_an_escaped_tensor_before_training() -> None:
    model = EscapedScale()
    with pytest.raises(lm.MetaTensorError, match=r"(?s)'scale' \(attribute.*created in a") as info:
        trainer(callbacks=[lm.MetaGuard()]).fit(model, loader())
    assert info.value.paths == ("scale",)
    assert _site() in str(info.value)
    # Refused before the deferred layer was materialized, let alone trained.
    assert lm.is_deferred(model.layer)


def test_check_flags_an_escaped_tensor_as_a_problem() -> None:
    rows = [r for r in check_module(EscapedScale()) if r.path == "scale"]
    assert rows and rows[0].status == "problem"
    assert _site() in rows[0].detail and "deferred_init block" in rows[0].detail


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cli_check_exits_1_naming_the_escaped_tensor(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", f"{__file__}:EscapedScale", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    rows = [r for r in report["findings"] if r["path"] == "scale"]
    assert rows[0]["status"] == "problem" and _site() in rows[0]["detail"]
