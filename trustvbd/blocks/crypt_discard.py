"""CryptDisk's holes: TRIM and WRITE_ZEROES make whole blocks version 0 (read as zeros,
no ciphertext needed), BLOCK_STATUS reports them from the leaves (allocation.py).

Partial blocks at either end are written as zeros (crypt_write.py). A discard is
recorded in chunks, each one intent record with its leaf pages held at once.

The functions taking the disk are CryptDisk's methods (bound in its class body,
crypt_layer.py).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from trustvbd.blockdev import BlockError, check_range
from trustvbd.blocks.allocation import allocation
from trustvbd.blocks.ranges import Hold
from trustvbd.crypt.aead import BLOCK_SIZE
from trustvbd.crypt.superblock import LEAVES_PER_PAGE

if TYPE_CHECKING:
    from trustvbd.blocks.crypt_layer import CryptDisk

BS = BLOCK_SIZE
# Largest run of blocks one discard intent record covers.
_DISCARD_CHUNK = 1 << 16


async def trim(disk: CryptDisk, offset: int, length: int, fua: bool = False) -> None:
    await _discard(disk, offset, length, fua, disk._forward_trim)


async def zero(
    disk, offset: int, length: int, fua: bool = False, may_trim: bool = False,
    fast: bool = False,
) -> None:
    # Always fast: zeroing whole blocks only changes leaves (version 0).
    await _discard(disk, offset, length, fua, may_trim and disk._forward_trim)


async def _discard(disk: CryptDisk, offset: int, length: int, fua: bool, forward: bool) -> None:
    """Whole blocks become version 0 (read as zeros); partial ones are rewritten."""
    check_range(disk.size, offset, length)
    disk._check_usable()
    await disk._wait_for_space()
    end = offset + length
    w0, w1 = -(-offset // BS), end // BS
    if w0 >= w1:
        if length:
            await disk.pwrite(offset, bytes(length))
    else:
        if offset < w0 * BS:
            await disk.pwrite(offset, bytes(w0 * BS - offset))
        if w1 * BS < end:
            await disk.pwrite(w1 * BS, bytes(end - w1 * BS))
        # A chunk's leaf pages are held at once: at most half the leaf cache.
        chunk = min(_DISCARD_CHUNK, max(1, disk._leaves.capacity // 2) * LEAVES_PER_PAGE)
        for c0 in range(w0, w1, chunk):
            c1 = min(c0 + chunk, w1)
            if disk._leaves.known_empty(c0, c1):
                continue  # zeros already, known from the tree: nothing to load or log
            await disk._commits.enter_write()
            try:
                hold = await disk._acquire(c0, c1, True)
                try:
                    old = disk._leaves.get(c0, c1)
                    if old.count(0) != len(old):
                        disk._note_settled(c0, old, bytes(len(old)))
                        disk._replica.leaves_changed(range(c0, c1))
                    if forward:  # space reclaim only; leaves already say "zeros"
                        try:
                            # The record first: a cut must not find trimmed ciphertext
                            # under a durable old leaf.
                            await disk._commits.durable()
                            await disk._replica.trim(disk._lay.data_offset(c0),
                                                     (c1 - c0) * BS)
                        except BlockError:
                            pass
                finally:
                    disk._locks.release(hold)
            finally:
                disk._commits.leave_write()
            await disk._maybe_commit(False)
    await disk._maybe_commit(fua)


async def block_status(disk: CryptDisk, offset: int, length: int) -> list[tuple[int, int]]:
    """Holes and data of [offset, offset+length), from the leaves (allocation.py)."""
    check_range(disk.size, offset, length)
    disk._check_usable()
    return await allocation(disk._leaves, disk._lay, partial(_hold_for_status, disk), disk._locks.release,
                            offset, length)


async def _hold_for_status(disk: CryptDisk, b0: int, b1: int) -> Hold:
    return disk._locks.try_acquire(b0, b1, False) or await disk._acquire(b0, b1, False)
