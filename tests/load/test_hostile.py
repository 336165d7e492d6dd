"""Hostile and broken checkpoints: no code runs, nothing half-changed, no crash, every error ours.

Each test builds a file that a hostile or careless writer could produce and
checks that ``load_checkpoint`` raises a ``MetaTensorError`` naming the file or
key, that the target module is exactly as it was (same objects, same values,
still meta, still deferred), and that nothing of the file outlives the load.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import load_checkpoint
from lightning_meta._load import _phases
from support import load_models as ml

KINDS = ["meta", "deferred", "real"]
LATE_KEY = "transformer.h.1.ln_2.bias"  # (16,), stored after most of the model


@pytest.fixture(scope="module")
def ref() -> nn.Module:
    return ml.eager()


def _marker_writer(marker: str, value: Any) -> Any:
    """What a malicious pickle calls: leave proof that it ran, then return genuine data."""
    Path(marker).write_text("ran")
    return value


class _RunThenReturn:
    def __init__(self, marker: str, value: Any) -> None:
        self.marker, self.value = marker, value

    def __reduce__(self) -> tuple[Any, ...]:
        return (_marker_writer, (self.marker, self.value))


# -- helpers that write damaged files ------------------------------------------------


def _rewrite_zip(path: Path, change: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite the zip at ``path`` record by record (valid CRCs for whatever ``change`` gives)."""
    with zipfile.ZipFile(path) as z:
        records = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records:
            new = change(name, data)
            z.writestr(name, data if new is None else new)


def _record_data_offset(path: Path, name_suffix: str) -> tuple[int, int]:
    """Return (data offset, size) of the zip record ending in ``name_suffix``."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(name_suffix))
    with path.open("rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    n, m = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + n + m, info.file_size


def _largest_record(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return max(z.infolist(), key=lambda i: i.file_size).filename


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def _with_key(ref: nn.Module, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    state = ref.state_dict()
    assert key in state
    state[key] = value
    return state


@contextlib.contextmanager
def _unreadable(*paths: Path) -> Iterator[None]:
    """Make ``paths`` unreadable for the body (as root: run the body as user ``nobody``)."""
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        p.chmod(0)
    root = os.geteuid() == 0
    try:
        if root:
            os.seteuid(65534)
        yield
    finally:
        if root:
            os.seteuid(0)
        for p, mode in modes.items():
            p.chmod(mode)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory that user ``nobody`` can enter (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="lm-hostile-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- 1. nothing the loader reads runs code -----------------------------------------------


def _malicious(fmt: str, ref: nn.Module, root: Path, marker: Path) -> Path:
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    if fmt == "torch":
        torch.save({**state, "evil": _RunThenReturn(str(marker), 1)}, root / "m.pt")
        return root / "m.pt"
    if fmt == "torch-legacy":
        torch.save(
            {**state, "evil": _RunThenReturn(str(marker), 1)},
            root / "m.pth",
            _use_new_zipfile_serialization=False,
        )
        return root / "m.pth"
    if fmt == "dcp":
        from torch.distributed.checkpoint import FileSystemReader

        path = ml.write("dcp", ref, root)
        genuine = FileSystemReader(str(path)).read_metadata()
        with (path / ".metadata").open("wb") as f:
            pickle.dump(_RunThenReturn(str(marker), genuine), f)
        # The hole being closed: torch's own reader runs the payload and loads fine.
        assert FileSystemReader(str(path)).read_metadata().state_dict_metadata
        assert marker.exists()
        marker.unlink()
        return path
    if fmt == "sharded-bin":
        path = ml.write("sharded-bin", ref, root)
        shard = sorted(path.glob("*.bin"))[-1]
        part = torch.load(shard, weights_only=True)
        torch.save({**part, "evil": _RunThenReturn(str(marker), 1)}, shard)
        return path
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["torch", "torch-legacy", "dcp", "sharded-bin"])
def test_malicious_pickle_never_runs(fmt: str, tmp_path: Path, ref: nn.Module) -> None:
    marker = tmp_path / "pwned"
    path = _malicious(fmt, ref, tmp_path, marker)
    m = ml.build("deferred")
    before = ml.snapshot(m)
    with pytest.raises(lm.MetaTensorError, match=r"(?s)weights_only=True.*_marker_writer") as info:
        load_checkpoint(m, path)
    assert not marker.exists()
    assert info.value.paths
    ml.assert_unchanged(m, before)


def test_malicious_pickle_never_runs_from_the_cli(
    tmp_path: Path, ref: nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_meta._cli import main
    from support import SUPPORT

    marker = tmp_path / "pwned"
    path = _malicious("dcp", ref, tmp_path, marker)
    target = str(SUPPORT / "deferred_models.py") + ":NanoGPT"
    assert main(["load-check", target, str(path)]) == 1
    out, err = capsys.readouterr()
    assert not marker.exists()
    assert out == ""
    assert "weights_only=True" in err


def test_safe_globals_extend_the_dcp_metadata_policy(tmp_path: Path, ref: nn.Module) -> None:
    from fractions import Fraction

    from torch.distributed.checkpoint import FileSystemReader

    path = ml.write("dcp", ref, tmp_path)
    md_ = FileSystemReader(str(path)).read_metadata()
    md_.planner_data = {"extra": Fraction(1, 3)}
    with (path / ".metadata").open("wb") as f:
        pickle.dump(md_, f)
    m = ml.build("meta")
    with pytest.raises(lm.MetaTensorError, match=r"It needs: \['fractions.Fraction'\]"):
        load_checkpoint(m, path)
    load_checkpoint(m, path, safe_globals=[Fraction])
    state = ref.state_dict()
    for name, t in m.state_dict().items():
        assert torch.equal(t, state[name]), name


# -- 2. a failed load changes nothing --------------------------------------------------


def _odd_tensor(kind: str) -> torch.Tensor:
    if kind == "meta":
        return torch.empty(16, device="meta")
    if kind == "sparse":
        return torch.ones(16).to_sparse()
    if kind == "quantized":
        return torch.quantize_per_tensor(torch.ones(16), 0.1, 0, torch.qint8)
    return torch.nested.nested_tensor([torch.ones(8), torch.ones(8)])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("odd", ["meta", "sparse", "quantized", "nested"])
def test_unsupported_tensor_kinds_refused_up_front(
    odd: str, kind: str, tmp_path: Path, ref: nn.Module
) -> None:
    torch.save(_with_key(ref, LATE_KEY, _odd_tensor(odd)), tmp_path / "odd.pt")
    m = ml.build(kind)
    before = ml.snapshot(m)
    with pytest.raises(lm.MetaTensorError, match=rf"'{LATE_KEY}': a {odd} tensor") as info:
        load_checkpoint(m, tmp_path / "odd.pt")
    assert info.value.paths == (LATE_KEY,)
    ml.assert_unchanged(m, before)
    # the same key elsewhere (strict=False, unexpected) is listed, never read
    state = ref.state_dict()
    state["extra.odd"] = _odd_tensor(odd)
    torch.save(state, tmp_path / "extra.pt")
    report = load_checkpoint(ml.build(kind), tmp_path / "extra.pt", strict=False)
    assert report.unexpected == ["extra.odd"]


class Needy(nn.Parameter):
    """A Parameter subclass whose constructor needs an argument torch does not pass."""

    def __new__(cls, data: torch.Tensor, requires_grad: bool = True, *, tag: str) -> Needy:
        p = super().__new__(cls, data, requires_grad)
        p.tag = tag
        return p


@pytest.mark.parametrize("kind", ["meta", "deferred"])
def test_parameter_subclass_that_cannot_be_rebuilt_is_refused_before_the_swap(
    kind: str, tmp_path: Path, ref: nn.Module
) -> None:
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    m = ml.build(kind)
    ln = m.transformer["h"][1].ln_2
    ln.bias = Needy(torch.empty(16, device="meta"), tag="x")
    before = ml.snapshot(m)
    with pytest.raises(lm.MetaTensorError, match=rf"cannot load '{LATE_KEY}'.*Needy") as info:
        load_checkpoint(m, tmp_path / "m.pt")
    assert info.value.paths == (LATE_KEY,)
    ml.assert_unchanged(m, before)


@pytest.mark.parametrize("kind", KINDS)
def test_failure_during_the_swap_restores_the_module(
    kind: str, tmp_path: Path, ref: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    m = ml.build(kind)
    before = ml.snapshot(m)
    # fail on the 5th change the swap makes (a slot put, or a copy into a real tensor)
    hook = "_copy" if kind == "real" else "_put"
    real = getattr(_phases, hook)
    calls: list[int] = []

    def failing(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected failure")
        real(*args)

    monkeypatch.setattr(_phases, hook, failing)
    with pytest.raises(lm.MetaTensorError, match=r"injected failure.*put back as it was") as info:
        load_checkpoint(m, tmp_path / "m.pt")
    assert info.value.paths
    assert len(calls) >= 5  # four changes were made before the failure, then undone
    ml.assert_unchanged(m, before)
    monkeypatch.setattr(_phases, hook, real)
    load_checkpoint(m, tmp_path / "m.pt")  # and the module still loads afterwards
    state = ref.state_dict()
    for name, t in m.state_dict().items():
        assert torch.equal(t, state[name]), name
    if kind == "deferred":
        ml.assert_equal(m, ref)


class Stubborn(nn.Parameter):
    """A Parameter subclass whose copy_ raises (what a wrapper subclass may do)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.copy_:
            raise RuntimeError("Stubborn refuses copy_")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_real_target_whose_copy_fails_is_restored(tmp_path: Path, ref: nn.Module) -> None:
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    m = ml.build("real")
    ln = m.transformer["h"][1].ln_2
    ln.bias = Stubborn(ln.bias.detach().clone())
    before = ml.snapshot(m)
    with pytest.raises(lm.MetaTensorError, match=rf"'{LATE_KEY}' into the module failed") as info:
        load_checkpoint(m, tmp_path / "m.pt")
    assert info.value.paths == (LATE_KEY,)
    ml.assert_unchanged(m, before)


# -- 3. corrupt files never load silently ------------------------------------------------


def test_short_storage_record_with_valid_crcs_is_refused(tmp_path: Path, ref: nn.Module) -> None:
    path = ml.write("torch", ref, tmp_path)
    name = _largest_record(path)
    _rewrite_zip(path, lambda n, data: data[: len(data) // 2] if n == name else None)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC is valid
    for kind in KINDS:
        m = ml.build(kind)
        before = ml.snapshot(m)
        with pytest.raises(
            lm.MetaTensorError, match=r"holds \d+ bytes but its storage needs"
        ) as info:
            load_checkpoint(m, path)
        assert info.value.paths == (str(path),)
        ml.assert_unchanged(m, before)


def test_tensor_reaching_past_its_storage_is_refused(tmp_path: Path) -> None:
    torch.save({"weight": torch.ones(4, 4), "bias": torch.ones(4)}, tmp_path / "m.pt")

    def widen(name: str, data: bytes) -> bytes | None:
        # a pickle claiming a bigger view of the same 16-float storage
        return (
            data.replace(b"K\x04K\x04\x86", b"K\x08K\x04\x86")
            if name.endswith("data.pkl")
            else None
        )

    _rewrite_zip(tmp_path / "m.pt", widen)
    with torch.device("meta"):
        m = nn.Linear(4, 8)
    with pytest.raises(
        lm.MetaTensorError, match=r"'weight' \(\[8, 4\] torch.float32\) needs 128 bytes"
    ):
        load_checkpoint(m, tmp_path / "m.pt")
    assert m.weight.is_meta


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_flipped_bit_is_caught_with_verify(fmt: str, tmp_path: Path, ref: nn.Module) -> None:
    path = ml.write(fmt, ref, tmp_path)
    if fmt == "torch":
        offset, size = _record_data_offset(path, _largest_record(path))
        damaged = path
    else:
        damaged = next(path.glob("*.distcp"))
        # items are small torch zips: flip a byte of the largest tensor record in one
        from torch.distributed.checkpoint import FileSystemReader

        # The largest record loaded: of the tied wte/lm_head pair, whose keys
        # a distributed checkpoint stores twice, the last one is read.
        info = max(
            (
                i
                for index, i in FileSystemReader(str(path)).read_metadata().storage_data.items()
                if index.fqn != "transformer.wte.weight"
            ),
            key=lambda i: i.length,
        )
        offset, size = info.offset + info.length // 2, 1
    _flip_byte(damaged, offset + size // 2)
    for kind in KINDS:
        m = ml.build(kind)
        before = ml.snapshot(m)
        with pytest.raises(lm.MetaTensorError, match=r"CRC-32 of record .* is 0x") as info:
            load_checkpoint(m, path, verify=True)
        assert str(damaged) in info.value.paths
        ml.assert_unchanged(m, before)


def test_dcp_items_and_chunks_are_checked(tmp_path: Path, ref: nn.Module) -> None:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    def rewrite(change: Callable[[Any], None]) -> Path:
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        path = ml.write("dcp", ref, root)
        meta = FileSystemReader(str(path)).read_metadata()
        change(meta)
        with (path / ".metadata").open("wb") as f:
            pickle.dump(meta, f)
        return path

    def shorten(meta: Any) -> None:
        index = next(i for i in meta.storage_data if i.fqn == "transformer.h.0.attn.c_attn.weight")
        info = meta.storage_data[index]
        meta.storage_data[index] = type(info)(info.relative_path, info.offset, info.length - 100)

    def grow(meta: Any) -> None:
        md_ = meta.state_dict_metadata["transformer.ln_f.weight"]
        assert isinstance(md_, TensorStorageMetadata)
        md_.size = torch.Size([32])

    def escape(meta: Any) -> None:
        index = next(iter(meta.storage_data))
        info = meta.storage_data[index]
        meta.storage_data[index] = type(info)("../m.pt", info.offset, info.length)

    cases = [
        (shorten, r"is not a valid torch checkpoint|is truncated|is damaged"),
        (grow, r"describes 'transformer.ln_f.weight' \(\[32\]\) inconsistently"),
        (escape, r"names storage files \['../m.pt'\] outside its directory"),
    ]
    for change, match in cases:
        path = rewrite(change)
        for kind in KINDS:
            m = ml.build(kind)
            before = ml.snapshot(m)
            with pytest.raises(lm.MetaTensorError, match=match):
                load_checkpoint(m, path)
            ml.assert_unchanged(m, before)


# -- 4. the loaded tensors belong to the process -------------------------------------------


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in (".distcp", ".safetensors", ".bin"))


@pytest.mark.parametrize("fmt", ["torch", "torch-legacy", "safetensors", "sharded", "dcp"])
def test_overwriting_or_deleting_the_file_after_the_load_changes_nothing(
    fmt: str, tmp_path: Path, ref: nn.Module
) -> None:
    path = ml.write(fmt, ref, tmp_path)
    m = ml.build("deferred")
    load_checkpoint(m, path)
    for f in _data_files(path):
        with f.open("r+b") as h:  # in place: the same inode, new bytes
            h.write(os.urandom(f.stat().st_size))
    ml.assert_equal(m, ref)
    for f in _data_files(path):
        f.unlink()
    ml.assert_equal(m, ref)


_TOUCH_AFTER_TRUNCATE = """
import os, sys, torch
sys.path.insert(0, {tests!r})
import lightning_meta as lm
from support import load_models as ml
ref, path = ml.eager(), {path!r}
m = ml.build("meta")
lm.load_checkpoint(m, path)
for f in {files!r}:
    os.truncate(f, 0)
state = ref.state_dict()
for name, t in m.state_dict().items():
    if not t.is_meta:
        assert torch.equal(t, state[name]), name
print("ok")
"""


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "dcp"])
def test_truncating_the_file_after_the_load_changes_nothing_and_kills_nothing(
    fmt: str, tmp_path: Path, ref: nn.Module
) -> None:
    path = ml.write(fmt, ref, tmp_path)
    tests = str(Path(__file__).resolve().parents[1])
    files = [str(f) for f in _data_files(path)]
    script = _TOUCH_AFTER_TRUNCATE.format(tests=tests, path=str(path), files=files)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])  # < 0: killed by a signal
    assert out.stdout.strip() == "ok"


_LOADER = """
import sys, time, torch
import lightning_meta as lm
torch.manual_seed(0)
ref = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
path, ok, refused, wrong = {path!r}, 0, 0, 0
deadline = time.monotonic() + {seconds}
for _ in range({loads}):
    with torch.device("meta"):
        m = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
    try:
        lm.load_checkpoint(m, path)
    except lm.MetaTensorError:
        refused += 1
    else:
        ok += 1
        wrong += any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    if time.monotonic() > deadline:
        break
print(ok, refused, wrong)
"""

_TRUNCATOR = """
import os, sys, time
path, size, tail_at = {path!r}, {size}, {tail_at}
tail = open(path, "rb").read()[tail_at:]
deadline = time.monotonic() + {seconds}
while time.monotonic() < deadline and not os.path.exists(path + ".stop"):
    os.truncate(path, tail_at)
    time.sleep(0.001)
    with open(path, "r+b") as f:
        f.seek(tail_at)
        f.write(tail)
    time.sleep(0.001)
"""


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_truncation_during_the_load_is_an_error_or_a_correct_load_never_a_signal(
    fmt: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])  # 8 MiB
    path = tmp_path / f"m.{fmt}"
    if fmt == "pt":
        torch.save(ref.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(ref.state_dict(), str(path))
    size = path.stat().st_size
    seconds = 20
    truncator = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _TRUNCATOR.format(path=str(path), size=size, tail_at=size // 3, seconds=seconds),
        ]
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", _LOADER.format(path=str(path), loads=40, seconds=seconds)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        Path(str(path) + ".stop").touch()
        truncator.wait(timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])  # < 0: killed by a signal
    ok, refused, wrong = map(int, out.stdout.split())
    assert wrong == 0
    assert ok + refused > 0


# -- 5. every failure is ours ---------------------------------------------------------------


def test_pickle_stopping_on_an_empty_stack(tmp_path: Path, ref: nn.Module) -> None:
    path = ml.write("torch", ref, tmp_path)
    _rewrite_zip(path, lambda n, data: b"\x80\x02." if n.endswith("data.pkl") else None)
    m = ml.build("meta")
    with pytest.raises(
        lm.MetaTensorError, match=r"its data.pkl cannot be read \(truncated or corrupt"
    ):
        load_checkpoint(m, path)


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.05, 0.3, 0.9, 0.999])
def test_legacy_file_truncated_anywhere(fraction: float, tmp_path: Path, ref: nn.Module) -> None:
    path = ml.write("torch-legacy", ref, tmp_path)
    with path.open("r+b") as f:
        f.truncate(int(path.stat().st_size * fraction))
    m = ml.build("deferred")
    before = ml.snapshot(m)
    with pytest.raises(lm.MetaTensorError, match="m.pth") as info:
        load_checkpoint(m, path)
    assert str(path) in info.value.paths or info.value.paths == ()
    ml.assert_unchanged(m, before)


def test_garbage_distcp_is_ours(tmp_path: Path, ref: nn.Module) -> None:
    path = ml.write("dcp", ref, tmp_path)
    for f in path.glob("*.distcp"):
        f.write_bytes(os.urandom(f.stat().st_size))
    m = ml.build("real")
    before = ml.snapshot(m)
    with pytest.raises(lm.MetaTensorError, match=r"distcp"):
        load_checkpoint(m, path)
    ml.assert_unchanged(m, before)


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "dcp"])
def test_unreadable_file(fmt: str, open_dir: Path, ref: nn.Module) -> None:
    path = ml.write(fmt, ref, open_dir)
    target = path if path.is_file() else next(path.glob("*.distcp"))
    m = ml.build("meta")
    before = ml.snapshot(m)
    with (
        _unreadable(target),
        pytest.raises(lm.MetaTensorError, match=r"Permission denied.*Fix:") as info,
    ):
        load_checkpoint(m, path)
    assert str(target) in info.value.paths
    ml.assert_unchanged(m, before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path: Path, ref: nn.Module) -> None:
    path = ml.write("torch", ref, tmp_path)
    m = ml.build("meta")
    for device in ("cuda", "cuda:0", torch.device("cuda"), 0):
        with pytest.raises(lm.MetaTensorError, match=r"cuda|accelerator") as info:
            load_checkpoint(m, path, device=device)
        assert isinstance(info.value, ValueError)


def test_path_none_and_bad_flags(tmp_path: Path) -> None:
    m = ml.build("meta")
    with pytest.raises(lm.MetaTensorError, match=r"path=None \(NoneType\)") as info:
        load_checkpoint(m, None)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    with pytest.raises(lm.MetaTensorError, match=r"verify='yes'") as info:
        load_checkpoint(m, tmp_path, verify="yes")  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    # 'False' would be strict; None is the default (the module's strict_loading, else True)
    for strict in ("False", 0):
        with pytest.raises(lm.MetaTensorError, match=rf"strict={strict!r}") as info:
            load_checkpoint(m, tmp_path, strict=strict)  # type: ignore[arg-type]
        assert isinstance(info.value, TypeError)


def test_a_prefix_matching_nothing_offers_what_can_be_passed(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "lin.pt")  # keys without a dot
    with pytest.raises(lm.MetaTensorError, match=r"\['bias', 'weight'\].*Fix: pass prefix=''"):
        load_checkpoint(nn.Linear(2, 2), tmp_path / "lin.pt", prefix="model")


# -- 6. a key in two shards ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["sharded", "sharded-bin"])
@pytest.mark.parametrize("index_names", ["later", "earlier"])
def test_key_in_two_shards_is_refused(
    fmt: str, index_names: str, tmp_path: Path, ref: nn.Module
) -> None:
    path = ml.write(fmt, ref, tmp_path)
    index = next(path.glob("*.index.json"))
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    first, last = shards[0], shards[-1]
    key = next(k for k, v in data["weight_map"].items() if v == first)
    stale = torch.zeros_like(ref.state_dict()[key])
    if fmt == "sharded":
        from safetensors.torch import load_file, save_file

        part = load_file(str(path / last))
        save_file({**part, key: stale}, str(path / last))
    else:
        part = torch.load(path / last, weights_only=True)
        torch.save({**part, key: stale}, path / last)
    if index_names == "later":
        data["weight_map"][key] = last
        index.write_text(json.dumps(data))
    m = ml.build("meta")
    before = ml.snapshot(m)
    with pytest.raises(
        lm.MetaTensorError, match=rf"more than one shard.*'{key}' in \['{first}', '{last}'\]"
    ) as info:
        load_checkpoint(m, path)
    assert key in info.value.paths and first in info.value.paths and last in info.value.paths
    ml.assert_unchanged(m, before)


def test_shard_outside_the_index_directory_is_refused(tmp_path: Path, ref: nn.Module) -> None:
    path = ml.write("sharded", ref, tmp_path)
    index = next(path.glob("*.index.json"))
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[0]
    shutil.copy(path / shard, tmp_path / "elsewhere.safetensors")
    data["weight_map"] = {
        k: ("../elsewhere.safetensors" if v == shard else v) for k, v in data["weight_map"].items()
    }
    index.write_text(json.dumps(data))
    with pytest.raises(lm.MetaTensorError, match=r"outside its directory"):
        load_checkpoint(ml.build("meta"), path)


@pytest.mark.parametrize("fmt", ["sharded", "sharded-bin"])
@pytest.mark.parametrize("spelling", ["./{}", "parts/{}", "parts/./{}"])
def test_shards_named_inside_the_directory_load(
    fmt: str, spelling: str, tmp_path: Path, ref: nn.Module
) -> None:
    # transformers joins the index's names to its directory: './shard' and
    # 'parts/shard' load there; they were refused as a damaged checkpoint.
    path = ml.write(fmt, ref, tmp_path)
    index = next(path.glob("*.index.json"))
    data = json.loads(index.read_text())
    if spelling.startswith("parts/"):
        (path / "parts").mkdir()
        for shard in set(data["weight_map"].values()):
            shutil.move(path / shard, path / "parts" / shard)
    data["weight_map"] = {k: spelling.format(v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    for kind in KINDS:
        m = ml.build(kind)
        load_checkpoint(m, path)
        state = ref.state_dict()
        assert sorted(m.state_dict()) == sorted(state)
        for name, t in m.state_dict().items():
            assert torch.equal(t, state[name]), name


# -- the zero-copy option still works, and keeps its documented coupling ----------------------


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "sharded", "dcp", "torch-legacy"])
def test_mmap_mode_loads_the_same_values(fmt: str, tmp_path: Path, ref: nn.Module) -> None:
    path = ml.write(fmt, ref, tmp_path)
    for kind in KINDS:
        m = ml.build(kind)
        load_checkpoint(m, path, mmap=True, verify=True)
        state = ref.state_dict()
        for name, t in m.state_dict().items():
            assert torch.equal(t, state[name]), name


def test_default_load_reads_one_copy(tmp_path: Path) -> None:
    # a tensor viewing a small part of a big storage reads only that part
    big = torch.arange(1 << 20, dtype=torch.float32)
    torch.save({"weight": big[10:14].view(2, 2), "bias": big[20:22]}, tmp_path / "view.pt")
    with torch.device("meta"):
        m = nn.Linear(2, 2)
    report = load_checkpoint(m, tmp_path / "view.pt")
    assert torch.equal(m.weight, big[10:14].view(2, 2))
    assert torch.equal(m.bias, big[20:22])
    assert m.weight.untyped_storage().nbytes() < 1 << 10
    assert report.bytes_read == 24


def _save_nested_dicts(path: Path, depth: int) -> None:
    """A torch.save file of {"a": {"a": ...}} ``depth`` deep, its pickle written op by op:
    torch.save (the pickler) recurses per level, past Python 3.12's C stack limit."""
    torch.save({}, path)
    ops = (b"}" + b"\x8c\x01a") * depth + b"}" + b"s" * depth  # EMPTY_DICT, 'a', ..., SETITEMs
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(name for name in entries if name.endswith("/data.pkl"))
    entries[pkl] = b"\x80\x02" + ops + b"."  # PROTO 2 ... STOP
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)


def test_mappings_nested_past_any_state_dict_are_refused(tmp_path: Path) -> None:
    # A pickle nesting dicts 5,000 deep (no globals) exhausted the recursion
    # limit: RecursionError, which the CLI reported as a bug of the model.
    path = tmp_path / "deep.pt"
    _save_nested_dicts(path, 5000)
    module = nn.Linear(2, 2, device="meta")
    with pytest.raises(lm.MetaTensorError, match="nests mappings more than 256 levels"):
        load_checkpoint(module, path)
    assert module.weight.is_meta
    header = json.dumps({"a": [[[[0]]]]}).replace("[[[[0]]]]", "[" * 100_000 + "]" * 100_000)
    st = tmp_path / "deep.safetensors"
    st.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    with pytest.raises(lm.MetaTensorError, match="JSON header cannot be read"):
        load_checkpoint(module, st)


@pytest.mark.parametrize("layout", ["flat", "expanded", "transposed"])
def test_views_saved_in_a_checkpoint_load_as_tensors_of_their_own(
    layout: str, tmp_path: Path
) -> None:
    # Loaded into meta or deferred tensors, a view kept the whole saved storage
    # alive (parameters saved as views of one flat buffer: the memory of all of
    # them per parameter), and an expanded view became a parameter whose
    # elements share memory (an optimizer's foreach step raised).
    net = nn.Sequential(*(nn.Linear(64, 64, bias=False) for _ in range(4)))
    flat = torch.randn(4 * 64 * 64)
    if layout == "flat":
        state = {f"{i}.weight": flat[i * 4096 : (i + 1) * 4096].view(64, 64) for i in range(4)}
    elif layout == "expanded":
        state = {f"{i}.weight": flat[i * 64 : (i + 1) * 64].expand(64, 64) for i in range(4)}
    else:
        state = {f"{i}.weight": flat[i * 4096 : (i + 1) * 4096].view(64, 64).t() for i in range(4)}
    path = tmp_path / "views.pt"
    torch.save(state, path)
    for target in (
        net.to("meta"),
        lm.deferred_init(lambda: nn.Sequential(*(nn.Linear(64, 64, bias=False) for _ in range(4)))),
    ):
        load_checkpoint(target, path)
        for name, p in target.named_parameters():
            assert torch.equal(p, state[name]), name
            assert p.is_contiguous() and p.storage_offset() == 0
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
        torch.optim.SGD(target.parameters(), lr=0.1, foreach=True).step()  # no error


class _WithExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.scale = 1.0

    def get_extra_state(self) -> dict[str, float]:
        return {"scale": self.scale}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.scale = state["scale"]


@pytest.mark.parametrize("strict", [True, False])
def test_extra_state_is_refused_not_reported_as_unexpected_or_dropped(
    strict: bool, tmp_path: Path
) -> None:
    # The module's own state_dict() was refused as another module's
    # ("unexpected '_extra_state.scale'"), and with strict=False loaded
    # without its extra state (scale stayed 1.0 where load_state_dict gives 3.0).
    saved = _WithExtraState()
    saved.scale = 3.0
    path = tmp_path / "extra.pt"
    torch.save(saved.state_dict(), path)
    module = _WithExtraState().to("meta")
    with pytest.raises(lm.MetaTensorError, match=r"extra state.*\['_extra_state'\].*Fix:") as info:
        load_checkpoint(module, path, strict=strict)
    assert info.value.paths == ("_extra_state",)
    assert module.lin.weight.is_meta and module.scale == 1.0


def test_dtype_casts_a_deferred_tensor_skipped_for_its_shape(tmp_path: Path) -> None:
    # "dtype= gives the whole module what module.to() gives": a deferred head
    # whose shape differs from the file's stayed deferred in float32, and the
    # forward then mixed float16 and float32.
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))

    eager = build()
    path = tmp_path / "other_head.pt"
    torch.save({**eager[0].state_dict(prefix="0."), "1.weight": torch.zeros(5, 4)}, path)
    module = lm.deferred_init(build)
    report = load_checkpoint(module, path, strict=False, dtype=torch.float16)
    assert {p.dtype for p in module.parameters()} == {torch.float16}
    assert not lm.is_deferred(module)
    assert torch.equal(module[1].weight, eager[1].weight.half())
    assert "1.weight" in report.replayed
    module = lm.deferred_init(build)
    load_checkpoint(module, path, strict=False)  # no dtype=: left deferred, as before
    assert lm.is_deferred(module[1].weight)


def test_parameters_sharing_memory_get_the_last_names_values(tmp_path: Path) -> None:
    # Two distinct Parameters on one memory (b = nn.Parameter(a.data)), the file
    # holding b before a: load_checkpoint copied in file order (a's values),
    # load_state_dict leaves the last name's in state_dict order (b's).
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.zeros(4))
            self.b = nn.Parameter(self.a.data)

    path = tmp_path / "ba.pt"
    torch.save({"b": torch.full((4,), 2.0), "a": torch.full((4,), 1.0)}, path)
    eager, module = Shared(), Shared()
    eager.load_state_dict(torch.load(path))
    load_checkpoint(module, path)
    assert torch.equal(module.a, eager.a) and torch.equal(module.b, eager.b)
    assert module.a.tolist() == [2.0] * 4
