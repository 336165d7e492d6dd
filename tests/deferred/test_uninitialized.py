"""Uninitialised memory is an error, never a value (issue #11, item 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import MaterializationError, deferred_init, is_deferred, materialize
from lightning_meta._cli import main
from support import SUPPORT
from support import deferred_models as md
from support import program_models as pm


def test_empty_never_filled_raises_listing_the_paths_and_the_line() -> None:
    module = deferred_init(pm.Empty)
    with pytest.raises(
        MaterializationError,
        match=r"uninitialised .*'halfway' \(aten.empty at .*program_models\.py:\d+\); 'raw' .*"
        r"allow_uninitialized=True",
    ) as info:
        materialize(module)
    assert info.value.paths == ("halfway", "raw")
    assert is_deferred(module.raw) and is_deferred(module.fc.weight)  # nothing changed


def test_a_buffer_filled_piece_by_piece_is_initialised() -> None:
    torch.manual_seed(0)
    eager = pm.Empty()
    torch.manual_seed(0)
    module = deferred_init(pm.Empty)
    lm.materialize(module, allow_uninitialized=True)
    assert torch.equal(module.full, eager.full)
    assert torch.equal(module.fc.weight, eager.fc.weight)
    assert module.raw.shape == (2, 3)


class _Placeholders(torch.nn.Module):
    """Zero-element tensors hold no memory to leave uninitialised."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("cache", torch.empty(0), persistent=False)
        self.register_buffer("rows", torch.empty(0, 4))
        self.extra = torch.nn.ParameterDict({"p": torch.nn.Parameter()})  # torch.empty(0)


def test_zero_element_tensors_are_not_uninitialised() -> None:
    torch.manual_seed(0)
    eager = _Placeholders()
    torch.manual_seed(0)
    module = deferred_init(_Placeholders)
    materialize(module)
    for (name, a), (_, b) in zip(
        eager.state_dict(keep_vars=True).items(),
        module.state_dict(keep_vars=True).items(),
        strict=True,
    ):
        assert torch.equal(a, b) and a.shape == b.shape and type(a) is type(b), name
    assert module.cache.shape == (0,)


def test_a_checkpoint_fills_what_eager_construction_left_uninitialised(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = pm.Empty()
    with torch.no_grad():
        eager.raw.fill_(3.0)
        eager.halfway.fill_(4.0)
    path = tmp_path / "empty.pt"
    torch.save(eager.state_dict(), path)
    torch.manual_seed(0)
    module = deferred_init(pm.Empty)
    lm.load_checkpoint(module, path)
    assert torch.equal(module.raw, torch.full((2, 3), 3.0))
    module = deferred_init(pm.Empty)
    module.load_state_dict(eager.state_dict())
    assert torch.equal(module.halfway, torch.full((4,), 4.0))


def test_a_missing_uninitialised_tensor_is_refused_by_a_partial_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {k: v for k, v in pm.Empty().state_dict().items() if k != "raw"}
    module = deferred_init(pm.Empty)
    with pytest.raises(MaterializationError, match=r"'raw' \(aten.empty"):
        module.load_state_dict(state, strict=False)


def test_an_uninitialised_buffer_in_no_state_dict_loads_with_the_opt_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No checkpoint can hold a non-persistent buffer, and load_checkpoint had
    # no opt-in: such a model could not be loaded at all, and its refusal
    # named the loader's scratch tensor ('t0') and suggested loading it.
    torch.manual_seed(1)
    eager = pm.Cached()
    path = tmp_path / "cached.pt"
    torch.save(eager.state_dict(), path)
    module = deferred_init(pm.Cached)
    with pytest.raises(
        MaterializationError,
        match=r"'block\.cache' \(aten\.empty at .*\['block\.cache'\] are in no state dict.*"
        r"allow_uninitialized=True \(lm\.materialize, lm\.load_checkpoint, lm\.MetaGuard",
    ) as info:
        lm.load_checkpoint(module, path)
    assert info.value.paths == ("block.cache",)
    assert is_deferred(module.block.weight)  # nothing changed
    report = lm.load_checkpoint(module, path, allow_uninitialized=True)
    assert report.replayed == ["block.cache"]
    assert not is_deferred(module)
    assert torch.equal(module.block.weight, eager.block.weight)
    assert module.block.cache.shape == (2, 3)
    assert "cache" not in module.block.state_dict()
    target = f"{SUPPORT / 'program_models.py'}:Cached"
    assert main(["load-check", target, str(path), "--json"]) == 1
    assert main(["load-check", target, str(path), "--json", "--allow-uninitialized"]) == 0
    assert json.loads(capsys.readouterr().out)["replayed"] == ["block.cache"]


def test_a_plain_load_state_dict_names_the_full_path_of_what_it_refuses() -> None:
    # torch calls a load post-hook with the submodule alone: the refusal named
    # 'cache' where the model has 'block.cache' (and a Lightning module
    # 'model.block.cache').
    torch.manual_seed(1)
    state = pm.Cached().state_dict()
    module = deferred_init(pm.Cached)
    with pytest.raises(MaterializationError, match=r"'block\.cache' \(aten\.empty") as info:
        module.load_state_dict(state)
    assert info.value.paths == ("block.cache",)
    outer = nn.Sequential()
    outer.add_module("model", deferred_init(pm.Cached))
    with pytest.raises(MaterializationError) as info:
        outer.load_state_dict({f"model.{k}": v for k, v in state.items()})
    assert info.value.paths == ("model.block.cache",)


class _ListedCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.caches = [torch.empty(1 << 12)]  # in no state dict, never filled


def test_load_checkpoint_refuses_an_uninitialised_tensor_kept_in_a_list(tmp_path: Path) -> None:
    # Container items were replayed after the checkpoint's tensors went in, without
    # the check: the list held whatever memory held (values of a freed tensor).
    path = tmp_path / "listed.pt"
    torch.save(_ListedCache().state_dict(), path)
    module = deferred_init(_ListedCache)
    with pytest.raises(MaterializationError, match=r"'caches\.0' \(aten\.empty") as info:
        lm.load_checkpoint(module, path)
    assert info.value.paths == ("caches.0",)
    assert is_deferred(module.lin.weight) and is_deferred(module.caches[0])  # nothing changed
    report = lm.load_checkpoint(module, path, allow_uninitialized=True)
    assert report.replayed == ["caches.0"]
    assert not is_deferred(module) and module.caches[0].shape == (1 << 12,)


def test_fabric_empty_init_inside_deferred_init_is_refused_then_loaded() -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    eager = md.NanoGPT()
    with fabric.init_module(empty_init=True), deferred_init():
        module = md.NanoGPT()
    with pytest.raises(MaterializationError, match="uninitialised"):
        materialize(module)
    module.load_state_dict(eager.state_dict())
    assert not is_deferred(module)
    assert torch.equal(module.lm_head.weight, eager.lm_head.weight)


def test_refusals_name_the_users_line_past_wrappers() -> None:
    """nn.Parameter(torch.empty(...)) passes through this package's Parameter hook, and the old
    torch.nn.utils.weight_norm through typing_extensions' @deprecated: neither is the user's
    line."""
    import inspect
    import warnings

    class Raw(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.empty(3))

    line = inspect.getsourcelines(Raw.__init__)[1] + 2
    with pytest.raises(MaterializationError, match=rf"test_uninitialized\.py:{line}\)"):
        materialize(deferred_init(Raw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with deferred_init():
            net = torch.nn.utils.weight_norm(torch.nn.Linear(5, 3))
        line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
        with pytest.raises(MaterializationError, match=rf"test_uninitialized\.py:{line}\)"):
            materialize(net)


def _garbage_then_filled() -> torch.Tensor:
    t = torch.zeros(4)
    t[:2] = torch.empty(2) * 2  # garbage lands in two elements ...
    t[:2] = 3.0  # ... and is written over
    return t


def _garbage_copied_and_kept() -> torch.Tensor:
    e = torch.empty(4)
    e[:2] = 1.0
    t = torch.zeros(4)
    t.copy_(e)  # elements 2 and 3 copy uninitialised memory, and stay so
    t[3] = 5.0
    return t


def _circular_pad(source: torch.Tensor) -> torch.Tensor:
    # Copies a corner of its new_empty output before it fills it.
    return torch.nn.functional.pad(source.reshape(1, 1, 3, 3), (1, 1, 2, 1), mode="circular")


@pytest.mark.parametrize(
    "make",
    [
        _garbage_then_filled,
        lambda: _circular_pad(torch.arange(9.0)),
        lambda: _circular_pad(torch.randn(9)),
    ],
    ids=["written-over", "circular-pad-arange", "circular-pad-randn"],
)
def test_garbage_written_over_before_the_block_ends_is_no_garbage(make: object) -> None:
    # The storage kept a garbage flag once garbage landed anywhere in it: a
    # 2-D circular F.pad, fully defined eagerly, was refused as uninitialised.
    class Holds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("b", make())  # type: ignore[operator]

    torch.manual_seed(0)
    eager = Holds()
    torch.manual_seed(0)
    module = deferred_init(Holds)
    materialize(module)
    assert torch.equal(module.b, eager.b) and torch.equal(module.lin.weight, eager.lin.weight)


def test_garbage_copied_and_not_written_over_is_refused() -> None:
    class Holds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("b", _garbage_copied_and_kept())

    module = deferred_init(Holds)
    with pytest.raises(MaterializationError, match=r"uninitialised .*'b' \(aten\.empty at "):
        materialize(module)
    materialize(module, allow_uninitialized=True)
    assert module.b[:2].tolist() == [1.0, 1.0] and module.b[3] == 5.0
