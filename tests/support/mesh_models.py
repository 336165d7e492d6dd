"""A tiny Llama-style model and its parallelize plans, for the mesh runners and Fabric tests.

Every dimension divides by 4, so it shards over 1, 2 and 4 ranks and over a
2x2 (data x tensor) mesh. It has what exact materialization must get right:
random Linear and Embedding weights, a parent-level re-initialisation, RMSNorm
ones and a random non-persistent buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DIM, HEADS, HIDDEN, VOCAB, LAYERS, SEQ = 16, 4, 32, 32, 2, 8


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(DIM, DIM, bias=False)
        self.wk = nn.Linear(DIM, DIM, bias=False)
        self.wv = nn.Linear(DIM, DIM, bias=False)
        self.wo = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds HEADS / tp of them.
        q, k, v = (
            w(x).view(b, s, -1, DIM // HEADS).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(DIM)
        self.attention = Attention()
        self.ffn_norm = nn.RMSNorm(DIM)
        self.feed_forward = FeedForward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.register_buffer("jitter", torch.randn(DIM) * 1e-3, persistent=False)
        # Parent-level re-initialisation, as torchtitan's init_weights does.
        for layer in self.layers:
            nn.init.trunc_normal_(layer.attention.wo.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens) + self.jitter
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


class Tied(nn.Module):
    """Tied embedding and head whose dims do not divide by 2 or 4: uneven FSDP2 shards.

    7 rows over 2 ranks are 4 + 3, over 4 ranks 2 + 2 + 2 + 1; ``scale`` has one
    row, so every rank but the first holds an empty shard of it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.emb.weight
        self.scale = nn.Parameter(torch.randn(1))


def shard_tied(model: nn.Module, mesh: Any) -> nn.Module:
    """A ``parallelize_fn`` for `Tied`: FSDP2 over the data parallel mesh, dim 0."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=mesh["data_parallel"])
    return model


def deferred(cls: type[nn.Module] | None = None) -> Any:
    """``cls()`` (default `Llama`) built under ``lm.deferred_init()`` after ``manual_seed(0)``."""
    import lightning_meta as lm

    torch.manual_seed(0)
    with lm.deferred_init():
        return (cls or Llama)()


def eager(cls: type[nn.Module] | None = None) -> Any:
    """``cls()`` (default `Llama`) built eagerly after ``manual_seed(0)``."""
    torch.manual_seed(0)
    return (cls or Llama)()


def train(fabric: Any, model: nn.Module, optimizer: Any = None) -> list[float]:
    """Three SGD (lr 0.5, unless ``optimizer`` is given) steps under ``fabric``; the losses."""
    if optimizer is None:
        optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.5))
    losses = []
    for tokens, targets in batches():
        optimizer.zero_grad()
        loss = loss_of(model, tokens, targets)
        fabric.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    return losses


def batches(n: int = 3, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        t = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def loss_of(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def tensor_parallel(model: nn.Module, mesh: Any) -> None:
    """The Llama plan (torchtitan's, without sequence parallelism)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    parallelize_module(
        model,
        mesh,
        {"output": ColwiseParallel(output_layouts=Replicate())},
    )
    for layer in model.layers:  # type: ignore[union-attr]
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
        }
        parallelize_module(layer, mesh, plan)


def data_parallel(model: nn.Module, mesh: Any, shard_dim: int = 0) -> None:
    """FSDP2 per block and at the root; ``shard_dim=1`` shards 2-D weights on dim 1."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def place(p: nn.Parameter) -> Shard:
        return Shard(shard_dim if p.ndim > shard_dim else 0)

    for layer in model.layers:  # type: ignore[union-attr]
        fully_shard(layer, mesh=mesh, shard_placement_fn=place)
    fully_shard(model, mesh=mesh, shard_placement_fn=place)


def parallelize(model: nn.Module, mesh: Any) -> nn.Module:
    """Lightning's ``parallelize_fn``: TP over ``tensor_parallel`` when >1, then FSDP2 over ``data_parallel``."""
    if mesh["tensor_parallel"].size() > 1:
        tensor_parallel(model, mesh["tensor_parallel"])
    if mesh["data_parallel"].size() > 1 or mesh["tensor_parallel"].size() == 1:
        data_parallel(model, mesh["data_parallel"])
    return model


def full(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too), as full CPU tensors."""
    from torch.distributed.tensor import DTensor

    # Fabric's wrapper, and DDP's inside it, prefix the names; the tensors are the model's.
    module = getattr(module, "_original_module", None) or module
    named = [*module.named_parameters(), *module.named_buffers()]
    return {
        # FSDP1's auto wrapping puts its wrappers inside the model: their
        # names say where the wrapper is, not which tensor (eager has none).
        k.replace("_fsdp_wrapped_module.", ""): (v.full_tensor() if isinstance(v, DTensor) else v)
        .detach()
        .cpu()
        .clone()
        for k, v in named
    }


def unequal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The names whose tensors differ (or exist on one side only)."""
    keys = sorted(a.keys() | b.keys())
    return [k for k in keys if k not in a or k not in b or not torch.equal(a[k], b[k])]


def trainer_module(deferred: bool) -> Any:
    """A LightningModule building `Llama` in `configure_model` (deferred or eager) and parallelizing it."""
    import lightning as L

    import lightning_meta as lm

    class LlamaModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: nn.Module | None = None
            self.losses: list[float] = []
            self.at_start: dict[str, torch.Tensor] = {}

        def configure_model(self) -> None:
            if self.model is not None:
                return
            torch.manual_seed(0)
            if deferred:
                with lm.deferred_init():
                    self.model = Llama()
            else:
                self.model = Llama()
            parallelize(self.model, self.device_mesh)

        def on_fit_start(self) -> None:
            assert self.model is not None
            self.at_start = full(self.model)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            assert self.model is not None
            loss = loss_of(self.model, *batch)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return LlamaModule()
