"""Block-range helpers for layers: a range lock and run/range formatting."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


def describe_blocks(blocks: Iterable[int], limit: int | None = 8) -> str:
    """'3, 7-9' for [3, 7, 8, 9]; more than `limit` runs are cut short (None: never)."""
    out: list[str] = []
    items = sorted(set(blocks))
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    if limit is not None and len(out) > limit:
        out = [*out[:limit], f"... ({len(items)} blocks)"]
    return ", ".join(out)


def runs(items: Iterable[int], limit: int) -> list[tuple[int, int]]:
    """Sorted ints as half-open runs [a, b) of consecutive values, each at most `limit` long."""
    out: list[tuple[int, int]] = []
    for x in sorted(items):
        if out and out[-1][1] == x and x - out[-1][0] < limit:
            out[-1] = (out[-1][0], x + 1)
        else:
            out.append((x, x + 1))
    return out


# Exclusive holds of fewer blocks than this are found by block (RangeLock._by_block).
_INDEXED = 16


class Hold:
    __slots__ = ("done", "end", "exclusive", "pages", "start")

    def __init__(self, start: int, end: int, exclusive: bool) -> None:
        self.start, self.end, self.exclusive = start, end, exclusive
        # Made by the first request that has to wait: most holds never see one,
        # and an Event per request is a measurable share of a 4 KiB read.
        self.done: asyncio.Event | None = None
        self.pages: list[int] = []  # leaf pages pinned with it (LeafLocks)


class RangeLock:
    """Orders overlapping requests on block ranges: reads share, writes exclude.

    Without it a read could pair a block's new leaf with its old ciphertext (or
    the reverse) while a write is in flight, and report a false integrity error.
    Not fair: a stream of overlapping reads can delay a write (NBD clients do not
    issue those in practice).
    """

    def __init__(self) -> None:
        # Reads are kept apart from writes: a read only has to look at the writes held,
        # and a sequential reader keeps hundreds of reads in flight.
        self._reads: set[Hold] = set()
        self._writes: set[Hold] = set()  # exclusive holds of _INDEXED blocks or more
        # Smaller exclusive holds (writes behind: dozens held at once while a file is
        # written block by block) by block; they never overlap, so one hold per block.
        self._small: set[Hold] = set()
        self._by_block: dict[int, Hold] = {}

    def _conflict(self, start: int, end: int, exclusive: bool) -> Hold | None:
        small = self._small
        if small:
            if end - start <= len(small):
                get = self._by_block.get
                for b in range(start, end):
                    if (h := get(b)) is not None:
                        return h
            else:
                for h in small:
                    if h.start < end and start < h.end:
                        return h
        for h in self._writes:
            if h.start < end and start < h.end:
                return h
        if exclusive:
            for h in self._reads:
                if h.start < end and start < h.end:
                    return h
        return None

    async def acquire(self, start: int, end: int, exclusive: bool) -> Hold:
        while (h := self._conflict(start, end, exclusive)) is not None:
            if h.done is None:
                h.done = asyncio.Event()
            await h.done.wait()
        return self._hold(start, end, exclusive)

    def try_acquire(self, start: int, end: int, exclusive: bool) -> Hold | None:
        """The hold at once if nothing conflicting is held, else None (then `acquire`)."""
        if self._conflict(start, end, exclusive) is not None:
            return None
        return self._hold(start, end, exclusive)

    def _hold(self, start: int, end: int, exclusive: bool) -> Hold:
        hold = Hold(start, end, exclusive)
        if not exclusive:
            self._reads.add(hold)
        elif end - start < _INDEXED:
            self._small.add(hold)
            by_block = self._by_block
            for b in range(start, end):
                by_block[b] = hold
        else:
            self._writes.add(hold)
        return hold

    def release(self, hold: Hold) -> None:
        if not hold.exclusive:
            self._reads.remove(hold)
        elif hold.end - hold.start < _INDEXED:
            self._small.remove(hold)
            by_block = self._by_block
            for b in range(hold.start, hold.end):
                del by_block[b]
        else:
            self._writes.remove(hold)
        if hold.done is not None:
            hold.done.set()
