"""The report :func:`~lightning_meta.load_checkpoint` returns, and its progress bar."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LoadReport", "progress_bar"]


@dataclass
class LoadReport:
    """What :func:`~lightning_meta.load_checkpoint` did, every list sorted and complete.

    Attributes:
        path: the checkpoint as given.
        format: ``"lightning"`` (a checkpoint Lightning's Trainer saved), ``"torch"``,
            ``"torch-legacy"``, ``"safetensors"``, ``"sharded"`` or ``"dcp"``.
        prefix: the checkpoint key prefix that was stripped (``""`` for none).
        loaded: module names filled from the checkpoint (every name of a tied group).
        cast: names whose checkpoint dtype differed and were cast, tensor by tensor.
        replayed: deferred names the checkpoint lacks, replayed from the record.
        missing: persistent names the checkpoint lacks (``strict=False`` only).
        unexpected: checkpoint keys the module has no place for (``strict=False`` only).
        mismatched: ``(name, shape in the model, shape in the checkpoint)``, left as they were.
        ignored: checkpoint keys outside ``prefix`` (another part of a LightningModule).
        left_on_meta: names still on meta afterwards: never deferred and not in the
            checkpoint, or deferred and skipped for their shape (``strict=False``, without
            ``dtype=`` or ``device=``), which stay deferred (``materialize`` gives them eager's
            values; ``fallback="reset_parameters"`` initialises the others, such as litgpt's
            ``cos``/``sin`` after ``model.max_seq_length = n``); and a plain meta model's
            tensor attributes, which no state dict holds (an alias ``p.detach()``, the
            old ``spectral_norm``'s ``weight``).
        tied: groups of names that share one tensor and were tied again.
        bytes_read: bytes of tensor data taken from the checkpoint.

    ``str(report)`` is a readable summary, ``to_dict()`` plain JSON data.

    Example::

        >>> import tempfile, torch, lightning_meta as lm
        >>> with torch.device("meta"):
        ...     net = torch.nn.Linear(4, 2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.save(torch.nn.Linear(4, 2).state_dict(), f"{d}/linear.pt")
        ...     report = lm.load_checkpoint(net, f"{d}/linear.pt")
        >>> report.format, report.loaded, report.bytes_read, report.missing, report.left_on_meta
        ('torch', ['bias', 'weight'], 40, [], [])
        >>> net.weight.is_meta
        False
    """

    path: str
    format: str
    prefix: str = ""
    loaded: list[str] = field(default_factory=list)
    cast: list[str] = field(default_factory=list)
    replayed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    left_on_meta: list[str] = field(default_factory=list)
    tied: list[tuple[str, ...]] = field(default_factory=list)
    bytes_read: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-serialisable data."""
        data = asdict(self)
        data["mismatched"] = [[n, list(m), list(c)] for n, m, c in self.mismatched]
        data["tied"] = [list(g) for g in self.tied]
        return data

    def __str__(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} tensors ({self.bytes_read / 1e6:.1f} MB) from "
            f"{self.path!r} [{self.format}]"
            + (f", prefix {self.prefix!r} stripped" if self.prefix else "")
        ]
        for label, items in (
            ("cast", self.cast),
            ("replayed", self.replayed),
            ("tied again", [" = ".join(g) for g in self.tied]),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", [f"{n} model {m} checkpoint {c}" for n, m, c in self.mismatched]),
            ("left on meta", self.left_on_meta),
            ("ignored (outside the prefix)", self.ignored),
        ):
            if items:
                lines.append(f"{label} ({len(items)}):")
                lines += [f"  {x}" for x in items]
            if items and label == "left on meta":
                lines.append(
                    "  (a forward on meta tensors fails. Fix: lm.materialize(module, "
                    "fallback='reset_parameters') gives deferred ones eager's values and "
                    "initialises the others with their modules' reset_parameters(); or "
                    "assign real tensors)"
                )
        return "\n".join(lines)


@contextlib.contextmanager
def progress_bar(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Show a rich progress bar over ``total`` bytes on stderr while the body runs.

    Args:
        total: the bytes the body will read.
        label: the bar's label (the checkpoint's file name).
        enabled: ``False`` shows nothing (and ``rich`` is not imported).

    Returns:
        A context manager yielding the callback that advances the bar by ``n`` bytes.
    """
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
