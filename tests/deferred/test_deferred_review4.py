"""Fourth hostile review of deferred_init / materialize: numpy, inference mode, layouts, rrelu.

Each test was a silent wrong value, a raw torch error or a refusal where
eager works before:

- ``.numpy()`` / ``np.asarray`` of a real tensor captured from outside the
  block returned an array over a fake tensor's uninitialised memory, and a
  write through it was lost;
- a write through ``.numpy()`` of a tensor made in the block (a positional
  table filled through its array) was lost; an array kept on the module
  (alive when the block ends) was refused, and comparing it with what was
  logged on every op cost a pass over it per op;
- a block under ``torch.inference_mode()`` (or one entered in ``__init__``)
  raised torch's "Inference tensors do not track version counter";
- sparse, nested and per-channel quantized tensors made in a block raised
  raw torch errors (``NotImplementedError``, ``UnsupportedOperatorException``);
- a buffer computed with ``F.rrelu(..., training=True)`` was refused as
  uninitialised memory (its noise buffer, which rrelu draws over).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from test_deferred import assert_same_as_eager
from torch import nn

from lightning_meta import MaterializationError, deferred_init, materialize

np = pytest.importorskip("numpy")


class _WeightedLoss(nn.Module):
    def __init__(self, class_counts: torch.Tensor) -> None:
        super().__init__()
        counts = np.asarray(class_counts)
        self.register_buffer("w", torch.from_numpy(counts.sum() / counts).float())
        self.head = nn.Linear(4, 4)


def test_class_weights_read_through_numpy_from_a_real_tensor_are_eagers() -> None:
    counts = torch.tensor([10.0, 30.0, 60.0, 100.0])
    torch.manual_seed(0)
    eager = _WeightedLoss(counts)
    torch.manual_seed(0)
    with deferred_init():
        module = _WeightedLoss(counts)
    materialize(module)
    assert_same_as_eager(eager, module)


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.numpy().tolist(),
        lambda t: np.asarray(t).tolist(),
        lambda t: t.numpy(force=True).tolist(),
        lambda t: t.cpu().numpy().tolist(),
        lambda t: t.T.numpy().tolist(),
        lambda t: float(t.numpy().mean()),
    ],
    ids=["numpy", "asarray", "force", "cpu", "T", "mean"],
)
def test_reading_a_real_tensor_through_numpy_in_a_block_gives_its_values(
    read: Callable[[torch.Tensor], object],
) -> None:
    stats = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    with deferred_init():
        got = read(stats)
        kept = nn.Linear(2, 2)
        kept.register_buffer("s", stats.clone())
    assert got == read(stats)
    materialize(kept)
    assert torch.equal(kept.s, stats)


def test_a_write_through_numpy_into_a_real_tensor_in_a_block_reaches_it_as_eagerly() -> None:
    w = torch.zeros(3)
    with deferred_init():
        w.numpy()[0] = 5.0
        module = nn.Module()
        module.register_buffer("b", w * 2)
    materialize(module)
    assert w.tolist() == [5.0, 0.0, 0.0]
    assert module.b.tolist() == [10.0, 0.0, 0.0]


@pytest.mark.parametrize("numpy_first", [True, False], ids=["numpy-first", "captured-first"])
def test_a_large_captured_tensor_written_through_numpy_in_the_block_is_refused(
    numpy_first: bool,
) -> None:
    big = torch.zeros(1 << 19)  # 2 MiB: above the size captured tensors are copied at
    with deferred_init():
        module = nn.Module()
        if numpy_first:
            array = big.numpy()
            module.register_buffer("b", big * 2)
        else:
            module.register_buffer("b", big * 2)
            array = big.numpy()
        array[0] = 5.0  # eager: b was computed before this write
        del array
    with pytest.raises(MaterializationError, match="memory shared with numpy") as info:
        materialize(module)
    assert list(info.value.paths) == ["b"]


class _SinusoidalTable(nn.Module):
    """A positional table filled through the numpy array of its tensor."""

    def __init__(self, n: int = 6, d: int = 4, then: str = "") -> None:
        super().__init__()
        pe = torch.zeros(n, d)
        arr = pe.numpy()
        pos = np.arange(n)[:, None]
        freq = 10000 ** (np.arange(0, d, 2) / d)
        arr[:, 0::2] = np.sin(pos / freq)
        if then == "torch":
            pe[0] += 1.0  # eager: the array sees this write
        arr[:, 1::2] = np.cos(pos / freq)
        if then == "view":
            del arr
            np.asarray(pe[1:3])[:] *= 2.0
        elif then == "two arrays":
            np.asarray(pe[1:3])[:] *= 2.0  # eager: arr sees this write
        self.register_buffer("pe", pe)
        self.proj = nn.Linear(d, d)
        self.register_buffer("scaled", pe * 3.0)


@pytest.mark.parametrize("then", ["", "view"], ids=["table", "then-a-view"])
def test_a_table_filled_through_its_numpy_array_is_eagers(then: str) -> None:
    torch.manual_seed(0)
    eager = _SinusoidalTable(then=then)
    after = torch.rand(2)
    torch.manual_seed(0)
    with deferred_init():
        module = _SinusoidalTable(then=then)
    materialize(module)
    assert_same_as_eager(eager, module)
    assert torch.equal(torch.rand(2), after)


def test_a_write_through_numpy_just_before_the_block_ends_is_kept() -> None:
    with deferred_init():
        module = nn.Module()
        module.register_buffer("b", torch.zeros(3))
        module.b.numpy()[1] = 7.0
    materialize(module)
    assert module.b.tolist() == [0.0, 7.0, 0.0]


@pytest.mark.parametrize(
    ("then", "refused"),
    [
        ("torch", r"aten\.add_.*still alive.*Fix: make the torch writes before"),
        ("two arrays", r"Tensor\.numpy.*still alive.*Fix: index the first array"),
    ],
    ids=["torch-write", "two-arrays"],
)
def test_a_write_the_numpy_array_would_see_eagerly_is_refused_naming_the_array(
    then: str, refused: str
) -> None:
    _SinusoidalTable(then=then)  # eager works
    with pytest.raises(MaterializationError, match=refused):
        with deferred_init():
            _SinusoidalTable(then=then)


class _KeepsItsArray(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("b", torch.arange(4.0))
        self.table = self.b.numpy()  # eager: shares b's memory for the module's life
        self.table[0] = -1.0
        self.register_buffer("twice", self.b * 2)


def _writes_through_table(module: _KeepsItsArray) -> None:
    module.table[1] = 10.0


@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["own-dtype", "cast"])
def test_a_numpy_array_kept_on_the_module_shares_its_tensors_memory_as_eagerly(
    dtype: torch.dtype | None,
) -> None:
    eager = _KeepsItsArray()
    with deferred_init():
        module = _KeepsItsArray()
    _writes_through_table(eager)  # after the block, before materialize: eager's b sees it
    _writes_through_table(module)
    materialize(module, dtype=dtype)
    if dtype is not None:
        eager.to(dtype)
    assert_same_as_eager(eager, module)
    # Later writes through either reach the other as in eager (a cast buffer is a copy).
    for m in (eager, module):
        m.table[2] = 20.0
        m.b.add_(1.0)
    assert_same_as_eager(eager, module)
    assert module.table.tolist() == eager.table.tolist()
    assert np.shares_memory(module.table, module.b.numpy()) is (dtype is None)


class _KeepsARow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("b", torch.zeros(2, 3))
        self.rows = [self.b[0].numpy()]  # eager: shares a part of b's memory


def test_an_array_of_part_of_a_tensor_kept_past_the_block_is_refused_at_materialize() -> None:
    with deferred_init():
        module = _KeepsARow()
    with pytest.raises(MaterializationError, match=r"for a part of it.*still alive.*Fix") as info:
        materialize(module)
    assert list(info.value.paths) == ["b"]
    module.rows[0][1] = 3.0  # eager's b would hold this write
    module.rows.clear()
    with pytest.raises(MaterializationError, match=r"written after the block") as info:
        materialize(module)
    assert list(info.value.paths) == ["b"]
    with deferred_init():
        module = _KeepsARow()
    module.rows.clear()  # let go unwritten: nothing to share
    materialize(module)
    assert_same_as_eager(_KeepsARow(), module)


class _TableThenLayers(nn.Module):
    def __init__(self, keep: bool) -> None:
        super().__init__()
        pe = torch.zeros(4096, 1024)
        arr = pe.numpy()
        arr[:, 0::2] = np.sin(np.arange(4096)[:, None] / 100.0)
        if not keep:
            del arr
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(48))
        self.register_buffer("pe", pe)


def test_an_array_alive_while_layers_are_built_gives_eagers_model() -> None:
    # Its cost (a pass over the array per op before) is measured outside the suite:
    # speed is never a timed assertion here.
    torch.manual_seed(0)
    eager = _TableThenLayers(keep=True)
    torch.manual_seed(0)
    with deferred_init():
        module = _TableThenLayers(keep=True)
    materialize(module)
    assert_same_as_eager(eager, module)


def _built_in_inference_mode() -> nn.Module:
    with torch.inference_mode():
        return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))


def test_a_block_under_inference_mode_is_refused_at_entry_leaving_nothing_behind() -> None:
    with torch.inference_mode():
        nn.Linear(3, 3)  # eager works
        with pytest.raises(MaterializationError, match=r"under torch\.inference_mode\(\).*Fix"):
            deferred_init(nn.Linear, 3, 3)
    torch.manual_seed(1)
    eager = nn.Linear(3, 3)
    torch.manual_seed(1)
    module = deferred_init(nn.Linear, 3, 3)
    materialize(module)
    assert_same_as_eager(eager, module)


def test_inference_mode_entered_inside_the_block_is_refused_naming_the_op() -> None:
    _built_in_inference_mode()  # eager works
    with pytest.raises(
        MaterializationError, match=r"aten\.empty.*inference_mode\(\) entered inside the block"
    ):
        deferred_init(_built_in_inference_mode)


def test_a_block_inside_inference_mode_false_is_exact() -> None:
    torch.manual_seed(0)
    eager = nn.BatchNorm1d(3)
    torch.manual_seed(0)
    with torch.inference_mode(), torch.inference_mode(False):
        module = deferred_init(nn.BatchNorm1d, 3)
    materialize(module)
    assert_same_as_eager(eager, module)


_LAYOUTS = {
    "sparse_coo": (
        lambda: torch.sparse_coo_tensor(torch.tensor([[0, 1], [2, 0]]), torch.randn(2), (2, 3)),
        r"aten\._sparse_coo_tensor_with_dims_and_tensors\.default.*torch\.sparse_coo tensor",
    ),
    "sparse_csr": (
        lambda: torch.randn(3, 3).to_sparse_csr(),
        r"aten\._to_sparse_csr\.default.*torch\.sparse_csr tensor",
    ),
    "nested": (
        lambda: torch.nested.nested_tensor([torch.ones(2), torch.randn(3)]),
        r"aten\._nested_tensor_from_tensor_list\.default.*cannot run on a fake tensor",
    ),
    "quantized_per_channel": (
        lambda: torch.quantize_per_channel(
            torch.randn(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), 0, torch.qint8
        ),
        r"aten\.quantize_per_channel\.default.*cannot run on a fake tensor",
    ),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", list(_LAYOUTS))
def test_a_tensor_the_record_cannot_hold_is_refused_naming_the_op_and_the_fix(kind: str) -> None:
    make, op = _LAYOUTS[kind]

    class _Holds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("x", make())

    torch.manual_seed(0)
    _Holds()  # eager works
    after = torch.get_rng_state()
    torch.manual_seed(0)
    with pytest.raises(MaterializationError, match=r"cannot record " + op + r".*Fix: build this"):
        deferred_init(_Holds)
    if kind != "quantized_per_channel":  # its draw comes after the op refused
        assert torch.equal(torch.get_rng_state(), after)


class _RReLUNoise(nn.Module):
    def __init__(self, training: bool, inplace: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        x = torch.linspace(-2.0, 2.0, 10)
        self.register_buffer("r", F.rrelu(x, training=training, inplace=inplace))


@pytest.mark.parametrize("inplace", [False, True], ids=["rrelu", "rrelu_"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_buffer_made_by_rrelu_is_eagers_not_refused_as_uninitialised(
    training: bool, inplace: bool
) -> None:
    torch.manual_seed(0)
    eager = _RReLUNoise(training, inplace)
    after = torch.rand(2)
    torch.manual_seed(0)
    with deferred_init():
        module = _RReLUNoise(training, inplace)
    materialize(module)
    assert_same_as_eager(eager, module)
    assert torch.equal(torch.rand(2), after)
