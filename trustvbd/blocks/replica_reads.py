"""ReplicaSet's verified reads: one current replica serves, the others stand by.

A read goes to one current replica, the one with the fewest reads in flight (in
turn among equals), and is verified by the caller's `attempt`; a replica that errs
or fails verification is skipped, and the good ciphertext is written back to it
(read-repair). A read left unanswered for `lag` is asked of the next replica too,
and each further `lag` to one more (read_hedge.py); if one serves it, the silent
one is cut off and degraded. Only when every current replica fails does the read
fail. A read may start by callback (submit_read: the first replica's request, no
coroutine; the caller's read object is the SubmittedRead, and its hedge is made only
once it lags); whatever goes wrong with it goes on in the same loop (read_on) from
the next replica.

The functions taking the set are ReplicaSet's methods (bound in its class body,
replica_set.py): no call layer between a guest's read and its work.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from trustvbd.blockdev import Backend, BlockError, SubmitsReads, Watched, provides
from trustvbd.blocks.ranges import describe_blocks, runs
from trustvbd.blocks.read_hedge import ReadHedge
from trustvbd.blocks.replica import COPY_BLOCKS, BadBlocks, Replica, broken_link, reads_in_flight
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
    those before it (the last of them `last`): submit_read goes on here."""
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
            "driver)" + ("; served from another replica" if more else "")))
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


def submit_read(rs: ReplicaSet, read: SubmittedRead[T]) -> bool:
    """`read`'s prologue by callback, for a caller that waits for no coroutine: the
    first replica's read is submitted (SubmitsReads) into `read.into`, watched for lag
    and hedged as `read` does. On its reply `read.verify()` checks it; anything else
    (an error, a bad block, a hedge that served it) goes on in `read_on`, the one
    place failover, repair and reporting happen. False when the first replica's link
    cannot take it now: nothing was done; `read` serves it."""
    readers = rs._readers
    if not readers:
        return False  # `read` says so
    b0 = read.b0
    order = rs._order(readers, b0, read.n)
    r = order[0]
    link = r.link
    if not provides(link, SubmitsReads):
        return False
    read.rs, read.readers, read.order, read.live, read.hedge, read.sent = (
        rs, readers, order, True, None, None)
    if not cast(SubmitsReads, link).submit_read(rs._data_start + b0 * BS, read.into,
                                                read.replied):
        return False
    r.reading += 1
    if len(order) > 1 and provides(link, Watched):
        read.sent = rs._running_loop().time()  # the watch hedges it once it lags
        rs._hedges.add(read)
    return True


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
        log.warning("disk %s: repaired %d block(s) of replica %s from %s", rs.disk,
                    len(want), r.name, good.name)


class SubmittedRead(Generic[T]):
    """A read served by callbacks (ReplicaSet.submit_read), as the caller's subclass: one
    object per read (the encryption layer's guest read). The first replica's reply ends it
    (`verify`, then `ended`) or hands it to read_on at the next replica. Watched for lag,
    it is hedged (read_hedge.py) only once it has waited `lag`: a read answered in time
    costs no hedge of its own.

    The subclass sets `b0` and `n` and provides the caller's side (`into`, `attempt`,
    `verify`, `ended`, `go_on`); submit_read sets the rest."""

    __slots__ = ("b0", "hedge", "live", "n", "order", "readers", "rs", "sent")

    b0: int
    n: int
    rs: ReplicaSet
    readers: list[Replica]
    order: list[Replica]
    hedge: ReadHedge[T] | None
    live: bool
    sent: float | None  # the loop's time it was sent, if the watch hedges it

    # --- the caller's side
    @property
    def into(self) -> memoryview:
        """Where the first replica's bytes are received."""
        raise NotImplementedError

    def attempt(self, link: Backend) -> Awaitable[T]:
        """As `read`'s attempt: a whole read from `link`, for hedges and the general path."""
        raise NotImplementedError

    def verify(self) -> T:
        """`into` holds the first replica's bytes: the verified result, or BadBlocks."""
        raise NotImplementedError

    def ended(self, result: T | BaseException) -> None:
        """The read's outcome, from whichever replica served it, or why none could."""
        raise NotImplementedError

    def go_on(self, rest: Coroutine[Any, Any, T]) -> None:
        """The read goes on in the general path: run `rest` and end with its outcome."""
        raise NotImplementedError

    # --- the replica set's side
    def start(self, now: float) -> None:
        """The watch's look (ReplicaSet._watch): once the read has waited `lag`, hedge it."""
        hedge = self.hedge
        if hedge is None:
            assert self.sent is not None  # only a watched read is looked at
            if now - self.sent < self.rs.lag:
                return
            hedge = self.hedge = ReadHedge(self.rs, self.order[0], self.order[1:], self.attempt,
                                           self.sent)
        hedge.start(now)

    def _settle(self) -> None:
        """As read_on's `finally` for the first replica."""
        self.live = False
        self.order[0].reading -= 1
        if self.sent is not None:
            self.rs._hedges.discard(self)
            hedge = self.hedge
            if hedge is not None:
                hedge.stop()
                self.hedge = None  # it holds our attempt: no cycle left

    def withdraw(self) -> None:
        """The caller gives up (its guest went away): the reply, when it comes, is dropped."""
        if self.live:
            self._settle()

    def replied(self, error: BlockError | None) -> None:
        """The first replica's reply (the link's callback)."""
        if not self.live:
            return
        hedge = self.hedge
        self._settle()
        exc: BadBlocks | BlockError
        if error is None:
            try:
                result = self.verify()
            except BadBlocks as bad:
                exc = bad
            except Exception as failed:  # a bug, not the replica's: the read fails, nothing hangs
                self.ended(failed)
                return
            else:
                self.ended(result)
                return
        else:
            exc = error
        rs, order, r = self.rs, self.order, self.order[0]
        if hedge is not None and hedge.won and not isinstance(exc, BadBlocks):
            _, result = rs._hedge_won(r, hedge, exc)
            self.ended(result)
            return
        failures: list[tuple[Replica, list[int]]] = []
        if len(order) == 1 and not isinstance(exc, BadBlocks) and broken_link(r.link):
            # The only replica's connection broke: `read` asks it again, as pread_into
            # would have (a single replica's link reconnects).
            self.go_on(rs.read_on(self.readers, order, 0, self.b0, self.n, self.attempt,
                                  failures))
            return
        last = rs._failed(r, exc, len(order) > 1, self.b0, self.n, failures)
        self.go_on(rs.read_on(self.readers, order, 1, self.b0, self.n, self.attempt,
                              failures, last))
