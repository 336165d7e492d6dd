"""Fifth review of estimate (hostile sweep of 2026-12-05): numbers that differed from the real
step without an error, and messages that named the wrong thing.

- One tensor given as several inputs became several fakes: ``nn.MultiheadAttention(x, x, x)``
  took the cross-attention path (peak +11 %), a forward branching on ``a is b`` counted
  twice the FLOPs, and the input's bytes were counted twice.
- A module registered under two names (``self.alias = self.l``, ALBERT-style
  ``nn.ModuleList([block] * 12)``) doubled ``parameters`` and ``parameter_bytes``: torch's
  reparametrisation swapped its one slot once per name and wrote the original back into
  the step's state.
- ``nn.Embedding(sparse=True)`` was simulated with a dense gradient (twice the real SGD
  peak, ``SparseAdam`` refused with a wrong fix): refused now, naming the layer.
- ``--fit`` said "even 1 does not fit" where the model refuses 1 and a larger size was
  estimated; fixes on the command line named Python keywords; a bad
  ``mixed_precision`` string was not named.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta._cli._main import main
from support.measure import measure_training_step


@pytest.mark.filterwarnings("ignore:estimate. peak_bytes of .* may be too low by up to")
def test_one_tensor_given_three_times_takes_self_attentions_path() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)

    def mha() -> nn.Module:
        return nn.MultiheadAttention(32, 4, batch_first=True)

    def loss(out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return out[0].sum()

    est = lm.estimate(mha, (x, x, x), loss_fn=loss)
    real = measure_training_step(mha(), (x, x, x), loss_fn=loss)
    assert est.peak_bytes == real.peak_bytes
    assert est.forward_flops == real.forward_flops


class _Same(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(32, 32)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.l(a) if a is b else self.l(a) + self.l(b)
        return out


def test_one_tensor_given_twice_is_one_tensor_positionally_and_by_keyword() -> None:
    x = torch.randn(64, 32)
    real = measure_training_step(_Same(), (x, x))
    assert lm.estimate(_Same, (x, x)).forward_flops == real.forward_flops
    assert lm.estimate(_Same, {"a": x, "b": x}).forward_flops == real.forward_flops
    assert lm.estimate(_Same, (x, x)).input_bytes == x.numel() * 4
    assert lm.estimate(_Same, (x, x)).peak_bytes == real.peak_bytes
    # two tensors of the same shape stay two
    y = torch.randn(64, 32)
    assert lm.estimate(_Same, (x, y)).forward_flops == 2 * real.forward_flops


class _Alias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(16, 16)
        self.alias = self.l

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.alias(self.l(x))
        return out


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        block = nn.Linear(16, 16)
        self.blocks = nn.ModuleList([block] * 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


@pytest.mark.parametrize("make", [_Alias, _Shared])
def test_a_module_under_several_names_is_counted_once(make: type[nn.Module]) -> None:
    model = make()
    params = list(model.parameters())
    weight = model.get_parameter(next(iter(dict(model.named_parameters()))))
    est = lm.estimate(model, "4,16")
    assert est.parameters == est.trainable_parameters == sum(p.numel() for p in params) == 272
    assert est.parameter_bytes == 272 * 4
    assert est.parameters_by_dtype == {"float32": 272}
    assert est.peak_bytes == measure_training_step(make(), (torch.randn(4, 16),)).peak_bytes
    # the model's own tensors are back, under every name
    assert all(
        p is weight for n, p in model.named_parameters(remove_duplicate=False) if "weight" in n
    )


class _Sparse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(1000, 16, sparse=True)
        self.head = nn.Linear(16, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.emb(ids))
        return out


@pytest.mark.parametrize("optimizer", ["sgd", torch.optim.SparseAdam])
def test_sparse_gradients_are_refused_by_layer(optimizer: object) -> None:
    with pytest.raises(lm.MetaTensorError, match=r"sparse gradients \('emb': nn.Embedding"):
        lm.estimate(_Sparse, "8,4:int64", optimizer=optimizer)

    # frozen, it has no gradient: estimated
    def frozen() -> nn.Module:
        model = _Sparse()
        model.emb.weight.requires_grad_(False)
        return model

    assert lm.estimate(frozen, "8,4:int64", optimizer="sgd").parameters == 16017


MODELS = """
from torch import nn


class BN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.bn(self.a(x))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)

    def forward(self, x):
        return self.a(x)
"""


def test_fit_names_the_smallest_size_the_model_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "lm_review5_models.py").write_text(MODELS)
    models = tmp_path / "lm_review5_models.py"
    argv = ["estimate", f"{models}:BN", "--input", "8,16", "--memory", "1KiB", "--fit", "batch"]
    assert main(argv) == 1
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the line
    assert "none: even 2 does not fit in 1.00 KiB (the model refuses smaller sizes)" in out
    fit = lm.find_fit(lambda: nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16)), "8,16",
                      memory="1KiB")  # fmt: skip
    assert (fit.value, fit.smallest, fit.to_dict()["smallest"]) == (None, 2, 2)
    argv = ["estimate", f"{models}:MLP", "--input", "8,16", "--memory", "1KiB", "--fit", "batch"]
    assert main(argv) == 1
    assert "none: even 1 does not fit in 1.00 KiB (peak" in " ".join(
        capsys.readouterr().out.split()
    )


def test_command_line_fixes_name_the_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "lm_review5_cli.py").write_text(MODELS)
    target = f"{tmp_path / 'lm_review5_cli.py'}:MLP"
    base = ["estimate", target, "--input", "8,16"]
    assert main([*base, "--memory", "1MiB", "--fit", "world-size"]) == 2
    assert "Fix: pass --strategy fsdp." in capsys.readouterr().err
    assert main([*base, "--strategy", "ddp", "--world-size", "2", "--tensor-parallel", "2"]) == 2
    assert "Fix: pass --strategy fsdp (FSDP2" in capsys.readouterr().err
    assert main([*base, "--memory", "lots", "--fit", "batch"]) == 2
    assert "Fix: pass bytes, or a size such as 80GiB or 79GB." in capsys.readouterr().err
    with pytest.raises(lm.ArgumentValueError, match=r"^estimate: mixed_precision: unknown dtype"):
        lm.estimate(lambda: nn.Linear(16, 4), "8,16", strategy="fsdp", world_size=2,
                    mixed_precision="fp8")  # fmt: skip


class _Attend(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mha(q, k, v, need_weights=False)[0]
        return out


@pytest.mark.filterwarnings("ignore:estimate. peak_bytes of .* may be too low by up to")
def test_find_fit_keeps_a_tensor_given_several_times_one_tensor() -> None:
    x = torch.randn(8, 32, 64)
    fit = lm.find_fit(_Attend, (x, x, x), memory="2MiB")
    assert fit.value is not None and fit.fits is not None and fit.beyond is not None
    at = torch.empty(fit.value, 32, 64, device="meta")
    after = torch.empty(fit.value + 1, 32, 64, device="meta")
    assert fit.fits.peak_bytes == lm.estimate(_Attend, (at, at, at)).peak_bytes
    assert fit.beyond.peak_bytes == lm.estimate(_Attend, (after, after, after)).peak_bytes


class _OwnSparse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(1000, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(nn.functional.embedding(ids, self.w, sparse=True))
        return out


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_forwards_own_sparse_lookup_is_refused_by_parameter(optimizer: str) -> None:
    with pytest.raises(lm.MetaTensorError, match=r"backward gave \['w'\] sparse gradients"):
        lm.estimate(_OwnSparse, "8,4:int64", optimizer=optimizer)
