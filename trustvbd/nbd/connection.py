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
- request_serving.py: requests served in Python, the backend called;
- native_planes.py: requests in the backend's native read and write planes;
- parted_requests.py: READs and WRITEs longer than REQUEST_PART (32 MiB);
- connection_closing.py: aborting, closing gracefully, finishing;
- this module: the asyncio callbacks and request dispatch.

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
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from trustvbd.blockdev import Backend, Buffer, ServesReadsNatively, WritesNatively
from trustvbd.nbd import (
    connection_closing,
    connection_limits,
    file_serve,
    native_planes,
    reply_output,
    request_serving,
)
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.connection_handshake import handshake
from trustvbd.nbd.core import ProtocolCore, Role
from trustvbd.nbd.exports import Export, PeerInfo
from trustvbd.nbd.parted_requests import PartedWrite, dispatch_part
from trustvbd.nbd.server_handshake import GREETING_FLAGS

if TYPE_CHECKING:
    from trustvbd.nbd.server import NbdServer

log = logging.getLogger("trustvbd.nbd.server")

# Plain ints on the per-request path: enum attribute access costs microseconds.
_READ, _WRITE, _DISC = int(p.Cmd.READ), int(p.Cmd.WRITE), int(p.Cmd.DISC)


class Connection(asyncio.BufferedProtocol):
    """One client connection, from greeting to disconnect."""

    def __init__(self, server: NbdServer, peer: PeerInfo, refusal: str | None = None) -> None:
        self.server = server
        self.peer = peer
        self.refusal = refusal  # the peer is not who this socket serves (e.g. another uid)
        # Who it is, the server knows: a Unix socket's owner at once, a TLS port's client once
        # its certificate passed, a plaintext port's once its handshake ended (NbdServer sets
        # it false for TCP). Until then it may be anyone on the network: the server closes it
        # for a newer one over its limit (NbdServer._make_room): from the source holding the
        # most such, one that has not begun TLS first, oldest first.
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
        # The ring agreed in the handshake (docs/driver-ring.md): (read-only descriptor, size)
        self.ring: tuple[int, int] | None = None
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
    # requests served in Python (request_serving.py)
    _run = request_serving.run
    _serve = request_serving.serve
    _refuse = request_serving.refuse
    _write_inline_or_run = request_serving.write_inline_or_run
    # requests in the backend's native planes (native_planes.py); the session calls
    # _parse_batch, _native_replied, _native_settled and _native_failed by these names
    _parse_batch = native_planes.parse_batch
    _write_queued = native_planes.write_queued
    _native_replied = native_planes.native_replied
    _native_settled = native_planes.native_settled
    _native_failed = native_planes.native_failed
    # the end (connection_closing.py)
    _protocol_error = connection_closing.protocol_error
    _abort = connection_closing.abort
    _close_gracefully = connection_closing.close_gracefully
    _start_finish = connection_closing.start_finish

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
