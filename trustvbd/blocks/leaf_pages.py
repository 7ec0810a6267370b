"""The leaf table of an open disk, one 4 KiB leaf page at a time, in a bounded cache.

The leaf table lives on the replicas (docs/format.md 1.1); a page is read from a
current replica when a request first needs it and believed only if it hashes to
the trusted tree's leaf (tree_file.py). A page the tree knows as empty (never
written) is all zeros and needs no read. A page that fails on one replica is read
from the next (that replica is degraded and gets the page again when it joins);
failing on all, its blocks become lost ("poisoned") and fail reads until rewritten,
as at open before (the event names the disk, replica and blocks).

Memory: at most `capacity` pages (default 4096 = 16 MiB, covering 2 GiB of disk at
a time), plus pages pinned by requests in flight. Pages changed since the last
commit stay in memory until the commit writes them (they are never evicted
unwritten); the commit is brought forward when they fill half the cache
(`over_dirty_limit`). Requests pin their pages through `LeafLocks`, the range lock
every request of the encryption layer and the replica set already takes.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import heapq
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from trustvbd._native import LeafTable
from trustvbd.blockdev import Backend, BlockError, Buffer
from trustvbd.blocks.ranges import Hold, RangeLock, describe_blocks
from trustvbd.blocks.replica import Replica
from trustvbd.blocks.tree_file import TreeFile, TreeTamperedError
from trustvbd.crypt.aead import BLOCK_SIZE, LEAF_SIZE, POISON_LEAF, POISON_VERSION
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, Layout
from trustvbd.crypt.tree import EMPTY, page_hash

BS = BLOCK_SIZE
DEFAULT_CAPACITY = 4096  # pages: 16 MiB
_VERSIONS = struct.Struct(f">Q{LEAF_SIZE - 8}x")  # a leaf's version (docs/format.md 1.1)
# (what, replica, blocks, message), as IntegrityEvents.report
Report = Callable[[str, str, list[int], str], None]


class PageSource(Protocol):
    """Where pages are read from: the replica set (or, at open, the replicas judged so far)."""

    @property
    def current(self) -> list[Replica]: ...

    def degrade(self, r: Replica, blocks: Iterable[int], why: str) -> None: ...


class LeafPages:
    """Resident leaf pages: clean ones in LRU order, changed ones until committed. The
    pages themselves live in the native table (`_native.LeafTable`, shared with the
    range lock that pins them); loading and checking them is done here."""

    def __init__(self, disk: str, lay: Layout, tree: TreeFile,
                 capacity: int = DEFAULT_CAPACITY, report: Report | None = None) -> None:
        self.disk, self.lay, self.tree = disk, lay, tree
        self.table = LeafTable(capacity)
        self.capacity = self.table.capacity
        # The table's own methods, no call layer (each is called once per request):
        # get(b0, b1): a copy of the leaves of blocks [b0, b1) (their pages resident);
        # set(b0, leaves): change leaves of resident pages, which then stay in memory
        # until committed.
        self.get: Callable[[int, int], bytes] = self.table.get
        self.set: Callable[[int, Buffer], None] = self.table.set
        self.report = report
        self.replicas: PageSource | None = None
        self._loading: dict[int, asyncio.Future[tuple[bytearray, bool]]] = {}
        self._next_reader = 0
        self.loads = 0      # pages read from a replica

    # ------------------------------------------------------------ residency

    def resident(self) -> int:
        return self.table.resident

    @property
    def evictions(self) -> int:
        return self.table.evictions

    @property
    def dirty_count(self) -> int:
        return self.table.dirty_count

    def over_dirty_limit(self) -> bool:
        return self.table.dirty_count >= self.capacity // 2

    def near_dirty_limit(self, more: int) -> bool:
        """Whether `more` more dirty pages would put it over the limit."""
        return self.table.dirty_count + more >= self.capacity // 2

    def pages_of(self, b0: int, b1: int) -> range:
        return range(b0 // LEAVES_PER_PAGE, (b1 - 1) // LEAVES_PER_PAGE + 1)

    async def hold(self, b0: int, b1: int) -> list[int]:
        """Load and pin the pages of blocks [b0, b1); give the list back to `release`."""
        pinned: list[int] = []
        try:
            for p in self.pages_of(b0, b1):
                await self._pin(p)
                pinned.append(p)
        except BaseException:
            self.release(pinned)
            raise
        return pinned

    def release(self, pages: list[int]) -> None:
        self.table.unpin(pages)

    async def _pin(self, p: int) -> None:
        """Pin page p, loaded first if it is not resident. A page loaded is put in and
        pinned in one step, and only then may the cache evict what is over its bound:
        inserted into a cache whose other pages were all pinned (a request spanning more
        pages than it holds), it was evicted at once and loaded again, forever."""
        while not self.table.contains(p):
            fut = self._loading.get(p)
            if fut is None:
                fut = asyncio.ensure_future(self._load(p))
                self._loading[p] = fut
                fut.add_done_callback(functools.partial(self._loaded, p))
            # A cancelled waiter leaves the load to the others.
            page, poisoned = await asyncio.shield(fut)
            if not self.table.contains(p):  # else put meanwhile (a write's newer copy)
                self.table.put(p, page, poisoned)  # poisoned pages stay until rewritten
                self.table.pin(p)
                self.table.unpin([])  # evict what is over the bound now: never p
                return
        self.table.pin(p)

    def _loaded(self, p: int, fut: asyncio.Future[tuple[bytearray, bool]]) -> None:
        self._loading.pop(p, None)
        if not fut.cancelled():
            fut.exception()  # retrieved: the waiters raise it

    # ------------------------------------------------------------ loading

    def _want(self, p: int) -> bytes:
        try:
            return self.tree.leaf(p)
        except TreeTamperedError as exc:
            if self.report is not None:
                self.report("trusted state", "-", list(exc.blocks), str(exc))
            raise BlockError(errno.EIO, str(exc)) from exc

    async def _load(self, p: int) -> tuple[bytearray, bool]:
        """(page, poisoned): from the first current replica whose copy hashes right."""
        want = self._want(p)
        if want == EMPTY[0]:
            return bytearray(BS), False
        assert self.replicas is not None
        readers = self.replicas.current
        if not readers:
            raise BlockError(errno.EIO, f"disk {self.disk!r}: no current replica to read leaf "
                             f"page {p} from")
        start = self._next_reader % len(readers)
        self._next_reader += 1
        altered: list[Replica] = []
        errors = []
        for i in range(len(readers)):
            r = readers[(start + i) % len(readers)]
            try:
                data = await read_page(r.link, self.lay, p)
            except BlockError as exc:
                errors.append(f"{r.name}: {exc}")
                continue
            self.loads += 1
            if page_hash(p, data) == want:
                for bad in altered:  # its joining commit rewrites this page
                    bad.leaves_behind.update(self.lay.leaf_page_blocks(p * LEAVES_PER_PAGE))
                    self.replicas.degrade(bad, [], f"leaf page {p} altered")
                return data, False
            altered.append(r)
            self._event(r.name, p, len(readers) > 1)
        if not altered:
            raise BlockError(errno.EIO, f"disk {self.disk!r}: no current replica could read leaf "
                             f"page {p}: {'; '.join(errors)}")
        return bytearray(POISON_LEAF * LEAVES_PER_PAGE), True

    def _event(self, replica: str, p: int, others: bool) -> None:
        blocks = list(self.lay.leaf_page_blocks(p * LEAVES_PER_PAGE))
        msg = (f"leaf page {p} of replica {replica!r} of disk {self.disk!r} was altered; blocks "
               f"{describe_blocks(blocks)} " +
               ("are read from another replica" if others else
                "can no longer be verified and will fail reads until rewritten (resync from "
                "another replica to restore them)"))
        if self.report is not None:
            self.report("leaf table", replica, blocks, msg)

    def put(self, p: int, page: Buffer, dirty: bool) -> None:
        """A page recovered at open (checked by the caller)."""
        self.table.put(p, page, dirty)

    def preload(self, p: int, page: Buffer) -> bool:
        """Keep `page` as leaf page p if it is resident already or hashes to the tree's leaf
        (for a caller that has the bytes at hand and cannot await a load)."""
        if self.table.contains(p):
            return True
        if page_hash(p, page) != self._want(p):
            return False
        self.table.insert(p, page, False)
        return True

    # ------------------------------------------------------------ leaves of resident pages

    def leaf(self, b: int) -> bytes:
        return self.table.leaf(b)

    def all_zero(self, b0: int, b1: int) -> bool:
        return self.table.all_zero(b0, b1)

    def written(self, b: int) -> bool:
        """Whether block `b` has ciphertext; a page not resident counts as written unless
        the tree knows it is empty (callers that must know hold the page first)."""
        written = self.table.written(b)
        return self._want(b // LEAVES_PER_PAGE) != EMPTY[0] if written is None else written

    def known_empty(self, b0: int, b1: int) -> bool:
        """Every block of [b0, b1) reads as zeros, known without loading a page."""
        pages = self.pages_of(b0, b1)
        if self.table.any_nonzero_in(pages.start, pages.stop):
            return False
        if b0 % LEAVES_PER_PAGE or (b1 % LEAVES_PER_PAGE and b1 != self.lay.blocks):
            return False  # partial pages: let the caller look at the leaves
        contains = self.table.contains
        return all(contains(p) for p in self.tree.nonempty_pages(pages.start, pages.stop))

    def maybe_written_runs(self, p0: int, p1: int) -> Iterator[tuple[int, int]]:
        """maybe_written as runs [a, b) of pages, in order, found as they are taken: memory
        does not grow with the pages (a written 16 TiB disk has 33 million)."""
        run: list[int] = []
        for p in heapq.merge(self.tree.iter_nonempty_pages(p0, p1), self.table.resident_in(p0, p1)):
            if run and p <= run[1]:
                run[1] = max(run[1], p + 1)
                continue
            if run:
                yield run[0], run[1]
            run = [p, p + 1]
        if run:
            yield run[0], run[1]

    def maybe_written(self, p0: int, p1: int) -> list[int]:
        """The pages of [p0, p1), in order, that may hold a written leaf: resident ones
        and those the tree does not know as empty. Every other page is all zeros."""
        pages = set(self.tree.nonempty_pages(p0, p1))
        pages.update(self.table.resident_in(p0, p1))
        return sorted(pages)

    # ------------------------------------------------------------ commits

    def dirty_pages(self) -> dict[int, int]:
        """The changed pages, each with its change count: pass it back to `committed`."""
        return dict(self.table.dirty_pages())

    def page(self, p: int) -> bytes:
        """A copy of resident page p."""
        return self.table.page(p)

    def written_since(self, version: int) -> list[int]:
        """Blocks whose leaf has a version from `version` on: all in changed pages, which
        stay resident until committed (so: written since the commit that took versions
        below `version`)."""
        out = []
        for p in sorted(p for p, _ in self.table.dirty_pages()):
            base = p * LEAVES_PER_PAGE
            for i, (v,) in enumerate(_VERSIONS.iter_unpack(self.table.page(p))):
                if v >= version and v != 0 and v != POISON_VERSION:
                    out.append(base + i)
        return out

    def committed(self, pages: dict[int, int]) -> None:
        """These pages, as `dirty_pages` gave them, are on the replicas and in the tree now:
        they may be evicted, unless changed since (a read adopting an older leaf during
        the commit): those stay for the next commit."""
        self.table.committed(list(pages.items()))


async def read_page(link: Backend, lay: Layout, p: int) -> bytearray:
    data = await link.pread(lay.leaf_page_offset(p), BS)
    if len(data) != BS:
        raise BlockError(errno.EIO, f"returned {len(data)} bytes for leaf page {p}")
    return bytearray(data)


class LeafLocks(RangeLock):
    """The encryption layer's range lock that also keeps the range's leaf pages in memory
    while it is held: whoever holds blocks (requests, resync, scrub) can read their leaves.
    `try_acquire` takes a hold only if the pages are in memory already (most requests
    need no coroutine for their lock); `acquire` loads them."""

    def __init__(self, leaves: LeafPages) -> None:
        super().__init__(leaves.table)
        self._leaves = leaves
        # A shared hold of [b0, b1) with its leaves, in one native call; None if it cannot
        # be had at once or every leaf is zero (nothing held then). The table's own method
        # (once per guest read: no Python call around it).
        self.try_read: Callable[[int, int], tuple[Hold, bytes] | None] = leaves.table.try_read

    async def acquire(self, start: int, end: int, exclusive: bool) -> Hold:
        hold = await super().acquire(start, end, exclusive)
        try:
            await self._leaves.hold(start, end)
        except BaseException:
            super().release(hold)
            raise
        self._leaves.table.mark_pinned(hold)  # released with the hold
        return hold
