"""materialize: order, dtype, copies, no-ops, helpers and every MaterializationError."""

from __future__ import annotations

import copy
import gc
import pickle
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_deferred import assert_same_as_eager, build_deferred, build_eager, tensors
from torch import nn

import lightning_meta as lm
from lightning_meta import (
    MaterializationError,
    MetaTensorError,
    deferred_init,
    is_deferred,
    materialize,
)
from lightning_meta._deferred._handles import deferred_paths, forget, handle_of
from lightning_meta._deferred._materialize import materialize_paths
from lightning_meta._deferred._record import Record
from lightning_meta._slots import HANDLES_ATTR
from support import deferred_models as md


def record_of(module: nn.Module) -> Record:
    for t in tensors(module).values():
        handle = handle_of(t)
        if handle is not None:
            return handle.record
    raise AssertionError("no deferred tensor")


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor object by name, to prove a failed call changed nothing."""
    return dict(tensors(module))


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = tensors(module)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("builder", [md.NanoGPT, md.llama], ids=["nanogpt", "llama"])
def test_per_submodule_in_reversed_order(builder: Callable[[], nn.Module]) -> None:
    eager, after = build_eager(builder)
    module = build_deferred(builder)
    for _, sub in reversed(list(module.named_modules())):
        materialize(sub)
    assert_same_as_eager(eager, module)
    assert torch.equal(torch.rand(4), after)
    assert record_of_released(module)


def record_of_released(module: nn.Module) -> bool:
    return not any(is_deferred(t) for t in tensors(module).values())


def test_one_submodule_then_the_rest() -> None:
    eager, after = build_eager(md.llama)
    module = build_deferred(md.llama)
    layer = module.model.layers[1]  # type: ignore[union-attr,index]
    materialize(layer)
    assert not is_deferred(layer)
    assert is_deferred(module)
    assert module.model.layers[0].mlp.up_proj.weight.is_meta  # type: ignore[union-attr,index]
    materialize(module)
    assert_same_as_eager(eager, module)
    assert torch.equal(torch.rand(4), after)


class _TiedLater(nn.Module):
    """The tie is made by the caller after construction (``model.head.weight = ...``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)


@pytest.mark.parametrize("first", ["emb", "head", "load emb"])
def test_a_tie_made_after_the_block_survives_materializing_one_end_first(
    first: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    eager = _TiedLater()
    eager.head.weight = eager.emb.weight
    after = torch.get_rng_state()
    torch.save(eager.emb.state_dict(), tmp_path / "emb.pt")
    torch.manual_seed(0)
    with deferred_init():
        module = _TiedLater()
    module.head.weight = module.emb.weight
    if first == "load emb":
        lm.load_checkpoint(module.emb, tmp_path / "emb.pt")
    else:
        materialize(getattr(module, first))
    materialize(module)
    assert module.head.weight is module.emb.weight
    assert type(module.head.weight) is nn.Parameter
    assert torch.equal(module.emb.weight, eager.emb.weight)
    assert torch.equal(torch.get_rng_state(), after)


def test_bfloat16_equals_eager_then_cast() -> None:
    eager, _ = build_eager(md.llama)
    module = build_deferred(md.llama)
    materialize(module, dtype=torch.bfloat16)
    assert_same_as_eager(eager.to(torch.bfloat16), module)
    assert module.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # type: ignore[union-attr,index]


def test_non_float_buffers_keep_their_dtype() -> None:
    module = build_deferred(lambda: nn.BatchNorm1d(3))
    materialize(module, dtype=torch.bfloat16)
    assert module.num_batches_tracked.dtype == torch.long  # type: ignore[union-attr]
    assert module.running_mean.dtype == torch.bfloat16  # type: ignore[union-attr]


def test_deepcopy_of_deferred_module_materializes_exactly() -> None:
    eager, after = build_eager(md.NanoGPT)
    module = build_deferred(md.NanoGPT)
    clone = copy.deepcopy(module)
    assert is_deferred(clone)
    assert record_of(clone) is not record_of(module)
    materialize(clone)
    assert is_deferred(module)  # the original is untouched
    assert_same_as_eager(eager, clone)
    assert torch.equal(torch.rand(4), after)
    materialize(module)
    assert_same_as_eager(eager, module)


def test_pickle_of_deferred_module_materializes_exactly() -> None:
    eager, after = build_eager(md.gpt2)
    module = build_deferred(md.gpt2)
    restored = pickle.loads(pickle.dumps(module))
    assert is_deferred(restored)
    materialize(restored)
    assert_same_as_eager(eager, restored)
    assert torch.equal(torch.rand(4), after)


def test_pickle_of_partly_materialized_module() -> None:
    eager, _ = build_eager(md.NanoGPT)
    module = build_deferred(md.NanoGPT)
    materialize(module.transformer.h[1])  # type: ignore[union-attr,index]
    restored = pickle.loads(pickle.dumps(module))
    materialize(restored)
    assert_same_as_eager(eager, restored)


def test_materialize_again_and_real_module_are_no_ops() -> None:
    module = build_deferred(md.Custom)
    materialize(module)
    before = snapshot(module)
    assert materialize(module) is module
    assert_unchanged(module, before)
    real = nn.Linear(2, 2)
    before = snapshot(real)
    materialize(real)
    assert_unchanged(real, before)


def test_record_is_released_once_everything_is_materialized() -> None:
    module = build_deferred(md.NanoGPT)
    record = record_of(module)
    ref = weakref.ref(record)
    materialize(module.lm_head)
    assert not record.released
    materialize(module)
    assert record.released
    assert record.ops == []
    del record
    gc.collect()
    assert ref() is None
    assert HANDLES_ATTR not in vars(module.lm_head) or not vars(module.lm_head)[HANDLES_ATTR]


def test_deferred_names_and_materialize_names_for_loading() -> None:
    eager, _ = build_eager(md.llama)
    module = build_deferred(md.llama)
    names = deferred_paths(module)
    assert "model.rotary_emb.inv_freq" in names
    assert "lm_head.weight" in names
    materialize_paths(module, ["model.rotary_emb.inv_freq"])
    assert torch.equal(module.model.rotary_emb.inv_freq, eager.model.rotary_emb.inv_freq)  # type: ignore[union-attr]
    assert "model.rotary_emb.inv_freq" not in deferred_paths(module)
    assert is_deferred(module.model.norm.weight)  # type: ignore[union-attr]


def test_forget_releases_what_a_loader_filled() -> None:
    module = build_deferred(md.Custom)
    record = record_of(module)
    names = deferred_paths(module)
    for name in names:
        setattr(
            module,
            name,
            nn.Parameter(torch.zeros(1)) if name in {"scale", "frozen"} else torch.zeros(1),
        )
    forget(module, names)
    assert record.released


# -- errors --------------------------------------------------------------------


def test_meta_module_never_deferred_raises_with_paths() -> None:
    with torch.device("meta"):
        module = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    before = snapshot(module)
    with pytest.raises(
        MaterializationError,
        match=r"not built under deferred_init: \['0.bias', '0.weight', '1.bias', '1.weight'\].*fallback='reset_parameters'",
    ):
        materialize(module)
    assert_unchanged(module, before)


def test_reset_parameters_fallback_initialises_everything() -> None:
    torch.manual_seed(0)
    with torch.device("meta"):
        module = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    materialize(module, fallback="reset_parameters")
    assert not any(t.is_meta for t in tensors(module).values())
    assert torch.equal(module[1].weight, torch.ones(2))


def test_reset_parameters_fallback_refuses_modules_without_it() -> None:
    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(2, device="meta"))

    module = nn.Sequential(nn.Linear(2, 2, device="meta"), Raw())
    before = snapshot(module)
    with pytest.raises(
        MaterializationError, match=r"cannot initialise \['1.w'\].*no reset_parameters"
    ):
        materialize(module, fallback="reset_parameters")
    assert_unchanged(module, before)


def test_reset_parameters_fallback_refuses_to_leave_garbage() -> None:
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.empty(2, device="meta"))
            self.b = nn.Parameter(torch.empty(2, device="meta"))

        def reset_parameters(self) -> None:
            nn.init.ones_(self.a)

    module = Partial()
    before = snapshot(module)
    with pytest.raises(MaterializationError, match=r"left \['b'\] uninitialised.*put back on meta"):
        materialize(module, fallback="reset_parameters")
    assert_unchanged(module, before)


def test_item_during_construction_raises_at_record_time() -> None:
    class ReadsData(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))
            self.n = int(self.w.abs().sum().item())

    with pytest.raises(
        MaterializationError,
        match=r"cannot record aten\._local_scalar_dense\.default on 'ReadsData\.w' issued at .*test_materialize\.py:\d+.*needs the values.*random draws.*Fix:",
    ):
        deferred_init(ReadsData)


def test_data_dependent_shape_raises_naming_the_tensor() -> None:
    class Nonzero(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mask", torch.randn(4))
            self.register_buffer("idx", self.mask.nonzero())

    with pytest.raises(
        MaterializationError,
        match=r"aten\.nonzero\.default on 'Nonzero\.mask' issued at .*test_materialize\.py",
    ):
        deferred_init(Nonzero)


def test_op_without_fake_kernel_raises() -> None:
    @torch.library.custom_op("lmtest_deferred::opaque", mutates_args=())
    def opaque(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    class UsesOpaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("y", opaque(torch.ones(2)))

    with pytest.raises(
        MaterializationError,
        match=r"lmtest_deferred\.opaque.*cannot run on a fake tensor.*outside deferred_init",
    ):
        deferred_init(UsesOpaque)


def test_writing_into_captured_real_tensor_raises() -> None:
    outside = torch.zeros(3)

    class Writes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))
            outside.copy_(self.w)

    with pytest.raises(
        MaterializationError,
        match=r"aten\.copy_\.default.*writes into a real tensor captured.*clone",
    ):
        deferred_init(Writes)


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        (lambda t: t.add_(1), r"modified in place since \(version 0 -> 1\)"),
        # .data has its own version counter: the change was replayed silently.
        (lambda t: t.data.add_(1), r"changed since \(through \.data or memory shared with numpy\)"),
    ],
    ids=["in_place", "through_data"],
)
def test_captured_tensor_changed_after_capture_raises(
    change: Callable[[torch.Tensor], object], shown: str
) -> None:
    captured = torch.ones(3)
    module = build_deferred(lambda: md.Custom(captured))
    change(captured)
    before = snapshot(module)
    with pytest.raises(
        MaterializationError,
        match=r"aten\.mul\.Tensor issued at .*deferred_models\.py:\d+ for 'shifted'.*" + shown,
    ):
        materialize(module)
    assert_unchanged(module, before)


def test_deferred_tensor_modified_after_block_raises() -> None:
    module = build_deferred(lambda: nn.Linear(2, 2))
    with torch.no_grad():
        module.weight.mul_(2)  # on meta: not recorded
    before = snapshot(module)
    with pytest.raises(
        MaterializationError,
        match=r"cannot reproduce \['weight'\].*modified in place after the deferred_init block",
    ):
        materialize(module)
    assert_unchanged(module, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": torch.int64}, "expected a floating point torch.dtype"),
        ({"device": "meta"}, "pass a real device"),
        ({"device": "nowhere"}, "device='nowhere'"),
        ({"draw_on": "gpu"}, "expected 'cpu' or 'device'"),
        ({"fallback": "zeros"}, "expected None or 'reset_parameters'"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    module = build_deferred(lambda: nn.Linear(2, 2))
    with pytest.raises(MetaTensorError, match=match):
        materialize(module, **kwargs)  # type: ignore[arg-type]
    assert is_deferred(module)


def test_bad_targets_raise() -> None:
    with pytest.raises(MetaTensorError, match=r"expects an nn\.Module, got Tensor"):
        materialize(torch.ones(2))  # type: ignore[arg-type]
    with pytest.raises(
        MetaTensorError, match=r"expects an nn\.Module or a torch\.Tensor, got list"
    ):
        is_deferred([])  # type: ignore[arg-type]
    with pytest.raises(MetaTensorError, match="got arguments but no callable"):
        deferred_init(None, 3)
    with pytest.raises(MetaTensorError, match="expects a callable"):
        deferred_init(3)  # type: ignore[call-overload]
    module = build_deferred(lambda: nn.Linear(2, 2))
    with deferred_init(), pytest.raises(MetaTensorError, match="after the block ends"):
        materialize(module)
    with pytest.raises(MetaTensorError, match=r"asked for \['nope'\]"):
        materialize_paths(module, ["nope"])


# -- what errors carry -----------------------------------------------------------


def test_recording_error_carries_the_tensor_path() -> None:
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mask", torch.rand(4))

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()
            self.register_buffer("idx", self.inner.mask.nonzero())

    with pytest.raises(MaterializationError, match=r"on 'Outer\.inner\.mask' issued at") as info:
        deferred_init(Outer)
    assert info.value.paths == ("inner.mask",)


def test_recording_error_without_a_tensor_on_a_module_has_no_paths() -> None:
    outside = torch.zeros(3)

    def build() -> nn.Module:
        module = nn.Linear(3, 3)
        outside.copy_(module.bias)
        return module

    with pytest.raises(MaterializationError, match="writes into a real tensor") as info:
        deferred_init(build)
    assert info.value.paths == ()


def test_replay_of_a_modified_capture_carries_the_paths() -> None:
    captured = torch.ones(3)
    module = build_deferred(lambda: md.Custom(captured))
    captured.add_(1)
    with pytest.raises(MaterializationError) as info:
        materialize(module)
    assert info.value.paths == ("shifted",)


def test_op_failing_at_replay_names_the_tensors_it_feeds() -> None:
    @torch.library.custom_op("lmtest_deferred::real_fails", mutates_args=())
    def real_fails(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no real kernel today")

    @real_fails.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("y", real_fails(torch.ones(2)))

    module = deferred_init(Fails)
    with pytest.raises(
        MaterializationError, match=r"could not replay lmtest_deferred\.real_fails.*no real kernel"
    ) as info:
        materialize(module)
    assert info.value.paths == ("y",)


@pytest.mark.parametrize(
    ("kwargs", "kind", "match"),
    [
        ({"draw_on": "gpu"}, ValueError, r"draw_on='gpu'.*Fix: pass draw_on='cpu'"),
        ({"fallback": "zeros"}, ValueError, r"fallback='zeros'.*Fix: leave fallback=None"),
        ({"dtype": "float32"}, TypeError, r"dtype='float32'"),
    ],
)
def test_bad_arguments_are_python_errors_too(
    kwargs: dict[str, object], kind: type[Exception], match: str
) -> None:
    module = build_deferred(lambda: nn.Linear(2, 2))
    with pytest.raises(kind, match=match) as info:
        materialize(module, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, MetaTensorError)
    assert is_deferred(module)


def test_materialize_paths_refuses_a_single_string() -> None:
    module = build_deferred(lambda: nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"names='weight', a single string.*Fix: pass \['weight'\]"):
        materialize_paths(module, "weight")
    assert is_deferred(module.weight)


def test_unknown_names_carry_their_paths() -> None:
    module = build_deferred(lambda: nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"asked for \['nope'\]") as info:
        materialize_paths(module, ["weight", "nope"])
    assert isinstance(info.value, MetaTensorError)
    assert info.value.paths == ("nope",)
    assert is_deferred(module.weight)


def _aten_calls(fn: Callable[[], object]) -> list[str]:
    """Return the names of the ATen ops ``fn`` runs on the CPU (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


class Reinitialised(nn.Module):
    """nn.Linear draws kaiming_uniform_, then the model overwrites both tensors whole."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        nn.init.normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)


def test_materialize_skips_draws_overwritten_whole_later() -> None:
    # Each replayed draw starts from the generator state recorded for it, so the
    # kaiming_uniform_ draws that eager construction throws away are not replayed
    # (they were, when an in-place op counted as making the tensor it returns).
    eager, after = build_eager(Reinitialised)
    module = build_deferred(Reinitialised)
    calls = _aten_calls(lambda: materialize(module))
    assert "aten::uniform_" not in calls and calls.count("aten::normal_") == 1
    assert_same_as_eager(eager, module)
    assert torch.equal(torch.rand(4), after)  # the generator stands where eager left it


class DetachedTable(nn.Module):
    """A buffer that is a view of t, next to a buffer that is t.detach()."""

    def __init__(self) -> None:
        super().__init__()
        t = torch.randn(4, 4)
        self.register_buffer("row", t[1])
        self.register_buffer("table", t.detach())


def test_a_detached_tensor_stays_apart_from_views_of_its_source() -> None:
    # Replay once let t itself stand for t.detach(): the view then had the
    # table as its autograd base, and requires_grad set on it leaked into it.
    eager, _ = build_eager(DetachedTable)
    module = build_deferred(DetachedTable)
    materialize(module)
    assert_same_as_eager(eager, module)
    for m in (eager, module):
        m.table.requires_grad_(True)
    assert module.row.requires_grad is eager.row.requires_grad is False
    assert module.row.data_ptr() == module.table.data_ptr() + 4 * 4  # still one storage


class SharesWithParameter(nn.Module):
    """A Parameter made from a tensor that is also a buffer and is read after."""

    def __init__(self) -> None:
        super().__init__()
        t = torch.randn(4, 4)
        self.register_buffer("source", t)
        self.weight = nn.Parameter(t)
        self.register_buffer("twice", t * 2)


def test_materialize_keeps_parameter_sharing_storage_with_its_source() -> None:
    eager, _ = build_eager(SharesWithParameter)
    module = build_deferred(SharesWithParameter)
    materialize(module)
    assert_same_as_eager(eager, module)
    assert module.weight.data_ptr() == module.source.data_ptr()  # as in eager
    assert eager.weight.data_ptr() == eager.source.data_ptr()
