"""Connecting an NbdClient: the socket, the handshake and the hand-over to the engine.

The handshake (the control plane: options, STARTTLS) is Python, over the sans-I/O
`ProtocolCore` (client_handshake.py does the negotiation). On a plain socket the
handshake reads and writes the socket itself; then the native engine takes the socket
over (_attach). On TLS, Python's SSL transport carries the bytes for both phases
(Wire): the handshake's to the ProtocolCore, the transmission phase's to the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustvbd._native import NbdClientEngine
from trustvbd.blockdev import BlockError, Capabilities
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd import ring
from trustvbd.nbd.client_handshake import Handshake, handshake
from trustvbd.nbd.client_transmission import HIGH_WATER
from trustvbd.nbd.core import State
from trustvbd.nbd.uri import parse_uri

if TYPE_CHECKING:
    from trustvbd.nbd.client import NbdClient

F = p.TransmissionFlag
SOCKET_BUFFER = 4 << 20  # as the server's: a whole 256 KiB request fits one send
HANDSHAKE_READ = 64 * 1024


class Wire(asyncio.BufferedProtocol):
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
        return _get_buffer(self.client, sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        client = self.client
        if client._engine is not None:
            client.resolve(client._engine.feed(self._fed[:nbytes]))
        else:
            _buffer_updated(client, nbytes)

    def eof_received(self) -> bool:
        self.client._eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(exc)

    def pause_writing(self) -> None:
        self.client._writable.clear()

    def resume_writing(self) -> None:
        self.client._writable.set()


async def connect(
    cls: type[NbdClient],
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
    ring: tuple[int, int] | None = None,
) -> NbdClient:
    """Negotiate `export` over an already connected socket (the client owns it now).

    With `ring` (a read-only descriptor of a sealed memfd, its size), on a plain Unix
    socket the ring is offered (docs/driver-ring.md); `client.ring` says if it was taken.

    With `tls`, the connection is upgraded by STARTTLS before anything else is
    said, and the server's certificate must carry `server_hostname`."""
    client = cls(where or _describe(sock), request_timeout=request_timeout,
                 max_in_flight=max_in_flight)
    sock.setblocking(False)
    # Room for whole 256 KiB write requests in one send (the default is ~200 KiB).
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    client._sock = sock
    try:
        async with asyncio.timeout(handshake_timeout):
            starttls = None
            if tls is not None:
                async def starttls() -> None:
                    await _start_tls(client, tls, server_hostname or "localhost")
            offer = None
            if ring is not None and tls is None and sock.family == socket.AF_UNIX:
                offer = (ring[1], partial(_send_fd, client, ring[0]))
            result = await handshake(client._core, partial(_next_event, client), partial(_send, client),
                                     export, structured_replies, starttls, offer)
            _attach(client, result)
    except TimeoutError:
        client._break(errno.ETIMEDOUT, f"handshake did not finish within {handshake_timeout} s")
        raise BlockError(errno.ETIMEDOUT, f"NBD server {client.where}: {client.broken}") from None
    except BlockError:
        client._break(errno.EIO, "handshake failed")
        raise
    except p.ProtocolError as exc:
        client._break(errno.EIO, f"broke the protocol during the handshake: {exc}")
        raise BlockError(errno.EIO, f"NBD server {client.where} {client.broken}") from None
    except (ssl.SSLError, ConnectionError) as exc:
        client._break(errno.EPROTO, f"TLS handshake failed: {exc}")
        raise BlockError(errno.EPROTO, f"NBD server {client.where}: {client.broken}") from None
    except BaseException:
        client._break(errno.EIO, "handshake interrupted")
        raise
    _adopt(client, export, result)
    client.ring = os.fstat(ring[0]).st_ino if ring is not None and result.ring else None
    return client


async def open_uri(cls: type[NbdClient], uri: str, tls_dir: Path | None = None, **kw: Any) -> NbdClient:
    """Connect to nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT, or their
    TLS forms nbds+unix:// and nbds:// (client certificate from the URI's
    tls-certificates=DIR, else from `tls_dir`).

    Run as a task of its own, awaited (and cancelled with its caller): asyncio.timeout
    needs the current task to be the one awaiting it, and a coroutine stepped by hand
    (trustvbd.eager: a guest request's first step) has no task, or another one's."""
    return await asyncio.ensure_future(_open_uri(cls, uri, tls_dir, **kw))


async def _open_uri(cls: type[NbdClient], uri: str, tls_dir: Path | None, **kw: Any) -> NbdClient:
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


async def _start_tls(client: NbdClient, context: ssl.SSLContext, server_hostname: str) -> None:
    if client._core.unparsed():
        raise p.ProtocolError("server sent data after accepting STARTTLS, before TLS")
    assert client._sock is not None and not client._handshake_out
    sock, client._sock = client._sock, None
    try:
        await client._loop.connect_accepted_socket(lambda: client._wire, sock)
    except BaseException:
        sock.close()
        raise
    assert client._transport is not None
    upgraded = await client._loop.start_tls(client._transport, client._wire, context,
                                            server_hostname=server_hostname)
    if upgraded is None:
        raise ConnectionError("the server closed the connection during the TLS handshake")
    upgraded.set_write_buffer_limits(high=HIGH_WATER)
    client._transport = upgraded  # type: ignore[assignment]


def _attach(client: NbdClient, result: Handshake) -> None:
    """The handshake is done: the engine takes over the transmission phase."""
    if client._core.unparsed():
        raise p.ProtocolError("server sent data after the handshake, before any request")
    # The native read plane's reads are no longer than the driver takes (a server may fail
    # longer ones: nbdkit's blocksize-policy filter does).
    most = min(result.block_sizes[2], p.MAX_PAYLOAD) if result.block_sizes else p.MAX_PAYLOAD
    if client._sock is not None:  # plain: the engine owns the socket from now on
        sock, client._sock = client._sock, None
        client._engine = NbdClientEngine(sock, result.structured, most)  # detaches it
        client._fd = client._engine.fileno()
        client._loop.add_reader(client._fd, client._engine.ready, client)  # (EngineOwner)
    else:  # TLS: the transport's bytes are fed to the engine (Wire)
        client._engine = NbdClientEngine(None, result.structured, most)


def _adopt(client: NbdClient, export: str, result: Handshake) -> None:
    client.export_name = export
    client._size, client._flags = result.size, result.flags
    if result.block_sizes is not None:
        minimum, preferred, maximum = result.block_sizes
        client.block_sizes = (minimum, preferred, min(maximum, p.MAX_PAYLOAD))
    f = result.flags
    client._caps = Capabilities(
        read_only=bool(f & F.READ_ONLY),
        flush=bool(f & F.SEND_FLUSH),
        fua=bool(f & F.SEND_FUA),
        trim=bool(f & F.SEND_TRIM),
        zero=bool(f & F.SEND_WRITE_ZEROES),
        fast_zero=bool(f & F.SEND_FAST_ZERO),
        cache=bool(f & F.SEND_CACHE),
        multi_conn=bool(f & F.CAN_MULTI_CONN),
    )


def _get_buffer(client: NbdClient, sizehint: int) -> memoryview:
    if client._core.state is not State.ERROR:
        try:
            return client._core.get_buffer(sizehint)
        except p.ProtocolError as exc:
            # Aborting inside get_buffer crashes uvloop: defer it.
            client._loop.call_soon(client._break, errno.EIO, f"broke the protocol: {exc}")
    return memoryview(bytearray(65536))  # discarded


def _buffer_updated(client: NbdClient, nbytes: int) -> None:
    if client._core.state is State.ERROR:
        return
    try:
        client._core.buffer_updated(nbytes)
    except p.ProtocolError as exc:
        client._break(errno.EIO, f"broke the protocol: {exc}")
        return
    wake_handshake(client)


def wake_handshake(client: NbdClient) -> None:
    if client._handshake_wakeup is not None and not client._handshake_wakeup.done():
        client._handshake_wakeup.set_result(None)


async def _next_event(client: NbdClient) -> m.Event:
    core = client._core
    while True:
        if core.state is State.ERROR:
            raise p.ProtocolError(core.error or "protocol error")
        ev = core.next_event()
        if ev is not None:
            return ev
        sock = client._sock
        if sock is not None:  # plain: read the socket ourselves
            if client._handshake_eof:
                return m.ConnectionClosed()
            try:
                if client._handshake_out:
                    out, client._handshake_out = b"".join(client._handshake_out), []
                    await client._loop.sock_sendall(sock, out)
                n = await client._loop.sock_recv_into(sock, core.get_buffer(HANDSHAKE_READ))
            except OSError:
                n = 0  # a reset: as the server hanging up
            if n:
                core.buffer_updated(n)
            else:
                client._handshake_eof = True
                core.receive_eof()
            continue
        if client._transport is None or client._transport.is_closing():
            return m.ConnectionClosed()
        client._handshake_wakeup = client._loop.create_future()
        await client._handshake_wakeup


async def _send_fd(client: NbdClient, fd: int) -> None:
    """The ring's descriptor, on the byte that follows what the handshake queued."""
    sock = client._sock
    assert sock is not None
    if client._handshake_out:
        out, client._handshake_out = b"".join(client._handshake_out), []
        await client._loop.sock_sendall(sock, out)
    while True:
        try:
            ring.send_fd(sock, fd)
            return
        except BlockingIOError:
            await _writable(client._loop, sock.fileno())


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, ring.wake, ready)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


def _send(client: NbdClient, msg: m.Event) -> None:
    parts = client._core.send_parts(msg)
    if client._transport is not None:
        client._transport.writelines(parts)
    else:
        client._handshake_out += parts


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
