"""Third review of load_checkpoint: checkpoints and modules that plain PyTorch loads.

Each test compares with what eager ``load_state_dict`` (or the file format's own
reader) gives for the same file and module.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import load_checkpoint
from support import load_models as ml

KINDS = ["meta", "deferred", "real"]


@pytest.fixture(scope="module")
def ref() -> nn.Module:
    return ml.eager()


# -- the Hugging Face hub cache: snapshots/<rev>/<file> -> ../../blobs/<hash> -----------------


def _hub_cache(plain: Path, root: Path) -> Path:
    """Lay ``plain``'s files out as ``snapshot_download`` leaves them, and return the snapshot."""
    blobs, snap = root / "blobs", root / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in plain.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(blobs / digest)
        os.symlink(Path("..") / ".." / "blobs" / digest, snap / f.name)
    return snap


@pytest.mark.parametrize("fmt", ["sharded", "sharded-bin", "dcp"])
def test_sharded_checkpoint_in_the_hub_cache_layout_loads(
    fmt: str, tmp_path: Path, ref: nn.Module
) -> None:
    snap = _hub_cache(ml.write(fmt, ref, tmp_path), tmp_path / "models--org--tiny")
    assert all((snap / f).is_symlink() for f in os.listdir(snap))
    targets = [snap, *snap.glob("*.index.json")]
    for target in targets:
        for kind in KINDS:
            m = ml.build(kind)
            load_checkpoint(m, target)
            want = ref.state_dict()
            for name, t in m.state_dict().items():
                assert torch.equal(t, want[name]), (target.name, kind, name)


def test_index_name_that_climbs_out_through_a_subfolder_is_refused(
    tmp_path: Path, ref: nn.Module
) -> None:
    path = ml.write("sharded", ref, tmp_path)
    (path / "sub").mkdir()
    index = next(path.glob("*.index.json"))
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[0]
    (path / shard).rename(tmp_path / shard)
    escape = f"sub/../../{shard}"
    data["weight_map"] = {k: escape if v == shard else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    m = ml.build("meta")
    before = ml.snapshot(m)
    with pytest.raises(lm.MetaTensorError, match=r"outside its directory"):
        load_checkpoint(m, path)
    ml.assert_unchanged(m, before)
