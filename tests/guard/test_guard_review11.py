"""MetaGuard under a hostile review (eleventh round): a deferred module the guard cannot reach
from the model was named a fix, "compute from on_fit_start on", that a training step already
follows."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm


class _HeadOnTheClass(L.LightningModule):
    head: ClassVar[Any] = None

    def __init__(self) -> None:
        super().__init__()
        with lm.deferred_init():
            self.lin = nn.Linear(6, 6)
            type(self).head = nn.Linear(6, 1)  # outside every search of the model

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return type(self).head(self.lin(batch[0])).pow(2).mean()  # type: ignore[no-any-return]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_deferred_module_outside_the_model_is_named_with_a_fix_that_applies() -> None:
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[lm.MetaGuard()],
    )
    data = DataLoader(TensorDataset(torch.randn(16, 6)), batch_size=8)
    try:
        with pytest.raises(lm.MetaTensorError, match=r"a class attribute, a global\) stays "):
            trainer.fit(_HeadOnTheClass(), data)
    finally:
        _HeadOnTheClass.head = None
