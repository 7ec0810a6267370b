"""Judging one replica against the trusted anchor, at open or when it comes back.

Nothing here writes to a replica. It reads the replica's superblocks (survey_replica)
and refuses one that is foreign, blank but stale, or ahead of the trusted state;
judge says what is wrong with one that may serve (as events for the caller to
report). Only a replica presenting an older epoch than the anchor has its whole leaf
table compared with the tree (altered_pages): is it stale, or is just its superblock
damaged? A blank-looking one is spot-checked for data before it is formatted.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trustvbd.blockdev import Backend, BlockError, Breakable
from trustvbd.blocks.disk_state import Anchor, TrustedStateError
from trustvbd.blocks.integrity import ForeignReplicaError, StaleReplicaError
from trustvbd.blocks.layer import reader_into
from trustvbd.blocks.tree_file import TreeFile
from trustvbd.crypt import superblock as sbfmt
from trustvbd.crypt.aead import BLOCK_SIZE, LEAF_SIZE
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, SLOT_SIZE, Layout, SlotKind
from trustvbd.crypt.tree import page_hash

if TYPE_CHECKING:
    from trustvbd.blocks.crypt_open import Intents

log = logging.getLogger("trustvbd.blocks.crypt_open")

BS = BLOCK_SIZE
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
                         public_key: bytes, allow_blank: bool = False,
                         rebuilding: bool = False) -> Survey:
    """Read `replica`'s slots; refuse it if it is foreign, ahead of the anchor, or
    (unless `allow_blank`: a mirror can rebuild it) blank-but-stale. With `rebuilding`
    (we were rebuilding it whole: its superblocks come last, at its join), data under
    blank superblocks is our unfinished rebuild, not someone else's: rebuilt again."""
    who = describe(disk, replica_name)
    raw = await read_exact(replica, who, 0, 2 * SLOT_SIZE)
    slots = [sbfmt.parse(raw[i * SLOT_SIZE:(i + 1) * SLOT_SIZE], i, public_key, anchor.disk_id)
             for i in range(2)]
    fresh, presented = await _judge_slots(replica, who, anchor, slots, allow_blank, rebuilding)
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


async def altered_in(replica: Backend, g: Layout, tree: TreeFile, p0: int, p1: int) -> list[int]:
    """Leaf pages in [p0, p1) of the replica that do not hash to the tree's leaves (its
    committed pages: the caller keeps commits out meanwhile), read in one request."""
    data = memoryview(await replica.pread(g.leaf_page_offset(p0), (p1 - p0) * BS))
    if len(data) != (p1 - p0) * BS:
        raise BlockError(errno.EIO, f"returned {len(data)} bytes for leaf pages {p0}-{p1 - 1}")
    return [p for p in range(p0, p1)
            if page_hash(p, data[(p - p0) * BS:(p - p0 + 1) * BS]) != tree.leaf(p)]


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
                       allow_blank: bool, rebuilding: bool = False) -> tuple[bool, int | None]:
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
        if not rebuilding and not await sample_blank(replica, who, Layout(a.logical_size)):
            raise ForeignReplicaError(
                f"{who} holds data but no trustvbd superblock; refusing to format over data that "
                "is not ours (give the disk an empty backing file)")
    elif not any(k in (SlotKind.VALID, SlotKind.DAMAGED) for k in kinds):
        other = next((s for s in slots if s.kind is SlotKind.OTHER_DISK), None)
        if other is not None:
            raise ForeignReplicaError(
                f"{who} holds another trustvbd disk (disk id {other.disk_id.hex()}, this disk is "
                f"{a.disk_id.hex()}); refusing to use or overwrite it: give this disk its own "
                "backing file (check the driver's dir or uri in the config), or, if what that "
                "file holds is not wanted, empty it (truncate -s 0) to have it formatted, or in "
                "a mirror rebuilt, as this disk", other.disk_id)
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
