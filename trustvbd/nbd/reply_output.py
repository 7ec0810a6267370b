"""A server connection's reply output: replies queued, framed and written.

Replies are batched: queued during a loop iteration, framed natively (simple or
structured, as negotiated) with the others of that iteration, and written with one
writelines() at its end, or at once past FLUSH_OUTPUT_AT bytes or at a durability
point. While a long READ streams simple replies
(parted_requests.py), other replies are held until it ends.

The functions taking the connection are Connection's methods (bound in its class
body, connection.py): no call layer between a request and its reply.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from trustvbd.blockdev import Buffer
from trustvbd.nbd import protocol as p
from trustvbd.nbd import spin
from trustvbd.nbd.connection_limits import UNCHARGED_MAX, WRITE_BUFFER_HIGH

if TYPE_CHECKING:
    from trustvbd.nbd.connection import Connection

log = logging.getLogger("trustvbd.nbd.server")

FLUSH_OUTPUT_AT = 512 * 1024
_REPLY_HEADER = 32  # bytes counted per queued reply besides its data (its header, at most)


def reply_error(conn: Connection, typ: int, cookie: int, error: int, message: str) -> None:
    log.debug("nbd: %s %s: %s", conn.peer.identity, p.name_of(p.Cmd, typ), message)
    queue_reply(conn, cookie, error, message, 0, None)


def queue_reply(conn: Connection, cookie: int, error: int, message: str, offset: int,
                data: Buffer | None, last: bool = False) -> None:
    """Queue one reply: framed natively, with the others of this loop iteration, by
    _frame_replies (a READ's `data` at `offset`, or an error with its message). `last`:
    no other request of this connection is running, so no reply can join this one in
    this loop iteration: it leaves now (a QD1 guest waits for it alone)."""
    if conn._output_closed:
        return
    reply = (cookie, error, message, offset, data)
    if conn._held is not None:  # a simple-reply stream is being sent
        conn._held.extend(conn.core.server_session().frame([reply]))
        return
    conn._replies.append(reply)
    conn._out_bytes += _REPLY_HEADER if data is None else _REPLY_HEADER + len(data)
    _queued(conn, last)


def queue_write_replies(conn: Connection, cookies: list[int]) -> None:
    """`queue_reply` for WRITEs done together (Connection._write_queued): one call for all."""
    if conn._output_closed or not cookies:
        return
    replies: list[tuple[int, int, str, int, Buffer | None]] = [
        (cookie, 0, "", 0, None) for cookie in cookies]
    if conn._held is not None:  # a simple-reply stream is being sent
        conn._held.extend(conn.core.server_session().frame(replies))
        return
    conn._replies += replies
    conn._out_bytes += _REPLY_HEADER * len(replies)
    _queued(conn)


def _frame_replies(conn: Connection) -> None:
    replies, conn._replies = conn._replies, []
    conn._out.extend(conn.core.server_session().frame(replies))


def queue(conn: Connection, parts: Sequence[Buffer], stream: bool = False,
          now: bool = False) -> None:
    """Queue framed parts (`now`: nothing else runs, so they leave at once, as queue_reply's
    `last`)."""
    if conn._output_closed:
        return
    if (now and not conn._out and not conn._replies and not conn._transport_busy
            and conn._held is None and not conn._reading_paused):
        # Nothing queued before them and nothing left to account (a QD1 guest's reply):
        # straight to the transport, as flush would.
        conn._transport.writelines(parts)  # type: ignore[union-attr]
        if not conn._transport.get_write_buffer_size():  # type: ignore[union-attr]
            spin.wait_soon(conn._loop, conn._sock_fd)  # the reply left; the next request
        return
    if conn._held is not None and not stream:  # a simple-reply stream is being sent
        conn._held.extend(parts)
        return
    if conn._replies:
        _frame_replies(conn)  # they go first
    for part in parts:
        conn._out.append(part)
        conn._out_bytes += len(part)
    _queued(conn, now)


def _queued(conn: Connection, now: bool = False) -> None:
    if (now or conn._out_bytes >= FLUSH_OUTPUT_AT) and not conn._transport_busy:
        flush(conn)
    if conn._out_bytes >= WRITE_BUFFER_HIGH and not conn._reading_paused:
        conn._update_reading()
    elif (conn._budget is not None
          and conn._out_bytes + conn._inflight_bytes > conn._charged + UNCHARGED_MAX):
        conn._update_reading()  # replies of requests that finished inline: count them
    if (conn._out or conn._replies) and not conn._flush_scheduled:
        # Write at the end of this loop iteration: replies of all requests
        # that arrive together leave in one system call.
        conn._flush_scheduled = True
        conn._loop.call_soon(conn._flush)


def flush(conn: Connection) -> None:
    """Write queued replies (the transport holds what the socket does not take)."""
    conn._flush_scheduled = False
    if conn._replies:
        _frame_replies(conn)
    if not conn._out:
        return
    transport = conn._transport
    queued, conn._out, conn._out_bytes = conn._out, [], 0
    if conn._output_closed or transport is None:
        return
    transport.writelines(queued)
    if conn._reading_paused:  # output drained into the transport: reading may resume
        conn._update_reading()
