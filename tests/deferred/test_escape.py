"""No fake tensor survives a deferred_init block (issue #11, item 2).

Tensors the built modules keep in list, tuple and dict attributes are
materialized like buffers; a tensor kept anywhere else raises on first use,
naming where it was made, and is findable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import MetaTensorError, deferred_init, is_deferred, materialize
from lightning_meta._deferred._escaped import escaped_site
from lightning_meta._deferred._handles import handle_of
from support import program_models as pm


def test_list_dict_and_tuple_attributes_are_materialized_exactly() -> None:
    torch.manual_seed(0)
    eager = pm.WithContainers()
    after = torch.rand(3)
    torch.manual_seed(0)
    module = deferred_init(pm.WithContainers)
    assert module.noise[0].is_meta and module.table["nested"][0].is_meta
    assert module.pair[0].is_meta and module.pair[1] == "label"
    assert module.shared[0] is module.fc.weight
    assert is_deferred(module)
    materialize(module)
    assert not is_deferred(module)
    for got, want in [
        (module.noise[0], eager.noise[0]),
        (module.noise[1], eager.noise[1]),
        (module.table["freqs"], eager.table["freqs"]),
        (module.table["nested"][0], eager.table["nested"][0]),
        (module.pair[0], eager.pair[0]),
    ]:
        assert torch.equal(got, want)
        assert got.dtype == want.dtype
    assert module.shared[0] is module.fc.weight  # still one object
    assert torch.equal(module.fc.weight, eager.fc.weight)
    assert torch.equal(torch.rand(3), after)


def test_container_items_are_replayed_when_a_state_dict_fills_the_module() -> None:
    torch.manual_seed(0)
    eager = pm.WithContainers()
    torch.manual_seed(0)
    module = deferred_init(pm.WithContainers)
    module.load_state_dict(eager.state_dict())
    assert not is_deferred(module)
    assert torch.equal(module.noise[1], eager.noise[1])
    assert torch.equal(module.pair[0], eager.pair[0])


def test_container_items_are_replayed_by_load_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = pm.WithContainers()
    path = tmp_path / "net.pt"
    torch.save(eager.state_dict(), path)
    torch.manual_seed(0)
    module = deferred_init(pm.WithContainers)
    report = lm.load_checkpoint(module, path)
    assert not is_deferred(module)
    assert torch.equal(module.table["nested"][0], eager.table["nested"][0])
    assert "noise.0" in report.replayed


def test_a_tensor_kept_in_a_closure_raises_on_first_use_naming_its_line() -> None:
    kept: list[torch.Tensor] = []
    with deferred_init():
        net = torch.nn.Linear(2, 2)
        kept.append(torch.randn(3))  # the line the error names
    materialize(net)
    with pytest.raises(
        MetaTensorError,
        match=r"created inside a deferred_init block at .*test_escape\.py:\d+.*Fix: register it",
    ):
        torch.ones(3) + kept[0]
    with pytest.raises(MetaTensorError, match="after the block ended"):
        kept[0].sum()
    assert escaped_site(kept[0]) is not None
    assert escaped_site(net.weight) is None
    assert escaped_site(torch.ones(1)) is None


def test_a_deferred_container_tensor_trains_exactly_under_metaguard() -> None:
    eager = pm.ContainerLM(deferred=False)
    torch.manual_seed(1)
    pm.trainer(steps=3).fit(eager, pm.loader())
    model = pm.ContainerLM(deferred=True)
    torch.manual_seed(1)
    pm.trainer(steps=3).fit(model, pm.loader())
    assert model.losses == eager.losses
    for (name, got), want in zip(
        model.state_dict().items(), eager.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
    assert torch.equal(model.net.noise[0], eager.net.noise[0])


def test_a_tensor_that_escaped_stops_a_trainer_before_a_step_is_taken() -> None:
    model = pm.EscapingLM()
    trainer = pm.trainer(steps=2)
    with pytest.raises(MetaTensorError, match="created inside a deferred_init block"):
        trainer.fit(model, pm.loader())
    assert trainer.global_step == 0


class _Views(nn.Module):
    """Views of a parameter kept as an attribute, in a list and in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.row = self.lin.weight[0]
        self.rows = [self.lin.weight[1:], self.lin.bias]
        self.table = {"t": self.lin.weight.t()}


class _DetachedViews(nn.Module):
    """The views of :class:`_Views` taken under ``torch.no_grad()``: no gradient flows through them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        with torch.no_grad():
            self.row = self.lin.weight[0]
            self.rows = [self.lin.weight[1:], self.lin.bias]
            self.table = {"t": self.lin.weight.t()}


def _views(m: nn.Module) -> list[torch.Tensor]:
    return [m.row, m.rows[0], m.rows[1], m.table["t"]]


def _shares(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def test_views_kept_on_the_module_stay_views_of_their_parameter() -> None:
    # A view kept in a list or dict came back as a copy: a later change to
    # the weight (an optimizer step) no longer reached it.
    torch.manual_seed(0)
    eager = _Views()
    torch.manual_seed(0)
    module = deferred_init(_Views)
    materialize(module)
    for m in (eager, module):
        assert all(_shares(v, m.lin.weight) for v in (m.row, m.rows[0], m.table["t"]))
        assert m.rows[1] is m.lin.bias
        with torch.no_grad():
            m.lin.weight.add_(1.0)
    for got, want in zip(_views(module), _views(eager), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("load", ["load_state_dict", "load_checkpoint"])
def test_views_of_a_weight_cast_after_the_block_keep_their_values(
    load: str, tmp_path: Path
) -> None:
    # module.to(dtype) gives the weight other memory: eager's views keep the
    # initial values, and loading must not make them views of the new weight.
    torch.manual_seed(1)
    path = tmp_path / "views.pt"
    torch.save(_DetachedViews().state_dict(), path)
    torch.manual_seed(0)
    eager = _DetachedViews().to(torch.float64)
    torch.manual_seed(0)
    module = deferred_init(_DetachedViews).to(torch.float64)
    for m in (eager, module):
        if load == "load_checkpoint":
            lm.load_checkpoint(m, path)
        else:
            m.load_state_dict(torch.load(path))
    for got, want in zip(_views(module), _views(eager), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    # Views taken with autograd recording still send gradients into the cast
    # weight in eager construction; a copy of the old values cannot.
    module = deferred_init(_Views).to(torch.float64)
    state = torch.load(path)

    def run() -> None:
        if load == "load_checkpoint":
            lm.load_checkpoint(module, path)
        else:
            module.load_state_dict(state)

    with pytest.raises(MetaTensorError, match=r"'row' \(aten\.select\.int at .*test_escape\.py"):
        run()


@pytest.mark.parametrize("load", ["load_state_dict", "assign", "load_checkpoint"])
def test_views_kept_on_the_module_see_what_a_load_copies(load: str, tmp_path: Path) -> None:
    # Eager loading copies into the weight, which its views see; the views
    # were replayed with the initial values instead. Deferred loading keeps
    # views and ties with assign=True too (eager's assign=True breaks both).
    torch.manual_seed(1)
    path = tmp_path / "views.pt"
    torch.save(_Views().state_dict(), path)
    torch.manual_seed(0)
    eager = _Views()
    torch.manual_seed(0)
    module = deferred_init(_Views)
    record = handle_of(module.lin.weight).record  # type: ignore[union-attr]
    for m in (eager, module):
        if load == "load_checkpoint":
            lm.load_checkpoint(m, path)
        else:
            m.load_state_dict(torch.load(path), assign=load == "assign" and m is module)
    assert not is_deferred(module)
    # Nothing is left to replay: the op log (and what the block captured) is freed.
    assert record.released and record.ops == []
    for got, want in zip(_views(module), _views(eager), strict=True):
        assert torch.equal(got, want)
    assert _shares(module.row, module.lin.weight) and module.rows[1] is module.lin.bias


def _gradient(m: nn.Module) -> torch.Tensor:
    """The weight's gradient from a loss that reaches it only through the kept views."""
    m.zero_grad(set_to_none=True)
    x = torch.arange(1.0, 5.0)
    loss = (m.row * x).sum() + (m.rows[0] @ x).sum() + (m.table["t"].T @ x).sum()
    loss.backward()
    assert m.lin.weight.grad is not None
    return m.lin.weight.grad


@pytest.mark.parametrize(
    "route",
    ["materialize", "submodule first", "load_state_dict", "load_checkpoint", "checkpoint twice"],
)
def test_views_kept_on_the_module_carry_gradients_into_the_weight(
    route: str, tmp_path: Path
) -> None:
    # Views taken in __init__ outside torch.no_grad() are part of eager's
    # autograd graph: gradients flow through them into the weight. Deferred
    # ones were leaves: the weight got no gradient from them, without an error.
    torch.manual_seed(1)
    path = tmp_path / "views.pt"
    torch.save(_Views().state_dict(), path)
    torch.manual_seed(0)
    eager = _Views()
    torch.manual_seed(0)
    module = deferred_init(_Views)
    if route == "materialize":
        materialize(module)
    elif route == "submodule first":
        materialize(module.lin)  # the weight is real before the views are made
        materialize(module)
    elif route == "load_state_dict":
        for m in (eager, module):
            m.load_state_dict(torch.load(path))
    else:
        for m in (eager, module):
            if route == "checkpoint twice":
                lm.load_checkpoint(m.lin, path)  # the weight is real before the views are made
            lm.load_checkpoint(m, path)
    for got, want in zip(_views(module), _views(eager), strict=True):
        assert torch.equal(got, want) and got.requires_grad
    assert all(_shares(v, module.lin.weight) for v in (module.row, module.rows[0]))
    assert torch.equal(_gradient(module), _gradient(eager))


class _CutFromOne(nn.Module):
    """Two parameters cut from one tensor, and views of the second kept with autograd history."""

    def __init__(self) -> None:
        super().__init__()
        flat = torch.randn(6, 4)
        self.a = nn.Parameter(flat[:3])
        self.b = nn.Parameter(flat[3:])
        self.row = self.b[0]
        self.p = nn.Parameter(self.a[1])  # a parameter viewing another's memory
        self.tail = [self.p[1:]]


@pytest.mark.parametrize("route", ["materialize", "load_state_dict"])
def test_a_kept_view_feeds_the_parameter_it_was_taken_from(route: str) -> None:
    # Several parameters share the memory: the view's gradient went to the
    # first one holding that memory (a) instead of the one it came from (b, p).
    torch.manual_seed(1)
    state = _CutFromOne().state_dict()
    models = []
    for deferred in (False, True):
        torch.manual_seed(0)
        m = deferred_init(_CutFromOne) if deferred else _CutFromOne()
        if route == "materialize":
            if deferred:
                materialize(m)
        else:
            m.load_state_dict(state)
        (m.row.sum() + m.tail[0].sum() * 2).backward()
        models.append(m)
    eager, module = models
    for name in ("a", "b", "p"):
        got, want = module.get_parameter(name).grad, eager.get_parameter(name).grad
        assert (got is None) == (want is None), name
        assert got is None or torch.equal(got, want), name
    assert torch.equal(module.row, eager.row) and torch.equal(module.tail[0], eager.tail[0])


class _Frozen(nn.Module):
    """A view kept with autograd history, then its weight frozen (or replaced) in ``__init__``."""

    def __init__(self, then: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.row = self.lin.weight[0]
        self.rows = [self.row, self.row]  # the same tensor twice
        if then == "freeze":
            self.lin.requires_grad_(False)
        elif then == "replace":  # eager's gradient goes to the old, orphaned weight
            self.lin.weight = nn.Parameter(torch.randn(3, 4))


@pytest.mark.parametrize("then", ["freeze", "replace", "freeze after the block"])
@pytest.mark.parametrize("route", ["materialize", "load_state_dict", "load_checkpoint"])
def test_kept_views_whose_weight_gets_no_gradient_are_not_refused(
    then: str, route: str, tmp_path: Path
) -> None:
    # Refused as if gradients could reach the weight through them; eager
    # trains these exactly as a detached copy.
    torch.manual_seed(1)
    path = tmp_path / "frozen.pt"
    torch.save(_Frozen("").state_dict(), path)
    models = []
    for deferred in (False, True):
        torch.manual_seed(0)
        m = deferred_init(_Frozen, then) if deferred else _Frozen(then)
        if then == "freeze after the block":
            m.lin.requires_grad_(False)
        if route == "materialize":
            if deferred:
                materialize(m)
        elif route == "load_state_dict":
            m.load_state_dict(torch.load(path))
        else:
            lm.load_checkpoint(m, path)
        models.append(m)
    eager, module = models
    assert not is_deferred(module)
    assert module.rows[0] is module.rows[1] is module.row
    assert torch.equal(module.row, eager.row)
    assert _shares(module.row, module.lin.weight) == _shares(eager.row, eager.lin.weight)
    for m in models:
        (m.row * 2).sum().backward()
    assert module.lin.weight.grad is None and eager.lin.weight.grad is None


def test_a_view_of_a_weight_given_other_data_keeps_the_old_memory() -> None:
    # lin materialized on its own, then `weight.data = new`: eager's view
    # keeps the old memory and values; it became a view of the new data.
    models = []
    for deferred in (False, True):
        torch.manual_seed(0)
        m = deferred_init(_DetachedViews) if deferred else _DetachedViews()
        if deferred:
            materialize(m.lin)
        m.lin.weight.data = torch.full((3, 4), 5.0)
        if deferred:
            materialize(m)
        models.append(m)
    eager, module = models
    for got, want in zip(_views(module), _views(eager), strict=True):
        assert torch.equal(got, want)
    assert not _shares(module.row, module.lin.weight)
    # With autograd history it would feed a weight it no longer views: refused.
    module = deferred_init(_Views)
    materialize(module.lin)
    module.lin.weight.data = torch.full((3, 4), 5.0)
    with pytest.raises(MetaTensorError, match=r"'row' \(aten\.select\.int"):
        materialize(module)


class _GatedByARow(nn.Module):
    """A network whose forward reads a view of its weight kept in ``__init__`` (with autograd)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gate = [self.lin.weight[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * torch.sigmoid(self.gate[0])


class _GatedLM(pm.ContainerLM):
    def __init__(self, deferred: bool) -> None:
        super(pm.ContainerLM, self).__init__()
        torch.manual_seed(0)
        self.net = deferred_init(_GatedByARow) if deferred else _GatedByARow()
        self.head = nn.Linear(4, 1)
        self.losses: list[float] = []


def test_a_trainer_trains_through_a_kept_view_as_eager_does() -> None:
    # Under MetaGuard the view was a leaf: the gradient through it was lost
    # and the weights after fit differed from eager's, without an error.
    _, model = pm.fit_as_eager(_GatedLM)
    assert _shares(model.net.gate[0], model.net.lin.weight)


class _Scaled(nn.Module):
    """A tensor computed from a parameter (not a view of it) kept as an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.doubled = self.lin.weight * 2


def test_a_tensor_computed_from_a_parameter_with_autograd_is_refused() -> None:
    # Its gradient flows into the weight in eager construction; a replayed
    # copy is a separate tensor no gradient reaches.
    module = deferred_init(_Scaled)
    with pytest.raises(
        MetaTensorError, match=r"'doubled' \(aten\.mul\.Tensor at .*test_escape\.py:\d+\).*no_grad"
    ) as info:
        materialize(module)
    assert list(info.value.paths) == ["doubled"]
    assert is_deferred(module) and module.lin.weight.is_meta  # nothing was changed


class _HolderFirst(nn.Module):
    """A view of a weight kept on a module registered before the weight's."""

    def __init__(self, grad: bool) -> None:
        super().__init__()
        self.holder = nn.Module()
        self.holder.gain = nn.Parameter(torch.ones(1))
        self.lin = nn.Linear(4, 3)
        with torch.set_grad_enabled(grad):
            self.holder.row = self.lin.weight[0]
            self.holder.rows = [self.lin.weight[1]]


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("strict", [True, False], ids=["loaded", "weight-missing"])
def test_a_view_on_a_module_loaded_before_its_weight(grad: bool, strict: bool) -> None:
    # load_state_dict runs the holder's post-hook before it reaches lin: the
    # views were replayed with the initial values, as copies.
    torch.manual_seed(1)
    state = _HolderFirst(grad).state_dict()
    if not strict:
        del state["lin.weight"]
    torch.manual_seed(0)
    eager = _HolderFirst(grad)
    torch.manual_seed(0)
    module = deferred_init(_HolderFirst, grad)
    for m in (eager, module):
        m.load_state_dict(state, strict=strict)
    assert not is_deferred(module)
    for m in (eager, module):
        assert _shares(m.holder.row, m.lin.weight) and _shares(m.holder.rows[0], m.lin.weight)
    assert torch.equal(module.holder.row, eager.holder.row)
    assert torch.equal(module.holder.rows[0], eager.holder.rows[0])
    assert module.holder.row.requires_grad == eager.holder.row.requires_grad
    assert (module.holder.row.grad_fn is not None) == grad
    if grad:
        for m in (eager, module):
            m.zero_grad(set_to_none=True)
            (m.holder.row.sum() + m.holder.rows[0].sum()).backward()
        assert torch.equal(module.lin.weight.grad, eager.lin.weight.grad)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("first", ["materialize", "load_checkpoint"])
def test_a_view_on_a_module_filled_before_its_weight_is_refused(
    grad: bool, first: str, tmp_path: Path
) -> None:
    # materialize(holder) made the view a copy with the initial values: a
    # load (or an optimizer step) of the weight later no longer reached it.
    torch.manual_seed(1)
    path = tmp_path / "holder.pt"
    torch.save(_HolderFirst(grad).holder.state_dict(), path)
    torch.manual_seed(0)
    module = deferred_init(_HolderFirst, grad)

    def fill_holder() -> None:
        if first == "materialize":
            materialize(module.holder)
        else:
            lm.load_checkpoint(module.holder, path)

    with pytest.raises(MetaTensorError, match=r"\['row', 'rows\.0'\].*views a parameter") as info:
        fill_holder()
    assert sorted(info.value.paths) == ["row", "rows.0"]
    assert module.holder.gain.is_meta and module.holder.row.is_meta  # nothing was changed
    # The weight's module first, or the whole model, is exact.
    torch.manual_seed(0)
    eager = _HolderFirst(grad)
    materialize(module.lin)
    materialize(module)
    assert torch.equal(module.holder.row, eager.holder.row)
    assert _shares(module.holder.row, module.lin.weight)


class _Settings(nn.Module):
    """A float tensor kept as a plain attribute, next to a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.temperature = torch.tensor(0.1)
        self.stats = [torch.ones(3) / 3]
        # One tensor as a buffer and a plain attribute (transformers' Llama
        # rotary embedding keeps inv_freq so): module.to(dtype) casts the buffer only.
        self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)
        self.original_inv_freq = self.inv_freq


def test_materialize_dtype_casts_what_module_to_casts() -> None:
    # module.to(dtype) casts parameters and buffers only; materialize(dtype=)
    # cast the plain attribute too.
    eager = _Settings().to(torch.bfloat16)
    module = materialize(deferred_init(_Settings), dtype=torch.bfloat16)
    for m in (eager, module):
        assert m.lin.weight.dtype == torch.bfloat16
    assert module.temperature.dtype == eager.temperature.dtype == torch.float32
    assert torch.equal(module.temperature, eager.temperature)
    assert module.stats[0].dtype == eager.stats[0].dtype == torch.float32
    assert module.inv_freq.dtype == eager.inv_freq.dtype == torch.bfloat16
    assert module.original_inv_freq.dtype == eager.original_inv_freq.dtype == torch.float32
    kept = materialize(deferred_init(_Settings))
    assert kept.original_inv_freq is kept.inv_freq  # one tensor, as in eager construction


class _Straddling(nn.Module):
    """Two parameters cut from one tensor, and a view across both kept in a list."""

    def __init__(self) -> None:
        super().__init__()
        flat = torch.randn(10)
        self.a = nn.Parameter(flat[:4])
        self.b = nn.Parameter(flat[4:])
        self.span = [flat[2:6]]


def test_a_view_across_two_loaded_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "straddling.pt"
    torch.save(_Straddling().state_dict(), path)
    module = deferred_init(_Straddling)
    with pytest.raises(MetaTensorError, match=r"'span\.0'.*views memory") as info:
        lm.load_checkpoint(module, path)
    assert list(info.value.paths) == ["span.0"]
    assert is_deferred(module) and module.a.is_meta  # nothing was changed
