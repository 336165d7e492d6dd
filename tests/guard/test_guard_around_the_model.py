"""MetaGuard and what surrounds the LightningModule: the datamodule, the callbacks' order,
layers built in ``setup()``, and references taken before materializing.

A deferred module held by the LightningDataModule trained on uninitialised
memory without an error; a ``WeightAveraging`` listed before ``MetaGuard``
ended in torch's "Cannot copy out of meta tensor"; layers built in
``LightningModule.setup()`` were counted as built on the device; an optimizer
created in ``__init__`` was described as "not deferred" with a fix about
``MetaTemplate``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import MetaGuard
from support.guard_models import IN, PATCHED, Seeded, loader, net, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Features(L.LightningDataModule):
    """A frozen feature map (no bias: a meta matmul on the CPU raises nothing) applied to
    every batch after the transfer, built under ``deferred_init`` or eagerly."""

    def __init__(self, deferred: bool) -> None:
        super().__init__()
        if deferred:
            with lm.deferred_init():
                self.feat = nn.Linear(IN, IN, bias=False)
        else:
            self.feat = nn.Linear(IN, IN, bias=False)
        self.feat.requires_grad_(False)

    def train_dataloader(self) -> Any:
        return loader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return self.feat(x), y


def _fit_with_datamodule(deferred: bool) -> tuple[Seeded, Features]:
    L.seed_everything(0, verbose=False)
    datamodule = Features(deferred)
    model = Seeded("init" if deferred else "eager")
    trainer(max_epochs=1).fit(model, datamodule=datamodule)
    return model, datamodule


def test_a_deferred_module_held_by_the_datamodule_is_materialized_on_the_cpu() -> None:
    eager_model, eager_dm = _fit_with_datamodule(False)
    model, datamodule = _fit_with_datamodule(True)
    assert not datamodule.feat.weight.is_meta
    assert datamodule.feat.weight.device.type == "cpu"  # where eager construction leaves it
    assert torch.equal(datamodule.feat.weight, eager_dm.feat.weight)
    assert model.losses == eager_model.losses
    for (name, a), b in zip(
        model.state_dict().items(), eager_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@dataclasses.dataclass
class _Config:
    encoder: nn.Module


def test_a_deferred_module_the_datamodule_holds_out_of_reach_is_refused_with_its_path() -> None:
    # A dataclass is not a container materialize walks: left deferred, it is
    # refused before the first batch instead of computing with no data.
    class Configured(Features):
        def __init__(self) -> None:
            super().__init__(False)
            with lm.deferred_init():
                self.config = _Config(nn.Linear(IN, IN, bias=False))

    t = trainer(max_epochs=1)
    with pytest.raises(
        lm.MetaTensorError,
        match=r"(?s)LightningDataModule Configured.*'datamodule\.config\.encoder\.weight'",
    ) as info:
        t.fit(Seeded("init"), datamodule=Configured())
    assert info.value.paths == ("datamodule.config.encoder.weight",)
    assert not PATCHED & vars(t.strategy).keys()


def test_weight_averaging_listed_before_the_guard_is_refused_with_the_fix() -> None:
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks, "WeightAveraging"):
        pytest.skip("WeightAveraging needs Lightning >= 2.6")
    t = trainer(callbacks=[callbacks.WeightAveraging(), MetaGuard()])
    with pytest.raises(
        lm.MetaTensorError,
        match=r"(?s)WeightAveraging is listed before MetaGuard.*Fix: list MetaGuard before WeightAveraging",
    ) as info:
        t.fit(Seeded("init"), loader())
    assert "model.0.fc.weight" in info.value.paths
    assert isinstance(info.value.__cause__, NotImplementedError)  # torch's, from the copy's .to()
    assert not PATCHED & vars(t.strategy).keys()
    # In the order the fix names, the same run trains.
    model = Seeded("init")
    trainer(callbacks=[MetaGuard(), callbacks.WeightAveraging()], max_steps=2).fit(model, loader())
    assert lm.find_meta_tensors(model) == []


class _InSetup(Seeded):
    """``net()`` built under ``deferred_init`` in ``LightningModule.setup()``."""

    def __init__(self) -> None:
        super().__init__("configure")  # builds nothing in __init__

    def setup(self, stage: str) -> None:
        if self.model is None:
            with lm.deferred_init():
                self.model = net()

    def configure_model(self) -> None:  # not overridden below
        pass


class _InSetupOnly(_InSetup):
    configure_model = L.LightningModule.configure_model  # type: ignore[assignment]


class _InConfigure(Seeded):
    def __init__(self) -> None:
        super().__init__("configure")


@pytest.mark.parametrize(
    ("cls", "on_device"),
    [(_InSetupOnly, 0), (_InSetup, 0), (_InConfigure, 8)],
    ids=["setup-without-configure_model", "setup-with-configure_model", "configure_model"],
)
def test_only_tensors_built_in_configure_model_are_drawn_with_the_devices_generator(
    cls: type[Seeded], on_device: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Lightning enters its device context (model_sharded_context) only around an
    # overridden configure_model; setup() builds on the CPU, as eager code there.
    # On the CPU both generators coincide: the count MetaGuard logs is what differs.
    with caplog.at_level(logging.INFO, logger="lightning_meta._guard._callback"):
        trainer(max_steps=1).fit(cls(), loader())
    (message,) = [r.getMessage() for r in caplog.records if "MetaGuard materialized" in r.message]
    assert f"8 deferred tensors of {cls.__name__} on cpu, {on_device} of them" in message


class _OptimizerInInit(Seeded):
    """An optimizer created in ``__init__``, on the deferred parameters."""

    def __init__(self) -> None:
        super().__init__("init")
        self.optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer


def test_an_optimizer_created_in_init_trains_exactly_or_is_refused_with_the_right_fix() -> None:
    # Either materialize keeps the parameters' identity (the optimizer then
    # holds the real ones, as in eager code) or it is refused: never "not
    # deferred" with a fix about MetaTemplate for a module built deferred.
    class Eager(Seeded):
        def __init__(self) -> None:
            super().__init__("eager")
            self.optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.optimizer

    L.seed_everything(0, verbose=False)
    eager = Eager()
    trainer(max_steps=3).fit(eager, loader())
    L.seed_everything(0, verbose=False)
    model = _OptimizerInInit()
    refusal: lm.MetaTensorError | None = None
    try:
        trainer(max_steps=3).fit(model, loader())
    except lm.MetaTensorError as e:
        refusal = e
    if refusal is not None:
        message = str(refusal)
        assert "materialized elsewhere: a reference taken before materializing" in message
        assert "Fix: create optimizers after materializing (in configure_optimizers" in message
        assert "MetaTemplate" not in message and "not deferred" not in message
        assert "optimizer.param_groups.0.params.0" in refusal.paths
    else:
        assert model.losses == eager.losses
