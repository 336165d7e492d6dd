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
from typing import Any

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


def test_to_with_copy_and_under_fx_tracing_answers_as_torch() -> None:
    # Tensor.to's own argument parser takes `copy`; torch.fx passes proxies:
    # both went through before the refusal of moves off meta, and still do.
    model = _deferred()
    assert model[1].running_mean.to(dtype=torch.float64, copy=True).dtype == torch.float64
    assert model[0].weight.to("meta", copy=True).is_meta
    assert model[0].weight.to(torch.half, False, False).dtype == torch.half
    with pytest.raises(NotImplementedError, match="deferred tensor"):
        model[0].weight.to("cpu", copy=True)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.lin(x) * self.scale.to(x.device)
            return out

    torch.manual_seed(0)
    with deferred_init():
        scaled = Scaled()
    traced = torch.fx.symbolic_trace(scaled)
    materialize(traced)
    torch.manual_seed(0)
    eager = Scaled()
    x = torch.randn(2, 4)
    torch.testing.assert_close(traced(x), eager(x), rtol=0, atol=0)


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
def test_load_state_dict_completing_each_block_loads_with_torchs_swap_flag(assign: bool) -> None:
    # Each block's tensors all filled by its module's load: the block is
    # released before torch swaps, so nothing holds a weak reference.
    torch.manual_seed(1)
    source = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 4))
    layers = []
    for make in (lambda: nn.Embedding(10, 4), lambda: nn.LayerNorm(4), lambda: nn.Linear(4, 4)):
        with deferred_init():
            layers.append(make())
    model = nn.Sequential(*layers)
    model.load_state_dict(source.state_dict(), assign=assign)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert type(model[2].weight) is nn.Parameter


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


class _Rotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("inv_freq", torch.rand(2), persistent=False)


def test_buffer_casts_after_the_block_are_named_with_the_trainer_route() -> None:
    # A floating-point buffer module.to() replaces is refused (guarantees.md); the
    # message named it "(Tensor in torch.float32, deferred in torch.float32)"
    # after .half().float() and gave Fabric's route but not the Trainer's.
    with deferred_init():
        model = _Rotary()
    model.half().float()
    with pytest.raises(
        MaterializationError, match=r"inv_freq \(a new Tensor of its shape and dtype\)"
    ):
        materialize(model)
    with deferred_init():
        model = _Rotary()
    model.half()
    with pytest.raises(MaterializationError, match=r"in a Trainer \(MetaGuard\), drop the cast"):
        materialize(model)


class _Derived(L.LightningModule):
    def __init__(self, variant: str) -> None:
        super().__init__()
        with deferred_init():
            self.net = _build()
        if variant == "weight_norm":
            parametrizations.weight_norm(self.net[0])
        else:
            self.delta = nn.Parameter(self.net[0].weight.detach().clone())

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("variant", "says"),
    [
        ("weight_norm", r"by a parametrization .* apply it after lightning_meta.materialize"),
        ("derived", r"(?s)'delta' .*Next to deferred tensors, a meta tensor that is not deferred"),
    ],
)
def test_metaguard_names_tensors_made_from_deferred_ones_after_the_block(
    variant: str, says: str
) -> None:
    # Before: "not deferred ... Fix: keep a stateless copy as MetaTemplate(module),
    # or build the module inside deferred_init", which it was.
    with pytest.raises(MetaTensorError, match=says) as caught:
        _trainer([lm.MetaGuard()]).fit(_Derived(variant), _data())
    assert "keep a stateless copy" not in str(caught.value)


# -- computing with a deferred model before materialize -------------------------------------


class _MatmulNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))
        self.register_buffer("shift", torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w) + self.shift


@pytest.mark.parametrize(
    "use",
    [
        lambda m, x: m(x),  # x @ w: torch's CPU matmul returned uninitialised memory
        lambda m, x: x @ m.w,
        lambda m, x: torch.matmul(x, m.w),
        lambda m, x: torch.nn.functional.linear(torch.ones(3, 8), m.w),
        lambda m, x: torch.addmm(torch.zeros(8), x, m.w),
        lambda m, x: torch.mm(x, m.w, out=torch.empty(3, 8)),
    ],
    ids=["forward", "at", "matmul", "linear", "addmm", "mm-out"],
)
def test_a_real_result_computed_from_a_deferred_tensor_is_refused(
    use: Callable[..., Any],
) -> None:
    torch.manual_seed(0)
    with deferred_init():
        m = _MatmulNet()
    x = torch.ones(3, 4)
    with pytest.raises(
        MetaTensorError,
        match=r"computed a real cpu tensor from a deferred (Parameter|Tensor) of shape .*"
        r"Fix: materialize first.*pass meta inputs",
    ):
        use(m, x)
    materialize(m)  # nothing was changed: the model still materializes, and computes
    torch.manual_seed(0)
    eager = _MatmulNet()
    assert torch.equal(m(x), eager(x))


def test_torchs_device_error_on_a_deferred_tensor_is_the_packages() -> None:
    # nn.Linear with its meta bias: torch's "Tensor on device meta is not on
    # the expected device cpu!" named neither the tensor nor a way out.
    with deferred_init():
        lin = nn.Linear(4, 8)
    with pytest.raises(
        MetaTensorError, match=r"linear got a real cpu tensor and a deferred Parameter .*Fix:"
    ) as info:
        lin(torch.ones(3, 4))
    assert "expected device" in str(info.value.__cause__)


@pytest.mark.parametrize(
    ("use", "on_meta"),
    [
        (lambda m: torch.nn.functional.embedding(torch.tensor([0, 2]), m.w), True),
        (lambda m: m.w * torch.tensor(2.0), True),  # a 0-dim CPU tensor goes with any device
        (lambda m: torch.clamp(m.shift, max=torch.tensor(4.6)), True),
        (lambda m: torch.arange(32.0).view_as(m.w), False),  # a load hook's reshape
        (lambda m: torch.ones(8).type_as(m.shift), True),
    ],
    ids=["embedding-cpu-ids", "0-dim-factor", "0-dim-clamp", "view_as", "type_as"],
)
def test_ops_that_make_no_value_from_a_deferred_tensor_answer_as_torch(
    use: Callable[..., torch.Tensor], on_meta: bool
) -> None:
    # A first version refused every op with a real tensor beside a deferred
    # one: FLOP counts with CPU ids, 0-dim factors, and load hooks broke.
    with deferred_init():
        m = _MatmulNet()
    assert use(m).is_meta == on_meta


def test_a_deferred_model_computed_with_in_setup_is_refused_and_on_fit_start_works() -> None:
    # Lightning runs LightningModule.setup() before the strategy's setup,
    # where MetaGuard materializes: the forward there computed with meta
    # weights, and fit trained on the uninitialised memory it returned.
    class Centered(L.LightningModule):
        def __init__(self, where: str) -> None:
            super().__init__()
            with deferred_init():
                self.net = _MatmulNet()
            self.where = where

        def _center(self) -> None:
            with torch.no_grad():
                self.center = self.net(torch.ones(3, 4)).mean(0)

        def setup(self, stage: str) -> None:
            if self.where == "setup":
                self._center()

        def on_fit_start(self) -> None:
            if self.where == "on_fit_start":
                self._center()

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            return (self.net(batch[0]) - self.center).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(where: str) -> Centered:
        torch.manual_seed(0)
        model = Centered(where)
        data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False, callbacks=[lm.MetaGuard()],
        )  # fmt: skip
        trainer.fit(model, data)
        return model

    with pytest.raises(MetaTensorError, match=r"under MetaGuard, .* from on_fit_start on"):
        fit("setup")
    model = fit("on_fit_start")
    torch.manual_seed(0)
    eager = _MatmulNet()
    assert torch.equal(model.center, eager(torch.ones(3, 4)).mean(0).detach())
