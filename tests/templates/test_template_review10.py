"""MetaTemplate under a hostile review (tenth round): a call with ``state_from(net)`` runs
with the settings Lightning's callbacks change on ``net`` after the template was made, and
refuses a ``net`` whose submodules were replaced since."""

from __future__ import annotations

import copy
import pickle

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning, StochasticWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))


class _Plain(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class _Templated(_Plain):
    def __init__(self) -> None:
        super().__init__()
        self.template = lm.MetaTemplate(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.template(self.template.state_from(self.net), x)


class _FreezeStem(BaseFinetuning):
    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(pl_module.net[:2], train_bn=False)

    def finetune_function(self, *_: object) -> None:
        pass


def _fit(cls: type[_Plain], callback: L.Callback, epochs: int) -> _Plain:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
    L.seed_everything(0, verbose=False)
    model = cls()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    return model


@pytest.mark.parametrize("callback", ["swa", "freeze"])
def test_a_state_from_call_runs_with_the_settings_a_callback_changed_on_net(
    callback: str,
) -> None:
    # Before: the template's BatchNorm kept the momentum (0.1) and track_running_stats
    # (True) it was copied with, where StochasticWeightAveraging's BatchNorm epoch sets
    # momentum=None and BaseFinetuning.freeze(train_bn=False) track_running_stats=False on
    # net's: the running statistics came out 0.2-3.6 off (num_batches_tracked 16 off),
    # without an error.
    def make() -> L.Callback:
        if callback == "swa":
            return StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)
        return _FreezeStem()

    epochs = 4 if callback == "swa" else 2
    plain, templated = _fit(_Plain, make(), epochs), _fit(_Templated, make(), epochs)
    ours, theirs = templated.net.state_dict(), plain.net.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name
    # The template's own settings are as it was made.
    assert templated.template.module[1].momentum == 0.1
    assert templated.template.module[1].track_running_stats is True


def test_the_settings_travel_with_the_state_and_are_put_back_after_the_call() -> None:
    torch.manual_seed(0)
    net = _net()
    template = lm.MetaTemplate(net)
    net[1].momentum = None
    state = template.state_from(net)
    assert state.settings == {"1": {"momentum": None}}
    x = torch.randn(6, 8)
    want = copy.deepcopy(net)
    want(x)
    template(state, x)
    assert torch.equal(net[1].running_mean, want[1].running_mean)
    assert template.module[1].momentum == 0.1
    # Through copy, deepcopy, pickle and a torch.func transform.
    for carried in (state.copy(), copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert carried.settings == {"1": {"momentum": None}}
    from torch.utils._pytree import tree_map

    assert tree_map(lambda t: t * 1, state).settings == {"1": {"momentum": None}}
    # modes=net carries them as well: the call stands for want(x) again.
    want(x)
    template.functional_call(dict(state), (x,), modes=net)
    assert torch.equal(net[1].running_mean, want[1].running_mean)
    assert template.module[1].momentum == 0.1


@pytest.mark.parametrize("swap", ["sync_batchnorm", "activation"])
def test_a_net_whose_submodule_was_replaced_after_the_template_is_refused(swap: str) -> None:
    # Before: the template ran its BatchNorm1d (or ReLU) where net now runs a
    # SyncBatchNorm (Trainer(sync_batchnorm=True) converts it) or a GELU: other numbers
    # than net(x), without an error.
    net = _net()
    template = lm.MetaTemplate(net)
    if swap == "sync_batchnorm":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        match = r"'1' is a SyncBatchNorm where the template has a BatchNorm1d.*lm\.MetaTemplate"
    else:
        net[2] = nn.GELU()
        match = r"'2' is a GELU where the template has a ReLU"
    with pytest.raises(lm.MetaTensorError, match=match) as e:
        template.state_from(net)
    assert e.value.paths == ("1" if swap == "sync_batchnorm" else "2",)
    with pytest.raises(lm.MetaTensorError, match=match):
        template.functional_call(dict(template.state_from(_net())), (torch.ones(2, 8),), modes=net)


def test_a_subclass_running_the_same_forward_is_not_refused() -> None:
    # A parametrization makes the submodule a ParametrizedLinear (fully_shard an
    # FSDPLinear): the same forward, so the same code.
    torch.manual_seed(0)
    net = _net().eval()
    template = lm.MetaTemplate(net)
    nn.utils.parametrize.register_parametrization(net[0], "weight", _Double())
    assert type(net[0]) is not nn.Linear
    x = torch.randn(3, 8)
    assert torch.equal(template(template.state_from(net), x), net(x))
    compiled = torch.compile(net)  # a wrapper: the module it wraps is compared
    assert torch.equal(template(template.state_from(compiled), x), net(x))


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 2


# What the regression sweep of the change above found (each worked before it).


def test_a_net_wrapped_by_fabric_is_not_refused() -> None:
    # Fabric's _FabricModule reaches the same submodules by the same paths; the first
    # version of the class check refused it as "runs other code".
    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    net = _net().eval()
    template = lm.MetaTemplate(net)
    wrapped = fabric.setup_module(net)
    x = torch.randn(3, 8)
    assert torch.equal(template(template.state_from(wrapped), x), net(x))


def _defined_twice(source: str, name: str) -> tuple[type[nn.Module], type[nn.Module]]:
    """The class ``name`` that ``source`` defines, defined twice (a notebook cell run again)."""
    spaces: list[dict[str, object]] = [{"nn": nn}, {"nn": nn}]
    for space in spaces:
        exec(source, space)
    first, again = (space[name] for space in spaces)
    assert isinstance(first, type) and isinstance(again, type) and first is not again
    return first, again


def test_a_class_defined_again_with_the_same_forward_is_not_refused() -> None:
    # A notebook cell run again: another class object of the same name and code.
    source = (
        "class Scaled(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(3, 3)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x) * 2\n"
    )
    first, again = _defined_twice(source, "Scaled")
    template = lm.MetaTemplate(nn.Sequential(first()))
    net = nn.Sequential(again())
    x = torch.randn(2, 3)
    assert torch.equal(template(template.state_from(net), x), net(x))


class _Cached(nn.Module):
    """A private length kept beside a plain-tensor cache (transformers' ESM rotary)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self._seq_len_cached: int | None = None
        self._cos_cached: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._seq_len_cached != x.shape[0]:
            self._seq_len_cached = x.shape[0]
            self._cos_cached = torch.arange(x.shape[0], dtype=x.dtype).cos()[:, None]
        assert self._cos_cached is not None
        return self.lin(x) * self._cos_cached


def test_private_state_beside_a_cache_is_not_taken_from_net() -> None:
    # The first version took net's _seq_len_cached and not the cache it goes with: the
    # template skipped building one ("'NoneType' object has no attribute 'device'").
    torch.manual_seed(0)
    net = _Cached()
    template = lm.MetaTemplate(net)
    x = torch.randn(5, 4)
    want = net(x)
    params = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    assert torch.equal(template.functional_call(params, (x,), modes=net), want)


class _Checkpointable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_gradient_checkpointing_turned_on_in_net_is_not_followed() -> None:
    # transformers' gradient_checkpointing_enable() on net after the template was made:
    # the first version carried the flag over and refused the call as checkpointing.
    torch.manual_seed(0)
    net = _Checkpointable()
    template = lm.MetaTemplate(net)
    net.gradient_checkpointing = True
    x = torch.randn(2, 4)
    state = template.state_from(net)
    assert state.settings == {}
    out = template(state, x)
    out.sum().backward()
    assert torch.equal(out, net(x))


# What the second regression sweep found (each worked before the change).


def test_a_submodule_compiled_before_the_template_was_made_is_not_refused() -> None:
    torch.manual_seed(0)
    net = _net().eval()
    net[0] = torch.compile(net[0], backend="eager")  # type: ignore[assignment]
    template = lm.MetaTemplate(net)
    x = torch.randn(3, 8)
    assert torch.equal(template(template.state_from(net), x), net(x))


class _PublicCache(nn.Module):
    """A cache and its length in public attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seq_len_cached: int | None = None
        self.cos_cached: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.seq_len_cached is None or n > self.seq_len_cached:
            assert self.cos_cached is None or self.cos_cached.shape[0] == self.seq_len_cached
            self.seq_len_cached = n
            self.cos_cached = torch.arange(n, dtype=x.dtype).cos()[:, None]
        assert self.cos_cached is not None
        return self.lin(x) * self.cos_cached[:n]


def test_a_public_length_beside_a_cache_is_not_taken_from_net() -> None:
    # Taking net's length (16) without its cache left the template's 8-row cache in
    # use for 10 rows: "The size of tensor a (10) must match the size of tensor b (8)".
    torch.manual_seed(0)
    net = _PublicCache()
    net(torch.randn(8, 4))
    template = lm.MetaTemplate(net)
    net(torch.randn(16, 4))
    x = torch.randn(10, 4)
    params = dict(net.named_parameters())
    assert torch.equal(template.functional_call(params, (x,), modes=net), net(x))


class _Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.template = lm.MetaTemplate(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.template(self.template.state_from(self.net), x)


@pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 8),
    reason="torch 2.6 and 2.7 cannot trace a template call with fullgraph=True at all",
)
def test_a_state_from_call_compiles_as_one_graph_on_its_first_call() -> None:
    # The layout's settings were found on first use inside the traced call, with a
    # walrus in a comprehension: "Unsupported: Read uninitialized cell".
    torch.manual_seed(0)
    host = _Host().eval()
    x = torch.randn(4, 8)
    compiled = torch.compile(host, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), host.net(x))


# What the third regression sweep found.


def test_a_numpy_cache_keeps_its_module_from_following_net() -> None:
    # Like the public length above, with the cache a numpy array: net's length was taken
    # without it ("shape '[6, 1]' is invalid for input of size 4"), where before the call
    # was refused as storing state. numpy is optional here.
    np = pytest.importorskip("numpy")

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.max_len = 4
            self.table = np.arange(4, dtype=np.float32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            if n > self.max_len:
                self.table = np.arange(n, dtype=np.float32) * 0.5
                self.max_len = n
            return self.lin(x) + torch.from_numpy(self.table[:n]).view(n, 1)

    net = nn.Sequential(Table())
    template = lm.MetaTemplate(net)
    net(torch.randn(8, 4))
    assert template.state_from(net).settings == {}


def test_a_class_made_by_a_function_over_another_argument_is_refused() -> None:
    # The same name and forward code, closing over torch.tanh instead of torch.relu: the
    # template ran relu, 0.45 off net(x), without an error.
    def activation(f: object) -> type[nn.Module]:
        class Act(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return f(x)  # type: ignore[operator,no-any-return]

        return Act

    net = nn.Sequential(nn.Linear(3, 3), activation(torch.relu)())
    template = lm.MetaTemplate(net)
    net[1] = activation(torch.tanh)()
    with pytest.raises(lm.MetaTensorError, match=r"'1' is a Act where the template has a Act"):
        template.state_from(net)
    # A class defined again whose forward calls super() closes over itself: not refused.
    source = (
        "class Scaled(nn.Linear):\n"
        "    def forward(self, x):\n"
        "        return super().forward(x) * 2\n"
    )
    first, again = _defined_twice(source, "Scaled")
    torch.manual_seed(0)
    held = nn.Sequential(first(3, 3))
    template = lm.MetaTemplate(held)
    redefined = nn.Sequential(again(3, 3))
    redefined.load_state_dict(held.state_dict())
    x = torch.randn(2, 3)
    assert torch.equal(template(template.state_from(redefined), x), redefined(x))
