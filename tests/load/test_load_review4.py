"""Fourth review of load_checkpoint: ``dtype=`` on a deferred model is eager's ``module.to``.

The reference is eager construction, ``load_state_dict``, then ``module.to(dtype)``,
which casts parameters and buffers and leaves plain tensor attributes alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_meta as lm


class _Masked(nn.Module):
    """Plain tensor attributes: one of its own, and one holding each kind of buffer's object."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.mask = torch.tril(torch.randn(4, 4))  # a causal mask kept as an attribute
        self.register_buffer("inv_freq", torch.rand(3), persistent=False)
        self.original_inv_freq = self.inv_freq  # as transformers' rotary embeddings keep it
        self.register_buffer("running", torch.randn(3))
        self.running_alias = self.running
        self.weight_alias = self.lin.weight  # a parameter's object: cast with it
        self.index = torch.arange(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) @ self.mask.to(x.dtype)


def _tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    attrs = {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
    return attrs | dict(m.named_parameters()) | dict(m.named_buffers())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("target", ["deferred", "real"])
def test_dtype_leaves_plain_tensor_attributes_as_module_to_does(
    target: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    # module.to() keeps each parameter's object (param.data = ...) and gives
    # each buffer a new one: an attribute holding the buffer's object
    # (transformers' original_inv_freq) keeps the old float32 values. The load
    # cast such attributes of a deferred model, and on a real model cast the
    # buffer in place (.data =), casting the attribute with it.
    torch.manual_seed(0)
    sd = _Masked().state_dict()
    torch.save(sd, tmp_path / "m.pt")
    torch.manual_seed(1)
    eager = _Masked()
    eager.load_state_dict(sd)
    eager.to(dtype)
    torch.manual_seed(1)
    if target == "deferred":
        with lm.deferred_init():
            model = _Masked()
    else:
        model = _Masked()
    before = {k: model.__dict__[k] for k in ("mask", "original_inv_freq", "running_alias")}
    weight = model.lin.weight
    lm.load_checkpoint(model, tmp_path / "m.pt", dtype=dtype)
    want, got = _tensors(eager), _tensors(model)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert (got[name].dtype, got[name].device) == (t.dtype, t.device), name
        assert torch.equal(got[name], t), name
    assert model.mask.dtype == torch.float32
    # The attributes keep eager's objects (module.to() gave the buffers new ones).
    for name, old in before.items():
        assert model.__dict__[name] is old, name
        assert torch.equal(old, want[name]), name
    assert model.original_inv_freq is not model.inv_freq
    assert model.running_alias is not model.running
    assert model.lin.weight is weight and model.weight_alias is weight
    x = torch.randn(2, 4, dtype=dtype)
    assert torch.equal(model(x), eager(x))


def test_without_dtype_an_attribute_holding_a_buffer_stays_that_buffer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(_Masked().state_dict(), tmp_path / "m.pt")
    with lm.deferred_init():
        model = _Masked()
    lm.load_checkpoint(model, tmp_path / "m.pt")
    assert model.original_inv_freq is model.inv_freq
    assert model.running_alias is model.running
    assert model.mask.dtype == torch.float32


class _Row(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        with torch.no_grad():
            self.row = self.lin.weight[0]  # a plain attribute viewing a loaded weight


def test_dtype_refuses_an_attribute_viewing_a_loaded_tensor(tmp_path: Path) -> None:
    # Eager's view sees the loaded values in float32, which module.to() leaves;
    # this load does not read them in float32, so it refuses instead of replaying.
    torch.save(_Row().state_dict(), tmp_path / "m.pt")
    with lm.deferred_init():
        model = _Row()
    with pytest.raises(lm.MaterializationError, match=r"\['row'\].*Fix: load without dtype=") as e:
        lm.load_checkpoint(model, tmp_path / "m.pt", dtype=torch.bfloat16)
    assert list(e.value.paths) == ["row"]
    assert model.lin.weight.is_meta  # nothing changed
    lm.load_checkpoint(model, tmp_path / "m.pt")
    model.to(torch.bfloat16)
    eager = _Row()
    eager.load_state_dict(torch.load(tmp_path / "m.pt"))
    eager.to(torch.bfloat16)
    assert torch.equal(model.row, eager.row) and model.row.dtype == torch.float32


def test_a_real_buffer_loaded_into_a_wider_dtype_is_the_files_value_bit_for_bit(
    tmp_path: Path,
) -> None:
    # A bf16 model loaded from a float32 checkpoint with dtype=float32: every
    # tensor is the file's value, buffers as parameters; the buffer's old
    # object takes the values as load_state_dict copies them (bf16).
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    src(torch.randn(16, 4) * 3)  # running statistics no bf16 value holds
    torch.save(src.state_dict(), tmp_path / "m.pt")
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(torch.bfloat16)
    old_mean = model[1].running_mean
    lm.load_checkpoint(model, tmp_path / "m.pt", dtype=torch.float32)
    sd = src.state_dict()
    for name, t in model.state_dict().items():
        assert t.dtype == sd[name].dtype and torch.equal(t, sd[name]), name
    assert old_mean.dtype == torch.bfloat16
    assert torch.equal(old_mean, sd["1.running_mean"].to(torch.bfloat16))


@pytest.mark.parametrize("fail_at", [1, 2])  # each of the two buffers
def test_a_failure_after_a_buffer_got_its_new_object_puts_everything_back(
    fail_at: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_meta._load import _phases

    torch.manual_seed(0)
    sd = _Masked().state_dict()
    torch.save(sd, tmp_path / "m.pt")
    model = _Masked()
    objects = dict(_tensors(model))
    values = {k: v.clone() for k, v in objects.items()}
    real = _phases._put
    calls: list[int] = []

    def failing(*args: Any) -> None:
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected failure")
        real(*args)

    monkeypatch.setattr(_phases, "_put", failing)
    with pytest.raises(lm.MetaTensorError, match=r"injected failure"):
        lm.load_checkpoint(model, tmp_path / "m.pt", dtype=torch.bfloat16)
    for name, t in _tensors(model).items():
        assert t is objects[name], name
        assert t.dtype == values[name].dtype and torch.equal(t, values[name]), name
    monkeypatch.setattr(_phases, "_put", real)
    lm.load_checkpoint(model, tmp_path / "m.pt", dtype=torch.bfloat16)
    assert model.running.dtype == torch.bfloat16
    assert torch.equal(model.running_alias, sd["running"])


class _Aliased(nn.Module):
    """Plain attributes sharing a parameter's memory: an alias and a view."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.alias = self.lin.weight.detach()
        self.row = self.lin.bias.detach()[:2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_leaves_the_loaded_values_in_a_real_parameters_old_memory(
    dtype: torch.dtype, tmp_path: Path
) -> None:
    # module.to() keeps a parameter's object but gives it new memory; after
    # load_state_dict copied into the old memory, an alias of it holds the
    # loaded values. Before, the load put the new memory in without copying,
    # so the alias kept the values of construction, without an error.
    torch.manual_seed(0)
    sd = _Aliased().state_dict()
    torch.save(sd, tmp_path / "m.pt")

    def build() -> _Aliased:
        torch.manual_seed(1)
        m = _Aliased()
        m.lin(torch.randn(3, 4)).sum().backward()  # a gradient, cast with the parameter
        return m

    eager = build()
    eager.load_state_dict(sd)
    eager.to(dtype)
    model = build()
    weight = model.lin.weight
    lm.load_checkpoint(model, tmp_path / "m.pt", dtype=dtype)
    assert model.lin.weight is weight and weight.dtype == dtype
    for got, want in [
        (model.alias, eager.alias),
        (model.row, eager.row),
        *zip(model.parameters(), eager.parameters(), strict=True),
        *((g.grad, w.grad) for g, w in zip(model.parameters(), eager.parameters(), strict=True)),
    ]:
        assert got is not None and want is not None
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert model.alias.dtype == torch.float32 and torch.equal(model.alias, sd["lin.weight"])


def test_a_failure_after_a_parameters_old_memory_took_the_values_puts_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_meta._load import _phases

    torch.manual_seed(0)
    torch.save(_Aliased().state_dict(), tmp_path / "m.pt")
    model = _Aliased()
    weight, alias = model.lin.weight, model.alias.clone()
    real = _phases._set_data
    calls: list[int] = []

    def failing(old: torch.Tensor, new: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == 2:  # the bias, after the weight's memory took its values
            raise RuntimeError("injected failure")
        real(old, new)

    monkeypatch.setattr(_phases, "_set_data", failing)
    with pytest.raises(lm.MetaTensorError, match=r"injected failure"):
        lm.load_checkpoint(model, tmp_path / "m.pt", dtype=torch.float64)
    assert model.lin.weight is weight and weight.dtype == torch.float32
    assert torch.equal(model.alias, alias) and torch.equal(weight, alias)
    assert model.alias.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
