"""Third review (zoo models): a deferred tensor's place given a new meta tensor; Parameter buffers.

- ``materialize(fallback="reset_parameters")`` refused the new meta tensors
  code puts where deferred ones were after the block (litgpt's
  ``model.max_seq_length = n`` recomputing ``cos``/``sin``; transformers'
  ``set_output_embeddings`` on an MLM head, whose ``bias`` it ties to the new
  layer's), blaming ``module.to(dtype)``; ``load_checkpoint`` then left them
  on meta, and its report gave no fix that worked;
- ``materialize(dtype=)`` and ``load_checkpoint(dtype=)`` kept an
  ``nn.Parameter`` registered as a buffer a ``Parameter``, where eager's
  ``module.to(dtype)`` makes it a plain tensor (transformers' FalconMamba).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_deferred import assert_same_as_eager
from torch import nn

from lightning_meta import MaterializationError, deferred_init, load_checkpoint, materialize
from support import deferred_models as md


def _shorter(model: nn.Module) -> nn.Module:
    model.max_seq_length = 16  # what litgpt's generate/chat scripts do after building
    return model


def test_litgpt_max_seq_length_after_the_block_is_filled_by_the_fallback_as_eager() -> None:
    pytest.importorskip("litgpt")
    torch.manual_seed(0)
    eager = _shorter(md.litgpt_pythia())
    after = torch.rand(4)
    torch.manual_seed(0)
    with deferred_init():
        model = md.litgpt_pythia()
    _shorter(model)
    materialize(model, fallback="reset_parameters")
    assert_same_as_eager(eager, model)
    assert torch.equal(torch.rand(4), after)
    idx = torch.randint(0, 128, (1, 8))
    assert torch.equal(model(idx), eager(idx))


def test_a_new_meta_tensor_in_a_deferred_place_is_refused_naming_the_assignment() -> None:
    pytest.importorskip("litgpt")
    with deferred_init():
        model = md.litgpt_pythia()
    _shorter(model)
    with pytest.raises(MaterializationError) as info:
        materialize(model)
    message = str(info.value)
    assert "replaced after the deferred_init block by new meta tensors" in message
    assert "cos (Tensor of shape (16, 2), deferred as (64, 2))" in message
    assert "pass fallback='reset_parameters'" in message
    assert "module.to(dtype)" not in message
    assert list(info.value.paths) == ["cos", "sin"]
    assert model.transformer.wte.weight.is_meta  # refused before anything was replayed


def _bert_head(model: nn.Module, device: str | None = None) -> nn.Module:
    # transformers' set_output_embeddings: decoder replaced, predictions.bias tied to its bias
    model.set_output_embeddings(nn.Linear(32, 128, device=device))
    return model


def test_a_new_mlm_head_on_meta_with_its_tied_bias_is_filled_by_the_fallback_as_eager() -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    eager = _bert_head(md.bert())
    after = torch.rand(4)
    torch.manual_seed(0)
    with deferred_init():
        model = md.bert()
    _bert_head(model, "meta")
    materialize(model, fallback="reset_parameters")
    assert_same_as_eager(eager, model)
    assert model.cls.predictions.bias is model.cls.predictions.decoder.bias
    assert torch.equal(torch.rand(4), after)
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(model.eval()(ids).logits, eager.eval()(ids).logits)


def test_litgpt_max_seq_length_then_load_checkpoint_is_completed_by_the_reported_fix(
    tmp_path: Path,
) -> None:
    pytest.importorskip("litgpt")
    torch.manual_seed(0)
    eager = _shorter(md.litgpt_pythia())
    path = tmp_path / "lit_model.pth"
    torch.save(eager.state_dict(), path)
    with deferred_init():
        model = md.litgpt_pythia()
    _shorter(model)
    report = load_checkpoint(model, path)
    assert report.left_on_meta == ["cos", "sin"]
    assert "lm.materialize(module, fallback='reset_parameters')" in str(report)
    materialize(model, fallback="reset_parameters")  # the fix the report gives
    assert_same_as_eager(eager, model)
    idx = torch.randint(0, 128, (1, 8))
    assert torch.equal(model(idx), eager(idx))


def test_module_to_dtype_replacing_buffers_is_still_refused_with_the_fallback() -> None:
    # Its buffers' values are the cast recorded ones, which reset_parameters() would not give.
    with deferred_init():
        module = nn.BatchNorm1d(4)
    module.to(torch.bfloat16)
    with pytest.raises(MaterializationError, match=r"running_mean.*pass dtype= to materialize"):
        materialize(module, fallback="reset_parameters")
    assert module.weight.is_meta


class _Mixer(nn.Module):
    """transformers' FalconMamba mixer registers Parameters as buffers (b_c_rms, dt_rms)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        rms = nn.Parameter(torch.ones(4), requires_grad=False)
        self.register_buffer("rms", rms, persistent=False)
        self.register_buffer("gain", nn.Parameter(torch.rand(4)))  # persistent, requires grad


def _classes(m: nn.Module) -> dict[str, tuple[type, bool, torch.dtype]]:
    return {n: (type(b), b.grad_fn is not None, b.dtype) for n, b in m.named_buffers()}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_parameter_buffer_is_what_module_to_makes_of_it(dtype: torch.dtype | None) -> None:
    torch.manual_seed(0)
    eager = _Mixer()
    if dtype is not None:
        eager.to(dtype)
    torch.manual_seed(0)
    with deferred_init():
        model = _Mixer()
    materialize(model, dtype=dtype)
    assert _classes(model) == _classes(eager)
    assert_same_as_eager(eager, model)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_parameter_buffer_loaded_or_replayed_with_dtype_is_what_module_to_makes_of_it(
    tmp_path: Path, dtype: torch.dtype | None
) -> None:
    torch.manual_seed(1)
    path = tmp_path / "mixer.pt"
    torch.save(_Mixer().state_dict(), path)
    torch.manual_seed(0)
    eager = _Mixer()
    eager.load_state_dict(torch.load(path))
    if dtype is not None:
        eager.to(dtype)
    torch.manual_seed(0)
    with deferred_init():
        model = _Mixer()
    report = load_checkpoint(model, path, dtype=dtype)
    assert report.replayed == ["rms"]
    assert _classes(model) == _classes(eager)
    assert_same_as_eager(eager, model)


def test_falcon_mamba_materialized_in_bf16_is_eager_cast() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FalconMambaConfig(
        vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4
    )
    torch.manual_seed(0)
    eager = transformers.FalconMambaForCausalLM(cfg).to(torch.bfloat16)
    torch.manual_seed(0)
    with deferred_init():
        model = transformers.FalconMambaForCausalLM(cfg)
    materialize(model, dtype=torch.bfloat16)
    if "b_c_rms" in dict(eager.backbone.layers[0].mixer.named_buffers()):
        # (transformers 5.3; later versions compute it without a Parameter buffer)
        assert type(model.backbone.layers[0].mixer.b_c_rms) is torch.Tensor
    assert_same_as_eager(eager, model)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", nn.Parameter(torch.empty(4), requires_grad=False))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.scale)


def test_a_parameter_buffer_the_fallback_fills_and_casts_is_what_module_to_makes_of_it() -> None:
    torch.manual_seed(0)
    eager = _Scaled().to(torch.bfloat16)
    with torch.device("meta"):
        model = _Scaled()
    torch.manual_seed(0)
    materialize(model, dtype=torch.bfloat16, fallback="reset_parameters")
    assert _classes(model) == _classes(eager)
    assert_same_as_eager(eager, model)


def test_the_fallback_refuses_a_module_holding_other_tensors_before_replaying() -> None:
    # Linear.reset_parameters() would draw the deferred weight again, which eager does not.
    with deferred_init():
        net = nn.Sequential(nn.Linear(4, 4))
    net[0].bias = nn.Parameter(torch.empty(4, device="meta"))
    with pytest.raises(MaterializationError) as info:
        materialize(net)
    assert "fallback='reset_parameters'" not in str(info.value)  # it would not work here
    with pytest.raises(MaterializationError, match=r"'0': \['0.weight'\].*draw those again"):
        materialize(net, fallback="reset_parameters")
    assert net[0].weight.is_meta and net[0].bias.is_meta  # nothing replayed
