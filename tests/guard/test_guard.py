"""MetaGuard with a real Trainer on a single CPU device (multi-process: test_guard_strategies.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import MetaGuard
from lightning_meta._guard._materialize import refuse_strays
from support.guard_models import (
    IN,
    PATCHED,
    Clean,
    Seeded,
    Stray,
    chain,
    loader,
    net,
    state,
    trainer,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and every buffer (non-persistent ones too), detached copies."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return {k: v.detach().clone() for k, v in named}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def seeded_run(mode: str, **options: Any) -> tuple[list[float], dict[str, torch.Tensor], L.Trainer]:
    L.seed_everything(0, verbose=False)
    model = Seeded(mode)
    t = trainer(**options)
    t.fit(model, loader())
    return model.losses, tensors(model), t


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"precision": "bf16-true"},
        {"precision": "bf16-mixed", "gradient_clip_val": 0.5, "enable_model_summary": True},
    ],
    ids=["fp32", "bf16-true", "bf16-mixed-clip-summary"],
)
def test_deferred_run_is_bit_identical_to_eager(options: dict[str, Any]) -> None:
    pairs = [("init", "eager"), ("configure", "configure_eager")]
    if options.get("precision") == "bf16-true":
        # configure_model then runs with bfloat16 as default dtype, where
        # orthogonal_ (QR) has no CPU kernel even eagerly.
        pairs = pairs[:1]
    for mode, reference in pairs:
        losses, weights, _ = seeded_run(reference, **options)
        d_losses, d_weights, t = seeded_run(mode, **options)
        assert d_losses == losses, mode
        assert_same(d_weights, weights)
        assert not PATCHED & vars(t.strategy).keys()


def test_stray_meta_submodule_raises_before_lightning() -> None:
    t = trainer()
    with pytest.raises(lm.MetaTensorError, match=r"(?s)'teacher\.0\.weight'.*MetaTemplate") as info:
        t.fit(Stray(), loader())
    message = str(info.value)
    assert "'teacher.2.bias' (parameter, shape (1,), torch.float32, not deferred)" in message
    assert "deferred_init" in message
    assert not any(isinstance(e, NotImplementedError) for e in chain(info.value))
    assert not PATCHED & vars(t.strategy).keys()


def test_template_is_left_alone() -> None:
    model = Clean()
    trainer(max_steps=2).fit(model, loader())
    assert all(p.is_meta for p in model.teacher.module.parameters())
    assert not model.mlp[0].weight.is_meta


def test_real_weights_are_not_reinitialised() -> None:
    torch.manual_seed(1)
    model = Seeded("eager")
    real = tensors(model)
    torch.manual_seed(2)
    with lm.deferred_init():
        model.extra = net()
    torch.manual_seed(2)
    expected = tensors(net())
    trainer().validate(model, loader(), verbose=False)
    after = tensors(model)
    assert_same({k: v for k, v in after.items() if not k.startswith("extra.")}, real)
    assert_same({k[6:]: v for k, v in after.items() if k.startswith("extra.")}, expected)


def test_resume_with_ckpt_path_loads_into_materialized_model(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    first = Seeded("init")
    trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path).fit(first, loader())
    (path,) = tmp_path.rglob("*.ckpt")
    resumed = Seeded("init")
    trainer(max_epochs=1).fit(resumed, loader(), ckpt_path=path)  # nothing left to train
    assert_same(state(resumed), state(first))


def test_meta_in_optimizer_raises() -> None:
    class MetaOptimizer(Seeded):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            ghost = nn.Parameter(torch.empty(3, device="meta"))
            return torch.optim.SGD([*self.parameters(), ghost], lr=0.1)

    t = trainer()
    pattern = r"(?s)configure_optimizers\(\) holds 1 meta tensor.*'optimizers\.0\.param_groups\.0\.params\.\d+'"
    with pytest.raises(lm.MetaTensorError, match=pattern) as info:
        t.fit(MetaOptimizer("eager"), loader())
    assert not any(isinstance(e, NotImplementedError) for e in chain(info.value))
    assert not PATCHED & vars(t.strategy).keys()


def test_meta_in_checkpoint_raises(tmp_path: Path) -> None:
    class MetaHparam(Seeded):
        def __init__(self, prior: torch.Tensor) -> None:
            super().__init__("eager")
            self.save_hyperparameters()

    model = MetaHparam(torch.empty(4, device="meta"))
    t = trainer(max_steps=1, enable_checkpointing=True, default_root_dir=tmp_path)
    # refused before the first step since 2026-12-07 (fourth session), as `check` reports
    # it (a forward may read it), where the checkpoint's save refused it before
    # (test_on_save_checkpoint_lists_every_meta_tensor checks that refusal)
    with pytest.raises(
        lm.MetaTensorError, match=r"(?s)in its hyperparameters \('_hparams\.prior'.*ignore="
    ):
        t.fit(model, loader())
    assert not list(tmp_path.rglob("*.ckpt"))
    assert not PATCHED & vars(t.strategy).keys()


def test_on_save_checkpoint_lists_every_meta_tensor() -> None:
    checkpoint = {
        "state_dict": {"a": torch.empty(2, device="meta"), "b": torch.zeros(2)},
        "loops": [{"c": torch.empty(1, device="meta")}],
    }
    with pytest.raises(
        lm.MetaTensorError, match=r"(?s)2 meta tensors.*'state_dict\.a'.*'loops\.0\.c'"
    ):
        MetaGuard().on_save_checkpoint(trainer(), Seeded("eager"), checkpoint)


def test_patches_are_restored_and_earlier_instance_attributes_kept() -> None:
    t = trainer(max_steps=1)
    marker = t.strategy.teardown
    t.strategy.teardown = marker  # an instance attribute that was there before the run
    t.fit(Seeded("init"), loader())
    assert vars(t.strategy)["teardown"] is marker
    assert not (PATCHED - {"teardown"}) & vars(t.strategy).keys()


def test_every_wrapped_method_is_named_and_restored() -> None:
    from lightning_meta._guard._callback import _PATCHED

    assert set(_PATCHED) == PATCHED
    t = trainer(max_steps=1)
    seen: set[str] = set()

    class Spy(L.Callback):
        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen.update(vars(trainer.strategy).keys())

    t.callbacks.append(Spy())
    t.fit(Seeded("configure"), loader())
    assert seen >= PATCHED  # wrapped during the run (configure_model overridden)
    assert not PATCHED & vars(t.strategy).keys()


def test_failure_inside_training_restores_patches() -> None:
    class Boom(Seeded):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            raise ValueError("boom")

    t = trainer()
    with pytest.raises(ValueError, match="boom"):
        t.fit(Boom("init"), loader())
    assert not PATCHED & vars(t.strategy).keys()


def test_guard_pickles_without_run_state() -> None:
    import pickle

    guard = MetaGuard()
    t = trainer(callbacks=[guard])
    guard.setup(t, Seeded("eager"), "fit")
    copied = pickle.loads(pickle.dumps(guard))
    assert copied._undo == []
    guard.teardown(t, Seeded("eager"), "fit")
    assert not PATCHED & vars(t.strategy).keys()


def test_load_from_checkpoint_of_deferred_module(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = Seeded("init")
    t = trainer(max_epochs=1)
    t.fit(model, loader())
    t.save_checkpoint(tmp_path / "m.ckpt")
    # mode="init": built deferred again, filled by the load hooks deferred_init installs
    loaded = Seeded.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.device.type == "cpu"
    assert_same(state(loaded), state(model))


def test_stray_error_lists_deepcopy_pattern_for_plain_module() -> None:
    mlp = nn.Sequential(nn.Linear(IN, 4))
    holder = nn.Module()
    holder.teacher = copy.deepcopy(mlp).to("meta")
    with pytest.raises(lm.MetaTensorError, match=r"'teacher\.0\.bias'"):
        refuse_strays(holder)
    assert holder.teacher[0].weight.is_meta  # nothing was changed


class _Cached(Seeded):
    """`net()` under `deferred_init`, with a non-persistent cache made by torch.empty."""

    def __init__(self) -> None:
        super().__init__("configure")  # builds nothing itself
        with lm.deferred_init():
            self.model = net()
            self.model.register_buffer("cache", torch.empty(3), persistent=False)


def test_uninitialised_memory_is_refused_before_a_step_unless_allowed() -> None:
    # No checkpoint holds a non-persistent buffer: MetaGuard had no opt-in, so
    # such a model could not be trained under it at all.
    model = _Cached()
    with pytest.raises(lm.MaterializationError, match=r"'model\.cache' \(aten\.empty") as info:
        trainer().fit(model, loader())
    assert info.value.paths == ("model.cache",)
    assert model.losses == []
    want, eager_state, _ = seeded_run("eager")
    L.seed_everything(0, verbose=False)
    model = _Cached()
    trainer(callbacks=[MetaGuard(allow_uninitialized=True)]).fit(model, loader())
    assert model.losses == want
    got = tensors(model)
    assert got.pop("model.cache").shape == (3,)
    assert_same(got, eager_state)
    with pytest.raises(TypeError, match=r"allow_uninitialized=.yes."):
        MetaGuard(allow_uninitialized="yes")  # type: ignore[arg-type]
