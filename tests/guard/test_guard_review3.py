"""Review 3 of MetaGuard, ``fabric_setup`` and ``check``.

A deferred module held by a plain object (a helper class instance, a
``SimpleNamespace``, a closure) or a global was neither materialized nor
refused: a CPU matmul with its meta weight trained on uninitialised memory.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta._cli._main import main
from support.guard_models import IN, loader, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Helper:
    """A frozen projector's wrapper: a plain object, not a module."""

    def __init__(self, proj: nn.Module) -> None:
        self.proj = proj


class Projected(L.LightningModule):
    """Trains ``lin`` towards a frozen bias-free projection held as ``holder`` says."""

    def __init__(self, holder: str = "helper", deferred: bool = True) -> None:
        super().__init__()
        with lm.deferred_init() if deferred else _nothing():
            self.lin = nn.Linear(IN, IN)
            proj = nn.Linear(IN, IN, bias=False)
        if holder == "helper":
            self.helper = Helper(proj)
            self.project = lambda x: self.helper.proj(x)
        elif holder == "namespace":
            self.ns = types.SimpleNamespace(proj=proj)
            self.project = lambda x: self.ns.proj(x)
        elif holder == "closure":
            self.project = lambda x: proj(x)
        self.targets: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        with torch.no_grad():
            target = self.project(x)
        self.targets.append(target)
        return (self.lin(x) - target).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.lin.parameters(), lr=0.1)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _fit(model: L.LightningModule, **kwargs: Any) -> L.Trainer:
    t = trainer(max_steps=2, **kwargs)
    t.fit(model, loader())
    return t


@pytest.mark.parametrize(
    ("holder", "path"),
    [
        ("helper", "helper.proj.weight"),
        ("namespace", "ns.proj.weight"),
        ("closure", "project.<closure <lambda>: proj>.weight"),
    ],
)
def test_module_in_a_plain_object_is_refused_with_its_path_and_a_working_fix(
    holder: str, path: str
) -> None:
    torch.manual_seed(0)
    eager = Projected(holder, deferred=False)
    _fit(eager)
    assert all(not t.is_meta for t in eager.targets)
    torch.manual_seed(0)
    model = Projected(holder)
    with pytest.raises(lm.MetaTensorError, match="left without data after materializing") as e:
        _fit(model)
    assert path in e.value.paths
    assert model.targets == []  # before the first step
    if holder == "helper":
        assert "Fix: lightning_meta.materialize(model.helper.proj)" in str(e.value)
        # ... which works: the same values as eager.
        torch.manual_seed(0)
        model = Projected(holder)
        lm.materialize(model.helper.proj)
        _fit(model)
        for a, b in zip(eager.targets, model.targets, strict=True):
            assert torch.equal(a, b)
        assert torch.equal(eager.lin.weight, model.lin.weight)


class Encoded(L.LightningModule):
    """nn.TransformerEncoder(layer, 2) as its docs write it: the prototype ``layer`` is
    built in the block too and deep-copied; ``elsewhere`` keeps it, and a second model of
    the same block, where no search of this model reaches."""

    def __init__(self, elsewhere: list[nn.Module], deferred: bool = True) -> None:
        super().__init__()
        with lm.deferred_init() if deferred else _nothing():
            prototype = nn.TransformerEncoderLayer(IN, 2, 16, dropout=0.0)
            self.encoder = nn.TransformerEncoder(prototype, 2, enable_nested_tensor=False)
            other = nn.Linear(IN, IN)
        elsewhere += [prototype, other]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.encoder(batch[0].unsqueeze(1)).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_prototype_or_another_model_of_the_block_held_elsewhere_is_not_refused() -> None:
    # A check of every tensor of the model's blocks refused the prototype the
    # script still held (and a second model of the block, trained later): what
    # the search of the model reaches decides, as for the rest.
    torch.manual_seed(0)
    kept_eager: list[nn.Module] = []
    eager = Encoded(kept_eager, deferred=False)
    _fit(eager)
    torch.manual_seed(0)
    kept: list[nn.Module] = []
    model = Encoded(kept)
    _fit(model)
    for (name, a), b in zip(eager.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    prototype, other = kept
    assert prototype.linear1.weight.is_meta and other.weight.is_meta
    lm.materialize(other)  # still exact after the first model's fit
    assert torch.equal(other.weight, kept_eager[1].weight)


class Link:
    """A plain object of a long chain, each holding some data."""

    def __init__(self, after: Link | None) -> None:
        self.after = after
        self.data = [[0.5] * 999 for _ in range(30)]


def test_the_search_of_plain_objects_is_bounded() -> None:
    # A chain of plain objects ran the search into a RecursionError, and a
    # large object graph cost seconds on every fit.
    chain = None
    for _ in range(5_000):
        chain = Link(chain)
    module = nn.Module()
    module.chain = chain
    module.graph = [Link(chain) for _ in range(20)]
    assert lm.find_meta_tensors(module) == []
    with lm.deferred_init():
        hidden = nn.Linear(2, 2)
    module.helper = Helper(hidden)
    assert {f.path for f in lm.find_meta_tensors(module)} == {
        "helper.proj.weight",
        "helper.proj.bias",
    }


def test_other_model_of_another_block_and_a_template_kept_on_purpose_are_not_refused() -> None:
    with lm.deferred_init():
        other = nn.Linear(IN, IN)  # another model, built in its own block, left deferred
    torch.manual_seed(0)
    eager = Projected("none", deferred=False)
    eager.project = lambda x: x
    _fit(eager)
    torch.manual_seed(0)
    model = Projected("none")
    # what the block made and the model does not use, kept without data on purpose
    model.template = lm.MetaTemplate(nn.Linear(IN, IN, device="meta"))
    model.project = lambda x: x
    _fit(model)
    assert other.weight.is_meta
    assert torch.equal(eager.lin.weight, model.lin.weight)


class Featurizer:
    def __init__(self, proj: nn.Module) -> None:
        self.proj = proj

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.proj(x)


class FeatureData(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        with lm.deferred_init():
            proj = nn.Linear(IN, IN, bias=False)
        self.features = Featurizer(proj)

    def train_dataloader(self) -> Any:
        return loader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return self.features(x), y


class Plain(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(IN, 1)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[0])
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodule_module_in_a_plain_object_is_refused_before_the_first_batch() -> None:
    model = Plain()
    with pytest.raises(lm.MetaTensorError) as e:
        trainer(max_steps=2).fit(model, datamodule=FeatureData())
    assert e.value.paths == ("datamodule.features.proj.weight",)
    assert model.seen == []


class FabricNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(IN, IN)
        self.helper = Helper(nn.Linear(IN, IN, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.helper.proj(x)


def test_fabric_setup_refuses_a_module_in_a_plain_object() -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1)
    with lm.deferred_init():
        net = FabricNet()
    with pytest.raises(lm.MetaTensorError) as e:
        lm.fabric_setup(fabric, net)
    assert e.value.paths == ("helper.proj.weight",)
    assert "lightning_meta.materialize(model.helper.proj)" in str(e.value)


def test_check_reports_a_module_in_a_plain_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "lm_helper_target.py").write_text(
        "import torch, lightning as L, lightning_meta as lm\n"
        "class Helper:\n"
        "    def __init__(self, proj): self.proj = proj\n"
        "class HelperNet(L.LightningModule):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        with lm.deferred_init():\n"
        "            self.lin = torch.nn.Linear(4, 4)\n"
        "            proj = torch.nn.Linear(4, 4, bias=False)\n"
        "        self.helper = Helper(proj)\n"
    )
    assert main(["check", f"{tmp_path / 'lm_helper_target.py'}:HelperNet", "--json"]) == 1
    out = capsys.readouterr().out
    assert '"step": "nothing deferred left"' in out
    assert "lightning_meta.materialize(model.helper.proj)" in out


class Deep(L.LightningModule):
    """``aux`` held deeper than materialize looks, or past its item limit."""

    def __init__(self, case: str, deferred: bool = True) -> None:
        super().__init__()
        with lm.deferred_init() if deferred else _nothing():
            self.lin = nn.Linear(IN, 1)
            aux = nn.Linear(IN, IN)
        if case == "deep":
            self.cfg = {"a": {"b": {"c": {"d": [aux]}}}}
        else:
            self.items = [0] * 1500 + [aux]
        self.aux = lambda: aux

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        return (self.lin(x) + self.aux()(x).sum(1, keepdim=True)).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.lin.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("case", "why", "fix"),
    [
        (
            "deep",
            "held 5 lists, tuples or dicts deep below model, and materialize looks at most 4 deep",
            "lightning_meta.materialize(model.cfg['a']['b']['c']['d'][0])",
        ),
        (
            "long",
            "model.items holds 1501 items, and materialize does not search containers of more "
            "than 1000 items",
            "lightning_meta.materialize(model.items[1500])",
        ),
    ],
)
def test_too_deep_or_too_long_names_the_limit_and_a_fix_that_works(
    case: str, why: str, fix: str
) -> None:
    with pytest.raises(lm.MetaTensorError) as e:
        _fit(Deep(case))
    assert why in str(e.value)
    assert f"Fix: {fix} before the run" in str(e.value)
    assert "filled exactly by lightning_meta.materialize(module)" not in str(e.value)
    # The fix works, and gives eager's values.
    torch.manual_seed(0)
    eager = Deep(case, deferred=False)
    _fit(eager)
    torch.manual_seed(0)
    model = Deep(case)
    lm.materialize(model.aux())
    _fit(model)
    assert torch.equal(eager.lin.weight, model.lin.weight)


_PATCHED = ("model_sharded_context", "setup", "load_model_state_dict", "teardown")


class Early(L.LightningModule):
    def __init__(self, deferred: bool) -> None:
        super().__init__()
        with lm.deferred_init() if deferred else _nothing():
            self.lin = nn.Linear(IN, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Failing(L.LightningDataModule):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def prepare_data(self) -> None:
        if self.where == "prepare_data":
            raise FileNotFoundError("/data/train.csv")

    def setup(self, stage: str) -> None:
        if self.where == "setup":
            raise FileNotFoundError("/data/train.csv")

    def train_dataloader(self) -> Any:
        return loader()


class LoginFails(L.Callback):
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        raise RuntimeError("logger login failed")


def _early_run(case: str, t: L.Trainer, model: L.LightningModule) -> None:
    if case in ("prepare_data", "setup"):
        t.fit(model, datamodule=Failing(case))
    elif case == "validate":
        t.validate(model, loader())
    elif case == "test":
        t.test(model, loader())
    else:
        t.fit(model, loader())


@pytest.mark.parametrize(
    "case", ["prepare_data", "setup", "validate", "test", "callback before the guard"]
)
def test_an_error_before_the_guard_acts_surfaces_as_in_eager(case: str) -> None:
    seen = []
    for deferred in (False, True):
        callbacks: list[L.Callback] = [lm.MetaGuard()]
        if case == "callback before the guard":
            callbacks.insert(0, LoginFails())
        t = trainer(max_steps=1, callbacks=callbacks)
        model = Early(deferred)
        with pytest.raises(Exception) as e:  # (the eager one, whatever it is)
            _early_run(case, t, model)
        seen.append((type(e.value), str(e.value)))
        assert not [k for k in vars(t.strategy) if k in _PATCHED]
        assert "cpu" not in vars(model)
    assert seen[0] == seen[1]


def test_a_second_metaguard_is_refused_and_nothing_stays_on_the_strategy() -> None:
    t = trainer(max_steps=1, callbacks=[lm.MetaGuard(), lm.MetaGuard()])
    with pytest.raises(lm.MetaTensorError, match="holds 2 MetaGuard callbacks"):
        t.fit(Early(True), loader())
    assert not [k for k in vars(t.strategy) if k in _PATCHED]
    for _ in range(2):
        with pytest.raises(lm.MetaTensorError, match="holds 2 MetaGuard callbacks"):
            t.fit(Early(True), loader())
        assert not [k for k in vars(t.strategy) if k in _PATCHED]
    # One guard: the run works and leaves nothing either.
    torch.manual_seed(0)
    eager = Early(False)
    trainer(max_steps=2, callbacks=[]).fit(eager, loader())
    torch.manual_seed(0)
    model = Early(True)
    t = trainer(max_steps=2)
    t.fit(model, loader())
    assert not [k for k in vars(t.strategy) if k in _PATCHED]
    assert torch.equal(eager.lin.weight, model.lin.weight)


class BuiltInConfigure(L.LightningModule):
    def __init__(self, deferred: bool) -> None:
        super().__init__()
        self.deferred = deferred
        self.lin: nn.Module | None = None

    def configure_model(self) -> None:
        if self.lin is None:
            with lm.deferred_init() if self.deferred else _nothing():
                self.lin = nn.Linear(IN, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        assert self.lin is not None
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_weight_averaging_after_the_guard_with_the_model_built_in_configure_model() -> None:
    from lightning.pytorch import callbacks

    if not hasattr(callbacks, "WeightAveraging"):
        pytest.skip("WeightAveraging needs Lightning >= 2.6")
    WeightAveraging = callbacks.WeightAveraging

    out = {}
    for deferred in (False, True):
        torch.manual_seed(0)
        model = BuiltInConfigure(deferred)
        averaging = WeightAveraging()
        callbacks = [lm.MetaGuard(), averaging] if deferred else [averaging]
        t = trainer(max_steps=3, callbacks=callbacks)
        t.fit(model, loader())
        assert not [k for k in vars(t.strategy) if k in _PATCHED]
        assert model.lin is not None
        out[deferred] = (model.lin.weight.detach().clone(), averaging._average_model)
    assert torch.equal(out[False][0], out[True][0])
    averaged = [dict(m.module.named_parameters()) for _, m in (out[False], out[True])]
    for name, value in averaged[0].items():
        assert torch.equal(value, averaged[1][name]), name


class Restored(L.LightningModule):
    def __init__(self, deferred: bool) -> None:
        super().__init__()
        with lm.deferred_init() if deferred else _nothing():
            self.lin = nn.Linear(IN, IN)
            self.norm = nn.LayerNorm(IN)
            self.head = nn.Linear(IN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.lin(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self(batch[0]) - batch[1]).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("loss", (self(batch[0]) - batch[1]).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


@pytest.mark.parametrize("stage", ["validate", "fit"])
def test_empty_init_model_restored_with_ckpt_path_equals_eager(stage: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = Restored(False)
    t = trainer(max_steps=2, callbacks=[])
    t.fit(source, loader())
    ckpt = tmp_path / "source.ckpt"
    t.save_checkpoint(ckpt)
    out = {}
    for deferred in (False, True):
        t = trainer(max_steps=4, callbacks=[lm.MetaGuard()] if deferred else [])
        with t.init_module(empty_init=True):
            model = Restored(deferred)
        if stage == "validate":
            t.validate(model, loader(), ckpt_path=ckpt, verbose=False)
        else:
            torch.manual_seed(2)
            t.fit(model, loader(), ckpt_path=ckpt)
        out[deferred] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out[deferred]["output"] = model(torch.linspace(-1, 1, 2 * IN).view(2, IN)).detach()
        assert not [k for k in vars(t.strategy) if k in _PATCHED]
    assert out[False].keys() == out[True].keys()
    for name, value in out[False].items():
        assert torch.equal(value, out[True][name]), name
    if stage == "validate":
        for name, value in source.state_dict().items():
            assert torch.equal(value, out[True][name]), name


def test_fabric_setup_sets_up_two_models_of_one_block_one_after_the_other() -> None:
    # Fabric sets models up one by one (a GAN's generator and discriminator,
    # built in one block): the second, still deferred, is no leftover of the first.
    fabric = L.Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    eager = (nn.Linear(IN, IN), nn.Linear(IN, 1))
    torch.manual_seed(0)
    with lm.deferred_init():
        a, b = nn.Linear(IN, IN), nn.Linear(IN, 1)
    a = lm.fabric_setup(fabric, a)
    b = lm.fabric_setup(fabric, b)
    assert torch.equal(a.weight, eager[0].weight)
    assert torch.equal(b.weight, eager[1].weight)
