"""References to deferred tensors taken before materialize: the real tensors, or a loud refusal.

In eager construction ``w = model.lin.weight`` and an optimizer built on
``model.parameters()`` hold the parameters themselves. Before, materialize put
new objects in the module: ``w`` stayed a meta tensor (``x @ w.T`` on the CPU
returned uninitialised memory without an error) and the optimizer trained
nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_meta import MetaTensorError, deferred_init, materialize
from support import program_models as pm
from support.program_models import build_seeded


def test_a_local_taken_after_the_block_is_the_real_parameter() -> None:
    eager = build_seeded(lambda: nn.Linear(4, 3), deferred=False)
    module = build_seeded(lambda: nn.Linear(4, 3), deferred=True)
    w, b = module.weight, module.bias
    materialize(module)
    assert w is module.weight and b is module.bias
    assert type(w) is nn.Parameter and w.requires_grad
    assert torch.equal(torch.ones(1, 4) @ w.T + b, torch.ones(1, 4) @ eager.weight.T + eager.bias)


class _TiedLM(nn.Module):
    """An embedding tied to the head, two blocks and a norm between them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Tanh()) for _ in range(2)
        )
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _train(
    builder: Callable[[], nn.Module],
    deferred: bool,
    make: Callable[[nn.Module], None],
    optim: Callable[[Any], torch.optim.Optimizer],
    steps: int = 3,
) -> nn.Module:
    module = build_seeded(builder, deferred)
    opt = optim(module.parameters())  # the eager order: model, optimizer, then setup
    if deferred:
        make(module)
    x = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        module(x).float().pow(2).mean().backward()
        opt.step()
    return module


def _whole(module: nn.Module) -> None:
    materialize(module)


def _block_by_block(module: nn.Module) -> None:
    # one submodule at a time, the tied head before the embedding it shares
    for name in ("head", "blocks.1", "blocks.0", ""):
        materialize(module.get_submodule(name))


@pytest.mark.parametrize("make", [_whole, _block_by_block], ids=["whole", "block by block"])
@pytest.mark.parametrize(
    "optim",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=0.01),
    ],
    ids=["sgd", "adamw"],
)
def test_an_optimizer_built_before_materialize_trains_as_eager(
    make: Callable[[nn.Module], None], optim: Callable[[Any], torch.optim.Optimizer]
) -> None:
    eager = _train(_TiedLM, False, make, optim)
    module = _train(_TiedLM, True, make, optim)
    assert module.head.weight is module.emb.weight  # the tie
    for (name, got), want in zip(
        module.state_dict().items(), eager.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name


class _Shared(nn.Module):
    """A tie, a view kept as an attribute (with autograd history), memory shared by two
    parameters (`_weight=`), and buffers viewing one another."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight
        self.row = self.emb.weight[0]
        self.part = nn.Embedding(2, 4, _weight=self.emb.weight.data[:2])
        self.register_buffer("table", torch.arange(12.0).reshape(3, 4))
        self.register_buffer("first", self.table[0])


def test_ties_views_and_shared_memory_keep_their_identity() -> None:
    eager = build_seeded(_Shared, deferred=False)
    module = build_seeded(_Shared, deferred=True)
    held = {name: getattr(module, name) for name in ("row", "table", "first")}
    held |= {"emb": module.emb.weight, "part": module.part.weight}
    materialize(module.part)  # shares memory with emb: replayed ahead, held
    materialize(module)
    assert held["emb"] is module.emb.weight is module.head.weight
    assert held["part"] is module.part.weight
    assert all(held[n] is getattr(module, n) for n in ("row", "table", "first"))
    assert module.row.grad_fn is not None  # still carries the gradient into emb.weight
    with torch.no_grad():
        for m in (eager, module):
            m.emb.weight.add_(1.0)
            m.table.add_(1.0)
    for name in ("row", "first"):
        assert torch.equal(getattr(module, name), getattr(eager, name)), name
    assert torch.equal(module.part.weight, eager.part.weight)
    for (name, got), want in zip(
        module.state_dict().items(), eager.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name


def test_parameter_subclasses_keep_class_attributes_and_identity() -> None:
    module = build_seeded(pm.WithParameterSubclasses, deferred=True)
    module.c.requires_grad_(False)
    held = [module.a, module.b, module.c]
    module.a.late = 1
    materialize(module)
    assert all(h is p for h, p in zip(held, [module.a, module.b, module.c], strict=True))
    assert type(held[0]) is pm.Tagged and held[0].tag == "decay" and held[0].late == 1
    assert type(held[1]) is pm.Plain and not held[2].requires_grad


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scale", torch.rand(3))


def test_materialize_to_a_dtype_keeps_parameters_and_refuses_a_stale_buffer() -> None:
    # eager's module.to(dtype) keeps each parameter's object, and gives a cast
    # buffer a new one: a reference taken before holds the float32 values.
    eager = build_seeded(_WithBuffer, deferred=False).to(torch.bfloat16)
    module = build_seeded(_WithBuffer, deferred=True)
    weight, scale = module.lin.weight, module.scale
    materialize(module, dtype=torch.bfloat16)
    assert weight is module.lin.weight and weight.dtype == torch.bfloat16
    assert torch.equal(weight, eager.lin.weight)
    assert torch.equal(module.scale, eager.scale)
    assert scale.shape == (3,) and scale.is_meta  # metadata still answers
    with pytest.raises(MetaTensorError, match=r"'scale'.*module\.to\(\) replaces a buffer.*Fix:"):
        _ = scale * 2
    with pytest.raises(MetaTensorError, match=r"'scale'") as info:
        scale.tolist()
    assert info.value.paths == ("scale",)


def test_a_reference_that_cannot_be_swapped_refuses_on_first_use() -> None:
    # A view of the meta weight taken after the block holds its C++ tensor:
    # the weight's object cannot take the real contents over.
    eager = build_seeded(lambda: nn.Linear(4, 3), deferred=False)
    module = build_seeded(lambda: nn.Linear(4, 3), deferred=True)
    w = module.weight
    view = w[0]
    materialize(module)
    assert torch.equal(module.weight, eager.weight)  # the module itself is exact
    assert w is not module.weight
    with pytest.raises(MetaTensorError, match=r"'weight'.*swap_tensors.*Fix: read 'weight'"):
        _ = torch.ones(1, 4) @ w.T
    opt = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(MetaTensorError, match=r"'weight'"):
        opt.step()  # reads .grad: no silent step that trains nothing
    assert view.is_meta  # (the view itself stays meta: a known gap)


class _OptimizerInInit(L.LightningModule):
    """A LightningModule that creates its optimizer in __init__, on the deferred parameters."""

    def __init__(self, deferred: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        if deferred:
            with deferred_init():
                self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        else:
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1)
        self.losses: list[float] = []

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.opt


def test_metaguard_trains_an_optimizer_created_in_init_as_eager() -> None:
    pm.fit_as_eager(_OptimizerInInit)


class _FrozenByHook(nn.Module):
    """A weight frozen by a gradient hook registered in ``__init__`` (in the block)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.lin.weight.register_hook(lambda g: g * 0)


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_gradient_hooks_registered_in_or_after_the_block_run_as_eagerly(
    dtype: torch.dtype | None,
) -> None:
    # swap_tensors moves the C++ side of a tensor's hooks with its data: the
    # real parameter ran none of them (a gradient of 2 where eager's is 0).
    def run(deferred: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        module = build_seeded(_FrozenByHook, deferred)
        hits: list[int] = []
        handle = module.lin.bias.register_post_accumulate_grad_hook(lambda p: hits.append(1))
        if deferred:
            materialize(module, dtype=dtype)
        elif dtype is not None:
            module.to(dtype)
        module.lin(torch.ones(2, 4, dtype=dtype)).sum().backward()
        handle.remove()  # the handle still reaches the table the hook runs from
        module.lin(torch.ones(2, 4, dtype=dtype)).sum().backward()
        return module.lin.weight.grad, module.lin.bias.grad, len(hits)

    eager, deferred = run(False), run(True)
    assert deferred[2] == eager[2] == 1
    assert torch.equal(deferred[0], eager[0]) and not deferred[0].any()
    assert torch.equal(deferred[1], eager[1])
