"""A batch norm run in training mode inside ``deferred_init``: its running statistics.

torch's ``native_batch_norm`` kernel updates ``running_mean`` / ``running_var`` in place,
and its schema does not mark them as written (``Tensor? running_mean``). The recorder saw
no write, so ``materialize`` gave the statistics from before the forward, without an
error, while ``num_batches_tracked`` (a separate ``add_``) was right. A CNN whose
``__init__`` runs a dummy forward to size its head is the common case.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm
from support.program_models import trainer

_X = torch.tensor([[0.0, 0.0, 1.0, 3.0], [2.0, 4.0, -1.0, 0.5], [1.0, -2.0, 0.0, 2.0]])


class _Stats(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        self.bn = nn.BatchNorm1d(4)
        self.inorm = nn.InstanceNorm1d(4, track_running_stats=True)
        x = _X + torch.randn(3, 4)  # a drawn input: the replay must see the draw too
        if how == "module":
            self.bn(x)
        elif how == "functional":
            F.batch_norm(x, self.rm, self.rv, training=True, momentum=0.3)
        elif how == "torch.batch_norm":
            torch.batch_norm(x, None, None, self.rm, self.rv, True, 0.1, 1e-5, False)
        elif how == "instance_norm":
            self.inorm(x.t()[None])
        elif how == "eval":  # no update: the statistics stay, and nothing is refused
            self.bn.eval()
            self.bn(x)
            self.bn.train()
        elif how == "twice":
            self.bn(x)
            self.bn(x * 2)


@pytest.mark.parametrize(
    "how", ["module", "functional", "torch.batch_norm", "instance_norm", "eval", "twice"]
)
def test_running_statistics_updated_in_the_block_equal_eager(how: str) -> None:
    torch.manual_seed(0)
    eager = _Stats(how)
    after_eager = torch.get_rng_state()
    torch.manual_seed(0)
    with lm.deferred_init():
        deferred = _Stats(how)
    lm.materialize(deferred)
    assert torch.equal(torch.get_rng_state(), after_eager)
    want, got = eager.state_dict(), deferred.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    changed = {"module": "bn", "twice": "bn", "functional": "rm", "torch.batch_norm": "rm"}
    if how in changed:  # the case is about an update: one happened
        initial = torch.zeros(4)
        key = f"{changed[how]}.running_mean" if changed[how] == "bn" else "rm"
        assert not torch.equal(want[key], initial)
    if how == "instance_norm":
        assert not torch.equal(want["inorm.running_mean"], torch.zeros(4))


def test_running_statistics_of_a_captured_real_buffer_stay_refused() -> None:
    # A real tensor captured from outside the block is never written by the replay.
    real_mean, real_var = torch.zeros(4), torch.ones(4)

    def build() -> nn.Module:
        F.batch_norm(_X, real_mean, real_var, training=True)
        return nn.Linear(4, 4)

    with pytest.raises(lm.MaterializationError, match="real tensor captured"), lm.deferred_init():
        build()
    # In eval mode nothing is written: allowed.
    with lm.deferred_init():
        F.batch_norm(_X, real_mean, real_var, training=False)
        model = nn.Linear(4, 4)
    lm.materialize(model)
    assert torch.equal(real_mean, torch.zeros(4))


class _SizedByAForward(L.LightningModule):
    """A CNN whose __init__ runs a dummy forward (train mode) to size its head."""

    def __init__(self, build: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        with torch.no_grad():
            n = self.features(torch.ones(1, 3, 8, 8)).numel()
        self.head = nn.Linear(n, 2)

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.features(x).flatten(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(model: L.LightningModule) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,)))
    trainer(steps=2).fit(model, DataLoader(data, batch_size=4))  # MetaGuard among its callbacks
    return model.state_dict()


def test_a_deferred_cnn_sized_by_a_forward_trains_like_eager_under_metaguard() -> None:
    torch.manual_seed(0)
    eager = _SizedByAForward()
    torch.manual_seed(0)
    with lm.deferred_init():
        deferred = _SizedByAForward()
    # MetaGuard materializes it at fit's start.
    want, got = _fit(eager), _fit(deferred)
    for name in want:
        assert torch.equal(got[name], want[name]), name
