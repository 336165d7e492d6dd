"""MetaGuard under a hostile review (the nineteenth round, 2026-12-07, fourth session).

- A callback that copies the weights in its ``setup`` (an L2-SP regulariser's or an
  EMA's snapshot), which Lightning runs before the strategy's setup where MetaGuard
  materializes, held meta copies no record fills: ``grad.sub_(meta)`` on the CPU
  computes nothing and raises nothing, and the run trained to other weights than
  eager's without an error (an EMA failed a full epoch later with torch's message).
  Refused before the first step now, naming the callback and ``on_fit_start``.
- A meta tensor kept by ``save_hyperparameters`` and read by the forward trained on
  uninitialised memory (losses 1e30, inf, nan) where ``lightning-meta check``
  reports it: refused before the first step, as ``check`` does.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


class _Model(L.LightningModule):
    def __init__(self, deferred: bool) -> None:
        super().__init__()
        if deferred:
            with lm.deferred_init():
                self.net = _net()
        else:
            self.net = _net()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _L2SP(Callback):
    """Pulls the weights towards a snapshot taken in ``setup`` or in ``on_fit_start``."""

    def __init__(self, when: str, how: str = "clone") -> None:
        self.when, self.how = when, how
        self.w0: Any = {}

    def _snapshot(self, pl_module: L.LightningModule) -> None:
        copies = {k: p.detach().clone() for k, p in pl_module.named_parameters()}
        if self.how == "double":  # a cast copy: another dtype than the model's
            self.w0 = {k: v.double() for k, v in copies.items()}
        elif self.how == "parameters":  # held by a module of the callback's own
            self.w0 = nn.ParameterDict(
                {
                    k.replace(".", "_"): nn.Parameter(v, requires_grad=False)
                    for k, v in copies.items()
                }
            )
        else:
            self.w0 = copies

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.when == "setup":
            self._snapshot(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.when == "on_fit_start":
            self._snapshot(pl_module)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        for k, p in pl_module.named_parameters():
            w0 = self.w0[k.replace(".", "_") if self.how == "parameters" else k]
            p.grad.add_(p.detach(), alpha=0.5).sub_(w0.to(p.dtype), alpha=0.5)


class _Other(Callback):
    """Holds a template of the model's shapes for torch.func and a shape: left alone."""

    def __init__(self) -> None:
        self.template = lm.MetaTemplate(_net())
        self.shape = torch.Size([16])


def _fit(model: L.LightningModule, callbacks: list[Callback], steps: int = 3, **kw: Any) -> None:
    torch.manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(24, 6), torch.randn(24, 1)), batch_size=8)
    options: dict[str, Any] = {"enable_progress_bar": False, **kw}
    L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **options,
    ).fit(model, data)


@pytest.mark.parametrize("how", ["clone", "double"])
def test_a_callbacks_copy_of_the_deferred_weights_in_setup_is_refused_before_the_first_step(
    how: str,
) -> None:
    # each trained to other weights than eager's without an error before (0.058 off)
    torch.manual_seed(0)
    model = _Model(deferred=True)
    with pytest.raises(lm.MetaTensorError, match=r"The callback _L2SP holds 4 meta tensors") as e:
        _fit(model, [lm.MetaGuard(), _L2SP("setup", how)])
    assert "_L2SP.on_fit_start" in str(e.value)
    assert len(e.value.paths) == 4
    assert model.net[0].weight.is_meta  # refused before anything was materialized


class _OnMetaOnPurpose(Callback):
    """What first versions of the check refused: a teacher built on meta and filled in
    on_fit_start, a model and an input on meta for measure_flops (Lightning's recipe),
    a probe; the input and the probe of the shapes of deferred weights (16 x 6, 16)."""

    def __init__(self) -> None:
        with torch.device("meta"):
            self.teacher = _net()
            self.flops_model = _net()
            self.flops_input = torch.randn(16, 6)
        self.probe = torch.empty(16, device="meta")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.fabric.utilities.throughput import measure_flops

        self.flops = measure_flops(self.flops_model, lambda: self.flops_model(self.flops_input))
        self.teacher.to_empty(device="cpu").load_state_dict(pl_module.net.state_dict())


class _Templates(_Model):
    def __init__(self, deferred: bool) -> None:
        super().__init__(deferred)
        with torch.device("meta"):
            self.templates = [_net()]  # held outside the tree on purpose


def test_modules_a_callback_holds_on_meta_on_purpose_are_left_alone() -> None:
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    on_purpose = _OnMetaOnPurpose()
    _fit(_Model(deferred=True), [lm.MetaGuard(), on_purpose])
    assert on_purpose.flops > 0 and not on_purpose.teacher[0].weight.is_meta
    # SWA deep-copies the model with its templates in setup
    swa = StochasticWeightAveraging(swa_lrs=0.1, swa_epoch_start=1)
    _fit(_Templates(deferred=True), [lm.MetaGuard(), swa], steps=6)


def test_a_meta_tensor_of_a_callback_listed_before_metaguard_is_refused_naming_the_order() -> None:
    # its setup ran before MetaGuard's: nothing tells its own meta input from a copy
    with pytest.raises(lm.MetaTensorError, match=r"The callback _OnMetaOnPurpose holds 2") as e:
        _fit(_Model(deferred=True), [_OnMetaOnPurpose(), lm.MetaGuard()])
    assert "listed before _OnMetaOnPurpose" in str(e.value)
    assert set(e.value.paths) == {"flops_input", "probe"}


@pytest.mark.parametrize("guard_first", [True, False])
def test_the_copy_taken_in_on_fit_start_trains_as_eager(guard_first: bool) -> None:
    weights = []
    for deferred in (False, True):
        torch.manual_seed(0)
        model = _Model(deferred)
        l2sp = _L2SP("on_fit_start")
        callbacks: list[Callback] = [l2sp, _Other()]
        if deferred:
            callbacks.insert(0 if guard_first else 2, lm.MetaGuard())
        _fit(model, callbacks)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


class _CopiesInSetup(_Model):
    def setup(self, stage: str) -> None:
        self.w0 = {k: p.detach().clone() for k, p in self.named_parameters()}


def test_the_models_own_copy_is_named_on_the_model_not_on_a_callback_bound_to_it() -> None:
    # Lightning binds callbacks' log to the module (log.__self__): the model's copy was
    # reported as the progress bar's, twice over, by a first version of the check
    with pytest.raises(lm.MetaTensorError, match=r"^_CopiesInSetup holds 4 meta tensors") as e:
        _fit(_CopiesInSetup(deferred=True), [lm.MetaGuard()], enable_progress_bar=True)
    assert "callback" not in str(e.value).split("\n")[0]


class _MetaHyperparameter(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters({"proj": torch.empty(6, 6, device="meta")})
        with lm.deferred_init():
            self.net = _net()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x @ self.hparams.proj), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_meta_hyperparameter_the_forward_reads_is_refused_before_the_first_step() -> None:
    model = _MetaHyperparameter()
    with pytest.raises(
        lm.MetaTensorError,
        match=r"in its hyperparameters \('_hparams.proj', '_hparams_initial.proj'",
    ) as e:
        _fit(model, [lm.MetaGuard()])
    assert "save_hyperparameters(ignore=[...])" in str(e.value)


class _Features(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Computes each sample with a frozen feature extractor (no datamodule)."""

    def __init__(self, features: nn.Module, ids: torch.Tensor) -> None:
        self.features, self.ids = features, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            f = self.features(self.ids[i])
        return f.sum(0), (f.sum() > 0).float().reshape(1)


class _Head(L.LightningModule):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.losses: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.head(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.losses.append(nn.functional.mse_loss(self.head(x), y).item())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_deferred_module_a_dataset_holds_without_a_datamodule_is_materialized_as_eager() -> None:
    # passed straight to fit: torch's "Cannot copy out of meta tensor" before (in the
    # first batch's transfer, or in a worker)
    losses = []
    for deferred in (False, True):
        torch.manual_seed(0)

        def build() -> tuple[nn.Module, nn.Module]:
            return nn.Sequential(nn.Embedding(50, 6), nn.Linear(6, 6)), nn.Linear(6, 1)

        if deferred:
            with lm.deferred_init():
                features, head = build()
        else:
            features, head = build()
        ids = torch.randint(0, 50, (32, 3))
        model = _Head(head)
        # workers start before the stage's first hook; the dataset is wrapped (a later
        # version of the fix materialized at on_train_start, too late for both)
        train = DataLoader(
            torch.utils.data.Subset(_Features(features, ids), range(32)),
            batch_size=8,
            num_workers=2,
        )
        val = DataLoader(_Features(features, ids[:8]), batch_size=8)
        L.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[lm.MetaGuard()],
        ).fit(model, train, [val])
        assert not features[0].weight.is_meta
        losses.append(model.losses)
    assert losses[0] == losses[1]
