"""A simulated power cut under the trusted state directory and under a replica.

`PowerCutFiles` is a FileOps over real files that also keeps what a power cut
would leave: a file's data only as of its last fsync/fdatasync, and a directory's
entries (creations, renames) only as of its last fsync. `Events` numbers every
write, sync and rename, trusted or replica; `state_at(i)` rebuilds the trusted
directory as a power cut right after event i would leave it, and
`TracedReplica.image_at(i, kept)` the replica: with `kept` the driver's machine
did not lose power (every write it acknowledged is there), without it only what
it had flushed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustvbd.blockdev import Buffer, Capabilities
from trustvbd.fileops import OsFileOps


@dataclass
class Events:
    count: int = 0
    names: list[str] = field(default_factory=list)

    def tick(self, what: str) -> int:
        self.count += 1
        self.names.append(what)
        return self.count


class PowerCutFiles(OsFileOps):
    """Real files, plus a record of what is durable after each event."""

    def __init__(self, root: Path, events: Events) -> None:
        self.root = root
        self.events = events
        self._keep: dict[int, int] = {}  # inode -> an fd that keeps its number from reuse
        self._data: dict[int, bytes] = {}  # inode -> contents as of its last sync
        self._dirs: dict[Path, dict[str, int]] = {}  # directory -> entries as of its last sync
        self.snapshots: list[tuple[int, dict[str, bytes]]] = []  # (event, durable tree)
        for d, _, files in os.walk(root):  # what exists now counts as durable
            for name in files:
                self._remember(Path(d) / name)
                self._data[os.stat(Path(d) / name).st_ino] = (Path(d) / name).read_bytes()
            self._snap_dir(Path(d))
        self._snapshot(0)

    def _remember(self, path: Path) -> int:
        ino = os.stat(path).st_ino
        if ino not in self._keep:
            self._keep[ino] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return ino

    def _snap_dir(self, d: Path) -> None:
        entries = {}
        for name in os.listdir(d):
            if (d / name).is_file():
                entries[name] = self._remember(d / name)
        self._dirs[d] = entries

    def _snapshot(self, event: int) -> None:
        tree = {}
        for d, entries in self._dirs.items():
            for name, ino in entries.items():
                tree[str((d / name).relative_to(self.root))] = self._data.get(ino, b"")
        self.snapshots.append((event, tree))

    def close_all(self) -> None:
        for fd in self._keep.values():
            os.close(fd)
        self._keep.clear()

    # --- FileOps -------------------------------------------------------------
    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        if flags & (os.O_CREAT | os.O_TRUNC):
            self.events.tick(f"open {Path(path).name}")
        fd = super().open(path, flags, mode)
        self._remember(Path(path))
        return fd

    def write(self, fd: int, data: Buffer) -> int:
        self.events.tick(f"write {self._name(fd)}")
        return super().write(fd, data)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        self.events.tick(f"pwrite {self._name(fd)}")
        return super().pwrite(fd, data, offset)

    def ftruncate(self, fd: int, size: int) -> None:
        self.events.tick(f"ftruncate {self._name(fd)}")
        super().ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        self._sync(fd, "fsync")

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, "fdatasync")

    def _sync(self, fd: int, how: str) -> None:
        event = self.events.tick(f"{how} {self._name(fd)}")
        st = os.fstat(fd)
        reader = self._keep[st.st_ino]  # the fd itself may be write-only
        self._data[st.st_ino] = os.pread(reader, st.st_size, 0)
        self._snapshot(event)

    def replace(self, src: Path, dst: Path) -> None:
        self.events.tick(f"rename {Path(src).name} {Path(dst).name}")
        super().replace(src, dst)

    def fsync_dir(self, path: Path) -> None:
        event = self.events.tick(f"fsync dir {Path(path).name}")
        self._snap_dir(Path(path))
        self._snapshot(event)

    @staticmethod
    def _name(fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    # --- after the fact ------------------------------------------------------
    def state_at(self, event: int, into: Path) -> Path:
        """The trusted directory a power cut right after `event` leaves, written to `into`."""
        tree: dict[str, bytes] = {}
        for at, snap in self.snapshots:
            if at > event:
                break
            tree = snap
        shutil.rmtree(into, ignore_errors=True)
        for rel, data in tree.items():
            path = into / rel
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o600)
        return into


class TracedReplica:
    """An in-memory replica that logs every write and flush as an event."""

    def __init__(self, size: int, events: Events) -> None:
        self.data = bytearray(size)
        self.initial = bytes(size)
        self.events = events
        self.writes: list[tuple[int, int, bytes]] = []  # (event, offset, data)
        self.flushes: list[int] = []  # events of completed flushes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    async def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    async def pwrite(self, offset: int, data: Any, fua: bool = False) -> None:
        event = self.events.tick(f"replica write {offset}+{len(data)}")
        self.data[offset:offset + len(data)] = data
        self.writes.append((event, offset, bytes(data)))
        if fua:
            self.flushes.append(event)

    async def flush(self) -> None:
        self.flushes.append(self.events.tick("replica flush"))

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.pwrite(offset, bytes(length), fua)

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
                   fast: bool = False) -> None:
        await self.pwrite(offset, bytes(length), fua)

    async def cache(self, offset: int, length: int) -> None:
        pass

    async def close(self) -> None:
        pass

    def image_at(self, event: int, kept: bool) -> bytearray:
        """The replica after a power cut right after `event`: every write so far if the
        driver kept them (`kept`), else only those before its last completed flush."""
        upto = event if kept else max((f for f in self.flushes if f <= event), default=0)
        image = bytearray(self.initial)
        for at, offset, data in self.writes:
            if at > upto:
                break
            image[offset:offset + len(data)] = data
        return image
