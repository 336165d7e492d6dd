"""The hostile review of 2026-12-07: three ways an ensemble computed other numbers than its
members' own loop, without an error.

Every test here but the controls failed on 381166b (the reference: a ``ModuleList`` of the same
members run one by one with the same seed).
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm


def _bn_members(n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
        for _ in range(n)
    ]


@pytest.mark.parametrize("execution", ["loop", "auto"])
def test_a_mode_set_on_the_template_after_modes_were_put_back_directly_is_kept(
    execution: str,
) -> None:
    # Lightning puts modes back after validation by setting `training` on every module it
    # sees; the ensemble followed that at its next call, putting the template's modules
    # back as they were before eval() and undoing a BatchNorm frozen on the template in
    # between: it trained on (output 0.56 off, running_var 0.096).
    members = _bn_members()
    ens = lm.Ensemble(copy.deepcopy(members), execution=execution)
    ref = nn.ModuleList(copy.deepcopy(members))
    x = torch.randn(8, 6)
    for module in (ens, ref):
        module.eval()
        for m in module.modules():
            m.training = True  # what Lightning's mode restore does
    assert ens.template.module[1].training
    ens.template.module[1].eval()
    for r in ref:
        r[1].eval()
    out = ens(x)
    assert not ens.template.module[1].training
    # Bits on the loop; "auto" may time a batched plan, rounding apart (no draws here).
    exact = {"rtol": 0, "atol": 0} if execution == "loop" else {}
    torch.testing.assert_close(out, torch.stack([m(x) for m in ref]), **exact)
    torch.testing.assert_close(
        ens.tensors()["1.running_var"], torch.stack([m[1].running_var for m in ref]), **exact
    )
    assert not ens.member(2)[1].training


class _FreezesOnTheTemplate(L.LightningModule):
    def __init__(self, ensemble: bool) -> None:
        super().__init__()
        self.ensemble = ensemble
        members = copy.deepcopy(_bn_members())
        self.net: nn.Module = (
            lm.Ensemble(members, execution="loop") if ensemble else nn.ModuleList(members)
        )

    def on_train_epoch_start(self) -> None:  # freeze the BatchNorms
        if isinstance(self.net, lm.Ensemble):
            self.net.template.module[1].eval()
        else:
            for m in self.net:
                m[1].eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.net, lm.Ensemble):
            return self.net(x)  # type: ignore[no-any-return]
        return torch.stack([m(x) for m in self.net])

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        return (self(batch[0]) - batch[1]).square().mean(dim=(1, 2)).sum()

    def validation_step(self, batch: list[torch.Tensor], _: int) -> None:
        self.log("v", (self(batch[0]) - batch[1]).square().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def stacked(self) -> dict[str, torch.Tensor]:
        if isinstance(self.net, lm.Ensemble):
            return {k: v.detach() for k, v in self.net.tensors().items()}
        states = [m.state_dict() for m in self.net]
        return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def test_a_batchnorm_frozen_on_the_template_in_a_trainer_run_stays_frozen() -> None:
    # The default Trainer runs a sanity check, whose mode restore then undid the freeze:
    # num_batches_tracked [4, 4, 4] against [0, 0, 0], running_var 0.31 off.
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(64, 6), torch.randn(64, 2))
    results = []
    for ensemble in (True, False):
        L.seed_everything(1, verbose=False)
        model = _FreezesOnTheTemplate(ensemble)
        loader = DataLoader(data, batch_size=16)
        L.Trainer(
            accelerator="cpu",
            max_steps=4,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        ).fit(model, loader, loader)
        results.append(model.stacked())
    mine, theirs = results
    assert mine["1.num_batches_tracked"].tolist() == [0, 0, 0]
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), name


class _Counts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.t = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.t += 1  # a step counter, kept per member
        return self.lin(x) * self.t


@pytest.mark.parametrize("value", [0, 10])
def test_apply_resets_state_a_forward_keeps_even_to_the_value_it_was_built_with(
    value: int,
) -> None:
    # apply put the reset on the template, which the copies follow only where it changed:
    # back to 0, the value it was built with, no change, and the copies counted on (2.78 off).
    torch.manual_seed(0)
    members = [_Counts() for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members))
    ref = nn.ModuleList(copy.deepcopy(members))
    x = torch.randn(3, 4)
    for _ in range(3):
        ens(x)
        for m in ref:
            m(x)

    def reset(m: nn.Module) -> None:
        if isinstance(m, _Counts):
            m.t = value

    ens.apply(reset)
    ref.apply(reset)
    assert torch.equal(ens(x), torch.stack([m(x) for m in ref]))
    assert ens.member(0).t == ref[0].t == value + 1


def _mlp_members() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)) for _ in range(3)]


@pytest.mark.parametrize("execution", ["loop", "auto", "vmap", "fused"])
def test_requires_grad_set_on_a_template_parameter_reaches_the_stacked_tensor(
    execution: str,
) -> None:
    # The template's meta parameter took the flag and nothing else did: every plan went on
    # computing the layer's gradient (0.89 where the members have None).
    members = _mlp_members()
    ens = lm.Ensemble(copy.deepcopy(members), execution=execution)
    ref = nn.ModuleList(copy.deepcopy(members))
    x = torch.randn(4, 6)
    ens(x)
    ens.template.module[0].requires_grad_(False)
    for m in ref:
        m[0].requires_grad_(False)
    ens(x).sum().backward()
    torch.stack([m(x) for m in ref]).sum().backward()
    tensors = ens.tensors()
    assert tensors["0.weight"].grad is None and tensors["0.bias"].grad is None
    torch.testing.assert_close(
        tensors["2.weight"].grad, torch.stack([m[2].weight.grad for m in ref])
    )
    assert not ens.member(1)[0].weight.requires_grad
    # And back: set on the template again, the layer trains again.
    ens.template.module[0].weight.requires_grad_(True)
    ens(x).sum().backward()
    assert tensors["0.weight"].grad is not None and tensors["0.bias"].grad is None


def test_a_flag_set_on_the_stacked_tensors_is_not_undone_by_the_template() -> None:
    # Control: only a change of the template's own flag is put on the stacked tensor, so
    # freezing the ensemble's parameters (as Lightning's BaseFinetuning does) holds.
    ens = lm.Ensemble(copy.deepcopy(_mlp_members()))
    x = torch.randn(4, 6)
    ens(x)
    ens.requires_grad_(False)
    out = ens(x)
    assert not out.requires_grad
    # Mirrored on the template (second session of 2026-12-07: test_ensemble_review16.py).
    assert not ens.template.module[0].weight.requires_grad
    for p in ens.parameters():  # set on the stacked tensors directly, as BaseFinetuning does
        p.requires_grad = True
    assert ens(x).requires_grad
    assert ens.template.module[0].weight.requires_grad


@pytest.mark.parametrize("then", ["call", "deepcopy", "pickle"])
def test_requires_grad_set_on_the_template_before_the_first_call_or_a_copy_is_followed(
    then: str,
) -> None:
    # Found by the second review of 2026-12-07: the flags were first noted at the first
    # call, which took one set before it as built; and a copy made before the next call
    # noted them anew, likewise (the layer trained: gradient norm 4.11).
    import pickle

    ens = lm.Ensemble(copy.deepcopy(_mlp_members()))
    ens.template.module[0].requires_grad_(False)
    if then == "deepcopy":
        ens = copy.deepcopy(ens)
    elif then == "pickle":
        ens = pickle.loads(pickle.dumps(ens))
    ens(torch.randn(4, 6)).sum().backward()
    assert ens.tensors()["0.weight"].grad is None
    assert ens.tensors()["2.weight"].grad is not None
