"""A server connection's requests in the backend's native planes (the encryption layer):
READs started and WRITEs done by the session as they are parsed (ServesReadsNatively,
WritesNatively), and the native reads' replies, failures and end.

The functions taking the connection are Connection's methods (bound in its class
body, connection.py): the session calls some of them back by name (_native_replied,
_native_settled, _native_failed, _parse_batch).
"""

from __future__ import annotations

import asyncio
import logging
import operator
from typing import TYPE_CHECKING, cast

from trustvbd._native import NbdServerSession
from trustvbd.blockdev import BlockError
from trustvbd.nbd import connection_limits
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.request_serving import run, serve_resumed

if TYPE_CHECKING:
    from trustvbd.nbd.client import NbdClient
    from trustvbd.nbd.connection import Connection

log = logging.getLogger("trustvbd.nbd.server")

# Plain ints on the per-request path: enum attribute access costs microseconds.
_READ, _WRITE, _FUA = int(p.Cmd.READ), int(p.Cmd.WRITE), int(p.CmdFlag.FUA)
_REQUEST_SIZE = 28  # an NBD request header
_FREE_SLOTS = operator.attrgetter("_free_slots")  # an NbdClient's request slots free


def write_queued(conn: Connection, item: m.RequestItem) -> bool:
    """`item`, a WRITE, and the WRITEs queued right after it (parsed while the writes
    behind were full, or past the plane's room: they came back as requests) through the
    native write plane as one batch, as `parse_batch` does a received one: armed once
    and collected once (`writes_taken`, before their replies leave), not once each. The
    first one the plane declines (or the first other request) goes back to the queue,
    for the usual way. False, with nothing done, if the plane takes not even `item`."""
    writes = conn._writes
    assert writes is not None
    plane = writes.write_route()
    if plane is None:
        return False
    requests = conn.core.requests
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
    conn._queue_write_replies(cookies)
    return bool(cookies)


def parse_batch(conn: Connection, session: NbdServerSession, buf: bytearray, start: int,
                end: int) -> tuple[int, list[m.RequestItem], int]:
    """A batch of requests received (ProtocolCore.parse_batch): a batch that begins with
    READs has those the backend's native read plane can take started there, one that
    begins with WRITEs has those its native write plane takes done there (collected
    by `writes_taken` before their replies leave), in order: WRITEs until the first
    request the plane does not take, READs until the first one it does not take that
    is not a READ (reads commute); the rest come back as parsed requests. Within the
    connection's bounds (MAX_TASKS requests, MAX_INFLIGHT_BYTES for reads; the
    backend's for writes) and never while anything is held back."""
    reads, writes = conn._reads, conn._writes
    route = plane = None
    # Only before the batch's first other request: a READ header has type 0 at bytes
    # 6-7, a WRITE type 1 (a batch that begins with anything else skips the planes).
    if (end - start >= _REQUEST_SIZE and not buf[start + 6] and buf[start + 7] <= _WRITE
            and not conn.core.requests and conn._stash is None
            and not conn._stopping and not conn._reading_paused
            and (conn._budget is None or not conn._budget.over)):
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
    max_reads = connection_limits.MAX_TASKS - len(conn._tasks) - conn._native_running
    max_bytes = connection_limits.MAX_INFLIGHT_BYTES - conn._inflight_bytes
    try:
        start, items, want, started, nbytes, used, answered, sent = session.parse_native(
            buf, start, end, conn, read_plane,  # type: ignore[arg-type]
            slots, conn._loop.time(), max_reads if max_reads > 0 else 0,
            max_bytes if max_bytes > 0 else 0,
            plane)  # type: ignore[arg-type] # a WritePlane
    except BaseException:
        if writes is not None and plane is not None:
            writes.writes_taken()  # writes done before it failed go on (unanswered)
        raise
    if started:
        conn._native_running += started
        conn._inflight_bytes += nbytes
        for client, count, gone in zip(links, used, sent, strict=True):
            if count:
                client.native_sent(count, gone)
        conn._request_started()
    if answered:  # the WRITEs taken, or READs of blocks never written (zeros)
        if plane is not None:
            assert writes is not None
            try:
                writes.writes_taken()  # before their replies leave
            except Exception:
                # A bug: the writes may not reach the replicas, so their replies never leave.
                log.exception("nbd: %s on export %r: native writes could not be handed on; "
                              "closing the connection", conn.peer.identity, conn.export_name)
                session.take_output()
                conn._abort()
                return start, [], want
        # Their replies, framed by the session. (Replies of native reads sent to a
        # replica are taken once per loop turn, by _native_settled; those answered at
        # once, with zeros, end here.)
        out, ended, nbytes = session.take_output()
        if ended:
            conn._native_running -= ended
            conn._inflight_bytes -= nbytes
            native_ended(conn)
        conn._queue(out, now=not conn._native_running and not conn._tasks)
    return start, items, want


def native_output(conn: Connection) -> tuple[list[bytes | bytearray], int]:
    """The session's framed replies of native reads (and how many reads they end),
    taken and accounted: the reads no longer run, their bytes are no longer in flight."""
    session = conn.core.session
    assert session is not None  # native reads ran: the session started them
    out, ended, nbytes = session.take_output()
    conn._native_running -= ended
    conn._inflight_bytes -= nbytes
    return out, ended


def native_replied(conn: Connection) -> None:
    """Replies of native reads are framed in the session (told by a replica's client,
    once per batch of replies a replica's connection received, where the session does
    not settle them itself: _native_settled)."""
    out, _ = native_output(conn)
    if out:
        conn._queue(out, now=not conn._native_running and not conn._tasks)
    native_ended(conn)


def native_settled(conn: Connection) -> None:
    """Replies of native reads framed in the session during a loop turn (the session has
    the loop call this once, after the turn's ready sockets): they leave now, with what
    else is queued, and their reads are accounted as ended."""
    out, ended = native_output(conn)
    if out:
        conn._queue(out, now=True)
    if ended:
        native_ended(conn)


def native_failed(conn: Connection, client: object, cookie: int, offset: int, length: int,
                  failure: BlockError | list[int] | float) -> None:
    """A native read failed after it was sent (its hold released): served the general
    way (the backend's resume_read), as a task of this connection."""
    conn._native_running -= 1
    conn._inflight_bytes -= length
    if not conn._output_closed and conn._reads is not None:
        run(conn, serve_resumed(conn, cookie, offset, length, conn._reads.resume_read(
            cast("NbdClient", client), offset, length, failure)), _READ, length)
    native_ended(conn)


def native_ended(conn: Connection) -> None:
    conn._request_ended()
    if not conn._native_running and conn._native_idle is not None:
        conn._native_idle.set()


async def wait_native(conn: Connection, timeout: float | None = None) -> None:
    """Until no native read is running; after `timeout` s, give them up (their holds
    are released now, their late replies dropped)."""
    try:
        async with asyncio.timeout(timeout):
            while conn._native_running > 0:
                if conn._native_idle is None:
                    conn._native_idle = asyncio.Event()
                conn._native_idle.clear()
                await conn._native_idle.wait()
    except TimeoutError:
        if conn.core.session is not None:
            count, nbytes = conn.core.session.cancel_reads()
            conn._native_running -= count
            conn._inflight_bytes -= nbytes
