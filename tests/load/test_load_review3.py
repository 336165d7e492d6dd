"""Third review of load_checkpoint: checkpoints and modules that plain PyTorch loads.

Each test compares with what eager ``load_state_dict`` (or the file format's own
reader) gives for the same file and module.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import load_checkpoint
from support import deferred_models as md
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


# -- tied weights in a model with load code: each name loads from its own key ----------------


class _TiedWithLoadCode(nn.Module):
    """The review's minimal model: a tie, and a module with a load pre-hook (weight_norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def _gpt2_checkpointed() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    m = transformers.GPT2LMHeadModel(cfg)
    for i, block in enumerate(m.transformer.h):
        m.transformer.h[i] = checkpoint_wrapper(block)
    return m


def _build(make: type[nn.Module] | Any, kind: str) -> nn.Module:
    torch.manual_seed(7)
    if kind == "deferred":
        return lm.deferred_init(make)
    if kind == "meta":
        with torch.device("meta"):
            return make()
    return make()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make", [_TiedWithLoadCode, _gpt2_checkpointed], ids=["net", "gpt2"])
def test_tied_weights_with_load_code_load_like_load_state_dict(
    make: Any, kind: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    saved = make()
    torch.save(saved.state_dict(), tmp_path / "c.pt")
    eager = _build(make, "real")
    eager.load_state_dict(torch.load(tmp_path / "c.pt"))
    m = _build(make, kind)
    report = load_checkpoint(m, tmp_path / "c.pt")
    assert report.missing == [] and report.unexpected == []
    want = eager.state_dict()
    got = m.state_dict()
    assert list(got) == list(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    if make is _TiedWithLoadCode:
        assert m.head.weight is m.emb.weight
    else:
        assert m.lm_head.weight is m.transformer.wte.weight


@pytest.mark.parametrize("kind", KINDS)
def test_tied_names_with_different_values_and_load_code_give_the_last(
    kind: str, tmp_path: Path
) -> None:
    state = _TiedWithLoadCode().state_dict()
    state["head.weight"] = torch.full_like(state["emb.weight"], 7.0)
    torch.save(state, tmp_path / "c.pt")
    eager = _build(_TiedWithLoadCode, "real")
    eager.load_state_dict(torch.load(tmp_path / "c.pt"))
    m = _build(_TiedWithLoadCode, kind)
    with pytest.warns(lm.MetaTensorWarning, match="saved untied"):
        load_checkpoint(m, tmp_path / "c.pt")
    assert m.head.weight is m.emb.weight
    for name, t in eager.state_dict().items():
        assert torch.equal(m.state_dict()[name], t), name


# -- load post-hooks that edit the key lists in place --------------------------------------


class _LoRALinear(nn.Module):
    """A base layer and an adapter whose post-hook drops its own keys from the missing ones."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.lora_a = nn.Parameter(torch.zeros(2, 4))
        self.register_load_state_dict_post_hook(self._ignore_lora)

    @staticmethod
    def _ignore_lora(module: nn.Module, incompatible: Any) -> None:
        for k in [k for k in incompatible.missing_keys if "lora_" in k]:
            incompatible.missing_keys.remove(k)


class _TwoAdapters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = _LoRALinear()
        self.b = _LoRALinear()
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize("kind", ["deferred", "real"])
@pytest.mark.parametrize("make", [_LoRALinear, _TwoAdapters], ids=["lora", "nested"])
def test_post_hook_removing_its_missing_keys_is_honoured_as_load_state_dict(
    make: Any, kind: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    base = {k: v for k, v in make().state_dict().items() if "lora_" not in k}
    torch.save(base, tmp_path / "base.pt")
    eager = _build(make, "real")
    keys = eager.load_state_dict(torch.load(tmp_path / "base.pt"))  # strict
    m = _build(make, kind)
    report = load_checkpoint(m, tmp_path / "base.pt")
    assert report.missing == sorted(keys.missing_keys) == []
    for name, t in eager.state_dict().items():
        assert torch.equal(m.state_dict()[name], t), name


def test_post_hook_leaves_other_missing_keys_to_the_strict_check(tmp_path: Path) -> None:
    base = {k: v for k, v in _TwoAdapters().state_dict().items() if k != "head.bias"}
    base = {k: v for k, v in base.items() if "lora_" not in k}
    torch.save(base, tmp_path / "base.pt")
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "head.bias"\. $'):
        _TwoAdapters().load_state_dict(torch.load(tmp_path / "base.pt"))
    m = lm.deferred_init(_TwoAdapters)
    with pytest.raises(
        lm.MetaTensorError, match=r"missing from the checkpoint \(1\):\n    'head.bias'"
    ):
        load_checkpoint(m, tmp_path / "base.pt")
    report = load_checkpoint(m, tmp_path / "base.pt", strict=False)
    assert report.missing == ["head.bias"]


# -- nn.BatchNorm checkpoints without num_batches_tracked (old torchvision format) -----------


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def _bn_files(root: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = _bn_net()
    with torch.no_grad():
        src[1].running_mean.uniform_()
        src[1].num_batches_tracked.fill_(7)
    # Built from the state dict, as old weights were: no "_metadata", no counter.
    state = {k: v.clone() for k, v in src.state_dict().items() if "num_batches" not in k}
    torch.save(state, root / "r.pt")
    save_file(state, str(root / "r.safetensors"))
    return {"pt": root / "r.pt", "safetensors": root / "r.safetensors"}


def _eager_bn(kind: str, path: Path, *, strict: bool = True) -> nn.Module:
    """What plain PyTorch gives: load_state_dict into a built model; assign=True on meta."""
    from safetensors.torch import load_file

    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path)
    m = _build(_bn_net, "meta" if kind == "meta" else "real")
    if kind == "real":
        m[1].num_batches_tracked.fill_(5)  # the module's own value is kept
    m.load_state_dict(state, strict=strict, assign=kind == "meta")
    return m


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("kind", KINDS)
def test_batchnorm_checkpoint_without_its_counter_loads_as_load_state_dict(
    kind: str, fmt: str, strict: bool, tmp_path: Path
) -> None:
    path = _bn_files(tmp_path)[fmt]
    eager = _eager_bn(kind, path, strict=strict)
    m = _build(_bn_net, kind)
    if kind == "real":
        m[1].num_batches_tracked.fill_(5)
    report = load_checkpoint(m, path, strict=strict)
    assert report.missing == [] and report.left_on_meta == []
    for name, t in eager.state_dict().items():
        got = m.state_dict()[name]
        assert not got.is_meta and got.dtype == t.dtype and torch.equal(got, t), name
    assert int(m[1].num_batches_tracked) == (5 if kind == "real" else 0)


def test_batchnorm_counter_missing_from_a_current_state_dict_is_refused(tmp_path: Path) -> None:
    state = _bn_net().state_dict()
    del state["1.num_batches_tracked"]  # "_metadata" still says version 2
    torch.save(state, tmp_path / "v2.pt")
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "1.num_batches'):
        _bn_net().load_state_dict(torch.load(tmp_path / "v2.pt"))
    for kind in KINDS:
        m = _build(_bn_net, kind)
        with pytest.raises(lm.MetaTensorError, match=r"missing from the checkpoint \(1\)"):
            load_checkpoint(m, tmp_path / "v2.pt")


# -- safetensors dtypes that torch and safetensors.torch.load_file handle ---------------------

_ST_DTYPES = [
    getattr(torch, n)
    for n in ("float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2")
    if hasattr(torch, n)
]


class _Holder(nn.Module):
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("b", torch.zeros(shape, dtype=torch.uint8).view(dtype))


@pytest.mark.parametrize("shape", [(3, 4), (5,), (2, 0)])
@pytest.mark.parametrize("dtype", _ST_DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_safetensors_dtypes_load_as_load_file(
    kind: str, dtype: torch.dtype, shape: tuple[int, ...], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    saved = torch.randint(0, 256, shape, dtype=torch.uint8).view(dtype)
    save_file({"b": saved}, str(tmp_path / "x.safetensors"))
    want = load_file(str(tmp_path / "x.safetensors"))["b"]
    if kind == "deferred":
        m = lm.deferred_init(_Holder, shape, dtype)
    else:
        with torch.device("meta" if kind == "meta" else "cpu"):
            m = _Holder(shape, dtype)
    load_checkpoint(m, tmp_path / "x.safetensors")
    assert m.b.dtype == want.dtype == dtype and m.b.shape == want.shape
    assert torch.equal(m.b.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("shape", [[3, 7], [2, 3], []])
def test_safetensors_f4_that_does_not_pack_into_bytes_is_refused(
    shape: list[int], tmp_path: Path
) -> None:
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("torch has no float4_e2m1fn_x2")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = json.dumps({"b": {"dtype": "F4", "shape": shape, "data_offsets": [0, 3]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0")
    with pytest.raises(SafetensorError):
        load_file(str(path))
    m = _Holder((3,), torch.float4_e2m1fn_x2)
    with pytest.raises(lm.MetaTensorError, match=r"last dimension is not a multiple of 2"):
        load_checkpoint(m, path)


# -- load-check names its own options in its messages --------------------------------------


def test_load_check_messages_name_the_command_line_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_meta._cli import main
    from support import SUPPORT

    target = str(SUPPORT / "deferred_models.py") + ":NanoGPT"
    path = ml.write("safetensors", ml.eager(), tmp_path)
    assert main(["load-check", target, str(path), "--args", '{"n_embd": 8}']) == 1
    err = capsys.readouterr().err
    # every shape differs: nothing would load (before 2026-12-07, fifth session, the fix
    # offered --no-strict "to load what matches")
    assert (
        "pass --prefix if its keys" in err
        and "; --no-strict on this module would load nothing" in err
    )
    assert "strict=False" not in err and "prefix=" not in err
    assert main(["load-check", target, str(path), "--prefix", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--prefix 'nope.' matches no checkpoint key" in err
    # Only prefixes that fit the module are offered (before: the keys' first parts,
    # 'lm_head.' and 'transformer.', neither of which loads)
    assert "Fix: pass --prefix '' (none), or leave --prefix out to detect it" in err
    assert "lm_head." not in err.split("Fix: ")[1] and "prefix=" not in err
    # The Python API keeps naming its keywords.
    with pytest.raises(
        lm.MetaTensorError, match=r"; strict=False on this module would load nothing"
    ):
        load_checkpoint(lm.deferred_init(md.NanoGPT, n_embd=8), path)
    with pytest.raises(ValueError, match=r"Fix: pass prefix='' \(none\) or prefix=None"):
        load_checkpoint(ml.build("meta"), path, prefix="nope")


class _Wrapped(torch.Tensor):
    """A dispatch subclass with only what loading in place needs (no dtype views)."""

    ALLOWED = frozenset({"detach", "clone", "copy_", "alias", "lift_fresh", "_to_copy"})

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> _Wrapped:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined,no-any-return]
            cls, inner.shape, dtype=inner.dtype, device=inner.device, strides=inner.stride()
        )

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        from torch.utils._pytree import tree_map

        name = func._schema.name.split("::")[1]
        if name not in cls.ALLOWED:
            raise NotImplementedError(f"_Wrapped does not support {func}")
        out = func(
            *tree_map(lambda t: t.inner if isinstance(t, _Wrapped) else t, args),
            **tree_map(lambda t: t.inner if isinstance(t, _Wrapped) else t, kwargs or {}),
        )
        if name == "copy_":
            return args[0]
        return tree_map(lambda t: _Wrapped(t) if isinstance(t, torch.Tensor) else t, out)


def test_a_tensor_subclass_buffer_loads_in_place_through_its_own_clone(tmp_path: Path) -> None:
    # The float4 byte copies first viewed every backup as its dtype, which a
    # subclass without dtype views refused; only packed dtypes take that path.
    module = nn.Module()
    module.register_buffer("w", _Wrapped(torch.zeros(3)))
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(3.0)}, path)
    load_checkpoint(module, path)
    assert isinstance(module.w, _Wrapped)
    assert module.w.inner.tolist() == [0.0, 1.0, 2.0]
