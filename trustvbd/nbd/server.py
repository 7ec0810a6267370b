"""The asyncio NBD server: accept connections and hand each to a `Connection`.

Usage:
    server = NbdServer(provider, identity="guest1")
    await server.serve_socket(listening_socket)   # until cancelled
    await server.close()

Works the same under uvloop and the standard event loop. Each connection is
independent: a client that misbehaves loses its own connection only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable

from trustvbd.accepting import accept as accept_connection
from trustvbd.nbd.budget import MemoryBudget
from trustvbd.nbd.connection import Connection
from trustvbd.nbd.exports import Export, ExportProvider, ExportRefused, PeerInfo, StaticExports
from trustvbd.nbd.log_window import LogWindow

__all__ = [
    "Connection", "Export", "ExportProvider", "ExportRefused", "NbdServer", "PeerInfo",
    "StaticExports",
]

SOCKET_BUFFER = 4 << 20

log = logging.getLogger("trustvbd.nbd.server")

# Connections refused over the limit: the first is logged at once, the rest of each such
# window in one line with their count, so a guest opening connections in a loop cannot
# fill the trusted domain's log.
REFUSED_LOG_WINDOW = 10.0


# TLS handshakes a source (address) may begin on a port: each costs the server ~2 ms of CPU
# (key exchange, signature), so one address in a loop took half a core from every guest its
# encryption domain serves. Over it, a STARTTLS is answered by closing the connection.
TLS_PER_SECOND = 10.0
TLS_BURST = 20.0
TLS_SOURCES = 1024  # sources whose handshakes are counted at once (the idle ones forgotten)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (None for TCP)."""
    if sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int(struct.unpack("3i", creds)[1])


def describe_peer(sock: socket.socket) -> str:
    """A printable transport address: host:port, or the Unix socket and the peer's pid/uid."""
    try:
        if sock.family == socket.AF_UNIX:
            where = sock.getsockname() or "unix"
            try:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                pid, uid, _ = struct.unpack("3i", creds)
                return f"unix:{where} pid={pid} uid={uid}"
            except OSError:
                return f"unix:{where}"
        host, port = sock.getpeername()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except OSError:
        return "unknown"


def source_of(sock: socket.socket) -> str:
    """Where a connection comes from, for fairness between sources: its IPv4 address, its
    IPv6 /64 (one host holds a whole /64), or a Unix socket peer's uid."""
    try:
        if sock.family == socket.AF_UNIX:
            return f"uid {peer_uid(sock)}"
        ip = ipaddress.ip_address(sock.getpeername()[0])
    except (OSError, ValueError):
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class NbdServer:
    def __init__(
        self,
        provider: ExportProvider,
        *,
        identity: str,
        max_connections: int = 64,
        handshake_timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
        tls_name: str | None = None,
        owner_uid: int | None = None,
        on_refused: Callable[[PeerInfo, str], None] | None = None,
        budget: MemoryBudget | None = None,
        idle_timeout: float | None = None,
        rings: bool = False,
    ) -> None:
        """`tls`: clients must STARTTLS and present a certificate whose Common Name is
        `tls_name` (default: `identity`). `owner_uid`: on a Unix socket, only this uid
        (and root) may connect. `on_refused` hears every refused identity (to audit it).
        `budget`: the memory all connections sharing it may hold (budget.py).
        `idle_timeout`: seconds without a request or a drained reply before a connection
        is closed (None: never). `rings`: agree NBD_OPT_TRUSTVBD_RING on plain Unix
        connections (docs/driver-ring.md; a driver's file exports, served natively)."""
        self.provider = provider
        self.identity = identity
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.tls = tls
        self.tls_name = tls_name
        self.owner_uid = owner_uid
        self.on_refused = on_refused
        self.budget = budget
        self.idle_timeout = idle_timeout
        self.rings = rings
        self.connections: set[Connection] = set()
        self._accepting: set[asyncio.Task[socket.socket]] = set()
        self._handlers: set[asyncio.Task[None]] = set()  # keeps handler tasks referenced
        self._closed = False
        self._refused = 0  # refused over the limit since the last line that said so
        self._refused_window: asyncio.TimerHandle | None = None
        self._tls_tokens: dict[str, tuple[float, float]] = {}  # source -> (tokens, when)
        self.said = LogWindow(log, f"nbd: {identity}")  # handshakes' ends, once per window

    async def serve_socket(self, listening: socket.socket) -> None:
        """Accept connections on a bound, listening socket (Unix or TCP).

        Runs until cancelled, or returns once close() is called.
        """
        loop = asyncio.get_running_loop()
        listening.setblocking(False)
        me = asyncio.current_task()
        while not self._closed:
            accept = loop.create_task(accept_connection(listening, f"nbd: {self.identity}"))
            self._accepting.add(accept)
            try:
                sock = await accept
            except asyncio.CancelledError:
                if self._closed and me is not None and not me.cancelling():
                    return  # close() stopped the accept, not our caller
                raise
            finally:
                self._accepting.discard(accept)
            # A TLS port's client must begin TLS: one whose address may not now is closed
            # at once, before it costs a connection's set-up (a loop of them took a core).
            if self.tls is not None and (why := self.tls_refusal(source_of(sock), False)):
                self.said.say(logging.WARNING, f"refused: {why}", f"nbd: {self.identity}:"
                              f" refusing a connection from {describe_peer(sock)}: {why}")
                sock.close()
                continue
            if len(self.connections) >= self.max_connections and not self._make_room():
                self._refuse(sock)
                continue
            task = loop.create_task(self.handle_connection(sock))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    def tls_refusal(self, source: str, take: bool = True) -> str | None:
        """Why `source` may not begin one more TLS handshake now (TLS_PER_SECOND, TLS_BURST);
        None: it may (and `take`: it does)."""
        now = time.monotonic()
        tokens, when = self._tls_tokens.get(source, (TLS_BURST, now))
        tokens = min(TLS_BURST, tokens + (now - when) * TLS_PER_SECOND)
        if tokens < 1:
            return f"more than {TLS_PER_SECOND:g} TLS handshakes a second from {source}"
        if take:
            self._tls_tokens.pop(source, None)
            if len(self._tls_tokens) >= TLS_SOURCES:  # forget those back to a full burst
                self._tls_tokens = {s: (t, w) for s, (t, w) in self._tls_tokens.items()
                                    if t + (now - w) * TLS_PER_SECOND < TLS_BURST}
                if len(self._tls_tokens) >= TLS_SOURCES // 2:
                    self._tls_tokens.clear()
            self._tls_tokens[source] = (tokens - 1, now)
        return None

    def _make_room(self) -> bool:
        """Over the limit: close a connection whose client has not proven who it is (a TLS
        port's before its certificate, a plaintext port's before its handshake ended), if
        any. Anyone who can reach a guest's port could otherwise hold every slot with sockets
        that say nothing, the guest locked out.

        Which one: from the source (address) holding the most such, so a flood from
        elsewhere cannot push a guest out mid-handshake; of those, one that has not begun
        TLS, so a flood of silent sockets cannot either; the oldest (since accepted, or since
        it began TLS). A flood from the guest's own address that begins TLS still can."""
        strangers = [c for c in self.connections if not c.proven]
        if not strangers:
            return False
        held = collections.Counter(c.source for c in strangers)
        victim = min(strangers, key=lambda c: (-held[c.source], c.tls_begun, c.since))
        self.connections.discard(victim)
        if self._refused_window is None:
            log.warning("nbd: %s: %d connections (the limit: [limits] connections): closing"
                        " one still in its handshake, from %s (%d such from there), for a"
                        " new one", self.identity, self.max_connections, victim.peer.address,
                        held[victim.source])
            self._refused_window = asyncio.get_running_loop().call_later(
                REFUSED_LOG_WINDOW, self._log_refused)
        else:
            self._refused += 1
        victim._abort()
        return True

    def _refuse(self, sock: socket.socket) -> None:
        """Close a connection over the limit; log it, or count it into the window's line."""
        if self._refused_window is None:
            log.warning("nbd: %s: refusing a connection from %s, already %d connections"
                        " (the limit: [limits] connections)", self.identity,
                        describe_peer(sock), len(self.connections))
            self._refused_window = asyncio.get_running_loop().call_later(
                REFUSED_LOG_WINDOW, self._log_refused)
        else:
            self._refused += 1
        sock.close()

    def _log_refused(self) -> None:
        """The end of a window: how many more were refused in it (a new window if any)."""
        self._refused_window = None
        if self._refused:
            log.warning("nbd: %s: refused %d more connection(s) over the limit of %d (or"
                        " closed them still in their handshake) in the last %.0f s",
                        self.identity, self._refused, self.max_connections, REFUSED_LOG_WINDOW)
            self._refused = 0
            if not self._closed:
                self._refused_window = asyncio.get_running_loop().call_later(
                    REFUSED_LOG_WINDOW, self._log_refused)

    async def handle_connection(self, sock: socket.socket) -> None:
        """Serve one accepted connection until it ends. Takes ownership of `sock`."""
        if self._closed:
            sock.close()
            return
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        # Room for a whole 256 KiB read reply (nbdcopy's default) in one send: the
        # default ~200 KiB buffer splits it and the event loop copies the remainder.
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        peer = PeerInfo(identity=self.identity, address=describe_peer(sock))
        conn = Connection(self, peer, self._check_owner(sock))
        conn.source = source_of(sock)
        if sock.family != socket.AF_UNIX:  # a plaintext port: anyone until its handshake ends
            conn.proven = False
        self.connections.add(conn)
        try:
            await loop.connect_accepted_socket(lambda: conn, sock)
        except BaseException:
            self.connections.discard(conn)
            sock.close()
            raise
        await conn.wait_closed()

    def _check_owner(self, sock: socket.socket) -> str | None:
        """Why this Unix-socket peer may not use this guest's socket (None: it may)."""
        if self.owner_uid is None:
            return None
        try:
            uid = peer_uid(sock)
        except OSError as exc:
            return f"cannot tell who connected ({exc.strerror}); refusing"
        if uid is None or uid in (0, self.owner_uid):
            return None
        return (f"uid {uid} may not use guest {self.identity!r}'s socket: it belongs to uid"
                f" {self.owner_uid}")

    def identity_refused(self, peer: PeerInfo, reason: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(peer, reason)
            except Exception:
                log.exception("nbd: recording a refusal failed")

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting and close every connection (in-flight requests get `timeout` s)."""
        self._closed = True
        for task in list(self._accepting):
            task.cancel()
        if self._refused_window is not None:
            self._refused_window.cancel()
            self._log_refused()  # the count of the window cut short
        self.said.close()
        conns = list(self.connections)
        if conns:
            await asyncio.gather(*(c.close(timeout) for c in conns), return_exceptions=True)
