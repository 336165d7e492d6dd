"""References taken before ``load_checkpoint``: the loaded tensors, or a loud refusal.

Eager's program for a deferred model is eager construction, then
``load_state_dict`` (which copies in place): a local ``w = m.weight`` or an
optimizer built on ``m.parameters()`` before the load holds the loaded
parameter and trains it. Where eager's object is another (a buffer cast by
``dtype=``), the old meta object refuses its first use, naming its path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lightning_meta as lm
from lightning_meta._watched import tensor_class


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight  # a tie
        self.register_buffer("scale", torch.full((4,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(self.emb(x)) * self.scale))


def _saved(tmp_path: Path, drop: tuple[str, ...] = ()) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    sd = {k: v.clone() for k, v in _Net().state_dict().items() if k not in drop}
    path = tmp_path / "net.safetensors"
    save_file(sd, str(path))
    return path, sd


def _train(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    x = torch.tensor([[0, 1, 2], [3, 4, 5]])
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("drop", [(), ("lin.bias",)], ids=["full", "missing-key"])
def test_optimizer_and_reference_built_before_the_load_train_as_eager(
    tmp_path: Path, opt_cls: type[torch.optim.Optimizer], drop: tuple[str, ...]
) -> None:
    path, sd = _saved(tmp_path, drop)
    strict = not drop

    torch.manual_seed(7)
    eager = _Net()
    w_eager = eager.lin.weight
    opt_eager = opt_cls(eager.parameters(), lr=0.1)
    eager.load_state_dict(sd, strict=strict)
    want = _train(eager, opt_eager)

    torch.manual_seed(7)
    model = lm.deferred_init(_Net)
    w = model.lin.weight
    b = model.lin.bias
    tied = model.head.weight
    opt = opt_cls(model.parameters(), lr=0.1)
    report = lm.load_checkpoint(model, path, strict=strict)
    assert report.replayed == list(drop)
    assert w is model.lin.weight and b is model.lin.bias
    assert tied is model.emb.weight and model.head.weight is model.emb.weight
    assert not w.is_meta
    assert torch.equal(torch.ones(1, 4) @ w.T, torch.ones(1, 4) @ sd["lin.weight"].T)
    got = _train(model, opt)
    assert len(got) == len(want)
    for g, e in zip(got, want, strict=True):
        assert torch.equal(g, e)
    assert torch.equal(w, w_eager)  # the local saw the updates, as eagerly
    assert torch.equal(b, eager.lin.bias)


def test_buffer_cast_by_dtype_is_stale_and_names_its_path(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    model = lm.deferred_init(_Net)
    scale = model.scale
    w = model.lin.weight
    lm.load_checkpoint(model, path, dtype=torch.float64)
    # eager: load_state_dict, then .to(float64) keeps parameters, replaces buffers
    assert w is model.lin.weight and w.dtype == torch.float64
    assert model.scale is not scale and model.scale.dtype == torch.float64
    assert scale.shape == (4,) and scale.is_meta  # metadata still reads
    with pytest.raises(lm.MetaTensorError, match=r"'scale'.*load_checkpoint") as info:
        _ = torch.ones(4) * scale
    assert "Fix:" in str(info.value)
    assert list(info.value.paths) == ["scale"]


def test_buffer_kept_when_eager_keeps_it(tmp_path: Path) -> None:
    path, sd = _saved(tmp_path)
    model = lm.deferred_init(_Net)
    scale = model.scale
    lm.load_checkpoint(model, path)
    assert scale is model.scale and torch.equal(scale, sd["scale"])


def test_plain_meta_model_keeps_parameters_and_refuses_old_buffers(tmp_path: Path) -> None:
    path, sd = _saved(tmp_path)
    with torch.device("meta"):
        model = _Net()
    w = model.lin.weight
    scale = model.scale
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lm.load_checkpoint(model, path)
    # as module.to_empty() + load_state_dict: parameters keep their object
    assert w is model.lin.weight and torch.equal(w, sd["lin.weight"])
    assert model.head.weight is model.emb.weight
    assert all(not p.is_meta for g in opt.param_groups for p in g["params"])
    # to_empty() replaces buffers: the old object refuses, naming its path
    assert model.scale is not scale and torch.equal(model.scale, sd["scale"])
    with pytest.raises(lm.MetaTensorError, match=r"'scale'"):
        _ = scale + 1


def test_failed_swap_gives_the_objects_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_meta._load import _phases

    path, _ = _saved(tmp_path)
    model = lm.deferred_init(_Net)
    w = model.lin.weight
    calls = {"n": 0}
    real_put = _phases._put

    def failing(slot, tensor):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        real_put(slot, tensor)

    monkeypatch.setattr(_phases, "_put", failing)
    with pytest.raises(lm.MetaTensorError, match="put back as it was"):
        lm.load_checkpoint(model, path)
    monkeypatch.setattr(_phases, "_put", real_put)
    assert w is model.lin.weight and w.is_meta and tensor_class(w) is nn.Parameter
    lm.load_checkpoint(model, path)
    assert w is model.lin.weight and not w.is_meta


@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "meta"])
def test_gradient_hooks_registered_before_the_load_run_as_eagerly(
    tmp_path: Path, deferred: bool
) -> None:
    # swap_tensors moves the C++ side of a tensor's hooks with its data.
    path, _ = _saved(tmp_path)
    torch.manual_seed(7)
    if deferred:
        with lm.deferred_init():
            model = _Net()
    else:
        with torch.device("meta"):
            model = _Net()
    model.lin.weight.register_hook(lambda g: g * 0)
    lm.load_checkpoint(model, path)
    model(torch.tensor([[0, 1, 2]])).square().mean().backward()
    assert model.lin.weight.grad is not None and not model.lin.weight.grad.any()
    assert model.lin.bias.grad is not None and model.lin.bias.grad.any()
