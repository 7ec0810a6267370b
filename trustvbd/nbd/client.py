"""The asyncio NBD client, usable as a Backend (`NbdBackend`) in the layer stack.

The trusted encryption domain uses it to talk to untrusted driver domains, so
the server is treated as hostile: every reply is checked (right cookie, right
size, structured chunks inside their request and covering it exactly once)
before any of it is believed; read data is received straight into a buffer of
exactly the size asked for; every request has a deadline. Any violation or
timeout declares the connection broken: every pending request fails with a
BlockError that says what happened, and later calls fail fast.

The handshake (the control plane: options, STARTTLS) is Python, over the
sans-I/O `ProtocolCore`. The transmission phase is the native engine
(`trustvbd._native.NbdClientEngine`, native/src/nbd_client): it packs requests,
parses and checks replies and pairs them by cookie. On a plain socket it owns the
socket (non-blocking readv/writev, driven by add_reader/add_writer); on a TLS
stream Python's SSL transport carries the bytes and feeds them in. This module
keeps the policy: request slots, deadlines, errors, closing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustvbd._native import NbdClientEngine
from trustvbd.blockdev import BlockError, Buffer, Capabilities, ReadReplied, check_range
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.client_handshake import Handshake, handshake
from trustvbd.nbd.core import ProtocolCore, Role, State
from trustvbd.nbd.uri import parse_uri

F = p.TransmissionFlag
_READ, _WRITE, _FLUSH, _TRIM, _CACHE, _WRITE_ZEROES, _DISC = (
    int(c) for c in (p.Cmd.READ, p.Cmd.WRITE, p.Cmd.FLUSH, p.Cmd.TRIM, p.Cmd.CACHE,
                     p.Cmd.WRITE_ZEROES, p.Cmd.DISC)
)
_ESHUTDOWN = int(p.NbdErr.ESHUTDOWN)
_FUA = int(p.CmdFlag.FUA)
SOCKET_BUFFER = 4 << 20  # as the server's: a whole 256 KiB request fits one send
# Requests wait (pwrite) or are declined (submit_write) while more than this is queued
# and not yet accepted by the socket.
HIGH_WATER = 4 << 20
HANDSHAKE_READ = 64 * 1024
log = logging.getLogger(__name__)
# What the engine returns: completions (cookie, NBD error, message), why the connection
# is broken (None: it is not), and whether the server closed its end.
Batch = tuple[list[tuple[int, int, str]], str | None, bool]


def printable(text: str, limit: int = 300) -> str:
    """Server-supplied text made safe to log or show: no control characters, bounded."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return clean + ("..." if len(text) > limit else "")


class _Waiter:
    """A request sent and not yet answered. `direct`: a submitted write or read
    (submit_write, submit_read), whose slot is given back with the reply; otherwise
    _request gives the slot back. The future (or a submitted read's `replied`) gets None,
    or the BlockError the reply or a broken connection stands for."""

    __slots__ = ("deadline", "direct", "future", "length", "offset", "replied", "type")

    def __init__(self, future: asyncio.Future[None] | None, deadline: float, typ: int,
                 offset: int, length: int, direct: bool = False,
                 replied: ReadReplied | None = None) -> None:
        self.future, self.deadline, self.type, self.offset, self.length, self.direct = (
            future, deadline, typ, offset, length, direct
        )
        self.replied = replied


class _Wire(asyncio.BufferedProtocol):
    """asyncio callbacks of a TLS connection, forwarded to the client: the handshake's
    bytes go to the ProtocolCore, the transmission phase's to the engine (fed)."""

    def __init__(self, client: NbdClient) -> None:
        self.client = client
        self._fed = memoryview(bytearray(HANDSHAKE_READ))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client._transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.client._engine is not None:
            return self._fed
        return self.client._get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        client = self.client
        if client._engine is not None:
            client._resolve(client._engine.feed(self._fed[:nbytes]))
        else:
            client._buffer_updated(nbytes)

    def eof_received(self) -> bool:
        self.client._eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(exc)

    def pause_writing(self) -> None:
        self.client._writable.clear()

    def resume_writing(self) -> None:
        self.client._writable.set()


class NbdClient:
    """One NBD connection to one export; implements the Backend protocol."""

    def __init__(self, where: str, *, request_timeout: float, max_in_flight: int) -> None:
        self.where = where
        self.export_name = ""
        self.broken: str | None = None
        self.block_sizes: tuple[int, int, int] = (1, 4096, p.MAX_PAYLOAD)
        self._size = 0
        self._caps = Capabilities()
        self._flags = 0
        self._timeout = request_timeout
        self._loop = asyncio.get_running_loop()
        self._core = ProtocolCore(Role.CLIENT)  # the handshake's
        self._sock: socket.socket | None = None  # a plain connection's, until the engine has it
        self._transport: asyncio.Transport | None = None  # a TLS connection's
        self._wire = _Wire(self)
        self._engine: NbdClientEngine | None = None  # the transmission phase
        self._fd = -1  # the engine's socket (plain), watched by the loop
        self._waiters: dict[int, _Waiter] = {}
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

    # --- construction ------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        sock: socket.socket,
        export: str,
        *,
        request_timeout: float = 30.0,
        handshake_timeout: float = 10.0,
        structured_replies: bool = True,
        max_in_flight: int = 128,
        where: str | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> NbdClient:
        """Negotiate `export` over an already connected socket (the client owns it now).

        With `tls`, the connection is upgraded by STARTTLS before anything else is
        said, and the server's certificate must carry `server_hostname`."""
        self = cls(where or _describe(sock), request_timeout=request_timeout,
                   max_in_flight=max_in_flight)
        sock.setblocking(False)
        # Room for whole 256 KiB write requests in one send (the default is ~200 KiB).
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        self._sock = sock
        try:
            async with asyncio.timeout(handshake_timeout):
                starttls = None
                if tls is not None:
                    async def starttls() -> None:
                        await self._start_tls(tls, server_hostname or "localhost")
                result = await handshake(self._core, self._next_event, self._send,
                                         export, structured_replies, starttls)
                self._attach(result)
        except TimeoutError:
            self._break(errno.ETIMEDOUT, f"handshake did not finish within {handshake_timeout} s")
            raise BlockError(errno.ETIMEDOUT, f"NBD server {self.where}: {self.broken}") from None
        except BlockError:
            self._break(errno.EIO, "handshake failed")
            raise
        except p.ProtocolError as exc:
            self._break(errno.EIO, f"broke the protocol during the handshake: {exc}")
            raise BlockError(errno.EIO, f"NBD server {self.where} {self.broken}") from None
        except (ssl.SSLError, ConnectionError) as exc:
            self._break(errno.EPROTO, f"TLS handshake failed: {exc}")
            raise BlockError(errno.EPROTO, f"NBD server {self.where}: {self.broken}") from None
        except BaseException:
            self._break(errno.EIO, "handshake interrupted")
            raise
        self._adopt(export, result)
        return self

    async def _start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        if self._core.unparsed():
            raise p.ProtocolError("server sent data after accepting STARTTLS, before TLS")
        assert self._sock is not None and not self._handshake_out
        sock, self._sock = self._sock, None
        try:
            await self._loop.connect_accepted_socket(lambda: self._wire, sock)
        except BaseException:
            sock.close()
            raise
        assert self._transport is not None
        upgraded = await self._loop.start_tls(self._transport, self._wire, context,
                                              server_hostname=server_hostname)
        if upgraded is None:
            raise ConnectionError("the server closed the connection during the TLS handshake")
        upgraded.set_write_buffer_limits(high=HIGH_WATER)
        self._transport = upgraded  # type: ignore[assignment]

    def _attach(self, result: Handshake) -> None:
        """The handshake is done: the engine takes over the transmission phase."""
        if self._core.unparsed():
            raise p.ProtocolError("server sent data after the handshake, before any request")
        if self._sock is not None:  # plain: the engine owns the socket from now on
            sock, self._sock = self._sock, None
            self._engine = NbdClientEngine(sock, result.structured)  # detaches it
            self._fd = self._engine.fileno()
            self._loop.add_reader(self._fd, self._readable)
        else:  # TLS: the transport's bytes are fed to the engine (_Wire)
            self._engine = NbdClientEngine(None, result.structured)

    @classmethod
    async def open_uri(cls, uri: str, tls_dir: Path | None = None, **kw: Any) -> NbdClient:
        """Connect to nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT, or their
        TLS forms nbds+unix:// and nbds:// (client certificate from the URI's
        tls-certificates=DIR, else from `tls_dir`)."""
        target = parse_uri(uri)
        if target.tls:
            from trustvbd.crypt.tls import TlsSetupError, client_context

            where = target.tls_certificates or tls_dir
            if where is None:
                raise BlockError(errno.EINVAL, f"{uri}: a TLS URI needs a certificate directory:"
                                 " add ?tls-certificates=DIR")
            try:
                kw["tls"] = client_context(Path(where))
            except TlsSetupError as exc:
                raise BlockError(errno.EINVAL, str(exc)) from None
            kw["server_hostname"] = target.server_name
        loop = asyncio.get_running_loop()
        timeout = kw.get("handshake_timeout", 10.0)
        try:
            async with asyncio.timeout(timeout):
                if target.transport == "unix":
                    assert target.socket_path is not None  # parse_uri guarantees it
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    try:
                        await loop.sock_connect(sock, target.socket_path)
                    except BaseException:
                        sock.close()
                        raise
                else:
                    assert target.host is not None and target.port is not None
                    sock = await _connect_tcp(target.host, target.port)
        except TimeoutError:
            raise BlockError(errno.ETIMEDOUT, f"connecting to {uri} timed out") from None
        except OSError as exc:
            raise BlockError(exc.errno or errno.EIO, f"cannot connect to {uri}: {exc}") from exc
        kw.setdefault("where", uri)
        return await cls.connect(sock, target.export, **kw)

    def _adopt(self, export: str, result: Handshake) -> None:
        self.export_name = export
        self._size, self._flags = result.size, result.flags
        if result.block_sizes is not None:
            minimum, preferred, maximum = result.block_sizes
            self.block_sizes = (minimum, preferred, min(maximum, p.MAX_PAYLOAD))
        f = result.flags
        self._caps = Capabilities(
            read_only=bool(f & F.READ_ONLY),
            flush=bool(f & F.SEND_FLUSH),
            fua=bool(f & F.SEND_FUA),
            trim=bool(f & F.SEND_TRIM),
            zero=bool(f & F.SEND_WRITE_ZEROES),
            fast_zero=bool(f & F.SEND_FAST_ZERO),
            cache=bool(f & F.SEND_CACHE),
            multi_conn=bool(f & F.CAN_MULTI_CONN),
        )

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

    def submit_write(self, offset: int, data: Buffer, fua: bool = False) -> asyncio.Future[None] | None:
        """A WRITE queued now, without a coroutine (Submits); None when pwrite must do it."""
        length = len(data)
        if (self._free_slots <= 0 or not self._writable.is_set() or length > self.block_sizes[2]
                or (fua and not self._caps.fua)):
            return None
        try:
            self._check(offset, length, write=True)
        except BlockError:
            return None  # pwrite raises it
        self._free_slots -= 1
        try:
            future = self._send_request(_WRITE, offset, length, int(p.CmdFlag.FUA) if fua else 0,
                                        data, None, True)
        except BaseException:
            self._release_slot()
            raise
        return future

    def write_ended(self, error: Exception | None) -> None:
        pass  # the reply or the broken connection was handled when it came

    def submit_read(self, offset: int, into: memoryview, replied: ReadReplied) -> bool:
        """A READ into `into` queued now, with `replied` called on its reply instead of a
        future completed (SubmitsReads); False when pread_into must do it."""
        length = into.nbytes
        if self._free_slots <= 0 or not self._writable.is_set() or length > self.block_sizes[2]:
            return False
        try:
            self._check(offset, length)
        except BlockError:
            return False  # pread_into raises it
        engine = self._engine
        assert engine is not None  # _check: attached and not broken
        try:
            cookie = engine.request(_READ, 0, offset, length, None, into)
        except ValueError:
            return False  # pread_into says why
        self._free_slots -= 1
        self._await_reply(cookie, _Waiter(None, self._loop.time() + self._timeout, _READ,
                                          offset, length, True, replied), now=False)
        return True

    def _take_slot(self) -> asyncio.Future[None] | None:
        """Take a request slot: None if one was free, else a future that hands one over."""
        if self._free_slots > 0:
            self._free_slots -= 1
            return None
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._slot_waiters.append(waiter)
        return waiter

    def _release_slot(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to it
                return
        self._free_slots += 1

    async def _wait_for_slot(self, waiter: asyncio.Future[None]) -> None:
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed a slot, then cancelled: pass it on
            raise

    async def _request(
        self, typ: int, offset: int, length: int, flags: int = 0, data: Buffer | None = None,
        into: memoryview | None = None,
    ) -> None:
        waiter = self._take_slot()
        if waiter is not None:
            await self._wait_for_slot(waiter)
        try:
            if not self._writable.is_set():
                await self._writable.wait()
            self._check_usable()
            await self._send_request(typ, offset, length, flags, data, into, False)
        finally:
            self._release_slot()

    def _send_request(self, typ: int, offset: int, length: int, flags: int, data: Buffer | None,
                      into: memoryview | None, direct: bool) -> asyncio.Future[None]:
        """Queue one request (its slot taken); the future its reply completes."""
        assert self._engine is not None  # _check_usable: attached and not broken
        try:
            cookie = self._engine.request(typ, flags, offset, length, data, into)
        except ValueError as exc:
            raise p.LocalProtocolError(str(exc)) from None
        future: asyncio.Future[None] = self._loop.create_future()
        # A FUA write or a FLUSH leaves at once, with what is queued before it: a FLUSH
        # waits for it, and nothing would gain from joining it in one system call at the
        # end of this turn.
        self._await_reply(cookie, _Waiter(future, self._loop.time() + self._timeout, typ,
                                          offset, length, direct),
                          now=bool(flags & _FUA) or typ == _FLUSH)
        return future

    def _await_reply(self, cookie: int, waiter: _Waiter, now: bool) -> None:
        """Pair `cookie`'s reply with `waiter` and send its request: `now`, or with the
        others of this loop turn in one writev. The batch is sent by a callback queued
        before any of its requests awaits, so it leaves before any of their callers can be
        woken (cancelled) and reuse a buffer; what the socket does not take then, the
        engine copies."""
        self._waiters[cookie] = waiter
        if now:
            self._send_outgoing()
        elif not self._send_queued:
            self._send_queued = True
            self._loop.call_soon(self._send_outgoing)
        if self._timer is None:
            self._arm_timer()

    def _send_outgoing(self) -> None:
        self._send_queued = False
        engine = self._engine
        if engine is None or (self._fd < 0 and self._transport is None):
            return  # dropped: the engine let go of what was queued
        if self._transport is not None:  # TLS
            if engine.queued:
                self._transport.writelines(engine.take_output())
            return
        if self._watching_writes:
            return  # the socket is full; _on_writable goes on when it has room
        self._write()

    def _write(self) -> None:
        """Write what the engine has queued; watch the socket while some is left."""
        assert self._engine is not None
        try:
            done = self._engine.send()
        except OSError as exc:
            self._break(errno.EIO, f"connection lost ({exc})")
            return
        if done:
            if self._watching_writes:
                self._loop.remove_writer(self._fd)
                self._watching_writes = False
            self._writable.set()
            self._drained.set()
            return
        self._drained.clear()
        if not self._watching_writes:
            self._loop.add_writer(self._fd, self._write)
            self._watching_writes = True
        if self._engine.queued > HIGH_WATER:
            self._writable.clear()
        else:
            self._writable.set()

    def _reply_error(self, error: int, message: str, typ: int, offset: int,
                     length: int) -> BlockError:
        """The error an error reply stands for (to raise)."""
        err = p.nbd_to_errno(error)
        text = f": {printable(message)}" if message else ""
        if error == _ESHUTDOWN:
            self._start_shutdown()
        return BlockError(err, (
            f"NBD server {self.where} failed {p.name_of(p.Cmd, typ)} [{offset}, {offset + length}) "
            f"with {p.name_of(p.NbdErr, error)}{text}"
        ))

    def _start_shutdown(self) -> None:
        # The server asked us to go (ESHUTDOWN): the spec wants a soft disconnect.
        if self.broken is None:
            self.broken = "the server is shutting down"
            self._loop.create_task(self._disconnect_when_idle())

    async def _wait_idle(self) -> None:
        """Until no request waits for its reply (submitted reads have no future to await)."""
        while self._waiters:
            if self._idle is None:
                self._idle = asyncio.Event()
            self._idle.clear()
            await self._idle.wait()

    async def _disconnect_when_idle(self) -> None:
        await self._wait_idle()
        if not self._closing:
            await self._disconnect(self.broken or "the server is shutting down")
            self._drop_connection()

    async def _disconnect(self, reason: str) -> None:
        """Send NBD_CMD_DISC after what is queued (idle: no request pending), and wait
        until it is out, for at most the request timeout."""
        engine = self._engine
        if engine is None or (self._fd < 0 and self._transport is None):
            return
        engine.disconnect()
        self.broken = self.broken or reason
        if self._transport is not None:
            self._transport.writelines(engine.take_output())
            return  # closing the transport flushes it
        if not self._watching_writes:
            self._write()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                await self._drained.wait()

    def _drop_connection(self, abort: bool = False) -> None:
        """Close the socket or transport (the engine lets go of every buffer)."""
        self._drained.set()  # a _disconnect waiting for the socket waits no more
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            if self._watching_writes:
                self._loop.remove_writer(self._fd)
                self._watching_writes = False
            self._fd = -1
        if self._engine is not None:
            self._engine.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._transport is not None:
            if abort:
                self._transport.abort()
            else:
                self._transport.close()

    # --- timeouts and failure ---------------------------------------------------------
    def pending_since(self) -> float | None:
        """Loop time the oldest unanswered request was sent (Watched); None if none waits."""
        for oldest in self._waiters.values():  # in the order sent
            return oldest.deadline - self._timeout
        return None

    def abandon(self, reason: str) -> None:
        """Give up on this connection (Watched): unanswered requests fail with `reason`."""
        self._break(errno.ETIMEDOUT, reason)

    def when_broken(self, callback: Callable[[], None]) -> None:
        """Call `callback` soon after this connection breaks (TellsBreak), if not closed by us."""
        self._on_broken = callback
        if self.broken is not None and not self._closing:
            self._loop.call_soon(callback)

    def _arm_timer(self) -> None:
        if self._waiters:
            oldest = next(iter(self._waiters.values()))
            self._timer = self._loop.call_at(oldest.deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._waiters:
            return
        oldest = next(iter(self._waiters.values()))
        if oldest.deadline <= self._loop.time():
            self._break(errno.ETIMEDOUT, (
                f"no reply to {p.name_of(p.Cmd, oldest.type)} "
                f"[{oldest.offset}, {oldest.offset + oldest.length}) within {self._timeout} s"
            ))
        else:
            self._arm_timer()

    def _break(self, err: int, reason: str) -> None:
        """Declare the connection dead: fail everything pending, drop the socket."""
        if self.broken is None and self._on_broken is not None and not self._closing:
            self._loop.call_soon(self._on_broken)
        if self.broken is None or self._waiters:
            self.broken = self.broken or reason
            failure = BlockError(err, f"NBD server {self.where}: {reason}; connection closed")
            waiters = list(self._waiters.values())
            self._waiters.clear()
            for waiter in waiters:
                if waiter.replied is not None:
                    # Not from inside _break: its caller may be what is breaking us (a hedge).
                    self._loop.call_soon(waiter.replied, failure)
                elif waiter.future is not None and not waiter.future.done():
                    waiter.future.set_exception(failure)
                if waiter.direct:
                    self._release_slot()
            if self._idle is not None:
                self._idle.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._writable.set()  # writers wake up and find the connection broken
        self._wake_handshake()
        self._drop_connection(abort=True)

    # --- receiving ------------------------------------------------------------------
    def _readable(self) -> None:
        assert self._engine is not None
        self._resolve(self._engine.readable())

    def _resolve(self, batch: Batch) -> None:
        """Complete the futures of the requests the engine saw answered; then act on a
        broken connection or the server's end of it."""
        done, broken, eof = batch
        self.answered_at = self._loop.time()  # the server said something
        if done:
            waiters = self._waiters
            for cookie, error, message in done:
                waiter = waiters.pop(cookie)
                if waiter.direct:
                    self._release_slot()
                replied, future = waiter.replied, waiter.future
                if replied is not None:  # a submitted read: its caller goes on from here
                    try:
                        replied(self._reply_error(error, message, waiter.type, waiter.offset,
                                                  waiter.length) if error else None)
                    except Exception:
                        log.exception("NBD client %s: a read's completion failed", self.where)
                    continue
                assert future is not None
                if future.done():
                    continue
                if error:
                    future.set_exception(self._reply_error(
                        error, message, waiter.type, waiter.offset, waiter.length))
                else:
                    future.set_result(None)
            if self._idle is not None and not waiters:
                self._idle.set()
        if broken is not None:
            self._break(errno.EIO, broken)
        elif eof:
            self._eof()

    def _eof(self) -> None:
        if self._engine is None:
            self._core.receive_eof()
            self._wake_handshake()  # the handshake reads the ConnectionClosed event
        elif not (self._closing and not self._waiters):
            self._break(errno.EIO, "the server closed the connection")
        else:
            self._drop_connection()

    def _lost(self, exc: Exception | None) -> None:
        if self.broken is None or self._waiters:
            self._break(errno.EIO, f"connection lost ({exc})" if exc else "connection lost")
        self._wake_handshake()

    # --- handshake plumbing (ProtocolCore) ----------------------------------------------
    def _get_buffer(self, sizehint: int) -> memoryview:
        if self._core.state is not State.ERROR:
            try:
                return self._core.get_buffer(sizehint)
            except p.ProtocolError as exc:
                # Aborting inside get_buffer crashes uvloop: defer it.
                self._loop.call_soon(self._break, errno.EIO, f"broke the protocol: {exc}")
        return memoryview(bytearray(65536))  # discarded

    def _buffer_updated(self, nbytes: int) -> None:
        if self._core.state is State.ERROR:
            return
        try:
            self._core.buffer_updated(nbytes)
        except p.ProtocolError as exc:
            self._break(errno.EIO, f"broke the protocol: {exc}")
            return
        self._wake_handshake()

    def _wake_handshake(self) -> None:
        if self._handshake_wakeup is not None and not self._handshake_wakeup.done():
            self._handshake_wakeup.set_result(None)

    async def _next_event(self) -> m.Event:
        core = self._core
        while True:
            if core.state is State.ERROR:
                raise p.ProtocolError(core.error or "protocol error")
            ev = core.next_event()
            if ev is not None:
                return ev
            sock = self._sock
            if sock is not None:  # plain: read the socket ourselves
                if self._handshake_eof:
                    return m.ConnectionClosed()
                try:
                    if self._handshake_out:
                        out, self._handshake_out = b"".join(self._handshake_out), []
                        await self._loop.sock_sendall(sock, out)
                    n = await self._loop.sock_recv_into(sock, core.get_buffer(HANDSHAKE_READ))
                except OSError:
                    n = 0  # a reset: as the server hanging up
                if n:
                    core.buffer_updated(n)
                else:
                    self._handshake_eof = True
                    core.receive_eof()
                continue
            if self._transport is None or self._transport.is_closing():
                return m.ConnectionClosed()
            self._handshake_wakeup = self._loop.create_future()
            await self._handshake_wakeup

    def _send(self, msg: m.Event) -> None:
        parts = self._core.send_parts(msg)
        if self._transport is not None:
            self._transport.writelines(parts)
        else:
            self._handshake_out += parts


NbdBackend = NbdClient


def _describe(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "(unknown address)"
    if sock.family == socket.AF_UNIX:
        return f"unix:{peer or '?'}"
    return f"{peer[0]}:{peer[1]}"


async def _connect_tcp(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError = OSError(errno.EHOSTUNREACH, f"no address for {host}")
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last
