"""A transformers 5 checkpoint in the hub's layout, which its loader converts.

transformers 5 keeps a mixture of experts fused (``mlp.experts.gate_up_proj``) while its
``save_pretrained`` writes the per-expert layout (``block_sparse_moe.experts.N.w1``); its
``from_pretrained`` converts it back. ``load_checkpoint`` applies no conversion: the
refusal said "load into the module the checkpoint was saved from ... or strict=False",
and strict=False left the experts as initialised. Found by the hostile review of
loading, 2026-12-05.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import lightning_meta as lm

pytest.importorskip("transformers.conversion_mapping")  # transformers 5


def _config() -> object:
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
    )


def test_a_layout_transformers_converts_is_refused_with_the_conversions_named(
    tmp_path: Path,
) -> None:
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MixtralForCausalLM(_config()).save_pretrained(tmp_path)
    with lm.deferred_init():
        model = MixtralForCausalLM(_config())
    with pytest.raises(lm.MetaTensorError) as info:
        lm.load_checkpoint(model, tmp_path)
    text = str(info.value)
    assert "transformers converts this layout when it loads into MixtralForCausalLM" in text
    assert "'.experts.*.w1.weight' + '.experts.*.w3.weight' -> '.experts.gate_up_proj'" in text
    assert "strict=False would leave the 3 missing tensors as initialised" in text
    assert "or strict=False to load what matches" not in text
    # The fix it gives: transformers' own load, saved once, loads exactly.
    loaded = MixtralForCausalLM.from_pretrained(tmp_path)
    torch.save(loaded.state_dict(), tmp_path / "converted.pt")
    with lm.deferred_init():
        again = MixtralForCausalLM(_config())
    lm.load_checkpoint(again, tmp_path / "converted.pt")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_a_mismatch_transformers_does_not_convert_keeps_the_plain_fix(tmp_path: Path) -> None:
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    source = MixtralForCausalLM(_config())
    state = {f"extra.{k}": v for k, v in source.state_dict().items() if "lm_head" in k}
    torch.save({**source.state_dict(), **state}, tmp_path / "extra.pt")
    with lm.deferred_init():
        model = MixtralForCausalLM(_config())
    with pytest.raises(lm.MetaTensorError) as info:
        lm.load_checkpoint(model, tmp_path / "extra.pt")
    assert "transformers converts" not in str(info.value)
    assert "or strict=False to load what matches" in str(info.value)
