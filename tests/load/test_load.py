"""load_checkpoint: every format into meta, deferred and real modules; strictness; faults."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import load_checkpoint
from support import deferred_models as md
from support import load_models as ml

FORMATS = ["torch", "torch-legacy", "safetensors", "sharded", "sharded-bin", "dcp", "dcp-lightning"]
KINDS = ["meta", "deferred", "real"]


@pytest.fixture(scope="module")
def ref() -> torch.nn.Module:
    return ml.eager()


@pytest.fixture(scope="module")
def files(ref: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    return {fmt: ml.write(fmt, ref, root) for fmt in FORMATS}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(fmt: str, kind: str, files: dict[str, Path], ref: torch.nn.Module) -> None:
    m = ml.build(kind)
    report = load_checkpoint(m, files[fmt])
    assert report.format == {"sharded-bin": "sharded", "dcp-lightning": "dcp"}.get(fmt, fmt)
    state = ref.state_dict()
    for name, t in m.state_dict().items():
        assert torch.equal(t, state[name]), name
    assert m.lm_head.weight is m.transformer["wte"].weight
    assert report.tied == [("lm_head.weight", "transformer.wte.weight")]
    assert report.missing == report.unexpected == report.cast == []
    assert report.bytes_read > 0
    buffers = [f"transformer.h.{i}.attn.bias" for i in range(2)]
    if kind == "meta":
        assert report.left_on_meta == buffers  # never deferred, not in any checkpoint
    else:
        ml.assert_equal(m, ref)
        assert report.replayed == (buffers if kind == "deferred" else [])
        assert not lm.is_deferred(m)


@pytest.mark.parametrize("fmt", ["dcp", "dcp-lightning"])
def test_dcp_metadata_file_reads_its_directory(
    fmt: str, files: dict[str, Path], ref: torch.nn.Module
) -> None:
    # The '.metadata' file was read as a torch pickle and refused with a
    # safe_globals fix (the metadata's classes), which would not have helped.
    m = ml.build("meta")
    report = load_checkpoint(m, files[fmt] / ".metadata")
    assert report.format == "dcp"
    state = ref.state_dict()
    for name, t in m.state_dict().items():
        assert torch.equal(t, state[name]), name


def test_a_torch_file_named_metadata_is_a_torch_file(tmp_path: Path, ref: torch.nn.Module) -> None:
    # Only a distributed checkpoint's metadata (by its content) reads its directory.
    torch.save(ref.state_dict(), tmp_path / ".metadata", _use_new_zipfile_serialization=False)
    m = ml.build("meta")
    assert load_checkpoint(m, tmp_path / ".metadata").format == "torch-legacy"
    state = ref.state_dict()
    for name, t in m.state_dict().items():
        assert torch.equal(t, state[name]), name


class _Attributes(nn.Module):
    """Tensor attributes no state dict holds: the old spectral_norm's ``weight``, an alias,
    a list; a MetaTemplate, meta by design."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.utils.spectral_norm(nn.Linear(4, 4))
        self.alias = self.lin.weight_orig.detach()
        self.kept = [torch.zeros(2)]
        self.template = lm.MetaTemplate(nn.Linear(2, 2))


def test_the_report_lists_a_plain_meta_models_tensor_attributes(tmp_path: Path) -> None:
    # Before, the report said only "loaded 4 tensors", and find_meta_tensors
    # listed three tensors left without data.
    torch.save(_Attributes().state_dict(), tmp_path / "m.pt")
    with torch.device("meta"):
        m = _Attributes()
    report = load_checkpoint(m, tmp_path / "m.pt")
    assert report.left_on_meta == ["alias", "kept.0", "lin.weight"]
    assert "left on meta (3)" in str(report)
    assert sorted(f.path for f in lm.find_meta_tensors(m) if f.kind != "template") == [
        "alias",
        "kept.0",
        "lin.weight",
    ]
    with lm.deferred_init():
        m = _Attributes()
    assert load_checkpoint(m, tmp_path / "m.pt").left_on_meta == []  # replayed


def test_real_module_copied_in_place(files: dict[str, Path], ref: torch.nn.Module) -> None:
    m = ml.build("real")
    params = list(m.parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    load_checkpoint(m, files["safetensors"])
    assert list(m.parameters()) == params
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], m.parameters(), strict=True))
    ml.assert_equal(m, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_bf16(kind: str, files: dict[str, Path], ref: torch.nn.Module) -> None:
    m = ml.build(kind)
    report = load_checkpoint(m, files["torch"], dtype=torch.bfloat16)
    state = ref.state_dict()
    for name, t in m.state_dict().items():
        assert t.dtype == torch.bfloat16, name
        assert torch.equal(t, state[name].to(torch.bfloat16)), name
    assert "lm_head.weight" in report.cast
    assert m.lm_head.weight is m.transformer["wte"].weight
    if kind == "deferred":
        ml.assert_equal(m, ref, cast=lambda t: t.to(torch.bfloat16))


class _Headed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.register_buffer("scale", torch.rand(3), persistent=False)
        self.register_buffer("steps", torch.arange(3))


class _TiedLater(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)


@pytest.mark.parametrize("kind", ["meta", "deferred"])
@pytest.mark.parametrize("then", ["whole", "other end"])
def test_a_tie_made_after_construction_survives_loading_one_end_first(
    kind: str, then: str, tmp_path: Path
) -> None:
    """``model.head.weight = model.emb.weight`` after construction, then ``emb`` loaded alone:
    the meta tensor left at ``head.weight`` is the tensor ``emb`` got, as in eager."""
    torch.manual_seed(0)
    eager = _TiedLater()
    eager.head.weight = eager.emb.weight
    torch.save(eager.state_dict(), tmp_path / "full.pt")
    torch.save(eager.emb.state_dict(), tmp_path / "emb.pt")
    other = torch.randn(10, 4)
    torch.save({"weight": other}, tmp_path / "head.pt")
    if kind == "meta":
        with torch.device("meta"):
            model = _TiedLater()
    else:
        with lm.deferred_init():
            model = _TiedLater()
    model.head.weight = model.emb.weight
    load_checkpoint(model.emb, tmp_path / "emb.pt")
    if then == "whole":
        report = load_checkpoint(model, tmp_path / "full.pt")
        assert report.loaded == ["emb.weight", "head.weight"]
        expected = eager.emb.weight
    else:  # into the tensor both ends hold, as eager's load_state_dict copies into it
        load_checkpoint(model.head, tmp_path / "head.pt")
        expected = other
    assert model.head.weight is model.emb.weight
    assert type(model.head.weight) is nn.Parameter
    assert torch.equal(model.emb.weight, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strict", [True, False])
def test_dtype_reaches_what_the_checkpoint_lacks(kind: str, strict: bool, tmp_path: Path) -> None:
    # dtype= promises module.to(dtype): a real module's non-persistent buffers
    # and the tensors strict=False leaves alone were kept float32, so one
    # model came out in two dtypes (a deferred one was cast throughout).
    torch.manual_seed(1)
    saved = _Headed().state_dict()
    if not strict:
        saved = {k: v for k, v in saved.items() if not k.startswith("head.")}
    torch.save(saved, tmp_path / "part.pt")
    torch.manual_seed(0)
    if kind == "meta":
        with torch.device("meta"):
            m = _Headed()
    else:
        m = _Headed() if kind == "real" else lm.deferred_init(_Headed)
    params = list(m.parameters())
    load_checkpoint(m, tmp_path / "part.pt", dtype=torch.bfloat16, strict=strict)
    torch.manual_seed(0)
    want = _Headed()
    want.load_state_dict(saved, strict=strict)
    want.to(torch.bfloat16)
    if kind == "real":  # optimizers keep pointing at its parameters
        assert all(a is b for a, b in zip(m.parameters(), params, strict=True))
    got = dict([*m.named_parameters(), *m.named_buffers()])
    for name, t in [*want.named_parameters(), *want.named_buffers()]:
        assert got[name].dtype == t.dtype, name
        assert got[name].is_meta == (kind == "meta" and name not in saved), name
        if not got[name].is_meta:
            assert torch.equal(got[name], t), name
    assert m.head.weight.requires_grad and isinstance(m.head.weight, nn.Parameter)


def test_lightning_ckpt_into_module_and_inner(tmp_path: Path) -> None:
    path, trained = ml.write_lightning(tmp_path)
    inner = ml.build("deferred")
    report = load_checkpoint(inner, path)
    assert (report.format, report.prefix) == ("lightning", "model.")
    ml.assert_equal(inner, trained)
    outer = ml.Wrapper(deferred=True)
    report = load_checkpoint(outer, path)
    assert report.prefix == ""
    ml.assert_equal(outer.model, trained)
    with torch.device("meta"):
        twin = md.NanoGPT()
    with pytest.raises(lm.MetaTensorError, match=r"prefix='nope\.' matches no checkpoint key"):
        load_checkpoint(twin, path, prefix="nope")
    # a copy: `inner` maps the original file's pages, which must not change under it
    cut = _truncate(Path(shutil.copy(path, tmp_path / "cut.ckpt")))
    before = ml.snapshot(inner)
    with pytest.raises(
        lm.MetaTensorError, match=r"cut.ckpt' is not a valid torch checkpoint \(truncated"
    ):
        load_checkpoint(inner, cut)
    ml.assert_unchanged(inner, before)


def test_ambiguous_prefix_refused(tmp_path: Path, ref: torch.nn.Module) -> None:
    state = {
        f"{side}.{k}": v for side in ("student", "teacher") for k, v in ref.state_dict().items()
    }
    torch.save(state, tmp_path / "two.pt")
    m = ml.build("meta")
    before = ml.snapshot(m)
    with pytest.raises(lm.MetaTensorError, match=r"several prefixes \['student\.', 'teacher\.'\]"):
        load_checkpoint(m, tmp_path / "two.pt")
    ml.assert_unchanged(m, before)
    report = load_checkpoint(m, tmp_path / "two.pt", prefix="teacher.")
    assert report.ignored == sorted(k for k in state if k.startswith("student."))


class _OwnAndChild(nn.Module):
    """Names that are also suffixes of its other names: 'weight' and 'sub.weight'."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))
        self.sub = nn.Linear(3, 3, bias=False)


@pytest.mark.parametrize("where", ["meta", "cpu"])
def test_own_names_beside_a_prefixed_copy_load_the_own_ones(tmp_path: Path, where: str) -> None:
    # The module's own keys (a fine-tuned 'sub.weight') beside a whole
    # reference copy under 'ref.': the prefix matching more keys used to win,
    # loading the copy's values into 'sub' without an error even with strict.
    # The own names win, as load_state_dict reads them.
    torch.manual_seed(0)
    state = {"sub.weight": torch.full((3, 3), 7.0)}
    state.update({f"ref.{k}": v for k, v in _OwnAndChild().state_dict().items()})
    torch.save(state, tmp_path / "both.pt")
    with torch.device(where):
        m = _OwnAndChild()
    before = ml.snapshot(m)
    with pytest.raises(
        lm.MetaTensorError, match=r"missing from the checkpoint \(1\):\n    'weight'"
    ) as info:
        load_checkpoint(m, tmp_path / "both.pt")
    assert "ref.sub.weight" in str(info.value)  # unexpected, as load_state_dict says
    ml.assert_unchanged(m, before)
    report = load_checkpoint(m, tmp_path / "both.pt", strict=False)
    assert report.prefix == "" and torch.equal(m.sub.weight, state["sub.weight"])
    assert report.missing == ["weight"] and report.unexpected == ["ref.sub.weight", "ref.weight"]
    report = load_checkpoint(m, tmp_path / "both.pt", prefix="ref.")
    assert torch.equal(m.sub.weight, state["ref.sub.weight"]) and report.ignored == ["sub.weight"]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Linear(4, 4)


class _Net(nn.Module):
    """ResNet-like names: 'layer1.2.conv1.weight' of a deeper net ends in 'conv1.weight'."""

    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Linear(4, 4)
        self.layer1 = nn.Sequential(*(_Block() for _ in range(blocks)))


class _Lit(nn.Module):
    """A LightningModule's tensors: the network and a loss module's weight buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(4, 3)
        self.loss_fn = nn.CrossEntropyLoss(weight=torch.ones(3))


class _EncDec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*(nn.Linear(4, 4) for _ in range(3)))
        self.decoder = nn.Sequential(*(nn.Linear(4, 4) for _ in range(2)))


@pytest.mark.parametrize(
    ("saved", "target", "strict", "prefix"),
    [
        (_Lit, lambda: nn.Linear(4, 3), True, "model."),  # 'loss_fn.weight' ends in 'weight'
        (  # 'decoder.0.weight' names an encoder layer too
            _EncDec,
            lambda: nn.Sequential(*(nn.Linear(4, 4) for _ in range(3))),
            True,
            "encoder.",
        ),
        (lambda: _Net(3), _Net, False, ""),  # 'layer1.2.conv1.weight' ends in 'conv1.weight'
    ],
    ids=["loss-module", "encoder-decoder", "deeper-net"],
)
def test_the_prefix_counted_most_wins_over_partial_matches(
    tmp_path: Path, saved: Any, target: Any, strict: bool, prefix: str
) -> None:
    # These loaded right, then were refused by a first version of the rule
    # that refuses a module's own keys beside a copy (a regression sweep).
    torch.manual_seed(0)
    state = saved().state_dict()
    torch.save(state, tmp_path / "saved.pt")
    with torch.device("meta"):
        m = target()
    report = load_checkpoint(m, tmp_path / "saved.pt", strict=strict)
    assert report.prefix == prefix
    for name, t in m.state_dict().items():
        assert torch.equal(t, state[prefix + name]), name


def test_own_names_that_end_in_other_names_load(tmp_path: Path) -> None:
    # 'sub.weight' ends in 'weight', another name of the module: it counts for
    # no prefix, not also for 'sub.'.
    torch.manual_seed(0)
    eager = _OwnAndChild()
    torch.save(eager.state_dict(), tmp_path / "own.pt")
    with torch.device("meta"):
        m = _OwnAndChild()
    assert load_checkpoint(m, tmp_path / "own.pt").prefix == ""
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), eager.parameters(), strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_shape_mismatch_leaves_module_unchanged(
    kind: str, tmp_path: Path, ref: torch.nn.Module
) -> None:
    state = ref.state_dict()
    state["transformer.ln_f.weight"] = torch.ones(17)
    state["transformer.h.1.ln_2.bias"] = torch.ones(3)
    torch.save(state, tmp_path / "bad.pt")
    m = ml.build(kind)
    before = ml.snapshot(m)
    with pytest.raises(
        lm.MetaTensorError,
        match=r"(?s)shape mismatch \(2\):\n    'transformer.h.1.ln_2.bias' has shape \(16,\) in "
        r"the model but \(3,\) in the checkpoint\n    'transformer.ln_f.weight' has shape \(16,\) "
        r"in the model but \(17,\)",
    ):
        load_checkpoint(m, tmp_path / "bad.pt")
    ml.assert_unchanged(m, before)
    report = load_checkpoint(m, tmp_path / "bad.pt", strict=False)
    assert [n for n, *_ in report.mismatched] == [
        "transformer.h.1.ln_2.bias",
        "transformer.ln_f.weight",
    ]
    assert "transformer.ln_f.weight" not in report.loaded


def test_missing_and_unexpected_listed_with_closest(tmp_path: Path, ref: torch.nn.Module) -> None:
    state = ref.state_dict()
    state["transformer.h.0.ln1.weight"] = state.pop("transformer.h.0.ln_1.weight")
    del state["transformer.wpe.weight"]
    torch.save(state, tmp_path / "renamed.pt")
    m = ml.build("deferred")
    before = ml.snapshot(m)
    with pytest.raises(
        lm.MetaTensorError,
        match=r"(?s)missing from the checkpoint \(2\):\n    'transformer.h.0.ln_1.weight' \(closest: "
        r"'transformer.h.0.ln1.weight'\)\n    'transformer.wpe.weight'\n  unexpected in the checkpoint "
        r"\(1\):\n    'transformer.h.0.ln1.weight' \(closest: 'transformer.h.0.ln_1.weight'\)",
    ):
        load_checkpoint(m, tmp_path / "renamed.pt")
    ml.assert_unchanged(m, before)
    report = load_checkpoint(m, tmp_path / "renamed.pt", strict=False)
    assert report.missing == ["transformer.h.0.ln_1.weight", "transformer.wpe.weight"]
    assert report.unexpected == ["transformer.h.0.ln1.weight"]
    # a deferred module gets what the checkpoint lacks replayed exactly
    assert set(report.missing) <= set(report.replayed)
    torch.manual_seed(ml.SEED + 1)
    assert torch.equal(m.transformer["wpe"].weight, md.NanoGPT().transformer["wpe"].weight)
    assert not lm.is_deferred(m)


def _truncate(path: Path) -> Path:
    """Cut the file (or the largest data file of a directory) to half its size."""
    target = path
    if path.is_dir():
        data = [p for p in path.iterdir() if p.suffix in (".distcp", ".safetensors", ".bin")]
        target = max(data, key=lambda p: p.stat().st_size)
    size = target.stat().st_size
    with target.open("r+b") as f:
        f.truncate(size // 2)
    return target


@pytest.mark.parametrize("kind", ["meta", "deferred", "real"])
@pytest.mark.parametrize(
    "fmt", ["torch", "torch-legacy", "safetensors", "sharded", "sharded-bin", "dcp"]
)
def test_truncated_file_leaves_module_unchanged(
    fmt: str, kind: str, tmp_path: Path, ref: torch.nn.Module
) -> None:
    path = ml.write(fmt, ref, tmp_path)
    cut = _truncate(path)
    m = ml.build(kind)
    before = ml.snapshot(m)
    with pytest.raises(lm.MetaTensorError, match=rf"{cut.name}.*(truncated|incomplete|damaged)"):
        load_checkpoint(m, path)
    ml.assert_unchanged(m, before)


def test_bad_safetensors_header(tmp_path: Path, ref: torch.nn.Module) -> None:
    path = ml.write("safetensors", ref, tmp_path)
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"{xx:"
    path.write_bytes(bytes(raw))
    m = ml.build("meta")
    before = ml.snapshot(m)
    with pytest.raises(lm.MetaTensorError, match=r"not a valid safetensors file \(bad header"):
        load_checkpoint(m, path)
    ml.assert_unchanged(m, before)


def test_sharded_index_errors(tmp_path: Path, ref: torch.nn.Module) -> None:
    path = ml.write("sharded", ref, tmp_path)
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[-1]
    m = ml.build("deferred")
    before = ml.snapshot(m)
    # sizes that disagree: the index claims a tensor in the wrong shard
    first = sorted(set(data["weight_map"].values()))[0]
    key = next(k for k, v in data["weight_map"].items() if v == shard)
    data["weight_map"][key] = first
    index.write_text(json.dumps(data))
    with pytest.raises(
        lm.MetaTensorError,
        match=rf"index .* and its shards disagree:\n  '{key}': index says '{first}'",
    ):
        load_checkpoint(m, path)
    index.write_text("{not json")
    with pytest.raises(
        lm.MetaTensorError, match=r"model.safetensors.index.json' is not valid JSON"
    ):
        load_checkpoint(m, index)
    data["weight_map"][key] = shard
    index.write_text(json.dumps(data))
    (path / shard).unlink()
    with pytest.raises(
        lm.MetaTensorError, match=rf"refers to shard\(s\) \['{shard}'\] that do not exist"
    ):
        load_checkpoint(m, path)
    ml.assert_unchanged(m, before)


def test_malicious_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.ones(2), "evil": ml.Payload(str(marker))}, tmp_path / "evil.pt")
    m = ml.build("meta")
    before = ml.snapshot(m)
    with pytest.raises(
        lm.MetaTensorError,
        match=r"(?s)cannot be loaded with weights_only=True.*load_models.write_payload.*safe_globals=",
    ):
        load_checkpoint(m, tmp_path / "evil.pt")
    assert not marker.exists()
    ml.assert_unchanged(m, before)


def test_safe_globals_allow_a_trusted_checkpoint(tmp_path: Path, ref: torch.nn.Module) -> None:
    from fractions import Fraction

    torch.save({"state_dict": ref.state_dict(), "extra": Fraction(1, 3)}, tmp_path / "c.ckpt")
    m = ml.build("meta")
    with pytest.raises(lm.MetaTensorError, match=r"It needs: \['fractions.Fraction'\]"):
        load_checkpoint(m, tmp_path / "c.ckpt")
    # A "state_dict" key alone does not make a Lightning checkpoint.
    assert load_checkpoint(m, tmp_path / "c.ckpt", safe_globals=[Fraction]).format == "torch"


def test_bad_arguments(tmp_path: Path, files: dict[str, Path]) -> None:
    m = ml.build("meta")
    with pytest.raises(
        lm.MetaTensorError, match=r"no checkpoint at '.*nothing.pt'. Fix: check the path"
    ):
        load_checkpoint(m, tmp_path / "nothing.pt")
    (tmp_path / "x.txt").write_text("hello world, not a checkpoint")
    with pytest.raises(lm.MetaTensorError, match=r"not a checkpoint format lightning_meta knows"):
        load_checkpoint(m, tmp_path / "x.txt")
    with pytest.raises(lm.MetaTensorError, match=r"expects an nn.Module, got dict"):
        load_checkpoint({}, files["torch"])  # type: ignore[arg-type]
    with pytest.raises(lm.MetaTensorError, match=r"dtype=torch.int64; expected a floating point"):
        load_checkpoint(m, files["torch"], dtype=torch.int64)
    # A dtype's name instead of the dtype: the fix says so.
    with pytest.raises(lm.MetaTensorError, match=r"dtype='bf16'.*Fix: pass the torch.dtype"):
        load_checkpoint(m, files["torch"], dtype="bf16")
    with pytest.raises(lm.MetaTensorError, match=r"device='meta'"):
        load_checkpoint(m, files["torch"], device="meta")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(lm.MetaTensorError, match=r"holds a Tensor, not a state dict"):
        load_checkpoint(m, tmp_path / "tensor.pt")
    os.mkdir(tmp_path / "empty")
    with pytest.raises(lm.MetaTensorError, match=r"is a directory but holds no"):
        load_checkpoint(m, tmp_path / "empty")


def test_transformers_gpt2_sharded_keeps_ties(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg)
    ref.save_pretrained(tmp_path / "gpt2", max_shard_size="20KB")
    assert len(list((tmp_path / "gpt2").glob("*.safetensors"))) > 1
    for m in (
        lm.deferred_init(transformers.GPT2LMHeadModel, cfg),
        transformers.GPT2LMHeadModel(cfg),
    ):
        report = load_checkpoint(m, tmp_path / "gpt2")
        assert m.lm_head.weight is m.transformer.wte.weight
        assert report.tied == [("lm_head.weight", "transformer.wte.weight")]
        ml.assert_equal(m, ref)


def test_a_directory_holding_both_single_files_reads_the_one_transformers_reads(
    tmp_path: Path,
) -> None:
    # The Hugging Face hub holds gpt2 and bert-base-uncased with both
    # model.safetensors and pytorch_model.bin; the load refused such a
    # directory, saying it held "no single" file. The .bin here holds other
    # weights, so reading the wrong one shows.
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    other = transformers.GPT2LMHeadModel(cfg).state_dict()
    ref = transformers.GPT2LMHeadModel(cfg)
    ref.save_pretrained(tmp_path / "gpt2")  # transformers 5 writes safetensors only
    torch.save(other, tmp_path / "gpt2" / "pytorch_model.bin")
    assert {"model.safetensors", "pytorch_model.bin"} <= {
        p.name for p in (tmp_path / "gpt2").iterdir()
    }
    expected = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    ml.assert_equal(expected, ref)
    m = lm.deferred_init(transformers.GPT2LMHeadModel, cfg)
    report = load_checkpoint(m, tmp_path / "gpt2")
    assert report.format == "safetensors"
    ml.assert_equal(m, ref)
    (tmp_path / "gpt2" / "model.safetensors").unlink()
    m = lm.deferred_init(transformers.GPT2LMHeadModel, cfg)
    assert load_checkpoint(m, tmp_path / "gpt2").format == "torch"
    # Two indexes of other names: which one is the user's to say, and the error names both.
    (tmp_path / "two").mkdir()
    for name in ("a.index.json", "b.index.json"):
        (tmp_path / "two" / name).write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(lm.MetaTensorError, match=r"2 '\*.index.json' files \(a.index.json, b"):
        load_checkpoint(m, tmp_path / "two")


def test_a_single_file_beside_an_index_is_read_as_transformers_reads_it(tmp_path: Path) -> None:
    # transformers reads model.safetensors before any index: a stale index
    # that save_pretrained leaves when it stops sharding, and sharded .bin
    # files beside the model.safetensors the hub's conversion bot adds. The
    # load read the index: other weights without an error, or a refusal
    # naming shards that were deleted on purpose.
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    old = transformers.GPT2LMHeadModel(cfg)
    ref = transformers.GPT2LMHeadModel(cfg)
    old.save_pretrained(tmp_path / "gpt2", max_shard_size="20KB")
    index = tmp_path / "gpt2" / "model.safetensors.index.json"
    assert index.is_file()
    ref.save_pretrained(tmp_path / "gpt2")  # one file now; the index stays
    assert index.is_file() and (tmp_path / "gpt2" / "model.safetensors").is_file()
    ml.assert_equal(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), ref)
    m = lm.deferred_init(transformers.GPT2LMHeadModel, cfg)
    assert load_checkpoint(m, tmp_path / "gpt2").format == "safetensors"
    ml.assert_equal(m, ref)
    # Sharded .bin files and their index beside model.safetensors.
    (tmp_path / "bins").mkdir()
    torch.save(old.state_dict(), tmp_path / "bins" / "pytorch_model-00001-of-00001.bin")
    weight_map = {k: "pytorch_model-00001-of-00001.bin" for k in old.state_dict()}
    (tmp_path / "bins" / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    ref.save_pretrained(tmp_path / "bins")
    m = lm.deferred_init(transformers.GPT2LMHeadModel, cfg)
    assert load_checkpoint(m, tmp_path / "bins").format == "safetensors"
    ml.assert_equal(m, ref)
    (tmp_path / "bins" / "model.safetensors").unlink()
    m = lm.deferred_init(transformers.GPT2LMHeadModel, cfg)
    assert load_checkpoint(m, tmp_path / "bins").format == "sharded"
    ml.assert_equal(m, old)


def test_a_base_model_checkpoint_names_the_submodule_to_load_into(tmp_path: Path) -> None:
    # prefix= only strips checkpoint keys; the message offered it for keys
    # that lack the head model's 'transformer.' and said nothing of loading
    # into that submodule, which works.
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    transformers.GPT2Model(cfg).save_pretrained(tmp_path / "base")
    m = lm.deferred_init(transformers.GPT2LMHeadModel, cfg)
    with pytest.raises(lm.MetaTensorError, match=r"submodule 'transformer': load into it"):
        load_checkpoint(m, tmp_path / "base")
    load_checkpoint(m.transformer, tmp_path / "base")
    ml.assert_equal(m.transformer, transformers.GPT2Model.from_pretrained(tmp_path / "base"))


def test_transformers_llama_inv_freq_replayed(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg)
    ref.save_pretrained(tmp_path / "llama")
    m = lm.deferred_init(transformers.LlamaForCausalLM, cfg)
    report = load_checkpoint(m, tmp_path / "llama", dtype=torch.bfloat16)
    assert "model.rotary_emb.inv_freq" in report.replayed
    ml.assert_equal(m, ref, cast=lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t)
    m = lm.deferred_init(transformers.LlamaForCausalLM, cfg)
    load_checkpoint(m, tmp_path / "llama")
    assert torch.equal(m.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    ml.assert_equal(m, ref)


def test_more_structural_errors(tmp_path: Path, ref: torch.nn.Module) -> None:
    m = ml.build("deferred")
    before = ml.snapshot(m)
    (tmp_path / "a.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(lm.MetaTensorError, match=r"a.index.json' has no 'weight_map'"):
        load_checkpoint(m, tmp_path / "a.index.json")
    (tmp_path / "junk.bin").write_bytes(b"junk" * 10)
    (tmp_path / "b.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "junk.bin"}})
    )
    with pytest.raises(
        lm.MetaTensorError, match=r"shard '.*junk.bin' of .* is neither safetensors nor"
    ):
        load_checkpoint(m, tmp_path / "b.index.json")
    path = ml.write("dcp", ref, tmp_path)
    (path / ".metadata").write_bytes((path / ".metadata").read_bytes()[:40])
    with pytest.raises(lm.MetaTensorError, match=r"metadata '.*\.metadata' cannot be read"):
        load_checkpoint(m, path)
    with pytest.raises(lm.MetaTensorError, match=r"device='nowhere'"):
        load_checkpoint(m, path, device="nowhere")
    ml.assert_unchanged(m, before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param(
            {"path": 42}, TypeError, r"path=42 \(int\); expected a str or os.PathLike", id="path"
        ),
        pytest.param(
            {"path": b"net.pt"}, TypeError, r"path=b'net.pt' \(bytes\); expected", id="path-bytes"
        ),
        pytest.param({"prefix": 3}, TypeError, r"prefix=3 \(int\); expected a str", id="prefix"),
        pytest.param(
            {"prefix": "nope"}, ValueError, r"prefix='nope\.' matches no checkpoint", id="prefix-v"
        ),
        pytest.param(
            {"safe_globals": 42}, TypeError, r"safe_globals=42 \(int\); expected a seq", id="safe"
        ),
        pytest.param(
            {"safe_globals": "fractions.Fraction"},
            TypeError,
            r"safe_globals='fractions.Fraction' \(str\); expected a sequence of classes",
            id="safe-str",
        ),
        pytest.param(
            {"safe_globals": ["fractions.Fraction"]},
            TypeError,
            r"got 'fractions.Fraction' \(str\) in safe_globals.*not their names",
            id="safe-names",
        ),
    ],
)
def test_argument_errors_are_typed(
    kwargs: dict[str, object], error: type[Exception], match: str, files: dict[str, Path]
) -> None:
    m = ml.build("deferred")
    before = ml.snapshot(m)
    args: dict[str, object] = {"path": files["torch"], **kwargs}
    with pytest.raises(error, match=match) as info:
        load_checkpoint(m, **args)  # type: ignore[arg-type]
    assert isinstance(info.value, error)
    assert isinstance(info.value, lm.MetaTensorError)
    ml.assert_unchanged(m, before)


def test_safe_globals_accept_pairs_and_tuples(tmp_path: Path, ref: torch.nn.Module) -> None:
    from fractions import Fraction

    torch.save({"state_dict": ref.state_dict(), "extra": Fraction(1, 3)}, tmp_path / "c.ckpt")
    for trusted in ((Fraction,), [(Fraction, "fractions.Fraction")]):
        m = ml.build("meta")
        assert load_checkpoint(m, tmp_path / "c.ckpt", safe_globals=trusted).format == "torch"


def test_errors_carry_the_keys_and_files(tmp_path: Path, ref: torch.nn.Module) -> None:
    m = ml.build("meta")
    nothing = tmp_path / "nothing.pt"
    with pytest.raises(lm.MetaTensorError) as info:
        load_checkpoint(m, nothing)
    assert info.value.paths == (str(nothing),)
    state = ref.state_dict()
    state["transformer.ln_f.weight"] = torch.ones(17)
    state["extra.weight"] = state.pop("transformer.wpe.weight")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(lm.MetaTensorError, match="shape mismatch") as info:
        load_checkpoint(m, tmp_path / "bad.pt")
    assert info.value.paths == ("extra.weight", "transformer.ln_f.weight", "transformer.wpe.weight")
    torch.save(
        {f"{s}.{k}": v for s in "ab" for k, v in ref.state_dict().items()}, tmp_path / "2.pt"
    )
    with pytest.raises(lm.MetaTensorError, match="several prefixes") as info:
        load_checkpoint(m, tmp_path / "2.pt")
    assert info.value.paths == ("a", "b")


def test_phases_run_on_their_own(files: dict[str, Path]) -> None:
    from lightning_meta._load import _phases as phases
    from lightning_meta._load._formats import open_source
    from lightning_meta._load._match import mismatch_error, plan_load

    m = ml.build("deferred")
    before = ml.snapshot(m)
    source = open_source(files["safetensors"])
    plan = plan_load(m, source, "net", prefix=None, strict=True)
    assert mismatch_error(m, "net", plan, strict=True) is None
    assert [g.names for g, _ in plan.load if len(g.slots) > 1] == [
        ["transformer.wte.weight", "lm_head.weight"]
    ]
    conversion = phases.convert(source, plan, device=None, dtype=torch.bfloat16)
    assert conversion.bytes_read == sum(e.nbytes for _, e in plan.load)
    assert "lm_head.weight" in conversion.cast
    ml.assert_unchanged(m, before)  # nothing in the module touched before the swap


class _TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "real"])
def test_tied_keys_with_different_values_load_as_load_state_dict_does(
    tmp_path: Path, deferred: bool
) -> None:
    # load_checkpoint took the first key of the tied group, load_state_dict
    # leaves the last: another value, without an error.
    path = tmp_path / "tied.pt"
    torch.save({"emb.weight": torch.ones(10, 8), "head.weight": torch.full((10, 8), 2.0)}, path)
    eager = _TiedHead()
    eager.load_state_dict(torch.load(path))
    if deferred:
        with lm.deferred_init():
            model = _TiedHead()
    else:
        model = _TiedHead()
    with pytest.warns(lm.MetaTensorWarning, match="saved untied"):
        lm.load_checkpoint(model, path)
    assert torch.equal(model.emb.weight, eager.emb.weight)
    assert model.head.weight is model.emb.weight


def _small() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))


def _safetensors_with_header_length(ref: nn.Module, path: Path, low: int) -> Path:
    """Save ``ref`` as safetensors, padding the metadata until the header's length ends in ``low``."""
    from safetensors.torch import save_model

    for pad in range(4096):
        save_model(ref, str(path), metadata={"pad": "x" * pad})
        length = int.from_bytes(path.read_bytes()[:8], "little")
        if length & 0xFFFF == low:
            return path
    raise AssertionError(f"no padding gives a header length ending in {low:#06x}")


@pytest.mark.parametrize("low", [0x0280, 0x0580, 0x0180], ids=["proto2", "proto5", "not-proto"])
def test_safetensors_whose_header_length_starts_like_a_pickle(tmp_path: Path, low: int) -> None:
    # A header length of 0x...0280 starts the file with b"\x80\x02", a pickle's
    # PROTO opcode: the file was taken for a legacy torch file and refused as
    # corrupt (about one safetensors file in 32 has 0x80 as its low byte).
    torch.manual_seed(0)
    ref = _small()
    path = _safetensors_with_header_length(ref, tmp_path / "m.safetensors", low)
    assert path.read_bytes()[:2] == low.to_bytes(2, "little")
    shards = tmp_path / "sharded"
    shards.mkdir()
    shard = "model-00001-of-00001.safetensors"
    shutil.copy(path, shards / shard)
    index = {"metadata": {}, "weight_map": dict.fromkeys(ref.state_dict(), shard)}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    # The suffix does not decide; a shard of an index is sniffed too.
    for name, fmt in [
        ("m.safetensors", "safetensors"),
        ("m.bin", "safetensors"),
        ("m", "safetensors"),
        ("sharded", "sharded"),
    ]:
        other = tmp_path / name
        if not other.exists():
            shutil.copy(path, other)
        with lm.deferred_init():
            m = _small()
        assert load_checkpoint(m, other).format == fmt
        for (key, got), want in zip(m.state_dict().items(), ref.state_dict().values(), strict=True):
            assert torch.equal(got, want), (name, key)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_legacy_torch_files_of_every_pickle_protocol(
    tmp_path: Path, ref: torch.nn.Module, protocol: int
) -> None:
    path = tmp_path / "m.pth"
    torch.save(
        ref.state_dict(), path, _use_new_zipfile_serialization=False, pickle_protocol=protocol
    )
    assert path.read_bytes()[:2] == bytes([0x80, protocol])
    m = ml.build("deferred")
    assert load_checkpoint(m, path).format == "torch-legacy"
    ml.assert_equal(m, ref)
