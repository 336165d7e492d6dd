"""Models for the "deferred program is the eager program" regression tests (issue #11)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm


class WithContainers(nn.Module):
    """Tensors kept outside parameters and buffers: list, dict, tuple and nested attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.noise = [torch.randn(4), torch.randn(2, 2)]
        self.table = {"freqs": torch.arange(4) / 4.0, "nested": [torch.rand(3)]}
        self.pair = (torch.randn(3) * 2, "label")
        self.shared = [self.fc.weight]  # the same object as a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.noise[0] + self.table["freqs"]


class Tagged(nn.Parameter):
    """A Parameter subclass with its own constructor and attributes."""

    def __new__(cls, data: torch.Tensor, tag: str = "") -> Tagged:
        made = super().__new__(cls, data)
        made.from_new = tag.upper()
        return made  # type: ignore[return-value]

    def __init__(self, data: torch.Tensor, tag: str = "") -> None:
        self.tag = tag


class Plain(nn.Parameter):
    """A Parameter subclass without a constructor of its own."""


class WithParameterSubclasses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Tagged(torch.randn(3), tag="decay")
        self.b = Plain(torch.randn(2))
        self.c = nn.Parameter(torch.randn(2))


class ReseedsItsGenerator(nn.Module):
    """A custom generator reseeded inside __init__."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator()
        g.manual_seed(1)
        self.a = nn.Parameter(torch.randn(4, generator=g))
        g.manual_seed(2)
        self.b = nn.Parameter(torch.randn(4, generator=g))
        g.manual_seed(1)  # the same seed again: a state the generator already had
        self.c = nn.Parameter(torch.empty(3, 3))
        nn.init.normal_(self.c, generator=g)
        self.d = nn.Parameter(torch.randn(2))


class Empty(nn.Module):
    """Uninitialised memory: a parameter never filled and a buffer filled half way."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.raw = nn.Parameter(torch.empty(2, 3))
        self.register_buffer("halfway", torch.empty(4))
        self.halfway[:2] = 1.0
        self.register_buffer("full", torch.empty(4))
        self.full[:2] = 1.0
        self.full[2:] = 2.0


class Cached(nn.Module):
    """A non-persistent cache made with torch.empty, as KV caches are: in no state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(3, 3)
        self.block.register_buffer("cache", torch.empty(2, 3), persistent=False)


class Truncated(nn.Module):
    """torch's trunc_normal_ redraws until every value is in range (data-dependent loop)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(64, 32))
        nn.init.trunc_normal_(self.w, std=1.0, a=-1.0, b=1.0, generator=generator)
        self.v = nn.Parameter(torch.empty(100))
        nn.init.trunc_normal_(self.v, std=0.02, generator=generator)
        self.u = nn.Parameter(torch.empty(50))
        nn.init.trunc_normal_(self.u, mean=0.0, std=1.0, a=0.5, b=3.0, generator=generator)


class ReadsConstants(nn.Module):
    """Construction that reads values computed from Python numbers (as timm does)."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        rates = [x.item() for x in torch.linspace(0, 0.1, depth)]
        listed = torch.linspace(0, 0.2, depth).tolist()
        widths = torch.tensor([4, 8, 4]).numpy()
        self.blocks = nn.ModuleList(nn.Linear(int(w), int(w)) for w in widths)
        self.rates = rates
        self.listed = listed
        self.register_buffer("where", torch.tensor([0.0, 1.0, 0.0, 2.0]).nonzero())
        if bool((torch.arange(3) > 1).any()):
            self.register_buffer("flag", torch.ones(1))
        self.scale = nn.Parameter(torch.randn(int(torch.tensor(3).item())))


def loader(n: int = 32, batch_size: int = 8) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)


class ContainerLM(L.LightningModule):
    """A LightningModule whose deferred network keeps tensors in a list attribute."""

    def __init__(self, deferred: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = lm.deferred_init(WithContainers) if deferred else WithContainers()
        self.head = nn.Linear(4, 1)
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = ((self.head(self.net(x)) - y) ** 2).mean()
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class EscapingLM(L.LightningModule):
    """A deferred tensor kept in a closure: no module holds it, so it cannot be materialized."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        with lm.deferred_init():
            self.net = nn.Linear(4, 1)
            bias = torch.randn(1)
        self.shift = lambda t: t + bias

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.shift(self.net(x)) - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def teacher() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def student() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))


class Distill(L.LightningModule):
    """A teacher loaded from a checkpoint and a student, both built deferred one after another."""

    def __init__(self, teacher_path: str | None, deferred: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        if deferred:
            self.teacher = lm.deferred_init(teacher)
            self.student = lm.deferred_init(student)
            assert teacher_path is not None
            lm.load_checkpoint(self.teacher, teacher_path)
        else:
            self.teacher = teacher()
            self.student = student()
            if teacher_path is not None:
                self.teacher.load_state_dict(torch.load(teacher_path, weights_only=True))
        self.teacher.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        return ((self.student(x) - self.teacher(x)) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=0.05)


def trainer(steps: int = 2, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": steps,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "callbacks": [lm.MetaGuard()],
    }
    options.update(kwargs)
    return L.Trainer(**options)


def fit_as_eager(
    make: Callable[[bool], L.LightningModule], steps: int = 3
) -> tuple[L.LightningModule, L.LightningModule]:
    """Fit ``make(False)`` (eager) and ``make(True)`` (deferred) under MetaGuard, each from
    seed 1, and assert the same losses and ``state_dict``; return (eager, deferred)."""
    runs = []
    for deferred in (False, True):
        model = make(deferred)
        torch.manual_seed(1)
        trainer(steps=steps).fit(model, loader())
        runs.append(model)
    eager, model = runs
    assert model.losses == eager.losses
    for (name, got), want in zip(
        model.state_dict().items(), eager.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
    return eager, model


def build_seeded(builder: Callable[[], nn.Module], deferred: bool) -> nn.Module:
    """``builder()`` after ``torch.manual_seed(0)``, eagerly or inside ``lm.deferred_init()``."""
    torch.manual_seed(0)
    if not deferred:
        return builder()
    with lm.deferred_init():
        return builder()
