"""The leaf table of an open disk, one 4 KiB leaf page at a time, in a bounded cache.

The leaf table lives on the replicas (docs/format.md 1.1); a page is read from a
current replica when a request first needs it and believed only if it hashes to
the trusted tree's leaf (tree_file.py). A page the tree knows as empty (never
written) is all zeros and needs no read. A page that fails on one replica is read
from the next (that replica is degraded and gets the whole table when it joins);
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
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from trustvbd.blockdev import Backend, BlockError
from trustvbd.blocks.ranges import Hold, RangeLock, describe_blocks
from trustvbd.blocks.replica import Replica
from trustvbd.blocks.tree_file import TreeFile, TreeTamperedError
from trustvbd.crypt.aead import BLOCK_SIZE, LEAF_SIZE, POISON_LEAF, POISON_VERSION
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, Layout
from trustvbd.crypt.tree import EMPTY, page_hash

BS = BLOCK_SIZE
DEFAULT_CAPACITY = 4096  # pages: 16 MiB
# (what, replica, blocks, message), as IntegrityEvents.report
Report = Callable[[str, str, list[int], str], None]


class PageSource(Protocol):
    """Where pages are read from: the replica set (or, at open, the replicas judged so far)."""

    @property
    def current(self) -> list[Replica]: ...

    def degrade(self, r: Replica, blocks: Iterable[int], why: str) -> None: ...


class LeafPages:
    """Resident leaf pages: clean ones in LRU order, changed ones until committed."""

    def __init__(self, disk: str, lay: Layout, tree: TreeFile,
                 capacity: int = DEFAULT_CAPACITY, report: Report | None = None) -> None:
        self.disk, self.lay, self.tree = disk, lay, tree
        self.capacity = max(capacity, 2)
        self.report = report
        self.replicas: PageSource | None = None
        self._clean: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: dict[int, bytearray] = {}
        self._pins: dict[int, int] = {}
        self._changes: dict[int, int] = {}  # per changed page: how many times, since it was clean
        self._loading: dict[int, asyncio.Future[None]] = {}
        self._next_reader = 0
        self.loads = 0      # pages read from a replica
        self.evictions = 0

    # ------------------------------------------------------------ residency

    def resident(self) -> int:
        return len(self._clean) + len(self._dirty)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def over_dirty_limit(self) -> bool:
        return len(self._dirty) >= self.capacity // 2

    def pages_of(self, b0: int, b1: int) -> range:
        return range(b0 // LEAVES_PER_PAGE, (b1 - 1) // LEAVES_PER_PAGE + 1)

    async def hold(self, b0: int, b1: int) -> list[int]:
        """Load and pin the pages of blocks [b0, b1); give the list back to `release`."""
        pinned: list[int] = []
        try:
            for p in self.pages_of(b0, b1):
                await self._ensure(p)
                self._pins[p] = self._pins.get(p, 0) + 1
                pinned.append(p)
        except BaseException:
            self.release(pinned)
            raise
        return pinned

    def hold_resident(self, b0: int, b1: int) -> list[int] | None:
        """Like `hold` without waiting: None (nothing pinned) if a page is not in memory."""
        pages = self.pages_of(b0, b1)
        dirty, clean = self._dirty, self._clean
        for p in pages:
            if p not in dirty and p not in clean:
                return None
        pinned = list(pages)
        for p in pinned:
            if p in clean:
                clean.move_to_end(p)
            self._pins[p] = self._pins.get(p, 0) + 1
        return pinned

    def release(self, pages: list[int]) -> None:
        for p in pages:
            n = self._pins[p] - 1
            if n:
                self._pins[p] = n
            else:
                del self._pins[p]
        self._evict()

    async def _ensure(self, p: int) -> None:
        while True:
            if p in self._dirty:
                return
            if p in self._clean:
                self._clean.move_to_end(p)
                return
            fut = self._loading.get(p)
            if fut is None:
                fut = asyncio.ensure_future(self._load_into(p))
                self._loading[p] = fut
                fut.add_done_callback(functools.partial(self._loaded, p))
            await asyncio.shield(fut)  # a cancelled waiter leaves the load to the others

    def _loaded(self, p: int, fut: asyncio.Future[None]) -> None:
        self._loading.pop(p, None)
        if not fut.cancelled():
            fut.exception()  # retrieved: the waiters raise it

    async def _load_into(self, p: int) -> None:
        page, poisoned = await self._load(p)
        if p in self._clean or p in self._dirty:
            return
        if poisoned:
            self._dirty[p] = page
        else:
            self._clean[p] = page
            self._evict()

    def _evict(self) -> None:
        over = len(self._clean) + len(self._dirty) - self.capacity
        tries = len(self._clean)
        while over > 0 and tries > 0:
            p = next(iter(self._clean))
            tries -= 1
            if self._pins.get(p):
                self._clean.move_to_end(p)
                continue
            del self._clean[p]
            self.evictions += 1
            over -= 1

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
                for bad in altered:
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

    def put(self, p: int, page: bytearray, dirty: bool) -> None:
        """A page recovered at open (checked by the caller)."""
        self._clean.pop(p, None)
        if dirty:
            self._dirty[p] = page
        else:
            self._clean[p] = page

    def preload(self, p: int, page: bytes | bytearray) -> bool:
        """Keep `page` as leaf page p if it is resident already or hashes to the tree's leaf
        (for a caller that has the bytes at hand and cannot await a load)."""
        if p in self._dirty or p in self._clean:
            return True
        if page_hash(p, page) != self._want(p):
            return False
        self._clean[p] = bytearray(page)
        self._evict()
        return True

    # ------------------------------------------------------------ leaves of resident pages

    def _page(self, p: int) -> bytearray:
        page = self._dirty.get(p)
        return page if page is not None else self._clean[p]

    def get(self, b0: int, b1: int) -> bytearray:
        """A copy of the leaves of blocks [b0, b1) (their pages resident)."""
        p = b0 // LEAVES_PER_PAGE
        if b1 <= (p + 1) * LEAVES_PER_PAGE:  # one page, as nearly every request: one copy
            lo = (b0 - p * LEAVES_PER_PAGE) * LEAF_SIZE
            return self._page(p)[lo:lo + (b1 - b0) * LEAF_SIZE]
        out = bytearray((b1 - b0) * LEAF_SIZE)
        b = b0
        while b < b1:
            p = b // LEAVES_PER_PAGE
            end = min(b1, (p + 1) * LEAVES_PER_PAGE)
            lo = (b - p * LEAVES_PER_PAGE) * LEAF_SIZE
            out[(b - b0) * LEAF_SIZE:(end - b0) * LEAF_SIZE] = \
                self._page(p)[lo:lo + (end - b) * LEAF_SIZE]
            b = end
        return out

    def leaf(self, b: int) -> memoryview:
        p = b // LEAVES_PER_PAGE
        lo = (b - p * LEAVES_PER_PAGE) * LEAF_SIZE
        return memoryview(self._page(p))[lo:lo + LEAF_SIZE]

    def set(self, b0: int, leaves: bytes | bytearray | memoryview) -> None:
        """Change leaves of resident pages; their pages stay in memory until committed."""
        b1 = b0 + len(leaves) // LEAF_SIZE
        b = b0
        while b < b1:
            p = b // LEAVES_PER_PAGE
            end = min(b1, (p + 1) * LEAVES_PER_PAGE)
            page = self._dirty.get(p)
            if page is None:
                page = self._dirty[p] = self._clean.pop(p)
            self._changes[p] = self._changes.get(p, 0) + 1
            lo = (b - p * LEAVES_PER_PAGE) * LEAF_SIZE
            page[lo:lo + (end - b) * LEAF_SIZE] = leaves[(b - b0) * LEAF_SIZE:(end - b0) * LEAF_SIZE]
            b = end

    def all_zero(self, b0: int, b1: int) -> bool:
        b = b0
        while b < b1:
            p = b // LEAVES_PER_PAGE
            end = min(b1, (p + 1) * LEAVES_PER_PAGE)
            lo = (b - p * LEAVES_PER_PAGE) * LEAF_SIZE
            hi = lo + (end - b) * LEAF_SIZE
            if self._page(p).count(0, lo, hi) != hi - lo:
                return False
            b = end
        return True

    def written(self, b: int) -> bool:
        """Whether block `b` has ciphertext; a page not resident counts as written unless
        the tree knows it is empty (callers that must know hold the page first)."""
        p = b // LEAVES_PER_PAGE
        page = self._dirty.get(p)
        if page is None:
            page = self._clean.get(p)
        if page is None:
            return self._want(p) != EMPTY[0]
        v = int.from_bytes(page[(b % LEAVES_PER_PAGE) * LEAF_SIZE:][:8], "big")
        return v != 0 and v != POISON_VERSION

    def known_empty(self, b0: int, b1: int) -> bool:
        """Every block of [b0, b1) reads as zeros, known without loading a page."""
        pages = self.pages_of(b0, b1)
        for p in (pages if len(pages) <= self.resident() else
                  [q for q in (*self._dirty, *self._clean) if q in pages]):
            page = self._dirty.get(p)
            if page is None:
                page = self._clean.get(p)
            if page is not None and page.count(0) != BS:
                return False
        if b0 % LEAVES_PER_PAGE or (b1 % LEAVES_PER_PAGE and b1 != self.lay.blocks):
            return False  # partial pages: let the caller look at the leaves
        resident = set(self._dirty) | set(self._clean)
        return all(p in resident for p in self.tree.nonempty_pages(pages.start, pages.stop))

    def maybe_written(self, p0: int, p1: int) -> list[int]:
        """The pages of [p0, p1), in order, that may hold a written leaf: resident ones
        and those the tree does not know as empty. Every other page is all zeros."""
        pages = set(self.tree.nonempty_pages(p0, p1))
        pages.update(p for p in (*self._dirty, *self._clean) if p0 <= p < p1)
        return sorted(pages)

    # ------------------------------------------------------------ commits

    def dirty_pages(self) -> dict[int, int]:
        """The changed pages, each with its change count: pass it back to `committed`."""
        return {p: self._changes.get(p, 0) for p in sorted(self._dirty)}

    def page(self, p: int) -> bytearray:
        return self._page(p)

    def committed(self, pages: dict[int, int]) -> None:
        """These pages, as `dirty_pages` gave them, are on the replicas and in the tree now:
        they may be evicted, unless changed since (a read adopting an older leaf during
        the commit): those stay for the next commit."""
        for p, changes in pages.items():
            if self._changes.get(p, 0) != changes:
                continue
            self._changes.pop(p, None)
            page = self._dirty.pop(p, None)
            if page is not None:
                self._clean[p] = page
        self._evict()


async def read_page(link: Backend, lay: Layout, p: int) -> bytearray:
    data = await link.pread(lay.leaf_page_offset(p), BS)
    if len(data) != BS:
        raise BlockError(errno.EIO, f"returned {len(data)} bytes for leaf page {p}")
    return bytearray(data)


class LeafLocks(RangeLock):
    """The encryption layer's range lock that also keeps the range's leaf pages in memory
    while it is held: whoever holds blocks (requests, resync, scrub) can read their leaves."""

    def __init__(self, leaves: LeafPages) -> None:
        super().__init__()
        self._leaves = leaves

    async def acquire(self, start: int, end: int, exclusive: bool) -> Hold:
        hold = await super().acquire(start, end, exclusive)
        try:
            hold.pages = await self._leaves.hold(start, end)
        except BaseException:
            super().release(hold)
            raise
        return hold

    def try_acquire(self, start: int, end: int, exclusive: bool) -> Hold | None:
        """The hold at once if nothing conflicts and the pages are in memory, else None
        (then `acquire`): most requests need no coroutine for their lock."""
        hold = super().try_acquire(start, end, exclusive)
        if hold is None:
            return None
        pages = self._leaves.hold_resident(start, end)
        if pages is None:
            super().release(hold)
            return None
        hold.pages = pages
        return hold

    def release(self, hold: Hold) -> None:
        pages, hold.pages = hold.pages, []
        self._leaves.release(pages)
        super().release(hold)
