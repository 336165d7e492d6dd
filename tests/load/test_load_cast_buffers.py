"""``module.to(dtype)`` on a deferred model, then ``load_checkpoint``.

``module.to`` gives floating-point buffers new meta tensors, which no record fills; one
the checkpoint does not hold (a rotary ``inv_freq``) was left on meta without an error,
and the forward raised torch's "Cannot copy out of meta tensor". ``materialize`` refused
it; ``load_checkpoint`` now does too, with fixes that load. Found by the hostile review
of the support window, 2026-12-05 (fifth session), on a deferred Llama cast before
``fully_shard``, as the refusal of a sharded ``dtype=`` said to do.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import lightning_meta as lm
from support import deferred_models

transformers = pytest.importorskip("transformers")


def _llama(directory: Path) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deferred_models.llama().save_pretrained(directory)
    return directory


def _deferred(directory: Path) -> torch.nn.Module:
    return lm.deferred_init(deferred_models.llama)  # the saved model's config


def test_buffers_cast_after_the_block_are_refused_with_fixes_that_load(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    directory = _llama(tmp_path / "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = LlamaForCausalLM.from_pretrained(directory).to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 6))
    expected = eager(ids).logits

    model = _deferred(directory).to(torch.bfloat16)
    with pytest.raises(lm.MaterializationError) as refused:
        lm.load_checkpoint(model, directory)
    message = str(refused.value)
    assert message.startswith(
        "load_checkpoint cannot fill ['model.rotary_emb.inv_freq (Tensor in torch.bfloat16, "
        "deferred in torch.float32)'"
    )
    assert "Fix: pass dtype= to load_checkpoint instead of module.to(dtype)" in message
    assert "for p in ['model.rotary_emb']: lm.materialize(model.get_submodule(p))" in message
    assert "model.rotary_emb.inv_freq" in refused.value.paths
    assert all(t.is_meta for t in model.state_dict().values())  # nothing changed

    # The fixes the message gives: dtype= ...
    model = _deferred(directory)
    lm.load_checkpoint(model, directory, dtype=torch.bfloat16)
    assert torch.equal(model(ids).logits, expected)
    # ... or the buffers' module made real before the cast (what a sharded model needs).
    model = _deferred(directory)
    for p in ["model.rotary_emb"]:
        lm.materialize(model.get_submodule(p))
    model.to(torch.bfloat16)
    lm.load_checkpoint(model, directory)
    assert torch.equal(model(ids).logits, expected)


class _Rope(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, 4, 2).float() / 4))
        self.register_buffer("inv_freq", inv_freq, persistent=False)


@pytest.mark.parametrize("there_and_back", [False, True])
def test_a_cast_there_and_back_is_refused_too(tmp_path: Path, there_and_back: bool) -> None:
    # The regression sweep found .half().float() still left inv_freq on meta silently.
    torch.save(_Rope().state_dict(), tmp_path / "rope.pt")
    model = lm.deferred_init(_Rope).half()
    if there_and_back:
        model.float()
    described = (
        "a new Tensor of its shape and dtype" if there_and_back else "Tensor in torch.float16"
    )
    with pytest.raises(
        lm.MaterializationError, match=rf"load_checkpoint cannot fill \['inv_freq \({described}"
    ):
        lm.load_checkpoint(model, tmp_path / "rope.pt")
