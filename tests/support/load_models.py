"""Tiny models and real checkpoint files of every format for the loading tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta._deferred._handles import handle_of
from support import deferred_models as md

SEED = 0


def eager() -> nn.Module:
    torch.manual_seed(SEED)
    return md.NanoGPT()


def build(kind: str) -> nn.Module:
    """Return a NanoGPT that is ``"meta"``, ``"deferred"`` or ``"real"`` (other values than the file)."""
    torch.manual_seed(SEED + 1)
    if kind == "meta":
        with torch.device("meta"):
            return md.NanoGPT()
    if kind == "deferred":
        return lm.deferred_init(md.NanoGPT)
    return md.NanoGPT()


class Wrapper(L.LightningModule):
    """A LightningModule whose network is ``self.model``, optionally deferred."""

    def __init__(self, deferred: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(SEED)
        self.model = lm.deferred_init(md.NanoGPT) if deferred else md.NanoGPT()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        h = self.model.transformer["wte"](x)
        return self.model.lm_head(h).logsumexp(-1).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> torch.utils.data.DataLoader[Any]:
    data = torch.utils.data.TensorDataset(torch.randint(0, 64, (8, 4)))
    return torch.utils.data.DataLoader(data, batch_size=4)


def trainer(root: Path, steps: int) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root, max_steps=steps, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def write_lightning(root: Path) -> tuple[Path, nn.Module]:
    """Train one step and save a real Lightning ``.ckpt``; return it and the trained network."""
    model = Wrapper()
    t = trainer(root, 1)
    t.fit(model, loader())
    path = root / "wrapper.ckpt"
    t.save_checkpoint(path)
    return path, model.model


def write_dcp_lightning(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Save what ``ModelParallelStrategy`` saves: ``state_dict`` and optimizer states, via DCP."""
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

    converted = {
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "optimizer_0": {"state": {"0": {"momentum_buffer": torch.ones(3)}}},
    }
    _distributed_checkpoint_save(converted, path)
    return path


def write(fmt: str, ref: nn.Module, root: Path) -> Path:
    """Write ``ref``'s weights in format ``fmt`` under ``root`` and return the path to load."""
    state = ref.state_dict()
    if fmt == "torch":
        torch.save(state, root / "m.pt")
        return root / "m.pt"
    if fmt == "torch-legacy":
        torch.save(state, root / "m.pth", _use_new_zipfile_serialization=False)
        return root / "m.pth"
    if fmt == "safetensors":
        from safetensors.torch import save_model

        save_model(ref, str(root / "m.safetensors"))
        return root / "m.safetensors"
    if fmt in ("sharded", "sharded-bin"):
        from huggingface_hub import save_torch_state_dict

        out = root / fmt
        out.mkdir()
        save_torch_state_dict(state, out, max_shard_size="8KB", safe_serialization=fmt == "sharded")
        return out
    if fmt == "dcp":
        from torch.distributed.checkpoint import save

        save({k: v.clone() for k, v in state.items()}, checkpoint_id=root / "dcp")
        return root / "dcp"
    if fmt == "dcp-lightning":
        return write_dcp_lightning(state, root / "dcp-lightning")
    raise ValueError(fmt)


def slots(m: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(m.named_parameters(remove_duplicate=False))
    out.update(m.named_buffers(remove_duplicate=False))
    return out


def snapshot(m: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, bool]]:
    """Record, per name, the tensor object, a copy of its values (``None`` on meta) and deferral."""
    return {
        n: (t, None if t.is_meta else t.detach().clone(), handle_of(t) is not None)
        for n, t in slots(m).items()
    }


def assert_unchanged(
    m: nn.Module, before: dict[str, tuple[torch.Tensor, torch.Tensor | None, bool]]
) -> None:
    """Every slot holds the same object, with the same values, meta and deferred as before."""
    now = slots(m)
    assert sorted(now) == sorted(before)
    for name, (obj, values, deferred) in before.items():
        t = now[name]
        assert t is obj, name
        assert t.is_meta == (values is None), name
        assert (handle_of(t) is not None) == deferred, name
        if values is not None:
            assert torch.equal(t, values), name


def assert_equal(
    m: nn.Module, ref: nn.Module, cast: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    """Every parameter and buffer of ``m`` equals ``ref``'s, bit for bit."""
    mine, theirs = slots(m), slots(ref)
    assert sorted(mine) == sorted(theirs)
    for name, t in theirs.items():
        want = cast(t) if cast is not None else t
        assert not mine[name].is_meta, name
        assert mine[name].dtype == want.dtype, name
        assert torch.equal(mine[name], want), name


def write_payload(path: str) -> None:
    """The 'malicious' payload: proof that unpickling ran code."""
    Path(path).write_text("ran")


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (write_payload, (self.marker,))
