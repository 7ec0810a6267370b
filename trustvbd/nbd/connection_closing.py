"""A server connection's end: aborted (a protocol error, a policy, idling), closed
gracefully once its running requests replied (DISC, EOF), and finished: the export
released, the budget told, whoever waits for it woken.

The functions taking the connection are Connection's methods (bound in its class
body, connection.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from trustvbd.nbd import file_serve
from trustvbd.nbd.native_planes import wait_native

if TYPE_CHECKING:
    from trustvbd.nbd.connection import Connection

log = logging.getLogger("trustvbd.nbd.server")


def protocol_error(conn: Connection, reason: str) -> None:
    log.warning("nbd: closing connection from %s (%s): %s", conn.peer.identity,
                conn.peer.address, reason)
    abort(conn)


def abort(conn: Connection) -> None:
    conn._stopping = True
    file_serve.stop(conn)
    if conn._idle_timer is not None:
        conn._idle_timer.cancel()
    conn._out.clear()
    conn._replies.clear()
    conn._output_closed = True
    if conn._transport is not None:
        conn._transport.abort()


def close_gracefully(conn: Connection) -> None:
    """Stop taking requests, let running ones reply, then close (DISC, EOF, ABORT)."""
    if conn._stopping:
        return
    conn._stopping = True
    conn._loop.create_task(drain_and_close(conn))


async def drain_and_close(conn: Connection) -> None:
    while conn._tasks or conn._native_running > 0:
        if conn._tasks:
            await asyncio.wait(list(conn._tasks))
        await wait_native(conn)  # one that fails goes on as a task: wait for it too
    conn._flush()
    if conn._transport is not None:
        conn._transport.close()


def start_finish(conn: Connection, timeout: float | None = None) -> None:
    if not conn._finishing:
        conn._finishing = True
        conn._loop.create_task(finish(conn, timeout))


async def finish(conn: Connection, timeout: float | None) -> None:
    try:
        if conn._handshake_task is not None:
            await asyncio.wait([conn._handshake_task])
        if conn._native_serving is not None:
            await conn._native_serving
        deadline = None if timeout is None else conn._loop.time() + timeout
        if conn._tasks:
            _, late = await asyncio.wait(list(conn._tasks), timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        await wait_native(conn, None if deadline is None
                          else max(0.0, deadline - conn._loop.time()))
    finally:
        if conn.ring is not None:
            os.close(conn.ring[0])  # the native loop's mapping was its own
            conn.ring = None
        if conn._room_wait is not None:
            conn._room_wait.cancel()  # the WRITE it held is not answered: the guest left
        conn.core.parse_batch = None  # no cycle left through the core
        if conn.core.session is not None:
            conn.core.session.set_settle()  # nor through the session
        if conn.export is not None:
            try:
                conn.server.provider.release_export(conn.peer, conn.export)
            except Exception:
                log.exception("nbd: releasing export %r failed", conn.export_name)
        conn.server.connections.discard(conn)
        if conn._idle_timer is not None:
            conn._idle_timer.cancel()
        if conn._budget is not None:
            conn._budget.leave(conn)
            conn._budget.adjust(-conn._charged)
            conn._charged = 0
        if not conn._done.done():
            conn._done.set_result(None)
