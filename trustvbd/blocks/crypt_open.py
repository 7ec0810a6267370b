"""Opening a disk: its replicas judged (crypt_survey.py) and recovered from the intent log.

Nothing here writes to a replica. It surveys each replica's superblocks and reads only
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from trustvbd.blockdev import Backend, BlockError, Breakable, Watched
from trustvbd.blocks.crypt_survey import (
    Event,
    Survey,
    altered_pages,
    describe,
    judge,
    read_exact,
    survey_replica,
)
from trustvbd.blocks.disk_state import Anchor, DiskState, Member, TrustedStateError
from trustvbd.blocks.integrity import (
    IntegrityError,
    NameDisk,
    ReplicaRefusedError,
    StaleReplicaError,
    refusal_text,
)
from trustvbd.blocks.intent_log import IntentLog
from trustvbd.blocks.leaf_pages import LeafPages, read_page
from trustvbd.blocks.ranges import describe_blocks, runs
from trustvbd.blocks.replica import Replica, State, broken_link
from trustvbd.blocks.replica_set import REPLICA_LAG
from trustvbd.blocks.tree_file import TreeFile
from trustvbd.crypt.aead import BLOCK_SIZE, LEAF_SIZE, POISON_LEAF, POISON_VERSION, BlockCipher, leaf_version
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, Layout
from trustvbd.crypt.tree import page_hash

log = logging.getLogger(__name__)

BS = BLOCK_SIZE
T = TypeVar("T")
# Largest replica read during recovery.
RECOVERY_READ_BLOCKS = 256


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


def written_ranges(leaves: LeafPages) -> list[tuple[int, int]]:
    """Block ranges [b0, b1), in order, outside which no block is written: those of the
    leaf pages that are resident or that the tree does not know as empty (no page is read)."""
    g = leaves.lay
    return [(p0 * LEAVES_PER_PAGE, min(p1 * LEAVES_PER_PAGE, g.blocks))
            for p0, p1 in leaves.maybe_written_runs(0, g.leaf_pages)]


def first_written(leaves: LeafPages, b0: int, b1: int) -> tuple[int, int] | None:
    """The first range within [b0, b1) that may hold a written block (written_ranges),
    or None: found from the tree, however far ahead, with no page read."""
    lpp = LEAVES_PER_PAGE
    got = next(leaves.maybe_written_runs(b0 // lpp, (b1 - 1) // lpp + 1), None)
    return None if got is None else (max(b0, got[0] * lpp), min(b1, got[1] * lpp))


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
                  lag: float = REPLICA_LAG, name_disk: NameDisk | None = None) -> Opened:
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

    # A replica whose rebuild a restart cut short holds our ciphertext under blank
    # superblocks (they come last, at its join): its map says so, and it is rebuilt again.
    stored = {r.name: state.read_dirty_map(r.name, g.blocks) for r in replicas}
    surveyed = await each_replica(
        disk, live, lambda r: survey_replica(
            r.link, disk, r.name, anchor, public_key, allow_blank=mirrored,
            rebuilding=(m := stored[r.name]) is not None and m.rebuilding), lag, current_copy)
    answered = {name: i for i, name in enumerate(surveyed)}  # who answered first
    for r in live:
        got = _raise_unless(surveyed[r.name], ReplicaRefusedError, BlockError)
        if isinstance(got, ReplicaRefusedError):
            r.state, r.last_error = State.FAILED, refusal_text(got, name_disk)
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

    written: list[tuple[int, int]] | None = None
    for r in replicas:
        if r.state is State.CURRENT:
            r.behind_since = anchor.epoch
            if stored[r.name] is not None:  # left by a crash between its join and the drop
                state.drop_dirty_map(r.name)
            continue
        stored_map = stored[r.name]
        sv = surveys.get(r.name)
        if stored_map is not None and stored_map.rebuilding:
            rebuild.add(r.name)  # cut short: rebuilt again from the start (docs/format.md 2.7)
        if anchor.member(r.name) is Member.CURRENT and r.name not in rebuild:
            r.behind_since = anchor.epoch
        elif (anchor.member(r.name) is Member.BEHIND and stored_map is not None
              and r.name not in rebuild and (sv is None or (sv.presented or 0) >= stored_map.since)):
            r.behind_since = stored_map.since
            r.dirty.update(stored_map.blocks)
        else:
            rebuild.add(r.name)
        if r.name in rebuild:  # it lacks every written block (the resync skips the rest)
            if written is None:
                written = written_ranges(leaves)
            for b0, b1 in written:
                r.dirty.add(b0, b1)
            r.whole_table = True
        r.dirty.update(intents.candidates)  # uncommitted writes it may not have
    return Opened(replicas, events)


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
