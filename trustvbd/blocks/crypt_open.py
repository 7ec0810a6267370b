"""Opening a disk: judging one replica against the trusted anchor and intent log.

Nothing here writes to a replica or to trusted state; it reads one replica and
says what the trusted leaf table is, which leaf pages must be rewritten, and
what it found wrong (as events for the caller to report). So it can run on each
replica of a mirrored disk in turn. Raises StaleReplicaError,
ForeignReplicaError, TrustedStateError or IntegrityError when a replica cannot
serve.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from trustvbd.blockdev import Backend, BlockError, Breakable
from trustvbd.blocks.disk_state import Anchor, DiskState, IntentLog, Member, TrustedStateError
from trustvbd.blocks.integrity import (
    ForeignReplicaError,
    IntegrityError,
    ReplicaRefusedError,
    StaleReplicaError,
)
from trustvbd.blocks.layer import reader_into
from trustvbd.blocks.ranges import describe_blocks, runs
from trustvbd.blocks.replica_set import Replica, State
from trustvbd.crypt import superblock as sbfmt
from trustvbd.crypt.aead import BLOCK_SIZE, LEAF_SIZE, POISON_LEAF, POISON_VERSION, BlockCipher, leaf_version
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, SLOT_SIZE, Layout, SlotKind
from trustvbd.crypt.tree import HASH_SIZE, page_hash, root_from_level

log = logging.getLogger(__name__)

BS = BLOCK_SIZE
# Largest replica read during recovery.
RECOVERY_READ_BLOCKS = 256
# The leaf table is read in pieces of this size, into one buffer (no copies), and
# opening a big disk says how far it got every PROGRESS_EVERY seconds.
TABLE_READ = 32 * 1024 * 1024
PROGRESS_EVERY = 5.0


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


def page_hashes(table: bytes | bytearray | memoryview, pages: int, progress: Progress) -> bytes:
    """Tree level 0 of a leaf table, saying how far it got on a big disk."""
    def hashes() -> Iterator[bytes]:
        for p in range(pages):
            if p % 4096 == 0:
                progress(p)
            yield page_hash(p, table[p * BS:(p + 1) * BS])
    return b"".join(hashes())


@dataclass
class Intents:
    """The intent log read back: each named block's committed leaf (the old leaf of its
    first record) and its uncommitted candidate leaves, oldest first."""

    committed: dict[int, bytes] = field(default_factory=dict)
    candidates: dict[int, list[bytes]] = field(default_factory=dict)


def read_intents(log: IntentLog, anchor: Anchor, lay: Layout) -> Intents:
    base, records = log.read()
    if base is not None and base > anchor.epoch:
        raise TrustedStateError(f"{log.path} continues epoch {base}, beyond the anchor's {anchor.epoch}")
    if base != anchor.epoch:
        records = []  # already committed (a crash after the anchor) or empty
    out = Intents()
    for r in records:
        for i in range(len(r.new) // LEAF_SIZE):
            b = r.first_block + i
            if b >= lay.blocks:
                raise TrustedStateError(f"{log.path} names block {b}, past the end")
            if b not in out.committed:
                out.committed[b] = r.old[i * LEAF_SIZE:(i + 1) * LEAF_SIZE]
            out.candidates.setdefault(b, []).append(r.new[i * LEAF_SIZE:(i + 1) * LEAF_SIZE])
    return out


@dataclass
class Event:
    what: str
    blocks: list[int]
    message: str


@dataclass
class Verdict:
    """What one replica says, once checked: its leaf table as the trusted state allows it."""

    fresh: bool            # all blank: format it (trusted epoch 0 only)
    table: bytearray       # the committed leaf table (uncommitted changes undone)
    hashes: bytes          # tree level 0 to start from (committed page hashes)
    dirty_pages: set[int]  # leaf pages to rewrite at the next commit
    events: list[Event] = field(default_factory=list)


def describe(disk: str, replica: str) -> str:
    return f"replica {replica!r} of disk {disk!r}"


async def read_exact(replica: Backend, who: str, offset: int, length: int) -> bytes:
    data = await replica.pread(offset, length)
    if len(data) != length:
        raise BlockError(errno.EIO, f"{who} returned {len(data)} bytes for a {length}-byte read "
                         f"at {offset}")
    return bytes(data)


@dataclass
class Survey:
    """A replica's superblock slots and leaf table as read, before the intent log is applied."""

    who: str
    disk: str
    replica: str
    slots: list[sbfmt.Slot]
    table: bytearray
    fresh: bool
    presented: int | None  # newest valid epoch shown, or None


async def survey_replica(replica: Backend, disk: str, replica_name: str, anchor: Anchor,
                         public_key: bytes, allow_blank: bool = False) -> Survey:
    """Read `replica`'s slots and leaf table; refuse it if it is foreign, ahead of the
    anchor, or (unless `allow_blank`: a mirror can rebuild it) blank-but-stale."""
    g = Layout(anchor.logical_size)
    who = describe(disk, replica_name)
    raw = await read_exact(replica, who, 0, 2 * SLOT_SIZE)
    slots = [sbfmt.parse(raw[i * SLOT_SIZE:(i + 1) * SLOT_SIZE], i, public_key, anchor.disk_id)
             for i in range(2)]
    table = bytearray(g.leaf_table_size)
    view, read_into = memoryview(table), reader_into(replica)
    progress = Progress(f"disk {disk!r}: reading the leaf table from {replica_name!r}", len(table))
    for at in range(0, len(table), TABLE_READ):
        progress(at)
        await read_into(g.leaf_start + at, view[at:at + TABLE_READ])
    fresh, presented = await _judge_slots(replica, who, anchor, slots, table, allow_blank)
    return Survey(who, disk, replica_name, slots, table, fresh, presented)


def judge_table(survey: Survey, anchor: Anchor, intents: Intents,
                stored_pages: bytes | None) -> Verdict:
    """The trusted leaf table from a surveyed replica, or StaleReplicaError/IntegrityError.

    `stored_pages`: the trusted committed page hashes if they match the anchor's
    root, else None (then damage cannot be confined to some pages). The verdict
    takes the survey's table over (no copy: a big disk's table is big).
    """
    g = Layout(anchor.logical_size)
    who, slots, presented = survey.who, survey.slots, survey.presented
    table = survey.table
    for b, leaf in intents.committed.items():  # undo what was not committed
        table[b * LEAF_SIZE:(b + 1) * LEAF_SIZE] = leaf

    hashes = page_hashes(table, g.leaf_pages, Progress(f"disk {survey.disk!r}: checking the leaf "
                                                       f"table of {survey.replica!r}", g.leaf_pages))
    dirty = {b // LEAVES_PER_PAGE for b in intents.committed}
    verdict = Verdict(survey.fresh, table, hashes, dirty)
    # The stored hashes already match the anchor's root: equal hashes need no second tree.
    if hashes == stored_pages or root_from_level(hashes, 0) == anchor.root:
        damaged = [(i, s) for i, s in enumerate(slots) if s.kind not in (SlotKind.VALID, SlotKind.BLANK)]
        if not survey.fresh and (damaged or presented is None or presented < anchor.epoch):
            why = "; ".join(f"slot {i}: {s.reason}" for i, s in damaged)
            verdict.events.append(Event(
                "superblock", [], f"superblock damaged or outdated on {who} (presents epoch "
                f"{presented}, trusted {anchor.epoch}; {why}); the leaf table is intact and the "
                "superblock is rewritten"))
    elif presented is None or presented < anchor.epoch:
        shown = "no valid superblock" if presented is None else f"epoch {presented}"
        raise StaleReplicaError(
            f"{who} is stale: it presents {shown} but the trusted epoch is {anchor.epoch}; it "
            "will not be served (resync it from a current replica)")
    elif stored_pages is None:
        raise IntegrityError(
            f"the leaf table of {who} does not match the trusted root, and the trusted page "
            "hashes needed to confine the damage are missing; refusing to serve this replica",
            disk=survey.disk, replica=survey.replica)
    else:
        bad_pages, lost = _confine_damage(g, table, hashes, stored_pages, intents.committed)
        verdict.dirty_pages.update(bad_pages)
        verdict.hashes = stored_pages  # the tree holds the committed pages until the next commit
        verdict.events.append(Event(
            "leaf table", lost,
            f"leaf pages {describe_blocks(bad_pages)} of {who} were altered; blocks "
            f"{describe_blocks(lost)} can no longer be verified and will fail reads until "
            "rewritten (resync from another replica to restore them)"))
    return verdict


async def _judge_slots(replica: Backend, who: str, a: Anchor, slots: list[sbfmt.Slot],
                       table: bytearray, allow_blank: bool) -> tuple[bool, int | None]:
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
        if table.count(0) != len(table) or not await data_sample_blank(replica, who, Layout(a.logical_size)):
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


def _confine_damage(g: Layout, table: bytearray, hashes: bytes, stored: bytes,
                    committed: dict[int, bytes]) -> tuple[list[int], list[int]]:
    """Leaf pages the replica altered (per the trusted page hashes): their blocks are
    marked lost, except those whose committed leaf the intent log still holds.
    Returns (bad pages, lost blocks)."""
    bad_pages = [p for p in range(g.leaf_pages)
                 if hashes[p * HASH_SIZE:(p + 1) * HASH_SIZE] != stored[p * HASH_SIZE:(p + 1) * HASH_SIZE]]
    lost = []
    for p in bad_pages:
        table[p * BS:(p + 1) * BS] = bytes(BS)
        for b in g.leaf_page_blocks(p * LEAVES_PER_PAGE):
            if b in committed:
                table[b * LEAF_SIZE:(b + 1) * LEAF_SIZE] = committed[b]
            else:
                table[b * LEAF_SIZE:(b + 1) * LEAF_SIZE] = POISON_LEAF
                lost.append(b)
    return bad_pages, lost


async def data_sample_blank(replica: Backend, who: str, g: Layout) -> bool:
    """Spot-check that a blank-looking replica has no data where blocks go."""
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
    recorded are ever accepted."""
    scratch = memoryview(bytearray(BS))
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
            for rank in range(len(leaves) - 1, -1, -1):
                v = leaf_version(leaves[rank], 0)
                if v == POISON_VERSION:
                    continue
                if v == 0 or not cipher.decrypt(b, ct, memoryview(leaves[rank]), scratch):
                    chosen[b] = rank
                    break
    return chosen


def apply_versions(leaves: bytearray, intents: Intents, chosen: dict[int, int]) -> None:
    """Put each block's chosen leaf in the table (none verified: the committed one stays;
    reads will report it)."""
    for b, rank in chosen.items():
        if rank > 0:
            leaves[b * LEAF_SIZE:(b + 1) * LEAF_SIZE] = intents.candidates[b][rank - 1]


# ---------------------------------------------------------------- a mirrored disk


@dataclass
class Opened:
    """The trusted leaf table recovered from the replicas, and what each replica is."""

    leaves: bytearray
    hashes: bytes
    dirty_pages: set[int]
    replicas: list[Replica]
    events: list[tuple[str, Event]]  # (replica name, event)


async def recover(links: list[tuple[str, Backend]], disk: str, state: DiskState, anchor: Anchor,
                  public_key: bytes, cipher: BlockCipher, stored_pages: bytes | None) -> Opened:
    """Judge every replica; the table comes from one the anchor lists as current.

    Replicas the anchor does not list as current, blank ones, and ones that lack a
    recovered block version come back degraded (to be resynced, never served);
    foreign ones failed. Raises the reason the first replica was refused when no
    replica may serve (a single-replica disk fails exactly as before mirroring).
    """
    g = Layout(anchor.logical_size)
    recorded = anchor.members is not None
    mirrored = len(links) > 1
    refusals: list[Exception] = []
    events: list[tuple[str, Event]] = []
    replicas = [Replica(name, link) for name, link in links]
    rebuild: set[str] = set()
    surveys: dict[str, Survey] = {}
    for r in replicas:
        if isinstance(r.link, Breakable) and r.link.broken:  # not reachable at start
            r.state, r.last_error = State.DEGRADED, str(r.link.broken)
            continue
        try:
            surveys[r.name] = await survey_replica(r.link, disk, r.name, anchor, public_key,
                                                   allow_blank=mirrored)
        except ReplicaRefusedError as exc:
            r.state, r.last_error = State.FAILED, str(exc)
            refusals.append(exc)
        except BlockError as exc:
            r.state, r.last_error = State.DEGRADED, str(exc)
            refusals.append(exc)

    intents = read_intents(state.open_intent(), anchor, g)
    verdicts: dict[str, Verdict] = {}
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
            verdicts[r.name] = judge_table(sv, anchor, intents, stored_pages)
        except (StaleReplicaError, IntegrityError) as exc:
            refusals.append(exc)
            r.state, r.last_error = State.DEGRADED, str(exc)
            rebuild.add(r.name)
            if recorded:  # the anchor says it took epoch E; it shows less
                events.append((r.name, Event("rollback", [], str(exc))))
    exact = [n for n, v in verdicts.items() if not any(e.what == "leaf table" for e in v.events)]
    if not verdicts:
        if refusals:
            raise refusals[0]
        listed = [n for n, _ in links if anchor.lists_current(n)]
        raise StaleReplicaError(f"disk {disk!r}: no replica the trusted anchor lists as current "
                                f"({', '.join(listed) or 'none'}) is reachable")
    source = verdicts[exact[0] if exact else next(iter(verdicts))]
    for r in replicas:
        v = verdicts.get(r.name)
        if v is None:
            continue
        events += [(r.name, e) for e in v.events]
        if exact and r.name not in exact:  # its leaf pages were altered: rewrite them all
            r.state, r.last_error = State.DEGRADED, "leaf table altered"
    leaves = bytearray(source.table)

    # Blocks written since the last commit: the newest version any current replica holds.
    current = [r for r in replicas if r.state is State.CURRENT]
    chosen: dict[str, dict[int, int]] = {}
    for r in current:
        try:
            chosen[r.name] = await choose_versions(r.link, describe(disk, r.name), g, cipher, intents)
        except BlockError as exc:
            r.state, r.last_error = State.DEGRADED, str(exc)
            r.dirty.update(intents.candidates)
    best: dict[int, int] = {}
    for picks in chosen.values():
        for b, rank in picks.items():
            best[b] = max(best.get(b, -1), rank)
    apply_versions(leaves, intents, best)
    await _even_out(disk, g, cipher, leaves, [r for r in current if r.name in chosen], chosen, best)

    written = [b for b in range(g.blocks) if leaves[b * LEAF_SIZE:(b + 1) * LEAF_SIZE].count(0) != LEAF_SIZE]
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
            r.dirty.update(written)
        r.dirty.update(intents.candidates)  # uncommitted writes it may not have
    return Opened(leaves, source.hashes, source.dirty_pages, replicas, events)


async def _even_out(disk: str, g: Layout, cipher: BlockCipher, leaves: bytearray,
                    current: list[Replica], chosen: dict[str, dict[int, int]],
                    best: dict[int, int]) -> None:
    """A crash in a write that reached only some replicas: copy each block's chosen
    version to the current replicas that lack it (verified), or degrade them."""
    scratch = memoryview(bytearray(BS))
    for r in current:
        lacking = sorted(b for b, rank in chosen[r.name].items() if rank < best[b])
        try:
            for b in lacking:
                source = next(s for s in current if chosen[s.name].get(b) == best[b])
                ct = await read_exact(source.link, describe(disk, source.name), g.data_offset(b), BS)
                leaf = memoryview(leaves)[b * LEAF_SIZE:(b + 1) * LEAF_SIZE]
                if cipher.decrypt(b, memoryview(ct), leaf, scratch):
                    raise BlockError(errno.EIO, f"block {b} changed on replica {source.name!r}")
                await r.link.pwrite(g.data_offset(b), ct)
        except BlockError as exc:
            r.state, r.last_error = State.DEGRADED, f"lacks recent blocks: {exc}"
            r.dirty.update(lacking)

