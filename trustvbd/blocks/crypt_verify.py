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

import struct
from dataclasses import dataclass, field

from trustvbd.blockdev import Backend
from trustvbd.crypt import superblock as sbfmt
from trustvbd.crypt.aead import BLOCK_SIZE, POISON_VERSION
from trustvbd.crypt.sign import fingerprint
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, SLOT_SIZE, SlotKind
from trustvbd.crypt.tree import HASH_SIZE, HashTree, page_hash


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
    bad_pages: list[int] = field(default_factory=list)  # leaf pages that fail the signed tree
    bad_blocks: list[int] = field(default_factory=list)  # blocks covered by bad pages or bad leaves
    # blocks the trusted side marked as lost (earlier damage)
    poisoned_blocks: list[int] = field(default_factory=list)

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
    """Check what a public key can prove about `replica`; never writes to it."""
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

    table = bytes(await replica.pread(lay.leaf_start, lay.leaf_pages * BLOCK_SIZE))
    hashes = b"".join(page_hash(p, table[p * BLOCK_SIZE:(p + 1) * BLOCK_SIZE])
                      for p in range(lay.leaf_pages))
    tree = HashTree(hashes)
    level = tree.levels[best.top_depth]
    group = 1 << best.top_depth
    for j in range(len(best.top) // HASH_SIZE):
        if level[j * HASH_SIZE:(j + 1) * HASH_SIZE] != best.top[j * HASH_SIZE:(j + 1) * HASH_SIZE]:
            rep.bad_pages += range(j * group, min((j + 1) * group, lay.leaf_pages))
    if tree.root == best.root:
        rep.checked.append(f"leaf table: {lay.leaf_pages} pages hash to the signed tree root")
    else:
        rep.problems.append(
            f"leaf table does not hash to the signed root; bad leaf pages "
            f"(to groups of {group}): {rep.bad_pages}")
        if any(p.startswith("superblock slot") for p in rep.problems):
            rep.problems.append(
                f"a damaged slot may have held a superblock newer than epoch {best.epoch}; "
                "the 'bad' pages may then be newer commits rather than tampering")
    bad_blocks = {b for p in rep.bad_pages
                  for b in range(p * LEAVES_PER_PAGE, min((p + 1) * LEAVES_PER_PAGE, lay.blocks))}

    seen: dict[tuple[int, int], int] = {}
    shape_bad: list[int] = []
    for b, (version, tag, key_id) in enumerate(struct.iter_unpack(">Q16sQ", table)):
        if b >= lay.blocks:
            if version or tag.count(0) != 16 or key_id:
                shape_bad.append(b)  # a padding leaf past the end
            continue
        if version == 0:
            if tag.count(0) != 16 or key_id:
                shape_bad.append(b)
        elif version == POISON_VERSION:
            rep.poisoned_blocks.append(b)
        else:
            rep.written_blocks += 1
            nonce = (key_id, version)  # (block key, GCM nonce): never twice
            if version >= best.counter_high or nonce in seen:
                shape_bad.append(b)
                if nonce in seen:
                    shape_bad.append(seen[nonce])
            seen[nonce] = b
    rep.checked.append(f"leaf shapes of {lay.blocks} blocks (zero leaves, version bound "
                       f"{best.counter_high}, no (key id, version) used twice)")
    if shape_bad:
        rep.problems.append(f"{len(set(shape_bad))} malformed leaves, e.g. blocks "
                            f"{sorted(set(shape_bad))[:8]}")
    if rep.poisoned_blocks:
        rep.problems.append(f"{len(rep.poisoned_blocks)} blocks are marked lost by the "
                            "encryption domain (earlier damage); rewrite or resync them")
    rep.bad_blocks = sorted(bad_blocks | {b for b in shape_bad if b < lay.blocks})
    rep.ok = not rep.problems
    return rep


__all__ = ["VerifyReport", "verify_replica"]
