"""Fourth hostile review of deferred_init / materialize: numpy, inference mode, layouts, rrelu.

Each test was a silent wrong value, a raw torch error or a refusal where
eager works before:

- ``.numpy()`` / ``np.asarray`` of a real tensor captured from outside the
  block returned an array over a fake tensor's uninitialised memory, and a
  write through it was lost;
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
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
