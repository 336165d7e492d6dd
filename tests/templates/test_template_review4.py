"""Templates, fourth hostile review: a tied target in the hypernetwork recipe, a tensor or
None where the mapping goes, and state_from given something other than a module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_meta as lm


class _Tied(nn.Module):
    """A tied embedding and output head, as GPT-2 ties them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.emb(x))
        return out


def _eager(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    net = _Tied()
    with torch.no_grad():
        net.emb.weight.copy_(weight)
    return net(x)


def test_the_hypernetwork_recipe_generates_one_tensor_per_tie_and_runs() -> None:
    template = lm.MetaTemplate(_Tied())
    assert template.shapes(buffers=False) == {"emb.weight": (10, 4)}
    assert template.shapes() == {"emb.weight": (10, 4)}
    generated = {k: torch.randn(s) for k, s in template.shapes(buffers=False).items()}
    x = torch.tensor([1, 2, 7])
    torch.testing.assert_close(template(generated, x), _eager(generated["emb.weight"], x))


def test_tied_names_given_different_tensors_name_fixes_that_work() -> None:
    template = lm.MetaTemplate(_Tied())
    x = torch.tensor([1, 2])
    given = {"emb.weight": torch.randn(10, 4), "head.weight": torch.randn(10, 4)}
    with pytest.raises(lm.MetaTensorError) as info:
        template(given, x)
    message = str(info.value)
    assert "pass 'emb.weight' only" in message and "omit 'head.weight'" in message
    assert "template.functional_call(params, args, tie_weights=False)" in message
    # Both fixes the message names run, as the eager module would.
    only = {"emb.weight": given["emb.weight"]}
    torch.testing.assert_close(template(only, x), _eager(given["emb.weight"], x))
    untied = template.functional_call(given, (x,), tie_weights=False)
    expected = given["emb.weight"][x] @ given["head.weight"].t()
    torch.testing.assert_close(untied, expected)


# ------------------------------------------------------------------- arguments of the wrong kind
@pytest.mark.parametrize(
    "given",
    [torch.zeros(6), torch.zeros(3, 2), None, [("weight", torch.zeros(2, 2))]],
    ids=["flat-tensor", "2d-tensor", "None", "list"],
)
@pytest.mark.parametrize("strict", [True, False])
def test_a_tensor_or_none_for_the_mapping_is_the_packages_type_error(
    given: object, strict: bool
) -> None:
    template = lm.MetaTemplate(nn.Linear(2, 2))
    got = type(given).__name__
    with pytest.raises(
        lm.MetaTensorError, match=rf"expects a mapping of dotted names .* got {got}\. Fix: "
    ) as info:
        template.functional_call(given, (torch.zeros(2),), strict=strict)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    with pytest.raises(TypeError, match=rf"got {got}\. Fix: "):
        template(given, torch.zeros(2))  # type: ignore[arg-type]


@pytest.mark.parametrize("given", [torch.zeros(2), None, {"weight": torch.zeros(2, 2)}])
def test_state_from_something_other_than_a_module_is_the_packages_type_error(
    given: object,
) -> None:
    template = lm.MetaTemplate(nn.Linear(2, 2))
    with pytest.raises(
        lm.MetaTensorError,
        match=rf"MetaTemplate\(Linear\)\.state_from expects the real nn.Module .* got "
        rf"{type(given).__name__}\. Fix: pass the module",
    ) as info:
        template.state_from(given)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    assert "(a submodule)" not in str(info.value)
