"""A server connection's handshake, from the greeting to the attached export.

The negotiation itself is server_handshake.negotiate (options, policy, the export);
this is its asyncio side: events read from the connection's ProtocolCore, replies
written to its transport, STARTTLS upgrading the transport, a refusal reported to
the server, and the export attached when the handshake ends (transmission begins:
Connection._process).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from functools import partial
from typing import TYPE_CHECKING

from trustvbd.blockdev import (
    FlushesPerConnection,
    ServesReadsNatively,
    WritesInline,
    WritesNatively,
)
from trustvbd.crypt.tls import peer_common_name
from trustvbd.nbd import file_serve, ring
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.server_handshake import HandshakeEnded, Identity, TlsRequired, negotiate

if TYPE_CHECKING:
    from trustvbd.nbd.connection import Connection

log = logging.getLogger("trustvbd.nbd.server")


async def _next_event(conn: Connection) -> m.Event:
    while True:
        ev = conn.core.next_event()
        if ev is not None:
            return ev
        if conn._output_closed:
            return m.ConnectionClosed()
        conn._wakeup = conn._loop.create_future()
        await conn._wakeup


def _write(conn: Connection, data: bytes) -> None:
    if not conn._output_closed and conn._transport is not None:
        conn._transport.write(data)


def _said(conn: Connection, level: int, what: str) -> None:
    """Once per kind and window (NbdServer.said): a flood of connections cannot flood the log."""
    conn.server.said.say(level, what, f"nbd: {conn.peer.identity} ({conn.peer.address}): {what}")


def _refused(conn: Connection, reason: str) -> None:
    _said(conn, logging.WARNING, f"refused: {reason}")
    conn.server.identity_refused(conn.peer, reason)


async def _start_tls(conn: Connection) -> str:
    """STARTTLS was acknowledged: upgrade to TLS; return the client certificate's CN."""
    if conn.core.unparsed():
        # Bytes sent before the TLS handshake would later pass as if they came under TLS.
        raise HandshakeEnded("client sent data after NBD_OPT_STARTTLS before the TLS handshake")
    if (too_many := conn.server.tls_refusal(conn.source)) is not None:
        _said(conn, logging.WARNING, f"refused: {too_many}")  # not audited: no identity asked
        raise HandshakeEnded(too_many, reported=True)
    context, transport = conn.server.tls, conn._transport
    assert context is not None and transport is not None
    conn._tls_starting = conn._over_tls = True
    conn.tls_begun, conn.since = True, time.monotonic()  # ahead of silent strangers (_make_room)
    try:
        upgraded = await conn._loop.start_tls(
            transport, conn, context, server_side=True,
            ssl_handshake_timeout=conn.server.handshake_timeout)
    except (ssl.SSLError, OSError, EOFError) as exc:
        why = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
        reason = f"TLS handshake failed: {why}"
        _refused(conn, reason)
        raise HandshakeEnded(reason, reported=True) from None
    finally:
        conn._tls_starting = False
    if upgraded is None or conn._output_closed:
        raise HandshakeEnded("client closed the connection during the TLS handshake")
    conn._transport = upgraded  # type: ignore[assignment]
    conn.proven = True  # a certificate of our CA (which guest's, negotiate checks)
    conn._sock_fd = -1  # replies now go through TLS: no native file loop (file_serve.py)
    # Paused while the TLS layer holds any unsent byte, resumed once it holds none. Not
    # high=0 as on a plain transport: asyncio's and uvloop's TLS layers pause at size >= high,
    # so high=0 paused the connection after every write that left nothing behind, with no
    # resume to follow unless the socket's own buffer filled or the client sent more; a
    # long READ streamed in parts then waited for a resume that never came.
    upgraded.set_write_buffer_limits(high=1, low=0)
    return peer_common_name(upgraded.get_extra_info("ssl_object"))


async def _receive_ring(conn: Connection, size: int) -> str | None:
    """NBD_OPT_TRUSTVBD_RING: our RING_SEND reply is written; the client's next byte
    carries the ring's descriptor (SCM_RIGHTS), read here, not by the transport (which
    would drop the descriptor). None once it is checked and kept, else why not."""
    transport = conn._transport
    assert transport is not None
    transport.pause_reading()  # before the loop runs again: the byte comes after our reply
    try:
        if conn.core.unparsed():
            raise p.ProtocolError("client sent data after NBD_OPT_TRUSTVBD_RING before its"
                                  " reply")
        fd, why = await ring.receive_fd(conn._sock_fd)
    finally:
        if not conn._output_closed:
            transport.resume_reading()
    if fd is None:
        return why
    why = ring.check_ring(fd, size)
    if why is not None or conn.ring is not None:
        os.close(fd)
        return why or "a ring was agreed on this connection already"
    conn.ring = (fd, size)
    return None


def _rings(conn: Connection) -> bool:
    """Whether this connection may agree a ring: only where the native file loop will
    serve it (a plain Unix socket, no budget or idle timeout), the server offering them."""
    return (conn.server.rings and conn._sock_fd >= 0 and conn._budget is None
            and conn.server.idle_timeout is None and conn.server.tls is None and _is_unix(conn))


def _is_unix(conn: Connection) -> bool:
    assert conn._transport is not None
    sock = conn._transport.get_extra_info("socket")
    return sock is not None and sock.family == socket.AF_UNIX


async def handshake(conn: Connection) -> None:
    """The handshake (bounded by the server's handshake_timeout); then the export is attached."""
    identity = Identity(refusal=conn.refusal, refused=partial(_refused, conn))
    if _rings(conn):
        identity.ring = partial(_receive_ring, conn)
    if conn.server.tls is not None:
        identity.tls = TlsRequired(partial(_start_tls, conn), conn.server.tls_name or conn.peer.identity)
    if conn.refusal is not None:
        _refused(conn, conn.refusal)
    try:
        async with asyncio.timeout(conn.server.handshake_timeout):
            result = await negotiate(
                conn.core, partial(_next_event, conn), partial(_write, conn), conn.server.provider, conn.peer,
                identity,
            )
    except HandshakeEnded as exc:
        if not exc.reported:  # a refusal was logged once already, as a warning
            _said(conn, logging.INFO, str(exc))
        conn._close_gracefully()
        return
    except TimeoutError:
        _said(conn, logging.WARNING, "did not finish the handshake within"
              f" {conn.server.handshake_timeout:.0f} s; closed")
        conn._abort()
        return
    except p.ProtocolError as exc:
        _said(conn, logging.WARNING, f"closed in its handshake: {exc}")
        conn._abort()
        return
    conn.proven = True  # (a plaintext port's client: it asks for no slot of a newcomer now)
    conn.export = result.export
    conn.export_name = result.export.name
    conn._backend = result.export.backend
    backend = conn._backend
    conn._flush_backend = (backend.flusher() if isinstance(backend, FlushesPerConnection)
                           else backend.flush)
    if isinstance(backend, ServesReadsNatively):
        conn._reads = backend
        conn.core.parse_batch = conn._parse_batch
        # Native reads' replies settle once per loop turn (_native_settled), not per batch
        # of replies a replica's connection received.
        conn.core.server_session().set_settle(conn._loop.call_soon, conn._native_settled)
    if isinstance(backend, WritesNatively):
        conn._writes = backend
        conn.core.parse_batch = conn._parse_batch
    if isinstance(backend, WritesInline):
        conn._write_inline = backend.write_inline
    conn._transmitting = True
    conn._update_reading()  # the guest may be over its budget already
    conn._start_idle_timer()
    log.info("nbd: %s (%s) attached export %r", conn.peer.identity, conn.peer.address,
             conn.export_name)
    conn._process()  # requests may already be waiting
    conn._file_serve = file_serve.may_take_over(conn)
    if conn._file_serve:
        file_serve.take_over(conn)
