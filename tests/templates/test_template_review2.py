"""Templates, second hostile review: buffers a forward reassigns, outside owners, state kept
in plain attributes, trainable plain tensors, activation checkpointing, pytrees, buffers
given by a hypernetwork."""

from __future__ import annotations

import copy
import functools
import threading
import time

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lightning_meta as lm


class EMA(nn.Module):
    """The usual EMA / running-max pattern: the forward assigns a new tensor to a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("ema", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if self.training:
            self.ema = 0.9 * self.ema + 0.1 * y.detach().mean(0)
        return y - self.ema


def test_a_buffer_the_forward_reassigns_reaches_net_through_state_from() -> None:
    torch.manual_seed(0)
    net, twin = EMA(), EMA()
    twin.load_state_dict(net.state_dict())
    template = lm.MetaTemplate(net)
    x = torch.randn(4, 3)
    for _ in range(3):
        assert torch.equal(template(template.state_from(net), x), twin(x))
        assert torch.equal(net.ema, twin.ema)
    assert "ema" in dict(net.named_buffers()) and template.module.ema.is_meta


def test_a_buffer_the_forward_reassigns_is_written_into_the_callers_dict() -> None:
    torch.manual_seed(0)
    net = EMA()
    template = lm.MetaTemplate(net)
    x = torch.randn(4, 3)
    given = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    reference = dict(given)
    template(given, x)
    torch.func.functional_call(copy.deepcopy(net), reference, (x,))
    assert torch.equal(given["ema"], reference["ema"]) and not torch.equal(given["ema"], net.ema)


class Owner(L.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.backbone = nn.Linear(64, 64)
        self.net = nn.Linear(4, 4)
        self.gate = nn.Parameter(torch.ones(4))
        if kind == "partial":
            self.net.register_forward_hook(functools.partial(self.scaled, scale=1.0))
        elif kind == "object":
            self.net.register_forward_hook(Gate(self))
        elif kind == "reference":
            self.net.owner = [self]  # type: ignore[assignment]
        self.template = lm.MetaTemplate(self.net)

    def scaled(self, m: nn.Module, i: object, o: torch.Tensor, scale: float) -> torch.Tensor:
        return o * self.gate * scale


class Gate:
    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner

    def __call__(self, m: nn.Module, i: object, o: torch.Tensor) -> torch.Tensor:
        return o * self.owner.gate


def _real_elements_held(template: lm.MetaTemplate, live: nn.Module) -> int:
    """Real parameter elements of modules other than ``live`` reachable from the template."""
    from lightning_meta._template._template import outside_modules

    return sum(
        p.numel()
        for m in outside_modules(template.module).values()
        if m is not live
        for p in m.parameters()
        if not p.is_meta
    )


@pytest.mark.parametrize("kind", ["partial", "object", "reference"])
def test_outside_owners_reached_otherwise_than_by_a_bound_method_stay_live(kind: str) -> None:
    torch.manual_seed(0)
    owner = Owner(kind)
    with torch.no_grad():
        owner.gate.mul_(3.0)  # an optimizer step after the template was built
    x = torch.randn(2, 4)
    template = owner.template
    assert torch.equal(template(template.state_from(owner.net), x), owner.net(x))
    assert _real_elements_held(template, owner) == 0
    alone = copy.deepcopy(template)  # the template alone: the owner stays the live one
    assert torch.equal(alone(template.state_from(owner.net), x), owner.net(x))
    assert _real_elements_held(alone, owner) == 0
    whole = copy.deepcopy(owner)  # the owner copied with it: the copy reads the copy
    with torch.no_grad():
        whole.gate.mul_(2.0)
    assert torch.equal(whole.template(whole.template.state_from(whole.net), x), whole.net(x))


def test_a_forward_set_on_the_instance_to_outside_code_is_refused() -> None:
    class Patched(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.ones(()))
            self._orig = self.net.forward
            self.net.forward = self.scaled_forward  # type: ignore[method-assign]

        def scaled_forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._orig(x) * self.scale

    with pytest.raises(lm.MetaTensorError, match=r"'forward' is set on the instance.*Fix:"):
        lm.MetaTemplate(Patched().net)
    net = nn.Linear(2, 2)
    orig = net.forward
    net.forward = lambda x: orig(x) * 2  # type: ignore[method-assign]
    with pytest.raises(lm.MetaTensorError, match=r"reaches the original modules") as e:
        lm.MetaTemplate(net)
    assert e.value.paths == ("forward",)
    bound = nn.Linear(2, 2)  # a forward bound to the module itself moves with the copy
    bound.forward = functools.partial(nn.Linear.forward, bound)  # type: ignore[method-assign]
    params = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    assert torch.equal(lm.MetaTemplate(bound)(params, torch.ones(1, 2)), torch.full((1, 2), 2.0))


class Cached(nn.Module):
    """timm LeViT's pattern: in eval, a tensor derived from a parameter is cached per device."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([4.0, 3.0, 2.0, 1.0]))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x + self.bias
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 1.0
        return x + self.cache[key]


def test_a_cache_the_forward_keeps_never_reaches_a_later_call() -> None:
    template = lm.MetaTemplate(Cached().eval())
    x = torch.zeros(4)
    a, b = torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([40.0, 30.0, 20.0, 10.0])
    assert torch.equal(template({"bias": a}, x), a)
    assert torch.equal(template({"bias": b}, x), b)
    assert template.module.cache == {}
    batched = torch.func.vmap(lambda p: template({"bias": p}, x))(torch.stack([a, b]))
    assert torch.equal(batched, torch.stack([a, b]))


def test_a_stored_activation_is_not_kept_by_the_template() -> None:
    class Keeps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.last = self.lin(x)
            return self.last

    template = lm.MetaTemplate(Keeps())
    params = {"lin.weight": torch.randn(3, 3, requires_grad=True), "lin.bias": torch.zeros(3)}
    template(params, torch.randn(2, 3)).sum().backward()
    assert "last" not in vars(template.module)
    copy.deepcopy(template)  # no graph left behind for deepcopy to refuse


def test_state_a_forward_keeps_is_refused_when_the_call_stands_for_net() -> None:
    net = Cached().eval()
    template = lm.MetaTemplate(net)
    with pytest.raises(lm.MetaTensorError, match=r"stored \"cache\['cpu'\]\".*Fix:") as e:
        template(template.state_from(net), torch.zeros(4))
    assert e.value.paths == ("cache['cpu']",)
    assert template.module.cache == {}  # put back before the error
    assert torch.equal(template(dict(template.state_from(net)), torch.zeros(4)), net.bias)


def test_a_plain_tensor_the_forward_changes_in_place_is_refused_on_every_later_call() -> None:
    class Counts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.count = torch.zeros(())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count += 1
            return self.lin(x) * self.count

    template = lm.MetaTemplate(Counts())
    params = {"lin.weight": torch.ones(2, 2), "lin.bias": torch.zeros(2)}
    for _ in range(2):
        with pytest.raises(lm.MetaTensorError, match=r"'count' in place.*register it as a buffer"):
            template(params, torch.ones(1, 2))


def test_a_plain_tensor_that_requires_grad_is_refused_as_ensemble_refuses_it() -> None:
    class Temperature(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.temperature = torch.ones(1, requires_grad=True)
            self.extra = [torch.zeros(2, requires_grad=True)]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) / self.temperature

    with pytest.raises(
        lm.MetaTensorError, match=r"holds tensors that require grad outside its parameters"
    ) as e:
        lm.MetaTemplate(Temperature())
    assert set(e.value.paths) == {"temperature", "extra[0]"}
    with pytest.raises(lm.MetaTensorError, match=r"require grad outside its parameters"):
        lm.Ensemble([Temperature(), Temperature()])


def test_activation_checkpointing_inside_the_template_is_refused_at_call_time() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    net = nn.Sequential(checkpoint_wrapper(nn.Linear(3, 3)), nn.Linear(3, 1))
    template = lm.MetaTemplate(net)
    x = torch.randn(2, 3)
    with pytest.raises(lm.MetaTensorError, match=r"activation checkpointing.*'0'.*Fix:"):
        template(template.state_from(net), x)
    with torch.no_grad():  # no backward, no recomputation
        assert torch.equal(template(template.state_from(net), x), net(x))
    # Checkpointing around the template call recomputes through the template.
    plain = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    outer = lm.MetaTemplate(plain)
    params = outer.state_from(plain)
    out = checkpoint(outer, params, x, use_reentrant=False)
    out.sum().backward()
    expected = torch.autograd.grad(plain(x).sum(), plain[0].weight)[0]
    assert torch.equal(plain[0].weight.grad, expected)


def test_hf_gradient_checkpointing_is_refused_at_call_time() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    net = transformers.GPT2LMHeadModel(config)
    net.gradient_checkpointing_enable()
    net.config.use_cache = False
    template = lm.MetaTemplate(net)
    ids = torch.randint(0, 16, (1, 4))
    with pytest.raises(lm.MetaTensorError, match=r"gradient_checkpointing_disable"):
        template(template.state_from(net), ids)
    net.eval()  # HF checkpoints only in training
    torch.testing.assert_close(
        template(template.state_from(net), ids).logits, net(ids).logits, rtol=0, atol=0
    )


def test_a_state_from_result_is_a_pytree_node_for_grad_and_vmap() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    template = lm.MetaTemplate(net)
    x = torch.randn(5, 3)
    state = template.state_from(net)
    grads = torch.func.grad(lambda s: template(s, x).sum())(state)
    assert isinstance(grads, lm.TemplateState) and grads.modes == state.modes
    reference = torch.func.grad(lambda p: torch.func.functional_call(net, p, (x,)).sum())(
        dict(net.named_parameters())
    )
    assert all(torch.equal(grads[k], reference[k]) for k in reference)
    stacked = torch.utils._pytree.tree_map(lambda t: torch.stack([t, 2 * t]), state)
    assert isinstance(stacked, lm.TemplateState) and stacked.modes == state.modes
    out = torch.func.vmap(lambda s: template(s, x))(stacked)
    # Against a hand-written vmap: a batched matmul need not give the bits of
    # the unbatched one (it did not on one CPU of this project's CI).
    by_hand = torch.func.vmap(lambda p: torch.func.functional_call(net, p, (x,)))(
        {k: torch.stack([t, 2 * t]) for k, t in state.items()}
    )
    assert torch.equal(out, by_hand)
    torch.testing.assert_close(out[0], net(x))


def test_a_template_state_keeps_its_modes_through_deepcopy_and_pickle() -> None:
    import pickle

    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    net[1].eval()
    state = lm.MetaTemplate(net).state_from(net)
    for copied in (copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert copied.modes == state.modes and copied.source is None
    assert state.copy().source is net


def test_shapes_lists_parameters_only_and_generated_buffers_of_the_wrong_kind_are_refused() -> None:
    template = lm.MetaTemplate(nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8)))
    assert template.shapes(buffers=False) == {
        "0.weight": (8, 1),
        "0.bias": (8,),
        "1.weight": (8,),
        "1.bias": (8,),
    }
    generated = {n: torch.zeros(s) for n, s in template.shapes().items()}
    with pytest.raises(
        lm.MetaTensorError, match=r"'1.num_batches_tracked' has dtype torch.float32"
    ):
        template(generated, torch.randn(4, 1))


# ---------------------------------------------------- the session's own review


class _SharedTwice(nn.Module):
    """One submodule under two names (T5's shared / encoder.embed_tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(10, 4)
        self.encoder = nn.Module()
        self.encoder.embed = self.shared
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.embed(ids))


def test_a_submodule_registered_twice_leaves_net_and_the_callers_dict_alone() -> None:
    # torch.func.functional_call writes the template's own meta tensor back for
    # the second name of a shared submodule; written on net, it replaced net's
    # real weight with the template's meta one.
    torch.manual_seed(0)
    net = _SharedTwice()
    weight = net.shared.weight
    template = lm.MetaTemplate(net)
    x = torch.tensor([[1, 2, 3]])
    state = template.state_from(net)
    given = dict(state)
    assert torch.equal(template(state, x), net(x))
    assert torch.equal(template(given, x), net(x))
    assert net.shared.weight is weight and net.encoder.embed.weight is weight
    assert all(not t.is_meta for t in [*state.values(), *given.values()])
    assert template.module.shared.weight.is_meta


class _EmaWithSteps(nn.Module):
    """An EMA buffer reassigned by forward, with its bias correction's step count in a plain
    attribute: one call's state in two places."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("ema", torch.zeros(3))
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        self.steps += 1
        self.ema = 0.9 * self.ema + 0.1 * h.detach().mean(0)
        return h - self.ema / (1 - 0.9**self.steps)


def test_a_call_that_reassigns_a_buffer_and_stores_plain_state_is_refused() -> None:
    # Called with a plain dict, the new EMA went into the dict and the step
    # count was put back: the next call saw one without the other (0.3 off).
    torch.manual_seed(0)
    net = _EmaWithSteps()
    template = lm.MetaTemplate(net)
    params = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    ema = params["ema"]
    with pytest.raises(lm.MetaTensorError, match=r"'ema'.*'steps'.*do not repeat") as info:
        template(params, torch.randn(4, 3))
    assert set(info.value.paths) == {"ema", "steps"}
    assert params["ema"] is ema and template.module.steps == 0  # nothing half-kept


def test_a_refused_state_from_call_says_that_it_ran() -> None:
    # Its in-place updates (BatchNorm statistics) are done: repeating the batch
    # with net(x), as the message advised, applied it twice.
    torch.manual_seed(0)
    net = _EmaWithSteps()
    template = lm.MetaTemplate(net)
    with pytest.raises(lm.MetaTensorError, match=r"This call ran.*do not repeat it"):
        template(template.state_from(net), torch.randn(4, 3))


class _ChangesThenRaises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.offset = torch.zeros(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            self.offset += 1.0
            raise ValueError("batch too large")
        return self.lin(x) + self.offset


def test_a_forward_that_changes_a_plain_tensor_in_place_and_raises_spoils_the_template() -> None:
    template = lm.MetaTemplate(_ChangesThenRaises())
    params = {"lin.weight": torch.eye(3), "lin.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="batch too large"):
        template(params, torch.zeros(8, 3))
    with pytest.raises(lm.MetaTensorError, match="offset") as info:
        template(params, torch.zeros(1, 3))  # returned ones, silently, before
    assert info.value.paths == ("offset",)


class _TiedSlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(3, 3, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 7:
            time.sleep(0.5)  # a slow call, in the other thread
        return self.b(self.a(x))


def test_the_strict_check_does_not_read_another_threads_tensors() -> None:
    # The check compared the module's tables, which a concurrent call (here
    # one untying the weights) fills with its own tensors: a valid call was
    # refused ("missing 'b.weight'").
    template = lm.MetaTemplate(_TiedSlow())
    w = torch.eye(3)
    template({"a.weight": w}, torch.ones(1, 3))  # the checks laid out
    slow = threading.Thread(
        target=lambda: template.functional_call(
            {"a.weight": w, "b.weight": 2 * w}, torch.ones(7, 3), tie_weights=False
        )
    )
    slow.start()
    time.sleep(0.1)
    try:
        assert torch.equal(template({"a.weight": w}, torch.ones(1, 3)), torch.ones(1, 3))
    finally:
        slow.join()


def test_what_a_call_looks_up_is_found_again_when_the_template_module_changes() -> None:
    # What the first call found (no submodule registered twice, none
    # checkpointing) was kept for good: a submodule registered again on
    # template.module since left the caller's real tensors in the template
    # after the next call, and a checkpoint wrapper added since ran.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    template = lm.MetaTemplate(net)
    x = torch.randn(2, 3)
    assert torch.equal(template(dict(net.named_parameters()), x), net(x))
    template.module.add_module("again", template.module[0])
    net.add_module("again", net[0])
    assert torch.equal(template(dict(net.named_parameters()), x), net(x))
    assert all(t.is_meta for _, t in template.module.named_parameters(remove_duplicate=False))
    template.module.add_module("wrapped", checkpoint_wrapper(nn.Linear(3, 3, device="meta")))
    net.add_module("wrapped", checkpoint_wrapper(nn.Linear(3, 3)))
    with pytest.raises(lm.MetaTensorError, match=r"activation checkpointing.*'wrapped'"):
        template(template.state_from(net), x)
