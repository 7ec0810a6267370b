"""Scrub: read every written block of every current replica, verify, repair.

Run by `trustvbd scrub` through the encryption domain, a range of COPY_BLOCKS at a
time under the range lock (guest requests go between ranges); a bad block is
rewritten from a replica that has it right, and a replica whose repair fails is
degraded (it is resynced later).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trustvbd.blockdev import BlockError
from trustvbd.blocks.replica import COPY_BLOCKS, Replica
from trustvbd.crypt.aead import BLOCK_SIZE

if TYPE_CHECKING:
    from trustvbd.blocks.replica_set import ReplicaSet

BS = BLOCK_SIZE



async def scrub(rs: ReplicaSet, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Read every written block of every current replica, verify, repair. Returns counts."""
    assert rs.verifier is not None and rs.locks is not None
    verifier = rs.verifier
    # Only where a block may be written: a sparse 16 TiB disk is not read whole.
    spans = [(b0, min(b0 + COPY_BLOCKS, end)) for start, end in verifier.written_ranges()
             for b0 in range(start, end, COPY_BLOCKS)]
    blocks = sum(b1 - b0 for b0, b1 in spans)
    done = 0
    counts = {r.name: {"checked": 0, "bad": 0, "repaired": 0} for r in rs.replicas}
    for b0, b1 in spans:
        hold = await rs.locks.acquire(b0, b1, False)
        try:
            readers = rs.current
            read: list[tuple[Replica, memoryview, set[int]]] = []
            for r in readers:
                try:
                    ct = memoryview(await r.link.pread(rs.layout.data_offset(b0), (b1 - b0) * BS))
                    bad = (verifier.bad_blocks(b0, ct) if len(ct) == (b1 - b0) * BS
                           else list(range(b1 - b0)))
                except BlockError as exc:
                    r.last_error = f"scrub read failed: {exc}"
                    bad, ct = list(range(b1 - b0)), memoryview(b"")
                bad = [i for i in bad if verifier.written(b0 + i)]
                counts[r.name]["checked"] += b1 - b0
                counts[r.name]["bad"] += len(bad)
                read.append((r, ct, set(bad)))
            for r, _, bad_set in read:
                # Each bad block from any replica that has it right (none: the reads say so).
                fixes = [(i, src) for i in sorted(bad_set)
                         for src in [next((c for s, c, b in read if s is not r and i not in b),
                                          None)] if src is not None]
                try:
                    for i, src in fixes:
                        await r.link.pwrite(rs.layout.data_offset(b0 + i), src[i * BS:(i + 1) * BS])
                except BlockError as exc:
                    rs.degrade(r, (b0 + i for i in bad_set), f"scrub repair failed: {exc}")
                    continue
                r.repaired += len(fixes)
                counts[r.name]["repaired"] += len(fixes)
        finally:
            rs.locks.release(hold)
        done += b1 - b0
        if progress is not None:
            progress(done, blocks)
        await asyncio.sleep(0)
    return counts
