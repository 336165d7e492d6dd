"""Fourth review of Fabric support: per-rank seeds under tensor parallel, and more.

- Tensor parallel with a seed per rank (`fabric.seed_everything(42 + rank)`)
  is refused naming the parameters: eager's shards then depend on
  ``parallelize_module``'s ``src_data_rank``, which the DTensor does not
  record. The fix it names (one seed for construction) gives eager's shards
  and a ``Replicate`` parameter equal on every rank, with ``src_data_rank``
  0, ``None`` and 1 alike (each rank slices its own replay, no broadcast);
  FSDP2 keeps each rank's own chunk with a seed per rank, as eager
  ``fully_shard`` does (2 gloo ranks); on a 2x2 data x tensor parallel mesh
  seeded per data parallel rank, each rank's chunk of its own piece (4 gloo
  ranks; `tests/support/run_fabric_review4.py`).
- ``ModelParallelStrategy`` with ``precision="bf16-true"`` and a float32
  buffer (a rotary ``inv_freq``), inside ``fabric.init_module()`` and
  outside: Fabric casts the model before ``parallelize_fn``, and the buffer
  is bf16 with eager's values (it was refused as replaced by a cast).
- ``nn.SyncBatchNorm.convert_sync_batchnorm`` after the ``deferred_init``
  block is refused naming it (the record stays with the replaced
  BatchNorm), and both fixes the message names equal eager.
- An optimizer built on the deferred model before ``fabric.load_raw`` holds
  the tensors the load replaced: ``fabric_setup`` refuses it before any
  step, and both fixes it names train as eager's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm
from support.capabilities import (
    FSDP2_ON_CPU,
    FSDP2_ON_CPU_REASON,
    UNEVEN_FSDP_OVER_TP,
    UNEVEN_FSDP_OVER_TP_REASON,
)
from support.processes import run_module


def _ranks(tmp_path: Path, *args: str) -> dict[str, dict[str, Any]]:
    proc = run_module("run_fabric_review4", *args, str(tmp_path), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {p.stem[7:]: json.loads(p.read_text()) for p in tmp_path.glob("result-*.json")}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    if not FSDP2_ON_CPU:
        pytest.skip(FSDP2_ON_CPU_REASON)
    results = _ranks(tmp_path_factory.mktemp("two_ranks"))
    assert sorted(results) == ["0", "1"]
    for cases in results.values():
        assert sorted(cases) == [
            "bf16_true",
            "fsdp2",
            "load",
            "rank_generator",
            "rank_scalar",
            "rank_zero_op",
            "refused",
            "src_data_rank=0",
            "src_data_rank=1",
            "src_data_rank=None",
            "tensor_parallel",
        ]
    return results


def test_a_seed_per_rank_under_tensor_parallel_is_refused_naming_one_seed(
    two_ranks: dict[str, dict[str, Any]],
) -> None:
    for rank, cases in two_ranks.items():
        refused = cases["refused"]
        assert refused is not None, rank
        assert refused["paths"] == [
            "0.bias",
            "0.weight",
            "2.bias",
            "2.weight",
            "3.bias",
            "3.weight",
        ]
        assert "src_data_rank" in refused["message"], rank
        assert "seed every rank the same before the deferred_init block" in refused["message"]


def test_a_number_or_generator_that_depends_on_the_rank_is_refused_under_tensor_parallel(
    two_ranks: dict[str, dict[str, Any]],
) -> None:
    # One global seed: the rank-dependent scale gave rank 1 its own slice of
    # another tensor than eager's (rank 0's), without an error.
    for rank, cases in two_ranks.items():
        assert cases["rank_scalar"]["paths"] == ["2.weight"], rank
        assert "a number that depends on the rank" in cases["rank_scalar"]["message"]
        assert cases["rank_generator"]["paths"] == ["3.weight"], rank
        assert "the same for generators passed to it" in cases["rank_generator"]["message"]
        # An op one rank alone ran, which no parameter depends on, changes
        # nothing (the digest numbered ops and values in the whole record).
        assert cases["rank_zero_op"] == [], rank


def test_load_checkpoint_replaying_tensor_parallel_parameters_checks_the_seed_too(
    two_ranks: dict[str, dict[str, Any]],
) -> None:
    # The load replayed the parameters the file lacks from each rank's own
    # generator and kept each rank's slice, without the check materialize makes.
    for rank, cases in two_ranks.items():
        refused = cases["load"]["seed per rank"]
        assert refused["refused"] == ["2.bias", "2.weight"], (rank, refused)
        assert "seed every rank the same before the deferred_init block" in refused["message"]
        assert cases["load"]["one seed"] == {"refused": None, "replayed_vs_eager": []}, rank


def test_one_seed_gives_eager_shards_under_tensor_parallel_and_a_seed_per_rank_under_fsdp2(
    two_ranks: dict[str, dict[str, Any]],
) -> None:
    names = ("fsdp2", "tensor_parallel", "src_data_rank=0", "src_data_rank=None", "src_data_rank=1")
    for rank, cases in two_ranks.items():
        for name in names:
            r = cases[name]
            assert r["shards_vs_eager"] == [], (rank, name)
            assert r["output_equal"], (rank, name)
            assert r["replicate_apart"] == r["eager_replicate_apart"] == [], (rank, name)


def test_bf16_true_under_model_parallel_casts_a_float32_buffer_as_eager(
    two_ranks: dict[str, dict[str, Any]],
) -> None:
    expected = {"unequal": [], "inv_freq": "torch.bfloat16", "output_equal": True}
    for rank, cases in two_ranks.items():
        for where, r in cases["bf16_true"].items():
            assert r == expected, (rank, where)


@pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_ON_CPU_REASON)
@pytest.mark.skipif(not UNEVEN_FSDP_OVER_TP, reason=UNEVEN_FSDP_OVER_TP_REASON)
def test_a_seed_per_rank_gives_eager_shards_on_a_data_by_tensor_parallel_mesh(
    tmp_path: Path,
) -> None:
    results = _ranks(tmp_path, "4")
    assert sorted(results) == ["0", "1", "2", "3"]
    for rank, cases in results.items():
        assert cases["mesh_2d"] == {"shards_vs_eager": [], "output_equal": True}, rank


def _batchnorm_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _eager_sync_batchnorm(fabric: L.Fabric) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return fabric.setup(nn.SyncBatchNorm.convert_sync_batchnorm(_batchnorm_net())).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_sync_batchnorm_after_the_block_is_refused_with_fixes_that_work() -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1)
    expected = _eager_sync_batchnorm(fabric)
    paths = ["1.bias", "1.num_batches_tracked", "1.running_mean", "1.running_var", "1.weight"]
    for call in (lambda m: lm.fabric_setup(fabric, m), lm.materialize):
        with lm.deferred_init():
            model = _batchnorm_net()
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        with pytest.raises(lm.MetaTensorError, match="convert_sync_batchnorm, called after") as e:
            call(model)
        assert list(e.value.paths) == paths
        assert "convert inside the block" in str(e.value)
        assert model[1].weight.is_meta  # nothing was changed

    # The fixes the message names: convert inside the block, or materialize first.
    torch.manual_seed(0)
    with lm.deferred_init():
        model = nn.SyncBatchNorm.convert_sync_batchnorm(_batchnorm_net())
    assert _same(lm.fabric_setup(fabric, model).state_dict(), expected)
    torch.manual_seed(0)
    with lm.deferred_init():
        model = _batchnorm_net()
    lm.materialize(model, device=fabric.device)
    model = fabric.setup(nn.SyncBatchNorm.convert_sync_batchnorm(model))
    assert _same(model.state_dict(), expected)


def test_a_sync_batchnorm_built_on_meta_is_not_blamed_on_convert_sync_batchnorm() -> None:
    # Built on meta directly (no block, no conversion), alone or set into a
    # deferred model: the plain message, naming every meta tensor and the fallback.
    with torch.device("meta"):
        alone = nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2))
    with lm.deferred_init():
        mixed = _batchnorm_net()
    mixed.append(nn.SyncBatchNorm(2, device="meta"))
    fabric = L.Fabric(accelerator="cpu", devices=1)
    names = ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]
    for model, paths in ((alone, ["0.bias", "0.weight"]), (mixed, [])):
        at = "1" if model is alone else "4"
        bn = [f"{at}.{n}" for n in names]
        for call in (lm.materialize, lambda m: lm.fabric_setup(fabric, m)):
            with pytest.raises(lm.MetaTensorError) as e:
                call(model)
            assert "convert_sync_batchnorm" not in str(e.value)
        with pytest.raises(lm.MetaTensorError, match="fallback='reset_parameters'") as e:
            lm.materialize(model)
        assert list(e.value.paths) == sorted(paths + bn)
    torch.manual_seed(0)
    expected = nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2)).state_dict()
    torch.manual_seed(0)
    with torch.device("meta"):
        alone = nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2))
    assert _same(lm.materialize(alone, fallback="reset_parameters").state_dict(), expected)


def _backbone() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    model.register_buffer("rb", torch.randn(3))
    return model


def _step(fabric: L.Fabric, model: Any, optimizer: Any) -> dict[str, torch.Tensor]:
    loss = model(torch.ones(2, 4)).sum()
    fabric.backward(loss)
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_an_optimizer_built_before_load_raw_is_refused_with_fixes_that_work(
    tmp_path: Path,
) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1)
    path = tmp_path / "backbone.pt"
    torch.manual_seed(99)
    torch.save({k: v for k, v in _backbone().state_dict().items() if k[0] != "2"}, path)

    torch.manual_seed(0)
    eager = _backbone()
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    fabric.load_raw(path, eager, strict=False)
    expected = _step(fabric, *fabric.setup(eager, optimizer))

    torch.manual_seed(0)
    with lm.deferred_init():
        model = _backbone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fabric.load_raw(path, model, strict=False)
    with pytest.raises(lm.MetaTensorError, match="before load_state_dict") as e:
        lm.fabric_setup(fabric, model, optimizer)
    assert list(e.value.paths) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert "create the optimizer after load_state_dict (or fabric.load_raw" in str(e.value)

    # The fixes it names: the optimizer after the load, or lm.load_checkpoint.
    torch.manual_seed(0)
    with lm.deferred_init():
        model = _backbone()
    fabric.load_raw(path, model, strict=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert _same(_step(fabric, *lm.fabric_setup(fabric, model, optimizer)), expected)
    torch.manual_seed(0)
    with lm.deferred_init():
        model = _backbone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lm.load_checkpoint(model, path, strict=False)
    assert _same(_step(fabric, *lm.fabric_setup(fabric, model, optimizer)), expected)
