"""One server-side NBD connection: the asyncio shell around the protocol core.

Python does the handshake (server_handshake.py, TLS, policy, the export), the
budgets, the idle timer and the backend calls. The per-request protocol work of
transmission is native (trustvbd._native.NbdServerSession, native/src/nbd_server/):
one call parses and checks every complete request received together, and one call
frames a loop iteration's replies (simple or structured, as negotiated) into the
few buffers one writev sends. TLS connections use the same calls; only the transport
differs. One module per concern:

- connection_handshake.py: the handshake's asyncio side, STARTTLS, the export attached;
- connection_limits.py: what a connection may hold (tasks, bytes, budget), idling;
- reply_output.py: replies queued, framed and written;
- parted_requests.py: READs and WRITEs longer than REQUEST_PART (32 MiB);
- this module: the asyncio callbacks, request dispatch and closing.

Speed: bytes are received straight into the core's buffers (BufferedProtocol),
and each request runs inline: its handler coroutine is stepped once by hand,
and only if the backend really suspends does it become a task. So a page-cached
FileBackend never pays for a task, while a slow backend (the encryption layer
waiting on drivers) gets full pipelining with replies out of order. A backend
with a native read plane (ServesReadsNatively: the encryption layer) has the READs of
each batch received started natively as they are parsed (parse_batch) and their
replies framed natively (_native_replied, once per batch of replies): no Python per
READ; one that fails there comes back to _native_failed and runs as a task. A file
export (ServedFromFile: the driver's FileBackend) on a plain socket is handed, once
attached and between requests, to a native loop on a thread of its own (file_serve.py):
no Python per request at all. That loop is the one data path for a file: a FileBackend
served otherwise (TLS, a memory budget or an idle timeout, which the driver domain never
has; or requests the client sent before the handshake's reply) goes the general way,
its coroutines stepped inline. A backend that does the common write inline (WritesInline:
the encryption layer's small writes answered before their replicas) gets such a WRITE as
one call. Replies are batched, framed and written with one writelines() per loop
iteration.

Ordering: a FLUSH waits for every write-type request received before it that is
still running, which covers the spec's "all writes completed before the flush".

Every refusal is logged with its reason. Anything the core cannot answer with an
error reply closes this one connection only.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import operator
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from trustvbd import eager
from trustvbd._native import NbdServerSession
from trustvbd.blockdev import (
    Backend,
    BlockError,
    Buffer,
    ReportsAllocation,
    ServesReadsNatively,
    WritesNatively,
    provides,
)
from trustvbd.nbd import connection_limits, file_serve, reply_output
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.connection_handshake import handshake
from trustvbd.nbd.core import ProtocolCore, Role
from trustvbd.nbd.exports import Export, PeerInfo
from trustvbd.nbd.parted_requests import PartedWrite, dispatch_part, serve_parted_read
from trustvbd.nbd.server_handshake import GREETING_FLAGS

if TYPE_CHECKING:
    from trustvbd.nbd.client import NbdClient
    from trustvbd.nbd.server import NbdServer

log = logging.getLogger("trustvbd.nbd.server")

# Plain ints on the per-request path: enum attribute access costs microseconds.
_READ, _WRITE, _DISC, _FLUSH, _TRIM, _CACHE, _WRITE_ZEROES, _BLOCK_STATUS = (
    int(c) for c in (p.Cmd.READ, p.Cmd.WRITE, p.Cmd.DISC, p.Cmd.FLUSH, p.Cmd.TRIM, p.Cmd.CACHE,
                     p.Cmd.WRITE_ZEROES, p.Cmd.BLOCK_STATUS)
)
_FUA, _NO_HOLE, _FAST_ZERO = int(p.CmdFlag.FUA), int(p.CmdFlag.NO_HOLE), int(p.CmdFlag.FAST_ZERO)
_REQ_ONE = int(p.CmdFlag.REQ_ONE)
_WRITE_TYPES = (_WRITE, _TRIM, _WRITE_ZEROES)
_POOL_MIN = 64 * 1024  # smaller payloads are sliced from the receive buffer, not pooled
_REQUEST_SIZE = 28  # an NBD request header
_FREE_SLOTS = operator.attrgetter("_free_slots")  # an NbdClient's request slots free


class Connection(asyncio.BufferedProtocol):
    """One client connection, from greeting to disconnect."""

    def __init__(self, server: NbdServer, peer: PeerInfo, refusal: str | None = None) -> None:
        self.server = server
        self.peer = peer
        self.refusal = refusal  # the peer is not who this socket serves (e.g. another uid)
        # Who it is, the server knows: a Unix socket's owner (or a port without TLS) at once,
        # a TLS port's client once its certificate passed. Until then it may be anyone on the
        # network: the server closes it for a newer one over its limit (NbdServer._make_room):
        # from the source holding the most such, one that has not begun TLS first, oldest first.
        self.proven = server.tls is None
        self.source = peer.address  # the server sets where it comes from (its address)
        self.tls_begun = False
        self.since = time.monotonic()  # accepted, or (once tls_begun) TLS begun
        self._over_tls = False  # STARTTLS began: the transport is (becoming) TLS
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
        # READs served in the native read plane (ServesReadsNatively: the encryption layer)
        self._reads: ServesReadsNatively | None = None
        # WRITEs done in the native write plane (WritesNatively: the encryption layer)
        self._writes: WritesNatively | None = None
        self._native_running = 0  # of them, running
        # A WRITE held back (_stash) until the writes behind have room (write_room).
        self._room_wait: asyncio.Task[None] | None = None
        self._native_idle: asyncio.Event | None = None  # set when the last of them ends
        self._inflight_bytes = 0
        self._parted: dict[int, PartedWrite] = {}  # cookie -> WRITE arriving in pieces
        self._held: list[Buffer] | None = None  # replies waiting for a simple-reply stream
        self._stream_lock = asyncio.Lock()
        self._drained = asyncio.Event()  # the transport holds no unsent bytes
        self._drained.set()
        self._out: list[Buffer] = []
        self._replies: list[tuple[int, int, str, int, Buffer | None]] = []  # not framed yet
        self._out_bytes = 0
        self._write_inline: Callable[[int, Buffer, bool], bool] | None = None  # WritesInline
        self._sock_fd = -1  # for file_serve.py; -1 when the transport is not a plain socket
        self._flush_scheduled = False
        self._transport_busy = False  # the transport holds unsent bytes (between pause/resume_writing)
        self._reading_paused = False
        self._stopping = False  # no more requests will be processed
        self._output_closed = False
        self._finishing = False
        self._done: asyncio.Future[None] = self._loop.create_future()
        # Served natively on a thread of its own once between requests (file_serve.py).
        self._file_serve = False  # it may be
        self._native_serving: asyncio.Future[None] | None = None  # it is: done when it ends
        self._native_sock: socket.socket | None = None  # that thread's socket, to shut down

    # --- asyncio protocol callbacks -------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment] # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            self._sock_fd = sock.fileno()
        # Told whenever the transport starts and stops holding unsent bytes: replies wait
        # here meanwhile, and a file's native loop takes over only when it holds none
        # (file_serve.py). Reading stops only at WRITE_BUFFER_HIGH bytes of output
        # (_update_reading).
        transport.set_write_buffer_limits(high=0, low=0)  # type: ignore[attr-defined]
        transport.write(self.core.send(m.Greeting(GREETING_FLAGS)))  # type: ignore[attr-defined]
        if self._budget is not None:
            self._budget.join(self)
        self._handshake_task = self._loop.create_task(handshake(self))

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
        if self._transmitting:  # as _events_arrived, inline: once per receive
            core = self.core
            # Most receives leave nothing for Python: the native planes took every request.
            if core.requests or core.events or self._stash is not None:
                self._process()
            if self._file_serve and self._native_serving is None:
                file_serve.take_over(self)
        else:
            self._wake()
        if self._budget is not None and self.core.receiving != self._receiving:
            self._update_reading()  # a payload buffer was allocated or handed on: charge it

    def eof_received(self) -> bool:
        self.core.receive_eof()
        self._events_arrived()
        # Keep our side open until in-flight replies are written; a TLS transport cannot
        # (asyncio closes it and warns at a True): say False there.
        return not self._over_tls

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

    # --- each concern in its own module, bound here as methods: no call layer per request
    # what the connection may hold, and idling (connection_limits.py)
    _start_idle_timer = connection_limits.start_idle_timer
    _update_reading = connection_limits.update_reading
    _request_started = connection_limits.request_started
    _request_ended = connection_limits.request_ended
    # replies queued, framed and written (reply_output.py)
    _queue_reply = reply_output.queue_reply
    _queue_write_replies = reply_output.queue_write_replies
    _reply_error = reply_output.reply_error
    _queue = reply_output.queue
    _flush = reply_output.flush

    # --- received events: to transmission, or to the handshake (connection_handshake.py)
    def _events_arrived(self) -> None:
        if self._transmitting:
            self._process()
        else:
            self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

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
                        log.info("nbd: %s %s", self.peer.identity, m.cut_short(ev.truncated))
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
                dispatch_part(self, item)
            elif refusal is not None:
                self._refuse(typ, cookie, *refusal)
                if typ == _WRITE and data is None:
                    # Refused, and too long to drain (REFUSED_DRAIN_MAX): the framer read
                    # no further; answer and close rather than read up to 4 GiB of it.
                    self._close_gracefully()
            elif typ == _DISC:
                self._close_gracefully()
            elif typ == _WRITE and self._write_inline is not None:
                if requests and self._writes is not None and self._write_queued(item):
                    continue
                if not self._write_inline_or_run(flags, cookie, offset, data):  # type: ignore[arg-type]
                    self._stash = item  # it waits for room behind (_room_made), reading paused
                    break
            else:
                # A READ longer than REQUEST_PART holds one part at a time (parted_requests):
                # charging its whole length put a guest's budget over for a 4 GiB read it
                # reads promptly, and stopped its other connections until it ended.
                self._run(self._serve(typ, flags, cookie, offset, length, data), typ,
                          min(length, p.REQUEST_PART) if typ == _READ
                          else length if typ == _WRITE else 0)

    def _write_queued(self, item: m.RequestItem) -> bool:
        """`item`, a WRITE, and the WRITEs queued right after it (parsed while the writes
        behind were full, or past the plane's room: they came back as requests) through the
        native write plane as one batch, as `_parse_batch` does a received one: armed once
        and collected once (`writes_taken`, before their replies leave), not once each. The
        first one the plane declines (or the first other request) goes back to the queue,
        for the usual way. False, with nothing done, if the plane takes not even `item`."""
        writes = self._writes
        assert writes is not None
        plane = writes.write_route()
        if plane is None:
            return False
        requests = self.core.requests
        cookies: list[int] = []
        try:
            while True:
                typ, flags, cookie, offset, _, data, refusal, piece = item
                if (typ != _WRITE or flags & _FUA or refusal is not None or piece is not None
                        or data is None or not plane.write(offset, data)):  # type: ignore[attr-defined]
                    if cookies:
                        requests.appendleft(item)
                    break
                cookies.append(cookie)
                if not requests:
                    break
                item = requests.popleft()
        finally:
            writes.writes_taken()  # (disarms the plane when it took none)
        self._queue_write_replies(cookies)
        return bool(cookies)

    def _write_inline_or_run(self, flags: int, cookie: int, offset: int,
                             payload: Buffer) -> bool:
        """A WRITE the backend does inline where it can (WritesInline): no coroutine; else
        the general way (_serve). False, with nothing done, when the backend asks for it to
        wait (write_room: its writes behind are full): reading pauses until they have room,
        and the caller keeps the write to serve it again then."""
        assert self._write_inline is not None
        fua = bool(flags & _FUA)
        try:
            done = self._write_inline(offset, payload, fua)
        except Exception as exc:
            self._reply_failure(_WRITE, cookie, exc)
            return True
        if not done:
            room = (self._writes.write_room(offset, len(payload))
                    if self._writes is not None and not fua else None)
            if room is not None:
                self._room_wait = self._loop.create_task(self._room_made(room))
                self._update_reading()
                return False
            self._run(self._serve(_WRITE, flags, cookie, offset, len(payload), payload), _WRITE,
                      len(payload))
            return True
        self._write_done(cookie, payload, fua)
        return True

    async def _room_made(self, room: Awaitable[None]) -> None:
        """The backend has room for the WRITE held back (_stash): reading resumes, and
        the requests received meanwhile are served (update_reading), that WRITE first."""
        try:
            await room
        finally:
            self._room_wait = None
        self._update_reading()

    def _write_done(self, cookie: int, payload: Buffer, fua: bool) -> None:
        """A WRITE done in the server's call (_write_inline_or_run): its
        pooled payload back, its reply queued; with FUA it leaves at once, as in _serve."""
        if len(payload) > _POOL_MIN:
            self.core.pool.give_back(payload)  # type: ignore[arg-type] # as in _serve
        self._queue_reply(cookie, 0, "", 0, None)
        if fua and not self._transport_busy:
            self._flush()

    def _reply_failure(self, typ: int, cookie: int, exc: Exception,
                       fast_zero: bool = False) -> None:
        """A request failed: a BlockError is answered with its errno; anything else is a
        bug, logged and answered EIO. The connection goes on either way."""
        if isinstance(exc, BlockError):
            self._reply_error(typ, cookie, p.errno_to_nbd(exc.errno, fast_zero=fast_zero),
                              exc.message)
            return
        log.error("nbd: %s on export %r failed unexpectedly", p.name_of(p.Cmd, typ),
                  self.export_name, exc_info=exc)
        self._reply_error(typ, cookie, p.NbdErr.EIO, f"internal server error: {exc}")

    # --- READs in the native read plane (ServesReadsNatively) ------------------------
    def _parse_batch(self, session: NbdServerSession, buf: bytearray, start: int, end: int
                     ) -> tuple[int, list[m.RequestItem], int]:
        """A batch of requests received (ProtocolCore.parse_batch): a batch that begins with
        READs has those the backend's native read plane can take started there, one that
        begins with WRITEs has those its native write plane takes done there (collected
        by `writes_taken` before their replies leave), in order: WRITEs until the first
        request the plane does not take, READs until the first one it does not take that
        is not a READ (reads commute); the rest come back as parsed requests. Within the
        connection's bounds (MAX_TASKS requests, MAX_INFLIGHT_BYTES for reads; the
        backend's for writes) and never while anything is held back."""
        reads, writes = self._reads, self._writes
        route = plane = None
        # Only before the batch's first other request: a READ header has type 0 at bytes
        # 6-7, a WRITE type 1 (a batch that begins with anything else skips the planes).
        if (end - start >= _REQUEST_SIZE and not buf[start + 6] and buf[start + 7] <= _WRITE
                and not self.core.requests and self._stash is None
                and not self._stopping and not self._reading_paused
                and (self._budget is None or not self._budget.over)):
            if buf[start + 7] == _READ:
                route = reads.read_route() if reads is not None else None
            elif writes is not None:
                plane = writes.write_route()
        if route is None and plane is None:
            return session.parse(buf, start, end)
        links: list[NbdClient] = []
        read_plane = None
        if route is not None:
            read_plane, links = route  # type: ignore[assignment] # (ReadPlane, NbdClients)
        # (No comprehension and no max(): once per batch received, each a call.)
        slots = list(map(_FREE_SLOTS, links))
        max_reads = connection_limits.MAX_TASKS - len(self._tasks) - self._native_running
        max_bytes = connection_limits.MAX_INFLIGHT_BYTES - self._inflight_bytes
        try:
            start, items, want, started, nbytes, used, answered, sent = session.parse_native(
                buf, start, end, self, read_plane,  # type: ignore[arg-type]
                slots, self._loop.time(), max_reads if max_reads > 0 else 0,
                max_bytes if max_bytes > 0 else 0,
                plane)  # type: ignore[arg-type] # a WritePlane
        except BaseException:
            if writes is not None and plane is not None:
                writes.writes_taken()  # writes done before it failed go on (unanswered)
            raise
        if started:
            self._native_running += started
            self._inflight_bytes += nbytes
            for client, count, gone in zip(links, used, sent, strict=True):
                if count:
                    client._native_sent(count, gone)
            self._request_started()
        if answered:  # the WRITEs taken, or READs of blocks never written (zeros)
            if plane is not None:
                assert writes is not None
                try:
                    writes.writes_taken()  # before their replies leave
                except Exception:
                    # A bug: the writes may not reach the replicas, so their replies never leave.
                    log.exception("nbd: %s on export %r: native writes could not be handed on; "
                                  "closing the connection", self.peer.identity, self.export_name)
                    session.take_output()
                    self._abort()
                    return start, [], want
            # Their replies, framed by the session. (Replies of native reads sent to a
            # replica are taken once per loop turn, by _native_settled; those answered at
            # once, with zeros, end here.)
            out, ended, nbytes = session.take_output()
            if ended:
                self._native_running -= ended
                self._inflight_bytes -= nbytes
                self._native_ended()
            self._queue(out, now=not self._native_running and not self._tasks)
        return start, items, want

    def _native_output(self) -> tuple[list[bytes | bytearray], int]:
        """The session's framed replies of native reads (and how many reads they end),
        taken and accounted: the reads no longer run, their bytes are no longer in flight."""
        session = self.core.session
        assert session is not None  # native reads ran: the session started them
        out, ended, nbytes = session.take_output()
        self._native_running -= ended
        self._inflight_bytes -= nbytes
        return out, ended

    def _native_replied(self) -> None:
        """Replies of native reads are framed in the session (told by a replica's client,
        once per batch of replies a replica's connection received, where the session does
        not settle them itself: _native_settled)."""
        out, _ = self._native_output()
        if out:
            self._queue(out, now=not self._native_running and not self._tasks)
        self._native_ended()

    def _native_settled(self) -> None:
        """Replies of native reads framed in the session during a loop turn (the session has
        the loop call this once, after the turn's ready sockets): they leave now, with what
        else is queued, and their reads are accounted as ended."""
        out, ended = self._native_output()
        if out:
            self._queue(out, now=True)
        if ended:
            self._native_ended()

    def _native_failed(self, client: object, cookie: int, offset: int, length: int,
                       failure: BlockError | list[int] | float) -> None:
        """A native read failed after it was sent (its hold released): served the general
        way (the backend's resume_read), as a task of this connection."""
        self._native_running -= 1
        self._inflight_bytes -= length
        if not self._output_closed and self._reads is not None:
            self._run(self._serve_resumed(cookie, offset, length, self._reads.resume_read(
                cast("NbdClient", client), offset, length, failure)), _READ, length)
        self._native_ended()

    async def _serve_resumed(self, cookie: int, offset: int, length: int,
                             read: Awaitable[Buffer]) -> None:
        try:
            data = await read
            if len(data) != length:
                raise BlockError(errno.EIO, f"backend returned {len(data)} of {length} bytes")
        except Exception as exc:
            self._reply_failure(_READ, cookie, exc)
            return
        self._queue_reply(cookie, 0, "", offset, data, not self._native_running and not self._tasks)

    def _native_ended(self) -> None:
        self._request_ended()
        if not self._native_running and self._native_idle is not None:
            self._native_idle.set()

    async def _wait_native(self, timeout: float | None = None) -> None:
        """Until no native read is running; after `timeout` s, give them up (their holds
        are released now, their late replies dropped)."""
        try:
            async with asyncio.timeout(timeout):
                while self._native_running > 0:
                    if self._native_idle is None:
                        self._native_idle = asyncio.Event()
                    self._native_idle.clear()
                    await self._native_idle.wait()
        except TimeoutError:
            if self.core.session is not None:
                count, nbytes = self.core.session.cancel_reads()
                self._native_running -= count
                self._inflight_bytes -= nbytes

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

    def _task_done(self, task: asyncio.Task[None], cost: int) -> None:
        self._tasks.discard(task)
        self._write_tasks.discard(task)
        self._inflight_bytes -= cost
        self._request_ended()

    async def _serve(self, typ: int, flags: int, cookie: int, offset: int, length: int,
                     payload: Buffer | None) -> None:
        backend = self._backend
        assert backend is not None
        fua = bool(flags & _FUA)
        try:
            if typ == _READ:
                if length > p.REQUEST_PART:
                    await serve_parted_read(self, cookie, offset, length)
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
        except Exception as exc:
            self._reply_failure(typ, cookie, exc, typ == _WRITE_ZEROES and bool(flags & _FAST_ZERO))
            return
        self._queue_reply(cookie, 0, "", 0, None)
        if (fua or typ == _FLUSH) and not self._transport_busy:
            # A durability point took a sync: the guest waits for this reply alone, and
            # nothing would join it by the end of this loop turn.
            self._flush()

    # --- shutdown ------------------------------------------------------------------
    def _protocol_error(self, reason: str) -> None:
        log.warning("nbd: closing connection from %s (%s): %s", self.peer.identity,
                    self.peer.address, reason)
        self._abort()

    def _abort(self) -> None:
        self._stopping = True
        file_serve.stop(self)
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
        while self._tasks or self._native_running > 0:
            if self._tasks:
                await asyncio.wait(list(self._tasks))
            await self._wait_native()  # one that fails goes on as a task: wait for it too
        self._flush()
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
            if self._native_serving is not None:
                await self._native_serving
            deadline = None if timeout is None else self._loop.time() + timeout
            if self._tasks:
                _, late = await asyncio.wait(list(self._tasks), timeout=timeout)
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)
            await self._wait_native(None if deadline is None
                                    else max(0.0, deadline - self._loop.time()))
        finally:
            if self._room_wait is not None:
                self._room_wait.cancel()  # the WRITE it held is not answered: the guest left
            self.core.parse_batch = None  # no cycle left through the core
            if self.core.session is not None:
                self.core.session.set_settle()  # nor through the session
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
