"""ReplicaSet: one encrypted disk mirrored over 1..8 untrusted replicas.

A layer in the nbdkit-filter sense: the encryption layer above it writes one
ciphertext and reads one verified range; below it are N replica links, each with
a state (replica.py; docs/dev/crypt-design.md, "Mirroring").

Writes go to every current and resyncing replica before they are acknowledged;
a write that fails on some but not all marks those degraded and succeeds. A
writer that lags (a request unanswered for `lag` seconds while another writer
answers) is cut off, which fails its requests, so it is degraded the same way.
Reads go to one current replica at a time, verified, failing over to the next and
repairing those that failed (replica_reads.py). A write reaches every writer at once
by replica_fanout.py. Degraded and refused replicas are
brought back in the background (replica_recovery.py); scrub is replica_scrub.py.

Only the data area is tracked block by block: a replica that missed leaf pages
or superblocks is rewritten whole by its joining commit.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, cast

from trustvbd.blockdev import (
    BlockError,
    Breakable,
    Buffer,
    Capabilities,
    TellsBreak,
    WritesMayBeLost,
)
from trustvbd.blocks import replica_lag, replica_reads
from trustvbd.blocks.block_runs import BlockRuns
from trustvbd.blocks.integrity import NameDisk
from trustvbd.blocks.ranges import RangeLock
from trustvbd.blocks.read_hedge import ReadHedge
from trustvbd.blocks.replica import (
    Admit,
    Replica,
    State,
    Verifier,
    broken_link,
)
from trustvbd.blocks.replica_fanout import FanOut, Submit, each, pwrites, single_ended
from trustvbd.blocks.replica_recovery import Recovery
from trustvbd.blocks.replica_scrub import scrub
from trustvbd.blocks.write_ring import WriteRing
from trustvbd.crypt.aead import BLOCK_SIZE
from trustvbd.crypt.superblock import Layout
from trustvbd.running_loop import RunningLoop

log = logging.getLogger(__name__)

BS = BLOCK_SIZE
# A writer that leaves a request unanswered this long while another writer answers is
# dropped from the write set (degraded, resynced later) rather than holding the guest's
# writes until its request timeout ([limits] replica_lag).
REPLICA_LAG = 5.0




class ReplicaSet:
    """The replicas of one disk, presented as one Backend (writes) plus verified reads."""

    def __init__(self, disk: str, layout: Layout, replicas: list[Replica]) -> None:
        if not 1 <= len(replicas) <= 8:
            raise ValueError(f"a disk has 1 to 8 replicas, not {len(replicas)}")
        self.disk = disk
        self.replicas = replicas
        self.layout = layout
        self._data_start = layout.data_start  # a computed property of Layout: read per write
        self._size = min(r.link.size for r in replicas)
        caps = [r.link.capabilities for r in replicas]
        self._caps = Capabilities(read_only=any(c.read_only for c in caps),
                                  trim=all(c.trim for c in caps), cache=all(c.cache for c in caps))
        self._next_reader = 0
        self._readers: list[Replica] = []
        self._writers: list[Replica] = []
        self.ring: WriteRing | None = None  # the drivers' ciphertext ring (write_ring.py)
        self._behind: list[Replica] = []
        # Data blocks written since the last flush, as runs: a set of every block cost a
        # few microseconds and ~44 bytes per 4 KiB written between flushes.
        self._unflushed: list[range] = []
        # Blocks discarded since the last full commit: their leaf pages changed with no data
        # sent, so a replica degraded before that commit lacks them (Replica.since_commit).
        self._discarded = BlockRuns()
        self.verifier: Verifier | None = None
        self.admit: Admit | None = None
        self.locks: RangeLock | None = None  # the encryption layer's block locks
        self.on_change: Callable[[], None] | None = None
        self.request_commit: Callable[[], None] | None = None  # a replica is ready to join
        # Stores what a replica lacks now (its dirty map), before its rebuild writes to it.
        self.save_map: Callable[[Replica], None] | None = None
        # (what, replica, blocks, message): integrity events, for the audit log
        self.report: Callable[[str, str, list[int], str], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._running_loop = RunningLoop()
        self.closed = False
        self.lost_unflushed = False  # every current replica reconnected with unflushed writes
        self.epoch = 0  # the last committed epoch
        self.lag = REPLICA_LAG
        self.name_disk: NameDisk | None = None  # names the disk a refused replica holds
        self._watch_timer: asyncio.TimerHandle | None = None
        # reads that _watch hedges once they lag (each has start(now))
        self._hedges: set[ReadHedge[Any]] = set()
        self.recovery = Recovery(self)
        self.regroup()
        if len(replicas) > 1:
            for r in replicas:
                if isinstance(r.link, TellsBreak):
                    r.link.when_broken(functools.partial(self._link_broke, r))

    # ------------------------------------------------------------ membership

    def regroup(self) -> None:
        self._readers = [r for r in self.replicas if r.state is State.CURRENT]
        self._writers = [r for r in self.replicas if r.state in (State.CURRENT, State.RESYNCING)]
        self._behind = [r for r in self.replicas if r.state is State.DEGRADED]
        if self.ring is not None:
            self.ring.writers_changed(frozenset(id(r) for r in self._writers))
        if self.on_change is not None:
            self.on_change()

    @property
    def current(self) -> list[Replica]:
        return list(self._readers)

    @property
    def has_unflushed(self) -> bool:
        """Writes were acknowledged since the last flush (a driver that reconnects may
        have lost them)."""
        return bool(self._unflushed)

    def degrade(self, r: Replica, blocks: Iterable[int], why: str) -> None:
        """`r` missed writes to `blocks` (and perhaps metadata): out of the read and write sets."""
        r.dirty.update(blocks)
        if r.state is not State.DEGRADED:
            # Acknowledged but not flushed: may be lost with it. Once, as it leaves the
            # write set (later writes reach its dirty set by _note_written): each of the
            # many writes in flight that fail with it degrades it again, and adding every
            # unflushed run each time held the event loop for seconds (red team).
            r.dirty.update(self._unflushed_runs())
        r.map_saved = False
        r.last_error = why
        r.errors += 1
        if r.state is State.FAILED:
            return
        if r.state is not State.DEGRADED:
            log.warning("disk %s: replica %s degraded: %s", self.disk, r.name, why)
            if r.state is State.CURRENT:
                r.behind_since = self.epoch
            if self.verifier is not None:
                # If it comes back on a new connection, its driver may have put back a copy
                # from before the last FLUSH, which still presents the epoch it left at
                # (only a full commit moves it): these are copied to it again then.
                r.since_commit = BlockRuns(self.verifier.written_since_commit())
                r.since_commit |= self._discarded
            r.state = State.DEGRADED
            r.joining = False
            self.regroup()
        self.recovery.bring_back(r)

    def _link_broke(self, r: Replica) -> None:
        """r's connection broke with no request needed to see it (its driver restarted or
        hung up): out of the read and write sets now, so `status` says so and it is
        reconnected, admitted and resynced at once, not at the next request. The last
        replica serving is reconnected in place instead, as after a request failing on all."""
        link = r.link
        if self.closed or r.state is not State.CURRENT or not broken_link(link):
            return
        if any(o is not r and o.state is State.CURRENT and not broken_link(o.link)
               for o in self.replicas):
            self.degrade(r, (), f"connection lost: {cast(Breakable, link).broken}")
        else:
            self.recovery.revive(r)

    def leaves_changed(self, blocks: range) -> None:
        """The leaves of `blocks` changed with no data sent (a discard): replicas that are
        behind lack those leaf pages (their joining commit sends them; the stored map
        names the blocks until then)."""
        for r in self._behind:
            r.leaves_behind.update(blocks)
            r.map_saved = False
        self._discarded.add(blocks.start, blocks.stop)

    def fail(self, r: Replica, why: str) -> None:
        log.error("disk %s: replica %s refused: %s", self.disk, r.name, why)
        r.state, r.last_error, r.joining = State.FAILED, why, False
        self.regroup()
        self.recovery.recheck(r)

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
        self._note_written(blocks)
        ring = self.ring
        slot = ring.take(data) if ring is not None and len(writers) > 1 else None
        if slot is not None:
            try:
                await self._ring_write(writers, offset, data, fua, blocks, slot)
            finally:
                WriteRing.give_back(*slot)
            return

        def submit(r: Replica) -> asyncio.Future[list[BlockError | None]] | None:
            submits = r.submits
            return submits.submit_writes([(offset, data)], fua) if submits is not None else None
        await self._all(writers, lambda r: r.link.pwrite(offset, data, fua), lambda: blocks,
                        "write", submit)

    async def _ring_write(self, writers: list[Replica], offset: int, data: Buffer, fua: bool,
                          blocks: range, slot: tuple[Any, int]) -> None:
        """pwrite's fan-out with the ciphertext in a ring slot (write_ring.py): each
        writer whose connection agreed this ring is sent its descriptor; the others, the
        data. Returns once every writer answered or was cut off: the slot is free then."""
        gen, at = slot
        descriptor = [(offset, at.to_bytes(8, "big") + len(data).to_bytes(8, "big"))]  # type: ignore[arg-type]

        def submit(r: Replica) -> asyncio.Future[list[BlockError | None]] | None:
            submits = r.submits
            return (submits.submit_writes(descriptor, fua, ring=gen.id)  # type: ignore[arg-type]
                    if submits is not None else None)
        await self._all(writers, lambda r: r.link.pwrite(offset, data, fua), lambda: blocks,
                        "write", submit)

    def set_ring(self, ring: WriteRing) -> None:
        """Large writes go through `ring` from now on (its links were offered it)."""
        self.ring = ring
        ring.writers_changed(frozenset(id(r) for r in self._writers))

    def submit_runs(self, runs: list[tuple[int, int, Buffer]], fua: bool,
                    ended: Callable[[list[bool]], None]) -> bool:
        """Writes behind's replica writes without a coroutine (write_behind.py), (first data
        block, blocks, ciphertext) each: queued now on each writer's link (Submits), one future per
        writer for all of them, and `ended` told once, when all writers answered, whether
        each one stands; False, with nothing queued, where pwrite must do them.

        One replica: a write that fails is the caller's to send again through pwrite (which
        reconnects a broken connection); a success is reported to the link here. A mirror
        settles its writers' answers for each write as pwrite's fan-out does (_all): those
        that failed while another took it are degraded and the write stands; if all
        failed, broken links are revived and the caller sends it again through pwrite."""
        writers = self._writers
        start = self._data_start
        writes = [(start + b0 * BS, ct) for b0, _, ct in runs]
        if len(self.replicas) == 1:
            if len(writers) != 1 or (submits := writers[0].submits) is None:
                return False
            future = submits.submit_writes(writes, fua, retried=True)
            if future is None:
                return False
            future.add_done_callback(functools.partial(single_ended, submits, ended, len(writes)))
            return True
        if len(writers) < 2 or (first := writers[0].submits) is None:
            return False  # (one writer left: pwrite awaits it alone)
        future = first.submit_writes(writes, fua)
        if future is None:
            return False
        blocks = [range(b0, b0 + n) for b0, n, _ in runs]
        self._note_written(*blocks)
        if self._watch_timer is None:
            self._watch_soon()
        fan = FanOut(self._outcome, writers, blocks, ended)
        future.add_done_callback(functools.partial(fan.answered, writers[0], True))
        for r in writers[1:]:
            submits = r.submits
            later: asyncio.Future[Any] | None = (
                submits.submit_writes(writes, fua) if submits is not None else None)
            submitted = later is not None
            if later is None:  # this one waits for a slot or a reconnect: in a task
                task = self._running_loop().create_task(pwrites(r.link, writes, fua))
                self._tasks.add(cast("asyncio.Task[None]", task))
                task.add_done_callback(self._tasks.discard)
                later = task
            later.add_done_callback(functools.partial(fan.answered, r, submitted))
        return True

    def _note_written(self, *written: range) -> None:
        """Writes to these blocks go to the writers: those behind lack them (their dirty
        sets), and the next flush must cover them."""
        behind, unflushed = self._behind, self._unflushed
        for blocks in written:
            for r in behind:
                r.dirty.update(blocks)
                r.map_saved = False
            if not blocks:
                continue
            if unflushed and unflushed[-1].stop == blocks.start:  # sequential: one run grows
                unflushed[-1] = range(unflushed[-1].start, blocks.stop)
            else:
                unflushed.append(blocks)

    def _unflushed_runs(self) -> BlockRuns:
        """The blocks written since the last flush, added in order (each run appended,
        no array shifted)."""
        return BlockRuns.of_runs(sorted((b.start, b.stop) for b in self._unflushed))

    async def flush(self) -> None:
        unflushed, self._unflushed = self._unflushed, []
        writers = self._writers
        if len(writers) == 1:  # what _all does for one, without its closures (per FLUSH)
            await writers[0].link.flush()
        else:
            await self._all(writers, lambda r: r.link.flush(),
                            lambda: itertools.chain.from_iterable(unflushed), "flush")
        if self.lost_unflushed:
            self.lost_unflushed = False
            raise WritesMayBeLost(errno.EIO, f"disk {self.disk!r}: every current replica lost its "
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
        self.closed = True
        if self.ring is not None:
            self.ring.close()
        for r in self.replicas:  # read-repairs of a window still counting
            if r.repairs_unsaid:
                log.warning("disk %s: repaired %d block(s) of replica %s since the last such "
                            "line", self.disk, r.repairs_unsaid, r.name)
                r.repairs_unsaid = 0
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
                   submit: Submit | None = None) -> None:
        """Run `op` on every target (or `submit` a write, where a link queues it without a
        coroutine); degrade those that fail, unless no current one took it (then raise)."""
        if not targets:
            raise BlockError(errno.EIO, f"disk {self.disk!r}: no replica is current; the {what} "
                             "cannot be stored (see `trustvbd status`)")
        if len(targets) == 1:
            await op(targets[0])
            return
        if self._watch_timer is None:
            self._watch_soon()
        failed = await each(op, targets, self._running_loop, submit)
        if failed and (error := self._outcome(targets, failed, blocks, what)) is not None:
            raise error

    def _outcome(self, targets: list[Replica], failed: list[tuple[Replica, Exception]],
                 blocks: Callable[[], Iterable[int]], what: str) -> Exception | None:
        """A fan-out to `targets` that `failed` on some: None if it stands (those that failed
        are degraded), else the error it fails with (_all, replica_fanout.FanOut)."""
        if len(failed) == len(targets):
            self.recovery.revive_broken(targets)
            return failed[0][1]
        current = [r for r in targets if r.state is State.CURRENT]
        lost = {r for r, _ in failed}
        if all(r in lost for r in current):
            # Only resyncing replicas took it: they cannot serve it, and degrading every
            # current one in their favour would leave the disk with no source at all (it
            # then served nothing until `up` restarted). It fails, as on a single replica;
            # the current ones are reconnected in place, the resyncing ones copy it again.
            written = list(blocks())
            for r in targets:
                if r.state is State.RESYNCING and r not in lost:
                    r.dirty.update(written)
            for r, exc in failed:
                if r.state is State.RESYNCING:
                    self.degrade(r, written, f"{what} failed: {exc}")
            self.recovery.revive_broken(current)
            return next((exc for r, exc in failed if r in current), failed[0][1])
        for r, exc in failed:
            self.degrade(r, blocks(), f"{what} failed: {exc}")
        return None

    # ------------------------------------------------------------ lagging writers

    _watch_soon = replica_lag.watch_soon
    _watch = replica_lag.watch

    # ------------------------------------------------------------ verified reads

    data_offset = replica_reads.data_offset
    read = replica_reads.read
    _order = replica_reads.read_order
    read_on = replica_reads.read_on
    _failed = replica_reads.read_failed
    _hedge_won = replica_reads.hedge_won
    read_after = replica_reads.read_after
    _report = replica_reads.report
    _repair = replica_reads.repair

    # ------------------------------------------------------------ commits

    def joining(self) -> list[Replica]:
        """Replicas that need the whole leaf table in this commit."""
        return [r for r in self._writers if r.joining]

    async def write_to(self, targets: list[Replica], offset: int, data: Buffer) -> None:
        await self._to_joining(targets, lambda r: r.link.pwrite(offset, data))

    async def zero_to(self, targets: list[Replica], offset: int, length: int) -> None:
        """Zeroes that may be holes (no NO_HOLE): a joining replica's empty leaf pages are
        most of a big disk's table (128 GiB at 16 TiB), which a driver must not allocate."""
        await self._to_joining(targets, lambda r: r.link.zero(offset, length, may_trim=True))

    async def _to_joining(self, targets: list[Replica],
                          op: Callable[[Replica], Coroutine[Any, Any, None]]) -> None:
        """A commit's writes to `targets`, the replicas that join in it (the commit's own
        list): one that fails them is not in the write set, so the commit goes on without
        it, never failing the guest's FLUSH. It leaves `targets` (it does not join in this
        commit, even if it is copied up again before the commit ends) and is degraded,
        taken back later, held back longer each time it fails soon after."""
        for r, exc in await each(op, targets, self._running_loop):
            targets.remove(r)
            r.lagged = True  # cut off soon after it was taken back: back-off
            self.degrade(r, (), f"joining failed: {exc}")

    def commit_done(self, joined: list[Replica], epoch: int) -> None:
        """The commit of `epoch` reached the write set: those that joined are current now."""
        self.epoch = epoch
        self._discarded = BlockRuns()  # their leaf pages are on every writer now
        changed = False
        for r in joined:
            if r.state is State.RESYNCING and r.joining and not r.dirty:
                r.state, r.joining = State.CURRENT, False
                changed = True
                log.warning("disk %s: replica %s is current again", self.disk, r.name)
        if changed:
            self.regroup()

    # ------------------------------------------------------------ background work

    def start_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background (recovery), cancelled by close."""
        if self.closed:
            coro.close()
            return
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def scrub(self, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Read every written block of every current replica, verify, repair (replica_scrub.py)."""
        return await scrub(self, progress)

    def status(self) -> list[dict[str, Any]]:
        return [r.status() for r in self.replicas]
