"""Offline verification of a replica with only the disk's public key.

What can be checked without the data key or the trusted anchor, and is:
- each superblock slot: format, Ed25519 signature under the given key, layout;
- the leaf table against the newest valid superblock: its tree root, and per
  group of leaf pages (the tree level the superblock carries) which groups are bad;
- every leaf's shape: version 0 means an all-zero leaf, versions are below the
  signed counter bound and no (key id, version) pair is used by two blocks.

What cannot be checked here, and the report says so: the AEAD tag of each data
block (needs the data key: open the disk in the encryption domain and read it,
or scrub), and freshness (needs the trusted anchor: a validly signed but old
replica verifies here).
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from trustvbd.blockdev import ZERO, Backend, ReportsAllocation, provides
from trustvbd.blocks.ranges import describe_blocks
from trustvbd.crypt import superblock as sbfmt
from trustvbd.crypt.aead import BLOCK_SIZE, POISON_VERSION
from trustvbd.crypt.sign import fingerprint
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, SLOT_SIZE, Layout, SlotKind
from trustvbd.crypt.tree import HASH_SIZE, TOP_MAX, TreeBuilder, page_hash

CHUNK_PAGES = 256  # leaf pages read at once (1 MiB)
LIST_MAX = 4096  # entries each list of blocks or pages in the report holds at most
# Distinct (key id, version) pairs held in memory (~100 bytes each); past that they spill
# to temporary files, SPILL_WAYS of them, each checked alone.
NONCE_MEMORY = 1 << 19
SPILL_WAYS = 64
_SPILLED = struct.Struct(">QQQ")  # key id, version, block << 1 | already flagged


@dataclass
class VerifyReport:
    ok: bool = False
    key_fingerprint: str = ""
    disk_id: str | None = None
    epoch: int | None = None
    logical_size: int | None = None
    written_blocks: int = 0
    checked: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # The lists hold their first LIST_MAX entries (a bounded report for any disk size);
    # the counts are whole.
    bad_pages: list[int] = field(default_factory=list)  # leaf pages that fail the signed tree
    bad_page_count: int = 0
    bad_blocks: list[int] = field(default_factory=list)  # blocks covered by bad pages or bad leaves
    bad_block_count: int = 0
    # blocks the trusted side marked as lost (earlier damage)
    poisoned_blocks: list[int] = field(default_factory=list)
    poisoned_count: int = 0

    def __str__(self) -> str:
        lines = [f"replica verification: {'OK' if self.ok else 'FAILED'}"]
        if self.disk_id is None:  # nothing signed by this key: no facts about a disk to show
            lines.append(f"  key {self.key_fingerprint[:16]}...: no superblock signed by this key;"
                         " this is not a trustvbd replica of that disk")
        else:
            lines.append(f"  key {self.key_fingerprint[:16]}..., disk id {self.disk_id}, "
                         f"epoch {self.epoch}, {self.logical_size} bytes, "
                         f"{self.written_blocks} written blocks")
        lines += [f"  checked: {c}" for c in self.checked]
        lines += [f"  NOT checked: {c}" for c in self.not_checked]
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


async def verify_replica(replica: Backend, public_key: bytes) -> VerifyReport:
    """Check what a public key can prove about `replica`; never writes to it. Memory is
    bounded whatever the disk's size: the leaf table streams by (a chunk at a time, its
    all-zero extents skipped where the replica tells them), the tree is folded as it
    goes, and the (key id, version) pairs spill to temporary files past a bound."""
    rep = VerifyReport(key_fingerprint=fingerprint(public_key).hex())
    rep.not_checked = [
        "AEAD tags of data blocks (needs the data key: read or scrub through the "
        "encryption domain)",
        "freshness (needs the trusted anchor: an old but validly signed replica passes here)",
    ]
    if replica.size < 2 * SLOT_SIZE:
        rep.problems.append(f"replica is only {replica.size} bytes: no room for superblocks")
        return rep
    raw = bytes(await replica.pread(0, 2 * SLOT_SIZE))
    best: sbfmt.Superblock | None = None
    for i in range(sbfmt.SLOTS):
        slot = sbfmt.parse(raw[i * SLOT_SIZE:(i + 1) * SLOT_SIZE], i, public_key, None)
        if slot.kind is SlotKind.VALID:
            assert slot.superblock is not None
            rep.checked.append(f"superblock slot {i}: epoch {slot.superblock.epoch}, "
                               "Ed25519 signature valid under the given key")
            if best is None or slot.superblock.epoch > best.epoch:
                best = slot.superblock
        elif slot.kind is SlotKind.BLANK:
            rep.checked.append(f"superblock slot {i}: blank")
        else:
            rep.problems.append(f"superblock slot {i}: {slot.kind.value} ({slot.reason})")
    if best is None:
        rep.problems.append("no superblock signed by this key: not this disk, or both slots "
                            "damaged")
        return rep
    lay = best.layout
    rep.disk_id, rep.epoch, rep.logical_size = best.disk_id.hex(), best.epoch, lay.logical_size
    if replica.size < lay.physical_size:
        rep.problems.append(f"replica is {replica.size} bytes, the layout needs "
                            f"{lay.physical_size}")
        return rep
    with tempfile.TemporaryDirectory(prefix="trustvbd-verify-") as spill:
        scan = _Scan(lay, best, Path(spill))
        await scan.run(replica)
    _judge(rep, lay, best, scan)
    return rep


def _judge(rep: VerifyReport, lay: Layout, best: sbfmt.Superblock, scan: _Scan) -> None:
    """The report's verdict from a finished scan."""
    group = 1 << best.top_depth  # leaf pages under one node of the superblock's top level
    kept = scan.tree_level or []
    bad_groups = [j for j in range(len(best.top) // HASH_SIZE)
                  if j >= len(kept) or kept[j] != best.top[j * HASH_SIZE:(j + 1) * HASH_SIZE]]
    bad_page_ranges = [(j * group, min((j + 1) * group, lay.leaf_pages)) for j in bad_groups]
    rep.bad_page_count = sum(b - a for a, b in bad_page_ranges)
    rep.bad_pages = _first(bad_page_ranges)
    if scan.root == best.root:
        rep.checked.append(f"leaf table: {lay.leaf_pages} pages hash to the signed tree root")
    else:
        rep.problems.append(
            f"leaf table does not hash to the signed root; {rep.bad_page_count} bad leaf pages "
            f"(to groups of {group}): {describe_blocks(rep.bad_pages)}")
        if any(p.startswith("superblock slot") for p in rep.problems):
            rep.problems.append(
                f"a damaged slot may have held a superblock newer than epoch {best.epoch}; "
                "the 'bad' pages may then be newer commits rather than tampering")
    bad_block_ranges = [(a * LEAVES_PER_PAGE, min(b * LEAVES_PER_PAGE, lay.blocks))
                        for a, b in bad_page_ranges]
    shape_bad = sorted(scan.shape_bad)
    outside = sum(n for j, n in enumerate(scan.shape_bad_by_group) if j not in bad_groups)
    rep.written_blocks = scan.written
    rep.checked.append(f"leaf shapes of {lay.blocks} blocks (zero leaves, version bound "
                       f"{best.counter_high}, no (key id, version) used twice)")
    if scan.shape_bad_count:
        rep.problems.append(f"{scan.shape_bad_count} malformed leaves, e.g. blocks "
                            f"{[b for b in shape_bad[:8]]}")
    rep.poisoned_count = scan.poisoned_count
    rep.poisoned_blocks = scan.poisoned
    if scan.poisoned_count:
        rep.problems.append(f"{scan.poisoned_count} blocks are marked lost by the "
                            "encryption domain (earlier damage); rewrite or resync them")
    rep.bad_block_count = sum(b - a for a, b in bad_block_ranges) + outside
    shape_outside = [b for b in shape_bad
              if b < lay.blocks and not any(a <= b < e for a, e in bad_block_ranges)]
    rep.bad_blocks = sorted(set(_first(bad_block_ranges)) | set(shape_outside))[:LIST_MAX]
    if LIST_MAX in (len(rep.bad_blocks), len(rep.bad_pages), len(rep.poisoned_blocks)):
        rep.checked.append(f"lists of blocks and pages below hold their first {LIST_MAX} "
                           "entries; the counts are whole")
    rep.ok = not rep.problems


def _first(ranges: list[tuple[int, int]]) -> list[int]:
    """The first LIST_MAX numbers of sorted half-open ranges."""
    out: list[int] = []
    for a, b in ranges:
        out.extend(range(a, min(b, a + LIST_MAX - len(out))))
        if len(out) >= LIST_MAX:
            break
    return out


class _Scan:
    """One pass over the leaf table: the tree folded as pages come, each leaf's shape,
    and (key id, version) pairs checked for repeats (Nonces)."""

    def __init__(self, lay: Layout, best: sbfmt.Superblock, spill: Path) -> None:
        self.lay, self.bound = lay, best.counter_high
        self.tree = TreeBuilder(lay.leaf_pages, best.top_depth)
        self.group_blocks = LEAVES_PER_PAGE << best.top_depth
        self.nonces = _Nonces(spill, self._flag)
        self.written = 0
        self.poisoned: list[int] = []
        self.poisoned_count = 0
        self.shape_bad: list[int] = []  # at most LIST_MAX; a block is flagged once
        self.shape_bad_count = 0
        self.shape_bad_by_group = [0] * (TOP_MAX + 1)
        self.root = b""
        self.tree_level: list[bytes] | None = None

    def _flag(self, b: int) -> None:
        """Block (or padding leaf) `b` is malformed; called once per block."""
        self.shape_bad_count += 1
        if len(self.shape_bad) < LIST_MAX:
            self.shape_bad.append(b)
        if b < self.lay.blocks:
            self.shape_bad_by_group[min(b // self.group_blocks, TOP_MAX)] += 1

    async def run(self, replica: Backend) -> None:
        lay = self.lay
        async for page, count, data in _table(replica, lay):
            if data is None:
                self.tree.add_empty(count)  # zero leaves: well formed, nothing to count
                continue
            for i in range(count):
                self.tree.add(page_hash(page + i, data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]))
            self._leaves(page * LEAVES_PER_PAGE, data)
        self.root = self.tree.finish()
        self.tree_level = self.tree.kept
        self.nonces.finish()

    def _leaves(self, first: int, data: memoryview) -> None:
        blocks, bound, nonces = self.lay.blocks, self.bound, self.nonces
        for b, (version, tag, key_id) in enumerate(struct.iter_unpack(">Q16sQ", data), first):
            if version == 0:
                if key_id or tag.count(0) != 16:
                    self._flag(b)  # a non-zero leaf with no version (or a padding leaf)
            elif b >= blocks:
                self._flag(b)  # a padding leaf past the end
            elif version == POISON_VERSION:
                self.poisoned_count += 1
                if len(self.poisoned) < LIST_MAX:
                    self.poisoned.append(b)
            else:
                self.written += 1
                over = version >= bound
                if over:
                    self._flag(b)
                nonces.add(key_id, version, b, over)


async def _table(replica: Backend, lay: Layout) -> AsyncIterator[tuple[int, int,
                                                                        memoryview | None]]:
    """(first page, page count, their bytes or None if all zero) over the whole leaf table,
    in order, CHUNK_PAGES at most at a time; extents the replica says read as zeros are
    not read (a sparse terabyte disk's table is mostly holes)."""
    page, end = 0, lay.leaf_pages
    status = (cast(ReportsAllocation, replica).block_status
              if provides(replica, ReportsAllocation) else None)
    while page < end:
        zero_to = page
        if status is not None:
            at = lay.leaf_page_offset(page)
            extents = await status(at, lay.leaf_page_offset(end) - at)
            for length, flags in extents:
                if not flags & ZERO:
                    break
                at += length
            zero_to = min(end, (at - lay.leaf_start) // BLOCK_SIZE)  # whole pages only
        if zero_to > page:
            yield page, zero_to - page, None
            page = zero_to
            continue
        count = min(CHUNK_PAGES, end - page)
        data = await replica.pread(lay.leaf_page_offset(page), count * BLOCK_SIZE)
        yield page, count, memoryview(data)
        page += count


class _Nonces:
    """Whether any (key id, version) pair is used by two blocks, in bounded memory: a
    dict of pairs up to NONCE_MEMORY of them; past that every pair goes to one of SPILL_WAYS
    files by a keyed hash (a repeat always lands in the same file as its first), and each
    file is checked alone, split again the same way if it is still too big."""

    def __init__(self, spill: Path, flag: Callable[[int], None], depth: int = 0) -> None:
        self._dir, self._flag, self._limit, self._depth = spill, flag, NONCE_MEMORY, depth
        self._seen: dict[int, int] | None = {}  # pair -> first block (~first - 1: flagged)
        self._files: list[BinaryIO] = []
        self._salt = int.from_bytes(os.urandom(8), "big") | 1

    def add(self, key_id: int, version: int, block: int, flagged: bool) -> None:
        seen = self._seen
        if seen is None:
            self._spill(key_id, version, block, flagged)
            return
        pair = key_id << 64 | version
        first = seen.get(pair)
        if first is None:
            seen[pair] = ~block if flagged else block
            if len(seen) > self._limit:
                self._start_spilling()
            return
        if first >= 0:
            self._flag(first)
            seen[pair] = ~first
        if not flagged:
            self._flag(block)

    def _start_spilling(self) -> None:
        seen, self._seen = self._seen, None
        assert seen is not None
        self._files = [open(self._dir / f"{self._depth}-{os.getpid()}-{id(self)}-{i}", "w+b")
                       for i in range(SPILL_WAYS)]
        for pair, first in seen.items():
            flagged = first < 0
            self._spill(pair >> 64, pair & (1 << 64) - 1, ~first if flagged else first,
                        flagged)

    def _spill(self, key_id: int, version: int, block: int, flagged: bool) -> None:
        way = ((key_id ^ version) * self._salt >> 17) % SPILL_WAYS
        self._files[way].write(_SPILLED.pack(key_id, version, block << 1 | flagged))

    def finish(self) -> None:
        """Check what was spilled, one file at a time."""
        files, self._files = self._files, []
        for f in files:
            with f:
                f.seek(0)
                inner = _Nonces(self._dir, self._flag, self._depth + 1)
                while chunk := f.read(_SPILLED.size * 4096):
                    for key_id, version, tagged in _SPILLED.iter_unpack(chunk):
                        inner.add(key_id, version, tagged >> 1, bool(tagged & 1))
                inner.finish()


__all__ = ["VerifyReport", "verify_replica"]
