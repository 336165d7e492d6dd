"""Checkpoint loading under a hostile review (seventeenth round): a module's load code that
converts an older saved layout, chosen by the version the file saved the module with
(``local_metadata["version"]``, as ``nn.BatchNorm`` and many libraries do)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import MetaTensorError


class _Versioned(nn.Module):
    """A weight whose saved layout changed at version 2; :meth:`convert` reads version 1's."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: Any, *args: Any
    ) -> None:
        version = local_metadata.get("version")
        if version is not None and version < 2:
            self.convert(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def convert(self, state_dict: Any, prefix: str) -> None:
        raise NotImplementedError


class _Renamed(_Versioned):
    """Version 1 saved its weight as ``w``."""

    def convert(self, state_dict: Any, prefix: str) -> None:
        if prefix + "w" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "w")


class _Rescaled(_Versioned):
    """Version 1 saved its weight halved."""

    def convert(self, state_dict: Any, prefix: str) -> None:
        if prefix + "weight" in state_dict:
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"] * 2


class _Holder(nn.Module):
    def __init__(self, inner: type[nn.Module]) -> None:
        super().__init__()
        self.inner = inner()


def _old_file(path: Path, key: str, version: int) -> torch.Tensor:
    value = torch.arange(12.0).reshape(3, 4)
    state: Any = {key: value.clone()}
    from collections import OrderedDict

    state = OrderedDict(state)
    state._metadata = OrderedDict({"": {"version": 1}, "inner": {"version": version}})
    torch.save(state, path)
    return value


def test_a_rename_by_the_saved_version_loads_as_in_eager(tmp_path: Path) -> None:
    # Before, the trace ran the load code with the module's own version (2): the rename did
    # not run and the load was refused with "weight" missing, where eager loads the file.
    path = tmp_path / "old.pt"
    _old_file(path, "inner.w", 1)
    eager = _Holder(_Renamed)
    eager.load_state_dict(torch.load(path))
    model = lm.deferred_init(_Holder, _Renamed)
    lm.load_checkpoint(model, path)
    assert torch.equal(model.inner.weight, eager.inner.weight)


def test_a_value_converted_by_the_saved_version_is_never_loaded_unconverted(tmp_path: Path) -> None:
    # Before, the trace saw version 2, skipped the doubling and loaded the halved values:
    # every weight half of eager's, without an error.
    path = tmp_path / "old.pt"
    _old_file(path, "inner.weight", 1)
    eager = _Holder(_Rescaled)
    eager.load_state_dict(torch.load(path))
    model = lm.deferred_init(_Holder, _Rescaled)
    with pytest.raises(MetaTensorError, match=r"fills \['inner.weight'\] with values it computes"):
        lm.load_checkpoint(model, path)
    assert model.inner.weight.is_meta
    lm.materialize(model)
    model.load_state_dict(torch.load(path))  # the fix the message names
    assert torch.equal(model.inner.weight, eager.inner.weight)


@pytest.mark.parametrize("cls", [_Renamed, _Rescaled])
def test_a_file_saved_with_the_current_version_loads_as_saved(
    tmp_path: Path, cls: type[nn.Module]
) -> None:
    # Control: the same code with a current file converts nothing.
    path = tmp_path / "new.pt"
    value = _old_file(path, "inner.weight", 2)
    model = lm.deferred_init(_Holder, cls)
    lm.load_checkpoint(model, path)
    assert torch.equal(model.inner.weight, value)


def test_a_file_without_versions_gives_the_load_code_none(tmp_path: Path) -> None:
    # safetensors keeps no _metadata: eager's load code sees no version and converts nothing.
    path = tmp_path / "w.safetensors"
    value = torch.arange(12.0).reshape(3, 4)
    safetensors.torch.save_file({"inner.weight": value}, path)
    eager = _Holder(_Rescaled)
    eager.load_state_dict(safetensors.torch.load_file(path))
    model = lm.deferred_init(_Holder, _Rescaled)
    lm.load_checkpoint(model, path)
    assert torch.equal(model.inner.weight, eager.inner.weight)
    assert torch.equal(model.inner.weight, value)


def test_a_submodule_loaded_alone_reads_its_own_saved_version(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    _old_file(path, "inner.w", 1)
    eager = _Holder(_Renamed)
    eager.load_state_dict(torch.load(path))
    model = lm.deferred_init(_Holder, _Renamed)
    lm.load_checkpoint(model.inner, path, prefix="inner.")
    assert torch.equal(model.inner.weight, eager.inner.weight)


class _TwoHeads(nn.Module):
    """A checkpoint's ``head.weight`` goes into both heads (a pre-hook fanning one key out)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self._register_load_state_dict_pre_hook(self._fan_out)

    def _fan_out(self, state_dict: Any, prefix: str, *args: Any) -> None:
        if prefix + "head.weight" in state_dict:
            shared = state_dict.pop(prefix + "head.weight")
            state_dict[prefix + "a.weight"] = shared
            state_dict[prefix + "b.weight"] = shared


def test_one_key_copied_into_two_untied_tensors_is_refused(tmp_path: Path) -> None:
    # Before, the plan read the key once into one of them: b kept its own values (or
    # stayed on meta), where eager fills both.
    path = tmp_path / "head.pt"
    torch.save({"head.weight": torch.arange(16.0).reshape(4, 4)}, path)
    eager = _TwoHeads()
    eager.load_state_dict(torch.load(path))
    assert torch.equal(eager.a.weight, eager.b.weight)
    model = lm.deferred_init(_TwoHeads)
    with pytest.raises(
        MetaTensorError,
        match=r"copies one checkpoint tensor into several .*'head.weight' into \['a.weight', 'b.weight'\]",
    ):
        lm.load_checkpoint(model, path)
    assert model.a.weight.is_meta and model.b.weight.is_meta
    lm.materialize(model)
    model.load_state_dict(torch.load(path))
    assert torch.equal(model.b.weight, eager.b.weight)


class _TiedHeads(_TwoHeads):
    def __init__(self) -> None:
        super().__init__()
        self.b.weight = self.a.weight


def test_one_key_copied_into_a_tied_weight_under_both_names_loads(tmp_path: Path) -> None:
    # Control: the two names are one tensor, filled once.
    path = tmp_path / "head.pt"
    value = torch.arange(16.0).reshape(4, 4)
    torch.save({"head.weight": value}, path)
    model = lm.deferred_init(_TiedHeads)
    lm.load_checkpoint(model, path)
    assert model.a.weight is model.b.weight
    assert torch.equal(model.a.weight, value)


@pytest.mark.filterwarnings("ignore:`torch.jit.(script|save)` is deprecated:DeprecationWarning")
def test_a_torchscript_archive_is_named_with_a_fix_that_applies(tmp_path: Path) -> None:
    # Before, the refusal asked to trust '__torch__.torch.nn.modules.linear.Linear', a
    # class compiled into the archive that no import can give.
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(4, 4)), str(path))
    model = lm.deferred_init(nn.Linear, 4, 4)
    with pytest.raises(MetaTensorError, match=r"is a TorchScript archive.*torch\.jit\.load") as err:
        lm.load_checkpoint(model, path)
    assert "safe_globals" not in str(err.value)
    assert model.weight.is_meta


class _Swapped(nn.Module):
    """Layout 1, and files that keep no version, stored ``a`` and ``b`` swapped (as
    ``nn.BatchNorm`` takes a missing version for the old layout)."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3))
        self.b = nn.Parameter(torch.zeros(3))

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: Any, *args: Any
    ) -> None:
        version = local_metadata.get("version")
        if (version is None or version < 2) and prefix + "a" in state_dict:
            state_dict[prefix + "a"], state_dict[prefix + "b"] = (
                state_dict[prefix + "b"],
                state_dict[prefix + "a"],
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = _Swapped()


@pytest.mark.parametrize("prefix", [None, "model."])
@pytest.mark.parametrize("saver", ["fabric", "torch"])
def test_the_versions_of_a_state_dict_nested_in_the_file_reach_the_load_code(
    tmp_path: Path, saver: str, prefix: str | None
) -> None:
    # {"model": model.state_dict(), ...} (fabric.save, a training script's checkpoint): the
    # model's versions sit on the nested dict. Before, only the file's top level was read,
    # the load code saw no version and swapped a current file's weights, without an error.
    source = _Gated()
    with torch.no_grad():
        source.gate.a.fill_(1.0)
        source.gate.b.fill_(2.0)
    path = tmp_path / "nested.ckpt"
    if saver == "fabric":
        from lightning.fabric import Fabric

        Fabric(accelerator="cpu", devices=1).save(path, {"model": source, "step": 7})
    else:
        torch.save({"model": source.state_dict(), "step": 7}, path)
    eager = _Gated()
    eager.load_state_dict(torch.load(path)["model"])
    assert eager.gate.a.tolist() == [1.0, 1.0, 1.0]
    model = lm.deferred_init(_Gated)
    lm.load_checkpoint(model, path, prefix=prefix)
    assert torch.equal(model.gate.a, eager.gate.a)
    assert torch.equal(model.gate.b, eager.gate.b)


class _Hooked(nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 4)
        self.register_load_state_dict_pre_hook(lambda *args, **kwargs: None)


class _NormBeside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.lin = _Hooked()


@pytest.mark.parametrize("init", ["deferred", "meta", "real"])
@pytest.mark.parametrize("fmt", ["safetensors", "plain dict"])
def test_a_norm_layer_beside_load_code_fills_its_counter_as_in_eager(
    tmp_path: Path, init: str, fmt: str, recwarn: pytest.WarningsRecorder
) -> None:
    # A file keeping no versions and no num_batches_tracked (older torchvision weights): the
    # norm layer's own load code puts its counter in, which the trace took for a value it
    # computes, and refused the load that eager makes. No warning of the trace comes out.
    state = {k: v for k, v in _NormBeside().state_dict().items() if "num_batches" not in k}
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(dict(state), path)
    eager = _NormBeside()
    eager.bn.num_batches_tracked.fill_(5)
    eager.load_state_dict(
        safetensors.torch.load_file(path) if fmt == "safetensors" else torch.load(path)
    )
    if init == "deferred":
        model = lm.deferred_init(_NormBeside)
    elif init == "meta":
        model = _NormBeside().to("meta")
    else:
        model = _NormBeside()
        model.bn.num_batches_tracked.fill_(5)
    report = lm.load_checkpoint(model, path)
    assert report.missing == []
    assert torch.equal(model.bn.running_var, eager.bn.running_var)
    # eager keeps a real counter as it is, and puts 0 where it is on meta
    assert model.bn.num_batches_tracked.item() == (5 if init == "real" else 0)
    assert [str(w.message) for w in recwarn] == []


def test_an_old_version_nested_in_the_file_is_converted_as_in_eager(tmp_path: Path) -> None:
    from collections import OrderedDict

    state: Any = OrderedDict({"gate.a": torch.full((3,), 1.0), "gate.b": torch.full((3,), 2.0)})
    state._metadata = OrderedDict({"": {"version": 1}, "gate": {"version": 1}})
    path = tmp_path / "nested.pt"
    torch.save({"model": state, "epoch": 3}, path)
    eager = _Gated()
    eager.load_state_dict(torch.load(path)["model"])
    assert eager.gate.a.tolist() == [2.0, 2.0, 2.0]
    model = lm.deferred_init(_Gated)
    lm.load_checkpoint(model, path)
    assert torch.equal(model.gate.a, eager.gate.a)
    assert torch.equal(model.gate.b, eager.gate.b)


class _CounterFromHook(nn.Module):
    """A converter from an older format that kept the counter elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.register_load_state_dict_pre_hook(self._counter)

    @staticmethod
    def _counter(module: nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
        if prefix + "bn.num_batches_tracked" not in state_dict:
            state_dict[prefix + "bn.num_batches_tracked"] = torch.tensor(500)


def test_a_counter_load_code_computes_is_refused_not_taken_for_the_norm_layers(
    tmp_path: Path,
) -> None:
    # Guard: a first version of the fix above let any value into a missing counter
    # through as the norm layer's own, and the plan put 0 where eager loads 500.
    state = {k: v for k, v in _CounterFromHook().state_dict().items() if "num_batches" not in k}
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(state, path)
    eager = _CounterFromHook()
    eager.load_state_dict(safetensors.torch.load_file(path))
    assert eager.bn.num_batches_tracked.item() == 500
    model = lm.deferred_init(_CounterFromHook)
    with pytest.raises(MetaTensorError, match=r"fills \['bn.num_batches_tracked'\] with values"):
        lm.load_checkpoint(model, path)
