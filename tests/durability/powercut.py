"""A simulated power cut under the trusted state directory and under a replica.

`PowerCutFiles` is a FileOps over real files that also keeps what a power cut
would leave: a file's data only as of its last fsync/fdatasync, and a directory's
entries (creations, renames, removals, new subdirectories) only as of its last
fsync, reachable only through durable entries from the root. A file's sync can be made
to fail (`failing`) as Linux's do after a writeback error: the pages written since the
last sync are dropped (marked clean, never written), and a later sync that succeeds
leaves them as they were until they are written again. `Events` numbers
every write, sync, rename, removal and mkdir, trusted or replica; `state_at(i)`
rebuilds the trusted directory as a power cut right after event i would leave
it, and `TracedReplica.image_at(i, kept)` a replica: with `kept` the driver's
machine did not lose power (every write it acknowledged is there), without it
only what it had flushed. A TracedReplica can be taken `down` (every request
fails, as a dead driver's), which makes a mirror degrade it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.crypt.helpers import SimulatedReplica
from trustvbd.blockdev import Backend, BlockError, Buffer, Capabilities
from trustvbd.blocks.crypt_layer import CryptDisk
from trustvbd.fileops import OsFileOps


@dataclass
class Events:
    count: int = 0
    names: list[str] = field(default_factory=list)
    # A FLUSH fdatasyncs the intent log on a thread while the replicas flush.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def tick(self, what: str) -> int:
        with self._lock:
            self.count += 1
            self.names.append(what)
            return self.count


DIR = -1  # a directory's entry, where a file's holds its inode
PAGE = 4096  # what the kernel writes back, or drops after a failed sync


class PowerCutFiles(OsFileOps):
    """Real files, plus a record of what is durable after each event.

    A file's data counts as of its last fsync/fdatasync. A directory's entries (files it
    holds, renames into it, removals, subdirectories made in it) count as of its last
    fsync, and a directory is reachable only through durable entries from the root: a
    file in a new directory is lost unless the new directory's parent was synced too.
    """

    def __init__(self, root: Path, events: Events) -> None:
        self.root = root
        self.events = events
        self._keep: dict[int, int] = {}  # inode -> an fd that keeps its number from reuse
        self._data: dict[int, bytes] = {}  # inode -> contents as of its last sync
        self._dirs: dict[Path, dict[str, int]] = {}  # directory -> entries as of its last sync
        self.snapshots: list[tuple[int, dict[str, bytes | None]]] = []  # (event, durable tree)
        self.failing: set[str] = set()  # names of files whose fsync/fdatasync fails (EIO)
        self._dirty: dict[int, set[int]] = {}  # inode -> pages written since its last sync
        self._dropped: dict[int, set[int]] = {}  # inode -> pages a failed sync dropped
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
            if (d / name).is_dir():
                entries[name] = DIR
            elif (d / name).is_file():
                entries[name] = self._remember(d / name)
        self._dirs[d] = entries

    def _snapshot(self, event: int) -> None:
        """The durable tree: relative path -> file contents, or None for a directory."""
        tree: dict[str, bytes | None] = {}

        def walk(d: Path) -> None:
            for name, ino in self._dirs.get(d, {}).items():
                rel = str((d / name).relative_to(self.root))
                if ino == DIR:
                    tree[rel] = None
                    walk(d / name)
                else:
                    tree[rel] = self._data.get(ino, b"")

        walk(self.root)
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
        append = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
        at = os.fstat(fd).st_size if append else os.lseek(fd, 0, os.SEEK_CUR)
        n = super().write(fd, data)
        self._written(fd, at, at + n)
        return n

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        self.events.tick(f"pwrite {self._name(fd)}")
        n = super().pwrite(fd, data, offset)
        self._written(fd, offset, offset + n)
        return n

    def ftruncate(self, fd: int, size: int) -> None:
        self.events.tick(f"ftruncate {self._name(fd)}")
        old = os.fstat(fd).st_size
        super().ftruncate(fd, size)
        self._written(fd, min(old, size), max(old, size))

    def _written(self, fd: int, start: int, end: int) -> None:
        ino = os.fstat(fd).st_ino
        pages = range(start // PAGE, -(-end // PAGE))
        self._dirty.setdefault(ino, set()).update(pages)
        self._dropped.get(ino, set()).difference_update(pages)

    def fsync(self, fd: int) -> None:
        self._sync(fd, "fsync")

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, "fdatasync")

    def _sync(self, fd: int, how: str) -> None:
        st = os.fstat(fd)
        dirty = self._dirty.pop(st.st_ino, set())
        if self._name(fd) in self.failing:
            self.events.tick(f"{how} {self._name(fd)} fails")
            self._dropped.setdefault(st.st_ino, set()).update(dirty)
            raise OSError(errno.EIO, "Input/output error (injected)")
        event = self.events.tick(f"{how} {self._name(fd)}")
        reader = self._keep[st.st_ino]  # the fd itself may be write-only
        data = os.pread(reader, st.st_size, 0)
        dropped = self._dropped.get(st.st_ino)
        if dropped:  # as of the sync before the failed one (zeros past its end)
            old, new = self._data.get(st.st_ino, b""), bytearray(data)
            for p in dropped:
                at = p * PAGE
                page = new[at:at + PAGE]
                new[at:at + len(page)] = old[at:at + len(page)].ljust(len(page), b"\0")
            data = bytes(new)
        self._data[st.st_ino] = data
        self._snapshot(event)

    def replace(self, src: Path, dst: Path) -> None:
        self.events.tick(f"rename {Path(src).name} {Path(dst).name}")
        super().replace(src, dst)

    def unlink(self, path: Path) -> None:
        self.events.tick(f"unlink {Path(path).name}")
        super().unlink(path)

    def mkdir(self, path: Path, mode: int = 0o700) -> None:
        self.events.tick(f"mkdir {Path(path).name}")
        super().mkdir(path, mode)

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
        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(mode=0o700)
        for rel, data in sorted(self.durable_at(event).items()):  # a directory before its files
            path = into / rel
            if data is None:
                path.mkdir(mode=0o700)
            else:
                path.write_bytes(data)
                path.chmod(0o600)
        return into

    def durable_at(self, event: int) -> dict[str, bytes | None]:
        """The durable tree a power cut right after `event` leaves (see _snapshot)."""
        tree: dict[str, bytes | None] = {}
        for at, snap in self.snapshots:
            if at > event:
                break
            tree = snap
        return tree


class NoSync(OsFileOps):
    """Real files without syncs, for reopening what a cut left and for the fuzz targets:
    their own durability is not the question (and thousands of fsyncs would slow the suite)."""

    def fsync(self, fd: int) -> None:
        pass

    def fdatasync(self, fd: int) -> None:
        pass

    def fsync_dir(self, path: Path) -> None:
        pass


NO_SYNC = NoSync()


class TracedReplica(SimulatedReplica):
    """An in-memory replica that logs every write and flush as an event."""

    def __init__(self, size: int, events: Events, trims: bool = False) -> None:
        self.trims = trims  # offers TRIM, so a discard reaches it too (as zeros)
        self.data = bytearray(size)
        self.initial = bytes(size)
        self.events = events
        self.writes: list[tuple[int, int, bytes, bool]] = []  # (event, offset, data, fua)
        self.flushes: list[int] = []  # events of completed flushes
        self.down = False

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(trim=self.trims)

    def _check_up(self) -> None:
        if self.down:
            raise BlockError(errno.EIO, "replica down (injected)")

    async def pread(self, offset: int, length: int) -> bytes:
        self._check_up()
        return bytes(self.data[offset:offset + length])

    async def pwrite(self, offset: int, data: Any, fua: bool = False) -> None:
        self._check_up()
        event = self.events.tick(f"replica write {offset}+{len(data)}")
        self.data[offset:offset + len(data)] = data
        self.writes.append((event, offset, bytes(data), fua))

    async def flush(self) -> None:
        self._check_up()
        self.flushes.append(self.events.tick("replica flush"))

    def image_at(self, event: int, kept: bool) -> bytearray:
        """The replica after a power cut right after `event`: every write so far if the
        driver kept them (`kept`), else only those before its last completed flush and
        the FUA writes (durable once answered, each on its own: NBD's FUA)."""
        upto = event if kept else max((f for f in self.flushes if f <= event), default=0)
        image = bytearray(self.initial)
        for at, offset, data, fua in self.writes:
            if at > event:
                break
            if at <= upto or fua:
                image[offset:offset + len(data)] = data
        return image


# ---------------------------------------------------------------- what a guest was promised

BS = 4096


@dataclass
class Write:
    value: bytes
    issued: int  # the event count when the request started
    acked: int  # ... and when it was acknowledged
    fua: bool
    # FLUSHes acknowledged before this write was: a write answered without an event of
    # its own (its intent record held back, its ciphertext behind) may share its event
    # count with the FLUSH before it, and is not covered by that FLUSH.
    flushes_before: int = 0


@dataclass
class Model:
    history: dict[int, list[Write]] = field(default_factory=dict)
    flushes: list[int] = field(default_factory=list)  # event counts at flush acknowledgements

    def wrote(self, b: int, w: Write) -> None:
        self.history.setdefault(b, []).append(w)

    def allowed(self, b: int, cut: int) -> tuple[bytes, list[bytes]]:
        """(the content that must survive, later contents that may show instead)."""
        done = sum(1 for f in self.flushes if f <= cut)  # FLUSHes acknowledged by the cut
        must, maybe = bytes(BS), list[bytes]()
        for w in self.history.get(b, []):
            if w.issued > cut:
                break
            if w.flushes_before < done or (w.fua and w.acked <= cut):
                must, maybe = w.value, []
            else:
                maybe.append(w.value)
        return must, maybe


Promised = list[tuple[bytes, list[bytes]]]  # per block: (must survive, may show instead)


async def read_and_check(disk: Backend, promised: Promised, where: str) -> None:
    """Every flushed block reads back exactly; others as their flushed content or a later
    one. None fails to read: no ciphertext reaches a replica before the intent record that
    explains it is durable, so a cut never leaves a block whose ciphertext matches no leaf."""
    try:  # one read for the whole disk; block by block only if some block fails
        whole = bytes(await disk.pread(0, len(promised) * BS))
    except BlockError:
        whole = None
    for b, (must, maybe) in enumerate(promised):
        if whole is not None:
            got = whole[b * BS:(b + 1) * BS]
        else:
            try:
                got = bytes(await disk.pread(b * BS, BS))
            except BlockError as exc:
                what = "written since the last FLUSH" if maybe else "flushed"
                raise AssertionError(f"{where}: block {b}, {what}, fails to read: {exc}") from exc
        assert got == must or got in maybe, (
            f"{where}: block {b} reads as neither its flushed content nor a later one")


class Guest:
    """A seeded guest: writes (some unaligned), trims, zeroes, FUA and flushes, with a Model
    of what each acknowledgement promised."""

    def __init__(self, rng: random.Random, events: Events, nblocks: int) -> None:
        self.rng = rng
        self.events = events
        self.nblocks = nblocks
        self.model = Model()
        self.cur = bytearray(nblocks * BS)
        self.after = 0  # the block after the last write: a file written in order continues there

    async def flush(self, disk: Backend) -> None:
        await disk.flush()
        self.model.flushes.append(self.events.count)

    async def step(self, disk: Backend) -> None:
        rng, cur, size = self.rng, self.cur, self.nblocks * BS
        r = rng.random()
        if r < 0.2:
            await self.flush(disk)
            return
        fua = rng.random() < 0.15
        if rng.random() < 0.4:  # a file written in order: gathered writes behind
            b = self.after % self.nblocks
        else:
            b = rng.choice([rng.randrange(self.nblocks), rng.randrange(8), 128 + rng.randrange(8)])
        n = min(rng.choice([1, 1, 2, 5]), self.nblocks - b)
        self.after = b + n
        issued = self.events.count
        if r < 0.3:
            cur[b * BS:(b + n) * BS] = bytes(n * BS)
            await (disk.trim if r < 0.25 else disk.zero)(b * BS, n * BS, fua)
        else:
            offset = b * BS + (rng.randrange(BS) if rng.random() < 0.2 else 0)
            data = rng.randbytes(min(n * BS, size - offset) - (offset % BS))
            cur[offset:offset + len(data)] = data
            await disk.pwrite(offset, data, fua)
        for blk in range(b, b + n):
            self.model.wrote(blk, Write(bytes(cur[blk * BS:(blk + 1) * BS]), issued,
                                        self.events.count, fua, len(self.model.flushes)))


async def abandon(disk: CryptDisk) -> None:
    """Leave the disk as a power cut does: no closing commit (close() would commit), no
    background work going on behind the harness's back."""
    for task in list(disk._background):
        task.cancel()
    await disk.replicas.close()  # cancels its reconnects and resyncs; the links stay as they are
    disk._commits.intent.close()
    disk._commits.tree.close()
    disk._state.close()
