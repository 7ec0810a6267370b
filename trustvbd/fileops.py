"""The file operations that decide what trusted state survives a power cut.

Everything the trusted state directory and the audit log write, sync or rename
goes through a `FileOps`, so a test can put a recording one underneath and
replay what a power cut at any instant would leave: only data followed by an
fsync/fdatasync of its file, and only renames, creations, removals and new
directories followed by an fsync of their parent directory
(tests/durability/). Reads do not change what is durable, so they go straight
to the OS.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from trustvbd.blockdev import Buffer


class FileOps(Protocol):
    def open(self, path: Path, flags: int, mode: int = 0o600) -> int: ...

    def write(self, fd: int, data: Buffer) -> int: ...

    def pwrite(self, fd: int, data: Buffer, offset: int, /) -> int: ...

    def ftruncate(self, fd: int, size: int) -> None: ...

    def fsync(self, fd: int) -> None: ...

    def fdatasync(self, fd: int) -> None: ...

    def close(self, fd: int) -> None: ...

    def replace(self, src: Path, dst: Path) -> None: ...

    def unlink(self, path: Path) -> None: ...

    def mkdir(self, path: Path, mode: int = 0o700) -> None: ...

    def fsync_dir(self, path: Path) -> None: ...


class OsFileOps:
    """The real thing."""

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def write(self, fd: int, data: Buffer) -> int:
        return os.write(fd, data)

    if TYPE_CHECKING:
        def pwrite(self, fd: int, data: Buffer, offset: int, /) -> int: ...
    else:
        # os.pwrite itself, not a method around it: the intent log writes a record per
        # group commit through it (one Python call less each).
        pwrite = staticmethod(os.pwrite)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def mkdir(self, path: Path, mode: int = 0o700) -> None:
        os.mkdir(path, mode)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


OS_FILES: FileOps = OsFileOps()


def write_all(ops: FileOps, fd: int, data: Buffer) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[ops.write(fd, view):]


def write_file_atomic(path: Path, data: Buffer, ops: FileOps = OS_FILES) -> None:
    """Replace `path` with `data` so a power cut leaves either the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(ops, fd, data)
        ops.fsync(fd)
    finally:
        ops.close(fd)
    ops.replace(tmp, path)
    ops.fsync_dir(path.parent)


def make_dirs(path: Path, ops: FileOps = OS_FILES, mode: int = 0o700) -> None:
    """Create `path` and its missing parents so that they survive a power cut: a new
    directory's entry is durable only once its parent directory is fsynced."""
    missing = []
    p = Path(path)
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            ops.mkdir(d, mode)
        except FileExistsError:  # made meanwhile: its entry still needs the sync
            pass
        ops.fsync_dir(d.parent)
