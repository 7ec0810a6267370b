"""Opening a disk: judging one replica against the trusted anchor and intent log.

Nothing here writes to a replica. It reads each replica's superblocks and only
the leaf pages the intent log names (the rest are loaded on demand and checked
against the trusted tree: leaf_pages.py), puts those pages in the leaf cache as
recovered, and says what it found wrong (as events for the caller to report).
Only a replica presenting an older epoch than the anchor has its whole leaf
table compared with the tree: is it stale, or is just its superblock damaged?
Raises StaleReplicaError, ForeignReplicaError, TrustedStateError or
IntegrityError when a replica cannot serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from trustvbd.blockdev import Backend, BlockError, Breakable, Watched
from trustvbd.blocks.disk_state import Anchor, DiskState, IntentLog, Member, TrustedStateError
from trustvbd.blocks.integrity import (
    ForeignReplicaError,
    IntegrityError,
    ReplicaRefusedError,
    StaleReplicaError,
)
from trustvbd.blocks.layer import reader_into
from trustvbd.blocks.leaf_pages import LeafPages, read_page
from trustvbd.blocks.ranges import describe_blocks, runs
from trustvbd.blocks.replica import Replica, State, broken_link
from trustvbd.blocks.replica_set import REPLICA_LAG
from trustvbd.blocks.tree_file import TreeFile
from trustvbd.crypt import superblock as sbfmt
from trustvbd.crypt.aead import BLOCK_SIZE, LEAF_SIZE, POISON_LEAF, POISON_VERSION, BlockCipher, leaf_version
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, SLOT_SIZE, Layout, SlotKind
from trustvbd.crypt.tree import page_hash

log = logging.getLogger(__name__)

BS = BLOCK_SIZE
T = TypeVar("T")
# Largest replica read during recovery.
RECOVERY_READ_BLOCKS = 256
# The leaf table is read in pieces of this size, into one buffer (no copies), and
# opening a big disk says how far it got every PROGRESS_EVERY seconds.
TABLE_READ = 32 * 1024 * 1024
PROGRESS_EVERY = 5.0
# A driver's EIO on a small metadata read is tried again this many times in all before
# the replica is judged unreachable: admitting a replica takes ~40 such reads, and a
# driver failing 1 read in 10 would otherwise almost never get back in.
METADATA_READ_ATTEMPTS = 3


class Progress:
    """Log lines for long start-up work: at most one per PROGRESS_EVERY seconds."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self._start = self._last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY and self.total:
            self._last = now
            log.info("%s: %d %% (%.0f s)", self.what, 100 * done // self.total, now - self._start)


@dataclass
class Intents:
    """The intent log read back: each named block's committed leaf (the old leaf of its
    first record) and its uncommitted candidate leaves, oldest first; and the page
    hashes the tree file may lack (redo)."""

    committed: dict[int, bytes] = field(default_factory=dict)
    candidates: dict[int, list[bytes]] = field(default_factory=dict)
    redo: dict[int, bytes] = field(default_factory=dict)
    # Per block, the rank (as in choose_versions) of its newest version written before
    # the last flush mark: a FLUSH promised it, so nothing older may be recovered.
    floor: dict[int, int] = field(default_factory=dict)


def read_intents(log: IntentLog, anchor: Anchor, lay: Layout) -> Intents:
    got = log.read()
    base, records = got.base_epoch, got.records
    if base is not None and base > anchor.epoch:
        raise TrustedStateError(f"{log.path} continues epoch {base}, beyond the anchor's {anchor.epoch}")
    if base != anchor.epoch:
        records = []  # already committed (a crash after the anchor) or empty
    out = Intents()
    for t in got.trees:
        if t.epoch <= anchor.epoch:  # a later one: its commit never reached the anchor
            for p, h in t.hashes.items():
                if p >= lay.leaf_pages:
                    raise TrustedStateError(f"{log.path} names leaf page {p}, past the end")
                out.redo[p] = h
    since_mark: set[int] = set()
    for r in records:
        if not r.new:  # a flush mark
            for b in since_mark:
                out.floor[b] = len(out.candidates[b])
            since_mark.clear()
            continue
        since_mark.update(range(r.first_block, r.first_block + len(r.new) // LEAF_SIZE))
        for i in range(len(r.new) // LEAF_SIZE):
            b = r.first_block + i
            if b >= lay.blocks:
                raise TrustedStateError(f"{log.path} names block {b}, past the end")
            if b not in out.committed:
                out.committed[b] = r.old[i * LEAF_SIZE:(i + 1) * LEAF_SIZE]
            out.candidates.setdefault(b, []).append(r.new[i * LEAF_SIZE:(i + 1) * LEAF_SIZE])
    return out


def check_tree(state: DiskState, tree: TreeFile, anchor: Anchor, intents: Intents) -> None:
    """The tree file as the anchor has it: marked clean with the anchor's root (an orderly
    close), or made so by the page hashes the intent log carries (after a power cut)."""
    clean, _, root = tree.header()
    if clean and root == anchor.root:
        return
    if not tree.redo(intents.redo):
        raise TrustedStateError(
            f"disk {state.name!r}: the trusted tree file {state.tree_path} does not hash to the "
            "anchor's root even after replaying the intent log (damaged, or restored from "
            "another backup than the anchor); restore the trusted state directory")


@dataclass
class Event:
    what: str
    blocks: list[int]
    message: str


def describe(disk: str, replica: str) -> str:
    return f"replica {replica!r} of disk {disk!r}"


async def read_exact(replica: Backend, who: str, offset: int, length: int) -> bytes:
    for attempt in range(1, METADATA_READ_ATTEMPTS + 1):
        try:
            data = await replica.pread(offset, length)
            break
        except BlockError as exc:
            gone = isinstance(replica, Breakable) and replica.broken
            if exc.errno != errno.EIO or gone or attempt == METADATA_READ_ATTEMPTS:
                raise
            log.info("%s: read of [%d, %d) failed (%s); trying again", who, offset,
                     offset + length, exc)
    if len(data) != length:
        raise BlockError(errno.EIO, f"{who} returned {len(data)} bytes for a {length}-byte read "
                         f"at {offset}")
    return bytes(data)


@dataclass
class Survey:
    """A replica's superblock slots as read."""

    who: str
    disk: str
    replica: str
    slots: list[sbfmt.Slot]
    fresh: bool
    presented: int | None  # newest valid epoch shown, or None


async def survey_replica(replica: Backend, disk: str, replica_name: str, anchor: Anchor,
                         public_key: bytes, allow_blank: bool = False) -> Survey:
    """Read `replica`'s slots; refuse it if it is foreign, ahead of the anchor, or
    (unless `allow_blank`: a mirror can rebuild it) blank-but-stale."""
    who = describe(disk, replica_name)
    raw = await read_exact(replica, who, 0, 2 * SLOT_SIZE)
    slots = [sbfmt.parse(raw[i * SLOT_SIZE:(i + 1) * SLOT_SIZE], i, public_key, anchor.disk_id)
             for i in range(2)]
    fresh, presented = await _judge_slots(replica, who, anchor, slots, allow_blank)
    return Survey(who, disk, replica_name, slots, fresh, presented)


async def altered_pages(replica: Backend, survey: Survey, tree: TreeFile, g: Layout,
                        intents: Intents) -> list[int]:
    """Leaf pages of the replica that differ from the trusted tree (uncommitted changes
    undone): the whole table, read in pieces, saying how far it got on a big disk."""
    progress = Progress(f"disk {survey.disk!r}: checking the leaf table of {survey.replica!r}",
                        g.leaf_pages)
    step = TABLE_READ // BS
    bad = []
    read_into = reader_into(replica)
    for q0 in range(0, g.leaf_pages, step):
        progress(q0)
        q1 = min(q0 + step, g.leaf_pages)
        chunk = bytearray((q1 - q0) * BS)
        await read_into(g.leaf_page_offset(q0), memoryview(chunk))
        for b, leaf in intents.committed.items():
            if q0 <= b // LEAVES_PER_PAGE < q1:
                at = (b - q0 * LEAVES_PER_PAGE) * LEAF_SIZE
                chunk[at:at + LEAF_SIZE] = leaf
        for p in range(q0, q1):
            if page_hash(p, memoryview(chunk)[(p - q0) * BS:(p - q0 + 1) * BS]) != tree.leaf(p):
                bad.append(p)
    return bad


def judge(survey: Survey, anchor: Anchor, bad_pages: list[int] | None) -> list[Event]:
    """Events for a replica that may serve; StaleReplicaError if it may not.

    `bad_pages`: the leaf pages that differ from the tree when the whole table was
    compared (a replica presenting an older epoch), else None."""
    who, slots, presented = survey.who, survey.slots, survey.presented
    if survey.fresh:
        return []
    damaged = [(i, s) for i, s in enumerate(slots) if s.kind not in (SlotKind.VALID, SlotKind.BLANK)]
    behind = presented is None or presented < anchor.epoch
    if behind and bad_pages:
        shown = "no valid superblock" if presented is None else f"epoch {presented}"
        raise StaleReplicaError(
            f"{who} is stale: it presents {shown} but the trusted epoch is {anchor.epoch}; it "
            "will not be served (resync it from a current replica)")
    if damaged or behind:
        why = "; ".join(f"slot {i}: {s.reason}" for i, s in damaged)
        return [Event("superblock", [], f"superblock damaged or outdated on {who} (presents epoch "
                      f"{presented}, trusted {anchor.epoch}; {why}); the leaf table is intact and "
                      "the superblock is rewritten")]
    return []


async def _judge_slots(replica: Backend, who: str, a: Anchor, slots: list[sbfmt.Slot],
                       allow_blank: bool) -> tuple[bool, int | None]:
    """Refuse replicas that are blank-but-stale, foreign, or ahead of the anchor.

    Returns (fresh: format it, newest valid epoch presented or None).
    """
    kinds = [s.kind for s in slots]
    fresh = all(k is SlotKind.BLANK for k in kinds)
    if fresh:
        if a.epoch > 0 and not allow_blank:
            raise StaleReplicaError(
                f"{who} is blank (presents epoch 0) but the trusted epoch is {a.epoch}: it was "
                "wiped or replaced; resync it from a current replica")
        if not await sample_blank(replica, who, Layout(a.logical_size)):
            raise ForeignReplicaError(
                f"{who} holds data but no trustvbd superblock; refusing to format over data that "
                "is not ours (give the disk an empty backing file)")
    elif not any(k in (SlotKind.VALID, SlotKind.DAMAGED) for k in kinds):
        other = next((s for s in slots if s.kind is SlotKind.OTHER_DISK), None)
        if other is not None:
            raise ForeignReplicaError(
                f"{who} holds another trustvbd disk (disk id {other.disk_id.hex()}, this disk is "
                f"{a.disk_id.hex()}); refusing to use or overwrite it")
        raise ForeignReplicaError(
            f"{who} holds data that is not a trustvbd disk; refusing to use or overwrite it")
    presented = max((s.superblock.epoch for s in slots if s.superblock is not None), default=None)
    if presented is not None and presented > a.epoch + 1:
        raise TrustedStateError(
            f"{who} presents epoch {presented}, signed by this disk's key, but the trusted anchor "
            f"is at epoch {a.epoch}: the trusted state is older than the replica (restored from "
            "a backup?); restore the current state directory")
    return fresh, presented


async def sample_blank(replica: Backend, who: str, g: Layout) -> bool:
    """Spot-check that a blank-looking replica has no leaves or data where ours go (17
    leaf pages and 17 blocks: reading all of a 16 TiB replica is not an option)."""
    pages = sorted({0, g.leaf_pages - 1, *(i * g.leaf_pages // 16 for i in range(16))})
    for p in pages:
        if (await read_exact(replica, who, g.leaf_page_offset(p), BS)).count(0) != BS:
            return False
    picks = sorted({0, g.blocks - 1, *(i * g.blocks // 16 for i in range(16))})
    for b in picks:
        data = await read_exact(replica, who, g.data_offset(b), BS)
        if data.count(0) != BS:
            return False
    return True


async def choose_versions(replica: Backend, who: str, g: Layout, cipher: BlockCipher,
                          intents: Intents) -> dict[int, int]:
    """For each block written since the last commit, the newest version the intent log
    recorded whose ciphertext on `replica` verifies: its rank, 0 for the committed
    leaf, i+1 for candidate i, -1 if none verifies. Only versions the trusted log
    recorded are ever accepted, and none older than the block's floor (the version a
    FLUSH promised: a replica showing an older one lost it, or replays it)."""
    chosen: dict[int, int] = {}
    need_read = []
    for b, news in intents.candidates.items():
        if leaf_version(news[-1], 0) == 0:
            chosen[b] = len(news)  # zeroed: needs no ciphertext
        else:
            need_read.append(b)
    for b0, b1 in runs(need_read, RECOVERY_READ_BLOCKS):
        data = memoryview(await read_exact(replica, who, g.data_offset(b0), (b1 - b0) * BS))
        for b in range(b0, b1):
            ct = data[(b - b0) * BS:(b - b0 + 1) * BS]
            leaves = [intents.committed[b], *intents.candidates[b]]
            chosen[b] = -1
            for rank in range(len(leaves) - 1, intents.floor.get(b, 0) - 1, -1):
                v = leaf_version(leaves[rank], 0)
                if v == POISON_VERSION:
                    continue
                if v == 0 or not cipher.bad_blocks(b, ct, leaves[rank]):
                    chosen[b] = rank
                    break
    return chosen


def apply_versions(leaves: LeafPages, intents: Intents, chosen: dict[int, int]) -> None:
    """Put each block's chosen leaf in the table (none verified: the one its floor names,
    else the committed one, stays; reads will report it)."""
    for b, rank in chosen.items():
        rank = max(rank, intents.floor.get(b, 0))
        if rank > 0:
            leaves.set(b, intents.candidates[b][rank - 1])


async def load_logged_pages(disk: str, g: Layout, leaves: LeafPages, sources: list[Replica],
                            intents: Intents) -> list[tuple[str, Event]]:
    """The leaf pages the intent log names, with its uncommitted leaves undone, checked
    against the tree; kept as changed (the next commit rewrites them). A page no
    source has right loses its blocks, except those whose committed leaf the log holds."""
    events: list[tuple[str, Event]] = []
    pages = sorted({b // LEAVES_PER_PAGE for b in intents.committed})
    for p in pages:
        want = leaves.tree.leaf(p)
        got: bytearray | None = None
        for r in sources:
            page = await read_page(r.link, g, p)
            for b in g.leaf_page_blocks(p * LEAVES_PER_PAGE):
                leaf = intents.committed.get(b)
                if leaf is not None:
                    at = (b - p * LEAVES_PER_PAGE) * LEAF_SIZE
                    page[at:at + LEAF_SIZE] = leaf
            if page_hash(p, page) == want:
                got = page
                break
            lost = [b for b in g.leaf_page_blocks(p * LEAVES_PER_PAGE) if b not in intents.committed]
            events.append((r.name, Event(
                "leaf table", lost,
                f"leaf page {p} of {describe(disk, r.name)} was altered; blocks "
                f"{describe_blocks(lost)} can no longer be verified and will fail reads until "
                "rewritten (resync from another replica to restore them)")))
        if got is None:
            got = bytearray(POISON_LEAF * LEAVES_PER_PAGE)
            for b in g.leaf_page_blocks(p * LEAVES_PER_PAGE):
                leaf = intents.committed.get(b)
                if leaf is not None:
                    at = (b - p * LEAVES_PER_PAGE) * LEAF_SIZE
                    got[at:at + LEAF_SIZE] = leaf
        leaves.put(p, got, dirty=True)
    return events


async def written_blocks(leaves: LeafPages) -> list[int]:
    """Every block with ciphertext: only pages the tree knows are not empty are read."""
    g = leaves.lay
    out = []
    pages = sorted(set(leaves.tree.nonempty_pages()) | set(leaves.dirty_pages()))
    for p in pages:
        held = await leaves.hold(p * LEAVES_PER_PAGE, min((p + 1) * LEAVES_PER_PAGE, g.blocks))
        try:
            out += [b for b in g.leaf_page_blocks(p * LEAVES_PER_PAGE) if leaves.written(b)]
        finally:
            leaves.release(held)
    return out


async def each_replica(disk: str, replicas: list[Replica], job: Callable[[Replica], Awaitable[T]],
                       lag: float, serves: Callable[[T], bool]
                       ) -> dict[str, T | BaseException]:
    """`job(r)` on every replica at once; each one's result or what it raised.

    Once some replica's result `serves` (it may serve, as the anchor has it), a replica
    whose oldest request has gone `lag` s unanswered is stalled, not slow to judge: its
    connection is dropped (Watched.abandon), which fails its job now, as the request
    timeout would later; it is then degraded like any replica unreachable at open. While
    no replica serves, everyone is waited for (the request timeout decides, as before)."""
    loop = asyncio.get_running_loop()
    tasks = {r.name: asyncio.ensure_future(job(r)) for r in replicas}
    by_task = {t: r for r, t in zip(replicas, tasks.values(), strict=True)}
    out: dict[str, T | BaseException] = {}
    pending = set(tasks.values())
    server: str | None = None
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=None if server is None else lag / 4,
                                               return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                r = by_task[t]
                exc = t.exception()
                out[r.name] = exc if exc is not None else t.result()
                if server is None and exc is None and serves(t.result()):
                    server = r.name
            if server is None:
                continue
            now = loop.time()
            for t in pending:
                link = by_task[t].link
                if not isinstance(link, Watched) or broken_link(link):
                    continue
                since = link.pending_since()
                if since is not None and now - since >= lag:
                    log.warning("disk %s: replica %s lags at open (%.1f s without a reply while "
                                "%s answered): opening without it", disk, by_task[t].name,
                                now - since, server)
                    link.abandon(f"no reply at open for {now - since:.1f} s while replica "
                                 f"{server!r} answered (replica_lag {lag:g} s)")
    finally:
        for t in pending:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
    return out


def _raise_unless(result: T | BaseException, *expected: type[Exception]) -> T:
    """A job's result; raise what it raised unless that is one of `expected` (returned)."""
    if isinstance(result, BaseException) and not isinstance(result, expected):
        raise result
    return result  # type: ignore[return-value]


# ---------------------------------------------------------------- a mirrored disk


@dataclass
class Opened:
    """What each replica is, and what was found wrong; the leaf cache holds the
    recovered pages."""

    replicas: list[Replica]
    events: list[tuple[str, Event]]  # (replica name, event)


async def recover(links: list[tuple[str, Backend]], disk: str, state: DiskState, anchor: Anchor,
                  public_key: bytes, cipher: BlockCipher, leaves: LeafPages,
                  lag: float = REPLICA_LAG) -> Opened:
    """Judge every replica, all at once; leaf pages come from ones the anchor lists as current.

    Replicas the anchor does not list as current, blank ones, and ones that lack a
    recovered block version come back degraded (to be resynced, never served);
    foreign ones failed. A replica that leaves a read unanswered for `lag` s once
    another has shown a current copy is cut off and degraded (each_replica). Raises
    the reason the first replica was refused when no replica may serve (a
    single-replica disk fails exactly as before mirroring).
    """
    g = Layout(anchor.logical_size)
    recorded = anchor.members is not None
    mirrored = len(links) > 1
    refusals: list[Exception] = []
    events: list[tuple[str, Event]] = []
    replicas = [Replica(name, link) for name, link in links]
    rebuild: set[str] = set()
    surveys: dict[str, Survey] = {}
    live = []
    for r in replicas:
        if isinstance(r.link, Breakable) and r.link.broken:  # not reachable at start
            r.state, r.last_error = State.DEGRADED, str(r.link.broken)
        else:
            live.append(r)

    def current_copy(sv: Survey) -> bool:
        """Whether `sv` shows a copy the anchor accepts as current without more reads."""
        if sv.fresh:
            return anchor.epoch == 0
        return bool(sv.presented is not None and sv.presented >= anchor.epoch
                    and (not recorded or anchor.lists_current(sv.replica)))

    surveyed = await each_replica(
        disk, live, lambda r: survey_replica(r.link, disk, r.name, anchor, public_key,
                                             allow_blank=mirrored), lag, current_copy)
    answered = {name: i for i, name in enumerate(surveyed)}  # who answered first
    for r in live:
        got = _raise_unless(surveyed[r.name], ReplicaRefusedError, BlockError)
        if isinstance(got, ReplicaRefusedError):
            r.state, r.last_error = State.FAILED, str(got)
            refusals.append(got)
        elif isinstance(got, BlockError):
            r.state, r.last_error = State.DEGRADED, str(got)
            refusals.append(got)
        else:
            surveys[r.name] = got

    intents = read_intents(state.open_intent(), anchor, g)
    check_tree(state, leaves.tree, anchor, intents)
    serving: list[Replica] = []
    for r in replicas:
        sv = surveys.get(r.name)
        if sv is None:
            continue
        if sv.fresh and anchor.epoch > 0:
            r.state, r.last_error = State.DEGRADED, "blank: rebuilt by a full resync"
            rebuild.add(r.name)
            continue
        if recorded and not anchor.lists_current(r.name) and not sv.fresh:
            r.state, r.last_error = State.DEGRADED, f"behind at epoch {sv.presented}"
            continue
        try:
            behind = not sv.fresh and (sv.presented is None or sv.presented < anchor.epoch)
            bad = await altered_pages(r.link, sv, leaves.tree, g, intents) if behind else None
            events += [(r.name, e) for e in judge(sv, anchor, bad)]
            serving.append(r)
        except (StaleReplicaError, IntegrityError) as exc:
            refusals.append(exc)
            r.state, r.last_error = State.DEGRADED, str(exc)
            rebuild.add(r.name)
            if recorded:  # the anchor says it took epoch E; it shows less
                events.append((r.name, Event("rollback", [], str(exc))))
        except BlockError as exc:
            refusals.append(exc)
            r.state, r.last_error = State.DEGRADED, str(exc)
    if not serving:
        if refusals:
            raise refusals[0]
        listed = [n for n, _ in links if anchor.lists_current(n)]
        raise StaleReplicaError(f"disk {disk!r}: no replica the trusted anchor lists as current "
                                f"({', '.join(listed) or 'none'}) is reachable")
    serving.sort(key=lambda r: answered[r.name])  # pages from the promptest first
    events += await load_logged_pages(disk, g, leaves, serving, intents)

    # Blocks written since the last commit: the newest version any current replica holds.
    current = [r for r in replicas if r.state is State.CURRENT]
    chosen: dict[str, dict[int, int]] = {}
    versions = await each_replica(
        disk, current, lambda r: choose_versions(r.link, describe(disk, r.name), g, cipher,
                                                 intents), lag, lambda _: True)
    for r in current:
        picks = _raise_unless(versions[r.name], BlockError)
        if isinstance(picks, BlockError):
            r.state, r.last_error = State.DEGRADED, str(picks)
            r.dirty.update(intents.candidates)
        else:
            chosen[r.name] = picks
    best: dict[int, int] = {}
    for picks in chosen.values():
        for b, rank in picks.items():
            best[b] = max(best.get(b, -1), rank)
    apply_versions(leaves, intents, best)
    await _even_out(disk, g, cipher, leaves, [r for r in current if r.name in chosen], chosen, best)

    written: list[int] | None = None
    for r in replicas:
        if r.state is State.CURRENT:
            r.behind_since = anchor.epoch
            continue
        stored_map = state.read_dirty_map(r.name, g.blocks)
        sv = surveys.get(r.name)
        if anchor.member(r.name) is Member.CURRENT and r.name not in rebuild:
            r.behind_since = anchor.epoch
        elif (anchor.member(r.name) is Member.BEHIND and stored_map is not None
              and r.name not in rebuild and (sv is None or (sv.presented or 0) >= stored_map[0])):
            r.behind_since = stored_map[0]
            r.dirty.update(stored_map[1])
        else:
            rebuild.add(r.name)
        if r.name in rebuild:
            if written is None:
                leaves.replicas = _Serving(serving)
                written = await written_blocks(leaves)
            r.dirty.update(written)
        r.dirty.update(intents.candidates)  # uncommitted writes it may not have
    return Opened(replicas, events)


class _Serving:
    """Where leaf pages come from before the replica set exists."""

    def __init__(self, current: list[Replica]) -> None:
        self._current = current

    @property
    def current(self) -> list[Replica]:
        return [r for r in self._current if r.state is State.CURRENT]

    def degrade(self, r: Replica, blocks: Iterable[int], why: str) -> None:
        r.state, r.last_error = State.DEGRADED, why


async def _even_out(disk: str, g: Layout, cipher: BlockCipher, leaves: LeafPages,
                    current: list[Replica], chosen: dict[str, dict[int, int]],
                    best: dict[int, int]) -> None:
    """A crash in a write that reached only some replicas: copy each block's chosen
    version to the current replicas that lack it (verified), or degrade them."""
    for r in current:
        lacking = sorted(b for b, rank in chosen[r.name].items() if rank < best[b])
        try:
            for b in lacking:
                source = next(s for s in current if chosen[s.name].get(b) == best[b])
                ct = await read_exact(source.link, describe(disk, source.name), g.data_offset(b), BS)
                if cipher.bad_blocks(b, ct, leaves.leaf(b)):
                    raise BlockError(errno.EIO, f"block {b} changed on replica {source.name!r}")
                await r.link.pwrite(g.data_offset(b), ct)
        except BlockError as exc:
            r.state, r.last_error = State.DEGRADED, f"lacks recent blocks: {exc}"
            r.dirty.update(lacking)
