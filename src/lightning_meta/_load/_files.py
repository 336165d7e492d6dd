"""Reading checkpoint bytes into memory the process owns, with every size checked.

Every tensor a checkpoint gives is a :class:`Region` of a file (an offset and a
byte count, and the CRC-32 a zip record stores). :class:`Reader` reads regions
with ``read()`` system calls into fresh tensors, so that

- a file shorter than its index says is a :class:`~lightning_meta.MetaTensorError`
  (a short read), never ``SIGBUS`` (what touching a memory-mapped page past the
  end of a truncated file raises) and never zeros;
- the tensors belong to the process: overwriting, truncating or deleting the
  file afterwards changes nothing in them;
- a file that changes while it is read (its size, modification time or inode
  differ from when it was opened) is refused.

``mapped=True`` maps the file instead (copy-on-write, zero-copy): faster to
return and lighter on memory, but the tensors then read the file's pages on
demand, so the file must not change while they live.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import mmap
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from lightning_meta._errors import MetaTensorError

__all__ = [
    "CORRUPT_FIX",
    "FileStamp",
    "Reader",
    "Region",
    "corrupt",
    "head",
    "io_error",
    "read_file",
    "stamp",
    "stamps_of",
]

CORRUPT_FIX = "Fix: save it again or download it again; the file on disk is incomplete or damaged."
# One read() call moves at most this much, so a huge tensor is read in pieces
# (Linux caps a single read at about 2 GiB anyway).
_CHUNK = 1 << 28
# A cast reads this much of the source dtype at a time: the only temporary.
_CAST_CHUNK = 1 << 24


def corrupt(where: str | Path, problem: str) -> MetaTensorError:
    """Return the error for a checkpoint file that is truncated, damaged or inconsistent."""
    return MetaTensorError(f"{str(where)!r} {problem}. {CORRUPT_FIX}", paths=[str(where)])


def io_error(where: str | Path, e: OSError) -> MetaTensorError:
    """Return the error for a checkpoint file the system cannot open or read."""
    reason = e.strerror or type(e).__name__
    if isinstance(e, PermissionError):
        fix = "Fix: give this user read permission on it (chmod/chown), or copy it somewhere readable."
    elif e.errno == errno.ELOOP:
        fix = "Fix: a symbolic link on the path leads back to itself; point it at the checkpoint."
    else:
        fix = "Fix: check that the path exists, is a regular file and is readable."
    return MetaTensorError(f"cannot read {str(where)!r}: {reason}. {fix}", paths=[str(where)])


class FileStamp(NamedTuple):
    """What identifies one state of a file: a change to any field means the file changed."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        """Return the stamp of ``os.stat``/``os.fstat`` result ``st``."""
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stamp(p: Path) -> FileStamp:
    """Return the :class:`FileStamp` of ``p``.

    Raises:
        MetaTensorError: ``p`` cannot be read (missing, permission denied).
    """
    try:
        return FileStamp.of(os.stat(p))
    except OSError as e:
        raise io_error(p, e) from e


def head(p: Path, n: int = 16) -> bytes:
    """Return the first ``n`` bytes of the file ``p``, from which its format is told.

    Raises:
        MetaTensorError: ``p`` cannot be opened or read (permission denied, a directory).
    """
    try:
        # Unbuffered: a buffered open reads a whole block to return these few bytes.
        with p.open("rb", buffering=0) as f:
            return f.read(n)
    except OSError as e:
        raise io_error(p, e) from e


def read_file(p: Path, offset: int, nbytes: int) -> bytes:
    """Return ``nbytes`` bytes of ``p`` from ``offset`` (small structures: headers, pickles).

    Raises:
        MetaTensorError: the file cannot be read, or ends before ``offset + nbytes``.
    """
    try:
        with p.open("rb", buffering=0) as f:
            f.seek(offset)
            data = f.read(nbytes)
    except OSError as e:
        raise io_error(p, e) from e
    if len(data) != nbytes:
        raise corrupt(p, f"is truncated: it ends before byte {offset + nbytes}")
    return data


@dataclass(frozen=True)
class Region:
    """``nbytes`` bytes of ``file`` from ``offset``; ``crc``: their CRC-32 when the format stores one.

    ``name`` names the region in messages (a zip record, a tensor key).
    """

    file: Path
    offset: int
    nbytes: int
    crc: int | None = None
    name: str = ""


def _buffer(t: torch.Tensor) -> memoryview:
    """A writable view of the bytes of the contiguous CPU ``uint8`` tensor ``t`` (no copy)."""
    array = (ctypes.c_ubyte * t.numel()).from_address(t.data_ptr())
    return memoryview(array).cast("B")


class Reader:
    """Reads :class:`Region` s, file by file, into tensors the process owns (or maps them).

    One file is open at a time; use as a context manager, or call
    :meth:`close`, so the last file is checked and closed.

    Args:
        stamps: each file's :class:`FileStamp` when the checkpoint was opened;
            a file whose stamp differs when it is read, or after, is refused.
        verify: check the CRC-32 of every region that has one.
        mapped: map the files (copy-on-write) instead of reading them.
    """

    def __init__(
        self, stamps: dict[Path, FileStamp], *, verify: bool = False, mapped: bool = False
    ) -> None:
        self.stamps, self.verify, self.mapped = stamps, verify, mapped
        self._path: Path | None = None
        self._file: io.FileIO | None = None
        self._map: mmap.mmap | None = None
        self._cast_buffer: torch.Tensor | None = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(check=exc[0] is None)

    def prefetch(self, spans: Iterable[tuple[Region, int, int]]) -> None:
        """Ask the kernel to start reading bytes ``[start, stop)`` of each region, in the background.

        Reads then find the pages in the cache instead of waiting on the disk
        one read-ahead window at a time. Only a hint: failures are ignored
        (the reads themselves report any problem).
        """
        if not hasattr(os, "posix_fadvise"):  # pragma: no cover - not on Windows or macOS
            return
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for region, start, stop in spans:
            if self.verify and region.crc is not None:
                start, stop = 0, region.nbytes
            if stop > start:
                by_file.setdefault(region.file, []).append(
                    (region.offset + start, region.offset + stop)
                )
        for path, ranges in by_file.items():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                lo, hi = None, None
                for a, b in sorted(ranges):
                    if lo is not None and hi is not None and a <= hi + (1 << 20):
                        hi = max(hi, b)
                        continue
                    if lo is not None and hi is not None:
                        os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
                    lo, hi = a, b
                if lo is not None and hi is not None:
                    os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def read(self, region: Region, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Return bytes ``[start, stop)`` of ``region`` as a 1-d ``uint8`` CPU tensor.

        With ``verify`` and a CRC, the whole region is read and checked (and
        the slice returned).

        Raises:
            MetaTensorError: the file cannot be read, is shorter than the
                region, changed since it was opened, or the CRC differs.
        """
        stop = region.nbytes if stop is None else stop
        check = self.verify and region.crc is not None
        lo, hi = (0, region.nbytes) if check else (start, stop)
        f = self._open(region.file)
        if self.mapped:
            data = self._mapped(f, region, lo, hi)
        else:
            data = torch.empty(hi - lo, dtype=torch.uint8)
            if hi > lo:
                self._read_into(f, region, region.offset + lo, _buffer(data))
        if check:
            crc = zlib.crc32(_buffer(data)) if data.numel() else 0
            if crc != region.crc:
                raise corrupt(
                    region.file,
                    f"is damaged: the CRC-32 of {region.name or 'a record'} is {crc:#010x} but "
                    f"the file records {region.crc:#010x} (a flipped bit or a partial overwrite)",
                )
            data = data[start:stop]
        return data

    def read_cast(
        self, region: Region, start: int, stop: int, src: torch.dtype, dst: torch.dtype
    ) -> torch.Tensor:
        """Return bytes ``[start, stop)`` of ``region`` as a 1-d ``dst`` tensor of ``src`` values.

        The bytes are read ``src`` piece by piece into one small buffer and
        cast into the result (``copy_``: the rounding of ``.to(dst)``), so a
        cast load never holds a full-size ``src`` copy. With ``verify`` (and
        a CRC) or ``mapped``, the region is read whole and cast once.

        Raises:
            MetaTensorError: as :meth:`read`.
        """
        if self.mapped or (self.verify and region.crc is not None):
            return self.read(region, start, stop).view(src).to(dst)
        size = src.itemsize
        out = torch.empty((stop - start) // size, dtype=dst)
        f = self._open(region.file)
        step = max(1, _CAST_CHUNK // size) * size
        # One buffer for every cast of the load: temporaries of many sizes
        # between the results would fragment the heap.
        if self._cast_buffer is None:
            self._cast_buffer = torch.empty(_CAST_CHUNK, dtype=torch.uint8)
        buffer = self._cast_buffer
        view = _buffer(buffer)
        for at in range(start, stop, step):
            n = min(step, stop - at)
            self._read_into(f, region, region.offset + at, view[:n])
            first = (at - start) // size
            out[first : first + n // size].copy_(buffer[:n].view(src))
        return out

    def _open(self, p: Path) -> io.FileIO:
        if self._path == p and self._file is not None:
            return self._file
        self.close()
        try:
            f = io.FileIO(p, "r")
        except OSError as e:
            raise io_error(p, e) from e
        self._path, self._file = p, f
        self._check(p, f)
        with contextlib.suppress(AttributeError, OSError):  # only a read-ahead hint
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return f

    def _check(self, p: Path, f: io.FileIO) -> None:
        expected = self.stamps.get(p)
        try:
            now = FileStamp.of(os.fstat(f.fileno()))
        except OSError as e:
            raise io_error(p, e) from e
        if expected is not None and now != expected:
            raise MetaTensorError(
                f"{str(p)!r} changed while it was being loaded (size {expected.size} -> "
                f"{now.size} bytes, or a new modification time or inode). Nothing was "
                "changed in the module. Fix: wait until whatever writes the file has "
                "finished, then load it again.",
                paths=[str(p)],
            )

    def _read_into(self, f: io.FileIO, region: Region, offset: int, out: memoryview) -> None:
        done = 0
        try:
            f.seek(offset)
        except OSError as e:
            raise io_error(region.file, e) from e
        while done < len(out):
            want = min(len(out) - done, _CHUNK)
            try:
                got = f.readinto(out[done : done + want])
            except OSError as e:
                raise io_error(region.file, e) from e
            if not got:
                raise corrupt(
                    region.file,
                    f"is truncated: {region.name or 'a tensor'} needs bytes up to "
                    f"{offset + len(out)} but the file ends at {offset + done}",
                )
            done += got

    def _mapped(self, f: io.FileIO, region: Region, lo: int, hi: int) -> torch.Tensor:
        if hi == lo:
            return torch.empty(0, dtype=torch.uint8)
        if self._map is None:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise corrupt(region.file, f"cannot be memory-mapped ({e})") from e
        if region.offset + hi > len(self._map):
            raise corrupt(
                region.file,
                f"is truncated: {region.name or 'a tensor'} needs bytes up to "
                f"{region.offset + hi} but the file ends at {len(self._map)}",
            )
        return torch.frombuffer(
            self._map, dtype=torch.uint8, count=hi - lo, offset=region.offset + lo
        )

    def close(self, *, check: bool = True) -> None:
        """Close the open file, after checking it did not change while it was read.

        Raises:
            MetaTensorError: the file changed while it was read.
        """
        p, f = self._path, self._file
        self._path, self._file, self._map = None, None, None  # tensors keep their mapping
        if f is None or p is None:
            return
        try:
            if check:
                self._check(p, f)
        finally:
            f.close()


def stamps_of(files: Iterable[Path]) -> dict[Path, FileStamp]:
    """Return the :class:`FileStamp` of each of ``files``.

    Raises:
        MetaTensorError: a file cannot be read.
    """
    return {f: stamp(f) for f in files}
