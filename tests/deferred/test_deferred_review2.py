"""Second hostile review of deferred_init / materialize: identity, inference mode, orphans.

Each test was a silent wrong value (or a refusal where eager works) before:

- ``materialize(dtype=)`` put a float32 copy in a list attribute holding a
  parameter (``self.no_decay = [self.norm.weight]``, ``nn.LSTM._flat_weights``),
  so optimizer groups built from it trained a copy;
- under ``torch.inference_mode()`` a view kept on the module lost its
  autograd history, and ``load_checkpoint`` made inference-tensor parameters;
- a deferred parameter replaced in the module after the block stayed a plain
  meta tensor, which ``x @ w.T`` on the CPU answers with uninitialised memory;
- ``nn.LSTM`` after ``model.to(dtype)`` (weak references in
  ``_flat_weight_refs``) lost the identity of every parameter;
- stale messages named ``getset_descriptor.__get__`` and pybind11 records.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_meta import (
    MaterializationError,
    MetaTensorError,
    deferred_init,
    load_checkpoint,
    materialize,
)
from support.program_models import build_seeded


class _NoDecay(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("steps", torch.zeros(2, dtype=torch.long))
        self.no_decay = [self.proj.bias, self.norm.weight, self.norm.bias]
        self.by_name = {"w": self.proj.weight, "steps": self.steps}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def _groups(m: _NoDecay) -> list[dict[str, object]]:
    nd = {id(p) for p in m.no_decay}
    return [
        {"params": [p for p in m.parameters() if id(p) not in nd], "weight_decay": 0.5},
        {"params": m.no_decay, "weight_decay": 0.0},
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_list_holding_parameters_holds_them_after_materialize_with_dtype(
    dtype: torch.dtype,
) -> None:
    eager = build_seeded(_NoDecay, deferred=False).to(dtype)
    module = build_seeded(_NoDecay, deferred=True)
    materialize(module, dtype=dtype)
    held = [module.proj.bias, module.norm.weight, module.norm.bias]
    assert all(a is b for a, b in zip(module.no_decay, held, strict=True))
    assert module.by_name["w"] is module.proj.weight
    # An integer buffer module.to(dtype) leaves alone: eager's dict holds it too.
    assert module.by_name["steps"] is module.steps
    assert eager.by_name["steps"] is eager.steps
    x = torch.randn(8, 4, dtype=dtype)
    for m in (eager, module):
        opt = torch.optim.AdamW(_groups(m), lr=0.1)  # type: ignore[arg-type]
        for _ in range(3):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for (k, a), b in zip(eager.state_dict().items(), module.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_lstm_flat_weights_are_the_cast_parameters_after_materialize_with_dtype() -> None:
    eager = build_seeded(lambda: nn.LSTM(4, 4, num_layers=2), deferred=False).double()
    module = build_seeded(lambda: nn.LSTM(4, 4, num_layers=2), deferred=True)
    materialize(module, dtype=torch.float64)
    params = [getattr(module, n) for n in module._flat_weights_names]
    assert all(a is b for a, b in zip(module._flat_weights, params, strict=True))
    assert {t.dtype for t in module._flat_weights} == {torch.float64}
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    assert torch.equal(eager(x)[0], module(x)[0])


class _Row(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.row = [self.lin.weight[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).sum() + (x @ self.row[0]).sum()


def _grads_equal(eager: nn.Module, module: nn.Module) -> None:
    x = torch.ones(2, 4)
    for m in (eager, module):
        m(x).backward()
    for (k, a), b in zip(eager.named_parameters(), module.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, k
        assert torch.equal(a.grad, b.grad), k


def test_a_view_kept_on_the_module_carries_its_history_when_materialized_in_inference_mode() -> (
    None
):
    eager = build_seeded(_Row, deferred=False)
    module = build_seeded(_Row, deferred=True)
    with torch.inference_mode():
        materialize(module)
    assert module.row[0].grad_fn is not None and not module.row[0].is_inference()
    _grads_equal(eager, module)


@pytest.mark.parametrize("how", ["load_checkpoint", "load_state_dict"])
def test_loading_in_inference_mode_leaves_normal_parameters(tmp_path: Path, how: str) -> None:
    # Eager code copies into a model built before: its parameters stay normal
    # tensors (inference tensors cannot be trained: the step raised torch's
    # "Inplace update to inference tensor outside InferenceMode").
    eager = build_seeded(_Row, deferred=False)
    path = tmp_path / "row.pt"
    torch.save(eager.state_dict(), path)
    module = build_seeded(_Row, deferred=True)
    with torch.inference_mode():
        if how == "load_checkpoint":
            load_checkpoint(module, path)
        else:
            module.load_state_dict(torch.load(path))
    assert not any(p.is_inference() for p in module.parameters())
    assert module.row[0].grad_fn is not None
    _grads_equal(eager, module)
    torch.optim.SGD(module.parameters(), lr=0.1).step()


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 8, bias=False)


def test_a_parameter_tied_away_after_the_block_is_stale_not_uninitialised() -> None:
    module = build_seeded(_TinyLM, deferred=True)
    untied = module.head.weight
    module.head.weight = module.emb.weight  # a tie after the block
    materialize(module)
    assert module.head.weight is module.emb.weight and not module.emb.weight.is_meta
    with pytest.raises(MetaTensorError, match=r"'head\.weight'.*another tensor at that place"):
        torch.ones(1, 4) @ untied.T
    assert untied.shape == (8, 4)  # metadata still answers


def test_a_parameter_replaced_after_the_block_is_stale_not_uninitialised() -> None:
    module = build_seeded(lambda: nn.Linear(4, 3), deferred=True)
    old = module.weight
    module.weight = nn.Parameter(torch.zeros(3, 4))
    materialize(module)
    for use in (
        lambda: torch.ones(1, 4) @ old.T,
        lambda: nn.functional.linear(torch.ones(1, 4), old),
        lambda: old.sum(),
    ):
        with pytest.raises(MetaTensorError, match=r"'weight'"):
            use()


def test_a_parameter_load_state_dict_replaced_is_stale() -> None:
    eager = build_seeded(lambda: nn.Linear(4, 3), deferred=False)
    module = build_seeded(lambda: nn.Linear(4, 3), deferred=True)
    old = module.weight
    module.load_state_dict(eager.state_dict())
    assert torch.equal(module.weight, eager.weight)
    with pytest.raises(MetaTensorError, match=r"'weight' before load_state_dict"):
        torch.ones(1, 4) @ old.T


@pytest.mark.parametrize("before", ["double", "meta forward"])
def test_lstm_keeps_its_parameters_objects_after_weak_references_to_them(before: str) -> None:
    def build() -> nn.Module:
        return nn.Sequential(nn.LSTM(4, 4, batch_first=True))

    eager = build_seeded(build, deferred=False)
    module = build_seeded(build, deferred=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(module.parameters(), lr=0.1)
    dtype = torch.float32
    if before == "double":
        eager.double()
        module.double()
        dtype = torch.float64
    else:
        module(torch.randn(2, 3, 4, device="meta"))
    materialize(module)
    assert all(
        a is b for a, b in zip(opt_d.param_groups[0]["params"], module.parameters(), strict=True)
    )
    lstm = module[0]
    assert all(
        r() is getattr(lstm, n)
        for r, n in zip(lstm._flat_weight_refs, lstm._flat_weights_names, strict=True)
    )
    x = torch.randn(2, 3, 4, dtype=dtype)
    for m, opt in ((eager, opt_e), (module, opt_d)):
        m(x)[0].pow(2).sum().backward()
        opt.step()
    for (k, a), b in zip(eager.state_dict().items(), module.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_stale_messages_name_the_operation() -> None:
    torch.manual_seed(0)
    with deferred_init():
        module = nn.Linear(4, 4)
        module.register_buffer("b", torch.randn(4, 4))
    old = module.b
    materialize(module, dtype=torch.float64)
    x = torch.ones(4, 4)
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: old.grad, "Reading .grad of"),
        (lambda: torch.ops.aten.mm(x, old), "Calling torch.ops.aten.mm on"),
        (lambda: torch.ops.aten.mm.default(x, old), "Calling torch.ops.aten.mm.default on"),
        (lambda: torch.mm(x, old), "Calling torch.mm on"),
        (lambda: x.mm(old), "Calling Tensor.mm on"),
    ]
    for use, start in cases:
        with pytest.raises(MetaTensorError) as info:
            use()
        assert str(info.value).startswith(start + " the meta tensor that stood for 'b'")
        assert "pybind11" not in str(info.value) and "getset_descriptor" not in str(info.value)


@pytest.mark.parametrize("mean_resizing", [False, True])
def test_resize_token_embeddings_inside_the_block_is_eager_or_refused(mean_resizing: bool) -> None:
    # A review reported every parameter wrong after resizing inside the block:
    # its eager run had changed the shared config's vocab_size (transformers'
    # resize does), so the deferred model was built at the new size. With a
    # config of its own each, mean_resizing=False is bit-equal to eager, and
    # True (a multivariate normal from the old rows' values) is refused.
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()

    def build() -> nn.Module:
        config = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
        model = transformers.LlamaForCausalLM(config)
        model.resize_token_embeddings(70, mean_resizing=mean_resizing)
        return model

    if mean_resizing:
        with pytest.raises(MaterializationError, match="needs the values of a tensor"):
            with deferred_init():
                build()
        return
    torch.manual_seed(0)
    eager = build()
    after_eager = torch.get_rng_state()
    torch.manual_seed(0)
    with deferred_init():
        deferred = build()
    assert torch.equal(torch.get_rng_state(), after_eager)
    materialize(deferred)
    expected, got = eager.state_dict(), deferred.state_dict()
    assert sorted(expected) == sorted(got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert got["model.embed_tokens.weight"].shape == (70, 16)


def test_lstm_cast_before_load_checkpoint_keeps_its_parameters_objects(tmp_path: Path) -> None:
    # module.to() leaves weak references to an RNN's parameters, which
    # swap_tensors refuses: load_checkpoint made every parameter stale, and an
    # optimizer built before the load refused its first step.
    torch.manual_seed(1)
    source = nn.LSTM(4, 4, num_layers=2).double()
    path = tmp_path / "lstm.pt"
    torch.save(source.state_dict(), path)
    x = torch.randn(3, 2, 4, dtype=torch.float64)

    def trained(module: nn.Module, load: Callable[[nn.Module], object]) -> nn.Module:
        module = module.double()
        params = list(module.parameters())
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        load(module)
        assert all(a is b for a, b in zip(params, module.parameters(), strict=True))
        module(x)[0].sum().backward()
        optimizer.step()
        return module

    eager = trained(
        build_seeded(lambda: nn.LSTM(4, 4, num_layers=2), deferred=False),
        lambda m: m.load_state_dict(torch.load(path, weights_only=True)),
    )
    module = trained(
        build_seeded(lambda: nn.LSTM(4, 4, num_layers=2), deferred=True),
        lambda m: load_checkpoint(m, path),
    )
    expected = eager.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in module.state_dict().items())
    flat = [getattr(module, n) for n in module._flat_weights_names]
    assert all(a is b for a, b in zip(module._flat_weights, flat, strict=True))
