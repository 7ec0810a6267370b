"""ReplicaLink: one replica's connection, re-opened through the launcher when it breaks.

A driver is untrusted and may crash or be restarted. With a single replica, when
its connection breaks, the next request asks for a new channel (the launcher
re-checks policy) for up to `retry_window` seconds and is retried once: block
reads and writes are idempotent. In a mirrored disk (`retry_window` 0) a broken
link fails at once, so the replica set drops it from the write set and calls
`reconnect_once` in the background, with back-off, without holding up the guest.

A FLUSH is different: writes the old connection acknowledged but never flushed
may be gone with the driver, so the first flush after such a reconnect fails
with EIO instead of claiming durability it cannot prove.

A FLUSH with nothing to flush is not sent: NBD's FUA makes a write durable
before it is answered, so a FLUSH need only reach the driver if a write without
FUA (or a trim or zero) ended since the last one was sent, or is still running.
A FLUSH of the encryption domain often follows only the writes it sent on with
FUA itself (write_behind.py); the driver then syncs once instead of twice. The
first flush on a connection, a new one after a reconnect included, is always
sent: the driver may hold writes no one flushed (an earlier process's).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

from trustvbd.blockdev import (
    Backend,
    BlockError,
    Breakable,
    Buffer,
    Capabilities,
    NativeClient,
    ReadsNatively,
    Submits,
    TellsBreak,
    Watched,
    WritesMayBeLost,
    provides,
)
from trustvbd.blocks.layer import reader_into

log = logging.getLogger(__name__)

Connect = Callable[[], Awaitable[Backend]]
RETRY_WINDOW = 10.0  # seconds spent trying to get a channel back before failing a request


def _reads_of(backend: Backend) -> ReadsNatively | None:
    """The connection as ReadsNatively, checked when it is adopted rather than per batch."""
    return cast(ReadsNatively, backend) if provides(backend, ReadsNatively) else None


def _submits_of(backend: Backend) -> Submits | None:
    """The connection as Submits, checked when it is adopted rather than per write."""
    return backend if isinstance(backend, Submits) else None


class ReplicaLink:
    def __init__(self, first: Backend, name: str, connect: Connect,
                 retry_window: float = RETRY_WINDOW) -> None:
        self.next = first
        self._reads = _reads_of(first)
        self._submits = _submits_of(first)
        self._retry_window = retry_window
        self.name = name
        self._connect = connect
        self._size = first.size
        self._caps = first.capabilities
        self._lock = asyncio.Lock()
        self._dirty = False          # writes without FUA acknowledged since the last good flush
        self._maybe_lost = False     # a reconnect happened while dirty
        # What a flush must cover: writes without FUA still running, and whether one ended
        # since the last flush was sent (or the connection is new: see the module doc).
        self._plain_running = 0
        self._plain_ended = True
        self.flushes_skipped = 0
        self.reconnects = 0
        self.state = "connected"
        self.last_error: str | None = None
        self._on_broken: Callable[[], None] | None = None  # TellsBreak

    @property
    def size(self) -> int:
        return self._size

    @property
    def broken(self) -> str | None:
        """Why the current connection broke, or None while it is usable."""
        nxt = self.next
        return nxt.broken if isinstance(nxt, Breakable) else None

    def pending_since(self) -> float | None:
        nxt = self.next
        return nxt.pending_since() if isinstance(nxt, Watched) else None

    @property
    def answered_at(self) -> float:
        nxt = self.next
        return nxt.answered_at if isinstance(nxt, Watched) else 0.0

    def abandon(self, reason: str) -> None:
        nxt = self.next
        if isinstance(nxt, Watched):
            nxt.abandon(reason)

    def when_broken(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the connection in use breaks, even with no request on it."""
        self._on_broken = callback
        self._watch(self.next)

    def _watch(self, connection: Backend) -> None:
        if self._on_broken is not None and isinstance(connection, TellsBreak):
            connection.when_broken(lambda: self._broke(connection))

    def _broke(self, connection: Backend) -> None:
        if connection is not self.next or self._on_broken is None:
            return  # an old connection, replaced already
        self.state = "disconnected"
        self.last_error = connection.broken if isinstance(connection, Breakable) else None
        self._on_broken()

    async def reconnect_once(self) -> None:
        """One attempt at a new connection (raises if it fails). What the old one
        acknowledged without a flush is the replica set's to doubt, not ours."""
        broken = self.next
        async with self._lock:
            await self._adopt(await self._connect(), broken)
            self._dirty = self._maybe_lost = False
            self.state = "connected"

    async def _adopt(self, fresh: Backend, broken: Backend) -> None:
        """Serve from `fresh` instead of `broken`, unless it presents another size."""
        if fresh.size != self._size:
            await fresh.close()
            raise BlockError(errno.EIO, f"replica {self.name!r} came back with {fresh.size} "
                             f"bytes instead of {self._size}; refusing it")
        try:
            await broken.close()
        except Exception:
            pass
        self.next = fresh
        self._reads = _reads_of(fresh)
        self._submits = _submits_of(fresh)
        self.reconnects += 1
        self._watch(fresh)
        self._plain_ended = True

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "reconnects": self.reconnects,
                "last_error": self.last_error}

    async def _reconnect(self, broken: Backend) -> None:
        async with self._lock:
            if self.next is not broken:
                return  # someone else already reconnected
            self.state = "reconnecting"
            deadline = time.monotonic() + self._retry_window
            delay = 0.05
            while True:
                try:
                    # In a task of its own: a guest request is stepped by hand until it
                    # suspends (trustvbd.eager), so this may run with no current task, where
                    # the connector's asyncio.timeout raises RuntimeError.
                    fresh = await asyncio.ensure_future(self._connect())
                    break
                except Exception as exc:
                    self.last_error = str(exc)
                    if time.monotonic() + delay > deadline:
                        self.state = "disconnected"
                        raise BlockError(
                            errno.EIO, f"replica {self.name!r} is unreachable: {exc}") from exc
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
            try:
                await self._adopt(fresh, broken)
            except BlockError:
                self.state = "disconnected"
                raise
            if self._dirty:
                self._maybe_lost = True
            self.state = "connected"
            # The error that broke the old connection is history now: `status` would
            # otherwise show it beside "connected" (the log keeps it).
            log.warning("replica %s reconnected (%d) after: %s", self.name, self.reconnects,
                        self.last_error)
            self.last_error = None

    async def _call(self, op: Callable[[Backend], Awaitable[None]]) -> None:
        backend = self.next
        try:
            return await op(backend)
        except BlockError as exc:
            await self._recover_from(backend, exc)
        await op(self.next)

    async def _recover_from(self, backend: Backend, exc: BlockError) -> None:
        """After a failed first attempt: re-raise unless the connection broke, else reconnect."""
        if not (isinstance(backend, Breakable) and backend.broken):
            raise exc
        self.last_error = str(exc)
        if self._retry_window <= 0:
            self.state = "disconnected"
            raise exc
        await self._reconnect(backend)

    # pread and pwrite spell out _call: they run once per guest request, and the
    # generic path's extra coroutine and closure showed up in profiles.
    async def pread(self, offset: int, length: int) -> Buffer:
        backend = self.next
        try:
            return await backend.pread(offset, length)
        except BlockError as exc:
            await self._recover_from(backend, exc)
        return await self.next.pread(offset, length)

    async def pread_into(self, offset: int, into: memoryview) -> None:
        backend = self.next
        try:
            return await reader_into(backend)(offset, into)
        except BlockError as exc:
            await self._recover_from(backend, exc)  # the broken connection writes `into` no more
        await reader_into(self.next)(offset, into)

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if not fua:
            self._plain_began()
        backend = self.next
        try:
            try:
                return await backend.pwrite(offset, data, fua)
            except BlockError as exc:
                await self._recover_from(backend, exc)
            await self.next.pwrite(offset, data, fua)
        finally:
            if not fua:
                self._plain_end()

    def _plain_began(self) -> None:
        self._dirty = True
        self._plain_running += 1

    def _plain_end(self) -> None:
        self._plain_running -= 1
        self._plain_ended = True

    def submit_writes(self, writes: list[tuple[int, Buffer]], fua: bool = False,
                      retried: bool = False, ring: int | None = None
                      ) -> asyncio.Future[list[BlockError | None]] | None:
        """As pwrite in a mirror (no retry), without a coroutine, when the connection can
        (Submits). A single replica's writes may wait for a reconnect: they take pwrite,
        unless the caller sends one that fails again through pwrite itself (`retried`: a
        write behind, as a native read does), which reconnects."""
        submits = self._submits
        if (self._retry_window > 0 and not retried) or submits is None:
            return None
        future = (submits.submit_writes(writes, fua) if ring is None  # (as before the ring)
                  else submits.submit_writes(writes, fua, ring=ring))
        if future is not None and not fua:
            count = len(writes)
            self._dirty = True
            self._plain_running += count
            future.add_done_callback(partial(self._plain_ended_all, count))
        return future

    def _plain_ended_all(self, count: int, _: object = None) -> None:
        self._plain_running -= count
        self._plain_ended = True

    def native_client(self) -> NativeClient | None:
        """The connection whose engine the native read plane may use (ReadsNatively). A
        failure is the plane's caller's: the general path retries through pread_into,
        which reconnects."""
        reads = self._reads
        return reads.native_client() if reads is not None else None

    def write_ended(self, error: Exception | None) -> None:
        """What _recover_from records when a mirror's write fails on a broken connection
        (the connection now: a reconnect in between makes it the new one, which is fine)."""
        nxt = self.next
        if isinstance(error, BlockError) and isinstance(nxt, Breakable) and nxt.broken:
            self.last_error = str(error)
            self.state = "disconnected"
        submits = self._submits
        if submits is not None:  # a layer below keeps its own books (SpaceWatch)
            submits.write_ended(error)

    async def flush(self) -> None:
        if not (self._plain_running or self._plain_ended or self._maybe_lost):
            self.flushes_skipped += 1  # every write since the last flush went with FUA
            return
        self._plain_ended = False  # writes ending from now on need the next flush
        try:
            await self._call(lambda b: b.flush())
        except BaseException:
            self._plain_ended = True
            raise
        if self._maybe_lost:
            self._maybe_lost = False
            self._dirty = False
            raise WritesMayBeLost(errno.EIO, f"replica {self.name!r} restarted; writes acknowledged"
                             " before the restart but not flushed may be lost")
        self._dirty = False

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._plain(lambda b: b.trim(offset, length, fua), fua)

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
                   fast: bool = False) -> None:
        await self._plain(lambda b: b.zero(offset, length, fua, may_trim, fast), fua)

    async def _plain(self, op: Callable[[Backend], Awaitable[None]], fua: bool) -> None:
        """A change the next flush must cover unless it went with FUA."""
        if fua:
            return await self._call(op)
        self._plain_began()
        try:
            await self._call(op)
        finally:
            self._plain_end()

    async def cache(self, offset: int, length: int) -> None:
        await self._call(lambda b: b.cache(offset, length))

    async def close(self) -> None:
        await self.next.close()


class Unreachable:
    """Stands in for a driver that could not be reached at start: every request fails,
    `broken` says why, and the replica set reconnects it in the background."""

    def __init__(self, size: int, why: str) -> None:
        self._size = size
        self.broken: str | None = why

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    def _fail(self) -> BlockError:
        return BlockError(errno.EIO, str(self.broken))

    async def pread(self, offset: int, length: int) -> Buffer:
        raise self._fail()

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        raise self._fail()

    async def flush(self) -> None:
        raise self._fail()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise self._fail()

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
                   fast: bool = False) -> None:
        raise self._fail()

    async def cache(self, offset: int, length: int) -> None:
        raise self._fail()

    async def close(self) -> None:
        pass
