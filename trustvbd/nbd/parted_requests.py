"""Requests longer than REQUEST_PART (32 MiB), served in parts so memory stays bounded
whatever the client asks (up to the 32-bit length field, as nbd-server serves).

A long WRITE arrives as pieces (the native framer's, core.py) and gets one reply
after its last piece is written. A long READ's reply is sent part by part (framed
natively too), each after the previous one left; with simple replies nothing else may
interleave, so other replies wait meanwhile (reply_output.py holds them), and an error
after the first part can only drop the connection (the spec's way).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trustvbd.blockdev import BlockError, Buffer
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p

if TYPE_CHECKING:
    from trustvbd.nbd.connection import Connection

log = logging.getLogger("trustvbd.nbd.server")

_WRITE = int(p.Cmd.WRITE)
_FUA = int(p.CmdFlag.FUA)


@dataclass(slots=True)
class PartedWrite:
    """A WRITE served in pieces: its one reply waits for every piece."""

    refusal: tuple[int, str] | None  # the whole request's check; pieces are then skipped
    error: tuple[int, str] | None = None  # the first piece that failed
    running: int = 0
    received_all: bool = False


def dispatch_part(conn: Connection, item: m.RequestItem) -> None:
    """A piece of a long WRITE, written as it arrives; the request's one reply waits for all."""
    typ, flags, cookie, offset, _length, data, refusal, last = item
    state = conn._parted.get(cookie)
    if state is None:  # the first piece: every piece carries the whole request's check
        state = conn._parted[cookie] = PartedWrite(refusal)
    state.received_all = bool(last)
    if state.refusal is None and state.error is None:
        state.running += 1
        assert data is not None  # a piece always carries its payload
        conn._run(_write_part(conn, cookie, flags, offset, data, state), _WRITE, len(data))
    else:
        conn.core.pool.give_back(data)  # type: ignore[arg-type]
    _finish_parted(conn, typ, cookie, state)


async def _write_part(conn: Connection, cookie: int, flags: int, offset: int, payload: Buffer,
                      state: PartedWrite) -> None:
    backend = conn._backend
    assert backend is not None
    try:
        await backend.pwrite(offset, payload, bool(flags & _FUA))
    except BlockError as exc:
        state.error = state.error or (p.errno_to_nbd(exc.errno), exc.message)
    except Exception as exc:
        log.exception("nbd: WRITE part on export %r failed unexpectedly", conn.export_name)
        state.error = state.error or (p.NbdErr.EIO, f"internal server error: {exc}")
    finally:
        state.running -= 1
    conn.core.pool.give_back(payload)  # type: ignore[arg-type] # as in request_serving.serve
    _finish_parted(conn, _WRITE, cookie, state)


def _finish_parted(conn: Connection, typ: int, cookie: int, state: PartedWrite) -> None:
    if not state.received_all or state.running or conn._parted.get(cookie) is not state:
        return
    del conn._parted[cookie]
    if state.refusal is not None:
        conn._refuse(typ, cookie, *state.refusal)
    elif state.error is not None:
        conn._reply_error(typ, cookie, *state.error)
    else:
        conn._queue_reply(cookie, 0, "", 0, None)


async def serve_parted_read(conn: Connection, cookie: int, offset: int, length: int) -> None:
    """A READ longer than REQUEST_PART: read and send it part by part (bounded memory)."""
    if conn.core.structured:
        await _stream_read(conn, cookie, offset, length)
        return
    async with conn._stream_lock:  # one simple-reply stream at a time
        conn._held = []
        try:
            await _stream_read(conn, cookie, offset, length)
        finally:
            held, conn._held = conn._held, None
            if held:
                conn._queue(held)


async def _stream_read(conn: Connection, cookie: int, start: int, length: int) -> None:
    backend = conn._backend
    assert backend is not None
    session, end = conn.core.server_session(), start + length
    for offset in range(start, end, p.REQUEST_PART):
        if conn._output_closed:
            return
        n = min(p.REQUEST_PART, end - offset)
        try:
            data = await backend.pread(offset, n)
            if len(data) != n:
                raise BlockError(errno.EIO, f"backend returned {len(data)} of {n} bytes")
        except Exception as failure:
            exc = failure if isinstance(failure, BlockError) else BlockError(
                errno.EIO, f"internal server error: {failure}")
            if exc is not failure:
                log.exception("nbd: READ part on export %r failed unexpectedly", conn.export_name)
            try:
                reply = session.frame_read_error(cookie, p.errno_to_nbd(exc.errno),
                                                 exc.message, offset, offset == start)
            except ValueError:  # a simple reply's header and data are out: only a hard
                # disconnect is honest
                log.error("nbd: export %r: READ failed after its reply began (%s); closing "
                          "the connection from %s", conn.export_name, exc, conn.peer.identity)
                conn._abort()
                return
            conn._queue([reply], stream=True)
            return
        conn._queue(session.frame_read_part(cookie, offset, data, offset == start,
                                            offset + n == end), stream=True)
        if not conn._transport_busy:
            conn._flush()
        while conn._transport_busy and not conn._output_closed:
            await conn._drained.wait()  # one part at a time in memory
