"""A small tensor-parallel-ready language model, and an independent per-rank memory measurement.

The measurement does not use the package: it reads the CPU allocator's own
events from ``torch.profiler`` (``profile_memory=True``), every allocation and
free of tensor storage with its byte count, including storage resizes (FSDP2
frees and re-allocates unsharded parameters that way) and what DDP, FSDP2 and
DTensor allocate inside torch. The profiler runs from before the model is
built, so the running sum of the events is the bytes alive in the process
(what torch allocated on this thread); the peak of that sum inside the
measured step is the rank's peak. What gloo allocates in its own threads
outside torch's allocator is not seen (nor does NCCL allocate through it on a
GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PLAN",
    "AllocatorPeak",
    "TinyLM",
    "allocator_peak",
    "first_loss",
    "settled_collectives",
]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1: the local head count under tensor parallelism
        q, k, v = (
            f(x).view(b, s, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.o(y.transpose(1, 2).reshape(b, s, -1))
        return out


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(F.silu(self.gate(x)) * self.up(x))
        return out


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class TinyLM(nn.Module):
    """A Llama-shaped decoder: embedding, blocks of attention and gated MLP, norm, head."""

    def __init__(
        self,
        dim: int = 256,
        heads: int = 8,
        hidden: int = 512,
        vocab: int = 1024,
        layers: int = 4,
        tables: int = 0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        # ``tables`` > 0: two fixed (tables, dim) feature tables held as buffers, which
        # DDP broadcasts before every forward (the review of 2026-12-07, fourth session)
        self.tables = tables
        if tables:
            self.register_buffer("table_a", torch.zeros(tables, dim))
            self.register_buffer("table_b", torch.zeros(tables, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.tables:
            x = x + self.table_a[ids] + self.table_b[ids]
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(self.norm(x))
        return out


#: the tensor-parallel plan of TinyLM, as estimate takes it and parallelize_module gets it
PLAN = {
    "blocks.*.attn.q": "colwise",
    "blocks.*.attn.k": "colwise",
    "blocks.*.attn.v": "colwise",
    "blocks.*.attn.o": "rowwise",
    "blocks.*.mlp.gate": "colwise",
    "blocks.*.mlp.up": "colwise",
    "blocks.*.mlp.down": "rowwise",
}


def first_loss(out: torch.Tensor) -> torch.Tensor:
    """The loss of the measured runs and of the estimates: a mean of squares of the logits."""
    return out.float().pow(2).mean()


@dataclass
class AllocatorPeak:
    """The bytes of tensor storage alive at the peak of the measured window, and at its start."""

    peak_bytes: int
    start_bytes: int


_COLLECTIVE = "settled-collective"
_WINDOW = "measured-window"


def _walk(nodes: list[Any]) -> Iterator[Any]:
    for n in nodes:
        yield n
        yield from _walk(n.children)


def _collective_end(node: Any) -> int | None:
    """When the outermost collective around an allocation returned, if it is inside one."""
    end = None
    parent = node.parent
    while parent is not None:
        if parent.name == _COLLECTIVE or parent.name.startswith("c10d::"):
            end = parent.end_time_ns
        parent = parent.parent
    return end


def _timeline(prof: Any) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Return the allocator's ``(time, +/- bytes)`` events, and the measured windows.

    Reads every allocation and free with its address. A block allocated
    inside a collective whose free was not recorded was freed by gloo's
    worker thread (a backend temporary, such as the input copy of gloo's
    reduce-scatter or the flat buffer of DDP's first broadcast): the
    collective is synchronous, so it counts as freed when the collective
    returned. The flat buffer DDP's construction-time broadcast coalesces
    the parameters into (``aten::flatten_dense_tensors`` in C++, outside any
    recorded collective) is freed by gloo's thread once that broadcast
    ends, before the first step: made before the first measured window and
    never seen freed, it counts as freed when that window began. Any other
    block whose address is handed out again was freed by then, at the latest.
    """
    from torch._C._profiler import _EventType

    nodes = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    windows = sorted((n.start_time_ns, n.end_time_ns) for n in nodes if n.name == _WINDOW)
    allocations = sorted(
        (n for n in nodes if n.typed[0] == _EventType.Allocation), key=lambda n: n.start_time_ns
    )
    events: list[tuple[int, int]] = []
    alive: dict[int, tuple[int, int | None]] = {}  # ptr -> (bytes, end of its collective)
    first = windows[0][0] if windows else None

    def end_of(node: Any) -> int | None:
        end = _collective_end(node)
        if end is None and first is not None and node.start_time_ns < first:
            parent = node.parent
            while parent is not None and parent.name != "aten::flatten_dense_tensors":
                parent = parent.parent
            if parent is not None:  # DDP's first broadcast: gone before the first window
                return first - 1
        return end

    def unrecorded(ptr: int, reused_at: int | None) -> None:
        size, end = alive.pop(ptr)
        if end is not None or reused_at is not None:
            events.append((end if end is not None else reused_at, -size))

    for n in allocations:
        a = n.typed[1]
        if a.alloc_size > 0:
            if a.ptr in alive:  # reused: its free was not recorded, it was freed before now
                unrecorded(a.ptr, n.start_time_ns)
            alive[a.ptr] = (a.alloc_size, end_of(n))
            events.append((n.start_time_ns, a.alloc_size))
        elif a.ptr in alive:
            del alive[a.ptr]
            events.append((n.start_time_ns, a.alloc_size))
    for ptr in list(alive):
        unrecorded(ptr, None)
    events.sort()
    return events, windows


def _window_peak(events: list[tuple[int, int]], start: int, end: int) -> AllocatorPeak:
    alive = 0
    peak = at_start = None
    for t, nbytes in events:
        if t > end:
            break
        if t >= start and at_start is None:
            at_start = peak = alive
        alive += nbytes
        if t >= start:
            peak = max(peak or 0, alive)
    return AllocatorPeak(int(peak or alive), int(at_start or alive))


@contextlib.contextmanager
def allocator_peak() -> Iterator[Callable[[], contextlib.AbstractContextManager[None]]]:
    """Profile the CPU allocator; yield ``window()``, each use of which marks a measured step.

    After the block, ``window.result`` holds the :class:`AllocatorPeak` of the
    measured step with the lowest peak: a buffer that gloo's worker thread
    releases late when the CPU is busy adds to one step's peak only (seen
    under load as a whole gradient-sized buffer on one DDP rank), while
    what the step itself allocates is the same in every step.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    @contextlib.contextmanager
    def window() -> Iterator[None]:
        with record_function(_WINDOW):
            yield

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield window
    events, windows = _timeline(prof)
    peaks = [_window_peak(events, start, end) for start, end in windows]
    window.result = min(peaks, key=lambda p: p.peak_bytes)  # type: ignore[attr-defined]


def _holders(t: torch.Tensor) -> tuple[int, int]:
    """References to ``t`` and to its storage, held by tensors (and by gloo's work)."""
    return t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)


@contextlib.contextmanager
def settled_collectives() -> Iterator[None]:
    """Make synchronous collectives wait until gloo's worker thread released their tensors."""
    import time

    import torch.distributed as dist

    names = [
        n
        for n in (
            "all_gather_single",
            "reduce_scatter_single",
            "all_gather_into_tensor",
            "reduce_scatter_tensor",
            "all_reduce",
            "broadcast",
            # DDP's buffer broadcast before each forward: its flat copy of the
            # buffers is gloo's to free, late when the CPU is busy (seen at 2 cores
            # under -n 2 as one more copy in every measured step, 18 % over)
            "_broadcast_coalesced",
        )
        if hasattr(dist, n)
    ]
    saved = {n: getattr(dist, n) for n in names}

    def settled(original: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            from torch.profiler import record_function

            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            before = [_holders(t) for t in tensors]
            with record_function(_COLLECTIVE):
                out = original(*args, **kwargs)
                if not kwargs.get("async_op"):
                    deadline = time.monotonic() + 2.0
                    while time.monotonic() < deadline and any(
                        _holders(t) != b for t, b in zip(tensors, before, strict=True)
                    ):
                        time.sleep(0)
            return out

        return call

    import torch.distributed._functional_collectives as funcol

    waiting = funcol.wait_tensor

    def wait_tensor(tensor: torch.Tensor) -> torch.Tensor:
        # tensor-parallel collectives (DTensor's): the worker drops the output
        # shortly after the wait returns; give it a moment to
        out: torch.Tensor = waiting(tensor)
        held = _holders(out)
        deadline = time.monotonic() + 0.02
        while time.monotonic() < deadline and _holders(out) >= held:
            time.sleep(0)
        return out

    for n in names:
        setattr(dist, n, settled(saved[n]))
    funcol.wait_tensor = wait_tensor
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)
        funcol.wait_tensor = waiting
