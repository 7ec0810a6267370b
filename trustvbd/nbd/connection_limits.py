"""What one server connection may hold, so a hostile client cannot make the server
allocate without bound, and when it is closed for idling.

At most MAX_TASKS requests and MAX_INFLIGHT_BYTES of payload run at once, and reading
stops while the client is not reading its replies (WRITE_BUFFER_HIGH). With a server's
MemoryBudget, all of one guest's connections together hold at most its limit
(budget.py): each connection charges what it holds, within UNCHARGED_MAX of slack. A
connection with no request received and no reply drained for the server's
idle_timeout is closed.

The functions taking the connection are Connection's methods (bound in its class
body, connection.py): no call layer per request.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trustvbd.nbd.budget import MemoryBudget
    from trustvbd.nbd.connection import Connection

log = logging.getLogger("trustvbd.nbd.server")

MAX_TASKS = 256
MAX_INFLIGHT_BYTES = 128 * 1024 * 1024
WRITE_BUFFER_HIGH = 4 * 1024 * 1024  # stop reading requests while this many reply bytes wait
UNCHARGED_MAX = 256 * 1024  # reply bytes a connection may queue before telling its budget


def start_idle_timer(conn: Connection) -> None:
    timeout = conn.server.idle_timeout
    if timeout is not None and not conn._stopping:
        conn._idle_timer = conn._loop.call_later(timeout / 4, _check_idle, conn)


def _check_idle(conn: Connection) -> None:
    """Every quarter of idle_timeout: four quiet checks in a row close the connection."""
    if conn._stopping:
        return
    if conn._activity or conn._tasks:
        conn._activity, conn._quiet_checks = 0, 0
    else:
        conn._quiet_checks += 1
        if conn._quiet_checks >= 4:
            log.warning("nbd: %s (%s): no request and no reply taken for %.0f s; closing"
                        " the idle connection", conn.peer.identity, conn.peer.address,
                        conn.server.idle_timeout)
            conn._abort()
            return
    start_idle_timer(conn)


def request_started(conn: Connection) -> None:
    """A request went on running (a task, or READs in the native read plane). Flow control
    only where one more request can change it (once per request in the encryption
    domain, where every request waits for drivers): a limit reached, the guest's
    budget over, or more held than charged by the slack _queue allows too."""
    budget = conn._budget
    if (len(conn._tasks) + conn._native_running >= MAX_TASKS
            or conn._inflight_bytes >= MAX_INFLIGHT_BYTES
            or (budget is not None and (budget.over or conn._inflight_bytes + conn._out_bytes
                                        > conn._charged + UNCHARGED_MAX))):
        update_reading(conn)


def request_ended(conn: Connection) -> None:
    """A running request ended. It can only let reading resume or lower the charge:
    look when reading is paused, when the budget is over, when the charge is stale by
    more than the slack, and when the last one leaves (so no stale charge outlives
    the work)."""
    budget = conn._budget
    if (conn._reading_paused or not (conn._tasks or conn._native_running)
            or (budget is not None and (budget.over or conn._charged - conn._inflight_bytes
                                        - conn._out_bytes > UNCHARGED_MAX))):
        update_reading(conn)


def _recharge(conn: Connection, budget: MemoryBudget) -> None:
    """Tell the budget what this connection holds now."""
    held = conn._inflight_bytes + conn._out_bytes + conn.core.receiving
    if conn._transport is not None and not conn._output_closed:
        held += conn._transport.get_write_buffer_size()
    conn._receiving = conn.core.receiving
    if held != conn._charged:
        budget.adjust(held - conn._charged)
        conn._charged = held


def update_reading(conn: Connection) -> None:
    budget = conn._budget
    if budget is not None:
        _recharge(conn, budget)
    if conn._transport is None or conn._output_closed:
        return
    busy = (
        conn._out_bytes + conn._transport.get_write_buffer_size() >= WRITE_BUFFER_HIGH
        or len(conn._tasks) + conn._native_running >= MAX_TASKS
        or conn._inflight_bytes >= MAX_INFLIGHT_BYTES
        or conn._room_wait is not None  # a WRITE waits for room behind (connection.py)
        # A handshake is bounded on its own (option sizes and count, its timeout); pausing
        # it here would hang a guest's new connection until that timeout.
        or (budget is not None and budget.over and conn._transmitting and not conn.core.receiving)
    )
    if busy and not conn._reading_paused:
        conn._reading_paused = True
        conn._transport.pause_reading()
    elif not busy and conn._reading_paused:
        conn._reading_paused = False
        conn._transport.resume_reading()
        if conn._transmitting:
            conn._process()  # requests parsed before the pause
