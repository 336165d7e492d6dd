"""Third review of estimate: what a call leaves on the module, inputs' autograd, refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_meta import MetaTensorError, estimate
from lightning_meta._compat import FakeTensor
from support.measure import measure_training_step


class Cache(nn.Module):
    """Builds a cache, sets a buffer, keeps its hidden state and counts its calls in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(16, 16)
        self.cache: torch.Tensor | None = None
        self.register_buffer("pos", None, persistent=False)
        self.history: list[torch.Tensor] = []
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.cache = torch.ones(16)
        if self.pos is None:
            self.pos = torch.arange(16.0)
        if "seen" not in self._buffers:
            self.register_buffer("seen", torch.zeros(1))
        self.steps += 1
        self.last_hidden = self.l(x)
        self.history.append(self.last_hidden)
        return self.last_hidden * self.cache + self.pos


def _train(model: nn.Module, x: torch.Tensor, steps: int = 2) -> dict[str, torch.Tensor]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def _no_fakes(model: nn.Module) -> None:
    for m in model.modules():
        for k, v in vars(m).items():
            assert not isinstance(v, FakeTensor), k
    for t in model.state_dict().values():
        assert not isinstance(t, FakeTensor)


@pytest.mark.parametrize("extrapolate", [True, False])
def test_estimate_leaves_a_real_module_as_it_was(extrapolate: bool) -> None:
    torch.manual_seed(0)
    model = Cache()
    before = dict(vars(model))
    estimate(model, "8,16", extrapolate=extrapolate)
    assert model.cache is None and model.pos is None and model.steps == 0
    assert model.history == [] and "seen" not in model._buffers
    assert not hasattr(model, "last_hidden")
    assert vars(model).keys() == before.keys()
    _no_fakes(model)

    x = torch.randn(8, 16)
    torch.manual_seed(0)
    eager = _train(Cache(), x)
    after = _train(model, x)
    assert eager.keys() == after.keys()
    assert all(torch.equal(eager[k], after[k]) for k in eager)


def test_estimate_that_raises_leaves_the_module_as_it_was() -> None:
    model = Cache()
    with pytest.raises(MetaTensorError):
        estimate(model, "8,17")
    assert model.cache is None and model.pos is None and model.steps == 0
    assert not hasattr(model, "last_hidden") and model.history == []
    _no_fakes(model)


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.memory: dict[str, list[torch.Tensor]] = {"h": []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l(x)
        self.memory["h"].append(h)
        return h


def test_a_fake_tensor_left_where_it_cannot_be_put_back_is_refused() -> None:
    model = Nested()
    with pytest.raises(
        MetaTensorError, match=r"'memory'.*Fix: estimate a module built by a factory"
    ):
        estimate(model, "2,4")
    assert estimate(Nested, "2,4").parameters == 20  # a factory's module is the estimate's own


def test_esm_trains_as_eager_after_an_estimate_of_it() -> None:
    # EsmRotaryEmbedding caches cos/sin tables, and the length they were made for,
    # on its first forward
    from transformers import EsmConfig, EsmForMaskedLM

    config = EsmConfig(
        vocab_size=33,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        position_embedding_type="rotary",
        pad_token_id=1,
        mask_token_id=32,
        max_position_embeddings=64,
    )

    def train(call_estimate: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = EsmForMaskedLM(config)
        if call_estimate:
            estimate(model, "4,24:int64")
            _no_fakes(model)
        torch.manual_seed(1)
        ids = torch.randint(4, 30, (4, 24))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            assert type(loss) is torch.Tensor
            loss.backward()
            opt.step()
            opt.zero_grad()
        return model.state_dict()

    eager, after = train(False), train(True)
    assert all(torch.equal(eager[k], after[k]) for k in eager)


def test_an_input_that_requires_grad_is_simulated_with_its_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    est = estimate(lambda: nn.Linear(16, 16), x, optimizer="sgd")
    model = nn.Linear(16, 16)
    with FlopCounterMode(display=False) as fwd:
        loss = model(x).sum()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    assert (est.forward_flops, est.backward_flops) == (
        fwd.get_total_flops(),
        bwd.get_total_flops(),
    )
    assert est.backward_flops == 2 * est.forward_flops  # grad of the weight and of the input

    def fresh_batch(out: torch.Tensor) -> torch.Tensor:
        # the helper feeds the same x every step: drop its last gradient as a new batch would
        x.grad = None
        return out.sum()

    real = measure_training_step(nn.Linear(16, 16), (x,), optimizer="sgd", loss_fn=fresh_batch)
    assert est.peak_bytes == real.peak_bytes
    plain = estimate(lambda: nn.Linear(16, 16), x.detach(), optimizer="sgd")
    assert est.peak_bytes > plain.peak_bytes


@pytest.mark.filterwarnings(
    "ignore:estimate. peak_bytes of .* may be too low by up to .*oneDNN convolution"
    ":lightning_meta.MetaTensorWarning"
)
@pytest.mark.parametrize(
    ("x", "factory"),
    [
        (torch.randn(1, 16).expand(8, 16), lambda: nn.Linear(16, 16)),  # one row's bytes
        # the convolution keeps channels_last in its output and gradients
        (torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last), lambda: nn.Conv2d(3, 4, 3)),
    ],
    ids=["expanded", "channels_last"],
)
def test_an_input_keeps_its_strides(x: torch.Tensor, factory: Any) -> None:
    est = estimate(factory, x, optimizer="sgd")
    real = measure_training_step(factory(), (x,), optimizer="sgd")
    assert (est.forward_flops, est.backward_flops) == (real.forward_flops, real.backward_flops)
    assert est.peak_bytes == real.peak_bytes


def _lazy() -> nn.Module:
    return nn.Sequential(nn.LazyLinear(64), nn.ReLU(), nn.LazyLinear(4))


@pytest.mark.parametrize("given", ["factory", "real module"])
def test_a_lazy_module_is_refused_with_a_fix_that_works(given: str) -> None:
    with pytest.raises(MetaTensorError) as info:
        estimate(_lazy if given == "factory" else _lazy(), "8,16")
    assert set(info.value.paths) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert "('0.weight', '0.bias', '2.weight', ...)" in str(info.value)
    assert "model(torch.empty(8, 16))" in str(info.value)

    def initialised() -> nn.Module:  # the fix the message gives
        model = _lazy()
        model(torch.empty(8, 16))
        return model

    est = estimate(initialised, "8,16")
    torch.manual_seed(0)
    real = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(8, 16)
    measured = measure_training_step(real, (x,))
    assert est.parameters == sum(p.numel() for p in real.parameters())
    assert (est.forward_flops, est.backward_flops, est.peak_bytes) == (
        measured.forward_flops,
        measured.backward_flops,
        measured.peak_bytes,
    )


class Misconfigured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(16, 16)
        self.cfg: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x) * self.cfg["scale"]


def test_a_model_bug_is_not_blamed_on_the_inputs() -> None:
    with pytest.raises(KeyError):
        Misconfigured()(torch.zeros(8, 16))  # eager fails the same way
    with pytest.raises(MetaTensorError) as info:
        estimate(Misconfigured, "8,16")
    message = str(info.value)
    assert "KeyError: 'scale'" in message
    assert "Fix: this comes from the code of Misconfigured, not from the inputs'" in message
    assert "pass example_inputs" not in message
    assert isinstance(info.value.__cause__, KeyError)
    # an input of the wrong width still gets the fix about the inputs
    with pytest.raises(MetaTensorError, match="Fix: pass example_inputs of the shapes"):
        estimate(Misconfigured, "8,15")


class MaskedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(100, 32)
        self.head = nn.Linear(32, 100)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.e(ids))
        mask = labels != -100  # from an input only: its values are known
        return nn.functional.cross_entropy(logits[mask], labels[mask])


def test_an_activation_indexed_by_a_mask_of_an_input_is_estimated_exactly() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (4, 16))
    labels = ids.clone()
    labels[:, ::2] = -100
    labels[0] = -100  # 24 of 64 positions count
    est = estimate(MaskedLM, (ids, labels), loss_fn=lambda out: out)
    torch.manual_seed(0)
    real = measure_training_step(MaskedLM(), (ids, labels), loss_fn=lambda out: out)
    assert (est.forward_flops, est.backward_flops, est.peak_bytes) == (
        real.forward_flops,
        real.backward_flops,
        real.peak_bytes,
    )
    # labels given by shape read as zeros: every position counts, and the read is listed
    by_shape = estimate(MaskedLM, ("4,16:int64", "4,16:int64"), loss_fn=lambda out: out)
    zeros = torch.zeros(4, 16, dtype=torch.int64)
    full = measure_training_step(MaskedLM(), (zeros, zeros.clone()), loss_fn=lambda out: out)
    assert (by_shape.forward_flops, by_shape.peak_bytes) == (full.forward_flops, full.peak_bytes)
    assert any("aten.index" in r for r in by_shape.inputs_read_as_zeros)


class WeightMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l(x)
        return h[h > 0]  # a mask computed from the weights: its values are not known


def test_a_mask_computed_from_weights_is_still_refused_as_such() -> None:
    with pytest.raises(MetaTensorError, match="values computed from its weights"):
        estimate(WeightMask, torch.randn(8, 16))
