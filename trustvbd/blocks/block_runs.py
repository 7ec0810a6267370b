"""A set of data blocks held as sorted runs, with a cap on how many: what a replica lacks.

A replica that is behind lacks the blocks written while it was away (its dirty map,
replica.py; stored as behind/R, docs/format.md 2.7), and one rebuilt whole lacks every
written block. Both are held here as disjoint, non-touching runs [start, end) in two
arrays of 8-byte integers, so memory and the stored map grow with the runs, never with
the disk's size or with how much was written: one run for a 16 TiB rebuild, two for
writes at both ends of the disk.

Past `max_runs` the set coarsens: the runs closest together are merged (with the
blocks between them) until a quarter of the cap is free again. It then holds blocks
that were never added, never fewer than were: a resync copies some blocks it need not
(each is read from a current replica and verified first) and misses none. At the
default cap (MAX_RUNS) a set takes at most 1 MiB, plus ~5 MiB for a moment while it
coarsens.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

from trustvbd.blocks.ranges import runs as _runs_of

# Runs a set holds before it coarsens (two 8-byte integers each).
MAX_RUNS = 1 << 16


class BlockRuns:
    """Blocks as sorted runs; `len` is the number of blocks, `runs()` the runs."""

    __slots__ = ("_count", "_ends", "_starts", "coarsened", "max_runs")

    def __init__(self, blocks: Iterable[int] | BlockRuns = (), max_runs: int | None = None) -> None:
        max_runs = MAX_RUNS if max_runs is None else max_runs
        if max_runs < 1:
            raise ValueError(f"max_runs must be at least 1, not {max_runs}")
        self._starts = array("q")
        self._ends = array("q")
        self._count = 0
        self.max_runs = max_runs
        self.coarsened = 0  # blocks taken in by coarsening (never added), over its life
        self.update(blocks)

    @classmethod
    def of_runs(cls, runs: Iterable[tuple[int, int]], max_runs: int | None = None) -> BlockRuns:
        out = cls(max_runs=max_runs)
        for b0, b1 in runs:
            out.add(b0, b1)
        return out

    # ------------------------------------------------------------ what it holds

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __contains__(self, block: object) -> bool:
        if not isinstance(block, int):
            return False
        i = bisect_right(self._starts, block) - 1
        return i >= 0 and block < self._ends[i]

    def __iter__(self) -> Iterator[int]:
        """Every block, in order (for small sets and tests: `runs()` is what scales)."""
        for b0, b1 in self.runs():
            yield from range(b0, b1)

    def __repr__(self) -> str:
        shown = ", ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in self.runs())
        return f"BlockRuns({self._count} blocks: {shown})"

    @property
    def run_count(self) -> int:
        return len(self._starts)

    def runs(self) -> Iterator[tuple[int, int]]:
        """The runs [start, end), in order."""
        return zip(self._starts, self._ends, strict=True)

    def first(self, blocks: int, longest: int) -> list[tuple[int, int]]:
        """The first runs, cut to at most `blocks` blocks in all and `longest` each: the
        next batch a resync copies."""
        out: list[tuple[int, int]] = []
        for b0, b1 in self.runs():
            while b0 < b1 and blocks > 0:
                end = min(b1, b0 + longest, b0 + blocks)
                out.append((b0, end))
                blocks -= end - b0
                b0 = end
            if blocks <= 0:
                break
        return out

    def copy(self) -> BlockRuns:
        out = BlockRuns(max_runs=self.max_runs)
        out._starts, out._ends = array("q", self._starts), array("q", self._ends)
        out._count, out.coarsened = self._count, self.coarsened
        return out

    # ------------------------------------------------------------ changing it

    def add(self, b0: int, b1: int) -> None:
        """Blocks [b0, b1)."""
        if b1 <= b0:
            return
        if b0 < 0:
            raise ValueError(f"block {b0} is negative")
        starts, ends = self._starts, self._ends
        i = bisect_left(ends, b0)     # the first run that ends at or after b0 (touches it)
        j = bisect_right(starts, b1)  # runs from i up to here touch [b0, b1)
        removed = 0
        if i < j:
            b0, b1 = min(b0, starts[i]), max(b1, ends[j - 1])
            removed = sum(ends[k] - starts[k] for k in range(i, j))
        starts[i:j] = array("q", (b0,))
        ends[i:j] = array("q", (b1,))
        self._count += b1 - b0 - removed
        if len(starts) > self.max_runs:
            self._coarsen()

    def update(self, blocks: Iterable[int] | BlockRuns) -> None:
        """Add blocks: a range or another BlockRuns run by run, anything else block by block."""
        if isinstance(blocks, BlockRuns):
            if blocks.run_count > 64:
                self._merge(blocks)
            else:
                for b0, b1 in blocks.runs():
                    self.add(b0, b1)
        elif isinstance(blocks, range) and blocks.step == 1:
            self.add(blocks.start, blocks.stop)
        else:
            for b0, b1 in _runs_of(blocks, 1 << 62):
                self.add(b0, b1)

    def __ior__(self, blocks: Iterable[int] | BlockRuns) -> BlockRuns:
        self.update(blocks)
        return self

    def discard(self, b0: int, b1: int) -> None:
        """Blocks [b0, b1) are no longer in the set (those not in it are ignored)."""
        if b1 <= b0:
            return
        starts, ends = self._starts, self._ends
        i = bisect_right(ends, b0)   # the first run that ends after b0 (overlaps)
        j = bisect_left(starts, b1)  # runs from i up to here overlap [b0, b1)
        if i >= j:
            return
        removed = sum(ends[k] - starts[k] for k in range(i, j))
        keep_s, keep_e = array("q"), array("q")
        if starts[i] < b0:
            keep_s.append(starts[i])
            keep_e.append(b0)
        if ends[j - 1] > b1:
            keep_s.append(b1)
            keep_e.append(ends[j - 1])
        self._count -= removed - sum(e - s for s, e in zip(keep_s, keep_e, strict=True))
        starts[i:j] = keep_s
        ends[i:j] = keep_e
        if len(starts) > self.max_runs:
            self._coarsen()

    def _merge(self, other: BlockRuns) -> None:
        """Add every run of `other` in one pass over both (a run at a time would shift
        this set's arrays once per run)."""
        a_s, a_e, b_s, b_e = self._starts, self._ends, other._starts, other._ends
        out_s, out_e = array("q"), array("q")
        i = j = count = 0
        n, m = len(a_s), len(b_s)
        while i < n or j < m:
            if j >= m or (i < n and a_s[i] <= b_s[j]):
                b0, b1 = a_s[i], a_e[i]
                i += 1
            else:
                b0, b1 = b_s[j], b_e[j]
                j += 1
            if out_e and b0 <= out_e[-1]:  # overlaps or touches the last run
                if b1 > out_e[-1]:
                    count += b1 - out_e[-1]
                    out_e[-1] = b1
            else:
                out_s.append(b0)
                out_e.append(b1)
                count += b1 - b0
        self._starts, self._ends, self._count = out_s, out_e, count
        if len(out_s) > self.max_runs:
            self._coarsen()

    def clear(self) -> None:
        del self._starts[:], self._ends[:]
        self._count = 0

    def _coarsen(self) -> None:
        """Merge the runs closest together until at most 3/4 of `max_runs` are left."""
        starts, ends = self._starts, self._ends
        n = len(starts)
        merges = n - max(1, self.max_runs * 3 // 4)
        gaps = [starts[k + 1] - ends[k] for k in range(n - 1)]
        # The merges smallest gaps: every gap below `limit`, and enough equal to it.
        limit = sorted(gaps)[merges - 1]
        equal = merges - sum(1 for g in gaps if g < limit)
        new_s, new_e = array("q", (starts[0],)), array("q")
        taken = 0
        for k, gap in enumerate(gaps):
            if gap < limit or (gap == limit and equal > 0):
                equal -= gap == limit
                taken += gap
                continue
            new_e.append(ends[k])
            new_s.append(starts[k + 1])
        new_e.append(ends[n - 1])
        self._starts, self._ends = new_s, new_e
        self._count += taken
        self.coarsened += taken
