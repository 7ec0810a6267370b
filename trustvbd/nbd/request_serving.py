"""A server connection's requests served in Python: the backend called, each handler
stepped inline and made a task only if it suspends, failures and refusals answered, and
a WRITE done inline where the backend can (WritesInline).

The functions taking the connection are Connection's methods (bound in its class
body, connection.py): no call layer per request.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from trustvbd import eager
from trustvbd.blockdev import BlockError, Buffer, ReportsAllocation, provides
from trustvbd.nbd import protocol as p
from trustvbd.nbd.parted_requests import serve_parted_read

if TYPE_CHECKING:
    from trustvbd.nbd.connection import Connection

log = logging.getLogger("trustvbd.nbd.server")

# Plain ints on the per-request path: enum attribute access costs microseconds.
_READ, _WRITE, _FLUSH, _TRIM, _CACHE, _WRITE_ZEROES, _BLOCK_STATUS = (
    int(c) for c in (p.Cmd.READ, p.Cmd.WRITE, p.Cmd.FLUSH, p.Cmd.TRIM, p.Cmd.CACHE,
                     p.Cmd.WRITE_ZEROES, p.Cmd.BLOCK_STATUS)
)
_FUA, _NO_HOLE, _FAST_ZERO = int(p.CmdFlag.FUA), int(p.CmdFlag.NO_HOLE), int(p.CmdFlag.FAST_ZERO)
_REQ_ONE = int(p.CmdFlag.REQ_ONE)
_WRITE_TYPES = (_WRITE, _TRIM, _WRITE_ZEROES)
POOL_MIN = 64 * 1024  # smaller payloads are sliced from the receive buffer, not pooled


def write_inline_or_run(conn: Connection, flags: int, cookie: int, offset: int,
                         payload: Buffer) -> bool:
    """A WRITE the backend does inline where it can (WritesInline): no coroutine; else
    the general way (serve). False, with nothing done, when the backend asks for it to
    wait (write_room: its writes behind are full): reading pauses until they have room,
    and the caller keeps the write to serve it again then."""
    assert conn._write_inline is not None
    fua = bool(flags & _FUA)
    try:
        done = conn._write_inline(offset, payload, fua)
    except Exception as exc:
        reply_failure(conn, _WRITE, cookie, exc)
        return True
    if not done:
        room = (conn._writes.write_room(offset, len(payload))
                if conn._writes is not None and not fua else None)
        if room is not None:
            conn._room_wait = conn._loop.create_task(room_made(conn, room))
            conn._update_reading()
            return False
        run(conn, serve(conn, _WRITE, flags, cookie, offset, len(payload), payload), _WRITE,
                  len(payload))
        return True
    write_done(conn, cookie, payload, fua)
    return True


async def room_made(conn: Connection, room: Awaitable[None]) -> None:
    """The backend has room for the WRITE held back (_stash): reading resumes, and
    the requests received meanwhile are served (update_reading), that WRITE first."""
    try:
        await room
    finally:
        conn._room_wait = None
    conn._update_reading()


def write_done(conn: Connection, cookie: int, payload: Buffer, fua: bool) -> None:
    """A WRITE done in the server's call (write_inline_or_run): its
    pooled payload back, its reply queued; with FUA it leaves at once, as in serve."""
    if len(payload) > POOL_MIN:
        conn.core.pool.give_back(payload)  # type: ignore[arg-type] # as in serve
    conn._queue_reply(cookie, 0, "", 0, None)
    if fua and not conn._transport_busy:
        conn._flush()


def reply_failure(conn: Connection, typ: int, cookie: int, exc: Exception,
                  fast_zero: bool = False) -> None:
    """A request failed: a BlockError is answered with its errno; anything else is a
    bug, logged and answered EIO. The connection goes on either way."""
    if isinstance(exc, BlockError):
        conn._reply_error(typ, cookie, p.errno_to_nbd(exc.errno, fast_zero=fast_zero),
                          exc.message)
        return
    log.error("nbd: %s on export %r failed unexpectedly", p.name_of(p.Cmd, typ),
              conn.export_name, exc_info=exc)
    conn._reply_error(typ, cookie, p.NbdErr.EIO, f"internal server error: {exc}")


async def serve_resumed(conn: Connection, cookie: int, offset: int, length: int,
                        read: Awaitable[Buffer]) -> None:
    try:
        data = await read
        if len(data) != length:
            raise BlockError(errno.EIO, f"backend returned {len(data)} of {length} bytes")
    except Exception as exc:
        reply_failure(conn, _READ, cookie, exc)
        return
    conn._queue_reply(cookie, 0, "", offset, data, not conn._native_running and not conn._tasks)


def refuse(conn: Connection, typ: int, cookie: int, error: int, message: str) -> None:
    log.warning("nbd: %s (%s) export %r: refused %s: %s", conn.peer.identity,
                conn.peer.address, conn.export_name, p.name_of(p.Cmd, typ), message)
    conn._reply_error(typ, cookie, error, message)


def run(conn: Connection, coro: Coroutine[Any, Any, None], typ: int, cost: int) -> None:
    """Step a request's handler inline; only if it suspends does it become a task."""
    task = eager.start(conn._loop, coro)
    if task is None:
        return  # finished inline, reply queued
    conn._tasks.add(task)
    if typ in _WRITE_TYPES:
        conn._write_tasks.add(task)
    conn._inflight_bytes += cost
    task.add_done_callback(lambda t: task_done(conn, t, cost))
    conn._request_started()


def task_done(conn: Connection, task: asyncio.Task[None], cost: int) -> None:
    conn._tasks.discard(task)
    conn._write_tasks.discard(task)
    conn._inflight_bytes -= cost
    conn._request_ended()


async def serve(conn: Connection, typ: int, flags: int, cookie: int, offset: int,
                length: int, payload: Buffer | None) -> None:
    backend = conn._backend
    assert backend is not None
    fua = bool(flags & _FUA)
    try:
        if typ == _READ:
            if length > p.REQUEST_PART:
                await serve_parted_read(conn, cookie, offset, length)
                return
            data = await backend.pread(offset, length)
            if len(data) != length:
                raise BlockError(errno.EIO, f"backend returned {len(data)} of {length} bytes")
            conn._queue_reply(cookie, 0, "", offset, data)
            return
        if typ == _WRITE:
            assert payload is not None  # a WRITE always carries its payload
            await backend.pwrite(offset, payload, fua)
            # Recycle a large payload buffer, once the transport (served inline, from
            # buffer_updated) and the backend (if it kept one) let go of it.
            if len(payload) > POOL_MIN:
                conn.core.pool.give_back(payload)  # type: ignore[arg-type]
        elif typ == _FLUSH:
            if conn._write_tasks:
                await asyncio.wait(list(conn._write_tasks))
            assert conn._flush_backend is not None
            await conn._flush_backend()
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
                reply = conn.core.server_session().frame_block_status(
                    cookie, length, bool(flags & _REQ_ONE), extents)
            except ValueError as exc:
                raise BlockError(errno.EIO, f"block status of [{offset}, {offset + length})"
                                 f" failed: {exc}") from None
            conn._queue([reply])
            return
    except Exception as exc:
        reply_failure(conn, typ, cookie, exc, typ == _WRITE_ZEROES and bool(flags & _FAST_ZERO))
        return
    conn._queue_reply(cookie, 0, "", 0, None)
    if (fua or typ == _FLUSH) and not conn._transport_busy:
        # A durability point took a sync: the guest waits for this reply alone, and
        # nothing would join it by the end of this loop turn.
        conn._flush()
