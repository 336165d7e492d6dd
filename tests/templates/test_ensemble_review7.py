"""Ensemble, seventh hostile review (2026-12-05): what a loop over the members gives, or the
package's own refusal, where a plan gave other numbers or torch's error.

- ``nn.Embedding(padding_idx=...)`` with per-member indices: ``torch.vmap`` looks every
  member's indices up in one flattened table, whose backward keeps only member 0's padding
  row out of the gradient; ``execution="auto"`` picked vmap and trained the others'.
- ``nn.Embedding(max_norm=...)`` on the loop plan with gradients: the renormalisation in
  place made torch refuse the next use of ``unbind``'s views.
- A ``PackedSequence`` input crashed ``execution="auto"``'s call description; a ``None``
  positional input with ``per_member_inputs=True`` crashed vmap; the grouped plan returned
  torch.fx's immutable lists and dicts; an Ensemble inside a member gave errors about the
  package's own caches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lightning_meta as lm
from lightning_meta import _compat


class _Padded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(10, 4, padding_idx=0)
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.e(ids))


def _members(make: type[nn.Module], n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [make() for _ in range(n)]


def _grads_of_loop(members: list[nn.Module], inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    for m, x in zip(members, inputs, strict=True):
        m(x).square().sum().backward()
    return {
        name: torch.stack([m.get_parameter(name).grad for m in members])  # type: ignore[misc]
        for name, _ in members[0].named_parameters()
    }


def test_padding_idx_with_per_member_indices_keeps_every_members_padding_row_out() -> None:
    members = _members(_Padded)
    ids = torch.randint(0, 3, (3, 4, 5), generator=torch.Generator().manual_seed(1))
    expected = _grads_of_loop(copy.deepcopy(members), list(ids))
    assert expected["e.weight"][:, 0].abs().max() == 0  # padding id 0 is looked up
    for execution in ("auto", "loop"):
        ens = lm.Ensemble(copy.deepcopy(members), execution=execution, per_member_inputs=True)
        for _ in range(2):  # auto: the timed first call, then the chosen plan
            for t in ens.tensors().values():
                t.grad = None
            ens(ids).square().sum().backward()
        assert ens.plan == "loop", execution
        for name, grad in expected.items():
            torch.testing.assert_close(ens.tensors()[name].grad, grad, rtol=0, atol=1e-6)
        assert ens.tensors()["e.weight"].grad[:, 0].abs().max() == 0


def test_padding_idx_refuses_forced_vmap_with_per_member_indices_only() -> None:
    members = _members(_Padded)
    per_member = torch.zeros(3, 4, 5, dtype=torch.long)
    ens = lm.Ensemble(copy.deepcopy(members), execution="vmap", per_member_inputs=True)
    with pytest.raises(lm.ArgumentValueError, match=r"padding_idx \('e'\).*member 0's padding"):
        ens(per_member)
    # Set after construction: refused at the call too.
    ens = lm.Ensemble(copy.deepcopy(members), execution="vmap")
    ens.per_member_inputs = True
    with pytest.raises(lm.ArgumentValueError, match=r"padding_idx"):
        ens(per_member)
    # Where no padding row can train, vmap runs (it was refused when the ensemble was
    # built, found by the regression sweep of 2026-12-05): without gradients, and with
    # the embedding frozen (the head still training).
    with torch.no_grad():
        ens(per_member)
    assert ens.plan == "vmap"
    ens.stacked.e.weight.requires_grad_(False)
    ens(per_member).sum().backward()
    assert ens.plan == "vmap"
    # Shared indices: vmap looks them up unbatched, each member's padding row kept out.
    ids = torch.randint(0, 3, (4, 5), generator=torch.Generator().manual_seed(1))
    expected = _grads_of_loop(copy.deepcopy(members), [ids] * 3)
    ens = lm.Ensemble(copy.deepcopy(members), execution="vmap")
    ens(ids).square().sum().backward()
    assert ens.plan == "vmap"
    for name, grad in expected.items():
        torch.testing.assert_close(ens.tensors()[name].grad, grad, rtol=0, atol=1e-5)


class _MaxNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(10, 4, max_norm=1.0)
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.e(ids))


@pytest.mark.parametrize("execution", ["loop", "auto"])
def test_max_norm_embedding_runs_with_gradients(execution: str) -> None:
    # auto may time vmap fastest, whose batched matmuls sum in another order.
    tol = {"rtol": 0, "atol": 0} if execution == "loop" else {"rtol": 1e-5, "atol": 1e-6}
    members = _members(_MaxNorm)
    for m in members:
        with torch.no_grad():
            m.e.weight.mul_(3)  # rows above max_norm: the forward renormalises them
    ids = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(members)
    ens = lm.Ensemble(copy.deepcopy(members), execution=execution)
    out = ens(ids)
    expected = torch.stack([m(ids) for m in ref])
    torch.testing.assert_close(out, expected, **tol)
    out.square().sum().backward()
    expected.square().sum().backward()
    for name in ("e.weight", "head.weight", "head.bias"):
        stacked = torch.stack([m.get_parameter(name) for m in ref])
        torch.testing.assert_close(ens.tensors()[name], stacked, **tol)
        grads = torch.stack([m.get_parameter(name).grad for m in ref])  # type: ignore[misc]
        torch.testing.assert_close(ens.tensors()[name].grad, grads, **tol)


def test_max_norm_embedding_runs_on_the_functional_loop_under_autocast() -> None:
    # Under autocast the vmap plan runs the loop through functional_call.
    members = _members(_MaxNorm)
    ids = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(members)
    ens = lm.Ensemble(copy.deepcopy(members), execution="auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ens(ids)
        expected = torch.stack([m(ids) for m in ref])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().sum().backward()
    expected.float().sum().backward()
    grads = torch.stack([m.e.weight.grad for m in ref])  # type: ignore[misc]
    torch.testing.assert_close(ens.tensors()["e.weight"].grad, grads, rtol=0, atol=0)


def test_packed_sequence_input_runs_under_auto_as_on_the_loop() -> None:
    members = _members(lambda: nn.LSTM(4, 5, batch_first=True), 2)  # type: ignore[arg-type, return-value]
    x = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1))
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]), batch_first=True)
    if len(_compat.tree_leaves(packed)) == 1:
        # torch 2.6's pytree has no PackedSequence node: a leaf neither plan stacks.
        for execution in ("loop", "auto"):
            with pytest.raises(lm.ArgumentValueError, match="PackedSequence in output leaf"):
                lm.Ensemble(copy.deepcopy(members), execution=execution)(packed)
        return
    loop = lm.Ensemble(copy.deepcopy(members), execution="loop")(packed)
    auto = lm.Ensemble(copy.deepcopy(members))(packed)
    out, (h, _) = auto
    expected = [m(packed) for m in members]
    torch.testing.assert_close(out.data, loop[0].data, rtol=0, atol=0)
    for i, (member_out, (member_h, _)) in enumerate(expected):
        torch.testing.assert_close(out.data[i], member_out.data, rtol=0, atol=0)
        torch.testing.assert_close(h[i], member_h, rtol=0, atol=0)


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4, mode="sum")
        self.head = nn.Linear(4, 2)

    def forward(
        self, ids: torch.Tensor, offsets: torch.Tensor | None, weights: torch.Tensor
    ) -> torch.Tensor:
        return self.head(self.bag(ids, offsets, weights))


def test_none_positional_input_with_per_member_inputs_on_vmap() -> None:
    members = _members(_Bag)
    g = torch.Generator().manual_seed(1)
    ids, w = torch.randint(0, 10, (3, 4, 5), generator=g), torch.rand(3, 4, 5, generator=g)
    expected = torch.stack([m(ids[i], None, w[i]) for i, m in enumerate(members)])
    for execution in ("vmap", "loop"):
        ens = lm.Ensemble(copy.deepcopy(members), execution=execution, per_member_inputs=True)
        torch.testing.assert_close(ens(ids, None, w), expected, rtol=1e-6, atol=1e-6)


class _Listed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.l(x), self.l(x) * 2]


class _Keyed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": self.l(x)}


def test_grouped_plan_returns_the_plain_list_and_dict_a_member_returns() -> None:
    x = torch.randn(5, 4)
    listed = lm.Ensemble(_members(_Listed), execution="grouped")(x)
    assert type(listed) is list
    listed.append(torch.zeros(1))  # what a caller does with a member's list
    keyed = lm.Ensemble(_members(_Keyed), execution="grouped")(x)
    assert type(keyed) is dict
    keyed["loss"] = keyed["h"].sum()


class _WithHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.heads = lm.Ensemble([nn.Linear(4, 2) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.body(x)).mean(0)


def test_an_ensemble_inside_a_member_or_template_is_refused_by_name() -> None:
    members = _members(_WithHeads)
    for m in members[:1]:
        m(torch.randn(5, 4))  # ran once: its caches hold views with grad_fn
    with pytest.raises(lm.ArgumentTypeError, match=r"member 0 is or holds an Ensemble \('heads'\)"):
        lm.Ensemble(members)
    with pytest.raises(lm.ArgumentTypeError, match=r"MetaTemplate\(_WithHeads\): 'heads' is an"):
        lm.MetaTemplate(members[1])
    with pytest.raises(lm.ArgumentTypeError, match=r"the module itself is an lm.Ensemble"):
        lm.MetaTemplate(members[1].heads)


class _TiedMaxNorm(nn.Module):
    """A max_norm embedding whose weight a head reuses (saved for backward), or a bag."""

    def __init__(self, bag: bool = False) -> None:
        super().__init__()
        self.bag = bag
        self.e = (nn.EmbeddingBag if bag else nn.Embedding)(10, 4, max_norm=1.0)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.e.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.e(ids)))


@pytest.mark.parametrize("bag", [False, True])
def test_max_norm_weight_saved_for_backward_trains_on_the_loop_as_the_members(bag: bool) -> None:
    torch.manual_seed(0)
    members = [_TiedMaxNorm(bag) for _ in range(3)]
    for m in members:
        with torch.no_grad():
            m.e.weight.mul_(3)
    ids = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(members)
    ens = lm.Ensemble(copy.deepcopy(members), execution="loop")
    opt = torch.optim.SGD(ens.parameters(), lr=0.1)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in ref]
    for _ in range(3):
        ens(ids).square().sum().backward()
        opt.step()
        opt.zero_grad()
        for m, o in zip(ref, opts, strict=True):
            m(ids).square().sum().backward()
            o.step()
            o.zero_grad()
    stacked = torch.stack([m.e.weight for m in ref])
    torch.testing.assert_close(ens.tensors()["e.weight"], stacked, rtol=0, atol=0)
    member = ens.member(1)
    assert member.head.weight is member.e.weight


class _OwnMaxNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(10, 4) * 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.w, max_norm=1.0)


def test_a_forwards_own_max_norm_lookup_is_refused_on_the_loop_by_name() -> None:
    ens = lm.Ensemble(_members(_OwnMaxNorm), execution="loop")
    with pytest.raises(lm.ArgumentValueError, match=r"member 0's forward changed in place a view"):
        ens(torch.randint(0, 10, (4, 5)))


def test_a_factory_template_holding_an_ensemble_is_refused_by_name() -> None:
    with pytest.raises(lm.ArgumentTypeError, match=r"MetaTemplate\(_WithHeads\): 'heads' is an"):
        lm.MetaTemplate(_WithHeads)
    template = lm.MetaTemplate(_WithHeads, cache=False)  # built on use
    with pytest.raises(lm.ArgumentTypeError, match=r"'heads' is an lm.Ensemble"):
        template.module  # noqa: B018


def test_named_tuple_inputs_of_other_fields_are_other_kinds_of_call() -> None:
    from collections import namedtuple

    first = namedtuple("NT", ["a", "b"])
    second = namedtuple("NT", ["a", "c"])

    class Take(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return self.l(pair[0]) + pair[1]

    ens = lm.Ensemble([Take() for _ in range(2)])
    x = torch.randn(3, 4)
    ens(first(x, x))
    ens(second(x, x))
    assert len({record.signature for record in ens.plans}) == 2


class _Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the member's own error")


@pytest.mark.parametrize("grad", [True, False])
def test_a_members_own_runtime_error_passes_through_the_loop_unchanged(grad: bool) -> None:
    ens = lm.Ensemble(_members(_Raises), execution="loop")
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError) as raised:
        ens(torch.randn(3, 4))
    assert type(raised.value) is RuntimeError and str(raised.value) == "the member's own error"
    assert raised.value.__cause__ is None
