"""Ensemble, second hostile review: forwards that draw outside torch's traced ops, torch's
eval fast paths under vmap, grouped type_as/to, the bf16 fused plan with a hook, and a
shape-only Ensemble built under torch.device("meta") (lm.estimate)."""

from __future__ import annotations

import copy
import random
import threading
import time
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm
from lightning_meta._errors import ArgumentValueError, MetaTensorError


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")


# ----------------------------------------------------------------- random draws in Python code
class TorchDrop(nn.Module):
    """Stochastic depth written with a draw that takes no traced tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def draw(self) -> bool:
        return bool(torch.rand(()) < 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.draw():
            return x
        return x + torch.relu(self.bn(self.conv(x)))


class PythonDrop(TorchDrop):
    def draw(self) -> bool:
        return random.random() < 0.5


class NumpyDrop(TorchDrop):
    def draw(self) -> bool:
        return bool(np.random.rand() < 0.5)


def _net(block: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        block(),
        block(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.mark.parametrize("block", [TorchDrop, PythonDrop, NumpyDrop])
def test_grouped_refuses_a_forward_drawing_outside_the_traced_ops(
    block: type[nn.Module],
) -> None:
    # The trace drew once and kept the branch it took for every call and member.
    torch.manual_seed(0)
    members = [_net(block) for _ in range(4)]
    with pytest.raises(ArgumentValueError, match="draws random numbers outside the traced ops"):
        lm.Ensemble(copy.deepcopy(members), execution="grouped")


@pytest.mark.parametrize("block", [TorchDrop, PythonDrop, NumpyDrop])
def test_auto_runs_stochastic_depth_as_the_members(block: type[nn.Module]) -> None:
    torch.manual_seed(0)
    members = [_net(block) for _ in range(4)]
    x = torch.randn(8, 3, 6, 6)
    ens = lm.Ensemble(copy.deepcopy(members))
    ref = copy.deepcopy(members)
    _seed(1)
    outs = [ens(x) for _ in range(6)]
    _seed(1)
    refs = [torch.stack([m(x) for m in ref]) for _ in range(6)]
    assert ens.plan == "loop"
    for out, expected in zip(outs, refs, strict=True):
        torch.testing.assert_close(out, expected)
    # The draws differ from call to call and from member to member.
    assert len({tuple(o[:, 0, 0].tolist()) for o in outs}) > 1
    for i, m in enumerate(ref):
        torch.testing.assert_close(
            ens.stacked.get_buffer("1.bn.running_mean")[i], m[1].bn.running_mean
        )


def test_grouped_trace_leaves_the_generators_as_they_were() -> None:
    torch.manual_seed(0)
    ens = lm.Ensemble([_net(TorchDrop).eval() for _ in range(2)])
    ens.train()
    _seed(3)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    # Tracing (the train-mode graph is traced for the candidates) draws and puts back.
    assert ens._grouped.placeholders(ens.template.module) == -1
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])


class LayerDrop(nn.Module):
    """LayerDrop in the fairseq style: one draw of Python's (or numpy's) random per layer."""

    def __init__(self, use_numpy: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(3)
        )
        self.use_numpy = use_numpy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            draw = np.random.rand() if self.use_numpy else random.random()
            if self.training and draw < 0.5:
                continue
            x = x + layer(x)
        return x


@pytest.mark.parametrize("use_numpy", [False, True])
def test_vmap_refuses_a_forward_drawing_from_the_global_python_generators(
    use_numpy: bool,
) -> None:
    torch.manual_seed(0)
    ens = lm.Ensemble([LayerDrop(use_numpy) for _ in range(4)], execution="vmap")
    _seed(5)
    before = random.getstate(), np.random.get_state()[1].copy(), np.random.get_state()[2]
    with pytest.raises(ArgumentValueError, match="execution='loop'") as info:
        ens(torch.randn(2, 8))
    assert "numpy.random" in str(info.value) if use_numpy else "Python's random" in str(info.value)
    # Put back: the failed call drew nothing.
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert np.random.get_state()[2] == before[2]


@pytest.mark.parametrize("use_numpy", [False, True])
def test_auto_runs_a_global_random_layerdrop_as_the_members(use_numpy: bool) -> None:
    torch.manual_seed(0)
    shared = LayerDrop(use_numpy)
    members = [copy.deepcopy(shared) for _ in range(4)]  # any difference is a draw
    ens = lm.Ensemble(copy.deepcopy(members))
    ref = copy.deepcopy(members)
    x = torch.randn(2, 8)
    _seed(7)
    outs = [ens(x) for _ in range(10)]
    after = random.getstate(), np.random.get_state()[2]
    _seed(7)
    refs = [torch.stack([m(x) for m in ref]) for _ in range(10)]
    assert ens.plan == "loop"
    for out, expected in zip(outs, refs, strict=True):
        torch.testing.assert_close(out, expected)
    # The timed runs drew nothing the calls did not.
    assert after == (random.getstate(), np.random.get_state()[2])
    # The members drew apart: on some call two members took different layers.
    assert any(not torch.equal(o[0], o[i]) for o in outs for i in range(1, 4))


# ------------------------------------------------------------------- torch's eval fast paths
def _encoder_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)


def _encoder() -> nn.Module:
    return nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True), 2
    )


@pytest.mark.parametrize("norm_first", [False, True])
def test_vmap_eval_with_gradients_runs_the_members_standard_path(norm_first: bool) -> None:
    # In eval with gradients on, the members run the standard path; vmap took the fused
    # fast path (no derivative: backward raised).
    torch.manual_seed(0)
    members = [
        nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first
        ).eval()
        for _ in range(3)
    ]
    ens = lm.Ensemble(copy.deepcopy(members), execution="vmap")
    x = torch.randn(2, 5, 8)  # an input without grad: only the parameters' requires_grad
    out = ens(x)
    out.square().sum().backward()
    expected = torch.stack([m(x) for m in members])
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    grads = torch.stack([m.self_attn.in_proj_weight.grad for m in members])
    torch.testing.assert_close(ens.stacked.get_parameter("self_attn.in_proj_weight").grad, grads)
    assert torch.backends.mha.get_fastpath_enabled()  # put back


def test_vmap_eval_no_grad_multihead_attention_agrees() -> None:
    torch.manual_seed(0)
    members = [nn.MultiheadAttention(8, 2, batch_first=True).eval() for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members), execution="vmap")
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, -2:] = True
    with torch.no_grad():
        out = ens(x, x, x, key_padding_mask=mask, need_weights=False)[0]
        expected = torch.stack(
            [m(x, x, x, key_padding_mask=mask, need_weights=False)[0] for m in members]
        )
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_nested_tensor_encoder_in_eval_runs_the_loop(context: type) -> None:
    # The members' nested-tensor fast path gives zeros at padded positions; vmap cannot run
    # it (it raised), and its standard path gives other values there.
    torch.manual_seed(0)
    members = [_encoder().eval() for _ in range(3)]
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, -2:] = True
    with context():
        expected = torch.stack([m(x, src_key_padding_mask=mask) for m in members])
        ens = lm.Ensemble(copy.deepcopy(members))
        assert torch.equal(ens(x, src_key_padding_mask=mask), expected)
        assert ens.plan == "loop"
        forced = lm.Ensemble(copy.deepcopy(members), execution="vmap")
        with pytest.raises(ArgumentValueError, match="nested-tensor fast path.*execution='loop'"):
            forced(x, src_key_padding_mask=mask)


def test_nested_tensor_encoder_untimed_auto_runs_the_loop() -> None:
    torch.manual_seed(0)
    members = [_encoder().eval() for _ in range(3)]
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, -2:] = True
    ens = lm.Ensemble(copy.deepcopy(members))
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            out = ens(x, src_key_padding_mask=mask)
            expected = torch.stack([m(x, src_key_padding_mask=mask) for m in members])
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert torch.equal(out, expected)


class _Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.ensemble = lm.Ensemble.from_factory(_encoder, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        mask[:, -1] = True
        return self.ensemble(self.embed(x), src_key_padding_mask=mask).mean(dim=(2, 3))

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (self(x) - y).square().mean()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y = batch
        self.log("val", (self(x) - y).square().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_deterministic_validates_a_transformer_encoder_ensemble(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 5, 4, generator=g), torch.randn(8, generator=g))
    model = _Classifier()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        deterministic=True,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    try:
        trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.isfinite(trainer.callback_metrics["val"])


# ------------------------------------------------------------------- grouped: type_as, to
class Masked(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.how = how

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        m = mask.type_as(h) if self.how == "type_as" else mask.to(h)
        return h * m


@pytest.mark.parametrize("how", ["type_as", "to"])
@pytest.mark.parametrize("execution", ["grouped", "auto"])
def test_grouped_type_as_and_to_another_activation(how: str, execution: str) -> None:
    torch.manual_seed(0)
    members = [Masked(how) for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members), execution=execution)
    x = torch.randn(2, 3, 5, 5)
    mask = torch.rand(2, 1, 5, 5) > 0.5
    out = ens(x, mask)
    torch.testing.assert_close(out, torch.stack([m(x, mask) for m in members]))


def test_grouped_lets_a_genuine_type_error_of_the_forward_through() -> None:
    class Wrong(Masked):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.conv(x).type_as(3)

    ens = lm.Ensemble([Wrong("type_as") for _ in range(2)], execution="grouped")
    with pytest.raises(TypeError, match="type_as"):
        ens(torch.randn(2, 3, 5, 5), torch.ones(2, 1, 5, 5))


# ------------------------------------------------------------ bf16 fused plan with a hook
def test_bf16_fused_plan_with_a_hook_runs_the_loop() -> None:
    torch.manual_seed(0)
    members = [
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
        for _ in range(4)
    ]
    ens = lm.Ensemble(copy.deepcopy(members), execution="fused")
    x = torch.randn(64, 16, dtype=torch.bfloat16)
    assert torch.equal(ens(x), torch.stack([m(x) for m in members]))

    def identity(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        return output

    ens.template.module[0].register_forward_hook(identity)
    for m in members:
        m[0].register_forward_hook(identity)
    with torch.no_grad():
        assert torch.equal(ens(x), torch.stack([m(x) for m in members]))
    assert ens.plan == "loop"


# ------------------------------------------------- shape-only ensemble under meta (estimate)
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))


class Ensembled(nn.Module):
    """getting-started's my_ensemble.py, with a forward."""

    def __init__(self, members: int = 8) -> None:
        super().__init__()
        self.ensemble = lm.Ensemble.from_factory(_mlp, members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble(x)


class Listed(nn.Module):
    def __init__(self, members: int = 8) -> None:
        super().__init__()
        self.members = nn.ModuleList(_mlp() for _ in range(members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])


def test_estimate_counts_an_ensemble_as_its_members() -> None:
    ens, listed = lm.estimate(Ensembled, "64,1"), lm.estimate(Listed, "64,1")
    assert ens.parameters == listed.parameters == 8 * 97
    assert ens.parameter_bytes == listed.parameter_bytes
    assert ens.gradient_bytes == listed.gradient_bytes
    assert ens.forward_flops == listed.forward_flops > 0
    assert ens.backward_flops == listed.backward_flops > 0


def test_ensemble_built_under_meta_is_shape_only() -> None:
    with torch.device("meta"):
        model = Ensembled(4)
    stacked = model.ensemble.stacked.get_parameter("0.weight")
    assert stacked.is_meta and stacked.shape == (4, 32, 1)
    out = model(torch.empty(64, 1, device="meta"))
    assert out.is_meta and out.shape == (4, 64, 1)
    assert model.ensemble.plan == "loop"
    # Materialised and loaded, it is an ordinary ensemble.
    real = Ensembled(4)
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())
    x = torch.randn(5, 1)
    torch.testing.assert_close(model(x), real(x))


def test_meta_members_outside_a_meta_block_are_refused() -> None:
    members = [_mlp().to("meta") for _ in range(2)]
    with pytest.raises(MetaTensorError, match=r"lm\.materialize.*torch\.device\('meta'\)") as info:
        lm.Ensemble(members)
    assert info.value.paths == ("0.weight",)


class _SlowAttention(nn.Module):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return self.attn(x, x, x, need_weights=False)[0]


def test_two_threads_running_attention_under_vmap_keep_the_fast_path_off() -> None:
    # The switch of torch.backends.mha is one flag for the process: the first
    # ensemble to finish turned it back on while the second was still in its
    # vmap call, whose backward then raised torch's "derivative for
    # aten::_native_multi_head_attention is not implemented".
    x = torch.randn(2, 5, 8)

    def members(delay: float) -> list[nn.Module]:
        torch.manual_seed(0)
        return [_SlowAttention(delay).eval() for _ in range(3)]

    ensembles = [lm.Ensemble(members(delay), execution="vmap").eval() for delay in (0.3, 0.6)]
    errors: list[BaseException] = []

    def run(ensemble: lm.Ensemble, wait: float) -> None:
        try:
            time.sleep(wait)
            ensemble(x).sum().backward()
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=(e, wait))
        for e, wait in zip(ensembles, (0.0, 0.1), strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert torch.backends.mha.get_fastpath_enabled()  # as it was
    reference = members(0.0)
    torch.stack([m(x) for m in reference]).sum().backward()
    expected = torch.stack([m.attn.in_proj_weight.grad for m in reference])
    for ensemble in ensembles:
        torch.testing.assert_close(ensemble.tensors()["attn.in_proj_weight"].grad, expected)
