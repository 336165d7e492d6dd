"""Ensembles of other people's models under a hostile review (the twentieth round,
2026-12-07, fifth session).

- ``torch.compile`` of an ``Ensemble`` with the default ``execution="auto"``, called
  with a keyword argument (``attention_mask=``, ``labels=``) or a non-tensor one,
  crashed in dynamo ("RandomClassVariable() is not a constant"), where a compiled loop
  over the members runs;
- a forced ``execution="vmap"`` over members with gradient checkpointing was refused
  in the words of a ``MetaTemplate`` the user did not build, with a template's fix.
"""

from __future__ import annotations

import copy
import enum

import pytest
import torch
from torch import nn

import lightning_meta as lm


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        y = self.lin(x)
        return y if scale is None else y * scale


def test_compiled_auto_takes_keyword_and_none_arguments() -> None:
    torch.manual_seed(0)
    members = [Scaled() for _ in range(3)]
    x, s = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        by_keyword = torch.stack([m(x, scale=s) for m in members])
        plain = torch.stack([m(x) for m in members])
    ensemble = lm.Ensemble([copy.deepcopy(m) for m in members])
    compiled = torch.compile(ensemble)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, scale=s), by_keyword, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(compiled(x, None), plain, rtol=1e-6, atol=1e-6)


class Drawn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(
        self, x: torch.Tensor, g: torch.Generator | None = None, mode: object = None
    ) -> torch.Tensor:
        y = self.lin(x)
        return y if g is None else y + torch.randn(y.shape, generator=g)


class Mode(enum.Enum):
    A = 1


def test_compiled_auto_takes_a_generator_and_other_objects() -> None:
    # the second review: any leaf other than a tensor, a number, a string or None (a
    # generator, an enum, a dtype, a transformers Cache) still reached dynamo's refusal
    torch.manual_seed(0)
    members = [Drawn() for _ in range(3)]
    x = torch.randn(2, 4)
    compiled = torch.compile(lm.Ensemble([copy.deepcopy(m) for m in members]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        drawn = torch.stack([m(x, g=g) for m in members])  # one generator, member by member
        plain = torch.stack([m(x) for m in members])
        mine = torch.Generator().manual_seed(1)
        torch.testing.assert_close(compiled(x, g=mine), drawn, rtol=1e-6, atol=1e-6)
        assert torch.equal(mine.get_state(), g.get_state())
        for leaf in (Mode.A, torch.float32):
            torch.testing.assert_close(compiled(x, mode=leaf), plain, rtol=1e-6, atol=1e-6)


def test_a_forced_vmap_over_checkpointing_members_says_ensemble_and_the_plans() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    members = []
    for _ in range(2):
        member = transformers.GPT2LMHeadModel(config)
        member.gradient_checkpointing_enable({"use_reentrant": False})
        members.append(member)
    ids = torch.randint(0, 40, (2, 8))
    forced = lm.Ensemble([copy.deepcopy(m) for m in members], execution="vmap")
    with pytest.raises(
        lm.ArgumentValueError,
        match=r"^Ensemble\(execution='vmap'\) cannot run members that recompute activations "
        r"in backward \(activation checkpointing\) at 'transformer'.*Fix: use "
        r"execution='loop' \(or 'auto'\), which runs them as the members do",
    ):
        forced(ids).logits.sum().backward()
    loop = lm.Ensemble([copy.deepcopy(m) for m in members], execution="loop")
    out = loop(ids).logits  # the fix, followed
    expected = torch.stack([m(ids).logits for m in members])
    assert torch.equal(out, expected)
