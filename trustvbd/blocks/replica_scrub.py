"""Scrub: read every written block of every current replica, verify, repair; then
every leaf page that may hold a written leaf, against the trusted tree.

Run by `trustvbd scrub` through the encryption domain, a range of COPY_BLOCKS at a
time under the range lock (guest requests go between ranges); a bad block is
rewritten from a replica that has it right, and a replica whose repair fails is
degraded (it is resynced later). A replica holding an altered leaf page is degraded
too, unless it is the last current one: its joining commit rewrites the page (a page
is otherwise checked only when a request loads it, so one a driver altered on a
replica whose pages were cached stayed altered, to be found only when needed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trustvbd.blockdev import BlockError
from trustvbd.blocks.ranges import describe_blocks
from trustvbd.blocks.replica import COPY_BLOCKS, Replica
from trustvbd.crypt.aead import BLOCK_SIZE
from trustvbd.crypt.superblock import LEAVES_PER_PAGE

if TYPE_CHECKING:
    from trustvbd.blocks.replica_set import ReplicaSet

BS = BLOCK_SIZE
# Leaf pages read per request when a scrub checks a replica's leaf table (256 KiB).
PAGES_PER_READ = 64



async def scrub(rs: ReplicaSet, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Read every written block of every current replica, verify, repair. Returns counts."""
    assert rs.verifier is not None and rs.locks is not None
    verifier = rs.verifier
    # Only where a block may be written: a sparse 16 TiB disk is not read whole.
    spans = [(b0, min(b0 + COPY_BLOCKS, end)) for start, end in verifier.written_ranges()
             for b0 in range(start, end, COPY_BLOCKS)]
    blocks = sum(b1 - b0 for b0, b1 in spans)
    done = 0
    counts = {r.name: {"checked": 0, "bad": 0, "repaired": 0, "leaf_pages_checked": 0,
                       "leaf_pages_bad": 0} for r in rs.replicas}
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
    await _scrub_leaf_pages(rs, counts)
    result: dict[str, Any] = counts
    for r in rs.replicas:  # said, so that "0 blocks checked, 0 bad" is not taken for clean
        if r not in rs.current:
            result[r.name]["not_scrubbed"] = (f"it is {r.state.value}: not read here; a current"
                                              " replica's blocks are copied to it (`trustvbd"
                                              " status` says why)")
    return result


async def _scrub_leaf_pages(rs: ReplicaSet, counts: dict[str, dict[str, int]]) -> None:
    """Every leaf page that may hold a written leaf, on every current replica, against
    the trusted tree (module doc)."""
    assert rs.verifier is not None
    verifier = rs.verifier
    for start, end in verifier.written_ranges():
        q0, q1 = start // LEAVES_PER_PAGE, -(-end // LEAVES_PER_PAGE)
        for p0 in range(q0, q1, PAGES_PER_READ):
            p1 = min(p0 + PAGES_PER_READ, q1)
            for r in rs.current:
                try:
                    bad = await verifier.altered_pages(r.link, p0, p1)
                except BlockError as exc:
                    r.last_error = f"scrub read of leaf pages failed: {exc}"
                    continue
                counts[r.name]["leaf_pages_checked"] += p1 - p0
                if bad:
                    _altered(rs, r, bad)
                    counts[r.name]["leaf_pages_bad"] += len(bad)
            await asyncio.sleep(0)


def _altered(rs: ReplicaSet, r: Replica, pages: list[int]) -> None:
    """Leaf `pages` of current `r` are altered: reported; r gets them again at its join."""
    blocks = [b for p in pages for b in rs.layout.leaf_page_blocks(p * LEAVES_PER_PAGE)]
    last = len(rs.current) == 1
    rs._report("leaf table", r, blocks, (
        f"disk {rs.disk!r}: leaf page(s) {describe_blocks(pages)} of replica {r.name!r} were "
        "altered (found by scrub); " + (
            "it is the last current replica: their blocks fail reads until rewritten" if last
            else "it is degraded and gets them again when it rejoins")))
    for p in pages:
        r.leaves_behind.update(rs.layout.leaf_page_blocks(p * LEAVES_PER_PAGE))
    if not last:
        rs.degrade(r, (), f"leaf page(s) {describe_blocks(pages)} altered (found by scrub)")
