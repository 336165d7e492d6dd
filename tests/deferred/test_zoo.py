"""Third-party architectures from tiny configs: deferred init gives exactly eager construction.

For every model: every parameter and buffer ``torch.equal`` to eager
construction with the same seed, same dtype and class, ties kept, the forward
output equal, and the global generator where eager construction leaves it,
right after the block (before materialize) and after materialize.
torchvision and timm entries are skipped where those packages cannot be
imported (PyPI's torchvision wheels need their own torch build).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from test_deferred import assert_same_as_eager
from torch import nn

from lightning_meta import deferred_init, is_deferred, materialize
from support.zoo_models import ZOO, available


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*(enable_nested_tensor|TypedStorage|deprecated).*")


def _output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)):
        return _output(out[0])
    raise AssertionError(f"no tensor in {type(out).__name__}")


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_is_bit_identical_to_eager(name: str) -> None:
    entry = ZOO[name]
    if not available(entry):
        pytest.skip(f"{entry.needs} is not importable here")
    torch.manual_seed(0)
    eager = entry.build()
    after_eager = torch.get_rng_state()

    torch.manual_seed(0)
    with deferred_init():
        module = entry.build()
    # The generator stands where eager construction leaves it, before materialize.
    assert torch.equal(torch.get_rng_state(), after_eager)
    assert is_deferred(module)
    materialize(module)
    assert torch.equal(torch.get_rng_state(), after_eager)
    assert not is_deferred(module)
    assert_same_as_eager(eager, module)

    inputs = entry.inputs()
    with torch.no_grad():
        expected = _output(eager(**inputs))
        got = _output(module(**inputs))
    assert torch.equal(expected, got)


def test_zoo_names_every_architecture_of_the_issue() -> None:
    # 22 Hugging Face models (CLIP among them), 5 torchvision, 5 timm, litgpt, and two trunc_normal_ users.
    assert len(ZOO) >= 35
    assert all(isinstance(e.build(), nn.Module) for e in ZOO.values() if e.needs == "litgpt")
