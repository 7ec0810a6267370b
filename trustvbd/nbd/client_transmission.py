"""NbdClient's transmission phase around the native engine (trustvbd._native.NbdClientEngine,
native/src/nbd_client): request slots, requests sent in one writev per loop turn,
replies paired with their waiters, deadlines, a broken connection, disconnecting.

The engine packs requests, parses and checks replies and pairs them by cookie. On a
plain socket it owns the socket (non-blocking readv/writev, driven by add_reader and
add_writer); on a TLS stream Python's SSL transport carries the bytes and feeds them
in (client_connect.Wire). This module keeps the policy: slots, deadlines, errors,
closing.

The functions taking the client are NbdClient's methods (bound in its class body,
client.py): no call layer between a request and the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from typing import TYPE_CHECKING, Any

from trustvbd.blockdev import BlockError, Buffer
from trustvbd.nbd import protocol as p
from trustvbd.nbd import spin

if TYPE_CHECKING:
    from trustvbd.nbd.client import NbdClient

_FLUSH = int(p.Cmd.FLUSH)
_READ = int(p.Cmd.READ)
_WRITE = int(p.Cmd.WRITE)
_ESHUTDOWN = int(p.NbdErr.ESHUTDOWN)
_FUA = int(p.CmdFlag.FUA)
# Requests wait (pwrite) or are declined (submit_writes) while more than this is queued
# and not yet accepted by the socket.
HIGH_WATER = 4 << 20
log = logging.getLogger("trustvbd.nbd.client")
# What the engine returns: completions (cookie, NBD error, message), why the connection
# is broken (None: it is not), whether the server closed its end, and what the native
# read plane's reads left for Python (NativeBatch), if anything.
# NativeBatch: (request slots freed, guest connections with replies to write, failed
# reads as (guest connection, cookie, offset, length, kind, detail, replica offset,
# replica length)); kind 0: an error reply, detail (NBD error, text); 1: blocks that failed
# verification, detail their indices; 2: the connection broke; 3: lagging, detail the
# loop time it was sent.
NativeBatch = tuple[int, list[Any], list[tuple[Any, int, int, int, int, Any, int, int]]]
# WriteBatch: the WRITEs of submit_writes the engine paired and counted (request_writes):
# request slots freed, and the batches whose last WRITE was answered, (first cookie, None
# or the error replies as (index, NBD error, message)).
WriteBatch = tuple[int, list[tuple[int, list[tuple[int, int, str]] | None]]]
Batch = tuple[list[tuple[int, int, str]], str | None, bool, NativeBatch | None,
              WriteBatch | None]
# A submit_writes batch waiting for its replies: the future of their outcomes, the writes.
Group = tuple["asyncio.Future[list[BlockError | None]]", list[tuple[int, Buffer]]]


def printable(text: str, limit: int = 300) -> str:
    """Server-supplied text made safe to log or show: no control characters, bounded."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return clean + ("..." if len(text) > limit else "")


class Waiter:
    """A request sent and not yet answered (its slot given back by `request`): the future
    gets None, or the BlockError the reply or a broken connection stands for. (The writes
    of submit_writes have none: the engine pairs and counts their replies, Group.)"""

    __slots__ = ("deadline", "future", "length", "offset", "type")

    def __init__(self, future: asyncio.Future[None], deadline: float, typ: int,
                 offset: int, length: int) -> None:
        self.future, self.deadline, self.type, self.offset, self.length = (
            future, deadline, typ, offset, length
        )


def _take_slot(client: NbdClient) -> asyncio.Future[None] | None:
    """Take a request slot: None if one was free, else a future that hands one over."""
    if client._free_slots > 0:
        client._free_slots -= 1
        return None
    waiter: asyncio.Future[None] = client._loop.create_future()
    client._slot_waiters.append(waiter)
    return waiter


def release_slot(client: NbdClient) -> None:
    waiters = client._slot_waiters
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)  # the slot passes to it
            return
    client._free_slots += 1


def _release_slots(client: NbdClient, count: int) -> None:
    if client._slot_waiters:
        for _ in range(count):
            release_slot(client)
    else:
        client._free_slots += count


def native_sent(client: NbdClient, count: int, sent: bool = False) -> None:
    """The native read plane queued `count` reads on the engine (their slots taken from
    the free count it was given): send them with this loop turn's other requests, unless
    they are `sent` already (NbdServerSession.parse_native sends a batch's reads itself
    where the socket takes them)."""
    client._free_slots -= count
    if sent:
        spin.wait_soon(client._loop, client._fd)  # their replies come next
    elif not client._send_queued:
        client._send_queued = True
        client._loop.call_soon(_send_outgoing, client)
    if client._timer is None:
        _arm_timer(client)


def native_done(client: NbdClient, native: NativeBatch) -> None:
    """What the engine's native reads left for Python: free their slots, have the guest
    connections write their replies, and serve the failed reads the general way."""
    slots, owners, failed = native
    if client._slot_waiters:
        _release_slots(client, slots)
    else:
        client._free_slots += slots
    for owner in owners:
        owner._native_replied()
    if failed:
        _native_failed(client, failed)


def _native_failed(client: NbdClient, failed: list[tuple[Any, int, int, int, int, Any, int, int]]
                   ) -> None:
    for owner, cookie, offset, length, kind, detail, roffset, rlength in failed:
        failure: BlockError | list[int] | float
        if kind == 0:
            error, message = detail
            failure = _reply_error(client, error, message, _READ, roffset, rlength)
        elif kind == 1:
            failure = detail
        elif kind == 3:
            failure = float(detail)
        else:
            failure = BlockError(errno.EIO, f"NBD server {client.where}: "
                                 f"{client.broken or 'connection lost'}; connection closed")
        owner._native_failed(client, cookie, offset, length, failure)


async def _wait_for_slot(client: NbdClient, waiter: asyncio.Future[None]) -> None:
    try:
        await waiter
    except asyncio.CancelledError:
        if waiter.done() and not waiter.cancelled():
            release_slot(client)  # handed a slot, then cancelled: pass it on
        raise


async def request(
    client: NbdClient, typ: int, offset: int, length: int, flags: int = 0, data: Buffer | None = None,
    into: memoryview | None = None,
) -> None:
    waiter = _take_slot(client)
    if waiter is not None:
        await _wait_for_slot(client, waiter)
    try:
        if not client._writable.is_set():
            await client._writable.wait()
        client._check_usable()
        await send_request(client, typ, offset, length, flags, data, into)
    finally:
        release_slot(client)


def send_request(client: NbdClient, typ: int, offset: int, length: int, flags: int, data: Buffer | None,
                 into: memoryview | None) -> asyncio.Future[None]:
    """Queue one request (its slot taken); the future its reply completes."""
    assert client._engine is not None  # _check_usable: attached and not broken
    try:
        cookie = client._engine.request(typ, flags, offset, length, data, into)
    except ValueError as exc:
        raise p.LocalProtocolError(str(exc)) from None
    future: asyncio.Future[None] = client._loop.create_future()
    # A FUA write or a FLUSH leaves at once, with what is queued before it: a FLUSH
    # waits for it, and nothing would gain from joining it in one system call at the
    # end of this turn.
    await_reply(client, cookie, Waiter(future, client._loop.time() + client._timeout, typ,
                                       offset, length),
                now=bool(flags & _FUA) or typ == _FLUSH)
    return future


def send_writes(client: NbdClient, writes: list[tuple[int, Buffer]], flags: int,
                bounds: tuple[int, int, int], ring: bool = False
                ) -> asyncio.Future[list[BlockError | None]] | None:
    """Queue WRITEs (their slots taken), each with its own cookie, all with one deadline;
    the future of their outcomes, in order (None, or the BlockError each failed with). One
    engine call for them all, which pairs and counts their replies: Python hears of the
    batch once, when its last write is answered (resolve), not once per write.
    None, with nothing queued, if a write is outside `bounds` (the export's size, minimum
    block and maximum payload: NbdClientEngine.request_writes). With `ring`, each data is
    a 16-byte ring descriptor, sent as a RING_WRITE (the handshake agreed the ring)."""
    engine = client._engine
    assert engine is not None  # _check_usable: attached and not broken
    loop = client._loop
    try:
        first = engine.request_writes(flags, writes, loop.time(), bounds, ring)
    except ValueError as exc:  # checked before; nothing of them was queued
        raise p.LocalProtocolError(str(exc)) from None
    if first is None:
        return None
    future: asyncio.Future[list[BlockError | None]] = loop.create_future()
    client._groups[first] = (future, writes)
    if flags & _FUA:
        _send_outgoing(client)  # as send_request: a FLUSH waits for it
    elif not client._send_queued:
        client._send_queued = True
        loop.call_soon(_send_outgoing, client)
    if client._timer is None:
        _arm_timer(client)
    return future


def await_reply(client: NbdClient, cookie: int, waiter: Waiter, now: bool) -> None:
    """Pair `cookie`'s reply with `waiter` and send its request: `now`, or with the
    others of this loop turn in one writev. The batch is sent by a callback queued
    before any of its requests awaits, so it leaves before any of their callers can be
    woken (cancelled) and reuse a buffer; what the socket does not take then, the
    engine copies."""
    client._waiters[cookie] = waiter
    if now:
        _send_outgoing(client)
    elif not client._send_queued:
        client._send_queued = True
        client._loop.call_soon(_send_outgoing, client)
    if client._timer is None:
        _arm_timer(client)


def _send_outgoing(client: NbdClient) -> None:
    client._send_queued = False
    engine = client._engine
    if engine is None or (client._fd < 0 and client._transport is None):
        return  # dropped: the engine let go of what was queued
    if client._transport is not None:  # TLS
        if engine.queued:
            client._transport.writelines(engine.take_output())
        return
    if client._watching_writes:
        return  # the socket is full; _on_writable goes on when it has room
    _write(client)
    if engine.native_pending and not client._watching_writes:
        spin.wait_soon(client._loop, client._fd)  # a native read's reply comes next


def _write(client: NbdClient) -> None:
    """Write what the engine has queued; watch the socket while some is left."""
    assert client._engine is not None
    try:
        done = client._engine.send()
    except OSError as exc:
        break_connection(client, errno.EIO, f"connection lost ({exc})")
        return
    if done:
        if client._watching_writes:  # (the events are cleared only while it watches)
            client._loop.remove_writer(client._fd)
            client._watching_writes = False
            client._writable.set()
            client._drained.set()
        return
    client._drained.clear()
    if not client._watching_writes:
        client._loop.add_writer(client._fd, _write, client)
        client._watching_writes = True
    if client._engine.queued > HIGH_WATER:
        client._writable.clear()
    else:
        client._writable.set()


def _reply_error(client: NbdClient, error: int, message: str, typ: int, offset: int,
                 length: int) -> BlockError:
    """The error an error reply stands for (to raise)."""
    err = p.nbd_to_errno(error)
    text = f": {printable(message)}" if message else ""
    if error == _ESHUTDOWN:
        _start_shutdown(client)
    return BlockError(err, (
        f"NBD server {client.where} failed {p.name_of(p.Cmd, typ)} [{offset}, {offset + length}) "
        f"with {p.name_of(p.NbdErr, error)}{text}"
    ))


def _start_shutdown(client: NbdClient) -> None:
    # The server asked us to go (ESHUTDOWN): the spec wants a soft disconnect.
    if client.broken is None:
        client.broken = "the server is shutting down"
        client._loop.create_task(_disconnect_when_idle(client))


def _native_pending(client: NbdClient) -> int:
    return client._engine.native_pending if client._engine is not None else 0


async def wait_idle(client: NbdClient) -> None:
    """Until no request waits for its reply (the native read plane's have no future)."""
    while client._waiters or client._groups or _native_pending(client):
        if client._idle is None:
            client._idle = asyncio.Event()
        client._idle.clear()
        await client._idle.wait()


async def _disconnect_when_idle(client: NbdClient) -> None:
    await wait_idle(client)
    if not client._closing:
        await disconnect(client, client.broken or "the server is shutting down")
        drop_connection(client)


async def disconnect(client: NbdClient, reason: str) -> None:
    """Send NBD_CMD_DISC after what is queued (idle: no request pending), and wait
    until it is out, for at most the request timeout."""
    engine = client._engine
    if engine is None or (client._fd < 0 and client._transport is None):
        return
    engine.disconnect()
    client.broken = client.broken or reason
    if client._transport is not None:
        client._transport.writelines(engine.take_output())
        return  # closing the transport flushes it
    if not client._watching_writes:
        _write(client)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(client._timeout):
            await client._drained.wait()


def drop_connection(client: NbdClient, abort: bool = False) -> None:
    """Close the socket or transport (the engine lets go of every buffer)."""
    client._drained.set()  # a _disconnect waiting for the socket waits no more
    if client._fd >= 0:
        client._loop.remove_reader(client._fd)
        if client._watching_writes:
            client._loop.remove_writer(client._fd)
            client._watching_writes = False
        client._fd = -1
    if client._engine is not None:
        native = client._engine.close()
        if native is not None:
            slots, _, failed = native
            _release_slots(client, slots)
            if failed:
                # Not from inside the break: its caller may be what is breaking us (a hedge).
                client._loop.call_soon(_native_failed, client, failed)
    if client._sock is not None:
        client._sock.close()
        client._sock = None
    if client._transport is not None:
        if abort:
            client._transport.abort()
        else:
            client._transport.close()


def oldest_sent(client: NbdClient) -> float | None:
    """The loop time the oldest request the engine pairs itself (a native read, a write of
    submit_writes) was sent; None if none waits."""
    engine = client._engine
    if engine is None:
        return None
    sent = engine.native_oldest
    if client._groups:
        writes = engine.writes_oldest
        if writes is not None and (sent is None or writes[0] < sent):
            sent = writes[0]
    return sent


def _deadline(client: NbdClient) -> float | None:
    """When the oldest request waiting (the native read plane's and the engine's writes
    too) times out."""
    sent = oldest_sent(client)
    deadline = None if sent is None else sent + client._timeout
    if client._waiters:
        oldest = next(iter(client._waiters.values())).deadline
        deadline = oldest if deadline is None else min(deadline, oldest)
    return deadline


def _arm_timer(client: NbdClient) -> None:
    deadline = _deadline(client)
    if deadline is not None:
        client._timer = client._loop.call_at(deadline, _on_timer, client)


def _on_timer(client: NbdClient) -> None:
    client._timer = None
    deadline = _deadline(client)
    if deadline is None:
        return
    if deadline <= client._loop.time():
        oldest = next(iter(client._waiters.values()), None)
        writes = client._engine.writes_oldest if client._engine is not None else None
        if oldest is not None and oldest.deadline <= deadline:
            offset, length = oldest.offset, oldest.length
            what = f"{p.name_of(p.Cmd, oldest.type)} [{offset}, {offset + length})"
        elif writes is not None and writes[0] + client._timeout <= deadline:
            _, offset, length = writes
            what = f"WRITE [{offset}, {offset + length})"
        else:
            what = "a READ of the native read plane"
        break_connection(client, errno.ETIMEDOUT, f"no reply to {what} within {client._timeout} s")
    else:
        _arm_timer(client)


def break_connection(client: NbdClient, err: int, reason: str) -> None:
    """Declare the connection dead: fail everything pending, drop the socket."""
    if client.broken is None and client._on_broken is not None and not client._closing:
        client._loop.call_soon(client._on_broken)
    if client.broken is None or client._waiters or client._groups:
        client.broken = client.broken or reason
        failure = BlockError(err, f"NBD server {client.where}: {reason}; connection closed")
        waiters = list(client._waiters.values())
        client._waiters.clear()
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(failure)
        if client._groups:
            _writes_abandoned(client, failure)
        if client._idle is not None:
            client._idle.set()
    if client._timer is not None:
        client._timer.cancel()
        client._timer = None
    client._writable.set()  # writers wake up and find the connection broken
    client._wake_handshake()
    drop_connection(client, abort=True)


def _writes_abandoned(client: NbdClient, failure: BlockError) -> None:
    """The connection broke: each submit_writes batch not fully answered ends, its writes
    that had no reply failed with `failure` (their slots given back)."""
    groups = client._groups
    client._groups = {}
    engine = client._engine
    left = {first: (errors, unanswered) for first, errors, unanswered in
            (engine.abandon_writes() if engine is not None else [])}
    freed = 0
    for first, (future, writes) in groups.items():
        errors, unanswered = left.get(first, ([], range(len(writes))))
        outcomes = _outcomes(client, writes, errors)
        for i in unanswered:
            outcomes[i] = failure
        freed += len(unanswered)
        if not future.done():
            future.set_result(outcomes)
    _release_slots(client, freed)


def _outcomes(client: NbdClient, writes: list[tuple[int, Buffer]],
              errors: list[tuple[int, int, str]] | None) -> list[BlockError | None]:
    """A batch's outcomes, in order: None, or the BlockError of its error reply."""
    outcomes: list[BlockError | None] = [None] * len(writes)
    for i, error, message in errors or ():
        offset, data = writes[i]
        outcomes[i] = _reply_error(client, error, message, _WRITE, offset, len(data))
    return outcomes


def native_answered(client: NbdClient, slots: int) -> bool:
    """The engine's reader (NbdClientEngine.ready) received a batch that did nothing but
    answer native reads without fault: their `slots` come back and the server is heard
    from now. False, with nothing done, when someone may be owed those slots (none is
    free: release_slot hands them on) or waits for idle: the batch goes to resolve."""
    if (client._free_slots > 0 or not slots) and client._idle is None:
        client.answered_at = client._loop.time()
        client._free_slots += slots
        return True
    return False


def resolve(client: NbdClient, batch: Batch) -> None:
    """Complete the futures of the requests the engine saw answered (the batches of
    submit_writes it counted itself, once each, their slots given back together), and hand
    on what its native reads left (_native_done); then act on a broken connection or the
    server's end of it. The engine's reader callback (NbdClientEngine.ready, on a plain
    socket) calls this only for a batch with more in it than native reads answered without
    fault, or one native_answered would not finish."""
    done, broken, eof, native, writes = batch
    client.answered_at = client._loop.time()  # the server said something
    if native is not None:
        try:
            native_done(client, native)
        except Exception:
            log.exception("NBD client %s: handing on native reads failed", client.where)
    if writes is not None:
        freed, ended = writes
        groups = client._groups
        for first, errors in ended:
            outcomes, batch_writes = groups.pop(first)
            if not outcomes.done():
                outcomes.set_result([None] * len(batch_writes) if errors is None
                                    else _outcomes(client, batch_writes, errors))
        if client._slot_waiters:
            _release_slots(client, freed)
        else:
            client._free_slots += freed
    if done:
        waiters = client._waiters
        for cookie, error, message in done:
            waiter = waiters.pop(cookie)
            future = waiter.future
            if future.done():
                continue
            if error:
                future.set_exception(_reply_error(
                    client, error, message, waiter.type, waiter.offset, waiter.length))
            else:
                future.set_result(None)
    if (client._idle is not None and not client._waiters and not client._groups
            and not _native_pending(client)):
        client._idle.set()
    if broken is not None:
        break_connection(client, errno.EIO, broken)
    elif eof:
        eof_received(client)


def eof_received(client: NbdClient) -> None:
    if client._engine is None:
        client._core.receive_eof()
        client._wake_handshake()  # the handshake reads the ConnectionClosed event
    elif not (client._closing and not client._waiters and not client._groups):
        break_connection(client, errno.EIO, "the server closed the connection")
    else:
        drop_connection(client)


def lost(client: NbdClient, exc: Exception | None) -> None:
    if client.broken is None or client._waiters or client._groups:
        break_connection(client, errno.EIO, f"connection lost ({exc})" if exc else "connection lost")
    client._wake_handshake()
