"""Open a checkpoint of any supported format as a :class:`~lightning_meta._load._source.Source`.

Formats are recognised from the content (magic bytes, a ``.metadata`` file, an
index's JSON), not from the file name:

- torch zip (``.pt``, ``.pth``, ``.bin``, Lightning ``.ckpt``) and torch
  legacy (``_use_new_zipfile_serialization=False``);
- ``.safetensors``;
- a sharded Hugging Face index (``*.index.json``, or a directory holding one)
  over safetensors or torch shards;
- a ``torch.distributed.checkpoint`` directory (``.metadata``).

Opening reads structure only (headers, pickles, indexes, metadata), checks it,
and reads no tensor data. The readers of one file live in
:mod:`~lightning_meta._load._source`, those of several in
:mod:`~lightning_meta._load._sharded`. Every pickle is read by
:mod:`~lightning_meta._load._unpickle`, which runs no code.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning_meta._errors import MetaTensorError
from lightning_meta._load._files import head, io_error
from lightning_meta._load._sharded import open_dcp, open_index
from lightning_meta._load._source import (
    Source,
    is_safetensors,
    is_torch,
    open_safetensors,
    open_torch,
)

__all__ = ["open_source"]

# In the order transformers' from_pretrained looks for them in a directory
# (modeling_utils, 4.x and 5.x): a single safetensors file wins over an index
# beside it (the hub's conversion bot adds model.safetensors next to sharded
# .bin files; save_pretrained leaves a stale index when it stops sharding).
_HF_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# What the pickle of a distributed checkpoint's metadata names first (its class).
_DCP_METADATA = b"torch.distributed.checkpoint.metadata"


def open_source(
    path: str | Path, *, safe_globals: Sequence[Any] = (), prefix: str | None = None
) -> Source:
    """Detect the format of ``path`` from its content and open it without reading tensor data.

    Args:
        path: a checkpoint file, an index (a distributed checkpoint's
            ``.metadata`` included), or a directory holding one checkpoint.
        safe_globals: what unpickling may construct beyond tensors and plain containers.
        prefix: the caller's key prefix (see :func:`~lightning_meta._load._source.open_torch`).

    Returns:
        The checkpoint's :class:`~lightning_meta._load._source.Source`, every
        entry known.

    Raises:
        MetaTensorError: the path does not exist, its format is not recognised,
            it cannot be read (permission denied), it is structurally invalid
            (truncated, bad header or index, sizes that disagree, a missing
            shard, a key in two shards), or unpickling it needs more than
            tensors and plain containers. ``paths`` holds the file(s) or keys
            concerned.
    """
    p = Path(path).expanduser()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise MetaTensorError(
            "lightning_meta reads checkpoints (little-endian) on little-endian machines only. "
            "Fix: load the checkpoint with torch.load on this machine.",
            paths=[str(p)],
        )
    try:
        is_dir, is_file = p.is_dir(), p.is_file()
    except OSError as e:
        raise io_error(p, e) from e
    if is_dir:
        return _open_directory(p, safe_globals, prefix)
    if not is_file:
        _missing(p)
    if p.name == ".metadata" and _DCP_METADATA in head(p, 64):
        # torch.distributed.checkpoint's metadata file, named like an index: its
        # directory is the checkpoint (read as a torch pickle, it would need the
        # metadata's classes, and the storage files beside it would be unread).
        return open_dcp(p.parent, safe_globals)
    first = head(p)
    if not first:
        raise MetaTensorError(
            f"{str(p)!r} is empty (0 bytes). Fix: save or download the checkpoint again; "
            "the file on disk holds nothing.",
            paths=[str(p)],
        )
    if is_torch(first):
        return open_torch(p, safe_globals, prefix)
    if is_safetensors(first) or p.suffix == ".safetensors":
        return open_safetensors(p)
    if first.lstrip()[:1] == b"{":
        return open_index(p, safe_globals)
    raise MetaTensorError(
        f"{str(p)!r} is not a checkpoint format lightning_meta knows (first bytes {first[:8]!r}): "
        "expected a torch zip or legacy file, safetensors, a '*.index.json', or a "
        "torch.distributed.checkpoint directory. Fix: pass one of those.",
        paths=[str(p)],
    )


def _missing(p: Path) -> NoReturn:
    """Raise the error of a path that is neither a file nor a directory: pathlib's tests
    answer False for a symbolic link loop too, which ``os.stat`` names."""
    try:
        os.stat(p)
    except FileNotFoundError:
        if p.is_symlink():
            raise MetaTensorError(
                f"{str(p)!r} is a symbolic link to {os.readlink(p)!r}, which does not exist. "
                "Fix: point the link at the checkpoint, or pass the checkpoint's path.",
                paths=[str(p)],
            ) from None
        raise MetaTensorError(
            f"no checkpoint at {str(p)!r}. Fix: check the path.", paths=[str(p)]
        ) from None
    except OSError as e:  # a loop of links, a file used as a folder
        raise io_error(p, e) from e
    raise MetaTensorError(
        f"{str(p)!r} is neither a file nor a directory (a device, a pipe or a socket). Fix: "
        "pass the checkpoint file or its directory.",
        paths=[str(p)],
    )


def _open_directory(p: Path, safe_globals: Sequence[Any], prefix: str | None) -> Source:
    # A directory holding several candidates resolves as the tool that wrote
    # it reads it: torch.distributed.checkpoint's metadata, then transformers'
    # names in its order (the report's format says which was read), then the
    # one other index.
    if (p / ".metadata").is_file():
        return open_dcp(p, safe_globals)
    for name in _HF_NAMES:
        if (p / name).is_file():
            if name.endswith(".index.json"):
                return open_index(p / name, safe_globals)
            return open_source(p / name, safe_globals=safe_globals, prefix=prefix)
    indexes = sorted(p.glob("*.index.json"))
    if len(indexes) == 1:
        return open_index(indexes[0], safe_globals)
    found = (
        f"{len(indexes)} '*.index.json' files ({', '.join(i.name for i in indexes)})"
        if indexes
        else "no '*.index.json'"
    )
    odd = [name for name in _HF_NAMES if (p / name).exists()]
    not_files = f" (there, {', '.join(odd)} is not a regular file)" if odd else ""
    raise MetaTensorError(
        f"{str(p)!r} is a directory but holds no torch.distributed.checkpoint '.metadata', "
        f"{found} and no {' or '.join(_HF_NAMES)}{not_files}. Fix: pass the checkpoint "
        "file or index itself.",
        paths=[str(p)],
    )
