"""estimate refuses the inputs a real kernel would refuse for their dtype (fake kernels let them through).

Each refused case is checked against the real model first: its forward must
raise on real tensors, so the refusal is never stricter than torch. Each
accepted case (ids into an embedding, mixed precision, masks, index ops)
must also run for real.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_meta import MetaTensorError, estimate
from lightning_meta._cli import main
from lightning_meta._estimate import _kernels
from lightning_meta._estimate._kernels import KernelRefusal, RealKernels
from lightning_meta._estimate._specs import parse_input_spec

# ---------------------------------------------------------------- models


class Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class Lookup(nn.Module):
    """Indexes its weight with the input: the input must hold integers."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(10, 4))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, idx)


class Activated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.gelu(x).float())


class Tolerant(nn.Module):
    """Catches torch's dtype error and converts: estimate must follow the same path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.fc(x)
        except RuntimeError:
            return self.fc(x.float())


class Tagger(nn.Module):
    """Token ids through an embedding, a padding mask, a causal mask, an index op."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32, padding_idx=0)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.1)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        h = self.enc(self.emb(ids), mask=causal, src_key_padding_mask=pad, is_causal=True)
        h = h.masked_fill(pad[..., None], 0.0)
        first = torch.gather(
            h, 1, torch.zeros(ids.shape[0], 1, 32, dtype=torch.long, device=ids.device)
        )
        return self.head(first[:, 0] + h[torch.arange(ids.shape[0], device=ids.device), -1])


def _class_loss(out: torch.Tensor) -> torch.Tensor:
    target = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
    return F.cross_entropy(out, target)


def _real_inputs(spec: str | tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    specs = (spec,) if isinstance(spec, str) else spec
    return tuple(torch.zeros(s.shape, dtype=s.dtype) for s in map(parse_input_spec, specs))


# ---------------------------------------------------------------- refused

REFUSED: dict[str, tuple[Callable[[], nn.Module], str, str, str]] = {
    # name: (factory, input spec, operator, where: "" for the root)
    "int64 into Linear": (lambda: nn.Linear(16, 4), "8,16:int64", "aten.addmm", ""),
    "float64 into Linear": (lambda: nn.Linear(16, 4), "8,16:float64", "aten.addmm", ""),
    "bfloat16 into a float32 Linear": (lambda: nn.Linear(16, 4), "8,16:bfloat16", "aten.addmm", ""),
    "int64 into a 3d Linear": (lambda: nn.Linear(16, 4), "2,8,16:int64", "aten.", ""),
    "float64 into LayerNorm": (Norm, "8,16:float64", "aten.native_layer_norm", "norm"),
    "float index": (Lookup, "3:float32", "aten.index_select", ""),
    "gelu of integers": (Activated, "3,4:int64", "aten.gelu", ""),
    "float64 into an MLP": (
        lambda: nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)),
        "4,16:float64",
        "aten.addmm",
        "0",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_like_the_real_forward(name: str) -> None:
    factory, spec, op, where = REFUSED[name]
    with pytest.raises(RuntimeError):  # the real model refuses it: estimate must too
        factory()(*_real_inputs(spec))
    place = f" in module '{where}'" if where else " would fail"
    with pytest.raises(MetaTensorError, match=r"would fail on a real device") as info:
        estimate(factory, spec, optimizer="sgd")
    e = info.value
    assert isinstance(e, MetaTensorError) and type(e) is MetaTensorError  # not a bad argument
    text = str(e)
    assert op in text and place in text and "Fix: " in text
    assert e.paths == ((where,) if where else ())


def test_message_names_op_module_dtypes_and_fix() -> None:
    with pytest.raises(
        MetaTensorError,
        match=(
            r"the forward of Sequential in module '0' would fail on a real device: aten.addmm "
            r"refuses the dtypes of its tensors \(float32\[8\], int64\[4, 16\], float32\[16, 8\]\): "
            r"mat1 and mat2 must have the same dtype.*Fix: pass float32 inputs to this module, "
            r"or integer ids only to an nn.Embedding"
        ),
    ):
        estimate(lambda: nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 2)), "4,16:int64")


def test_refused_in_the_loss_names_the_loss() -> None:
    def bce(out: torch.Tensor) -> torch.Tensor:
        target = torch.zeros(out.shape, dtype=torch.float64, device=out.device)
        return F.binary_cross_entropy(out.sigmoid(), target)

    with pytest.raises(RuntimeError):
        bce(nn.Linear(4, 1)(torch.zeros(3, 4)))
    with pytest.raises(
        MetaTensorError,
        match=r"the loss of Linear would fail.*aten.binary_cross_entropy.*Fix: make loss_fn",
    ):
        estimate(lambda: nn.Linear(4, 1), "3,4:float32", loss_fn=bce)


def test_model_that_catches_the_error_runs_as_it_would_for_real() -> None:
    with FlopCounterMode(display=False) as counter:
        real = Tolerant()(torch.zeros(8, 16, dtype=torch.int64))
    assert real.shape == (8, 4)
    est = estimate(Tolerant, "8,16:int64", optimizer="sgd")
    # the refused call counts no FLOP, as the real one raised before computing
    assert est.forward_flops == counter.get_total_flops() == 2 * 8 * 16 * 4


def test_refusal_is_the_kind_torch_raises() -> None:
    check = RealKernels(torch.device("cpu"))
    x, w = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 4)
    with pytest.raises(
        RuntimeError, match=r"aten.mm: expected m1 and m2 to have the same dtype"
    ) as info:
        check.observe(torch.ops.aten.mm.default, (x, w), {})
    assert isinstance(info.value, KernelRefusal)
    assert info.value.op == "aten.mm" and info.value.dtypes == (torch.int64, torch.float32)
    # torch 2.13 raises NotImplementedError for gelu of integers, torch 2.6 RuntimeError
    with pytest.raises(Exception) as torch_raised:
        torch.nn.functional.gelu(x)
    with pytest.raises(type(torch_raised.value), match=r"aten.gelu: .*not implemented for 'Long'"):
        check.observe(torch.ops.aten.gelu.default, (x,), {})
    # accepted calls and views pass; a repeated call is answered from memory
    check.observe(torch.ops.aten.mm.default, (x.float(), w), {})
    check.observe(torch.ops.aten.t.default, (x,), {})
    assert any(k[1] is torch.ops.aten.mm.default for k in _kernels._VERDICTS)


def test_accelerator_target_does_not_hold_cpu_gaps_against_the_model() -> None:
    # "not implemented for 'Half'" is a gap of some CPU kernels, not of CUDA ones
    from lightning_meta._compat import is_dtype_refusal

    gap = NotImplementedError("\"addmm_impl_cpu_\" not implemented for 'Half'")
    assert is_dtype_refusal(gap, cpu_only_gaps=True)
    assert not is_dtype_refusal(gap, cpu_only_gaps=False)
    assert is_dtype_refusal(
        NotImplementedError("\"gelu\" not implemented for 'Long'"), cpu_only_gaps=False
    )
    assert not is_dtype_refusal(
        NotImplementedError("Could not run 'aten::x' with arguments from the 'CPU' backend"),
        cpu_only_gaps=True,
    )
    assert not is_dtype_refusal(IndexError("index out of range in self"), cpu_only_gaps=True)


# ---------------------------------------------------------------- accepted

ACCEPTED: dict[str, tuple[Callable[[], nn.Module], Any, dict[str, Any]]] = {
    "int64 ids into an embedding": (lambda: nn.Embedding(10, 4), "3,5:int64", {}),
    "int32 ids into an embedding": (lambda: nn.Embedding(10, 4), "3,5:int32", {}),
    "ids, masks, gather, index, class targets": (
        Tagger,
        ("4,10:int64", "4,10:bool"),
        {"loss_fn": _class_loss},
    ),
    "bf16 input under bf16-mixed": (
        lambda: nn.Linear(16, 4),
        "8,16:bfloat16",
        {"precision": "bf16-mixed"},
    ),
    "float64 input under bf16-true": (
        lambda: nn.Linear(16, 4),
        "8,16:float64",
        {"precision": "bf16-true"},
    ),
    "float32 input under 64-true": (Norm, "8,16:float32", {"precision": "64-true"}),
    "bool mask times floats": (
        lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)),
        "2,4:float32",
        {},
    ),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_legitimate_mixed_dtypes_pass(name: str) -> None:
    factory, spec, kwargs = ACCEPTED[name]
    est = estimate(factory, spec, optimizer="sgd", **kwargs)
    assert est.forward_flops >= 0 and est.peak_bytes > 0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"])
def test_tiny_llama_passes_every_precision(precision: str) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    est = estimate(lambda: transformers.LlamaForCausalLM(config), "2,8:int64", precision=precision)
    assert est.parameters > 0


# ---------------------------------------------------------------- command line


def test_cli_exits_1_on_a_refused_dtype(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        ["estimate", "torch.nn:Linear", "--args", "[16, 4]", "--input", "8,16:int64", "--json"]
    )
    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    assert "aten.addmm refuses the dtypes" in captured.err and "Traceback" not in captured.err
    assert (
        main(
            [
                "estimate",
                "torch.nn:Linear",
                "--args",
                "[16, 4]",
                "--input",
                "8,16:float32",
                "--json",
            ]
        )
        == 0
    )


def test_asking_the_real_kernels_draws_no_random_number() -> None:
    # dropout's real kernel runs on tiny tensors: the global generator must not move
    _kernels._VERDICTS.clear()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    model = lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))  # noqa: E731
    estimate(model, "3,4:float32")
    assert any("bernoulli" in str(k[1]) for k in _kernels._VERDICTS)  # dropout, decomposed
    assert torch.equal(torch.get_rng_state(), state)
