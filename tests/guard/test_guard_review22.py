"""MetaGuard and the search under a hostile review (2026-12-07, seventh session).

- A meta tensor inside a ``torch.distributions`` object (a weight-noise
  regulariser ``D.Normal(torch.zeros_like(self.head.weight), 0.05)`` made after
  the block) was never searched: objects of torch were passed over whole. A
  Trainer run under ``MetaGuard`` trained on uninitialised memory (losses 1e12,
  inf) and ``assert_no_meta`` passed. Refused before the first step now.
- A reference to a module's own tensor taken inside the block
  (``functools.partial(F.linear, weight=self.head.weight)`` in ``__init__``) was
  refused with a fix to register the tensor on the module, which it already was.
  The refusal names the tensor it is and the fix that works.

Each test but the control that follows the fix failed on 08308e5, the tree before them.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributions as D
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm


def _loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
    return DataLoader(data, batch_size=4)


def _trainer() -> L.Trainer:
    return L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[lm.MetaGuard()],
    )


class _Noisy(L.LightningModule):
    """Adds weight noise drawn from a distribution shaped like the head."""

    def __init__(self, deferred: bool) -> None:
        super().__init__()
        self.deferred = deferred

    def configure_model(self) -> None:
        if hasattr(self, "head"):
            return
        if self.deferred:
            with lm.deferred_init():
                self.head = nn.Linear(4, 1)
        else:
            self.head = nn.Linear(4, 1)
        # made after the block from a deferred tensor: on meta, with no values
        self.noise = D.Normal(torch.zeros_like(self.head.weight), 0.05, validate_args=False)

    def training_step(self, batch: Any, i: int) -> torch.Tensor:
        x, y = batch
        out = self.head(x) + F.linear(x, self.noise.sample())
        return (out - y).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_meta_tensor_in_a_distribution_is_refused_before_the_first_step() -> None:
    L.seed_everything(0, verbose=False)
    eager = _Noisy(deferred=False)
    _trainer().fit(eager, _loader())  # the control: trains
    model = _Noisy(deferred=True)
    with pytest.raises(lm.MetaTensorError, match=r"'noise\.loc'") as caught:
        _trainer().fit(model, _loader())
    assert "'noise.scale'" in str(caught.value)
    found = {f.path for f in lm.find_meta_tensors(model)}
    assert {"noise.loc", "noise.scale"} <= found
    with pytest.raises(lm.MetaTensorError, match=r"noise\.loc"):
        lm.assert_no_meta(model)


def test_a_distribution_built_in_the_block_is_found_and_its_fix_says_build_it_after() -> None:
    class Prior(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.prior = D.Normal(torch.zeros(4), torch.ones(4))

    with lm.deferred_init():
        model = Prior()
    lm.materialize(model)
    found = {f.path: f for f in lm.find_meta_tensors(model)}
    assert set(found) == {"prior.loc", "prior.scale"}
    assert found["prior.loc"].escaped is not None and found["prior.loc"].escaped_as is None
    with pytest.raises(lm.MetaTensorError, match="torch.distributions object"):
        lm.assert_no_meta(model)


class _Readout(L.LightningModule):
    """Keeps a ``functools.partial`` over its head's weight, taken in ``__init__``."""

    def __init__(self, through_module: bool = False) -> None:
        super().__init__()
        self.head = nn.Linear(4, 1)
        self.through_module = through_module
        self.readout = functools.partial(F.linear, weight=self.head.weight)

    def training_step(self, batch: Any, i: int) -> torch.Tensor:
        x, y = batch
        # the fix: read it through the module at call time
        out = F.linear(x, self.head.weight) if self.through_module else self.readout(x)
        return (out - y).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_reference_to_the_modules_own_tensor_taken_in_the_block_is_named_as_such() -> None:
    with lm.deferred_init():
        model = _Readout()
    (finding,) = [f for f in lm.find_meta_tensors(model) if not f.deferred]
    assert finding.path == "readout.keywords.weight"
    assert finding.escaped_as == "head.weight"
    with pytest.raises(lm.MetaTensorError) as caught:
        _trainer().fit(model, _loader())
    said = str(caught.value)
    assert "as 'head.weight', held by a reference taken inside the block" in said
    assert "read the tensor through the module when it is used" in said
    # before, the fix was to register it on a module built in the block, which it was
    assert "register it on a module built in the block" not in said
    lm.materialize(model)
    with pytest.raises(lm.MetaTensorError, match="it is 'head.weight' as the block made it"):
        model.readout(torch.randn(2, 4))


def test_following_the_fix_trains_as_eager() -> None:
    L.seed_everything(0, verbose=False)
    eager = _Readout(through_module=True)
    _trainer().fit(eager, _loader())
    L.seed_everything(0, verbose=False)
    with lm.deferred_init():
        model = _Readout(through_module=True)
    model.readout = None  # the object holding the reference, built after materialize if needed
    _trainer().fit(model, _loader())
    assert torch.equal(model.head.weight, eager.head.weight)
    assert torch.equal(model.head.bias, eager.head.bias)


def test_an_escaped_reference_keeps_no_model_alive_and_names_a_replaced_module() -> None:
    import gc
    import weakref

    class Base(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 1)
            self.readout = functools.partial(F.linear, weight=self.head.weight)

    class Replaced(Base):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)  # the base's head is dropped; the partial keeps its weight

    with lm.deferred_init():
        model = Replaced()
    (finding,) = [f for f in lm.find_meta_tensors(model) if f.escaped is not None]
    # a second look: named 'weight', a path the model does not have
    assert finding.escaped_as == "Linear.weight"
    kept = model.readout
    lm.materialize(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    # a second look: the escaped tensor's name kept the block's modules, so the model
    assert alive() is None
    del kept
