"""Materialized dtypes are eager construction's dtypes (issue #11, item 3)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import pytest
import torch
from test_deferred import assert_same_as_eager, tensors
from torch import nn

from lightning_meta import MaterializationError, deferred_init, materialize
from support import deferred_models as md


@pytest.fixture(autouse=True)
def _default_dtype_restored() -> Iterator[None]:
    before = torch.get_default_dtype()
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_default_dtype_of_the_block_is_kept(dtype: torch.dtype) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)
        try:
            return md.Custom()
        finally:
            torch.set_default_dtype(torch.float32)

    eager = build()
    with deferred_init():
        module = build()
    assert module.scale.dtype == dtype  # the meta tensors had the right dtype already
    materialize(module)
    assert module.scale.dtype == dtype
    assert_same_as_eager(eager, module)


def test_default_dtype_changed_inside_the_block_is_replayed_op_by_op() -> None:
    def build() -> nn.Module:
        first = nn.Linear(3, 3)
        torch.set_default_dtype(torch.float64)
        try:
            second = nn.Linear(3, 3)
            ratio = nn.Parameter(torch.arange(4) / 3)  # true division: the default dtype
        finally:
            torch.set_default_dtype(torch.float32)
        return nn.ParameterList([first.weight, second.weight, ratio])

    torch.manual_seed(0)
    eager = build()
    torch.manual_seed(0)
    module = deferred_init(build)
    materialize(module)
    assert [t.dtype for t in tensors(module).values()] == [
        torch.float32,
        torch.float64,
        torch.float64,
    ]
    assert_same_as_eager(eager, module)


def test_transformers_from_config_with_dtype() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        eager = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
        torch.manual_seed(0)
        with deferred_init():
            module = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    materialize(module)
    assert module.model.embed_tokens.weight.dtype == torch.bfloat16
    assert_same_as_eager(eager, module)


def test_fabric_init_module_with_bf16_true() -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-true")
    torch.manual_seed(0)
    with fabric.init_module():
        eager = md.NanoGPT()
    torch.manual_seed(0)
    with fabric.init_module(), deferred_init():
        module = md.NanoGPT()
    materialize(module)
    assert module.lm_head.weight.dtype == torch.bfloat16
    assert_same_as_eager(eager, module)


class _Filled(nn.Module):
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, value: float) -> None:
        super().__init__()
        self.register_buffer("zeroed", torch.ones(shape, dtype=dtype).zero_())
        self.register_buffer("filled", torch.empty(shape, dtype=dtype).fill_(value))


@pytest.mark.parametrize(
    ("shape", "dtype", "value"),
    [
        ((3,), torch.float16, 70000),  # overflows float16: eager raises
        ((), torch.float16, 70000),  # one element: eager's own kernel lets it through
        ((2, 2), torch.float32, 1e39),
        ((0,), torch.int8, 300),
        ((4,), torch.int8, -1),
        ((4,), torch.int64, 1.5),
        ((4,), torch.bool, 2),
        ((4,), torch.bfloat16, float("-inf")),
    ],
)
def test_fills_raise_or_fill_as_eager(
    shape: tuple[int, ...], dtype: torch.dtype, value: float
) -> None:
    """``zero_`` / ``fill_`` skip the fake mode: a value eager refuses is refused at its line."""
    eager: nn.Module | RuntimeError
    try:
        eager = _Filled(shape, dtype, value)
    except RuntimeError as e:
        eager = e
    if isinstance(eager, RuntimeError):
        with pytest.raises(RuntimeError, match="without overflow") as raised, deferred_init():
            _Filled(shape, dtype, value)
        assert str(raised.value) == str(eager)
        return
    with deferred_init():
        module = _Filled(shape, dtype, value)
    materialize(module)
    assert_same_as_eager(eager, module)


def test_a_fill_on_a_meta_tensor_checks_nothing_as_eager() -> None:
    """The meta kernel lets an overflowing value through: no CPU check may refuse it."""

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            shape = torch.empty(4, dtype=torch.float16, device="meta").fill_(1e39).shape
            self.register_buffer("b", torch.ones(shape))

    eager = Probe()
    with deferred_init():
        module = Probe()
    materialize(module)
    assert_same_as_eager(eager, module)


class Rotary(nn.Module):
    """A complex64 freqs_cis buffer next to a float weight (Meta's Llama, torchtitan)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        angles = torch.outer(torch.arange(6.0), torch.rand(2))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles))


def test_dtype_casts_complex_tensors_as_module_to_does() -> None:
    # materialize(dtype=) left complex buffers as they were; module.to(dtype)
    # casts floating point and complex tensors.
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: casting complex to real drops the imaginary part
        eager = Rotary().to(torch.bfloat16)
        torch.manual_seed(0)
        with deferred_init():
            module = Rotary()
        materialize(module, dtype=torch.bfloat16)
    assert module.freqs_cis.dtype == torch.bfloat16
    assert_same_as_eager(eager, module)


def test_module_to_dtype_after_the_block_is_followed() -> None:
    # model.to(torch.bfloat16) after the block gave the same tensor objects
    # bfloat16 storage; materialize made float32 values from the record.
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    torch.manual_seed(0)
    with deferred_init():
        module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    module.to(torch.bfloat16)
    copied = copy.deepcopy(module)
    for model in (module, copied):
        materialize(model)
        assert_same_as_eager(eager, model)


def test_cast_after_the_block_and_dtype_argument_together_are_refused() -> None:
    with deferred_init():
        module = nn.Linear(4, 4)
    module.to(torch.bfloat16)
    with pytest.raises(MaterializationError, match=r"cast once"):
        materialize(module, dtype=torch.float16)
    assert module.weight.is_meta  # nothing changed


def test_data_assigned_after_the_block_is_refused() -> None:
    # The record's values came back in place of the assigned ones.
    with deferred_init():
        module = nn.Linear(4, 4)
    module.weight.data = torch.empty(2, 4, device="meta")
    with pytest.raises(MaterializationError, match=r"\['weight'\].*given other data, of another"):
        materialize(module)


def test_module_to_dtype_replacing_buffers_is_refused_with_the_fix() -> None:
    # module.to() gives floating-point buffers new meta tensors, whose values
    # the record does not give.
    with deferred_init():
        module = nn.BatchNorm1d(4)
    module.to(torch.bfloat16)
    with pytest.raises(MaterializationError, match=r"running_mean.*pass dtype= to materialize"):
        materialize(module)
