"""A file export's connection served natively on a thread of its own (ServedFromFile:
the driver's FileBackend), once the handshake is done: no Python and no event loop per
request or per receive (`trustvbd._native.serve_file`, native/src/python/file_serve.rs).

A driver's CPU per GiB counts once per replica, and Python per receive was a large part
of it. The connection stops reading on the event loop, hands the bytes it already
received and a duplicate of its socket (made blocking) to the native loop, and hears
back on the loop how the connection ended. Python still does the rare requests (TRIM,
WRITE_ZEROES, CACHE, BLOCK_STATUS), called from that thread, and logs refusals. Closing
the connection shuts the socket down, which ends the native loop.

Taken over only from a plain socket with no memory budget and no idle timeout, and only
between requests (nothing of Python's running, queued or half received): until then the
connection serves the usual way, and tries again after each receive.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING, cast

from trustvbd import _native
from trustvbd.blockdev import BlockError, ServedFromFile, provides
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p

if TYPE_CHECKING:
    import asyncio

    from trustvbd.nbd.connection import Connection

log = logging.getLogger("trustvbd.nbd.server")

_TRIM, _CACHE, _WRITE_ZEROES, _BLOCK_STATUS = (
    int(c) for c in (p.Cmd.TRIM, p.Cmd.CACHE, p.Cmd.WRITE_ZEROES, p.Cmd.BLOCK_STATUS))
_FUA, _NO_HOLE, _FAST_ZERO = int(p.CmdFlag.FUA), int(p.CmdFlag.NO_HOLE), int(p.CmdFlag.FAST_ZERO)


class _Handler:
    """What the native loop asks of Python, on its thread, with the GIL."""

    def __init__(self, conn: Connection, backend: ServedFromFile) -> None:
        self.conn = conn
        self.backend = backend

    def other(self, typ: int, flags: int, offset: int, length: int
              ) -> tuple[int, str] | list[tuple[int, int]] | None:
        backend, fua = self.backend, bool(flags & _FUA)
        try:
            if typ == _TRIM:
                backend.zero_now(offset, length, fua, may_trim=True)
            elif typ == _WRITE_ZEROES:
                backend.zero_now(offset, length, fua, may_trim=not flags & _NO_HOLE,
                                 fast=bool(flags & _FAST_ZERO))
            elif typ == _CACHE:
                backend.cache_now(offset, length)
            elif typ == _BLOCK_STATUS:
                return backend.block_status_now(offset, length)
            else:  # the checks let nothing else through
                return int(p.NbdErr.EINVAL), f"{p.name_of(p.Cmd, typ)} is not served here"
        except BlockError as exc:
            fast = typ == _WRITE_ZEROES and bool(flags & _FAST_ZERO)
            return int(p.errno_to_nbd(exc.errno, fast_zero=fast)), exc.message
        except OSError as exc:
            return (int(p.errno_to_nbd(exc.errno or errno.EIO)),
                    f"{p.name_of(p.Cmd, typ)} on {backend.path}: {exc.strerror}")
        except Exception as exc:
            log.error("nbd: %s on export %r failed unexpectedly", p.name_of(p.Cmd, typ),
                      self.conn.export_name, exc_info=exc)
            return int(p.NbdErr.EIO), f"internal server error: {exc}"
        return None

    def refused(self, typ: int, message: str) -> None:
        conn = self.conn
        log.warning("nbd: %s (%s) export %r: refused %s: %s", conn.peer.identity,
                    conn.peer.address, conn.export_name, p.name_of(p.Cmd, typ), message)


def may_take_over(conn: Connection) -> bool:
    """Whether this connection's export and transport let the native loop serve it."""
    return (conn._sock_fd >= 0 and conn._budget is None and conn.server.idle_timeout is None
            and provides(conn._backend, ServedFromFile))


def take_over(conn: Connection) -> bool:
    """Hand the connection to the native loop if nothing of Python's is in flight; True if
    it was (or already is) handed over."""
    if conn._native_serving is not None:
        return True
    if (conn._stopping or conn._tasks or conn._stash is not None or conn._out or conn._replies
            or conn._transport_busy or conn._held is not None or conn._parted
            or conn._native_running or conn._transport is None):
        return False
    received = conn.core.take_unparsed()
    if received is None:
        return False  # a request is half parsed (its payload being received)
    backend = cast(ServedFromFile, conn._backend)  # may_take_over said so
    conn._transport.pause_reading()
    sock = socket.socket(fileno=os.dup(conn._sock_fd))
    sock.setblocking(True)  # the transport reads it no more and has nothing to write
    core, loop = conn.core, conn._loop
    done: asyncio.Future[None] = loop.create_future()
    conn._native_serving, conn._native_sock = done, sock
    args = (sock.fileno(), backend.file_fd(), received, core.export_size, core.export_flags,
            core.structured, core.meta_context, _Handler(conn, backend), backend.path,
            *(conn.ring or (-1, 0)))

    def serve() -> None:
        try:
            result = _native.serve_file(*args)
        except BaseException as exc:  # a bug: say so, and let the loop close the connection
            result = ("protocol", 0, f"internal server error: {exc!r}")
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to tell
            loop.call_soon_threadsafe(_ended, conn, result)

    threading.Thread(target=serve, name=f"nbd {conn.peer.identity}", daemon=True).start()
    return True


def _ended(conn: Connection, result: tuple[str, int, str]) -> None:
    """On the loop: the native loop returned; close the connection accordingly."""
    how, truncated, message = result
    if conn._native_sock is not None:
        conn._native_sock.close()
        conn._native_sock = None
    if how == "protocol":
        conn._protocol_error(message)
    elif how == "read-failed":
        # A reply header is on the wire: the only honest way out is to drop the connection.
        log.error("nbd: export %r: read error after a reply began: %s; closing the "
                  "connection from %s", conn.export_name, message, conn.peer.identity)
        conn._abort()
    elif how == "broken":
        log.debug("nbd: %s (%s): connection lost: %s", conn.peer.identity, conn.peer.address,
                 message)
        conn._abort()
    else:
        if truncated:
            log.info("nbd: %s %s", conn.peer.identity, m.cut_short(truncated))
        conn._stopping = True
        if conn._transport is not None:
            conn._transport.close()
    assert conn._native_serving is not None
    if not conn._native_serving.done():
        conn._native_serving.set_result(None)


def stop(conn: Connection) -> None:
    """Closing: end the native loop (its reads and writes fail at once)."""
    if conn._native_sock is not None:
        with contextlib.suppress(OSError):
            conn._native_sock.shutdown(socket.SHUT_RDWR)
