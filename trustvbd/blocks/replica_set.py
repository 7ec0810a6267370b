"""ReplicaSet: one encrypted disk mirrored over 1..8 untrusted replicas.

A layer in the nbdkit-filter sense: the encryption layer above it writes one
ciphertext and reads one verified range; below it are N replica links, each with
a state (see docs/dev/crypt-design.md, "Mirroring"):

- current:   took every write and commit; may serve reads.
- degraded:  missed writes (the blocks are in its dirty set) or is unreachable;
             receives nothing, serves nothing; reconnected in the background.
- resyncing: receives every new write while its dirty blocks are copied to it
             from a current replica (verified first); at the next commit it
             gets the whole leaf table and the superblock and becomes current.
- failed:    refused (it holds another disk or foreign data): never written; looked
             at again every FAILED_RECHECK s, and rebuilt whole once it is blank.

Writes go to every current and resyncing replica before they are acknowledged;
a write that fails on some but not all marks those degraded and succeeds. A
writer that lags (a request unanswered for `lag` seconds while another writer
answers) is cut off, which fails its requests, so it is degraded the same way.
Reads go to one current replica, the one with the fewest reads in flight (in
turn among equals), and are verified by the caller's `attempt`;
a replica that errs or fails verification is skipped, and the good ciphertext
is written back to it (read-repair). A read left unanswered for `lag` is asked of
the next replica too, and each further `lag` to one more (_Hedge); if one serves it,
the silent one is cut off and degraded. Only when every current replica fails does the read fail.

Only the data area is tracked block by block: a replica that missed leaf pages
or superblocks is rewritten whole by its joining commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

from trustvbd.blockdev import (
    Backend,
    BlockError,
    Breakable,
    Buffer,
    Capabilities,
    Reconnectable,
    Submits,
    TellsBreak,
    Watched,
    provides,
)
from trustvbd.blocks.integrity import ReplicaRefusedError
from trustvbd.blocks.ranges import RangeLock, describe_blocks, runs
from trustvbd.crypt.aead import BLOCK_SIZE
from trustvbd.crypt.superblock import Layout

log = logging.getLogger(__name__)

BS = BLOCK_SIZE
T = TypeVar("T")
# Blocks copied per step of a resync or scrub (one range lock, one read, one write).
COPY_BLOCKS = 256
# Reconnect back-off, as nbdkit's retry filter: doubling from the first delay.
RECONNECT_FIRST = 0.05
RECONNECT_MAX = 2.0
# A writer that leaves a request unanswered this long while another writer answers is
# dropped from the write set (degraded, resynced later) rather than holding the guest's
# writes until its request timeout ([limits] replica_lag).
REPLICA_LAG = 5.0
# A replica cut off for lagging again within LAG_FORGET s of being taken back waits
# before its next try, doubling from 2 * RECONNECT_MAX up to LAG_HOLD_MAX: a driver that
# is slow but works would otherwise cost guests `lag` on every trip back.
LAG_FORGET = 300.0
LAG_HOLD_MAX = 300.0
# A refused replica is looked at again (its superblocks read, nothing written) this often:
# once its driver holds a blank replica (wiped by its operator), it is rebuilt whole.
FAILED_RECHECK = 5.0


class State(enum.Enum):
    CURRENT = "current"
    DEGRADED = "degraded"
    RESYNCING = "resyncing"
    FAILED = "failed"


class Verifier(Protocol):
    """What the encryption layer knows about blocks (it holds the leaves and the key)."""

    def bad_blocks(self, first_block: int, ciphertext: memoryview) -> list[int]:
        """Indices of blocks in `ciphertext` that do not verify against their current leaf."""
        ...

    def written(self, block: int) -> bool:
        """Whether the block has ciphertext to copy (a zero leaf needs none)."""
        ...


# Queues a replica's write without a coroutine (Submits); None: it takes the coroutine.
_Submit = Callable[["Replica"], "asyncio.Future[None] | None"]

# Judges a replica that comes back before it may take writes (CryptDisk.admit): returns
# True if it must be rebuilt whole (blank, or older than when it left), False if its
# dirty blocks suffice; raises ReplicaRefusedError if it holds something else.
Admit = Callable[["Replica"], Awaitable[bool]]


class BadBlocks(Exception):
    """An attempt read the range but some blocks failed verification."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__(f"{len(indices)} block(s) failed verification")
        self.indices = indices


@dataclass(eq=False)
class Replica:
    """One replica of the set: its link and what the set knows about it."""

    name: str
    link: Backend
    state: State = State.CURRENT
    dirty: set[int] = field(default_factory=set)  # data blocks it lacks
    joining: bool = False       # copied up: needs the whole leaf table at the next commit
    last_error: str | None = None
    repaired: int = 0           # blocks rewritten by read-repair and scrub
    errors: int = 0
    resync_total: int = 0
    resync_done: int = 0
    resync_started: float = 0.0
    resync_rate: float = 0.0    # blocks per second over the last resync
    behind_since: int = 0       # the last epoch it took whole (while not current)
    map_saved: bool = False     # its dirty set is in trusted state as it is now
    bringing_back: bool = False
    reading: int = 0            # reads in flight (reads go to the least busy)
    lag_seen: float | None = None  # send time of a request seen lagging by the last watch
    lagged: bool = False        # cut off for lagging; not yet counted in lag_strikes
    lag_strikes: int = 0        # cut-offs for lagging, each soon after it was taken back
    taken_back_at: float = -LAG_FORGET  # monotonic time it last joined the write set

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "state": self.state.value, "last_error": self.last_error,
            "repaired_blocks": self.repaired, "errors": self.errors,
            "dirty_blocks": len(self.dirty),
        }
        if self.state is State.RESYNCING or self.resync_total:
            out["resync"] = {"done": self.resync_done, "total": self.resync_total,
                             "blocks_per_s": round(self.resync_rate, 1)}
        return out


class ReplicaSet:
    """The replicas of one disk, presented as one Backend (writes) plus verified reads."""

    def __init__(self, disk: str, layout: Layout, replicas: list[Replica]) -> None:
        if not 1 <= len(replicas) <= 8:
            raise ValueError(f"a disk has 1 to 8 replicas, not {len(replicas)}")
        self.disk = disk
        self.replicas = replicas
        self._lay = layout
        self._data_start = layout.data_start  # a computed property of Layout: read per write
        self._size = min(r.link.size for r in replicas)
        caps = [r.link.capabilities for r in replicas]
        self._caps = Capabilities(read_only=any(c.read_only for c in caps),
                                  trim=all(c.trim for c in caps), cache=all(c.cache for c in caps))
        self._next_reader = 0
        self._readers: list[Replica] = []
        self._writers: list[Replica] = []
        self._behind: list[Replica] = []
        # Data blocks written since the last flush, as runs: a set of every block cost a
        # few microseconds and ~44 bytes per 4 KiB written between flushes.
        self._unflushed: list[range] = []
        self.verifier: Verifier | None = None
        self.admit: Admit | None = None
        self.locks: RangeLock | None = None  # the encryption layer's block locks
        self.on_change: Callable[[], None] | None = None
        self.request_commit: Callable[[], None] | None = None  # a replica is ready to join
        # (what, replica, blocks, message): integrity events, for the audit log
        self.report: Callable[[str, str, list[int], str], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._lost_unflushed = False  # every current replica reconnected with unflushed writes
        self.epoch = 0  # the last committed epoch
        self.lag = REPLICA_LAG
        self._watch_timer: asyncio.TimerHandle | None = None
        self._hedges: set[_Hedge[Any]] = set()  # reads that _watch hedges once they lag
        self._regroup()
        if len(replicas) > 1:
            for r in replicas:
                if isinstance(r.link, TellsBreak):
                    r.link.when_broken(functools.partial(self._link_broke, r))

    # ------------------------------------------------------------ membership

    def _regroup(self) -> None:
        self._readers = [r for r in self.replicas if r.state is State.CURRENT]
        self._writers = [r for r in self.replicas if r.state in (State.CURRENT, State.RESYNCING)]
        self._behind = [r for r in self.replicas if r.state is State.DEGRADED]
        if self.on_change is not None:
            self.on_change()

    @property
    def current(self) -> list[Replica]:
        return list(self._readers)

    def degrade(self, r: Replica, blocks: Iterable[int], why: str) -> None:
        """`r` missed writes to `blocks` (and perhaps metadata): out of the read and write sets."""
        r.dirty.update(blocks)
        for written in self._unflushed:  # acknowledged but not flushed: may be lost with it
            r.dirty.update(written)
        r.map_saved = False
        r.last_error = why
        r.errors += 1
        if r.state is State.FAILED:
            return
        if r.state is not State.DEGRADED:
            log.warning("disk %s: replica %s degraded: %s", self.disk, r.name, why)
            if r.state is State.CURRENT:
                r.behind_since = self.epoch
            r.state = State.DEGRADED
            r.joining = False
            self._regroup()
        self._start(self._bring_back(r))

    def _link_broke(self, r: Replica) -> None:
        """r's connection broke with no request needed to see it (its driver restarted or
        hung up): out of the read and write sets now, so `status` says so and it is
        reconnected, admitted and resynced at once, not at the next request. The last
        replica serving is reconnected in place instead, as after a request failing on all."""
        link = r.link
        if self._closed or r.state is not State.CURRENT or not broken_link(link):
            return
        if any(o is not r and o.state is State.CURRENT and not broken_link(o.link)
               for o in self.replicas):
            self.degrade(r, (), f"connection lost: {cast(Breakable, link).broken}")
        else:
            self._start(self._revive(r))

    def fail(self, r: Replica, why: str) -> None:
        log.error("disk %s: replica %s refused: %s", self.disk, r.name, why)
        r.state, r.last_error, r.joining = State.FAILED, why, False
        self._regroup()
        self._start(self._recheck(r))

    async def _recheck(self, r: Replica) -> None:
        """Look at a refused replica again now and then, reading only. It took no writes
        while refused, so whatever it holds now is rebuilt whole: it is let back only as
        blank (or as this disk's, rewritten anyway), never served before that."""
        while not self._closed and r.state is State.FAILED and self.admit is not None:
            await asyncio.sleep(FAILED_RECHECK)
            try:
                link = r.link
                if isinstance(link, Breakable) and link.broken and isinstance(link, Reconnectable):
                    await link.reconnect_once()
                await self._admit_hedged(r, self.admit)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # still refused, or unreachable: stays as it is
                r.last_error = str(exc)
                continue
            if r.state is not State.FAILED:
                return
            assert self.verifier is not None
            log.warning("disk %s: replica %s, refused before, is acceptable now: rebuilding it"
                        " whole", self.disk, r.name)
            r.dirty.update(b for b in range(self._lay.blocks) if self.verifier.written(b))
            r.state, r.behind_since, r.map_saved = State.DEGRADED, self.epoch, False
            self._regroup()
            self._start(self._bring_back(r))

    def _blocks(self, offset: int, length: int) -> range:
        """The data blocks [offset, offset+length) touches (empty for metadata)."""
        start = self._data_start
        if offset + length <= start:
            return range(0)
        first = max(offset - start, 0) // BS
        return range(first, -(-(offset + length - start) // BS))

    # ------------------------------------------------------------ Backend (writes)

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        writers = self._writers
        if len(writers) == 1 and len(self.replicas) == 1:
            await writers[0].link.pwrite(offset, data, fua)
            return
        blocks = self._blocks(offset, len(data))
        for r in self._behind:
            r.dirty.update(blocks)
            r.map_saved = False
        self._note_unflushed(blocks)

        def submit(r: Replica) -> asyncio.Future[None] | None:
            link = r.link
            return (cast(Submits, link).submit_write(offset, data, fua) if provides(link, Submits)
                    else None)
        await self._all(writers, lambda r: r.link.pwrite(offset, data, fua), lambda: blocks,
                        "write", submit)

    def _note_unflushed(self, blocks: range) -> None:
        if not blocks:
            return
        last = self._unflushed[-1] if self._unflushed else None
        if last is not None and last.stop == blocks.start:  # sequential: one run grows
            self._unflushed[-1] = range(last.start, blocks.stop)
        else:
            self._unflushed.append(blocks)

    async def flush(self) -> None:
        unflushed, self._unflushed = self._unflushed, []
        await self._all(self._writers, lambda r: r.link.flush(),
                        lambda: itertools.chain.from_iterable(unflushed), "flush")
        if self._lost_unflushed:
            self._lost_unflushed = False
            raise BlockError(errno.EIO, f"disk {self.disk!r}: every current replica lost its "
                             "connection; writes acknowledged before that but not flushed may be "
                             "lost with the drivers")

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # Space reclaim only (the leaves already say "zeros"): failures do not matter.
        await asyncio.gather(*(r.link.trim(offset, length, fua) for r in self._writers),
                             return_exceptions=True)

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
                   fast: bool = False) -> None:
        await self._all(self._writers, lambda r: r.link.zero(offset, length, fua, may_trim, fast),
                        lambda: self._blocks(offset, length), "zero")

    async def cache(self, offset: int, length: int) -> None:
        if self._readers:
            await self._readers[0].link.cache(offset, length)

    async def pread(self, offset: int, length: int) -> Buffer:
        """Unverified bytes from a current replica (metadata at open; the caller verifies)."""
        errors = []
        for r in self._readers:
            try:
                return await r.link.pread(offset, length)
            except BlockError as exc:
                errors.append(f"{r.name}: {exc}")
        raise BlockError(errno.EIO, f"disk {self.disk!r}: no current replica could read "
                         f"[{offset}, {offset + length}): {'; '.join(errors) or 'none left'}")

    async def close(self) -> None:
        self._closed = True
        if self._watch_timer is not None:
            self._watch_timer.cancel()
            self._watch_timer = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except BaseException:
                pass
        for r in self.replicas:
            try:
                await r.link.close()
            except Exception:
                pass

    async def _all(self, targets: list[Replica], op: Callable[[Replica], Coroutine[Any, Any, None]],
                   blocks: Callable[[], Iterable[int]], what: str,
                   submit: _Submit | None = None) -> None:
        """Run `op` on every target (or `submit` a write, where a link queues it without a
        coroutine); degrade those that fail unless all do (then raise)."""
        if not targets:
            raise BlockError(errno.EIO, f"disk {self.disk!r}: no replica is current; the {what} "
                             "cannot be stored (see `trustvbd status`)")
        if len(targets) == 1:
            await op(targets[0])
            return
        if self._watch_timer is None:
            self._watch_soon()
        failed = await _each(op, targets, submit)
        if not failed:
            return
        if len(failed) == len(targets):
            self._revive_broken(targets)
            raise failed[0][1]
        for r, exc in failed:
            self.degrade(r, blocks(), f"{what} failed: {exc}")

    # ------------------------------------------------------------ lagging writers

    def _watch_soon(self) -> None:
        if not self._closed:
            loop = asyncio.get_running_loop()
            self._watch_timer = loop.call_later(self.lag / 4, self._watch)

    def _watch(self) -> None:
        """Cut off writers that lag: a request unanswered for `lag` s while another writer
        answered since it was sent, at two looks in a row (`lag`/4 apart).

        Their requests then fail, so the fan-out degrades them (with the blocks, as for
        any failed write) and acknowledges the guest; they come back by resync. While every
        writer is slow nobody is cut off: the request timeout decides then. Reads waiting
        `lag` are hedged (_Hedge). Runs every quarter of `lag` while requests wait; the
        next fan-out or read starts it again.
        """
        self._watch_timer = None
        writers = self._writers
        if self._closed or len(writers) < 2:
            return
        now = asyncio.get_running_loop().time()
        for hedge in self._hedges:
            hedge.start(now)
        since = {r: r.link.pending_since() if isinstance(r.link, Watched) else None
                 for r in writers}
        lagging = {r for r, t in since.items() if t is not None and now - t >= self.lag}
        for r in writers:
            t = since[r]
            ahead = None
            if r in lagging:
                assert t is not None
                ahead = next((o for o in writers if o not in lagging and isinstance(o.link, Watched)
                              and o.link.answered_at > t), None)
            if ahead is None:
                r.lag_seen = None
            elif r.lag_seen != t:
                # Seen once: cut off only if it is still behind at the next look, so a
                # replica merely a moment slower than its peers is never dropped.
                r.lag_seen = t
            else:
                assert t is not None and isinstance(r.link, Watched)
                r.lag_seen = None
                r.lagged = True
                log.warning("disk %s: replica %s lags (%.1f s without a reply while %s answers):"
                            " dropping it from the write set", self.disk, r.name, now - t,
                            ahead.name)
                r.link.abandon(f"no reply for {now - t:.1f} s while replica {ahead.name!r} "
                               f"answered (replica_lag {self.lag:g} s)")
        if self._hedges or any(t is not None for t in since.values()):
            self._watch_soon()

    # ------------------------------------------------------------ verified reads

    def data_offset(self, block: int) -> int:
        return self._data_start + block * BS

    async def read(self, b0: int, n: int, attempt: Callable[[Backend], Awaitable[T]]) -> T:
        """`attempt(link)` on current replicas in turn until one passes; repair the others.

        `attempt` returns the verified result or raises BadBlocks (indices within the
        range) or BlockError. Raises the last failure when no current replica passes.
        """
        readers = self._readers
        if not readers:
            raise BlockError(errno.EIO, f"disk {self.disk!r}: no current replica to read blocks "
                             f"{b0}-{b0 + n - 1} from")
        k = len(readers)
        start = self._next_reader % k
        self._next_reader += 1
        if k == 2:  # as below, without the sort (the usual mirror)
            a, b = readers[start], readers[1 - start]
            order = [a, b] if a.reading <= b.reading else [b, a]
            if self._watch_timer is None:
                self._watch_soon()
        elif k > 1:
            # The least busy first (in turn among equals): a slow replica gets fewer reads.
            order = sorted(readers[start:] + readers[:start], key=_reading)
            if self._watch_timer is None:
                self._watch_soon()
        else:
            order = readers
        failures: list[tuple[Replica, list[int]]] = []
        last: BaseException | None = None
        for i, r in enumerate(order):
            r.reading += 1
            # With another replica to turn to, a read left unanswered for `lag` is hedged.
            hedge = None
            if i + 1 < k and provides(r.link, Watched):
                hedge = _Hedge(self, r, order[i + 1:], attempt)
                self._hedges.add(hedge)
            served = r
            try:
                result = await attempt(r.link)
            except BadBlocks as bad:
                last = bad
                blocks = [b0 + i for i in bad.indices]
                r.last_error = f"block(s) {describe_blocks(blocks)} failed verification"
                r.errors += 1
                failures.append((r, bad.indices))
                self._report("data", r, blocks, (
                    f"disk {self.disk!r}: block(s) {describe_blocks(blocks)} read from replica "
                    f"{r.name!r} failed verification (altered, moved, replayed or lost by the "
                    "driver)" + ("; served from another replica" if i + 1 < k else "")))
                continue
            except BlockError as exc:
                if hedge is not None and hedge.won:
                    # r left the read unanswered for `lag` while another replica served it:
                    # the hedge dropped r's connection (no late reply can arrive on it); out
                    # of the read and write sets until reconnected and resynced.
                    self.degrade(r, (), f"read failed: {exc}")
                    assert hedge.by is not None
                    served, result = hedge.by, cast(T, hedge.result)
                else:
                    last = exc
                    r.last_error = f"read failed: {exc}"
                    r.errors += 1
                    failures.append((r, list(range(n))))
                    continue
            finally:
                r.reading -= 1
                if hedge is not None:
                    self._hedges.discard(hedge)
                    hedge.stop()
            if failures:
                await self._repair(served, b0, n, failures)
            return result
        assert last is not None
        self._revive_broken(readers)
        if len(self.replicas) > 1 and not isinstance(last, BadBlocks):
            self._report("unavailable", readers[0], [], (
                f"disk {self.disk!r}: no current replica could serve blocks {b0}-{b0 + n - 1} "
                f"({last}); the read fails"))
        raise last

    def _report(self, what: str, r: Replica, blocks: list[int], message: str) -> None:
        if self.report is not None:
            self.report(what, r.name, blocks, message)

    async def _repair(self, good: Replica, b0: int, n: int,
                      failures: list[tuple[Replica, list[int]]]) -> None:
        """Write `good`'s ciphertext of the failed blocks back to the replicas that failed."""
        assert self.verifier is not None
        try:
            ct = memoryview(await good.link.pread(self._lay.data_offset(b0), n * BS))
        except BlockError as exc:
            for r, idx in failures:
                self.degrade(r, (b0 + i for i in idx), f"read-repair source failed: {exc}")
            return
        ok = len(ct) == n * BS and not self.verifier.bad_blocks(b0, ct)
        for r, idx in failures:
            want = [i for i in idx if self.verifier.written(b0 + i)]
            if not ok:  # the source changed its answer: resync later instead
                self.degrade(r, (b0 + i for i in want), "read-repair source did not verify twice")
                continue
            try:
                for i0, i1 in runs(want, COPY_BLOCKS):
                    await r.link.pwrite(self._lay.data_offset(b0 + i0), ct[i0 * BS:i1 * BS])
            except BlockError as exc:
                self.degrade(r, (b0 + i for i in want), f"read-repair write failed: {exc}")
                continue
            r.repaired += len(want)
            log.warning("disk %s: repaired %d block(s) of replica %s from %s", self.disk,
                        len(want), r.name, good.name)

    # ------------------------------------------------------------ commits

    def joining(self) -> list[Replica]:
        """Replicas that need the whole leaf table in this commit."""
        return [r for r in self._writers if r.joining]

    async def write_to(self, targets: list[Replica], offset: int, data: Buffer) -> None:
        await self._all(targets, lambda r: r.link.pwrite(offset, data), lambda: (), "write")

    def commit_done(self, joined: list[Replica], epoch: int) -> None:
        """The commit of `epoch` reached the write set: those that joined are current now."""
        self.epoch = epoch
        changed = False
        for r in joined:
            if r.state is State.RESYNCING and r.joining and not r.dirty:
                r.state, r.joining = State.CURRENT, False
                changed = True
                log.warning("disk %s: replica %s is current again", self.disk, r.name)
        if changed:
            self._regroup()

    # ------------------------------------------------------------ bringing replicas back

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            coro.close()
            return
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _revive_broken(self, targets: list[Replica]) -> None:
        """An operation failed on every replica it went to: with no one left to degrade
        them in favour of, reconnect the broken ones in the background as they are."""
        for r in targets:
            if len(self.replicas) > 1 and isinstance(r.link, Breakable) and r.link.broken:
                self._start(self._revive(r))

    async def _revive(self, r: Replica) -> None:
        if r.bringing_back or not isinstance(r.link, Reconnectable):
            return
        r.bringing_back = True
        try:
            delay = RECONNECT_FIRST
            while not self._closed and r.state is not State.DEGRADED and broken_link(r.link):
                try:
                    await r.link.reconnect_once()
                except Exception as exc:
                    r.last_error = str(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                if self._unflushed:  # acknowledged, not flushed: the driver may have lost them
                    self._lost_unflushed = True
        finally:
            r.bringing_back = False
        if r.state is State.DEGRADED:  # degraded meanwhile: the usual way back
            self._start(self._bring_back(r))

    def start_recovery(self) -> None:
        """After open: bring every degraded replica back in the background."""
        for r in self.replicas:
            if r.state is State.DEGRADED:
                self._start(self._bring_back(r))
            elif r.state is State.FAILED:
                self._start(self._recheck(r))

    async def _bring_back(self, r: Replica) -> None:
        """Reconnect (back-off, forever), admit, resync. One at a time per replica."""
        if r.bringing_back:
            return
        r.bringing_back = True
        try:
            delay = RECONNECT_FIRST
            while not self._closed and r.state is State.DEGRADED:
                await self._hold_if_lagging(r)
                try:
                    await self._reconnect_and_resync(r)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    r.last_error = str(exc)
                    if r.state is State.RESYNCING:
                        r.state = State.DEGRADED
                        self._regroup()
                if r.state is State.DEGRADED:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX)
        finally:
            r.bringing_back = False

    async def _hold_if_lagging(self, r: Replica) -> None:
        """A replica cut off for lagging soon after it was last taken back is slow, not
        broken: wait before taking it back again, longer each time (its admission reads
        can be prompt while its writes are not), so guests pay `lag` rarely, not every
        few seconds. Forgotten once it kept up for LAG_FORGET s."""
        if not r.lagged:
            return
        r.lagged = False
        now = time.monotonic()
        r.lag_strikes = r.lag_strikes + 1 if now - r.taken_back_at < LAG_FORGET else 1
        if r.lag_strikes < 2:
            return
        hold = min(RECONNECT_MAX * 2 ** (r.lag_strikes - 1), LAG_HOLD_MAX)
        log.warning("disk %s: replica %s lagged again %.0f s after it was taken back (%d times):"
                    " next try in %.0f s", self.disk, r.name, now - r.taken_back_at,
                    r.lag_strikes, hold)
        await asyncio.sleep(hold)

    async def _reconnect_and_resync(self, r: Replica) -> None:
        link = r.link
        if isinstance(link, Breakable) and link.broken:
            if not isinstance(link, Reconnectable):
                raise BlockError(errno.EIO, f"replica {r.name!r} is disconnected")
            await link.reconnect_once()
        if self.admit is not None:
            try:
                rebuild = await self._admit_hedged(r, self.admit)
            except ReplicaRefusedError as exc:
                self.fail(r, str(exc))
                return
            if rebuild:
                assert self.verifier is not None
                r.dirty.update(b for b in range(self._lay.blocks) if self.verifier.written(b))
                r.map_saved = False
        await self._resync(r)

    async def _admit_hedged(self, r: Replica, admit: Admit) -> bool:
        """`admit(r)`, its reads hedged as a guest's are: one that `r` leaves unanswered for
        `lag` is asked of a current replica too, and if that one answers while `r` still has
        not, `r` is still lagging: its connection is dropped, which fails the admission now
        (it is tried again with back-off), not after the request timeout. So a replica
        that answers reads late is not taken back only to be cut off again at the next
        guest read that reaches it, every few seconds, each costing that guest `lag`."""
        admitting = asyncio.ensure_future(admit(r))
        probe: asyncio.Task[Buffer] | None = None
        by: Replica | None = None    # the current replica the probe asked
        probed: float | None = None  # send time of r's request the probe is about
        loop = asyncio.get_running_loop()
        try:
            while not admitting.done():
                await asyncio.wait([admitting] if probe is None else [admitting, probe],
                                   timeout=self.lag / 4, return_when=asyncio.FIRST_COMPLETED)
                link = r.link
                if admitting.done() or not isinstance(link, Watched):
                    continue
                since = link.pending_since()
                if probe is not None and by is not None:
                    if not probe.done():
                        continue
                    answered = not probe.cancelled() and probe.exception() is None
                    probe = None
                    if answered and since is not None and since == probed:
                        waited = loop.time() - since
                        log.warning("disk %s: replica %s lags (%.1f s without answering an "
                                    "admission read that %s answered): not taken back yet",
                                    self.disk, r.name, waited, by.name)
                        link.abandon(f"no reply to an admission read for {waited:.1f} s while "
                                     f"replica {by.name!r} answered one (replica_lag "
                                     f"{self.lag:g} s)")
                elif since is not None and since != probed and loop.time() - since >= self.lag:
                    by = min(self._readers, key=_reading, default=None)
                    if by is not None:
                        probed = since
                        probe = asyncio.ensure_future(by.link.pread(0, BS))
            return admitting.result()
        finally:
            for task in (probe, admitting):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    async def _resync(self, r: Replica) -> None:
        """Copy r's dirty blocks from current replicas, verified, while r takes new writes."""
        assert self.verifier is not None and self.locks is not None
        r.state, r.joining = State.RESYNCING, False
        r.taken_back_at = time.monotonic()
        self._regroup()
        r.resync_total = len(r.dirty)
        r.resync_done = 0
        r.resync_started = time.monotonic()
        log.warning("disk %s: resyncing %d block(s) of replica %s", self.disk, r.resync_total, r.name)
        while r.dirty:
            if r.state is not State.RESYNCING:
                return
            batch = runs(sorted(r.dirty)[:COPY_BLOCKS * 8], COPY_BLOCKS)
            for b0, b1 in batch:
                hold = await self.locks.acquire(b0, b1, True)
                try:
                    await self._copy(r, b0, b1)
                finally:
                    self.locks.release(hold)
                r.dirty.difference_update(range(b0, b1))
                r.resync_done += b1 - b0
                elapsed = time.monotonic() - r.resync_started
                r.resync_rate = r.resync_done / elapsed if elapsed > 0 else 0.0
                await asyncio.sleep(0)  # guest requests first
        await r.link.flush()
        r.joining = True  # the next commit writes its leaf table and superblock
        log.warning("disk %s: replica %s copied up; joins at the next commit", self.disk, r.name)
        if self.request_commit is not None:
            self.request_commit()

    async def _copy(self, r: Replica, b0: int, b1: int) -> None:
        assert self.verifier is not None
        verifier = self.verifier
        want = [b for b in range(b0, b1) if verifier.written(b)]
        if not want:
            return
        lo, hi = want[0], want[-1] + 1
        try:
            ct = await self.read(lo, hi - lo, self._fetch(lo, hi - lo))
        except BadBlocks:
            await self._copy_each(r, want)
            return
        for i0, i1 in runs([b - lo for b in want], COPY_BLOCKS):
            await r.link.pwrite(self._lay.data_offset(lo + i0), ct[i0 * BS:i1 * BS])

    async def _copy_each(self, r: Replica, blocks: list[int]) -> None:
        """Block by block, after a range some block of which no current replica could serve.

        A block that verifies on no current replica (its last write lost with an unsynced
        intent record in a power cut, or damaged on every one) has nothing to copy: it reads
        as an integrity error from every replica until the guest writes it again, so it is
        left out rather than keeping `r` from ever joining.
        """
        for b in blocks:
            try:
                ct = await self.read(b, 1, self._fetch(b, 1))
            except BadBlocks:
                log.warning("disk %s: block %d verifies on no current replica; replica %s joins "
                            "without it", self.disk, b, r.name)
                continue
            await r.link.pwrite(self._lay.data_offset(b), ct)

    def _fetch(self, b0: int, n: int) -> Callable[[Backend], Awaitable[memoryview]]:
        """A read attempt for `read`: blocks [b0, b0+n) from one link, verified."""
        assert self.verifier is not None
        verifier = self.verifier

        async def fetch(link: Backend) -> memoryview:
            ct = memoryview(await link.pread(self._lay.data_offset(b0), n * BS))
            if len(ct) != n * BS:
                raise BlockError(errno.EIO, "short read")
            bad = verifier.bad_blocks(b0, ct)
            if bad:
                raise BadBlocks(bad)
            return ct

        return fetch

    # ------------------------------------------------------------ scrub

    async def scrub(self, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Read every written block of every current replica, verify, repair. Returns counts."""
        assert self.verifier is not None and self.locks is not None
        verifier = self.verifier
        blocks = self._lay.blocks
        counts = {r.name: {"checked": 0, "bad": 0, "repaired": 0} for r in self.replicas}
        for b0 in range(0, blocks, COPY_BLOCKS):
            b1 = min(b0 + COPY_BLOCKS, blocks)
            hold = await self.locks.acquire(b0, b1, False)
            try:
                readers = list(self._readers)
                read: list[tuple[Replica, memoryview, set[int]]] = []
                for r in readers:
                    try:
                        ct = memoryview(await r.link.pread(self._lay.data_offset(b0), (b1 - b0) * BS))
                        bad = (verifier.bad_blocks(b0, ct) if len(ct) == (b1 - b0) * BS
                               else list(range(b1 - b0)))
                    except BlockError as exc:
                        r.last_error = f"scrub read failed: {exc}"
                        bad, ct = list(range(b1 - b0)), memoryview(b"")
                    bad = [i for i in bad if verifier.written(b0 + i)]
                    counts[r.name]["checked"] += b1 - b0
                    counts[r.name]["bad"] += len(bad)
                    read.append((r, ct, set(bad)))
                for r, _, bad_set in read:
                    # Each bad block from any replica that has it right (none: the reads say so).
                    fixes = [(i, src) for i in sorted(bad_set)
                             for src in [next((c for s, c, b in read if s is not r and i not in b),
                                              None)] if src is not None]
                    try:
                        for i, src in fixes:
                            await r.link.pwrite(self._lay.data_offset(b0 + i), src[i * BS:(i + 1) * BS])
                    except BlockError as exc:
                        self.degrade(r, (b0 + i for i in bad_set), f"scrub repair failed: {exc}")
                        continue
                    r.repaired += len(fixes)
                    counts[r.name]["repaired"] += len(fixes)
            finally:
                self.locks.release(hold)
            if progress is not None:
                progress(b1, blocks)
            await asyncio.sleep(0)
        return counts

    def status(self) -> list[dict[str, Any]]:
        return [r.status() for r in self.replicas]


class _Hedge(Generic[T]):
    """A read from `slow` that the `others` may serve instead: once it has gone `lag`
    seconds without a reply (seen by ReplicaSet._watch, every quarter of `lag`), the same
    read is sent to the first of them; each further `lag` without an answer, to the next
    one as well, so two silent replicas out of three cost `2 * lag`, not the request timeout.

    If one of those passes, `slow` lagged on a read another replica served: its connection
    is dropped (`abandon`), which fails the first read at once (the guest waits about `lag`
    per silent replica, not the request timeout) and discards any late reply with the
    socket. If they all fail, the first read decides, as without a hedge. Until then a read
    costs this object and a set entry, not a timer of its own.
    """

    __slots__ = ("asked", "attempt", "by", "others", "result", "rs", "sent", "slow", "tasks",
                 "won")

    def __init__(self, rs: ReplicaSet, slow: Replica, others: list[Replica],
                 attempt: Callable[[Backend], Awaitable[T]]) -> None:
        self.rs, self.slow, self.others, self.attempt = rs, slow, others, attempt
        self.won = False
        self.by: Replica | None = None  # the one that served it
        self.result: T | None = None
        self.asked = 0  # how many of `others` were asked (or passed over)
        self.tasks: list[asyncio.Task[None]] = []
        self.sent = asyncio.get_running_loop().time()

    def start(self, now: float) -> None:
        """Ask the next replica, if the read has waited another `lag` since the last one."""
        while (not self.won and not self.rs._closed and self.asked < len(self.others)
               and now - self.sent >= self.rs.lag * (self.asked + 1)):
            by = self.others[self.asked]
            self.asked += 1
            if by.state is State.CURRENT:
                self.tasks.append(asyncio.get_running_loop().create_task(self._run(by)))
                return

    async def _run(self, by: Replica) -> None:
        slow = self.slow
        by.reading += 1
        try:
            result = await self.attempt(by.link)
        except (BadBlocks, BlockError):
            return
        finally:
            by.reading -= 1
        if self.won:
            return
        self.result, self.won, self.by = result, True, by
        slow.lagged = True
        waited = asyncio.get_running_loop().time() - self.sent
        log.warning("disk %s: replica %s lags (%.1f s without answering a read that %s "
                    "served): dropping it", self.rs.disk, slow.name, waited, by.name)
        assert isinstance(slow.link, Watched)
        slow.link.abandon(f"no reply to a read for {waited:.1f} s while replica {by.name!r} "
                          f"served it (replica_lag {self.rs.lag:g} s)")

    def stop(self) -> None:
        """The first read is over: hedges still running are not needed."""
        for task in self.tasks:
            if not task.done():
                task.cancel()


async def _each(op: Callable[[Replica], Coroutine[Any, Any, None]], targets: list[Replica],
                submit: _Submit | None = None) -> list[tuple[Replica, Exception]]:
    """`op` on every target at once; the targets whose op failed, with what it raised.

    As asyncio.gather with return_exceptions, for less: it runs once per mirrored write.
    A write that a target's link queues at once (`submit`, Submits) costs a future, whose
    outcome the link is then told (`write_ended`); otherwise the first target's op runs in
    the caller's own task and each other one in a task. All their requests are queued in
    this turn of the loop or the next, and each replica's leave in one send per turn. A
    cancelled caller (or op) cancels every op, waits for those in tasks to stop and raises
    CancelledError (a submitted request is on the wire already: its answer is dropped)."""
    loop = asyncio.get_running_loop()
    inline: Replica | None = None
    started: list[tuple[Replica, asyncio.Future[None], bool]] = []  # (target, op, submitted)
    for r in targets:
        future = submit(r) if submit is not None else None
        if future is not None:
            started.append((r, future, True))
        elif inline is None and not started:
            inline = r
        else:
            started.append((r, loop.create_task(op(r)), False))
    failed: list[tuple[Replica, Exception]] = []
    try:
        if inline is not None:
            try:
                await op(inline)
            except Exception as exc:
                failed.append((inline, exc))
        for r, future, submitted in started:
            error: Exception | None = None
            try:
                await future
            except Exception as exc:
                error = exc
                failed.append((r, exc))
            if submitted:
                cast(Submits, r.link).write_ended(error)
    except asyncio.CancelledError:
        for _, future, _ in started:
            future.cancel()
        if started:
            await asyncio.wait([future for _, future, _ in started])
        raise
    return failed


def _reading(r: Replica) -> int:
    return r.reading


def broken_link(link: Backend) -> bool:
    """Whether `link` is a connection that says it broke."""
    return isinstance(link, Breakable) and bool(link.broken)

