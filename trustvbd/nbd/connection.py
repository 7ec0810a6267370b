"""One server-side NBD connection: the asyncio shell around the protocol core.

Python does the handshake (server_handshake.py, TLS, policy, the export), the
budgets, the idle timer and the backend calls. The per-request protocol work of
transmission is native (trustvbd._native.NbdServerSession, native/src/nbd_server/):
one call parses and checks every complete request received together, and one call
frames a loop iteration's replies (simple or structured, as negotiated) into the
few buffers one writev sends. TLS connections use the same calls; only the transport
differs.

Speed: bytes are received straight into the core's buffers (BufferedProtocol),
and each request runs inline: its handler coroutine is stepped once by hand,
and only if the backend really suspends does it become a task. So a page-cached
FileBackend never pays for a task, while a slow backend (the encryption layer
waiting on drivers) gets full pipelining with replies out of order. A backend
that serves reads by callback (StartsReads: the encryption layer) gets a READ as
one call, and queues its reply from its callback, with no coroutine at all. Replies
are batched, framed and written with one writelines() per loop iteration. A backend
with a `file_range` method (the driver's FileBackend) answers reads with a FileRange
sent by sendfile (zero_copy.py).

Ordering: a FLUSH waits for every write-type request received before it that is
still running, which covers the spec's "all writes completed before the flush".

Large requests: a READ or WRITE longer than REQUEST_PART (32 MiB) is served in
parts of at most that size, so memory stays bounded whatever the client asks
(up to the 32-bit length field, as nbd-server serves). A long WRITE arrives as
pieces (the native framer's, core.py) and gets one reply after its last piece is written.
A long READ's reply is sent part by part (framed natively too), each after the previous
one left; with simple replies nothing else may interleave, so other replies wait
meanwhile, and an error after the first part can only drop the connection (the spec's way).
Every refusal is logged with its reason.

Safety: at most MAX_TASKS requests and MAX_INFLIGHT_BYTES of payload run at
once, and reading stops while the client is not reading its replies, so a
hostile client cannot make the server allocate without bound. With a server's
MemoryBudget, all of one guest's connections together hold at most its limit
(budget.py). A connection with no request received and no reply drained for
the server's idle_timeout is closed. Anything the core cannot answer with an
error reply closes this one connection only.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from trustvbd import eager
from trustvbd.blockdev import (
    Backend,
    BlockError,
    Buffer,
    Cancellable,
    FileRange,
    FlushesPerConnection,
    ReadEnded,
    ReportsAllocation,
    ServesFileRanges,
    StartsReads,
    provides,
)
from trustvbd.crypt.tls import peer_common_name
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.core import ProtocolCore, Role
from trustvbd.nbd.exports import Export, PeerInfo
from trustvbd.nbd.server_handshake import (
    GREETING_FLAGS,
    HandshakeEnded,
    Identity,
    TlsRequired,
    negotiate,
)
from trustvbd.nbd.zero_copy import SENDFILE_MIN, OutPart, materialize, send_now

if TYPE_CHECKING:
    from trustvbd.nbd.budget import MemoryBudget
    from trustvbd.nbd.server import NbdServer

log = logging.getLogger("trustvbd.nbd.server")

MAX_TASKS = 256
MAX_INFLIGHT_BYTES = 128 * 1024 * 1024
FLUSH_OUTPUT_AT = 512 * 1024
WRITE_BUFFER_HIGH = 4 * 1024 * 1024  # stop reading requests while this many reply bytes wait
UNCHARGED_MAX = 256 * 1024  # reply bytes a connection may queue before telling its budget
# Plain ints on the per-request path: enum attribute access costs microseconds.
_READ, _WRITE, _DISC, _FLUSH, _TRIM, _CACHE, _WRITE_ZEROES, _BLOCK_STATUS = (
    int(c) for c in (p.Cmd.READ, p.Cmd.WRITE, p.Cmd.DISC, p.Cmd.FLUSH, p.Cmd.TRIM, p.Cmd.CACHE,
                     p.Cmd.WRITE_ZEROES, p.Cmd.BLOCK_STATUS)
)
_FUA, _NO_HOLE, _FAST_ZERO = int(p.CmdFlag.FUA), int(p.CmdFlag.NO_HOLE), int(p.CmdFlag.FAST_ZERO)
_REQ_ONE = int(p.CmdFlag.REQ_ONE)
_WRITE_TYPES = (_WRITE, _TRIM, _WRITE_ZEROES)
_POOL_MIN = 64 * 1024  # smaller payloads are sliced from the receive buffer, not pooled
_REPLY_HEADER = 32  # bytes counted per queued reply besides its data (its header, at most)


@dataclass(slots=True)
class _PartedWrite:
    """A WRITE served in pieces: its one reply waits for every piece."""

    refusal: tuple[int, str] | None  # the whole request's check; pieces are then skipped
    error: tuple[int, str] | None = None  # the first piece that failed
    running: int = 0
    received_all: bool = False


class _QuickRead:
    """A guest READ the backend serves by callback (StartsReads): no task of its own."""

    __slots__ = ("conn", "cookie", "handle", "length", "offset")

    def __init__(self, conn: Connection, cookie: int, offset: int, length: int) -> None:
        self.conn, self.cookie, self.offset, self.length = conn, cookie, offset, length
        self.handle: Cancellable | None = None

    def __call__(self, result: Buffer | BlockError) -> None:
        self.conn._read_ended(self, result)


class Connection(asyncio.BufferedProtocol):
    """One client connection, from greeting to disconnect."""

    def __init__(self, server: NbdServer, peer: PeerInfo, refusal: str | None = None) -> None:
        self.server = server
        self.peer = peer
        self.refusal = refusal  # the peer is not who this socket serves (e.g. another uid)
        self._tls_starting = False
        self._budget = server.budget
        self._charged = 0  # bytes this connection has charged to the budget
        self._receiving = 0  # the payload buffer size last charged
        self._stash: m.RequestItem | None = None  # a request held back while over budget
        self._activity = 0  # bumped by every receive and every drained reply
        self._quiet_checks = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self.export_name: str | None = None
        self.export: Export | None = None
        self.core = ProtocolCore(Role.SERVER)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._backend: Backend | None = None
        self._flush_backend: Callable[[], Awaitable[None]] | None = None  # FLUSH, per connection
        self._transmitting = False
        self._wakeup: asyncio.Future[None] | None = None
        self._handshake_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._write_tasks: set[asyncio.Task[None]] = set()
        self._start_read: Callable[[int, int, ReadEnded], Cancellable | None] | None = None
        self._quick: set[_QuickRead] = set()  # READs the backend serves by callback
        self._quick_idle: asyncio.Event | None = None  # set when the last of them ends
        self._inflight_bytes = 0
        self._parted: dict[int, _PartedWrite] = {}  # cookie -> WRITE arriving in pieces
        self._held: list[OutPart] | None = None  # replies waiting for a simple-reply stream
        self._stream_lock = asyncio.Lock()
        self._drained = asyncio.Event()  # the transport holds no unsent bytes
        self._drained.set()
        self._out: list[OutPart] = []
        self._replies: list[tuple[int, int, str, int, Buffer | None]] = []  # not framed yet
        self._out_bytes = 0
        self._out_special = False  # _out holds a FileRange
        self._file_range: Callable[[int, int], FileRange] | None = None
        self._sock_fd = -1  # for sendfile; -1 when the transport is not a plain socket
        self._flush_scheduled = False
        self._transport_busy = False  # the transport holds unsent bytes (between pause/resume_writing)
        self._reading_paused = False
        self._stopping = False  # no more requests will be processed
        self._output_closed = False
        self._finishing = False
        self._done: asyncio.Future[None] = self._loop.create_future()

    # --- asyncio protocol callbacks -------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment] # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            self._sock_fd = sock.fileno()
        # Told whenever the transport starts and stops holding unsent bytes: file ranges
        # (zero_copy.py) may only go straight to the socket when it holds none. Reading
        # stops only at WRITE_BUFFER_HIGH bytes of output (_update_reading).
        transport.set_write_buffer_limits(high=0, low=0)  # type: ignore[attr-defined]
        transport.write(self.core.send(m.Greeting(GREETING_FLAGS)))  # type: ignore[attr-defined]
        if self._budget is not None:
            self._budget.join(self)
        self._handshake_task = self._loop.create_task(self._handshake())

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self._stopping:
            try:
                return self.core.get_buffer(sizehint)
            except p.ProtocolError as exc:
                # Closing the transport from inside get_buffer crashes uvloop: defer it.
                self._stopping = True
                self._loop.call_soon(self._protocol_error, str(exc))
        return memoryview(bytearray(65536))  # bytes after the end are discarded

    def buffer_updated(self, nbytes: int) -> None:
        if self._stopping:
            return
        try:
            self.core.buffer_updated(nbytes)
        except p.ProtocolError as exc:
            self._protocol_error(str(exc))
            return
        self._activity += 1
        self._events_arrived()
        if self._budget is not None and self.core.receiving != self._receiving:
            self._update_reading()  # a payload buffer was allocated or handed on: charge it

    def eof_received(self) -> bool:
        self.core.receive_eof()
        self._events_arrived()
        return True  # keep our side open until in-flight replies are written

    def connection_lost(self, exc: Exception | None) -> None:
        self._output_closed = True
        self._stopping = True
        self._drained.set()  # a stream waiting for room stops at once
        # During STARTTLS the TLS layer fails start_tls itself (so the refusal is logged).
        if (self._handshake_task is not None and not self._handshake_task.done()
                and not self._tls_starting):
            self._handshake_task.cancel()
        self._wake()
        self._start_finish()

    def pause_writing(self) -> None:
        self._transport_busy = True
        self._drained.clear()
        self._update_reading()

    def resume_writing(self) -> None:
        self._activity += 1
        self._transport_busy = False
        self._drained.set()
        if (self._out or self._replies) and not self._flush_scheduled:
            self._flush_scheduled = True  # replies waiting for the transport to drain
            self._loop.call_soon(self._flush)
        self._update_reading()

    # --- public ------------------------------------------------------------------
    async def close(self, timeout: float = 10.0) -> None:
        """Drop this connection now (e.g. a new policy forbids it) and wait until done.

        Requests already running are allowed `timeout` seconds to finish (their
        replies are discarded) so a backend is never cut off mid-write.
        """
        self._abort()
        self._start_finish(timeout)
        await asyncio.shield(self._done)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)

    def budget_changed(self) -> None:
        self._update_reading()

    # --- idle connections ----------------------------------------------------------
    def _start_idle_timer(self) -> None:
        timeout = self.server.idle_timeout
        if timeout is not None and not self._stopping:
            self._idle_timer = self._loop.call_later(timeout / 4, self._check_idle)

    def _check_idle(self) -> None:
        """Every quarter of idle_timeout: four quiet checks in a row close the connection."""
        if self._stopping:
            return
        if self._activity or self._tasks:
            self._activity, self._quiet_checks = 0, 0
        else:
            self._quiet_checks += 1
            if self._quiet_checks >= 4:
                log.warning("nbd: %s (%s): no request and no reply taken for %.0f s; closing"
                            " the idle connection", self.peer.identity, self.peer.address,
                            self.server.idle_timeout)
                self._abort()
                return
        self._start_idle_timer()

    # --- handshake ---------------------------------------------------------------
    def _events_arrived(self) -> None:
        if self._transmitting:
            self._process()
        else:
            self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _next_event(self) -> m.Event:
        while True:
            ev = self.core.next_event()
            if ev is not None:
                return ev
            if self._output_closed:
                return m.ConnectionClosed()
            self._wakeup = self._loop.create_future()
            await self._wakeup

    def _write(self, data: bytes) -> None:
        if not self._output_closed and self._transport is not None:
            self._transport.write(data)

    def _refused(self, reason: str) -> None:
        log.warning("nbd: %s (%s): refused: %s", self.peer.identity, self.peer.address, reason)
        self.server.identity_refused(self.peer, reason)

    async def _start_tls(self) -> str:
        """STARTTLS was acknowledged: upgrade to TLS; return the client certificate's CN."""
        if self.core.unparsed():
            # Bytes sent before the TLS handshake would later pass as if they came under TLS.
            raise HandshakeEnded("client sent data after NBD_OPT_STARTTLS before the TLS handshake")
        context, transport = self.server.tls, self._transport
        assert context is not None and transport is not None
        self._tls_starting = True
        try:
            upgraded = await self._loop.start_tls(
                transport, self, context, server_side=True,
                ssl_handshake_timeout=self.server.handshake_timeout)
        except (ssl.SSLError, OSError, EOFError) as exc:
            why = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
            reason = f"TLS handshake failed: {why}"
            self._refused(reason)
            raise HandshakeEnded(reason) from None
        finally:
            self._tls_starting = False
        if upgraded is None or self._output_closed:
            raise HandshakeEnded("client closed the connection during the TLS handshake")
        self._transport = upgraded  # type: ignore[assignment]
        self._sock_fd = -1  # replies now go through TLS: no sendfile, no direct writes
        upgraded.set_write_buffer_limits(high=0, low=0)
        return peer_common_name(upgraded.get_extra_info("ssl_object"))

    async def _handshake(self) -> None:
        identity = Identity(refusal=self.refusal, refused=self._refused)
        if self.server.tls is not None:
            identity.tls = TlsRequired(self._start_tls, self.server.tls_name or self.peer.identity)
        if self.refusal is not None:
            self._refused(self.refusal)
        try:
            async with asyncio.timeout(self.server.handshake_timeout):
                result = await negotiate(
                    self.core, self._next_event, self._write, self.server.provider, self.peer,
                    identity,
                )
        except HandshakeEnded as exc:
            log.info("nbd: %s (%s): %s", self.peer.identity, self.peer.address, exc)
            self._close_gracefully()
            return
        except TimeoutError:
            log.warning("nbd: %s (%s) did not finish the handshake within %.0f s; closing",
                        self.peer.identity, self.peer.address, self.server.handshake_timeout)
            self._abort()
            return
        except p.ProtocolError as exc:
            self._protocol_error(str(exc))
            return
        self.export = result.export
        self.export_name = result.export.name
        self._backend = result.export.backend
        backend = self._backend
        self._file_range = (backend.file_range
                            if self._sock_fd >= 0 and isinstance(backend, ServesFileRanges) else None)
        self._flush_backend = (backend.flusher() if isinstance(backend, FlushesPerConnection)
                               else backend.flush)
        if self._file_range is None and isinstance(backend, StartsReads):
            self._start_read = backend.start_read
        self._transmitting = True
        self._update_reading()  # the guest may be over its budget already
        self._start_idle_timer()
        log.info("nbd: %s (%s) attached export %r", self.peer.identity, self.peer.address,
                 self.export_name)
        self._process()  # requests may already be waiting

    # --- transmission --------------------------------------------------------------
    def _process(self) -> None:
        requests, budget = self.core.requests, self._budget
        while not self._stopping and not self._reading_paused:
            if self._stash is not None:
                item: m.RequestItem = self._stash
                self._stash = None
            elif requests:
                item = requests.popleft()
            else:
                ev = self.core.next_event()
                if ev is None:
                    break
                if isinstance(ev, m.ConnectionClosed):
                    if ev.truncated:
                        log.warning("nbd: %s sent a truncated message (%d bytes) before closing",
                                    self.peer.identity, ev.truncated)
                    self._close_gracefully()
                continue
            typ, flags, cookie, offset, length, data, refusal, piece = item
            if budget is not None and budget.over and typ != _WRITE:
                # Over budget: a write's payload is here already (counted); anything
                # else waits until the guest's connections hold less.
                self._stash = item
                self._update_reading()
                break
            if piece is not None:
                self._dispatch_part(item)
            elif refusal is not None:
                self._refuse(typ, cookie, *refusal)
            elif typ == _DISC:
                self._close_gracefully()
            elif typ == _READ and self._start_read is not None and length <= p.REQUEST_PART:
                self._read(flags, cookie, offset, length)
            else:
                self._run(self._serve(typ, flags, cookie, offset, length, data), typ,
                          length if typ == _READ or typ == _WRITE else 0)

    def _read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        """A READ as one call down and one callback up (_read_ended), where the backend can."""
        assert self._start_read is not None
        read = _QuickRead(self, cookie, offset, length)
        try:
            handle = self._start_read(offset, length, read)
        except Exception as exc:  # a bug: this request fails, the connection goes on
            log.exception("nbd: READ on export %r failed unexpectedly", self.export_name)
            self._reply_error(_READ, cookie, p.NbdErr.EIO, f"internal server error: {exc}")
            return
        if handle is None:
            self._run(self._serve(_READ, flags, cookie, offset, length, None), _READ, length)
            return
        read.handle = handle
        self._quick.add(read)
        self._inflight_bytes += length
        self._request_started()

    def _read_ended(self, read: _QuickRead, result: Buffer | BlockError) -> None:
        read.handle = None  # no cycle with the backend's read: its buffer is free at once
        quick = self._quick
        quick.discard(read)
        self._inflight_bytes -= read.length
        if isinstance(result, BlockError):
            self._reply_error(_READ, read.cookie, p.errno_to_nbd(result.errno), result.message)
        elif len(result) != read.length:
            self._reply_error(_READ, read.cookie, p.NbdErr.EIO,
                              f"backend returned {len(result)} of {read.length} bytes")
        else:
            self._queue_reply(read.cookie, 0, "", read.offset, result)
        self._request_ended()
        if not quick and self._quick_idle is not None:
            self._quick_idle.set()

    async def _wait_quick(self, timeout: float | None = None) -> None:
        """Until no READ served by callback is running; after `timeout` s, cancel them."""
        try:
            async with asyncio.timeout(timeout):
                while self._quick:
                    if self._quick_idle is None:
                        self._quick_idle = asyncio.Event()
                    self._quick_idle.clear()
                    await self._quick_idle.wait()
        except TimeoutError:
            late, self._quick = self._quick, set()
            for read in late:
                assert read.handle is not None
                read.handle.cancel()

    def _refuse(self, typ: int, cookie: int, error: int, message: str) -> None:
        log.warning("nbd: %s (%s) export %r: refused %s: %s", self.peer.identity,
                    self.peer.address, self.export_name, p.name_of(p.Cmd, typ), message)
        self._reply_error(typ, cookie, error, message)

    def _run(self, coro: Coroutine[Any, Any, None], typ: int, cost: int) -> None:
        """Step a request's handler inline; only if it suspends does it become a task."""
        task = eager.start(self._loop, coro)
        if task is None:
            return  # finished inline, reply queued
        self._tasks.add(task)
        if typ in _WRITE_TYPES:
            self._write_tasks.add(task)
        self._inflight_bytes += cost
        task.add_done_callback(lambda t: self._task_done(t, cost))
        self._request_started()

    def _request_started(self) -> None:
        """A request went on running (a task, or a READ served by callback). Flow control
        only where one more request can change it (once per request in the encryption
        domain, where every request waits for drivers): a limit reached, the guest's
        budget over, or more held than charged by the slack _queue allows too."""
        budget = self._budget
        if (len(self._tasks) + len(self._quick) >= MAX_TASKS
                or self._inflight_bytes >= MAX_INFLIGHT_BYTES
                or (budget is not None and (budget.over or self._inflight_bytes + self._out_bytes
                                            > self._charged + UNCHARGED_MAX))):
            self._update_reading()

    def _task_done(self, task: asyncio.Task[None], cost: int) -> None:
        self._tasks.discard(task)
        self._write_tasks.discard(task)
        self._inflight_bytes -= cost
        self._request_ended()

    def _request_ended(self) -> None:
        """A running request ended. It can only let reading resume or lower the charge:
        look when reading is paused, when the budget is over, when the charge is stale by
        more than the slack, and when the last one leaves (so no stale charge outlives
        the work)."""
        budget = self._budget
        if (self._reading_paused or not (self._tasks or self._quick)
                or (budget is not None and (budget.over or self._charged - self._inflight_bytes
                                            - self._out_bytes > UNCHARGED_MAX))):
            self._update_reading()

    def _dispatch_part(self, item: m.RequestItem) -> None:
        typ, flags, cookie, offset, _length, data, refusal, last = item
        state = self._parted.get(cookie)
        if state is None:  # the first piece: every piece carries the whole request's check
            state = self._parted[cookie] = _PartedWrite(refusal)
        state.received_all = bool(last)
        if state.refusal is None and state.error is None:
            state.running += 1
            assert data is not None  # a piece always carries its payload
            self._run(self._write_part(cookie, flags, offset, data, state), _WRITE, len(data))
        else:
            self.core.pool.give_back(data)  # type: ignore[arg-type]
        self._finish_parted(typ, cookie, state)

    async def _write_part(self, cookie: int, flags: int, offset: int, payload: Buffer,
                          state: _PartedWrite) -> None:
        backend = self._backend
        assert backend is not None
        try:
            await backend.pwrite(offset, payload, bool(flags & _FUA))
        except BlockError as exc:
            state.error = state.error or (p.errno_to_nbd(exc.errno), exc.message)
        except Exception as exc:
            log.exception("nbd: WRITE part on export %r failed unexpectedly", self.export_name)
            state.error = state.error or (p.NbdErr.EIO, f"internal server error: {exc}")
        finally:
            state.running -= 1
        self.core.pool.give_back(payload)  # type: ignore[arg-type] # as in _serve
        self._finish_parted(_WRITE, cookie, state)

    def _finish_parted(self, typ: int, cookie: int, state: _PartedWrite) -> None:
        if not state.received_all or state.running or self._parted.get(cookie) is not state:
            return
        del self._parted[cookie]
        if state.refusal is not None:
            self._refuse(typ, cookie, *state.refusal)
        elif state.error is not None:
            self._reply_error(typ, cookie, *state.error)
        else:
            self._queue_reply(cookie, 0, "", 0, None)

    async def _serve_parted_read(self, cookie: int, offset: int, length: int) -> None:
        """A READ longer than REQUEST_PART: read and send it part by part (bounded memory)."""
        if self.core.structured:
            await self._stream_read(cookie, offset, length)
            return
        async with self._stream_lock:  # one simple-reply stream at a time
            self._held = []
            try:
                await self._stream_read(cookie, offset, length)
            finally:
                held, self._held = self._held, None
                if held:
                    self._queue(held)

    async def _stream_read(self, cookie: int, start: int, length: int) -> None:
        backend = self._backend
        assert backend is not None
        session, end = self.core.server_session(), start + length
        for offset in range(start, end, p.REQUEST_PART):
            if self._output_closed:
                return
            n = min(p.REQUEST_PART, end - offset)
            try:
                data = await backend.pread(offset, n)
                if len(data) != n:
                    raise BlockError(errno.EIO, f"backend returned {len(data)} of {n} bytes")
            except Exception as failure:
                exc = failure if isinstance(failure, BlockError) else BlockError(
                    errno.EIO, f"internal server error: {failure}")
                if exc is not failure:
                    log.exception("nbd: READ part on export %r failed unexpectedly", self.export_name)
                try:
                    reply = session.frame_read_error(cookie, p.errno_to_nbd(exc.errno),
                                                     exc.message, offset, offset == start)
                except ValueError:  # a simple reply's header and data are out: only a hard
                    # disconnect is honest
                    log.error("nbd: export %r: READ failed after its reply began (%s); closing "
                              "the connection from %s", self.export_name, exc, self.peer.identity)
                    self._abort()
                    return
                self._queue([reply], stream=True)
                return
            self._queue(session.frame_read_part(cookie, offset, data, offset == start,
                                                offset + n == end), stream=True)
            if not self._transport_busy:
                self._flush()
            while self._transport_busy and not self._output_closed:
                await self._drained.wait()  # one part at a time in memory

    async def _serve(self, typ: int, flags: int, cookie: int, offset: int, length: int,
                     payload: Buffer | None) -> None:
        backend = self._backend
        assert backend is not None
        fua = bool(flags & _FUA)
        try:
            if typ == _READ:
                if length > p.REQUEST_PART:
                    await self._serve_parted_read(cookie, offset, length)
                    return
                if self._file_range is not None and length >= SENDFILE_MIN:
                    self._reply_file_range(cookie, offset, self._file_range(offset, length))
                    return
                data = await backend.pread(offset, length)
                if len(data) != length:
                    raise BlockError(errno.EIO, f"backend returned {len(data)} of {length} bytes")
                self._queue_reply(cookie, 0, "", offset, data)
                return
            if typ == _WRITE:
                assert payload is not None  # a WRITE always carries its payload
                await backend.pwrite(offset, payload, fua)
                # Recycle a large payload buffer, once the transport (served inline, from
                # buffer_updated) and the backend (if it kept one) let go of it.
                if len(payload) > _POOL_MIN:
                    self.core.pool.give_back(payload)  # type: ignore[arg-type]
            elif typ == _FLUSH:
                if self._write_tasks:
                    await asyncio.wait(list(self._write_tasks))
                assert self._flush_backend is not None
                await self._flush_backend()
            elif typ == _TRIM:
                await backend.trim(offset, length, fua)
            elif typ == _WRITE_ZEROES:
                await backend.zero(
                    offset, length, fua, may_trim=not flags & _NO_HOLE, fast=bool(flags & _FAST_ZERO),
                )
            elif typ == _CACHE:
                await backend.cache(offset, length)
            elif typ == _BLOCK_STATUS:  # the checks let it through only with base:allocation
                extents = (await cast(ReportsAllocation, backend).block_status(offset, length)
                           if provides(backend, ReportsAllocation) else [(length, 0)])
                try:
                    reply = self.core.server_session().frame_block_status(
                        cookie, length, bool(flags & _REQ_ONE), extents)
                except ValueError as exc:
                    raise BlockError(errno.EIO, f"block status of [{offset}, {offset + length})"
                                     f" failed: {exc}") from None
                self._queue([reply])
                return
        except BlockError as exc:
            fast = typ == _WRITE_ZEROES and bool(flags & _FAST_ZERO)
            self._reply_error(typ, cookie, p.errno_to_nbd(exc.errno, fast_zero=fast), exc.message)
            return
        except Exception as exc:
            log.exception("nbd: %s on export %r failed unexpectedly", p.name_of(p.Cmd, typ),
                          self.export_name)
            self._reply_error(typ, cookie, p.NbdErr.EIO, f"internal server error: {exc}")
            return
        self._queue_reply(cookie, 0, "", 0, None)
        if (fua or typ == _FLUSH) and not self._transport_busy:
            # A durability point took a sync: the guest waits for this reply alone, and
            # nothing would join it by the end of this loop turn.
            self._flush()

    def _reply_file_range(self, cookie: int, offset: int, data: FileRange) -> None:
        head = self.core.server_session().frame([(cookie, 0, "", offset, data.length)])
        self._queue([*head, data])

    def _reply_error(self, typ: int, cookie: int, error: int, message: str) -> None:
        log.debug("nbd: %s %s: %s", self.peer.identity, p.name_of(p.Cmd, typ), message)
        self._queue_reply(cookie, error, message, 0, None)

    def _queue_reply(self, cookie: int, error: int, message: str, offset: int,
                     data: Buffer | None) -> None:
        """Queue one reply: framed natively, with the others of this loop iteration, by
        _frame_replies (a READ's `data` at `offset`, or an error with its message)."""
        if self._output_closed:
            return
        reply = (cookie, error, message, offset, data)
        if self._held is not None:  # a simple-reply stream is being sent
            self._held.extend(self.core.server_session().frame([reply]))
            return
        self._replies.append(reply)
        self._out_bytes += _REPLY_HEADER if data is None else _REPLY_HEADER + len(data)
        self._queued()

    def _frame_replies(self) -> None:
        replies, self._replies = self._replies, []
        self._out.extend(self.core.server_session().frame(replies))

    def _queue(self, parts: Sequence[OutPart], stream: bool = False) -> None:
        if self._output_closed:
            return
        if self._held is not None and not stream:  # a simple-reply stream is being sent
            self._held.extend(parts)
            return
        if self._replies:
            self._frame_replies()  # they go first
        for part in parts:
            if type(part) is FileRange:
                self._out_special = True
            self._out.append(part)
            self._out_bytes += len(part)
        self._queued()

    def _queued(self) -> None:
        if self._out_bytes >= FLUSH_OUTPUT_AT and not self._transport_busy:
            self._flush()
        if self._out_bytes >= WRITE_BUFFER_HIGH and not self._reading_paused:
            self._update_reading()
        elif (self._budget is not None
              and self._out_bytes + self._inflight_bytes > self._charged + UNCHARGED_MAX):
            self._update_reading()  # replies of requests that finished inline: count them
        if (self._out or self._replies) and not self._flush_scheduled:
            # Write at the end of this loop iteration: replies of all requests
            # that arrive together leave in one system call.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self, final: bool = False) -> None:
        """Write queued replies; with `final`, everything now (the connection is closing)."""
        self._flush_scheduled = False
        if self._replies:
            self._frame_replies()
        if not self._out:
            return
        transport = self._transport
        if self._output_closed or transport is None:
            self._out, self._out_bytes, self._out_special = [], 0, False
            return
        queued = self._out
        if not self._out_special:
            self._out, self._out_bytes = [], 0
            transport.writelines(queued)  # type: ignore[arg-type] # plain buffers only
            self._resume_if_drained()
            return
        direct = self._sock_fd >= 0 and not self._transport_busy
        if not direct and not final and self._sock_fd >= 0:
            return  # behind bytes the transport still holds: wait for resume_writing
        try:
            if direct:
                unsent, later = send_now(self._sock_fd, queued)
                if final:
                    unsent, later = unsent + materialize(later), []
            else:
                unsent, later = materialize(queued), []
        except OSError as exc:
            # A reply header may already be on the wire: the only honest way out
            # is to drop the connection (the client sees its requests fail).
            log.error("nbd: export %r: read error after a reply began: %s; closing the "
                      "connection from %s", self.export_name, exc.strerror, self.peer.identity)
            self._out, self._out_bytes, self._out_special = [], 0, False
            self._abort()
            return
        self._out = later
        self._out_bytes = sum(len(part) for part in later)
        self._out_special = any(type(part) is FileRange for part in later)
        if unsent:
            transport.writelines(unsent)
        self._resume_if_drained()

    def _resume_if_drained(self) -> None:
        if self._reading_paused:
            self._update_reading()

    # --- flow control and shutdown ----------------------------------------------------
    def _recharge(self, budget: MemoryBudget) -> None:
        """Tell the budget what this connection holds now."""
        held = self._inflight_bytes + self._out_bytes + self.core.receiving
        if self._transport is not None and not self._output_closed:
            held += self._transport.get_write_buffer_size()
        self._receiving = self.core.receiving
        if held != self._charged:
            budget.adjust(held - self._charged)
            self._charged = held

    def _update_reading(self) -> None:
        budget = self._budget
        if budget is not None:
            self._recharge(budget)
        if self._transport is None or self._output_closed:
            return
        busy = (
            self._out_bytes + self._transport.get_write_buffer_size() >= WRITE_BUFFER_HIGH
            or len(self._tasks) + len(self._quick) >= MAX_TASKS
            or self._inflight_bytes >= MAX_INFLIGHT_BYTES
            # A handshake is bounded on its own (option sizes and count, its timeout); pausing
            # it here would hang a guest's new connection until that timeout.
            or (budget is not None and budget.over and self._transmitting and not self.core.receiving)
        )
        if busy and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        elif not busy and self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()
            if self._transmitting:
                self._process()  # requests parsed before the pause

    def _protocol_error(self, reason: str) -> None:
        log.warning("nbd: closing connection from %s (%s): %s", self.peer.identity,
                    self.peer.address, reason)
        self._abort()

    def _abort(self) -> None:
        self._stopping = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._out.clear()
        self._replies.clear()
        self._output_closed = True
        if self._transport is not None:
            self._transport.abort()

    def _close_gracefully(self) -> None:
        """Stop taking requests, let running ones reply, then close (DISC, EOF, ABORT)."""
        if self._stopping:
            return
        self._stopping = True
        self._loop.create_task(self._drain_and_close())

    async def _drain_and_close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        await self._wait_quick()
        self._flush(final=True)
        if self._transport is not None:
            self._transport.close()

    def _start_finish(self, timeout: float | None = None) -> None:
        if not self._finishing:
            self._finishing = True
            self._loop.create_task(self._finish(timeout))

    async def _finish(self, timeout: float | None) -> None:
        try:
            if self._handshake_task is not None:
                await asyncio.wait([self._handshake_task])
            deadline = None if timeout is None else self._loop.time() + timeout
            if self._tasks:
                _, late = await asyncio.wait(list(self._tasks), timeout=timeout)
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)
            await self._wait_quick(None if deadline is None
                                   else max(0.0, deadline - self._loop.time()))
        finally:
            if self.export is not None:
                try:
                    self.server.provider.release_export(self.peer, self.export)
                except Exception:
                    log.exception("nbd: releasing export %r failed", self.export_name)
            self.server.connections.discard(self)
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            if self._budget is not None:
                self._budget.leave(self)
                self._budget.adjust(-self._charged)
                self._charged = 0
            if not self._done.done():
                self._done.set_result(None)
