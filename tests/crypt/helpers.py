"""Shared helpers for the encryption-domain tests: disks over in-memory or file replicas."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from trustvbd.blockdev import Backend, BlockError, Capabilities
from trustvbd.blocks.aead_pool import AeadPool
from trustvbd.blocks.crypt_layer import (
    CryptDisk,
    IntegrityError,
    Kek,
    Layout,
    create_disk_state,
    load_kek,
    physical_size,
)
from trustvbd.blocks.file import FileBackend, MemoryBackend
from trustvbd.blocks.layer import Layer
from trustvbd.blocks.leaf_pages import DEFAULT_CAPACITY
from trustvbd.fileops import OsFileOps

T = TypeVar("T")
BS = 4096
SIZE = 512 * BS  # 2 MiB: 512 blocks, 4 leaf pages
LAY = Layout(SIZE)  # where a disk made by new_state keeps its leaves and blocks on the replica


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


class RawMemory(MemoryBackend):
    """A MemoryBackend whose bytes tests can read and tamper with directly."""

    @property
    def raw(self) -> bytearray:
        return self._data


class SimulatedReplica:
    """What the simulated replicas of the crash and power-cut tests have alike: no optional
    abilities; a trim or zero reaches the medium as a write of zeroes (so the simulation
    sees it as any other write); nothing to cache or close. Subclasses give size, pread,
    pwrite and flush."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    async def pwrite(self, offset: int, data: Any, fua: bool = False) -> None:
        raise NotImplementedError

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.pwrite(offset, bytes(length), fua)

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
                   fast: bool = False) -> None:
        await self.pwrite(offset, bytes(length), fua)

    async def cache(self, offset: int, length: int) -> None:
        pass

    async def close(self) -> None:
        pass


def new_state(state_dir: Path, name: str = "vm1", size: int = SIZE) -> Kek:
    kek = load_kek(state_dir)
    create_disk_state(state_dir, name, size, kek)
    return kek


def make_replica(kind: str, tmp: Path, size: int = SIZE, name: str = "r0") -> Backend:
    if kind == "memory":
        return RawMemory(physical_size(size))
    return FileBackend(str(tmp / f"{name}.img"), physical_size(size))


def replica_bytes(replica: Backend) -> bytearray:
    if isinstance(replica, RawMemory):
        return replica.raw
    assert isinstance(replica, FileBackend)
    return bytearray(Path(replica.path).read_bytes())


def set_replica_bytes(replica: Backend, data: bytes | bytearray) -> None:
    if isinstance(replica, RawMemory):
        replica.raw[:] = data
    else:
        assert isinstance(replica, FileBackend)
        Path(replica.path).write_bytes(data)


def patch(replica: Backend, offset: int, data: bytes) -> None:
    if isinstance(replica, RawMemory):
        replica.raw[offset:offset + len(data)] = data
    else:
        assert isinstance(replica, FileBackend)
        os.pwrite(replica._fd, data, offset)


def flip(replica: Backend, offset: int, mask: int = 0x01) -> None:
    old = bytes(replica_bytes(replica)[offset:offset + 1])
    patch(replica, offset, bytes([old[0] ^ mask]))


class Unclosing(Layer):
    """Lets a test reopen the same replica after CryptDisk.close() closed its `next`."""

    async def close(self) -> None:
        pass


async def open_disk(state_dir: Path, replica: Backend, kek: Kek, name: str = "vm1",
                    events: list[dict[str, Any]] | None = None, aead: AeadPool | None = None,
                    leaf_cache_pages: int = DEFAULT_CAPACITY) -> CryptDisk:
    return await CryptDisk.open(state_dir, name, Unclosing(replica), "r0", kek,
                                on_integrity_event=events.append if events is not None else None, aead=aead,
                                leaf_cache_pages=leaf_cache_pages)


def pattern(block: int, tag: int = 0) -> bytes:
    """Distinct, recognisable contents for a block."""
    return random.Random(block * 1_000_003 + tag).randbytes(BS)


async def read_blocks(disk: CryptDisk, blocks: range) -> tuple[dict[int, bytes], set[int]]:
    """Read blocks one at a time: contents of those that read, and those that failed."""
    good: dict[int, bytes] = {}
    bad: set[int] = set()
    for b in blocks:
        try:
            good[b] = bytes(await disk.pread(b * BS, BS))
        except IntegrityError as exc:
            assert b in exc.blocks
            bad.add(b)
    return good, bad


class Recording(Layer):
    """Counts bytes the layer above writes, split into metadata and data areas."""

    def __init__(self, next: Backend, layout: Layout) -> None:
        super().__init__(next)
        self.layout = layout
        self.meta_writes: list[tuple[int, int]] = []
        self.data_bytes = 0
        self.flushes = 0

    async def pwrite(self, offset: int, data: Any, fua: bool = False) -> None:
        if offset < self.layout.data_start:
            self.meta_writes.append((offset, len(data)))
        else:
            self.data_bytes += len(data)
        await self.next.pwrite(offset, data, fua)

    async def flush(self) -> None:
        self.flushes += 1
        await self.next.flush()


class FailingWrites(Layer):
    """Fails replica writes while `failing` is set (an honest but broken driver)."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.failing: Callable[[int, int], bool] = lambda offset, length: False
        self.store_anyway = False  # fail after storing the data (a lost reply)

    async def pwrite(self, offset: int, data: Any, fua: bool = False) -> None:
        if self.failing(offset, len(data)):
            if self.store_anyway:
                await self.next.pwrite(offset, data, fua)
            raise BlockError(5, "driver write failed")
        await self.next.pwrite(offset, data, fua)


class IntentLogFiles(OsFileOps):
    """Real files that know which descriptors are the intent log's: for tests that count or
    fail its writes."""

    def __init__(self) -> None:
        self.log_fds: set[int] = set()

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        fd = super().open(path, flags, mode)
        if Path(path).name == "intent.log":
            self.log_fds.add(fd)
        return fd
