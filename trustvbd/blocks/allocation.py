"""Block status (NBD base:allocation) of an encrypted disk, from its leaves.

Holes: blocks whose leaf is all zeros (never written, trimmed or zeroed) read as zeros
with no driver involved (HOLE|ZERO); every other block is data. From the leaves alone,
never the replicas' ciphertext, so the drivers learn nothing new.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from trustvbd.blockdev import HOLE, ZERO
from trustvbd.blocks.leaf_pages import LeafPages
from trustvbd.blocks.ranges import Hold
from trustvbd.crypt.aead import BLOCK_SIZE, LEAF_SIZE
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, Layout

BS = BLOCK_SIZE
# Leaf pages a BLOCK_STATUS may lock (and load) per call (32 MiB of disk): the client asks
# again from where the reply ends. Pages the tree knows as empty cost no load.
STATUS_PAGES = 64
_EMPTY_LEAF = bytes(LEAF_SIZE)


async def allocation(leaves: LeafPages, lay: Layout, hold: Callable[[int, int], Awaitable[Hold]],
                     release: Callable[[Hold], None], offset: int,
                     length: int) -> list[tuple[int, int]]:
    """(length, flags) extents of [offset, offset+length) (checked by the caller), up to
    STATUS_PAGES leaf pages of it: the client asks again from where the reply ends.
    `hold`/`release`: the range lock, shared, over the blocks whose leaves are read."""
    if length == 0:
        return []
    b0, b1 = offset // BS, -(-(offset + length) // BS)
    runs: list[list[int]] = []  # [blocks, flags]

    def add(blocks: int, flags: int) -> None:
        if runs and runs[-1][1] == flags:
            runs[-1][0] += blocks
        else:
            runs.append([blocks, flags])

    locked = 0
    b = b0
    # Pages between these are empty, known from the tree: one hole, nothing looked at.
    maybe = leaves.maybe_written(b0 // LEAVES_PER_PAGE, (b1 - 1) // LEAVES_PER_PAGE + 1)
    at = 0
    while b < b1 and locked < STATUS_PAGES:
        p = b // LEAVES_PER_PAGE
        while at < len(maybe) and maybe[at] < p:
            at += 1
        if at == len(maybe) or maybe[at] > p:
            end = b1 if at == len(maybe) else min(b1, maybe[at] * LEAVES_PER_PAGE)
            add(end - b, HOLE | ZERO)
            b = end
            continue
        end = min(b1, (p + 1) * LEAVES_PER_PAGE)
        if leaves.known_empty(p * LEAVES_PER_PAGE,
                                    min((p + 1) * LEAVES_PER_PAGE, lay.blocks)):
            add(end - b, HOLE | ZERO)
            b = end
            continue
        locked += 1
        held = await hold(b, end)
        try:
            got = leaves.get(b, end)
        finally:
            release(held)
        if _EMPTY_LEAF not in got:
            # No run of LEAF_SIZE zero bytes anywhere, so no empty leaf: all data, found
            # by one search in C (a written page, as a sequential read meets them).
            add(end - b, 0)
        else:
            for i in range(end - b):
                empty = got.count(0, i * LEAF_SIZE, (i + 1) * LEAF_SIZE) == LEAF_SIZE
                add(1, HOLE | ZERO if empty else 0)
        b = end
    # In bytes, from `offset` (not its block's start) to at most offset + length.
    extents, at, end = [], b0 * BS, offset + length
    for n, flags in runs:
        lo, hi = max(at, offset), min(at + n * BS, end)
        if hi > lo:
            extents.append((hi - lo, flags))
        at += n * BS
    return extents
