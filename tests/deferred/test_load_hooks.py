"""load_state_dict, load_from_checkpoint and Trainer.fit(ckpt_path=...) fill deferred modules."""

from __future__ import annotations

import copy
import pickle
import warnings
from pathlib import Path

import pytest
import torch

import lightning_meta as lm
from support import deferred_models as md
from support import load_models as ml


def test_load_state_dict_fills_deferred_and_replays_buffers() -> None:
    ref = ml.eager()
    m = ml.build("deferred")
    m.load_state_dict(ref.state_dict())
    ml.assert_equal(m, ref)
    assert m.lm_head.weight is m.transformer["wte"].weight
    assert not lm.is_deferred(m)


def test_load_state_dict_on_an_ancestor_and_a_submodule() -> None:
    ref = ml.eager()
    outer = torch.nn.ModuleDict({"net": ml.build("deferred")})
    outer.load_state_dict({f"net.{k}": v for k, v in ref.state_dict().items()})
    ml.assert_equal(outer["net"], ref)
    m = ml.build("deferred")
    m.transformer["h"][0].load_state_dict(ref.transformer["h"][0].state_dict())
    ml.assert_equal(m.transformer["h"][0], ref.transformer["h"][0])
    assert lm.is_deferred(m)  # the rest is still deferred


def test_load_state_dict_copies_not_aliases() -> None:
    ref = ml.eager()
    state = ref.state_dict()
    m = ml.build("deferred")
    m.load_state_dict(state)
    state["transformer.ln_f.weight"].add_(1)
    assert not torch.equal(m.transformer["ln_f"].weight, state["transformer.ln_f.weight"])


def test_assign_keeps_ties() -> None:
    ref = ml.eager()
    m = ml.build("deferred")
    m.load_state_dict(ref.state_dict(), assign=True)
    assert m.lm_head.weight is m.transformer["wte"].weight
    ml.assert_equal(m, ref)


def test_strict_false_replays_new_head() -> None:
    ref = ml.eager()
    state = ref.state_dict()
    del state["transformer.wpe.weight"]
    m = ml.build("deferred")
    result = m.load_state_dict(state, strict=False)
    assert result.missing_keys == ["transformer.wpe.weight"]
    torch.manual_seed(ml.SEED + 1)
    assert torch.equal(m.transformer["wpe"].weight, md.NanoGPT().transformer["wpe"].weight)
    assert not lm.is_deferred(m)


def test_shape_mismatch_still_raises_like_torch() -> None:
    state = ml.eager().state_dict()
    state["transformer.ln_f.weight"] = torch.ones(5)
    m = ml.build("deferred")
    with pytest.raises(RuntimeError, match=r"size mismatch for transformer.ln_f.weight"):
        m.load_state_dict(state)


def test_hooked_modules_copy_and_pickle() -> None:
    m = ml.build("deferred")
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        clone.load_state_dict(ml.eager().state_dict())
        ml.assert_equal(clone, ml.eager())
    assert lm.is_deferred(m)


def test_load_from_checkpoint_never_builds_eagerly(tmp_path: Path) -> None:
    path, trained = ml.write_lightning(tmp_path)
    model = ml.Wrapper.load_from_checkpoint(path, deferred=True)
    assert model.hparams["deferred"] is True
    ml.assert_equal(model.model, trained)
    assert model.model.lm_head.weight is model.model.transformer["wte"].weight


def test_fit_resumes_from_ckpt_path_into_deferred_model(tmp_path: Path) -> None:
    path, trained = ml.write_lightning(tmp_path)
    model = ml.Wrapper(deferred=True)
    restored: dict[str, torch.Tensor] = {}

    class Spy(ml.L.Callback):
        def on_train_start(self, trainer: ml.L.Trainer, pl_module: ml.L.LightningModule) -> None:
            restored.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    t = ml.trainer(tmp_path, 2)
    t.callbacks.append(Spy())
    t.fit(model, ml.loader(), ckpt_path=path)
    assert t.global_step == 2
    for name, value in trained.state_dict().items():
        assert torch.equal(restored[name], value), name
    assert not lm.is_deferred(model)


class _TiedAfter(torch.nn.Module):
    def __init__(self, emb_first: bool) -> None:
        super().__init__()
        if emb_first:
            self.emb = torch.nn.Embedding(5, 4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        if not emb_first:
            self.emb = torch.nn.Embedding(5, 4)


@pytest.mark.parametrize("emb_first", [True, False], ids=["emb-first", "head-first"])
def test_load_state_dict_fills_a_tie_made_after_the_block(emb_first: bool) -> None:
    # The first end filled got a new tensor and left the other end holding the
    # old meta object, made stale: torch's copy into it raised "through a
    # reference taken before it", a reference the user never took.
    torch.manual_seed(1)
    src = _TiedAfter(emb_first)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    eager = _TiedAfter(emb_first)
    eager.head.weight = eager.emb.weight
    eager.load_state_dict(state)
    with lm.deferred_init():
        model = _TiedAfter(emb_first)
    model.head.weight = model.emb.weight
    with warnings.catch_warnings():
        # head first: torch's own "copying into a meta parameter is a no-op"
        warnings.filterwarnings("ignore", "for head.weight: copying from a non-meta")
        model.load_state_dict(state)
    lm.materialize(model)
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.emb.weight, eager.emb.weight)


def test_load_state_dict_of_a_deferred_model_into_another_is_refused() -> None:
    # An EMA copy made before either is real: torch copied meta into meta,
    # which counted as a change after the block, and materialize blamed an
    # initialisation ("modified in place ... move the initialisation").
    with lm.deferred_init():
        model, ema = _TiedAfter(True), _TiedAfter(True)
    with pytest.raises(lm.MaterializationError, match=r"materialize or load the source model"):
        ema.load_state_dict(model.state_dict())
    lm.materialize(model)
    ema.load_state_dict(model.state_dict())
    assert torch.equal(ema.emb.weight, model.emb.weight)
