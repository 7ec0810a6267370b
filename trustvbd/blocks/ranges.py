"""Block-range helpers for layers: a range lock and run/range formatting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

from trustvbd._native import RangeTable


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


# A hold of the range lock (an id given by the native table).
Hold = int


class LockTable(Protocol):
    """The native range lock (`_native.RangeTable`, or the `LeafTable` that also pins its
    holds' leaf pages): what is held, and what a new hold must wait for."""

    def conflict(self, start: int, end: int, exclusive: bool) -> Hold | None: ...
    def hold(self, start: int, end: int, exclusive: bool) -> Hold: ...
    def try_hold(self, start: int, end: int, exclusive: bool) -> Hold | None: ...
    def release(self, hold: Hold) -> None: ...
    def release_all(self, holds: list[Hold]) -> None: ...
    def watch(self, hold: Hold) -> None: ...
    @property
    def reads_held(self) -> int: ...


class RangeLock:
    """Orders overlapping requests on block ranges: reads share, writes exclude.

    Without it a read could pair a block's new leaf with its old ciphertext (or
    the reverse) while a write is in flight, and report a false integrity error.
    Not fair: a stream of overlapping reads can delay a write (NBD clients do not
    issue those in practice). The holds are kept natively (native/src/leaf_table);
    waiting for one is done here.
    """

    # The hold at once if nothing conflicting is held, else None (then `acquire`): the
    # native table's own method, no call layer (one per request).
    try_acquire: Callable[[int, int, bool], Hold | None]

    def __init__(self, table: LockTable | None = None) -> None:
        self._table: LockTable = table if table is not None else RangeTable()
        self.try_acquire = self._table.try_hold
        # Made by the first request that has to wait for a hold: most holds never see one.
        self._waiting: dict[Hold, asyncio.Event] = {}

    async def acquire(self, start: int, end: int, exclusive: bool) -> Hold:
        table, waiting = self._table, self._waiting
        while (h := table.conflict(start, end, exclusive)) is not None:
            done = waiting.get(h)
            if done is None:
                done = waiting[h] = asyncio.Event()
                # The native read plane releases holds itself: it calls `wake` for this one.
                table.watch(h)
            await done.wait()
        return table.hold(start, end, exclusive)

    @property
    def reads_held(self) -> int:
        """How many shared holds (reads) are held now."""
        return self._table.reads_held

    def release(self, hold: Hold) -> None:
        self._table.release(hold)
        if self._waiting:  # (most holds: nobody waits, no call)
            self.wake(hold)

    def release_all(self, holds: list[Hold]) -> None:
        """`release` for each of `holds` (writes behind that ended together): one call of
        the native table for them all."""
        self._table.release_all(holds)
        if waiting := self._waiting:  # (as `wake`, inline: one call for them all)
            for hold in holds:
                if (done := waiting.pop(hold, None)) is not None:
                    done.set()

    def wake(self, hold: Hold) -> None:
        """`hold` was released: whoever waits for it looks again."""
        if self._waiting and (done := self._waiting.pop(hold, None)) is not None:
            done.set()
