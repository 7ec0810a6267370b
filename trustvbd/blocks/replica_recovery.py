"""Bringing the replicas of a mirrored disk back: reconnect, admit, resync, recheck.

A replica the set degraded (replica_set.py) is reconnected with back-off, forever (as
nbdkit's retry filter), judged by the encryption layer (`admit`: this disk's, blank,
or something else), and resynced: its dirty blocks are copied from current replicas,
verified, while it takes new writes; it joins at the next commit. A refused one is
looked at again every FAILED_RECHECK s, reading only, and rebuilt whole once blank. One
such task at a time per replica (`Replica.bringing_back`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from trustvbd.blockdev import Backend, BlockError, Breakable, Buffer, Reconnectable, Watched
from trustvbd.blocks.block_runs import BlockRuns
from trustvbd.blocks.integrity import ReplicaRefusedError, refusal_text
from trustvbd.blocks.ranges import runs
from trustvbd.blocks.replica import (
    COPY_BLOCKS,
    LAG_FORGET,
    Admit,
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
# Reconnect back-off, as nbdkit's retry filter: doubling from the first delay.
RECONNECT_FIRST = 0.05
RECONNECT_MAX = 2.0
# A replica cut off for lagging again within LAG_FORGET s of being taken back waits
# before its next try, doubling from 2 * RECONNECT_MAX up to LAG_HOLD_MAX: a driver that
# is slow but works would otherwise cost guests `lag` on every trip back.
LAG_HOLD_MAX = 300.0
# A refused replica is looked at again (its superblocks read, nothing written) this often:
# once its driver holds a blank replica (wiped by its operator), it is rebuilt whole.
FAILED_RECHECK = 5.0


class SourceFailed(BlockError):
    """No current replica could be read to copy blocks from: the resyncing replica is not
    at fault (those that failed say so in their own `last_error`)."""


class Recovery:
    """The background work that brings one replica set's replicas back."""

    def __init__(self, rs: ReplicaSet) -> None:
        self.rs = rs

    def bring_back(self, r: Replica) -> None:
        """Reconnect, admit and resync degraded `r`, in the background."""
        self.rs.start_task(self._bring_back(r))

    def recheck(self, r: Replica) -> None:
        """Look at refused `r` again now and then, in the background."""
        self.rs.start_task(self._recheck(r))

    def revive(self, r: Replica) -> None:
        """Reconnect `r` in place (the last replica serving), in the background."""
        self.rs.start_task(self._revive(r))

    def start(self) -> None:
        """After open: bring every degraded replica back in the background."""
        for r in self.rs.replicas:
            if r.state is State.DEGRADED:
                self.bring_back(r)
            elif r.state is State.FAILED:
                self.recheck(r)

    def revive_broken(self, targets: list[Replica]) -> None:
        """An operation failed on every replica it went to: with no one left to degrade
        them in favour of, reconnect the broken ones in the background as they are."""
        for r in targets:
            if len(self.rs.replicas) > 1 and isinstance(r.link, Breakable) and r.link.broken:
                self.revive(r)

    async def _revive(self, r: Replica) -> None:
        if r.bringing_back or not isinstance(r.link, Reconnectable):
            return
        r.bringing_back = True
        try:
            delay = RECONNECT_FIRST
            while not self.rs.closed and r.state is not State.DEGRADED and broken_link(r.link):
                try:
                    await r.link.reconnect_once()
                except Exception as exc:
                    r.last_error = str(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                if self.rs.has_unflushed:  # acknowledged, not flushed: the driver may have lost them
                    self.rs.lost_unflushed = True
        finally:
            r.bringing_back = False
        if r.state is State.DEGRADED:  # degraded meanwhile: the usual way back
            self.bring_back(r)

    async def _bring_back(self, r: Replica) -> None:
        """Reconnect (back-off, forever), admit, resync. One at a time per replica."""
        if r.bringing_back:
            return
        r.bringing_back = True
        try:
            delay = RECONNECT_FIRST
            resynced = False  # a resync was started (and failed) on this trip back
            while not self.rs.closed and r.state is State.DEGRADED:
                await self._hold_if_lagging(r)
                began = r.resync_started
                try:
                    # Its start is logged once per trip back, not at every retry (a full
                    # driver is retried every RECONNECT_MAX s, perhaps for days).
                    await self._reconnect_and_resync(r, loud=not resynced)
                    # Its resync stopped because it was degraded meanwhile (a guest write
                    # failed on it): this trip back has tried one.
                    resynced = resynced or r.state is State.DEGRADED
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    r.last_error = str(exc)
                    # A resync was tried, even if r was degraded again before it failed (a
                    # write sent before it came back failing meanwhile): the next is quiet.
                    resynced = resynced or r.state is State.RESYNCING or r.resync_started > began
                    if r.state is State.RESYNCING:
                        r.state = State.DEGRADED
                        self.rs.regroup()
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
        log.warning("disk %s: replica %s was cut off again %.0f s after it was taken back (%d times):"
                    " next try in %.0f s", self.rs.disk, r.name, now - r.taken_back_at,
                    r.lag_strikes, hold)
        await asyncio.sleep(hold)

    async def _reconnect_and_resync(self, r: Replica, loud: bool = True) -> None:
        link = r.link
        if isinstance(link, Breakable) and link.broken:
            if not isinstance(link, Reconnectable):
                raise BlockError(errno.EIO, f"replica {r.name!r} is disconnected")
            await link.reconnect_once()
            # Perhaps another run of its driver, holding a copy from before the last FLUSH
            # (FLUSHes between full commits sync only trusted state, so such a copy shows
            # the epoch it left at): what was written since that commit goes to it again.
            r.dirty |= r.since_commit
            r.map_saved = False
        if self.rs.admit is not None:
            try:
                rebuild = await self._admit_hedged(r, self.rs.admit)
            except ReplicaRefusedError as exc:
                self.rs.fail(r, refusal_text(exc, self.rs.name_disk))
                return
            if rebuild:
                self._rebuild_whole(r)
        await self._resync(r, loud)

    def _rebuild_whole(self, r: Replica) -> None:
        """r lacks every written block: the ranges of the leaf pages that may hold one go
        to its dirty map as runs (bounded; `_copy` skips the blocks not written)."""
        assert self.rs.verifier is not None
        for b0, b1 in self.rs.verifier.written_ranges():
            r.dirty.add(b0, b1)
        r.whole_table, r.map_saved = True, False

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
                                   timeout=self.rs.lag / 4, return_when=asyncio.FIRST_COMPLETED)
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
                                    self.rs.disk, r.name, waited, by.name)
                        link.abandon(f"no reply to an admission read for {waited:.1f} s while "
                                     f"replica {by.name!r} answered one (replica_lag "
                                     f"{self.rs.lag:g} s)")
                elif since is not None and since != probed and loop.time() - since >= self.rs.lag:
                    by = min(self.rs.current, key=reads_in_flight, default=None)
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

    async def _resync(self, r: Replica, loud: bool = True) -> None:
        """Copy r's dirty blocks from current replicas, verified, while r takes new writes
        (said at WARNING if `loud`: the first try of a trip back)."""
        assert self.rs.verifier is not None and self.rs.locks is not None
        if r.whole_table and not r.map_saved and self.rs.save_map is not None:
            # Before its rebuild writes anything: a restart must find it being rebuilt, or
            # our ciphertext under its blank superblocks is refused as data not ours.
            self.rs.save_map(r)
        r.state, r.joining = State.RESYNCING, False
        r.taken_back_at = time.monotonic()
        self.rs.regroup()
        r.resync_total = len(r.dirty)
        r.resync_waiting = None
        # Its leaf pages of these blocks are old too (or may be): they go to it when it joins.
        r.leaves_behind.update(r.dirty)
        r.leaves_behind.update(r.since_commit)
        r.resync_done = 0
        r.resync_started = time.monotonic()
        log.log(logging.WARNING if loud else logging.DEBUG, "disk %s: resyncing %d block(s) of "
                "replica %s", self.rs.disk, r.resync_total, r.name)
        copied = BlockRuns()  # on r, not yet flushed: its driver may still lose them
        flushed = False
        try:
            if await self._copy_dirty(r, copied):
                await r.link.flush()
                flushed = True
        finally:
            if not flushed and copied:
                # Cut short (r degraded meanwhile, or its flush failed): what its driver
                # took since its last flush may be lost with it, so it is copied again.
                r.dirty.update(copied)
                r.map_saved = False
        if not flushed:
            return
        r.joining = True  # the next commit writes its leaf table and superblock
        r.join_round += 1
        log.warning("disk %s: replica %s copied up; joins at the next commit", self.rs.disk, r.name)
        if self.rs.request_commit is not None:
            self.rs.request_commit()

    async def _copy_dirty(self, r: Replica, copied: BlockRuns) -> bool:
        """Copy r's dirty blocks, noting each run in `copied`; False if stopped because r
        is no longer resyncing (or the set closed)."""
        assert self.rs.locks is not None
        delay = RECONNECT_FIRST
        while r.dirty:
            self._skip_unwritten(r)
            for b0, b1 in r.dirty.first(COPY_BLOCKS * 8, COPY_BLOCKS):
                if r.state is not State.RESYNCING or self.rs.closed:
                    r.resync_waiting = None
                    return False
                hold = await self.rs.locks.acquire(b0, b1, True)
                try:
                    await self._copy(r, b0, b1)
                except SourceFailed as exc:
                    # Not r's fault: the current replicas that failed the read say so in
                    # their own last_error (ReplicaSet.read). r stays in the write set and
                    # this batch is tried again, from whichever replica is current then.
                    self._wait_for_source(r, exc, delay)
                    break
                finally:
                    self.rs.locks.release(hold)
                r.resync_waiting = None
                delay = RECONNECT_FIRST
                r.dirty.discard(b0, b1)
                copied.add(b0, b1)
                r.resync_done += b1 - b0
                elapsed = time.monotonic() - r.resync_started
                r.resync_rate = r.resync_done / elapsed if elapsed > 0 else 0.0
                await asyncio.sleep(0)  # guest requests first
            if r.resync_waiting is not None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
        return True

    def _skip_unwritten(self, r: Replica) -> None:
        """Drop from the head of r.dirty the blocks before its next one that may be
        written: there is nothing to copy there, and a coarsened run may span terabytes
        never written (walked 256 blocks at a time, a 16 TiB one took hours). Their leaf
        pages still go to r when it joins (leaves_behind)."""
        assert self.rs.verifier is not None
        while r.dirty:
            b0, b1 = next(r.dirty.runs())
            got = self.rs.verifier.first_written(b0, b1)
            end = b1 if got is None else got[0]
            if end > b0:
                r.dirty.discard(b0, end)
                r.resync_done += end - b0
            if got is not None:
                return

    def _wait_for_source(self, r: Replica, exc: SourceFailed, delay: float) -> None:
        if r.resync_waiting is None:
            log.warning("disk %s: the resync of replica %s waits for a current replica to "
                        "read from (%s); tried again in %.2f s", self.rs.disk, r.name, exc, delay)
        r.resync_waiting = str(exc)

    async def _source_read(self, b0: int, n: int) -> memoryview:
        """Blocks [b0, b0+n) from a current replica, verified (BadBlocks if none has them
        right); SourceFailed if none could be read at all."""
        try:
            return await self.rs.read(b0, n, self._fetch(b0, n))
        except BadBlocks:
            raise
        except BlockError as exc:
            raise SourceFailed(exc.errno, exc.message) from exc

    async def _copy(self, r: Replica, b0: int, b1: int) -> None:
        assert self.rs.verifier is not None
        verifier = self.rs.verifier
        want = [b for b in range(b0, b1) if verifier.written(b)]
        if not want:
            return
        lo, hi = want[0], want[-1] + 1
        try:
            ct = await self._source_read(lo, hi - lo)
        except BadBlocks:
            await self._copy_each(r, want)
            return
        for i0, i1 in runs([b - lo for b in want], COPY_BLOCKS):
            await r.link.pwrite(self.rs.layout.data_offset(lo + i0), ct[i0 * BS:i1 * BS])

    async def _copy_each(self, r: Replica, blocks: list[int]) -> None:
        """Block by block, after a range some block of which no current replica could serve.

        A block that verifies on no current replica (its last write lost with an unsynced
        intent record in a power cut, or damaged on every one) has nothing to copy: it reads
        as an integrity error from every replica until the guest writes it again, so it is
        left out rather than keeping `r` from ever joining.
        """
        for b in blocks:
            try:
                ct = await self._source_read(b, 1)
            except BadBlocks:
                log.warning("disk %s: block %d verifies on no current replica; replica %s joins "
                            "without it", self.rs.disk, b, r.name)
                continue
            await r.link.pwrite(self.rs.layout.data_offset(b), ct)

    def _fetch(self, b0: int, n: int) -> Callable[[Backend], Awaitable[memoryview]]:
        """A read attempt for `read`: blocks [b0, b0+n) from one link, verified."""
        assert self.rs.verifier is not None
        verifier = self.rs.verifier

        async def fetch(link: Backend) -> memoryview:
            ct = memoryview(await link.pread(self.rs.layout.data_offset(b0), n * BS))
            if len(ct) != n * BS:
                raise BlockError(errno.EIO, "short read")
            bad = verifier.bad_blocks(b0, ct)
            if bad:
                raise BadBlocks(bad)
            return ct

        return fetch

    async def _recheck(self, r: Replica) -> None:
        """Look at a refused replica again now and then, reading only. It took no writes
        while refused, so whatever it holds now is rebuilt whole: it is let back only as
        blank (or as this disk's, rewritten anyway), never served before that."""
        while not self.rs.closed and r.state is State.FAILED and self.rs.admit is not None:
            await asyncio.sleep(FAILED_RECHECK)
            try:
                link = r.link
                if isinstance(link, Breakable) and link.broken and isinstance(link, Reconnectable):
                    await link.reconnect_once()
                await self._admit_hedged(r, self.rs.admit)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # still refused, or unreachable: stays as it is
                r.last_error = refusal_text(exc, self.rs.name_disk)
                continue
            if r.state is not State.FAILED:
                return
            assert self.rs.verifier is not None
            log.warning("disk %s: replica %s, refused before, is acceptable now: rebuilding it"
                        " whole", self.rs.disk, r.name)
            self._rebuild_whole(r)
            r.state, r.behind_since = State.DEGRADED, self.rs.epoch
            self.rs.regroup()
            self.bring_back(r)
