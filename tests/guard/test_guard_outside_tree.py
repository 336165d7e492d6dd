"""MetaGuard with deferred tensors held outside the module tree, and failures inside blocks.

A frozen teacher kept in a list (out of Lightning's sight) and a reference
taken after the block trained on uninitialised memory without an error; a
tensor hyperparameter of a model built in the block was dropped from the
checkpoint; an error inside a ``deferred_init`` block in ``configure_model``
reached the user as torch's ``_apply(): Couldn't swap Linear.weight``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm
from support.guard_models import IN, loader, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Distilled(L.LightningModule):
    """A student trained against a frozen teacher kept in a list, and a reference in a dict."""

    def __init__(self, class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.student = nn.Linear(IN, 1)
        self._teacher = [nn.Linear(IN, 1, bias=False)]
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        target = x @ self._teacher[0].weight.T  # a CPU matmul with a meta weight raises nothing
        loss = ((self.student(x) - target) ** 2).mean() + self.refs["w"].sum() * 0
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=0.1)


def _run(deferred: bool, tmp_path: Path) -> tuple[Distilled, L.Trainer]:
    torch.manual_seed(0)
    # A real tensor made outside the block: save_hyperparameters deep-copies it
    # inside (torch's copy failed there: a real storage set on a fake tensor).
    weights = torch.tensor([1.0, 5.0, 10.0])
    if deferred:
        with lm.deferred_init():
            model = Distilled(weights)
    else:
        model = Distilled(weights)
    model.refs = {"w": model.student.weight}  # taken after the block
    t = trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(model, loader())
    return model, t


def test_a_teacher_kept_in_a_list_trains_exactly_and_hyperparameters_are_saved(
    tmp_path: Path,
) -> None:
    eager, _ = _run(False, tmp_path / "eager")
    model, _ = _run(True, tmp_path / "deferred")
    assert model.losses == eager.losses
    assert torch.equal(model._teacher[0].weight, eager._teacher[0].weight)
    assert model.refs["w"] is model.student.weight
    assert lm.find_meta_tensors(model) == []
    (path,) = (tmp_path / "deferred").rglob("*.ckpt")
    saved = torch.load(path, weights_only=False)["hyper_parameters"]
    assert torch.equal(saved["class_weights"], torch.tensor([1.0, 5.0, 10.0]))


@dataclasses.dataclass
class _Holder:
    w: torch.Tensor


def test_a_reference_materialize_does_not_reach_is_the_real_parameter() -> None:
    # A dataclass is not searched for deferred tensors, but materialize keeps
    # the parameter's object, so the reference it holds is the real weight, as
    # in eager code (before identity was kept it was refused as left without data).
    torch.manual_seed(0)
    with lm.deferred_init():
        model = Distilled()
    model.refs = {"w": model.student.weight}
    model.holder = _Holder(model.student.weight)
    t = trainer(max_epochs=1)
    t.fit(model, loader())
    assert t.global_step > 0
    assert model.holder.w is model.student.weight
    assert not model.holder.w.is_meta
    assert lm.find_meta_tensors(model) == []


class FailingBlock(L.LightningModule):
    def __init__(self, failure: str) -> None:
        super().__init__()
        self.failure = failure
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        with lm.deferred_init():
            self.net = nn.Linear(IN, 1)
            if self.failure == "item":
                self.net.weight.abs().max().item()  # refused by the recorder
            raise KeyError("missing config key 'hidden'")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        raise AssertionError("not reached")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("failure", "error", "match"),
    [
        (
            "item",
            lm.MaterializationError,
            r"aten\._local_scalar_dense.*test_guard_outside_tree\.py",
        ),
        ("key", KeyError, "missing config key"),
    ],
)
def test_an_error_inside_a_block_in_configure_model_is_what_the_user_reads(
    failure: str, error: type[Exception], match: str
) -> None:
    # (the line named is the user's, not Lightning's _EmptyInit around configure_model)
    with pytest.raises(error, match=match):
        trainer().fit(FailingBlock(failure), loader())


class Small(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _copying_callbacks() -> dict[str, Any]:
    from lightning.pytorch import callbacks

    made: dict[str, Any] = {
        "swa": lambda: callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1),
        "pruning": lambda: callbacks.ModelPruning(
            "l1_unstructured", amount=0.2, use_lottery_ticket_hypothesis=True, verbose=0
        ),
    }
    if hasattr(callbacks, "WeightAveraging"):  # Lightning >= 2.6
        made["weight_averaging"] = callbacks.WeightAveraging
    return made


@pytest.mark.parametrize("name", ["swa", "pruning", "weight_averaging"])
def test_callbacks_that_copy_the_model_in_setup_train_like_eager(name: str) -> None:
    # They deep-copy the module in their setup, before MetaGuard materialized it:
    # "Cannot copy out of meta tensor" when they moved the deferred copy.
    made = _copying_callbacks()
    if name not in made:
        pytest.skip("WeightAveraging needs Lightning >= 2.6")
    weights = []
    for deferred in (False, True):
        L.seed_everything(0, verbose=False)
        if deferred:
            with lm.deferred_init():
                model = Small()
        else:
            model = Small()
        trainer(max_epochs=2, callbacks=[lm.MetaGuard(), made[name]()]).fit(model, loader())
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
