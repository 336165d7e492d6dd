"""deferred_init + materialize give the bits of eager construction, for real models."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_meta import MaterializationError, deferred_init, is_deferred, materialize
from support import deferred_models as md

Builder = Callable[[], nn.Module]


def tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(m.named_parameters(remove_duplicate=False))
    out.update(m.named_buffers(remove_duplicate=False))
    return out


def tie_groups(m: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, t in tensors(m).items():
        groups.setdefault(id(t), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def non_persistent(m: nn.Module) -> set[str]:
    return {
        f"{p}.{n}" if p else n
        for p, mod in m.named_modules()
        for n in mod._non_persistent_buffers_set
    }


def assert_same_as_eager(eager: nn.Module, deferred: nn.Module) -> None:
    """Every tensor bit-identical, same dtype, class, requires_grad, membership and ties."""
    a, b = tensors(eager), tensors(deferred)
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        assert not y.is_meta, name
        assert x.dtype == y.dtype, name
        assert x.device == y.device, name
        assert torch.equal(x, y), name
        assert type(x) is type(y), name
        assert x.requires_grad == y.requires_grad, name
    assert dict(eager.named_parameters()).keys() == dict(deferred.named_parameters()).keys()
    assert dict(eager.named_buffers()).keys() == dict(deferred.named_buffers()).keys()
    assert non_persistent(eager) == non_persistent(deferred)
    assert tie_groups(eager) == tie_groups(deferred)


def build_eager(build: Builder, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    module = build()
    return module, torch.rand(4)  # where the global generator stands afterwards


def build_deferred(build: Builder, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with deferred_init():
        module = build()
    return module


class OutFilled(nn.Module):
    """Tensors from torch.empty filled whole by out= ops; out= and copy_ reading their target."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.empty(4, 4))
        nn.init.eye_(self.proj)  # torch.eye(out=)
        pos = torch.empty(6)
        torch.arange(6, out=pos)
        self.register_buffer("pos", pos)
        acc = torch.randn(4)
        torch.add(acc, 1, out=acc)  # reads what it overwrites
        acc.copy_(acc)
        self.register_buffer("acc", acc)


class OutShrunk(nn.Module):
    """An out= op that resizes its target smaller: a view keeps the rest."""

    def __init__(self) -> None:
        super().__init__()
        c = torch.randn(6)
        keep = c.view(2, 3)
        torch.arange(3.0, out=c)
        self.register_buffer("c", c)
        self.register_buffer("keep", keep)


BUILDERS: dict[str, Builder] = {
    "linear": lambda: nn.Linear(6, 5),
    "conv_bn": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
    "lstm": lambda: nn.LSTM(4, 5, num_layers=2),
    "transformer_encoder": lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2, enable_nested_tensor=False
    ),
    "embedding_padding": lambda: nn.Embedding(10, 4, padding_idx=3),
    "custom": md.Custom,
    "nanogpt": md.NanoGPT,
    "llama": md.llama,
    "gpt2": md.gpt2,
    "bert": md.bert,
    "litgpt_pythia": md.litgpt_pythia,
    # An out= op was not counted as filling torch.empty memory (refused as
    # uninitialised); counted as a whole overwrite, one that also reads its
    # target must not drop the ops before it, nor one that shrinks it
    # (keep[1] came back as garbage).
    "out_filled": OutFilled,
    "out_shrunk": OutShrunk,
}


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    warnings.filterwarnings("ignore", message=".*(enable_nested_tensor|TypedStorage).*")


@pytest.mark.parametrize("name", list(BUILDERS))
def test_materialize_is_bit_identical_to_eager(name: str) -> None:
    build = BUILDERS[name]
    eager, rng_after_eager = build_eager(build)
    module = build_deferred(build)
    assert is_deferred(module)
    assert all(t.is_meta for t in tensors(module).values())
    assert tie_groups(module) == tie_groups(eager)

    assert materialize(module) is module
    assert not is_deferred(module)
    assert_same_as_eager(eager, module)
    # The global generator continues exactly where eager construction left it.
    assert torch.equal(torch.rand(4), rng_after_eager)


def test_embedding_padding_row_is_zero_and_others_random() -> None:
    module = build_deferred(BUILDERS["embedding_padding"])
    materialize(module)
    weight = module.weight  # type: ignore[union-attr]
    assert torch.count_nonzero(weight[3]) == 0
    assert torch.count_nonzero(weight[2]) == 4


def test_llama_norm_and_rotary_buffer_are_right_not_garbage() -> None:
    module = build_deferred(md.llama)
    materialize(module)
    assert torch.equal(module.model.norm.weight, torch.ones(32))  # type: ignore[union-attr]
    inv = module.model.rotary_emb.inv_freq  # type: ignore[union-attr]
    expected = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.int64).float() / 8))
    assert torch.allclose(inv, expected)
    std = module.model.layers[0].self_attn.q_proj.weight.std().item()  # type: ignore[union-attr]
    assert 0.01 < std < 0.03  # the model's own 0.02 init, not kaiming's


def test_deferred_init_with_callable_and_arguments() -> None:
    eager, _ = build_eager(lambda: nn.Linear(3, 2, bias=False))
    torch.manual_seed(0)
    module = deferred_init(nn.Linear, 3, 2, bias=False)
    assert module.weight.is_meta
    assert module.bias is None
    assert_same_as_eager(eager, materialize(module))


def test_real_tensor_captured_from_outside_is_replayed() -> None:
    captured = torch.tensor([1.0, -2.0, 3.5])
    eager, _ = build_eager(lambda: md.Custom(captured))
    module = build_deferred(lambda: md.Custom(captured))
    assert_same_as_eager(eager, materialize(module))


def test_tensor_attribute_and_data_assignment_are_recorded() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(4, 4))
            self.w.data = torch.full((4, 4), 3.0)  # invisible to dispatch
            self.w.data.mul_(2)
            self.table = torch.linspace(0, 1, 5)  # plain attribute, not a buffer

    module = deferred_init(Odd)
    assert module.table.is_meta
    assert is_deferred(module.table)
    materialize(module)
    assert torch.equal(module.w, torch.full((4, 4), 6.0))
    assert isinstance(module.w, nn.Parameter)
    assert torch.equal(module.table, torch.linspace(0, 1, 5))


def test_dtype_conversion_inside_the_block_raises_with_fix() -> None:
    # torch's FakeTensorMode itself cannot swap fake parameters in Module._apply.
    with pytest.raises(MaterializationError, match=r"Module\.to\(\).*pass dtype= .*to materialize"):
        deferred_init(lambda: md.NanoGPT().to(torch.bfloat16))

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4)).half()  # the line named

    line = build.__code__.co_firstlineno + 1
    with pytest.raises(MaterializationError) as info:
        deferred_init(build)
    assert f"converts 'Sequential.0.weight', issued at {__file__}:{line}" in str(info.value)
    assert info.value.paths == ("0.weight",)
    # A conversion that changes nothing: torch 2.13 swaps fake parameters even
    # then, so it is refused (saying so); torch 2.6 leaves them, and the
    # values are eager's.
    if "FakeTensor" in inspect.getsource(nn.Module._apply):  # it swaps fake parameters
        with pytest.raises(MaterializationError, match=r"even for a conversion that changes"):
            deferred_init(lambda: nn.Linear(3, 4).to("cpu"))
    else:
        torch.manual_seed(0)
        eager = nn.Linear(3, 4).to("cpu")
        torch.manual_seed(0)
        assert_same_as_eager(eager, materialize(deferred_init(lambda: nn.Linear(3, 4).to("cpu"))))


def test_reseed_inside_construction_is_reproduced() -> None:
    def build() -> nn.Module:
        first = nn.Linear(3, 3)
        torch.manual_seed(123)
        return nn.Sequential(first, nn.Linear(3, 3))

    eager, after = build_eager(build)
    module = build_deferred(build)
    assert_same_as_eager(eager, materialize(module))
    assert torch.equal(torch.rand(4), after)


def test_explicit_generator_is_replayed_and_advanced() -> None:
    def build(gen: torch.Generator) -> nn.Module:
        m = nn.Linear(4, 4)
        nn.init.normal_(m.weight, generator=gen)
        return m

    gen = torch.Generator().manual_seed(7)
    eager, _ = build_eager(lambda: build(gen))
    after_eager = torch.rand(2, generator=gen)
    gen.manual_seed(7)
    module = build_deferred(lambda: build(gen))
    assert_same_as_eager(eager, materialize(module))
    assert torch.equal(torch.rand(2, generator=gen), after_eager)


def test_consecutive_blocks_continue_the_generator() -> None:
    torch.manual_seed(0)
    a_eager, b_eager = nn.Linear(3, 3), nn.Linear(3, 3)
    after = torch.rand(4)
    torch.manual_seed(0)
    with deferred_init():
        a = nn.Linear(3, 3)
    with deferred_init():
        b = nn.Linear(3, 3)
    materialize(b)  # later block first: it needs the earlier block's end state
    materialize(a)
    assert_same_as_eager(a_eager, a)
    assert_same_as_eager(b_eager, b)
    assert torch.equal(torch.rand(4), after)


def test_reseed_between_blocks_starts_fresh() -> None:
    torch.manual_seed(5)
    eager = nn.Linear(3, 3)
    torch.manual_seed(5)
    with deferred_init():
        nn.Linear(3, 3)
    torch.manual_seed(5)
    with deferred_init():
        module = nn.Linear(3, 3)
    assert_same_as_eager(eager, materialize(module))


def test_nested_blocks_record_once() -> None:
    eager, _ = build_eager(md.NanoGPT)
    torch.manual_seed(0)
    with deferred_init(), deferred_init():
        module = md.NanoGPT()
    assert_same_as_eager(eager, materialize(module))


def test_deferred_construction_holds_one_tensor_of_scratch_not_the_model() -> None:
    # The block runs each initialiser's draws for real, on scratch memory reused from
    # draw to draw (so the generator ends where eager's draws leave it): its peak is
    # one tensor of the model, not the model. This test built a 10 GB nn.Linear
    # before, which drew 10 GB of scratch for 42 s and checked only that it was meta.
    from support.measure import allocator_peak

    def build() -> nn.Module:
        with deferred_init():
            return nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(8)])

    one = 1024 * 1024 * 4
    eager, _ = allocator_peak(lambda: nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]))
    peak, model = allocator_peak(build)
    assert all(p.is_meta for p in model.parameters())
    assert eager >= 8 * one  # the model, eagerly
    assert one <= peak < 2 * one, peak  # one weight's draws, deferred
    torch.manual_seed(0)
    eager_model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(8)])
    torch.manual_seed(0)
    assert_same_as_eager(eager_model, materialize(build()))


def test_draw_on_device_cpu_matches_default() -> None:
    eager, _ = build_eager(md.NanoGPT)
    module = build_deferred(md.NanoGPT)
    assert_same_as_eager(eager, materialize(module, device="cpu", draw_on="device"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_and_draw_on_device() -> None:
    eager, _ = build_eager(md.llama)
    module = build_deferred(md.llama)
    materialize(module, device="cuda")
    assert_same_as_eager(eager.to("cuda"), module)

    torch.manual_seed(0)
    with torch.device("cuda"):
        on_device = md.llama()
    module = build_deferred(md.llama)
    materialize(module, device="cuda", draw_on="device")
    assert_same_as_eager(on_device, module)


def _relaid(change: Callable[[torch.Tensor], object], fill: bool) -> Builder:
    def build() -> nn.Module:
        module = nn.Module()
        buffer = torch.arange(12.0).reshape(3, 4)
        change(buffer)
        if fill:
            buffer.normal_()  # overwrites it whole: replay starts from a stand-in
        module.register_buffer("b", buffer)
        return module

    return build


LAYOUT_CHANGES: dict[str, Callable[[torch.Tensor], object]] = {
    "t_": lambda b: b.t_(),
    "transpose_": lambda b: b.transpose_(0, 1),
    "unsqueeze_": lambda b: b.unsqueeze_(0),
    "as_strided_": lambda b: b.as_strided_((2, 2), (1, 2)),
    "resize_": lambda b: b.resize_(2, 3),
}


@pytest.mark.parametrize("fill", [True, False], ids=["then_filled", "kept"])
@pytest.mark.parametrize("change", sorted(LAYOUT_CHANGES))
def test_layout_changed_in_place_is_replayed_with_the_new_layout(change: str, fill: bool) -> None:
    # An in-place op that changes the layout (t_, resize_) kept the value's old
    # layout in the log: a stand-in of the old shape came back, silently.
    build = _relaid(LAYOUT_CHANGES[change], fill)
    eager, after = build_eager(build)
    module = build_deferred(build)
    materialize(module)
    assert_same_as_eager(eager, module)
    assert module.b.shape == eager.b.shape and module.b.stride() == eager.b.stride()
    assert torch.equal(torch.rand(4), after)


def test_resize_growing_a_tensor_is_uninitialised_memory_unless_filled() -> None:
    def grown(fill: bool) -> nn.Module:
        module = nn.Module()
        buffer = torch.zeros(3)
        buffer.resize_(6)  # three new elements, never written
        if fill:
            buffer[3:].fill_(1.0)
        module.register_buffer("b", buffer)
        return module

    module = build_deferred(lambda: grown(False))
    with pytest.raises(MaterializationError, match=r"'b' \(aten\.resize_ at .*test_deferred"):
        materialize(module)
    eager, _ = build_eager(lambda: grown(True))
    module = build_deferred(lambda: grown(True))
    materialize(module)
    assert_same_as_eager(eager, module)


def test_lazy_modules_are_refused_with_the_fix() -> None:
    # torch's own RuntimeError (about FakeTensor) named neither the module nor the fix.
    with pytest.raises(MaterializationError, match=r"cannot build lazy modules .*Fix: give"):
        with deferred_init():
            nn.Sequential(nn.LazyLinear(4), nn.ReLU())
    with pytest.raises(MaterializationError, match=r"lazy modules"):
        deferred_init(nn.LazyConv2d, 4, 3)
