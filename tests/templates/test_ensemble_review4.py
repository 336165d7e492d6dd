"""Ensemble, fourth hostile review: random draws under execution="auto" (the loop's masks,
a seeded Trainer run reproducible), FLOP counters and ModelSummary, and from_factory's
peak memory."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import lightning_meta as lm
from support.ensembles import MembersModule
from support.measure import allocator_peak
from support.torch_modes import deterministic_algorithms


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*batching rule.*")


def _dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 8))


class _Noisy(nn.Module):
    """Gaussian noise on the activations: torch.vmap's batched normal_ fills the stacked
    tensor in another order than a loop over the members (sizes not a multiple of 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h + torch.randn_like(h) if self.training else h


def _loop_of(members: list[nn.Module], x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.stack([m(x) for m in members])


# ------------------------------------------------------------------- random draws under auto
@pytest.mark.parametrize("factory", [_dropout_mlp, _Noisy], ids=["dropout-mlp", "randn-noise"])
def test_auto_draws_the_loops_random_numbers_on_every_call(factory: type[nn.Module]) -> None:
    torch.manual_seed(0)
    members = [factory() for _ in range(4)]
    x = torch.randn(33, 64 if factory is _dropout_mlp else 5)
    ens = lm.Ensemble(members)
    # Past the 16th call of the kind, where the plans are timed again.
    for seed in range(18):
        torch.manual_seed(seed)
        out = ens(x)
        after = torch.get_rng_state()
        ref = _loop_of(members, x, seed)
        assert torch.equal(after, torch.get_rng_state())
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        # The fused and grouped plans draw the loop's masks too (since 2026-12-06).
        if factory is _dropout_mlp:
            assert ens.plan in ("loop", "grouped", "fused")
        else:
            assert ens.plan == "loop"
    assert [r.how for r in ens.plans] == ["random draws"]
    # In eval nothing is drawn: the plans are timed as usual.
    ens.eval()
    with torch.no_grad():
        ens(x)
    assert ens.plans[-1].how != "random draws"


def test_forced_plans_are_reproducible_and_batched_ones_draw_the_loops_masks() -> None:
    torch.manual_seed(0)
    members = [_dropout_mlp() for _ in range(3)]
    x = torch.randn(6, 64)
    ref = _loop_of(members, x, 7)
    outs = {}
    for plan in ("fused", "grouped", "vmap", "loop"):
        ens = lm.Ensemble(members, execution=plan)  # type: ignore[arg-type]
        torch.manual_seed(7)
        outs[plan] = ens(x)
        torch.manual_seed(7)
        assert torch.equal(ens(x), outs[plan])  # reproducible
    # The fused and grouped plans draw each member's masks as the loop does (since
    # 2026-12-06; where they cannot, they draw their own: test_ensemble_fused_draws.py).
    torch.testing.assert_close(outs["fused"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["grouped"], ref, rtol=1e-5, atol=1e-6)
    # vmap's masks: the loop's on torch 2.13's CPU build with one dropout layer, not on
    # torch 2.6's; not promised, so not checked.
    torch.testing.assert_close(outs["loop"], ref, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["apply", "template"])
def test_mc_dropout_turned_on_after_timing_runs_the_loops_masks(how: str) -> None:
    torch.manual_seed(0)
    members = [_dropout_mlp() for _ in range(3)]
    x = torch.randn(6, 64)
    ens = lm.Ensemble(members).eval()
    with torch.no_grad():
        ens(x)  # timed without random draws: any plan
        # MC dropout: dropout back in train mode, the rest in eval.
        if how == "apply":
            ens.apply(lambda m: m.train() if isinstance(m, nn.Dropout) else None)
        else:
            for m in ens.template.module.modules():
                if isinstance(m, nn.Dropout):
                    m.train()
        for m in members:
            m.eval()
            m[2].train()
        for seed in range(3):
            torch.manual_seed(seed)
            out = ens(x)
            ref = _loop_of(members, x, seed)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
            assert ens.plan in ("loop", "vmap", "grouped", "fused")  # the loop's masks


def test_auto_under_deterministic_algorithms_draws_the_loops_masks() -> None:
    # Trainer(deterministic=True): nothing is timed, the static plan is fused, which
    # draws the loop's masks (since 2026-12-06; the loop ran before).
    torch.manual_seed(0)
    members = [_dropout_mlp() for _ in range(3)]
    x = torch.randn(6, 64)
    ens = lm.Ensemble(members)
    assert ens.execution == "fused"
    with deterministic_algorithms():
        torch.manual_seed(3)
        out = ens(x)
    assert ens.plan == "fused"
    torch.testing.assert_close(out, _loop_of(members, x, 3), rtol=0, atol=1e-6)


class _DropoutEnsemble(L.LightningModule):
    def __init__(self, execution: str) -> None:
        super().__init__()
        self.ens = lm.Ensemble.from_factory(
            lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1)),
            4,
            execution=execution,
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.ens(x), y.expand(4, *y.shape))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _seeded_fit(execution: str) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    model = _DropoutEnsemble(execution)
    data = TensorDataset(torch.randn(64, 16), torch.randn(64, 1))
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("execution", ["auto", "fused"])
def test_a_seeded_trainer_run_trains_the_loops_weights(execution: str) -> None:
    loop = _seeded_fit("loop")
    run = _seeded_fit(execution)
    assert loop.keys() == run.keys()
    for name in loop:
        # The loop's masks on every step; the fused and grouped plans ("auto" may time
        # them faster) compute the same numbers up to rounding (batched matmuls).
        torch.testing.assert_close(run[name], loop[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ FLOP counters and ModelSummary
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))


def test_a_flop_counter_around_auto_counts_one_loop_over_the_members() -> None:
    torch.manual_seed(0)
    members = [_mlp() for _ in range(3)]
    x = torch.randn(4, 6)
    with FlopCounterMode(display=False) as plain:
        torch.stack([m(x) for m in members])
    ens = lm.Ensemble(members)
    with FlopCounterMode(display=False) as counted:
        out = ens(x)
    assert counted.get_total_flops() == plain.get_total_flops() == 3072
    assert ens.plan == "loop" and ens.plans == ()  # no timing, nothing kept
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))
    ens(x)  # outside the counter: timed as usual
    assert len(ens.plans) == 1


@pytest.mark.parametrize("execution", ["fused", "grouped", "vmap", "loop"])
def test_a_flop_counter_around_a_forced_plan_runs_it(execution: str) -> None:
    torch.manual_seed(0)
    members = [_mlp() for _ in range(3)]
    x = torch.randn(4, 6)
    ens = lm.Ensemble(members, execution=execution)  # type: ignore[arg-type]
    with FlopCounterMode(display=False) as counted:
        out = ens(x)
    assert ens.plan == execution
    assert counted.get_total_flops() == 3072  # the same matmuls, batched or not
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))


class _Summarised(MembersModule):
    def __init__(self, execution: str | None) -> None:
        torch.manual_seed(0)
        super().__init__([_mlp() for _ in range(3)], execution)
        self.example_input_array = torch.randn(4, 6)


@pytest.mark.parametrize("execution", ["auto", "fused", "grouped", "vmap", "loop"])
def test_trainer_fit_with_example_input_array_summarises_one_call(execution: str) -> None:
    from lightning.pytorch.utilities.model_summary import ModelSummary

    if not hasattr(ModelSummary(_Summarised(None)), "total_flops"):
        pytest.skip("Lightning < 2.6 counts no FLOPs in ModelSummary (nothing to crash)")
    plain = ModelSummary(_Summarised(None)).total_flops
    model = _Summarised(execution)
    assert ModelSummary(model).total_flops == plain == 3072
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )  # the default ModelSummary, which counts FLOPs under FlopCounterMode
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(8, 6)), batch_size=4))
    assert ModelSummary(model).total_flops == plain


# ------------------------------------------------------------------ from_factory's peak memory
def test_from_factory_holds_the_stack_and_one_member_at_most() -> None:
    member = 1024 * 1024 * 4  # bytes of one member's weight
    n = 4
    peak, ens = allocator_peak(
        lambda: lm.Ensemble.from_factory(lambda: nn.Linear(1024, 1024, bias=False), n)
    )
    assert ens.stacked.weight.shape == (n, 1024, 1024)
    # The stack, one member, and a little bookkeeping; member 0 kept alive was one more.
    assert n * member <= peak < (n + 1) * member + member // 4


class _Hooked(nn.Module):
    """A member whose forward hook is a method of its own: compared by where it points."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.scale = scale
        self.fc.register_forward_hook(self.rescale)

    def rescale(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return out * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


def test_from_factory_compares_later_members_with_member_0_after_dropping_it() -> None:
    torch.manual_seed(0)
    ens = lm.Ensemble.from_factory(lambda: _Hooked(2.0), 3, execution="loop")
    torch.manual_seed(0)
    members = [_Hooked(2.0) for _ in range(3)]
    x = torch.randn(2, 3)
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
    scales = iter([2.0, 2.0, 0.5])
    with pytest.raises(lm.MetaTensorError, match=r"member 2 has scale = 0.5, member 0 has 2.0"):
        lm.Ensemble.from_factory(lambda: _Hooked(next(scales)), 3)
