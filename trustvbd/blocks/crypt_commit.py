"""The commit protocol of an encrypted disk, and the trusted records it keeps.

Every intent record is durable before the ciphertext it explains leaves this domain
(`when_durable`: the intent log's group commit, group_commit.py).

A FLUSH (or FUA write) makes every write completed so far durable. Usually it
does so with the intent log alone: the records are durable (or become so) while the
replicas flush, then a flush mark is appended and made durable the same way. Writes
behind that were not sent yet go with FUA (durable once answered), so the replica
flush for the others need not wait for them (and is not sent at all if there are no
others: reconnect.ReplicaLink.flush); the mark waits for both. A write that a FLUSH
is expected to follow goes with FUA as soon as its record is durable
(write_behind.py).
Recovery rolls the log forward (for each logged block, the newest recorded version
whose ciphertext verifies on a current replica, and never one older than the last
mark's: crypt_open.choose_versions), so a block whose record and ciphertext are
both durable survives a power cut exactly as after a full commit, and a replica
cannot roll it back. A FLUSH makes a full commit instead when the membership
the anchor records would be wrong (a replica degraded or joining since:
recovery must not trust a replica that missed writes), when a write failed
since the last commit, when dirty leaf pages fill half the cache, or once
CHECKPOINT_BLOCKS blocks were logged since it (that bounds the intent log and
what recovery reads back).

A full commit (those FLUSHes, a close, and on our own every AUTO_COMMIT_BLOCKS)
makes every write completed so far durable and authenticated, in this order:

    new page hashes appended to the intent log -> intent log fdatasync -> dirty
    leaf pages (the whole table and the other superblock slot to a replica that
    joins), signed superblock -> replica flush -> dirty maps of replicas not
    current -> trusted anchor with the membership (the commit point) -> changed
    tree nodes to the tree file (no fsync) -> intent log reset, carrying the page
    hashes the tree file has not synced yet

The tree file is synced only every CARRY_MAX changed pages (and at close): until
then the intent log carries those page hashes, so recovery after a power cut
re-hashes at most that many paths (tree_file.TreeFile.redo).

Every step goes to every replica in the write set (replica_set.py); a replica
that fails a step is degraded and the anchor does not list it as current.

The intent log is synced first: once leaf pages may be on a replica, a power
cut before the anchor moves must still find the records that undo them.
One replica flush covers data, leaf pages and superblock: until the anchor
moves, recovery judges the replica against the old anchor and undoes every leaf
the intent log names, so a superblock that landed before its leaf pages only
presents an epoch one ahead, which open accepts and overwrites. (Two flushes, one
before the superblock, cost a driver round trip and an fdatasync per FLUSH.)

Between commits, every leaf change is appended to the intent log (`note_leaves`)
and durable before the ciphertext it describes leaves this process
(`when_durable`), and versions are taken only below the anchor's reserved bound
(`take_versions`). New writes wait
while a commit runs; writes in flight finish first.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from pathlib import Path

from trustvbd.blockdev import BlockError, Buffer, StateWriteFailed
from trustvbd.blocks.block_runs import BlockRuns
from trustvbd.blocks.disk_state import Anchor, DiskState, Member, replica_id
from trustvbd.blocks.group_commit import GroupCommit
from trustvbd.blocks.leaf_pages import LeafPages
from trustvbd.blocks.ranges import runs
from trustvbd.blocks.replica import Replica, State
from trustvbd.blocks.replica_set import ReplicaSet
from trustvbd.blocks.tree_file import TreeFile, TreeFileError
from trustvbd.blocks.write_behind import Ahead
from trustvbd.crypt import superblock as sbfmt
from trustvbd.crypt.aead import BLOCK_SIZE, LEAF_SIZE
from trustvbd.crypt.keys import DiskSecrets
from trustvbd.crypt.sign import fingerprint
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, SLOT_SIZE, Layout
from trustvbd.crypt.tree import TOP_MAX, page_hash

BS = BLOCK_SIZE
# Versions reserved per anchor write: one fsync per 4 GiB written; a restart
# burns what is left of the range.
RESERVE = 1 << 20
# Commit on our own once this many blocks have intents (4 GiB of writes no guest
# flushed; the intent log is then up to 64 MiB): a backstop that bounds the intent
# log and the work recovery does after a crash. Guests flush far more often. It is
# not free: its replica FLUSH forces the writeback of everything written since, and
# new writes wait meanwhile.
AUTO_COMMIT_BLOCKS = 1 << 20
# A FLUSH after this many logged blocks since the last full commit makes one (32 MiB of
# writes: recovery after a power cut reads back at most that much per replica).
CHECKPOINT_BLOCKS = 8192
# Page hashes the intent log carries before the tree file is synced (40 bytes each:
# a reset writes at most 160 KiB; recovery re-hashes at most this many paths).
CARRY_MAX = 4096
# Leaf pages per write when a joining replica gets the whole table.
JOIN_PAGES = 256
# Empty leaf pages per WRITE_ZEROES to a joining replica (1 GiB; NBD lengths are 32 bits).
JOIN_ZERO_PAGES = 1 << 18


class Commits:
    """Anchor, counter reservation, intent log, leaf table and tree of one open disk."""

    def __init__(self, state: DiskState, state_dir: Path, disk: str, anchor: Anchor,
                 secrets: DiskSecrets, leaves: LeafPages, tree: TreeFile,
                 carry: dict[int, bytes]) -> None:
        self._state = state
        # The state directory as its user knows it (the domain may reach it by a /proc/self/fd
        # path): named in errors and in status when it is full.
        self.state_dir = state_dir
        self.disk = disk
        self.anchor = anchor
        self.lay = Layout(anchor.logical_size)
        self._signer = secrets.signer()
        self._fingerprint = fingerprint(secrets.public_key)
        self.leaves = leaves          # the current leaf table (shared with the data path)
        self.tree = tree              # the committed tree
        self.carry = carry            # page hashes the tree file has not synced
        self.intent = state.open_intent()
        self.intent_blocks = 0
        # Versions below the anchor's bound may have been used before a crash.
        self._next_version = anchor.counter_high
        self._counter_high = anchor.counter_high + RESERVE
        # The first version taken after the last full commit (0 until one since open: the
        # log's blocks recovered at open may be older), for written_since_commit.
        self._commit_floor = 0
        self.failed: str | None = None
        self.state_full: str | None = None  # the last state write failed: no space (status)
        self._writers = 0
        self._writers_idle = asyncio.Event()
        self._writers_idle.set()
        self._wake_at = 0  # _writers_idle is also set when this many writers are left
        self._no_commit = asyncio.Event()
        self._no_commit.set()
        # A commit (or FLUSH) waits for the writes in flight: _no_commit is clear. Read once
        # per write, so a plain attribute.
        self.committing = False
        self._lock = asyncio.Lock()
        # intent_blocks when the log and the replicas were last made durable without a
        # full commit (None: not since the last full commit).
        self._logged: int | None = None
        # The intent log's group commit (group_commit.py), and its two entries bound once
        # here (when_durable: asked as ciphertext leaves, per run of writes).
        self.group = GroupCommit(self.intent, self._state_failed, self._room_again)
        self.when_durable = self.group.when_durable
        self.durable = self.group.durable

    @property
    def epoch(self) -> int:
        return self.anchor.epoch

    # ------------------------------------------------------------ between commits

    def written_since_commit(self) -> list[int]:
        """Blocks written since the last full commit (a superset until the first one since
        open): a replica that presents the current epoch may still lack them, because a
        FLUSH between commits syncs only the trusted intent log."""
        return self.leaves.written_since(self._commit_floor)

    def take_versions(self, n: int) -> int:
        """n fresh versions; reserve a new range in the anchor (fsync) before use."""
        v = self._next_version
        if v + n > self._counter_high:
            high = v + n + RESERVE
            anchor = self.anchor.with_counter(high)
            self._write_anchor(anchor, "reserve nonces")
            self.anchor, self._counter_high = anchor, high
        self._next_version = v + n
        return v

    def note_leaves(self, b0: int, old: Buffer, new: Buffer, held: bool = False) -> None:
        """Record a leaf change in the intent log, then in memory; it is made durable
        when its ciphertext is about to leave (`when_durable`). With `held`, the record is
        written by that sync, or by the next `write_held` or other write of the log."""
        try:
            self.intent.append(b0, old, new, held)
        except OSError as exc:
            raise self._state_failed("append to", self.intent.path, exc) from exc
        self.leaves.set(b0, new)
        self.intent_blocks += len(new) // LEAF_SIZE

    def write_window(self) -> tuple[int, int, int]:
        """(the next version, the reserved bound, blocks): the native write plane may take
        versions below the bound without a new reservation (take_versions), and writes of
        fewer blocks than `blocks` together before a commit is due (due_after)."""
        return self._next_version, self._counter_high, AUTO_COMMIT_BLOCKS - self.intent_blocks

    def writes_recorded(self, records: bytes, blocks: int, writes: int,
                        next_version: int) -> None:
        """Writes the native write plane did (crypt_write.writes_taken): versions taken up to
        `next_version`, leaves set in the table, intent records encoded (held, as
        note_leaves(held=True)); each is a writer now, until its write behind ended."""
        self._next_version = next_version
        self.intent.append_encoded(records, held=True)
        self.intent_blocks += blocks
        self._writers += writes
        self._writers_idle.clear()

    def write_held(self) -> None:
        """Write the intent records held back (note_leaves) before their ciphertext leaves."""
        try:
            self.intent.write_held()
        except OSError as exc:
            raise self._state_failed("append to", self.intent.path, exc) from exc

    def set_leaf(self, b: int, leaf: bytes) -> None:
        """Go back to an older leaf of block b (the replicas kept the version from before a
        failed write), recorded as any change: else the log's last record of b names the
        failed write's leaf, and a flush mark after it has recovery take nothing older
        (crypt_open.choose_versions), so b would fail to read after a power cut."""
        self.note_leaves(b, self.leaves.get(b, b + 1), leaf, held=True)

    @property
    def dirty(self) -> bool:
        """Leaf pages changed since the last commit."""
        return self.leaves.dirty_count > 0

    async def enter_write(self) -> None:
        while not self.try_enter_write():
            await self._no_commit.wait()

    def try_enter_write(self) -> bool:
        """enter_write at once if no commit holds writes back (most writes: no coroutine)."""
        if self.committing:
            return False
        self._writers += 1
        self._writers_idle.clear()
        return True

    def leave_write(self) -> None:
        self.leave_writes(1)

    def leave_writes(self, writes: int) -> None:
        """`leave_write` for `writes` writers at once (writes behind that ended together):
        wakes whoever waits if the count reached 0 or passed the mark on its way down."""
        left = self._writers = self._writers - writes
        if left == 0 or left <= self._wake_at < left + writes:
            self._writers_idle.set()

    async def _writers_done(self, ahead: Ahead | None) -> None:
        """Until no write is in flight, but for `ahead`'s: runs a FLUSH sent with FUA are
        durable once answered, so the replica flush need not wait for them (the mark does).
        Once one of them ended, the count no longer tells them apart: wait for all."""
        self._wake_at = ahead.writes if ahead is not None else 0
        try:
            while self._writers and not (ahead is not None and self._writers == ahead.writes
                                         and not ahead.any_ended()):
                self._writers_idle.clear()
                await self._writers_idle.wait()
        finally:
            self._wake_at = 0
            if self._writers:
                self._writers_idle.clear()  # it says "no write in flight"

    def due(self, fua: bool) -> bool:
        return fua or self.intent_blocks >= AUTO_COMMIT_BLOCKS or self.leaves.over_dirty_limit()

    def due_after(self, blocks: int) -> bool:
        """Whether a write of `blocks` blocks may make a commit due (`due`): it then goes
        the way that awaits the commit (its pages may add one dirty page each)."""
        return (self.intent_blocks + blocks >= AUTO_COMMIT_BLOCKS
                or self.leaves.near_dirty_limit(blocks // LEAVES_PER_PAGE + 2))

    # ------------------------------------------------------------ the commit

    async def commit(self, replica: ReplicaSet, before: Callable[[], Awaitable[None]],
                     force: bool = False, may_log: Callable[[], bool] | None = None,
                     send_now: Callable[[bool], Ahead | None] | None = None) -> None:
        """Wait for writes in flight, run `before` (checks, settling doubts), then commit.

        With `may_log` (a FLUSH or FUA write; it says whether no write failed since the
        last commit), the intent log may make the writes durable instead (module doc).
        `send_now` sends writes answered but held back (write_behind.py), so waiting for
        the writers does not wait for a timer; a FLUSH sends them with FUA and flushes
        the replicas while they are in flight (every other write has been answered)."""
        async with self._lock:
            self._no_commit.clear()  # new writes wait; writes in flight finish first
            self.committing = True
            synced: asyncio.Future[None] | None = None
            try:
                ahead = send_now(may_log is not None) if send_now is not None else None
                if may_log is not None and self._logged != self.intent_blocks:
                    synced = self.group.durable_future(report=True)
                await self._writers_done(ahead)
                log_ok = may_log is not None and may_log() and not force
                if log_ok and self._log_suffices(replica):
                    await before()
                    marked = True
                    if self._logged != self.intent_blocks:  # else nothing new since
                        if synced is None:  # records from writes that were in flight
                            synced = self.group.durable_future(report=True)
                        assert may_log is not None
                        marked = await self._sync_log(replica, synced, ahead, may_log)
                    if marked and self._members(replica, []) == self.anchor.members:
                        self._logged = self.intent_blocks
                        return
                    # A write sent with FUA failed (its blocks are in doubt), or a replica
                    # failed the flush (the anchor must stop listing it): commit.
                await self._writers_done(None)
                await before()
                if self.dirty or force or replica.joining():
                    await self._commit_now(replica)
            finally:
                self._no_commit.set()
                self.committing = False
                # A commit syncs the log itself: a sync's failure is seen there, and
                # this one's is only retrieved (else asyncio logs it as never retrieved).
                if synced is not None and synced.done():
                    if not synced.cancelled():
                        synced.exception()
                elif synced is not None:
                    synced.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _log_suffices(self, replica: ReplicaSet) -> bool:
        """Whether the intent log may stand for a full commit now (module doc)."""
        return (self.dirty and self.intent_blocks < CHECKPOINT_BLOCKS
                and not self.leaves.over_dirty_limit() and not replica.joining()
                and self._members(replica, []) == self.anchor.members)

    async def _sync_log(self, replica: ReplicaSet, synced: asyncio.Future[None],
                        ahead: Ahead | None, may_log: Callable[[], bool]) -> bool:
        """The intent log fdatasync'ed (`synced`, on a thread) while the replicas flush and
        the writes `ahead` (sent with FUA) land, then a flush mark appended and the log
        fdatasync'ed again. False, and no mark, if a write ahead failed (`may_log`).

        The records are synced no later than the replicas' data, as a commit does, so a
        power cut inside the FLUSH seldom finds ciphertext that no record explains. The
        mark goes in only once the replicas hold every write before it: recovery takes
        no version older than a marked one (crypt_open.choose_versions), so a mark that
        outlived a FLUSH cut short would cost blocks their older content."""
        try:
            await replica.flush()
        finally:
            await synced
        if ahead is not None:
            await self._writers_done(None)
            if not may_log():
                return False
        try:
            self.intent.mark_flushed()
        except OSError as exc:
            raise self._state_failed("append to", self.intent.path, exc) from exc
        self.group.sync_here()  # the FLUSH's answer waits for this sync alone
        await self.durable(report=True)
        return True

    async def _commit_now(self, replica: ReplicaSet) -> None:
        g, tree, leaves = self.lay, self.tree, self.leaves
        pages = leaves.dirty_pages()
        changes = {p: page_hash(p, leaves.page(p)) for p in pages}
        epoch = self.anchor.epoch + 1
        # The intent records must outlive a power cut before the leaf pages they
        # undo reach the replica: otherwise a cut before the anchor moves leaves
        # pages no trusted record explains, and every block on them is lost. The
        # new page hashes go with them: the tree file gets them only after the anchor.
        if changes:
            try:
                self.intent.append_tree(epoch, changes)
            except OSError as exc:
                raise self._state_failed("append to", self.intent.path, exc) from exc
        await self.durable(report=True)
        joining = replica.joining()
        rounds = {r: r.join_round for r in joining}  # (joining loses those that fail a step)
        for p0, p1 in runs(pages, JOIN_PAGES):
            await replica.pwrite(g.leaf_page_offset(p0), b"".join(leaves.page(p) for p in range(p0, p1)))
        if joining:
            await self._send_table(replica, joining)
            # The other slot as on the current replicas (signed; keeps replicas identical).
            prev = (self.anchor.epoch % sbfmt.SLOTS) * SLOT_SIZE
            await replica.write_to(joining, prev, await replica.pread(prev, SLOT_SIZE))
        try:
            tree.update(changes)
            depth, top = tree.top(TOP_MAX)
        except TreeFileError as exc:  # the trusted tree file is damaged: nothing is committed
            raise BlockError(errno.EIO, str(exc)) from exc
        a = self.anchor
        sb = sbfmt.Superblock(a.disk_id, g.logical_size, epoch, self._counter_high, tree.root,
                              self._fingerprint, depth, top)
        await replica.pwrite((epoch % sbfmt.SLOTS) * SLOT_SIZE, sbfmt.encode(sb, self._signer))
        await replica.flush()  # data, leaf pages and superblock durable before the anchor
        # Only those that took every step of this commit: one degraded meanwhile (a step
        # failed on it) and copied up again before the end is joining still, in a new
        # round; it joins at the next commit, which sends it what this one sent before.
        joined = [r for r in joining
                  if r.state is State.RESYNCING and r.joining and r.join_round == rounds[r]]
        members = self._members(replica, joined)
        anchor = Anchor(a.disk_id, g.logical_size, epoch, self._counter_high, tree.root, members)
        try:
            self._save_dirty_maps(replica)
            self._write_anchor(anchor, f"commit epoch {epoch}")  # the commit point
        except BlockError as exc:
            # The new anchor may or may not have landed, so the intent log's epoch is
            # in doubt: take no more writes until a reopen sorts it out.
            self.failed = f"{exc.message}; reopen the disk"
            raise
        self.anchor = anchor
        self._commit_floor = self._next_version
        leaves.committed(pages)
        self.intent_blocks = 0
        self._logged = None
        replica.commit_done(joined, epoch)
        for r in joined:
            if r.state is State.CURRENT:  # it holds every leaf page now
                r.leaves_behind.clear()
                r.whole_table = False
        try:
            for r in joined:
                self._state.drop_dirty_map(r.name)
            tree.write_back()
            self.carry.update(changes)
            if len(self.carry) > CARRY_MAX:
                tree.sync()
                self.carry.clear()
            self.intent.reset(epoch, self.carry)
        except OSError as exc:
            # Later intents would land in a log recovery ignores: stop taking writes.
            self.failed = (f"disk {self.disk!r}: trusted state write failed after commit "
                           f"{epoch} ({exc}); reopen the disk")
            raise BlockError(errno.EIO, self.failed) from exc

    async def _send_table(self, replica: ReplicaSet, joining: list[Replica]) -> None:
        """The leaf pages replicas that join may hold old: those of the blocks each missed
        (Replica.leaves_behind: O(its map), not O(disk)), or the whole table for one that
        was rebuilt."""
        g = self.lay
        if any(r.whole_table for r in joining):
            spans: list[tuple[int, int]] = [(0, g.leaf_pages)]
        else:
            pages = BlockRuns()
            for r in joining:
                for b0, b1 in r.leaves_behind.runs():
                    pages.add(b0 // LEAVES_PER_PAGE, (b1 - 1) // LEAVES_PER_PAGE + 1)
            spans = list(pages.runs())
        for q0, q1 in spans:
            await self._send_pages(replica, joining, q0, q1)

    async def _send_pages(self, replica: ReplicaSet, joining: list[Replica], q0: int,
                          q1: int) -> None:
        """Leaf pages [q0, q1) to replicas that join: the pages that may hold a written
        leaf a few at a time (checked against the tree as they are loaded), so memory stays
        bounded, and the runs of empty pages between them as zeroes: a sparse disk's
        table is mostly empty, and writing it out page by page would hold guests' writes
        in this commit for as long as the table is big."""
        g, leaves = self.lay, self.leaves
        step = max(1, min(JOIN_PAGES, leaves.capacity // 2))
        sent = q0  # pages of [q0, q1) before this are on the joining replicas
        for r0, r1 in leaves.maybe_written_runs(q0, q1):
            await self._zero_table(replica, joining, sent, r0)
            for p0 in range(r0, r1, step):
                p1 = min(p0 + step, r1)
                held = await leaves.hold(p0 * LEAVES_PER_PAGE, min(p1 * LEAVES_PER_PAGE, g.blocks))
                try:
                    chunk = b"".join(leaves.page(p) for p in range(p0, p1))
                finally:
                    leaves.release(held)
                await replica.write_to(joining, g.leaf_page_offset(p0), chunk)
            sent = r1
        await self._zero_table(replica, joining, sent, q1)

    async def _zero_table(self, replica: ReplicaSet, joining: list[Replica], p0: int,
                          p1: int) -> None:
        """Leaf pages [p0, p1), all empty, to the joining replicas (WRITE_ZEROES)."""
        for q0 in range(p0, p1, JOIN_ZERO_PAGES):
            q1 = min(q0 + JOIN_ZERO_PAGES, p1)
            await replica.zero_to(joining, self.lay.leaf_page_offset(q0), (q1 - q0) * BS)

    def close(self) -> None:
        """An orderly close after the last commit: the tree file is synced and marked clean,
        so the next open trusts it as it is (every node is still checked when loaded)."""
        try:
            if self.failed is None and not self.dirty:
                self.tree.mark_clean(self.anchor.epoch)
                self.carry.clear()
                self.intent.reset(self.anchor.epoch, room=False)
        finally:
            self.tree.close()

    @staticmethod
    def _members(replica: ReplicaSet, joined: list) -> tuple[tuple[bytes, Member], ...]:
        out = []
        for r in replica.replicas:
            if r.state is State.CURRENT or r in joined:
                out.append((replica_id(r.name), Member.CURRENT))
            elif r.state is State.FAILED:
                out.append((replica_id(r.name), Member.REBUILD))
            else:
                out.append((replica_id(r.name), Member.BEHIND))
        return tuple(out)

    def _save_dirty_maps(self, replica: ReplicaSet) -> None:
        """The blocks each replica that is not current lacks, before the anchor says so."""
        for r in replica.replicas:
            if r.state in (State.DEGRADED, State.RESYNCING) and not r.map_saved:
                self.save_dirty_map(r)

    def save_dirty_map(self, r: Replica) -> None:
        """What `r` lacks, to trusted state: its dirty map (runs: O(the map), not O(disk)),
        the blocks written since the full commit before it left, which a new connection to
        its driver may have lost (Replica.since_commit: after a restart every connection is
        new), those whose leaf pages it has not been sent yet, and whether it is being
        rebuilt whole (its superblocks stay blank until it joins: data under them is ours).
        Before each anchor that lists it as behind, and when its rebuild starts."""
        lacks = r.dirty
        if r.since_commit or r.leaves_behind:
            lacks = lacks.copy()
            lacks.update(r.since_commit)
            lacks.update(r.leaves_behind)  # copied, but its leaf pages are not yet
        try:
            self._state.write_dirty_map(r.name, r.behind_since, self.lay.blocks, lacks,
                                        rebuilding=r.whole_table)
        except OSError as exc:
            raise BlockError(errno.EIO, f"disk {self.disk!r}: cannot record what replica "
                             f"{r.name!r} lacks: {exc}") from exc
        r.map_saved = True

    def _write_anchor(self, anchor: Anchor, why: str) -> None:
        try:
            self._state.write_anchor(anchor)
        except OSError as exc:  # nothing changed: the old anchor still stands
            raise self._state_failed(f"{why}: cannot write", self._state.anchor_path,
                                     exc) from exc

    def _room_again(self) -> None:
        self.state_full = None

    def _state_failed(self, what: str, path: Path, exc: OSError) -> StateWriteFailed:
        """A trusted state file could not be written: said as that (not as a replica's
        failure), ENOSPC kept when the state directory is full, and what to do. While it
        is full, `state_full` says so (status)."""
        opened = self._state.state_dir
        where = path.relative_to(opened) if path.is_relative_to(opened) else path
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.state_full = (f"the trusted state directory {self.state_dir} is full "
                               f"({exc.strerror}): free space there; writes fail with ENOSPC "
                               "until then")
            return StateWriteFailed(errno.ENOSPC, f"disk {self.disk!r}: cannot {what} {where} "
                                    f"in the trusted state directory: {self.state_full}")
        return StateWriteFailed(errno.EIO, f"disk {self.disk!r}: cannot {what} {where} in the "
                                f"trusted state directory {self.state_dir}: {exc}")
