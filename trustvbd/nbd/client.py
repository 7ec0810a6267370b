"""The asyncio NBD client, usable as a Backend (`NbdBackend`) in the layer stack.

The trusted encryption domain uses it to talk to untrusted driver domains, so
the server is treated as hostile: every reply is checked (right cookie, right
size, structured chunks inside their request and covering it exactly once)
before any of it is believed; read data is received straight into a buffer of
exactly the size asked for; every request has a deadline. Any violation or
timeout declares the connection broken: every pending request fails with a
BlockError that says what happened, and later calls fail fast. One module per
concern:

- client_connect.py: the socket, the handshake (Python, over the sans-I/O
  `ProtocolCore`), STARTTLS, and the hand-over to the native engine;
- client_transmission.py: the transmission phase around the native engine
  (`trustvbd._native.NbdClientEngine`, native/src/nbd_client): request slots,
  sending, replies, deadlines, breaking and disconnecting;
- this module: the Backend: its calls as NBD requests (split at the server's
  maximum, FUA and zeroes emulated where the server lacks them), requests submitted
  without a coroutine (Submits), reads the native read plane queues on the engine
  (ReadsNatively), and what a watcher asks (Watched).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import socket
from collections.abc import Callable

from trustvbd._native import NbdClientEngine
from trustvbd.blockdev import BlockError, Buffer, Capabilities, check_range
from trustvbd.nbd import client_connect, client_transmission
from trustvbd.nbd import protocol as p
from trustvbd.nbd.client_transmission import Group, Waiter
from trustvbd.nbd.core import ProtocolCore, Role

_READ, _WRITE, _FLUSH, _TRIM, _CACHE, _WRITE_ZEROES = (
    int(c) for c in (p.Cmd.READ, p.Cmd.WRITE, p.Cmd.FLUSH, p.Cmd.TRIM, p.Cmd.CACHE,
                     p.Cmd.WRITE_ZEROES)
)


class NbdClient:
    """One NBD connection to one export; implements the Backend protocol."""

    def __init__(self, where: str, *, request_timeout: float, max_in_flight: int) -> None:
        self.where = where
        self.export_name = ""
        self.broken: str | None = None
        self.block_sizes: tuple[int, int, int] = (1, 4096, p.MAX_PAYLOAD)
        self._size = 0
        # The ring the driver took (docs/driver-ring.md), by its inode: RING_WRITEs from it
        self.ring: int | None = None
        self._caps = Capabilities()
        self._flags = 0
        self._timeout = request_timeout
        self._loop = asyncio.get_running_loop()
        self._core = ProtocolCore(Role.CLIENT)  # the handshake's
        self._sock: socket.socket | None = None  # a plain connection's, until the engine has it
        self._transport: asyncio.Transport | None = None  # a TLS connection's
        self._wire = client_connect.Wire(self)
        self._engine: NbdClientEngine | None = None  # the transmission phase
        self._fd = -1  # the engine's socket (plain), watched by the loop
        self._waiters: dict[int, Waiter] = {}
        self._groups: dict[int, Group] = {}  # submit_writes' batches, by first cookie
        # Request slots (at most max_in_flight requests in flight): a free slot is taken
        # without a coroutine; a freed one goes straight to the longest waiter.
        self._free_slots = max_in_flight
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        # Cleared while more than HIGH_WATER bytes wait for the socket.
        self._writable = asyncio.Event()
        self._writable.set()
        self._watching_writes = False
        self._drained = asyncio.Event()  # nothing waits for the socket (set while so)
        self._drained.set()
        self._handshake_wakeup: asyncio.Future[None] | None = None
        self._handshake_out: list[Buffer] = []  # plain: sent before the handshake next reads
        self._handshake_eof = False
        self._closing = False
        self.answered_at = 0.0  # loop time of the last reply (Watched)
        self._on_broken: Callable[[], None] | None = None  # TellsBreak
        # Requests made in one turn of the event loop leave in one writev: a mirror's
        # fan-out and a guest's queue of small writes cost one system call per turn and
        # replica, not one per request.
        self._send_queued = False
        self._idle: asyncio.Event | None = None  # set when no request waits (_wait_idle)

    # --- construction (client_connect.py) ----------------------------------------
    connect = classmethod(client_connect.connect)
    open_uri = classmethod(client_connect.open_uri)

    # --- Backend --------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    async def pread(self, offset: int, length: int) -> Buffer:
        buf = bytearray(length)
        await self.pread_into(offset, memoryview(buf))
        return buf

    async def pread_into(self, offset: int, into: memoryview) -> None:
        """Read len(into) bytes at offset straight into `into` (written until this returns)."""
        length = into.nbytes
        self._check(offset, length)
        limit = self.block_sizes[2]
        if length <= limit:
            await self._request(_READ, offset, length, into=into)
            return
        await asyncio.gather(*(
            self._request(_READ, at, min(limit, offset + length - at),
                          into=into[at - offset:at - offset + min(limit, offset + length - at)])
            for at in range(offset, offset + length, limit)
        ))

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        length = len(data)
        self._check(offset, length, write=True)
        flags, flush_after = self._fua(fua)
        limit = self.block_sizes[2]
        if length <= limit:
            await self._request(_WRITE, offset, length, flags, data)
        else:
            view = memoryview(data).cast("B")
            await asyncio.gather(*(
                self._request(_WRITE, offset + at, min(limit, length - at), flags,
                              view[at : at + limit])
                for at in range(0, length, limit)
            ))
        if flush_after:
            await self.flush()

    async def flush(self) -> None:
        if self._caps.flush:
            await self._request(_FLUSH, 0, 0)
        else:
            self._check_usable()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check(offset, length, write=True)
        if not self._caps.trim:
            return  # a hint the server cannot take; the spec lets us drop it
        flags, flush_after = self._fua(fua)
        await self._ranges(_TRIM, offset, length, flags)
        if flush_after:
            await self.flush()

    async def zero(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
        fast: bool = False,
    ) -> None:
        self._check(offset, length, write=True)
        if fast and not self._caps.fast_zero:
            raise BlockError(errno.ENOTSUP, f"NBD server {self.where} cannot zero fast")
        if not self._caps.zero:
            limit = min(self.block_sizes[2], 4 * 1024 * 1024)
            zeros = bytes(min(limit, length))
            for at in range(offset, offset + length, limit):
                n = min(limit, offset + length - at)
                await self.pwrite(at, zeros[:n] if n < len(zeros) else zeros, fua)
            return
        flags, flush_after = self._fua(fua)
        if not may_trim:
            flags |= p.CmdFlag.NO_HOLE
        if fast:
            flags |= p.CmdFlag.FAST_ZERO
        await self._ranges(_WRITE_ZEROES, offset, length, flags)
        if flush_after:
            await self.flush()

    async def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if self._caps.cache:
            await self._ranges(_CACHE, offset, length, 0)

    async def close(self) -> None:
        """Let pending requests finish, say goodbye (NBD_CMD_DISC) and close."""
        if self._closing:
            return
        self._closing = True
        if self.broken is None:
            await self._wait_idle()
        if self.broken is None:
            await self._disconnect("connection closed by the client")
        self._drop_connection()

    # --- requests -------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self.broken is not None:
            raise BlockError(
                errno.ESHUTDOWN if "shutting down" in self.broken else errno.EIO,
                f"NBD connection to {self.where} is unusable: {self.broken}",
            )

    def _check(self, offset: int, length: int, write: bool = False) -> None:
        self._check_usable()
        check_range(self._size, offset, length)
        if write and self._caps.read_only:
            raise BlockError(
                errno.EPERM, f"NBD export {self.export_name!r} at {self.where} is read-only"
            )
        align = self.block_sizes[0]
        if align > 1 and (offset % align or (length % align and offset + length != self._size)):
            raise BlockError(errno.EINVAL, (
                f"request [{offset}, {offset + length}) is not aligned to the {align}-byte "
                f"minimum block of NBD server {self.where}"
            ))

    def _fua(self, fua: bool) -> tuple[int, bool]:
        """(command flags, flush afterwards) for a write that must be durable if `fua`."""
        if not fua:
            return 0, False
        if self._caps.fua:
            return int(p.CmdFlag.FUA), False
        return 0, self._caps.flush

    async def _ranges(self, typ: int, offset: int, length: int, flags: int) -> None:
        # Keep every effect length within the advertised maximum: the spec lets a
        # server refuse larger ones, and lengths must fit in 32 bits anyway.
        limit = self.block_sizes[2]
        if length <= limit:
            await self._request(typ, offset, length, flags)
            return
        await asyncio.gather(*(
            self._request(typ, at, min(limit, offset + length - at), flags)
            for at in range(offset, offset + length, limit)
        ))

    def submit_writes(self, writes: list[tuple[int, Buffer]], fua: bool = False,
                      retried: bool = False, ring: int | None = None
                      ) -> asyncio.Future[list[BlockError | None]] | None:
        """WRITEs queued now, without a coroutine (Submits); None, with nothing queued,
        when pwrite must do them (too few free slots, the socket backed up, a write too
        large for one request or failing a check). The same whether the caller retries or
        not: a connection never retries."""
        count = len(writes)
        caps = self._caps
        if ring is not None and ring != self.ring:
            return None  # this connection agreed another ring, or none
        if (self._free_slots < count or not self._writable.is_set() or (fua and not caps.fua)
                or self.broken is not None or caps.read_only):
            return None
        align, _, limit = self.block_sizes
        self._free_slots -= count
        try:
            # What _check refuses, the engine checks: none queued then (pwrite says why).
            future = self._send_writes(writes, int(p.CmdFlag.FUA) if fua else 0,
                                       (self._size, align, limit), ring is not None)
        except BaseException:
            for _ in range(count):
                self._release_slot()
            raise
        if future is None:
            for _ in range(count):
                self._release_slot()
        return future

    def write_ended(self, error: Exception | None) -> None:
        pass  # the reply or the broken connection was handled when it came

    def native_client(self) -> NbdClient | None:
        """This connection, while the native read plane may queue reads on its engine
        (ReadsNatively); None once it broke or is closing."""
        if self._engine is None or self.broken is not None or self._closing:
            return None
        return self

    def native_engine(self) -> NbdClientEngine | None:
        """The engine the native read plane queues reads on (NativeClient)."""
        return self._engine

    def take_lagging(self, before: float) -> None:
        """The native read plane's reads sent before loop time `before` go up to Python,
        which hedges them; their requests stay in flight, their late replies are dropped."""
        engine = self._engine
        if engine is not None and engine.native_oldest is not None:
            native = engine.take_lagging(before)
            if native is not None:
                self._native_done(native)

    # --- watched (Watched, TellsBreak) ---------------------------------------------
    def pending_since(self) -> float | None:
        """Loop time the oldest unanswered request was sent (Watched); None if none waits.
        The native read plane's reads and submit_writes' batches count too."""
        native = client_transmission.oldest_sent(self)
        for oldest in self._waiters.values():  # in the order sent
            sent = oldest.deadline - self._timeout
            return sent if native is None else min(sent, native)
        return native

    def abandon(self, reason: str) -> None:
        """Give up on this connection (Watched): unanswered requests fail with `reason`."""
        self._break(errno.ETIMEDOUT, reason)

    def when_broken(self, callback: Callable[[], None]) -> None:
        """Call `callback` soon after this connection breaks (TellsBreak), if not closed by us."""
        self._on_broken = callback
        if self.broken is not None and not self._closing:
            self._loop.call_soon(callback)

    # --- the transmission phase (client_transmission.py), bound here as methods: no
    # call layer between a request and the engine
    _request = client_transmission.request
    _send_request = client_transmission.send_request
    _send_writes = client_transmission.send_writes
    _await_reply = client_transmission.await_reply
    _release_slot = client_transmission.release_slot
    _native_done = client_transmission.native_done
    # what a server connection's native read plane calls (native_planes.parse_batch)
    native_sent = client_transmission.native_sent
    # what the engine's reader (NbdClientEngine.ready) calls: _native.EngineOwner
    native_answered = client_transmission.native_answered
    resolve = client_transmission.resolve
    _eof = client_transmission.eof_received
    _lost = client_transmission.lost
    _break = client_transmission.break_connection
    _wait_idle = client_transmission.wait_idle
    _disconnect = client_transmission.disconnect
    _drop_connection = client_transmission.drop_connection
    _wake_handshake = client_connect.wake_handshake


NbdBackend = NbdClient
