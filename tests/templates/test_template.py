"""MetaTemplate and meta_template: copying, calling, strictness, copy and pickle."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta._compat import module_hooks


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx) * self.scale)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def test_module_is_copied_to_meta_without_aliasing() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    template = lm.MetaTemplate(net)
    assert all(t.is_meta for t in [*template.module.parameters(), *template.module.buffers()])
    assert template.module is not net
    assert all(not t.is_meta for t in net.state_dict().values())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert template.module[0].weight.requires_grad


def test_call_matches_the_real_module() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    template = lm.MetaTemplate(net)
    x = torch.randn(5, 3)
    torch.testing.assert_close(template(state(net), x), net(x))
    assert template.training is False  # copied from the module


def test_tied_weights_stay_tied_and_one_name_per_group_is_enough() -> None:
    model = Tied()
    template = lm.MetaTemplate(model)
    assert template.module.head.weight is template.module.embed.weight
    idx = torch.tensor([1, 2, 3])
    params = {"embed.weight": model.embed.weight, "scale": model.scale}
    torch.testing.assert_close(template(params, idx), model(idx))


def test_factory_is_called_under_meta_once_when_cached() -> None:
    calls = []

    def factory() -> nn.Module:
        calls.append(torch.empty(1).device)
        return nn.Linear(2, 2)

    template = lm.MetaTemplate(factory)
    _ = template.module, template.module
    assert calls == [torch.device("meta")]
    assert template.module is template.module


def test_factory_without_cache_builds_on_every_access() -> None:
    calls = []

    def factory() -> nn.Module:
        calls.append(1)
        return nn.Linear(2, 2)

    template = lm.MetaTemplate(factory, cache=False)
    assert calls == []
    first, second = template.module, template.module
    assert first is not second and len(calls) == 2
    assert first.weight.is_meta


def test_factory_capturing_a_real_module_is_copied_to_meta() -> None:
    real = nn.Linear(2, 2)
    template = lm.MetaTemplate(lambda: real)
    assert template.module.weight.is_meta and not real.weight.is_meta


def test_strict_call_lists_every_problem() -> None:
    template = lm.MetaTemplate(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    given = {
        "0.weight": torch.zeros(4, 5),
        "0.bais": torch.zeros(4),
        "1.weight": torch.zeros(4),
        "1.bias": torch.zeros(4),
    }
    with pytest.raises(lm.MetaTensorError) as info:
        template(given, torch.zeros(2, 3))
    message = str(info.value)
    assert "'0.weight' has shape (4, 5), expected (4, 3)" in message
    assert "missing '0.bias' (expected shape (4,))" in message
    assert "missing '1.running_mean'" in message and "missing '1.running_var'" in message
    assert "missing '1.num_batches_tracked'" in message
    assert "unexpected '0.bais'; closest: '0.bias'" in message
    assert "template.shapes()" in message


def test_non_mapping_and_non_tensor_values_are_refused() -> None:
    template = lm.MetaTemplate(nn.Linear(2, 2))
    with pytest.raises(lm.MetaTensorError, match="expects a mapping of dotted names"):
        template([torch.zeros(2, 2)], torch.zeros(1, 2))  # type: ignore[arg-type]
    with pytest.raises(lm.MetaTensorError, match="'bias' is list, expected a tensor"):
        template({"weight": torch.zeros(2, 2), "bias": [0.0, 0.0]}, torch.zeros(1, 2))  # type: ignore[dict-item]


def test_non_strict_call_leaves_checks_to_torch() -> None:
    template = lm.MetaTemplate(nn.Linear(2, 2, bias=False))
    out = template.functional_call({"weight": torch.eye(2)}, (torch.ones(1, 2),), strict=False)
    torch.testing.assert_close(out, torch.ones(1, 2))


def test_bad_arguments() -> None:
    with pytest.raises(lm.MetaTensorError, match="expects an nn.Module or a zero-argument factory"):
        lm.MetaTemplate(3)  # type: ignore[arg-type]
    with pytest.raises(lm.MetaTensorError, match="cache=False.*pass a factory"):
        lm.MetaTemplate(nn.Linear(1, 1), cache=False)
    with pytest.raises(lm.MetaTensorError, match="returned int, expected an nn.Module"):
        lm.MetaTemplate(lambda: 3)  # type: ignore[arg-type,return-value]


def test_failing_factory_names_itself_and_chains_the_cause() -> None:
    def reads_data() -> nn.Module:
        layer = nn.Linear(2, 2)
        if layer.weight.sum().item() > 0:  # needs data: impossible on meta
            pass
        return layer

    with pytest.raises(lm.MetaTensorError, match="reads_data.*failed under torch.device") as info:
        lm.MetaTemplate(reads_data)
    assert info.value.__cause__ is not None


def test_works_under_vmap_with_stacked_parameters() -> None:
    members = [nn.Linear(3, 2) for _ in range(4)]
    template = lm.MetaTemplate(members[0])
    params, _ = torch.func.stack_module_state(members)  # type: ignore[arg-type]
    x = torch.randn(5, 3)
    out = torch.vmap(lambda p: template(p, x))(params)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))


def test_train_and_eval_switch_the_template_mode() -> None:
    template = lm.MetaTemplate(nn.Dropout(0.5))
    x = torch.ones(1000)
    assert (template({}, x) == 0).any()
    assert template.eval() is template and template.training is False
    torch.testing.assert_close(template({}, x), x)


def test_deepcopy_and_pickle_keep_ties_on_meta() -> None:
    template = lm.MetaTemplate(Tied())
    for clone in (copy.deepcopy(template), pickle.loads(pickle.dumps(template))):
        module = clone.module
        assert module is not template.module
        assert module.head.weight is module.embed.weight
        assert module.embed.weight.is_meta and module.scale.is_meta


def test_uncached_template_deepcopies_and_refuses_to_pickle_a_lambda() -> None:
    template = lm.MetaTemplate(lambda: Tied(), cache=False)
    module = copy.deepcopy(template).module
    assert module.head.weight is module.embed.weight and module.embed.weight.is_meta
    with pytest.raises(
        lm.MetaTensorError, match=r"(?s)cannot be pickled.*module-level function.*cache=True"
    ):
        pickle.dumps(template)  # the lambda itself cannot be pickled (ddp_spawn)


def test_cached_template_with_lambda_factory_pickles() -> None:
    template = lm.MetaTemplate(lambda: nn.Linear(2, 3))
    clone = pickle.loads(pickle.dumps(template))
    assert clone.shapes() == {"weight": (3, 2), "bias": (3,)}


class Owner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.real = nn.Linear(2, 2)
        self.built = 0

    @lm.meta_template
    def on_demand(self) -> nn.Module:
        self.built += 1
        return nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))

    @lm.meta_template(cache=True)
    def cached(self) -> nn.Module:
        self.built += 1
        return nn.Linear(2, 2)


def test_meta_template_builds_on_demand_and_stays_out_of_the_module_tree() -> None:
    owner = Owner()
    first, second = owner.on_demand, owner.on_demand
    assert isinstance(first, lm.MetaTemplate) and first is not second
    assert owner.built == 2
    assert first.module[0].weight.is_meta
    assert [n for n, _ in owner.named_parameters()] == ["real.weight", "real.bias"]
    assert list(owner.state_dict()) == ["real.weight", "real.bias"]
    assert isinstance(Owner.on_demand, object) and Owner.on_demand.__doc__ is None


def test_meta_template_cache_builds_once_per_instance() -> None:
    a, b = Owner(), Owner()
    assert a.cached is a.cached and a.built == 1
    assert b.cached is not a.cached


def test_meta_template_follows_the_owner_mode() -> None:
    owner = Owner()
    owner.eval()
    assert owner.on_demand.training is False and owner.cached.training is False
    owner.train()
    assert owner.on_demand.training is True and owner.cached.training is True


def test_meta_template_owner_deepcopies_and_pickles() -> None:
    owner = Owner()
    _ = owner.cached
    for clone in (copy.deepcopy(owner), pickle.loads(pickle.dumps(owner))):
        assert clone.cached.module.weight.is_meta
        assert clone.cached is not owner.cached
        assert torch.equal(clone.real.weight, owner.real.weight)


def test_meta_template_refuses_non_callables() -> None:
    with pytest.raises(lm.MetaTensorError, match="decorates a method returning an nn.Module"):
        lm.meta_template(3)  # type: ignore[call-overload]


def test_state_from_follows_pruning_and_lists_what_is_missing() -> None:
    from torch.nn.utils import prune

    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    template = lm.MetaTemplate(net)
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    with torch.no_grad():
        net[0].weight_orig.add_(1.0)  # the cached pruned weight is now stale
    x = torch.randn(3, 4)
    out = template(template.state_from(net), x)
    torch.testing.assert_close(out, net(x))
    out.sum().backward()
    assert net[0].weight_orig.grad is not None
    with pytest.raises(
        lm.MetaTensorError, match=r"state_from\(Linear\): the module lacks '0.weight'"
    ):
        template.state_from(nn.Linear(4, 4))


def test_on_demand_template_can_be_read_inside_vmap() -> None:
    owner = Owner()
    x = torch.randn(4, 3, 2)
    params = {"0.weight": torch.eye(2), "0.bias": torch.zeros(2)}
    out = torch.vmap(lambda xi: owner.on_demand.eval()(params, xi))(x)
    torch.testing.assert_close(out, x)


def test_state_from_carries_the_source_modes_submodule_by_submodule() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    template = lm.MetaTemplate(net)  # copied in training mode
    net[1].eval()  # a frozen BatchNorm inside a net in training mode
    x = torch.randn(6, 4)
    running = net[1].running_mean.clone()
    torch.manual_seed(1)
    want = net(x)
    torch.manual_seed(1)
    got = template(template.state_from(net), x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(net[1].running_mean, running)  # neither call updated it
    assert template.training and template.module[1].training  # the template's own modes are back
    net.eval()
    state = template.state_from(net)
    torch.testing.assert_close(template(state, x), net(x), rtol=0, atol=0)
    torch.testing.assert_close(template(state.copy(), x), net(x), rtol=0, atol=0)
    out = template.functional_call(dict(state), (x,), modes=net)
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    with pytest.raises(lm.MetaTensorError, match=r"modes that lack the submodule\(s\) '1', '2'"):
        template.functional_call(dict(state), (x,), modes={"": False, "0": False, "3": False})


def test_modes_of_a_compiled_net_are_its_modules_modes() -> None:
    # `self.net = torch.compile(self.net)`: state_from(compiled) worked, but
    # modes=compiled was refused as lacking every submodule (its own names
    # start with `_orig_mod.`).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    template = lm.MetaTemplate(net)
    compiled = torch.compile(net, backend="eager")
    net.eval()
    x = torch.randn(6, 4)
    params = dict(net.state_dict())
    torch.testing.assert_close(
        template.functional_call(params, (x,), modes=compiled), net(x), rtol=0, atol=0
    )
    net.train()
    net[1].eval()
    torch.manual_seed(1)
    want = net(x)
    torch.manual_seed(1)
    got = template.functional_call(params, (x,), modes=compiled)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(
        lm.MetaTensorError, match=r"modes that lack the submodule\(s\) '1', '2', '3'"
    ):
        template.functional_call(params, (x,), modes=nn.Sequential(nn.Linear(4, 8)))


def test_a_plain_mapping_runs_in_the_template_own_modes() -> None:
    template = lm.MetaTemplate(nn.Dropout(0.5))
    x = torch.ones(1000)
    assert (template({}, x) == 0).any()  # documented: model.eval() does not reach it
    torch.testing.assert_close(template.functional_call({}, (x,), modes=nn.Dropout().eval()), x)


class Gated(nn.Module):
    """Owns a gate and a net whose forward hook is a bound method reading the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.ones(4))
        self.big = nn.Linear(64, 64)
        self.net = nn.Linear(4, 4)
        self.net.register_forward_hook(self.gate_hook)

    def gate_hook(self, module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        return out * self.gate


def test_a_bound_method_hook_of_the_owner_keeps_reading_the_live_owner() -> None:
    owner = Gated()
    template = lm.MetaTemplate(owner.net)
    (hook,) = module_hooks(template.module)["forward hooks"].values()
    assert hook.__self__ is owner  # the owner (and its real weights) was not copied
    with torch.no_grad():
        owner.gate.mul_(3.0)
    x = torch.randn(2, 4)
    torch.testing.assert_close(template(template.state_from(owner.net), x), owner.net(x))


def normed(kind: str, *, training: bool = True) -> nn.Module:
    """A Linear under the hook-based weight_norm / spectral_norm, after a forward and a step."""
    torch.manual_seed(0)
    norm = nn.utils.weight_norm if kind == "weight" else nn.utils.spectral_norm
    net = norm(nn.Linear(4, 3)).train(training)
    net(torch.ones(2, 4))
    with torch.no_grad():  # an optimizer step: the weight stored by the last forward is stale
        for name, p in net.named_parameters():
            p.add_(0.5 if name != "weight_g" else 1.0)
    return net


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_state_from_recomputes_hook_based_weight_norm_and_spectral_norm() -> None:
    x = torch.randn(5, 4)
    plain = lm.MetaTemplate(lambda: nn.Linear(4, 3))
    net = normed("weight")
    out = plain(plain.state_from(net), x)
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    out.sum().backward()
    assert net.weight_g.grad is not None
    for training in (True, False):
        a, b = normed("spectral", training=training), normed("spectral", training=training)
        torch.testing.assert_close(plain(plain.state_from(a), x), b(x), rtol=0, atol=0)
        assert torch.equal(a.weight_u, b.weight_u)  # one power iteration each, as one forward


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_a_hook_based_weight_norm_module_is_copied_and_called() -> None:
    x = torch.randn(5, 4)
    for kind in ("weight", "spectral"):
        net, twin = normed(kind), normed(kind)
        template = lm.MetaTemplate(net)
        assert all(t.is_meta for t in template.module.parameters())
        torch.testing.assert_close(template(template.state_from(net), x), twin(x), rtol=0, atol=0)
        assert template.module.weight.is_meta  # the hook's result is not kept in the template
        assert copy.deepcopy(template).module.weight.is_meta


class Derived(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.lin.w2 = self.lin.weight * 2


class Locked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4))
        self.block[0].lock = threading.Lock()


def test_modules_that_cannot_be_copied_are_refused_by_path() -> None:
    with pytest.raises(lm.MetaTensorError, match=r"'lin.w2' is a tensor attribute.*Fix:") as e:
        lm.MetaTemplate(Derived())
    assert e.value.paths == ("lin.w2",)
    with pytest.raises(lm.MetaTensorError, match=r"cannot copy 'block.0.lock'.*Fix:") as e:
        lm.MetaTemplate(Locked())
    assert e.value.paths == ("block.0.lock",)
    with pytest.raises(lm.MetaTensorError, match=r"'weight', 'bias' not initialised.*Fix:"):
        lm.MetaTemplate(nn.LazyLinear(3))


def test_tied_names_given_different_tensors_are_listed_in_the_one_error() -> None:
    template = lm.MetaTemplate(Tied())
    given = {"embed.weight": torch.zeros(10, 4), "head.weight": torch.ones(10, 4)}
    with pytest.raises(
        lm.MetaTensorError,
        match=r"(?s)2 problem.*'embed.weight', 'head.weight' "
        r"are tied.*missing 'scale'",
    ):
        template(given, torch.tensor([1]))
    same = torch.zeros(10, 4)
    given = {"embed.weight": same, "head.weight": same, "scale": torch.ones(4)}
    assert template(given, torch.tensor([1])).shape == (1, 10)


def test_concurrent_calls_of_a_cached_template_use_their_own_tensors() -> None:
    torch.manual_seed(0)
    template = lm.MetaTemplate(lambda: nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)]))
    given = [{k: torch.randn(s) for k, s in template.shapes().items()} for _ in range(2)]
    x = torch.randn(8, 32)
    with torch.no_grad():
        want = [template(p, x) for p in given]
    wrong: list[int] = []

    def run(i: int) -> None:
        for _ in range(100):
            with torch.no_grad():
                if not torch.equal(template(given[i], x), want[i]):
                    wrong.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


class HyperNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(3, 3)
        self.t = lm.MetaTemplate(lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
        self.hyper = nn.Linear(
            8, sum(s.numel() for s in map(torch.Size, self.target.shapes().values()))
        )

    @lm.meta_template
    def target(self) -> nn.Module:
        return nn.Linear(4, 5)


def test_templates_built_inside_deferred_init_leave_the_block_exact() -> None:
    torch.manual_seed(0)
    eager = HyperNet()
    after_eager = torch.rand(1)
    torch.manual_seed(0)
    with lm.deferred_init():
        deferred = HyperNet()
    after_deferred = torch.rand(1)
    lm.materialize(deferred)
    assert torch.equal(after_eager, after_deferred)
    for (k, a), (_, b) in zip(
        eager.state_dict().items(), deferred.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    assert deferred.t.module[0].weight.is_meta and not lm.is_deferred(deferred.t.module)


class _Scaled(nn.Module):
    """A buffer, and a constant kept as a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("shift", torch.randn(4))
        self.scale = torch.tensor(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale + self.shift


def test_an_ensemble_and_a_template_copied_inside_deferred_init_hold_no_fake_tensor() -> None:
    # Before: copying modules built in the block gave the template the block's
    # fake tensors, which refuse every use once it has ended: the ensemble's
    # call (its template's `scale`), deepcopy, pickle and torch.save raised.
    def build() -> tuple[lm.Ensemble, lm.MetaTemplate]:
        torch.manual_seed(0)
        members = [_Scaled() for _ in range(3)]
        return lm.Ensemble(members, execution="loop"), lm.MetaTemplate(_Scaled())

    eager, eager_template = build()
    after_eager = torch.rand(1)
    with lm.deferred_init():
        ens, template = build()
    after = torch.rand(1)
    lm.materialize(ens)
    assert torch.equal(after, after_eager)
    for t in [*template.module.parameters(), *template.module.buffers()]:
        assert type(t.data) is torch.Tensor and t.is_meta
    assert type(template.module.scale) is torch.Tensor and torch.equal(
        template.module.scale, eager_template.module.scale
    )
    x = torch.randn(5, 4)
    params = {k: v.detach() for k, v in eager.member(0).named_parameters()}
    params["shift"] = torch.zeros(4)
    expected = eager(x)
    for other in (ens, copy.deepcopy(ens), pickle.loads(pickle.dumps(ens))):
        assert torch.equal(other(x), expected)
    for i in range(3):
        assert torch.equal(ens.member(i)(x), eager.member(i)(x))
    for t in (template, copy.deepcopy(template), pickle.loads(pickle.dumps(template))):
        assert torch.equal(t(params, x), eager_template(params, x))


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.noise = torch.randn(4)


def test_a_template_copied_inside_deferred_init_refuses_an_attribute_drawn_there() -> None:
    # Raised out of the block: caught inside it, the block refuses at its end (a refusal
    # caught by the model's code leaves the block on another path than eager's).
    def build() -> None:
        with lm.deferred_init():
            lm.MetaTemplate(_Noisy())

    with pytest.raises(lm.MaterializationError, match=r"MetaTemplate\(_Noisy\) copying 'noise'"):
        build()


def test_a_failing_factory_gets_the_meta_fix_only_for_reading_values() -> None:
    def missing_key() -> nn.Module:
        raise KeyError("boom")

    with pytest.raises(lm.MetaTensorError, match="KeyError: 'boom'. Fix: correct the factory"):
        lm.MetaTemplate(missing_key)


def _eval_dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()


@pytest.mark.parametrize("cache", [True, False])
def test_a_factorys_modes_are_the_templates_until_set(cache: bool) -> None:
    # Before: the template started in train mode whatever the factory built, and
    # cache=False put every module it built back in train mode: dropout on, no error.
    template = lm.MetaTemplate(_eval_dropout, cache=cache)
    real = _eval_dropout()
    params = dict(real.named_parameters())
    x = torch.randn(8, 4)
    assert not template.training
    for _ in range(2):
        assert torch.equal(template(params, x), torch.func.functional_call(real, params, (x,)))
    template.train()
    assert template.training and template.module.training


_GLOBAL_NET: nn.Module | None = None


class _HookScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)  # type: ignore[no-any-return]


@pytest.mark.parametrize("reach", ["container", "global"])
def test_a_hook_reaching_the_model_indirectly_is_refused(reach: str) -> None:
    # Before: the hook read the original's `scale` (2.0), not the one passed (3.0),
    # and no gradient reached the passed tensor, without an error.
    global _GLOBAL_NET
    net = _HookScaled()
    holder = {"m": net}
    _GLOBAL_NET = net
    if reach == "container":
        net.lin.register_forward_hook(lambda m, i, o: o * holder["m"].scale)
    else:
        net.lin.register_forward_hook(lambda m, i, o: o * _GLOBAL_NET.scale)  # type: ignore[union-attr]
    with pytest.raises(
        lm.ArgumentValueError, match=r"a hook of lin \(forward_hooks\) reaches"
    ) as e:
        lm.MetaTemplate(net)
    assert e.value.paths == ("lin",)
    _GLOBAL_NET = None
    # A closure over the module itself is pointed at the template's copy.
    net = _HookScaled()
    net.lin.register_forward_hook(lambda m, i, o: o * net.scale)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    params["scale"] = torch.tensor(3.0)
    x = torch.ones(2, 4)
    assert torch.equal(
        lm.MetaTemplate(net)(params, x), torch.func.functional_call(net, params, (x,))
    )
