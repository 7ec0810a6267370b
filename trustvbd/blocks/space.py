"""SpaceWatch: say clearly, once, when a replica's driver runs out of space.

A driver out of space answers writes with ENOSPC, which goes on to the guest
unchanged (with a single replica; in a mirror the replica set degrades that replica
and the guest's writes go on to the others). Without this layer the only trace was
each failed request; with it the encryption domain logs one line naming the disk and
the driver when it starts, one when writes go through again (a write, then a flush,
with no ENOSPC since), and `status` shows which it is.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from trustvbd.blockdev import (
    Backend,
    BlockError,
    Breakable,
    Buffer,
    NativeClient,
    ReadsNatively,
    Reconnectable,
    Submits,
    TellsBreak,
    Watched,
    provides,
)
from trustvbd.blocks.layer import Layer, reader_into

log = logging.getLogger("trustvbd.crypt.space")


class SpaceWatch(Layer):
    def __init__(self, next: Backend, disk: str, driver: str, mirrored: bool = False) -> None:
        super().__init__(next)
        self.disk, self.driver, self.mirrored = disk, driver, mirrored
        self.full_since: float | None = None  # wall clock of the first ENOSPC of this episode
        # A write went through since the last ENOSPC: the episode ends at the next flush that
        # succeeds. Not at that write: a full file system still takes writes over blocks it
        # has, so a resync retried every 2 s (or a guest rewriting in place) said "takes
        # writes again" and "out of space" at each try, two lines every 2 s for as long as
        # the driver stayed full (red team).
        self._wrote = False
        self._read_into = reader_into(next)
        self._native = cast(ReadsNatively, next) if provides(next, ReadsNatively) else None
        self._submits = next if isinstance(next, Submits) else None  # (checked once)

    @property
    def message(self) -> str:
        head = f"disk {self.disk!r}: driver {self.driver!r} is out of space: "
        if self.mirrored:
            return head + ("its replica is degraded and takes no writes until space is freed "
                           "under the driver's backing store, then it is resynced; guests' "
                           "writes go on to the other replicas (ENOSPC only if none is left)")
        return head + ("guests' writes to this disk fail with ENOSPC (reads are served) until "
                       "space is freed under the driver's backing store")

    def status(self) -> dict[str, Any]:
        if self.full_since is None:
            return {"space": "ok"}
        return {"space": "full", "full_since": self.full_since, "message": self.message}

    def _failed(self, exc: BlockError) -> None:
        if exc.errno != errno.ENOSPC:
            return
        self._wrote = False
        if self.full_since is None:
            self.full_since = time.time()
            log.error("%s", self.message)

    def _went_through(self) -> None:
        self._wrote = True

    def _flushed(self) -> None:
        if self.full_since is not None and self._wrote:
            self.full_since = None
            log.warning("disk %r: driver %r takes writes again", self.disk, self.driver)

    # A mirror's replica set sees through this layer to the link's connection.
    @property
    def broken(self) -> str | None:
        return self.next.broken if isinstance(self.next, Breakable) else None

    def pending_since(self) -> float | None:
        return self.next.pending_since() if isinstance(self.next, Watched) else None

    @property
    def answered_at(self) -> float:
        return self.next.answered_at if isinstance(self.next, Watched) else 0.0

    def abandon(self, reason: str) -> None:
        if isinstance(self.next, Watched):
            self.next.abandon(reason)

    def when_broken(self, callback: Callable[[], None]) -> None:
        if isinstance(self.next, TellsBreak):
            self.next.when_broken(callback)

    async def reconnect_once(self) -> None:
        if not isinstance(self.next, Reconnectable):
            raise BlockError(errno.EIO, f"driver {self.driver!r} cannot be reconnected")
        await self.next.reconnect_once()

    async def pread_into(self, offset: int, into: memoryview) -> None:
        await self._read_into(offset, into)

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        try:
            await self.next.pwrite(offset, data, fua)
        except BlockError as exc:
            self._failed(exc)
            raise
        self._went_through()
        if fua:  # durable by itself, as after a flush
            self._flushed()

    def submit_writes(self, writes: list[tuple[int, Buffer]], fua: bool = False,
                      retried: bool = False, ring: int | None = None
                      ) -> asyncio.Future[list[BlockError | None]] | None:
        """As pwrite, without a coroutine, when the link below can (Submits)."""
        nxt = self._submits
        if nxt is None:
            return None
        return (nxt.submit_writes(writes, fua, retried) if ring is None
                else nxt.submit_writes(writes, fua, retried, ring))

    def native_client(self) -> NativeClient | None:
        """The connection below whose engine the native read plane may use (ReadsNatively)."""
        return self._native.native_client() if self._native is not None else None

    def write_ended(self, error: Exception | None) -> None:
        if error is None:
            self._went_through()
        elif isinstance(error, BlockError):
            self._failed(error)
        nxt = self._submits
        if nxt is not None:
            nxt.write_ended(error)

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
                   fast: bool = False) -> None:
        try:
            await self.next.zero(offset, length, fua, may_trim, fast)
        except BlockError as exc:
            self._failed(exc)
            raise

    async def flush(self) -> None:
        try:  # a file system with delayed allocation reports ENOSPC at fsync
            await self.next.flush()
        except BlockError as exc:
            self._failed(exc)
            raise
        self._flushed()
