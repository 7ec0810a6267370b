"""ReplicaSet's verified reads: one current replica serves, the others stand by.

A read goes to one current replica, the one with the fewest reads in flight (in
turn among equals), and is verified by the caller's `attempt`; a replica that errs
or fails verification is skipped, and the good ciphertext is written back to it
(read-repair). A read left unanswered for `lag` is asked of the next replica too,
and each further `lag` to one more (read_hedge.py); if one serves it, the silent
one is cut off and degraded. Only when every current replica fails does the read
fail. Most guest reads start in the native read plane (crypt_read.read_route), which
picks the replica the same way; whatever goes wrong with one goes on here (read_after),
in the same loop (read_on) from the next replica, and one that lags is hedged alike.

The functions taking the set are ReplicaSet's methods (bound in its class body,
replica_set.py): no call layer between a guest's read and its work.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar, cast

from trustvbd.blockdev import Backend, BlockError, NativeClient, ReadsNatively, Watched, provides
from trustvbd.blocks.integrity import WINDOW
from trustvbd.blocks.ranges import describe_blocks, runs
from trustvbd.blocks.read_hedge import ReadHedge
from trustvbd.blocks.replica import (
    COPY_BLOCKS,
    BadBlocks,
    Replica,
    State,
    broken_link,
    reads_in_flight,
)
from trustvbd.crypt.aead import BLOCK_SIZE

if TYPE_CHECKING:
    from trustvbd.blocks.replica_set import ReplicaSet

log = logging.getLogger("trustvbd.blocks.replica_set")

BS = BLOCK_SIZE
T = TypeVar("T")


def data_offset(rs: ReplicaSet, block: int) -> int:
    """Where data block `block` starts on a replica."""
    return rs._data_start + block * BS


async def read(rs: ReplicaSet, b0: int, n: int, attempt: Callable[[Backend], Awaitable[T]]) -> T:
    """`attempt(link)` on current replicas in turn until one passes; repair the others.

    `attempt` returns the verified result or raises BadBlocks (indices within the
    range) or BlockError. Raises the last failure when no current replica passes.
    """
    readers = rs._readers
    return await rs.read_on(readers, rs._order(readers, b0, n), 0, b0, n, attempt, [])


def read_order(rs: ReplicaSet, readers: list[Replica], b0: int, n: int) -> list[Replica]:
    """The current replicas in the order a read asks them."""
    k = len(readers)
    if not k:
        raise BlockError(errno.EIO, f"disk {rs.disk!r}: no current replica to read blocks "
                         f"{b0}-{b0 + n - 1} from")
    start = rs._next_reader % k
    rs._next_reader += 1
    if k == 1:
        return readers
    if rs._watch_timer is None:  # it hedges reads that lag
        rs._watch_soon()
    if k == 2:  # as below, without the sort (the usual mirror)
        a, b = readers[start], readers[1 - start]
        return [a, b] if a.reading <= b.reading else [b, a]
    # The least busy first (in turn among equals): a slow replica gets fewer reads.
    return sorted(readers[start:] + readers[:start], key=reads_in_flight)


async def read_on(rs: ReplicaSet, readers: list[Replica], order: list[Replica], at: int, b0: int,
                  n: int, attempt: Callable[[Backend], Awaitable[T]],
                  failures: list[tuple[Replica, list[int]]],
                  last: BaseException | None = None) -> T:
    """`read` from `order[at]` on, after the `failures` (replica, block indices) of
    those before it (the last of them `last`): read_after goes on here."""
    k = len(order)
    for i in range(at, k):
        r = order[i]
        r.reading += 1
        # With another replica to turn to, a read left unanswered for `lag` is hedged.
        hedge = None
        if i + 1 < k and provides(r.link, Watched):
            hedge = ReadHedge(rs, r, order[i + 1:], attempt, rs._running_loop().time())
            rs._hedges.add(hedge)
        served = r
        try:
            result = await attempt(r.link)
        except (BadBlocks, BlockError) as exc:
            if hedge is not None and hedge.won and not isinstance(exc, BadBlocks):
                served, result = rs._hedge_won(r, hedge, exc)
            else:
                last = rs._failed(r, exc, i + 1 < k, b0, n, failures)
                continue
        finally:
            r.reading -= 1
            if hedge is not None:
                rs._hedges.discard(hedge)
                hedge.stop()
        if failures:
            await rs._repair(served, b0, n, failures)
        return result
    assert last is not None
    rs.recovery.revive_broken(readers)
    if len(rs.replicas) > 1 and not isinstance(last, BadBlocks):
        rs._report("unavailable", readers[0], [], (
            f"disk {rs.disk!r}: no current replica could serve blocks {b0}-{b0 + n - 1} "
            f"({last}); the read fails"))
    raise last


def read_failed(rs: ReplicaSet, r: Replica, exc: BadBlocks | BlockError, more: bool, b0: int,
                n: int, failures: list[tuple[Replica, list[int]]]) -> BaseException:
    """Record `r` failing a read of blocks [b0, b0+n) (reported if it lied); `more`:
    another replica is asked next. Returns `exc`."""
    r.errors += 1
    if isinstance(exc, BadBlocks):
        blocks = [b0 + i for i in exc.indices]
        r.last_error = f"block(s) {describe_blocks(blocks)} failed verification"
        failures.append((r, exc.indices))
        rs._report("data", r, blocks, (
            f"disk {rs.disk!r}: block(s) {describe_blocks(blocks)} read from replica "
            f"{r.name!r} failed verification (altered, moved, replayed or lost by the "
            "driver)" + ("; another replica is asked" if more else "")))
    else:
        r.last_error = f"read failed: {exc}"
        failures.append((r, list(range(n))))
    return exc


def hedge_won(rs: ReplicaSet, r: Replica, hedge: ReadHedge[T],
              exc: BlockError) -> tuple[Replica, T]:
    """r left the read unanswered for `lag` while another replica served it: the hedge
    dropped r's connection (no late reply can arrive on it); out of the read and write
    sets until reconnected and resynced. Who served it, and what."""
    rs.degrade(r, (), f"read failed: {exc}")
    assert hedge.by is not None
    return hedge.by, cast(T, hedge.result)


async def read_after(rs: ReplicaSet, client: NativeClient, b0: int, n: int,
                     failure: BlockError | list[int] | float,
                     attempt: Callable[[Backend], Awaitable[T]]) -> T:
    """`read`, for a read the native plane sent to the replica whose connection is `client`
    and that failed there (ServesReadsNatively.resume_read): the failure is that replica's
    (reported, counted, repaired later from the replica that serves it) and the read goes
    on at the next one, as read_on does for its own. A read the replica left unanswered
    for `lag` (`failure` the loop time it was sent) is hedged: asked of the others, and if
    one serves it, the silent replica is dropped and degraded."""
    readers = rs._readers
    r = next((x for x in readers
              if isinstance(x.link, ReadsNatively) and x.link.native_client() is client), None)
    if r is None:
        # Out of the read set meanwhile (degraded, or its connection replaced): start over.
        return await rs.read(b0, n, attempt)
    order = [r, *(x for x in rs._order(readers, b0, n) if x is not r)]
    if isinstance(failure, float):
        return await _hedge_lagging(rs, readers, order, failure, b0, n, attempt)
    exc: BadBlocks | BlockError = BadBlocks(failure) if isinstance(failure, list) else failure
    failures: list[tuple[Replica, list[int]]] = []
    if len(order) == 1 and not isinstance(exc, BadBlocks) and broken_link(r.link):
        # The only replica's connection broke: ask it again, as pread_into would have (a
        # single replica's link reconnects).
        return await rs.read_on(readers, order, 0, b0, n, attempt, failures)
    last = rs._failed(r, exc, len(order) > 1, b0, n, failures)
    return await rs.read_on(readers, order, 1, b0, n, attempt, failures, last)


async def _hedge_lagging(rs: ReplicaSet, readers: list[Replica], order: list[Replica], sent: float,
                         b0: int, n: int, attempt: Callable[[Backend], Awaitable[T]]) -> T:
    """order[0] left a native read unanswered for `lag`: the others are asked in turn, as a
    ReadHedge asks them; one that serves it drops the silent replica's connection and
    degrades it. If none can, the silent one is asked again and decides, as without a hedge
    (its first request's late reply is dropped with it)."""
    slow = order[0]
    for by in order[1:]:
        if by.state is not State.CURRENT or rs.closed:
            continue
        by.reading += 1
        try:
            result = await attempt(by.link)
        except (BadBlocks, BlockError):
            continue
        finally:
            by.reading -= 1
        waited = rs._running_loop().time() - sent
        why = (f"no reply to a read for {waited:.1f} s while replica {by.name!r} served it "
               f"(replica_lag {rs.lag:g} s)")
        if slow.state is State.CURRENT:
            slow.cut_off_for_lag()
            log.warning("disk %s: replica %s lags (%.1f s without answering a read that %s "
                        "served): dropping it", rs.disk, slow.name, waited, by.name)
            if isinstance(slow.link, Watched):
                slow.link.abandon(why)
            rs.degrade(slow, (), f"read failed: {why}")
        return result
    return await rs.read_on(readers, [slow], 0, b0, n, attempt, [])


def report(rs: ReplicaSet, what: str, r: Replica, blocks: list[int], message: str) -> None:
    """An integrity event, to the audit log (the set's `report` callback)."""
    if rs.report is not None:
        rs.report(what, r.name, blocks, message)


async def repair(rs: ReplicaSet, good: Replica, b0: int, n: int,
                 failures: list[tuple[Replica, list[int]]]) -> None:
    """Write `good`'s ciphertext of the failed blocks back to the replicas that failed.

    The ciphertext is read from `good` again (the guest's buffer is already decrypted).
    If that read fails or no longer verifies, `good` is at fault, not the replicas to
    repair: it is charged (its errors and last_error), and they stay as they are (the
    blocks they failed are never served; the next read of them or a scrub repairs them).
    Degrading them instead took healthy replicas out of the set for their source's
    failure, and with two replicas left the flaky source serving alone."""
    assert rs.verifier is not None
    try:
        ct = memoryview(await good.link.pread(rs.layout.data_offset(b0), n * BS))
        why = None if len(ct) == n * BS and not rs.verifier.bad_blocks(b0, ct) else (
            "did not verify when read again (it changed its answer)")
    except BlockError as exc:
        why = f"failed: {exc}"
    if why is not None:
        good.errors += 1
        good.last_error = f"read-repair source read of blocks {b0}-{b0 + n - 1} {why}"
        log.warning("disk %s: cannot repair %s from replica %s: its %s", rs.disk,
                    ", ".join(r.name for r, _ in failures), good.name, good.last_error)
        return
    for r, idx in failures:
        want = [i for i in idx if rs.verifier.written(b0 + i)]
        try:
            for i0, i1 in runs(want, COPY_BLOCKS):
                await r.link.pwrite(rs.layout.data_offset(b0 + i0), ct[i0 * BS:i1 * BS])
        except BlockError as exc:
            rs.degrade(r, (b0 + i for i in want), f"read-repair write failed: {exc}")
            continue
        r.repaired += len(want)
        say_repaired(rs.disk, r, len(want), good.name)


def say_repaired(disk: str, r: Replica, blocks: int, source: str) -> None:
    """Read-repairs of `r` in the log as its integrity events are (a liar makes one per read):
    the first at once, then at most one line per window with the count since."""
    r.repairs_unsaid += blocks
    now = time.monotonic()
    if r.repairs_said_at is not None and now - r.repairs_said_at < WINDOW:
        return
    since = "" if r.repairs_said_at is None else f" in the last {now - r.repairs_said_at:.0f} s"
    log.warning("disk %s: repaired %d block(s) of replica %s%s (the last from %s)", disk,
                r.repairs_unsaid, r.name, since, source)
    r.repairs_unsaid, r.repairs_said_at = 0, now
