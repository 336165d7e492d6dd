"""Ensemble with per-member indices and a forward's own ``F.embedding(..., padding_idx=p)``.

``torch.vmap`` looks every member's indices up in one flattened table, whose backward keeps
only member 0's padding row out of the gradient: the other members' padding rows trained
(``execution="vmap"``, or ``"auto"`` where vmap won the timing). ``nn.Embedding`` layers are
found by a module scan; a forward's own call only by watching it (``_ensemble/_lookups.py``).
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_meta as lm


class _OwnLookup(nn.Module):
    """A forward that looks its indices up itself (no nn.Embedding for a scan to find)."""

    def __init__(self, through_torch: bool = False) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 8))
        self.head = nn.Linear(8, 3)
        self.through_torch = through_torch

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.through_torch:
            looked_up = torch.embedding(self.table, ids, 0)
        else:
            looked_up = F.embedding(ids, self.table, padding_idx=0)
        return self.head(looked_up).sum(1)


def _setup(n: int, through_torch: bool = False) -> tuple[list[nn.Module], torch.Tensor]:
    torch.manual_seed(0)
    members: list[nn.Module] = [_OwnLookup(through_torch) for _ in range(n)]
    ids = torch.randint(1, 10, (n, 2, 3))
    ids[:, :, 0] = 0  # every member looks its padding row up
    return members, ids


def _members_grads(members: list[nn.Module], ids: torch.Tensor) -> torch.Tensor:
    grads = []
    for i, member in enumerate(members):
        member.zero_grad(set_to_none=True)
        member(ids[i]).sum().backward()
        grads.append(member.table.grad.clone())
    return torch.stack(grads)


@pytest.mark.parametrize("through_torch", [False, True])
def test_forced_vmap_refuses_a_forwards_own_padded_lookup_of_per_member_indices(
    through_torch: bool,
) -> None:
    members, ids = _setup(3, through_torch)
    ensemble = lm.Ensemble(members, execution="vmap", per_member_inputs=True)
    name = "torch.embedding" if through_torch else "F.embedding"
    for _ in range(2):
        with pytest.raises(
            lm.ArgumentValueError,
            match=rf"stacked parameter 'table' with {name}\(\.\.\., padding_idx=0\)",
        ):
            ensemble(ids).sum().backward()
    assert ensemble.stacked.table.grad is None
    with torch.no_grad():  # without gradients the lookup is exact, and runs
        ensemble(ids)
    assert ensemble.plan == "vmap"


class _ComputedTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table * 2, padding_idx=0).sum(1)


def test_the_refusal_says_a_table_the_forward_computed_is_not_a_parameter() -> None:
    ensemble = lm.Ensemble(
        [_ComputedTable() for _ in range(3)], execution="vmap", per_member_inputs=True
    )
    ids = torch.randint(0, 10, (3, 2, 3))
    with pytest.raises(
        lm.ArgumentValueError, match=r"a trainable table of shape \(10, 8\) the forward computed"
    ):
        ensemble(ids).sum().backward()


def test_forced_vmap_runs_the_padded_lookup_where_vmap_is_exact() -> None:
    members, ids = _setup(3)
    with torch.no_grad():  # the lookup's values are right: only its gradient is not
        ensemble = lm.Ensemble(members, execution="vmap", per_member_inputs=True)
        expected = torch.stack([m(ids[i]) for i, m in enumerate(members)])
        # (vmap's batched head rounds otherwise than each member's addmm)
        torch.testing.assert_close(ensemble(ids), expected)
        assert ensemble.plan == "vmap"
    # Shared indices: looked up unbatched, every member's padding row kept out.
    shared = lm.Ensemble(members, execution="vmap")
    shared(ids[0]).sum().backward()
    assert shared.plan == "vmap"
    assert shared.stacked.table.grad[:, 0].abs().max() == 0
    # Nothing to train: the watch is not entered.
    frozen = lm.Ensemble(members, execution="vmap", per_member_inputs=True)
    frozen.requires_grad_(False)
    frozen(ids)
    assert frozen.plan == "vmap"


def test_auto_runs_the_loop_after_vmap_won_the_timing_without_gradients() -> None:
    # 64 tiny members: vmap is several times faster than the loop without gradients.
    members, ids = _setup(64)
    expected = _members_grads(members, ids)
    assert expected[1:, 0].abs().max() == 0
    ensemble = lm.Ensemble(members, per_member_inputs=True)
    with torch.no_grad():
        ensemble(ids)
    assert ensemble.plan == "vmap", ensemble.plans  # the case this test is about
    ensemble(ids).sum().backward()
    assert ensemble.plan == "loop"
    assert torch.equal(ensemble.stacked.table.grad, expected)
    ensemble.zero_grad(set_to_none=True)
    ensemble(ids).sum().backward()  # and on the calls after it
    assert ensemble.plan == "loop"
    assert torch.equal(ensemble.stacked.table.grad, expected)
    # The finding survives a copy and a pickle (it is a message, not an exception object).
    for again in (copy.deepcopy(ensemble), pickle.loads(pickle.dumps(ensemble))):
        again.zero_grad(set_to_none=True)
        again(ids).sum().backward()
        assert again.plan == "loop"
        assert torch.equal(again.stacked.table.grad, expected)


def test_auto_times_the_padded_lookup_out_of_vmap_with_gradients() -> None:
    members, ids = _setup(64)
    expected = _members_grads(members, ids)
    ensemble = lm.Ensemble(members, per_member_inputs=True)
    ensemble(ids).sum().backward()
    assert ensemble.plan == "loop"
    assert torch.equal(ensemble.stacked.table.grad, expected)
    record = ensemble.plans[0]
    assert record.timings_ms["vmap"] == float("inf"), record  # it ran, and refused


class _Remapped(nn.Module):
    """Shared ids, made per-member by each member's own remap buffer (a hashed vocabulary)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        order = torch.randperm(9, generator=torch.Generator().manual_seed(seed)) + 1
        self.register_buffer("remap", torch.cat([torch.zeros(1, dtype=torch.long), order]))
        self.emb = nn.Embedding(10, 4, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(self.remap[ids]).sum()


def test_shared_ids_a_forward_makes_per_member_keep_every_padding_row_out() -> None:
    # Found by the regression sweep of 2026-12-05: only per_member_inputs=True was
    # checked, so vmap ("auto" under torch.compile, or forced) trained the padding rows.
    torch.manual_seed(1)
    members: list[nn.Module] = [_Remapped(seed) for seed in range(3)]
    ids = torch.tensor([[0, 5, 0, 3]])
    for member in members:
        member(ids).backward()
    expected = torch.stack([m.emb.weight.grad for m in members])
    assert expected[:, 0].abs().max() == 0
    with pytest.raises(lm.ArgumentValueError, match=r"differ per member .*padding_idx=0"):
        lm.Ensemble(members, execution="vmap")(ids).sum().backward()
    for compiled in (False, True):
        ensemble = lm.Ensemble(members)
        call = torch.compile(ensemble, backend="eager") if compiled else ensemble
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(ids).sum().backward()
        # The watch's functorch queries run eagerly: dynamo warned it could not trace them.
        assert not [w for w in caught if "Dynamo does not know" in str(w.message)]
        assert ensemble.plan == "loop", compiled
        torch.testing.assert_close(
            ensemble.tensors()["emb.weight"].grad, expected, rtol=0, atol=1e-6
        )


class _Switched(nn.Module):
    """A padded lookup only in some calls: under no_grad, or when asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 8))
        self.head = nn.Linear(8, 3)

    def forward(
        self, ids: torch.Tensor, padded: bool = False, frozen: bool = False
    ) -> torch.Tensor:
        if frozen:
            with torch.no_grad():  # no gradient reaches the table here
                looked_up = F.embedding(ids, self.table, padding_idx=0)
        else:
            looked_up = F.embedding(ids, self.table, padding_idx=0 if padded else None)
        return self.head(looked_up).sum(1)


def test_the_watch_follows_the_kind_of_call_and_the_lookups_gradient() -> None:
    # Found by the regression sweep of 2026-12-05: a lookup under no_grad in the forward was
    # refused; and the watch, entered on every call, cost 15-20 % of a vmapped step of small
    # layers. It is now entered once per kind of call (mode, inputs' structure, dtypes,
    # dimensions and plain values): a call of another kind is watched again.
    torch.manual_seed(0)
    members: list[nn.Module] = [_Switched() for _ in range(3)]
    ids = torch.randint(0, 10, (3, 2, 3))
    ensemble = lm.Ensemble(members, execution="vmap", per_member_inputs=True)
    for _ in range(2):
        ensemble(ids, frozen=True).sum().backward()  # padding index, but no gradient
        ensemble(ids).sum().backward()  # no padding index
    assert ensemble.plan == "vmap"
    with pytest.raises(lm.ArgumentValueError, match=r"padding_idx=0"):
        ensemble(ids, padded=True).sum().backward()
    with pytest.raises(lm.ArgumentValueError, match=r"padding_idx=0"):
        ensemble(ids.unsqueeze(-1), padded=True).sum().backward()  # another dimension
