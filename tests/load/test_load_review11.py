"""Checkpoint loading under a hostile review (eleventh round): safetensors metadata that
safetensors refuses; two values under one key of a torch file."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, safe_open
from torch import nn

import lightning_meta as lm

_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _write(path: Path, metadata: Any) -> None:
    text = json.dumps({"w": _ENTRY, "__metadata__": metadata}).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + torch.ones(2).numpy().tobytes())


def _module() -> nn.Module:
    model = nn.Module()
    model.register_buffer("w", torch.zeros(2))
    return model


@pytest.mark.parametrize(
    "metadata", [{"format": 1}, ["x"], {"step": {"a": 1}}], ids=["int", "list", "nested"]
)
def test_metadata_that_safetensors_refuses_is_refused_as_damaged(
    metadata: Any, tmp_path: Path
) -> None:
    # Before: these loaded, where safetensors' own reader refuses the header.
    path = tmp_path / "m.safetensors"
    _write(path, metadata)
    with pytest.raises(Exception, match="invalid type"):
        load_file(path)
    model = _module()
    with pytest.raises(lm.MetaTensorError, match=r"__metadata__ is not a map of strings"):
        lm.load_checkpoint(model, path)
    assert torch.equal(model.w, torch.zeros(2))


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_metadata_that_safetensors_reads_loads(metadata: Any, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    _write(path, metadata)
    with safe_open(path, "pt") as f:
        assert f.metadata() in (None, {}, metadata)
    model = _module()
    lm.load_checkpoint(model, path)
    assert torch.equal(model.w, torch.ones(2))


@pytest.mark.parametrize(
    "state",
    [
        {0: torch.ones(2), "0": torch.full((2,), 5.0), "1": torch.full((2,), 6.0)},
        {"0": {"1": torch.ones(2)}, "0.1": torch.full((2,), 5.0), "0.0": torch.ones(2)},
    ],
    ids=["int-and-str", "nested-and-dotted"],
)
def test_two_values_under_one_key_are_refused(state: dict[Any, Any], tmp_path: Path) -> None:
    # Before: the int key 0 was dropped beside the string '0', even with strict=True,
    # and listed nowhere.
    path = tmp_path / "c.pt"
    torch.save(state, path)
    nested = "0.0" in state
    model = nn.ParameterList([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))])
    if nested:
        model = nn.ModuleList([model])
    with pytest.raises(lm.MetaTensorError, match=r"two values under the keys \['0(\.1)?'\]"):
        lm.load_checkpoint(model, path, strict=False)
    assert all(torch.equal(p, torch.zeros(2)) for p in model.parameters())


def test_two_values_under_a_key_outside_the_prefix_loaded_are_not_refused(
    tmp_path: Path,
) -> None:
    # The clash is in a part of the file the load does not read.
    path = tmp_path / "c.pt"
    model = nn.Linear(2, 2)
    extra = {0: {"step": torch.ones(1)}, "0": {"step": torch.zeros(1)}}
    torch.save({"model": model.state_dict(), "extra": extra}, path)
    target = nn.Linear(2, 2)
    for prefix in ("model", None):
        lm.load_checkpoint(target, path, prefix=prefix)
        assert torch.equal(target.weight, model.weight)
    # nor one at keys the module does not have (both values would be unexpected)
    torch.save({**model.state_dict(), "extra": extra}, path)
    report = lm.load_checkpoint(target, path, strict=False)
    assert report.unexpected == ["extra.0.step"]
    # a clash at a key the module fills is refused under a prefix too
    listed = {0: torch.ones(2), "0": torch.zeros(2), "1": torch.ones(2)}
    torch.save({"model": listed}, path)
    params = nn.ParameterList([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))])
    with pytest.raises(lm.MetaTensorError, match=r"two values under the keys \['model.0'\]"):
        lm.load_checkpoint(params, path, prefix="model")


def test_two_values_in_a_shard_of_an_index_are_judged_as_in_one_file(tmp_path: Path) -> None:
    # Before: any clash in a torch shard was refused, where the same content in one
    # file loaded when the clash lay outside what the load fills.
    model = nn.Linear(2, 2)
    shard = {"model." + k: v for k, v in model.state_dict().items()}
    shard["aux"] = {0: torch.ones(1), "0": torch.zeros(1)}
    torch.save(shard, tmp_path / "pytorch_model-00001-of-00001.bin")
    keys = ["model.weight", "model.bias", "aux.0"]
    weight_map = dict.fromkeys(keys, "pytorch_model-00001-of-00001.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    target = nn.Linear(2, 2)
    lm.load_checkpoint(target, tmp_path / "pytorch_model.bin.index.json", prefix="model")
    assert torch.equal(target.weight, model.weight)


def test_int_keys_alone_load_by_their_string(tmp_path: Path) -> None:
    # eager load_state_dict raises AttributeError on any int key; ours loads them
    # by str(key) and says so in the report, as before
    torch.save({0: torch.ones(2), 1: torch.full((2,), 2.0)}, tmp_path / "c.pt")
    model = nn.ParameterList([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))])
    report = lm.load_checkpoint(model, tmp_path / "c.pt")
    assert report.loaded == ["0", "1"]
    assert torch.equal(model[1], torch.full((2,), 2.0))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)


@pytest.mark.parametrize("saved_under", ["", "model.", "model.net."])
def test_a_prefix_matching_no_key_is_told_only_the_prefixes_that_load(
    saved_under: str, tmp_path: Path
) -> None:
    # Before: the keys' first dotted parts were offered ('lin.' for a file saved from
    # the module itself), and loading with them failed.
    path = tmp_path / "net.pt"
    torch.save({saved_under + k: v for k, v in _Net().state_dict().items()}, path)
    with torch.device("meta"):
        model = _Net()
    with pytest.raises(lm.ArgumentValueError, match="matches no checkpoint key") as info:
        lm.load_checkpoint(model, path, prefix="nope.")
    fix = str(info.value).split("Fix: ")[1]
    offered = [saved_under] if saved_under else []
    assert ("pass one of " + repr(offered)) in fix if offered else "pass prefix=''" in fix
    assert "'lin.'" not in fix and "'model.'" not in fix.replace(repr(offered), "")
    lm.load_checkpoint(model, path, prefix=saved_under)  # the fix it names loads
    assert not model.lin.weight.is_meta


def test_a_json_file_that_is_no_index_is_named_so_not_damaged(tmp_path: Path) -> None:
    # Before: "the index 'config.json' has no 'weight_map' ... Fix: save it again or
    # download it again; the file on disk is incomplete or damaged".
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(lm.MetaTensorError, match=r"not a checkpoint index") as info:
        lm.load_checkpoint(_Net(), tmp_path / "config.json")
    assert "damaged" not in str(info.value)


class _Renamed(nn.Module):
    """Reads a legacy key through a load pre-hook, as libraries do for renamed weights."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.b = nn.Parameter(torch.zeros(1))
        self.register_load_state_dict_pre_hook(self._rename)

    @staticmethod
    def _rename(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "old.w" in state:
            state[prefix + "w"] = state.pop(prefix + "old.w")


def test_a_clash_at_a_key_the_modules_load_code_reads_is_refused(tmp_path: Path) -> None:
    # Judged by the module's names alone, the clash at 'old.w' passed and its first
    # value was loaded.
    path = tmp_path / "c.pt"
    state = {"b": torch.ones(1), "old": {"w": torch.ones(1)}, "old.w": torch.full((1,), 2.0)}
    torch.save(state, path)
    model = _Renamed()
    with pytest.raises(lm.MetaTensorError, match=r"two values under the keys \['old.w'\]"):
        lm.load_checkpoint(model, path, strict=False)
    assert torch.equal(model.w, torch.zeros(1))


def test_a_clash_in_a_shard_names_the_shard(tmp_path: Path) -> None:
    shard = "pytorch_model-00002-of-00002.bin"
    torch.save({"weight": torch.ones(2, 2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"bias": {0: torch.ones(2)}, "bias.0": torch.zeros(2)}, tmp_path / shard)
    weight_map = {"weight": "pytorch_model-00001-of-00002.bin", "bias.0": shard}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = nn.Module()
    model.register_parameter("weight", nn.Parameter(torch.zeros(2, 2)))
    model.register_module("bias", nn.ParameterList([nn.Parameter(torch.zeros(2))]))
    with pytest.raises(lm.MetaTensorError, match="holds two values") as info:
        lm.load_checkpoint(model, tmp_path / "pytorch_model.bin.index.json")
    assert info.value.paths == (str(tmp_path / shard),)


def test_clashes_in_two_shards_name_one_shard_with_its_own_keys(tmp_path: Path) -> None:
    # Before, every clashing key was listed under the first shard's name, those of
    # the other shard included.
    first, second = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    torch.save({"weight": {0: torch.ones(2)}, "weight.0": torch.zeros(2)}, tmp_path / first)
    torch.save({"bias": {0: torch.ones(2)}, "bias.0": torch.zeros(2)}, tmp_path / second)
    weight_map = {"weight.0": first, "bias.0": second}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = nn.Module()
    model.register_module("weight", nn.ParameterList([nn.Parameter(torch.zeros(2))]))
    model.register_module("bias", nn.ParameterList([nn.Parameter(torch.zeros(2))]))
    with pytest.raises(lm.MetaTensorError, match="holds two values") as info:
        lm.load_checkpoint(model, tmp_path / "pytorch_model.bin.index.json")
    (named,) = info.value.paths
    keys = {str(tmp_path / first): "weight.0", str(tmp_path / second): "bias.0"}
    assert f"the keys [{keys[named]!r}]" in str(info.value)
