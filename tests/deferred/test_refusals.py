"""What a block cannot record is the package's error, at record time, naming the op, line and fix.

And what torch's C++ does with the block's tensors without an ATen call
(``torch.from_dlpack``, pickling, ``torch.tensor`` of tensors, tensor
subclasses) is either the eager value or that error; never a crash, a
torch-internal error or a fake tensor handed back.
"""

from __future__ import annotations

import io
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_meta import MaterializationError, MetaTensorError, deferred_init, materialize


class _Buffer(nn.Module):
    def __init__(self, make: object) -> None:
        super().__init__()
        self.register_buffer("value", make())  # type: ignore[operator]


def _pickled_arange() -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(torch.arange(4.0), buffer)  # a model saving a table it computed
    return torch.arange(4.0) + len(pickle.dumps(torch.arange(4.0))) + buffer.tell()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.from_dlpack(torch.arange(4.0)).clone(), id="from_dlpack"),
        pytest.param(_pickled_arange, id="torch.save-and-pickle"),
    ],
)
def test_values_read_through_dlpack_or_pickle_are_eagers(make: object) -> None:
    eager = _Buffer(make)
    with deferred_init():
        module = _Buffer(make)
    materialize(module)
    assert torch.equal(module.value, eager.value)


class _Dlpack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("noise", torch.from_dlpack(torch.randn(4)).clone())


def test_from_dlpack_of_random_values_is_refused_at_record_time() -> None:
    with pytest.raises(MaterializationError, match=r"Tensor.__dlpack__ issued at .*test_refusals"):
        with deferred_init():
            _Dlpack()


class _Loads(nn.Module):
    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.register_buffer("table", pickle.loads(data))


def test_a_tensor_loaded_inside_a_block_is_refused_at_record_time() -> None:
    data = pickle.dumps(torch.arange(4.0))
    assert _Loads(data).table.device.type == "cpu"
    with (
        pytest.raises(
            MaterializationError, match=r"loads a tensor .* Fix: load it before the block"
        ),
        deferred_init(),
    ):
        _Loads(data)


class _FromTensors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rows", torch.tensor([x for x in torch.randn(4)]))


class _MyTensor(torch.Tensor):
    pass


class _Subclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.zeros(3).as_subclass(_MyTensor))


class _Sobol(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.points = nn.Parameter(torch.quasirandom.SobolEngine(3, scramble=True).draw(4))


class _Swapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        torch.utils.swap_tensors(self.a.weight, self.b.weight)


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (_FromTensors, r"read of tensor values by torch's C\+\+ code .* issued at .*test_refusals"),
        (_Subclass, r"making a tensor subclass .* issued at .*test_refusals.*Fix:"),
        # An op without a fake kernel, called by torch's own Python: named, with a fix
        # that applies (the message named torch.tensor() and torch.stack).
        (
            _Sobol,
            r"torch's own code at torch/quasirandom\.py:\d+: "
            r"torch\._sobol_engine_initialize_state_.* issued at .*test_refusals.*"
            r"Fix: build this part of the model outside deferred_init",
        ),
        # torch's "Cannot swap t1 because it has weakref associated with it" came through.
        (_Swapped, r"torch\.utils\.swap_tensors issued at .*test_refusals.*Fix: swap what"),
    ],
    ids=["torch.tensor", "as_subclass", "sobol", "swap_tensors"],
)
def test_what_torch_does_on_fake_data_in_cpp_is_a_materialization_error(
    cls: type[nn.Module], match: str
) -> None:
    cls()  # eager construction works
    with pytest.raises(MaterializationError, match=match), deferred_init():
        cls()


def _dynamic_fp16() -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(
        nn.Sequential(nn.Linear(8, 8)), {nn.Linear}, dtype=torch.float16
    )


def _quantized_linear() -> nn.Module:
    return torch.ao.nn.quantized.Linear(4, 4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao.quantization's own
@pytest.mark.parametrize(
    ("build", "match"),
    [
        # Packed its fake weights into a TorchScript object: materialize
        # gave zeros everywhere in it, and zeros out of forward, silently.
        (_dynamic_fp16, r"quantized\.linear_prepack_fp16.*: it packs tensors of the block into a "),
        # A quantized tensor on meta: torch's dispatcher error came through.
        (_quantized_linear, r"aten\._empty_affine_quantized.*: it cannot run on a fake tensor"),
    ],
    ids=["quantize_dynamic_fp16", "quantized_linear"],
)
def test_quantized_modules_are_refused_at_record_time(build: object, match: str) -> None:
    build()  # type: ignore[operator]  # eager construction works
    with pytest.raises(MaterializationError, match=match + r".*Fix:") as info:
        with deferred_init():
            build()  # type: ignore[operator]
    assert "issued at " + __file__ in str(info.value)
    assert "RegisterCPU" not in str(info.value)  # not the dispatcher's list of backends


class _Decoder(nn.Module):
    def __init__(self, enc: nn.Embedding) -> None:
        super().__init__()
        self.scaled = nn.Parameter(enc.weight.detach() * 2)


def test_a_deferred_tensor_of_another_block_is_refused_at_record_time() -> None:
    with deferred_init():
        enc = nn.Embedding(10, 4)
    with (
        pytest.raises(
            MaterializationError,
            match=r"aten.detach.default issued at .*test_refusals.*another deferred_init block.*"
            r"Fix: build both modules in one deferred_init block, or materialize the first",
        ),
        deferred_init(),
    ):
        _Decoder(enc)


def test_a_deferred_tensor_of_another_block_works_once_materialized() -> None:
    torch.manual_seed(0)
    with deferred_init():
        enc = nn.Embedding(10, 4)
    materialize(enc)
    with deferred_init():
        dec = _Decoder(enc)
    materialize(dec)
    assert torch.equal(dec.scaled, enc.weight * 2)


def _escaped() -> torch.Tensor:
    holder = SimpleNamespace()

    class _Keeps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            holder.t = torch.zeros(3)  # not on a module

    with deferred_init():
        module = _Keeps()
    materialize(module)
    escaped: torch.Tensor = holder.t
    return escaped


@pytest.mark.parametrize(
    "use",
    [
        pytest.param(lambda t: t.to("cpu"), id="to"),
        pytest.param(lambda t: t.cpu(), id="cpu"),
        pytest.param(lambda t: t.float(), id="float"),
        pytest.param(lambda t: t.contiguous(), id="contiguous"),
        pytest.param(lambda t: t.numpy(), id="numpy"),
        pytest.param(lambda t: t.tolist(), id="tolist"),
        pytest.param(lambda t: torch.save(t, io.BytesIO()), id="torch.save"),
        pytest.param(lambda t: pickle.dumps(t), id="pickle"),
        pytest.param(lambda t: t + 1, id="arithmetic"),
    ],
)
def test_any_first_use_of_an_escaped_tensor_raises_naming_where_it_was_made(use: object) -> None:
    t = _escaped()
    with pytest.raises(
        MetaTensorError, match=r"created inside a deferred_init block at .*test_refusals"
    ):
        use(t)  # type: ignore[operator]


class _OldWeightNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.utils.weight_norm(nn.Linear(3, 3))


def test_old_weight_norm_is_refused_naming_its_replacement() -> None:
    with deferred_init():
        module = _OldWeightNorm()
    with pytest.raises(
        MaterializationError, match=r"Fix for \['lin.weight'\].*parametrizations.weight_norm"
    ):
        materialize(module)


class _Pruned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.keep = nn.Linear(4, 2)
        nn.utils.prune.l1_unstructured(self.lin, "weight", amount=0.5)


def test_prune_in_the_block_is_refused_naming_the_way_out() -> None:
    # The fix named was for tensors computed in construction code ("compute
    # it in forward"), which prune's hook is not.
    with deferred_init():
        module = _Pruned()
    with pytest.raises(
        MaterializationError,
        match=r"Fix for \['lin.weight'\]: made by the forward pre-hook of "
        r"torch.nn.utils.prune.*apply it after materialize",
    ):
        materialize(module)
    # What the message says works, and gives eager's values.
    torch.manual_seed(0)
    eager = _Pruned()
    torch.manual_seed(0)
    with deferred_init():
        lin, keep = nn.Linear(6, 4), nn.Linear(4, 2)
    materialize(lin)
    materialize(keep)
    nn.utils.prune.l1_unstructured(lin, "weight", amount=0.5)
    assert torch.equal(lin.weight, eager.lin.weight) and torch.equal(keep.weight, eager.keep.weight)


class _Orthogonal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))


def test_orthogonal_is_refused_naming_the_way_out() -> None:
    with (
        pytest.raises(
            MaterializationError, match=r"Fix: register the parametrization .* after materialize"
        ),
        deferred_init(),
    ):
        _Orthogonal()
