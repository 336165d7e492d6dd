"""Templates and ensembles through the whole Lightning lifecycle on one CPU device."""

from __future__ import annotations

import copy
import pickle
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary
from lightning.pytorch.utilities.model_summary import summarize
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm
from support.lightning_models import AllTemplates, loader, mlp, real_state, templates_are_meta


def make_trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_the_seed_pattern_crashes_plain_lightning(tmp_path: Path) -> None:
    """The problem this package exists for: a registered meta copy breaks fit."""

    class Seed(AllTemplates):
        def __init__(self) -> None:
            super().__init__()
            self.base_model = copy.deepcopy(mlp()).to("meta")

    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        make_trainer(tmp_path, max_epochs=1).fit(Seed(), loader())


def test_full_lifecycle(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = AllTemplates()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, callbacks=[checkpoint])
    before = real_state(model)
    trainer.fit(model, loader(), loader())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert templates_are_meta(model)
    assert trainer.validate(model, loader(), verbose=False)[0]["val_loss"] > 0
    assert trainer.test(model, loader(), verbose=False)[0]["test_loss"] > 0
    predictions = trainer.predict(model, loader())
    assert predictions is not None and len(predictions) == 4
    assert predictions[0].shape == (16, 1)

    # The checkpoint holds the real tensors and nothing of the templates.
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert sorted(saved["state_dict"]) == sorted(model.state_dict())
    assert all(not v.is_meta for v in saved["state_dict"].values())
    assert not any("template" in k for k in saved["state_dict"])

    loaded = AllTemplates.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert_same_state(loaded, model)
    assert templates_are_meta(loaded)
    model.eval()
    loaded.eval()
    x = torch.randn(7, 6)
    torch.testing.assert_close(loaded(x), model(x))
    ens = loaded.ensemble
    torch.testing.assert_close(ens(x), torch.stack([ens.member(i)(x) for i in range(len(ens))]))

    resumed = AllTemplates()
    trainer2 = make_trainer(tmp_path, max_epochs=3)
    trainer2.fit(resumed, loader(), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer2.current_epoch == 3 and trainer2.global_step == 12
    assert templates_are_meta(resumed)


def test_model_summary_counts_only_real_parameters(tmp_path: Path) -> None:
    model = AllTemplates()
    real = sum(p.numel() for p in model.parameters())
    template_params = sum(p.numel() for p in model.net_template.module.parameters())
    assert template_params > 0
    summary = summarize(model, max_depth=1)
    assert summary.total_parameters == real
    assert summary.trainable_parameters == real
    trainer = make_trainer(
        tmp_path, max_epochs=1, callbacks=[ModelSummary(max_depth=2)], enable_model_summary=True
    )
    trainer.fit(model, loader())


def test_deepcopy_pickle_and_hyperparameters() -> None:
    model = AllTemplates(members=3, hidden=8).eval()
    assert model.hparams == {"members": 3, "hidden": 8, "lr": 0.05, "execution": "auto"}
    x = torch.randn(2, 6)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert_same_state(clone, model)
        assert templates_are_meta(clone)
        assert clone.hparams == model.hparams
        torch.testing.assert_close(clone(x), model(x))


class RecordingSGD(torch.optim.SGD):
    """Records the total gradient norm each step sees (after Lightning clipped it)."""

    norms: list[float]

    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(
            float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
        )
        super().step()
        return loss


def test_gradient_clipping(tmp_path: Path) -> None:
    class Clipped(AllTemplates):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            opt = RecordingSGD(self.parameters(), lr=0.05)
            opt.norms = []
            self.opt = opt
            return opt

    model = Clipped()
    make_trainer(tmp_path, max_epochs=1, gradient_clip_val=1e-3).fit(model, loader())
    assert model.opt.norms and max(model.opt.norms) <= 1e-3 * 1.001


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precision(tmp_path: Path, precision: str) -> None:
    model = AllTemplates()
    trainer = make_trainer(
        tmp_path,
        max_epochs=1,
        precision=precision,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt")],
    )
    trainer.fit(model, loader(), loader())
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert templates_are_meta(model)
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert model.ensemble.stacked.get_parameter("0.weight").dtype == expected
    loaded = AllTemplates.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)  # type: ignore[union-attr]
    assert templates_are_meta(loaded)


class LogsOutsideTheStep(AllTemplates):
    """Logs from a hook that is not compiled.

    With torch 2.13 and Lightning 2.6.6, ``self.log`` inside a compiled
    ``training_step`` fails in dynamo (``inspect.signature`` on a
    ``torch.compile``-wrapped method) for *any* LightningModule, with or
    without templates; the loss is logged from ``on_train_batch_end`` instead.
    """

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train_loss", outputs["loss"])


@pytest.mark.parametrize("execution", ["auto", "vmap"])
def test_torch_compile(tmp_path: Path, execution: str) -> None:
    model = LogsOutsideTheStep(execution=execution)
    compiled = torch.compile(model)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(compiled, loader())  # type: ignore[arg-type]
    # Templates are built eagerly: dynamo warned it could not trace functorch's objects.
    assert not [w for w in caught if "Dynamo does not know" in str(w.message)]
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert templates_are_meta(model)
    eager = LogsOutsideTheStep(execution=execution)
    eager.load_state_dict(model.state_dict())
    eager.eval()
    model.eval()
    x = torch.randn(3, 6)
    torch.testing.assert_close(torch.compile(model)(x), eager(x))


def test_stochastic_weight_averaging(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    model = AllTemplates()
    trainer = make_trainer(
        tmp_path,
        max_epochs=3,
        callbacks=[StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)],
    )
    trainer.fit(model, loader())
    assert templates_are_meta(model)
    assert torch.isfinite(model(torch.randn(2, 6))).all()


def test_a_buffer_members_register_in_forward_is_trained_and_checkpointed(tmp_path: Path) -> None:
    class Peak(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            if "peak" not in self._buffers:
                self.register_buffer("peak", y.detach().abs().amax())
            else:
                self.peak = torch.maximum(self.peak, y.detach().abs().amax())
            return y / (1 + self.peak)

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.ensemble = lm.Ensemble.from_factory(Peak, 3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return ((self.ensemble(x) - y) ** 2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Model()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, max_epochs=1, callbacks=[checkpoint]).fit(model, loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert saved["ensemble.stacked.peak"].shape == (3,)
    assert torch.equal(saved["ensemble.stacked.peak"], model.ensemble.tensors()["peak"])
    assert model.ensemble.template.module.peak.is_meta
    assert torch.equal(model.ensemble.member(2).peak, saved["ensemble.stacked.peak"][2])


def test_weight_averaging(tmp_path: Path) -> None:
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks, "WeightAveraging"):
        pytest.skip(f"Lightning {L.__version__} has no WeightAveraging callback (added in 2.6)")
    WeightAveraging = callbacks.WeightAveraging

    model = AllTemplates()
    trainer = make_trainer(
        tmp_path, max_epochs=2, callbacks=[WeightAveraging()], enable_checkpointing=True
    )
    trainer.fit(model, loader(), loader())
    assert templates_are_meta(model)
    assert torch.isfinite(model(torch.randn(2, 6))).all()


def test_model_pruning_of_every_real_layer(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelPruning

    model = AllTemplates()
    trainer = make_trainer(
        tmp_path, max_epochs=2, callbacks=[ModelPruning("l1_unstructured", amount=0.5)]
    )
    trainer.fit(model, loader(), loader())
    assert templates_are_meta(model)
    # ModelPruning made the pruning permanent at the end of fit; half the
    # stacked ensemble weights (and the real layers') are now zero.
    stacked = model.ensemble.stacked.get_parameter("0.weight")
    assert 0.4 < float((stacked == 0).float().mean()) < 0.8
    assert float((model.net[0].weight == 0).float().mean()) > 0.4
    model.eval()
    x = torch.randn(4, 6)
    ens = model.ensemble
    torch.testing.assert_close(ens(x), torch.stack([ens.member(i)(x) for i in range(len(ens))]))


class ModesAfterValidation(L.LightningModule):
    """An ensemble with BatchNorm and dropout, one member's BatchNorm frozen by the user."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        members = [
            nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1))
            for _ in range(3)
        ]
        self.ens = lm.Ensemble(members, execution="loop")
        self.seen: list[tuple[str, tuple[bool, ...]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ens(x)
        modes = tuple(m.training for m in self.ens.template.module.modules())
        self.seen.append(("train" if self.training else "eval", modes))
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).square().mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("frozen", [False, True])
def test_modes_come_back_after_validation(tmp_path: Path, frozen: bool) -> None:
    # Lightning puts modes back after validation by setting `training` on every
    # module it sees; the ensemble's template must follow, submodule by submodule.
    model = ModesAfterValidation()
    if frozen:
        model.ens.template.module[1].eval()  # the BatchNorm: running stats frozen
    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=8)
    make_trainer(tmp_path, max_epochs=2, num_sanity_val_steps=1).fit(model, data, data)
    train_modes = {modes for mode, modes in model.seen if mode == "train"}
    eval_modes = {modes for mode, modes in model.seen if mode == "eval"}
    assert eval_modes == {(False,) * 5}
    assert train_modes == {(True, True, not frozen, True, True)}
    assert len(model.seen) == 2 * 2 + 2 * 2 + 1  # 2 epochs x (2 train + 2 val) + sanity


class Member(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lin = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_lightning_members_differing_in_hyperparameters_only() -> None:
    # A deep ensemble of LightningModules trained with different learning
    # rates: save_hyperparameters' private record is not a setting forward reads.
    members = [Member(lr) for lr in (1e-3, 3e-4)]
    ens = lm.Ensemble(members)
    x = torch.randn(2, 4)
    torch.testing.assert_close(ens(x), torch.stack([m.lin(x) for m in members]))


def frozen_bn_net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1))
    net[1].eval()  # frozen BatchNorm: Lightning keeps it in eval during fit
    return net


class FollowsTheNet(L.LightningModule):
    """Compares template(state_from(net), x) with net(x) in every stage, same dropout draws."""

    def __init__(self) -> None:
        super().__init__()
        self.net = frozen_bn_net()
        self.template = lm.MetaTemplate(self.net)
        self.diffs: dict[str, float] = {}
        self.stats_changed = False

    @lm.meta_template
    def on_demand(self) -> nn.Module:
        return frozen_bn_net()

    def compare(self, stage: str, x: torch.Tensor) -> torch.Tensor:
        stats = self.net[1].running_mean.clone(), int(self.net[1].num_batches_tracked)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            want = self.net(x)
        for name, template in (("attribute", self.template), ("meta_template", self.on_demand)):
            with torch.random.fork_rng():
                torch.manual_seed(1)
                got = template(template.state_from(self.net), x)
            key = f"{stage} {name}"
            self.diffs[key] = max(self.diffs.get(key, 0.0), (got - want).abs().max().item())
        bn = self.net[1]
        self.stats_changed |= not torch.equal(bn.running_mean, stats[0])
        self.stats_changed |= int(bn.num_batches_tracked) != stats[1]
        return want

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.compare("fit", batch[0]).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.compare("validate", batch[0])

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.compare("predict", batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.filterwarnings("ignore:Found 1 module.s. in eval mode")
def test_a_template_called_with_state_from_runs_in_the_net_modes(tmp_path: Path) -> None:
    """model.eval() (validate, predict) and a frozen submodule reach the template call."""
    model = FollowsTheNet()
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    trainer.fit(model, loader(), loader())
    trainer.validate(model, loader(), verbose=False)
    trainer.predict(model, loader())
    assert {k.split()[0] for k in model.diffs} == {"fit", "validate", "predict"}
    assert all(d == 0.0 for d in model.diffs.values()), model.diffs
    assert not model.stats_changed  # the frozen BatchNorm's running stats are the net's
