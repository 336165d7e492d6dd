"""What users do to a deferred model after its block that needs real values.

Moving it off meta (``.to(device)``, ``.cpu()``, ``.share_memory()``, a
Trainer without ``MetaGuard``) raised torch's "Cannot copy out of meta
tensor", whose advice (``to_empty()``) gives uninitialised memory; torch's
weight utilities applied to it (``prune``, the hook-based ``weight_norm`` and
``spectral_norm``, a parametrization) made meta tensors that ``materialize``
called "not built under deferred_init", advising a fallback that then
refused; with torch's swap-on-conversion flag, a plain ``load_state_dict``
after ``materialize`` failed on weak references kept alive by a reference
cycle, and one into the deferred model raised torch's weakref error.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from test_deferred import assert_same_as_eager
from torch import nn
from torch.nn.utils import parametrizations, prune
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm
from lightning_meta import MaterializationError, MetaTensorError, deferred_init, materialize


def _build() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _deferred() -> nn.Sequential:
    torch.manual_seed(0)
    with deferred_init():
        return _build()


def _eager() -> nn.Sequential:
    torch.manual_seed(0)
    return _build()


MOVES: dict[str, Callable[[nn.Module], object]] = {
    "cpu": lambda m: m.cpu(),
    "to_device": lambda m: m.to("cpu"),
    "to_device_and_dtype": lambda m: m.to(torch.device("cpu"), torch.float64),
    "to_tensor": lambda m: m.to(torch.zeros(1, dtype=torch.float64)),
    "share_memory": lambda m: m.share_memory(),
}


@pytest.mark.parametrize("move", sorted(MOVES))
def test_moving_a_deferred_model_off_meta_names_the_tensor_and_materialize(move: str) -> None:
    model = _deferred()
    with pytest.raises(MetaTensorError) as caught:
        MOVES[move](model)
    e = caught.value
    # Still torch's kind of error, so code catching that catches this one.
    assert isinstance(e, NotImplementedError)
    assert e.paths == ("0.weight",)
    message = str(e)
    assert "Cannot copy out of meta tensor" in message
    assert "Sequential's '0.weight'" in message
    assert "lightning_meta.materialize(model, device=" in message
    assert "MetaGuard()" in message and "to_empty()" in message
    # Nothing was moved or changed: the model still materializes as eagerly.
    materialize(model)
    assert_same_as_eager(_eager(), model)


def test_moves_that_stay_on_meta_still_work() -> None:
    model = _deferred()
    model.to("meta")
    model.to(device=torch.device("meta"))
    model[0].weight.to(torch.float64)  # a new tensor, as torch's; the model is unchanged
    assert model[0].weight.is_meta
    materialize(model)
    assert_same_as_eager(_eager(), model)


def test_a_lone_deferred_tensor_moved_off_meta_is_named_by_what_it_is() -> None:
    model = _deferred()
    with pytest.raises(
        MetaTensorError, match=r"\.cpu\(\) of a deferred tensor \(Parameter of shape \(4, 4\)"
    ):
        model[0].weight.cpu()
    with pytest.raises(NotImplementedError, match=r"\.to\('cpu'\) of a deferred tensor"):
        model[1].running_mean.to("cpu")


class _Fits(L.LightningModule):
    def __init__(self, prune_at_start: bool = False) -> None:
        super().__init__()
        self.prune_at_start = prune_at_start
        with deferred_init():
            self.net = _build()

    def on_fit_start(self) -> None:
        if self.prune_at_start:
            prune.l1_unstructured(self.net[0], "weight", amount=0.5)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def _data() -> DataLoader[tuple[torch.Tensor, ...]]:
    return DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2)


def test_a_trainer_without_metaguard_names_the_tensor_and_metaguard() -> None:
    # The bug report this package started from, with a deferred model: the
    # strategy's model.to(root_device), then its teardown's model.cpu().
    with pytest.raises(MetaTensorError) as caught:
        _trainer([]).fit(_Fits(), _data())
    assert "_Fits's 'net.0.weight'" in str(caught.value)
    assert "MetaGuard()" in str(caught.value)


UTILITIES: dict[str, tuple[Callable[[nn.Module], object], list[str], str]] = {
    "prune": (
        lambda m: prune.l1_unstructured(m, "weight", amount=0.5),
        ["0.weight", "0.weight_mask"],
        "torch.nn.utils.prune",
    ),
    "hook_weight_norm": (
        lambda m: nn.utils.weight_norm(m),
        ["0.weight", "0.weight_g", "0.weight_v"],
        "torch.nn.utils.weight_norm",
    ),
    "hook_spectral_norm": (
        lambda m: nn.utils.spectral_norm(m),
        ["0.weight", "0.weight_u", "0.weight_v"],
        "torch.nn.utils.spectral_norm",
    ),
    "parametrizations_weight_norm": (
        lambda m: parametrizations.weight_norm(m),
        ["0.parametrizations.weight.original0", "0.parametrizations.weight.original1"],
        "a parametrization",
    ),
}


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated")
@pytest.mark.parametrize("fallback", [None, "reset_parameters"])
@pytest.mark.parametrize("utility", sorted(UTILITIES))
def test_a_weight_utility_applied_after_the_block_is_named_with_the_fix(
    utility: str, fallback: str | None
) -> None:
    apply, paths, named = UTILITIES[utility]
    model = _deferred()
    apply(model[0])
    with pytest.raises(MaterializationError) as caught:
        materialize(model, fallback=fallback)  # type: ignore[arg-type]
    assert caught.value.paths == tuple(paths)
    message = str(caught.value)
    assert f"{paths} by {named}" in message
    assert "apply it after lightning_meta.materialize" in message
    assert "not built under deferred_init" not in message


def test_pruning_in_on_fit_start_under_metaguard_prunes_eagers_values() -> None:
    # The fix the refusal above gives: MetaGuard materializes before on_fit_start.
    torch.manual_seed(0)
    deferred = _Fits(prune_at_start=True)
    _trainer([lm.MetaGuard()]).fit(deferred, _data())
    torch.manual_seed(0)
    eager = _build()
    prune.l1_unstructured(eager[0], "weight", amount=0.5)
    assert torch.equal(deferred.net[0].weight_mask, eager[0].weight_mask)


@pytest.fixture
def swapping() -> Iterator[None]:
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


@pytest.mark.usefixtures("swapping")
def test_load_state_dict_after_materialize_with_torchs_swap_flag() -> None:
    state = _eager().state_dict()
    model = _deferred()
    enabled = gc.isenabled()
    gc.disable()  # a reference cycle must not be what keeps the load working
    try:
        materialize(model)
        assert weakref.getweakrefcount(model[0].weight) == 0
        model.load_state_dict(state)
    finally:
        if enabled:
            gc.enable()
    assert_same_as_eager(_eager(), model)


@pytest.mark.usefixtures("swapping")
@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_into_a_deferred_model_with_torchs_swap_flag_is_refused(
    assign: bool, tmp_path: Path
) -> None:
    state = _eager().state_dict()
    model = _deferred()
    with pytest.raises(MaterializationError) as caught:
        model.load_state_dict(state, assign=assign)
    assert caught.value.paths == ("0.bias", "0.weight")
    assert "set_swap_module_params_on_conversion(True)" in str(caught.value)
    assert "lightning_meta.load_checkpoint(model, path)" in str(caught.value)
    # The fix it names works.
    torch.save(state, tmp_path / "state.pt")
    lm.load_checkpoint(model, tmp_path / "state.pt")
    assert_same_as_eager(_eager(), model)
