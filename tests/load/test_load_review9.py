"""Checkpoint loading under a hostile review (ninth round): a module that overrides
``load_state_dict`` itself; safetensors headers that safetensors refuses."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_meta as lm


class _Transposing(nn.Module):
    """Converts a legacy layout in its own load_state_dict: ``w`` stored transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, 3))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        state_dict = {k: (v.t() if k == "w" else v) for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class _Renaming(nn.Module):
    """Reads checkpoints of an older version, whose ``proj`` was called ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        state_dict = {k.replace("fc.", "proj."): v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


@pytest.mark.parametrize("target", ["real", "meta", "deferred"])
def test_a_load_state_dict_override_computing_values_is_refused(
    target: str, tmp_path: Path
) -> None:
    # Before, load_checkpoint ran neither the override nor a refusal: the raw (transposed)
    # file values, strict=True, no error.
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.randn(3, 3)}, path)
    if target == "meta":
        with torch.device("meta"):
            model = _Transposing()
    elif target == "deferred":
        with lm.deferred_init():
            model = _Transposing()
    else:
        model = _Transposing()
    with pytest.raises(lm.MetaTensorError, match=r"_Transposing\.load_state_dict") as info:
        lm.load_checkpoint(model, path)
    assert "fills ['w'] with values it computes" in str(info.value)


@pytest.mark.parametrize("target", ["real", "deferred"])
def test_a_load_state_dict_override_renaming_keys_is_followed(target: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = nn.Module()
    old.fc = nn.Linear(3, 2)
    path = tmp_path / "old.pt"
    torch.save(old.state_dict(), path)
    eager = _Renaming()
    eager.load_state_dict(torch.load(path))
    if target == "deferred":
        with lm.deferred_init():
            model = _Renaming()
    else:
        model = _Renaming()
    lm.load_checkpoint(model, path)
    assert torch.equal(model.proj.weight, eager.proj.weight)
    assert torch.equal(model.proj.bias, eager.proj.bias)


_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "said"),
    [
        ({"w": {**_ENTRY, "dtype": "f32"}}, r"has the dtype 'f32', which is not a safetensors"),
        ('{"__metadata__": {"x": NaN}, "w": ' + json.dumps(_ENTRY) + "}", r"NaN is not JSON"),
        ({"w": {**_ENTRY, "shape": [2**64 + 2, 0], "data_offsets": [0, 0]}}, r"bad shape"),
    ],
    ids=["lowercase-dtype", "nan-in-metadata", "dimension-past-int64"],
)
def test_a_header_safetensors_refuses_is_refused_as_damaged(
    header: Any, said: str, tmp_path: Path
) -> None:
    # Before: 'f32' was "a dtype torch cannot hold", and the other two loaded.
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + torch.ones(2).numpy().tobytes())
    model = nn.Module()
    model.register_buffer("w", torch.zeros(2))
    with pytest.raises(lm.MetaTensorError, match=said) as info:
        lm.load_checkpoint(model, path, strict=False)
    assert "is not a valid safetensors file" in str(info.value)
    assert torch.equal(model.w, torch.zeros(2))


class _OnlyStateDict(nn.Module):
    """An override without ``strict`` that returns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def load_state_dict(self, state_dict: Any) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)


def test_a_load_state_dict_override_of_another_signature_is_followed(tmp_path: Path) -> None:
    # A first version of the trace called it with strict=False and read .missing_keys from
    # what it returned: refused with TypeError or AttributeError, though it only loads.
    torch.manual_seed(0)
    path = tmp_path / "plain.pt"
    torch.save(_OnlyStateDict().state_dict(), path)
    eager = _OnlyStateDict()
    eager.load_state_dict(torch.load(path))
    with lm.deferred_init():
        model = _OnlyStateDict()
    lm.load_checkpoint(model, path)
    assert torch.equal(model.proj.weight, eager.proj.weight)
    assert torch.equal(model.proj.bias, eager.proj.bias)


class _LoadsNothing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)

    load_state_dict = staticmethod(lambda state_dict, strict=True: None)  # type: ignore[assignment]


def test_an_override_that_loads_nothing_is_refused_saying_so(tmp_path: Path) -> None:
    # Eager's load_state_dict on it loads nothing. Before, the refusal listed each name as
    # missing and as unexpected, "closest" to itself.
    path = tmp_path / "plain.pt"
    torch.save(_LoadsNothing().state_dict(), path)
    with pytest.raises(lm.MetaTensorError, match=r"did not copy 2 of the checkpoint") as info:
        lm.load_checkpoint(_LoadsNothing(), path)
    assert "(closest: 'proj.bias')" not in str(info.value)
