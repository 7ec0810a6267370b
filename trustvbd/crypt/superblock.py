"""The signed superblock: what a commit stores on every replica.

Two 4 KiB slots at the start of the replica; commit epoch E goes to slot E % 2,
so a torn superblock write leaves the other slot intact. A superblock binds the
disk id, geometry, epoch, version-counter bound and tree root, and carries one
level of the tree (at most 64 nodes) so that an offline verifier holding only
the public key can tell *which* leaf pages are bad. It is signed with the
disk's Ed25519 key. Byte layout: docs/format.md ("superblock").
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from trustvbd.crypt.aead import BLOCK_SIZE, LEAF_SIZE
from trustvbd.crypt.sign import SIGNATURE_SIZE, Signer, fingerprint, verify
from trustvbd.crypt.tree import HASH_SIZE, TOP_MAX, root_from_level

SLOT_SIZE = 4096
SLOTS = 2
LEAVES_PER_PAGE = BLOCK_SIZE // LEAF_SIZE  # 128
MAGIC = b"TVBDSUPR"
FORMAT_VERSION = 2  # 2: an all-zero leaf page hashes as the empty leaf (docs/format.md)
_CONTEXT = b"trustvbd-superblock-v1\x00"
_FIXED = struct.Struct(">8sII16sQQQQQQ32s32sII")
_TOP_OFFSET = _FIXED.size  # 152
_SIG_OFFSET = _TOP_OFFSET + TOP_MAX * HASH_SIZE  # 2200
_END = _SIG_OFFSET + SIGNATURE_SIZE  # 2264


@dataclass(frozen=True)
class Layout:
    """Where everything lives on a replica for a disk of `logical_size` bytes."""

    logical_size: int

    def __post_init__(self) -> None:
        if self.logical_size <= 0 or self.logical_size % BLOCK_SIZE:
            raise ValueError(
                f"disk size {self.logical_size} must be a positive multiple of {BLOCK_SIZE}")

    @classmethod
    def for_size(cls, logical_size: int) -> Layout:
        return cls(logical_size)

    @property
    def blocks(self) -> int:
        return self.logical_size // BLOCK_SIZE

    @property
    def leaf_pages(self) -> int:
        return -(-self.blocks // LEAVES_PER_PAGE)

    leaf_start = SLOTS * SLOT_SIZE  # 8192

    @property
    def data_start(self) -> int:
        return self.leaf_start + self.leaf_pages * BLOCK_SIZE

    @property
    def physical_size(self) -> int:
        return self.data_start + self.logical_size

    def data_offset(self, block: int) -> int:
        """Replica offset of block `block`'s ciphertext."""
        return self.data_start + block * BLOCK_SIZE

    def leaf_page_offset(self, page: int) -> int:
        """Replica offset of leaf page `page`."""
        return self.leaf_start + page * BLOCK_SIZE

    @property
    def leaf_table_size(self) -> int:
        return self.leaf_pages * BLOCK_SIZE

    def leaf_offset(self, block: int) -> int:
        """Replica offset of block `block`'s 32-byte leaf."""
        return self.leaf_start + block * LEAF_SIZE

    def leaf_page_blocks(self, block: int) -> range:
        """The blocks whose leaves share a leaf page with `block`."""
        first = block // LEAVES_PER_PAGE * LEAVES_PER_PAGE
        return range(first, min(first + LEAVES_PER_PAGE, self.blocks))


@dataclass(frozen=True)
class Superblock:
    disk_id: bytes
    logical_size: int
    epoch: int
    counter_high: int
    root: bytes
    key_fingerprint: bytes
    top_depth: int
    top: bytes  # top_count * 32 bytes

    @property
    def layout(self) -> Layout:
        return Layout(self.logical_size)

    @property
    def slot(self) -> int:
        return self.epoch % SLOTS


def encode(sb: Superblock, signer: Signer) -> bytes:
    g = sb.layout
    out = bytearray(SLOT_SIZE)
    _FIXED.pack_into(
        out, 0, MAGIC, FORMAT_VERSION, BLOCK_SIZE, sb.disk_id, sb.logical_size, g.leaf_start,
        g.leaf_pages, g.data_start, sb.epoch, sb.counter_high, sb.root, sb.key_fingerprint,
        sb.top_depth, len(sb.top) // HASH_SIZE)
    out[_TOP_OFFSET:_TOP_OFFSET + len(sb.top)] = sb.top
    out[_SIG_OFFSET:_END] = signer.sign(_CONTEXT, out[:_SIG_OFFSET])
    return bytes(out)


class SlotKind(enum.Enum):
    BLANK = "blank"            # all zero: never written
    VALID = "valid"            # ours, signature and contents check out
    DAMAGED = "damaged"        # carries our disk id or key fingerprint but does not verify
    OTHER_DISK = "other disk"  # a well-formed trustvbd superblock of some other disk/key
    FOREIGN = "foreign"        # not a trustvbd superblock at all


@dataclass(frozen=True)
class Slot:
    kind: SlotKind
    superblock: Superblock | None = None
    reason: str = ""
    disk_id: bytes = b""


def parse(raw: bytes | bytearray | memoryview, slot: int, public_key: bytes,
          disk_id: bytes | None) -> Slot:
    """Classify one slot. `disk_id` None (offline verify) accepts the one signed."""
    raw = bytes(raw)
    if len(raw) != SLOT_SIZE:
        return Slot(SlotKind.DAMAGED, reason=f"slot is {len(raw)} bytes")
    if raw.count(0) == SLOT_SIZE:
        return Slot(SlotKind.BLANK)
    f = _FIXED.unpack_from(raw, 0)
    magic, version, bsize, sid, lsize, loff, lpages, doff, epoch, counter, root, fp, depth, \
        count = f
    fp_ours = fp == fingerprint(public_key)
    # One flipped byte cannot hide both the disk id and the key fingerprint,
    # so a damaged superblock of ours is never mistaken for someone else's.
    ours = fp_ours or (disk_id is not None and sid == disk_id)
    if not ours:
        if magic == MAGIC:
            return Slot(SlotKind.OTHER_DISK, reason="signed by another key", disk_id=sid)
        return Slot(SlotKind.FOREIGN, reason="not a trustvbd superblock")

    def damaged(why: str) -> Slot:
        return Slot(SlotKind.DAMAGED, reason=why, disk_id=sid)

    if magic == MAGIC and version == 1:
        return damaged("format version 1 (this trustvbd reads format 2 only and does not "
                       "migrate: copy the data to a new disk with the trustvbd that made it)")
    if magic != MAGIC or version != FORMAT_VERSION or bsize != BLOCK_SIZE:
        return damaged("bad magic, version or block size")
    if disk_id is not None and sid != disk_id:
        return damaged("disk id differs from the trusted one")
    if not fp_ours:
        return damaged("key fingerprint differs from this disk's key")
    if not verify(public_key, _CONTEXT, raw[:_SIG_OFFSET], raw[_SIG_OFFSET:_END]):
        return damaged("signature does not verify")
    if raw[_END:].count(0) != SLOT_SIZE - _END:
        return damaged("bytes after the signature are not zero")
    if epoch % SLOTS != slot:
        return damaged(f"epoch {epoch} does not belong in slot {slot}")
    try:
        g = Layout(lsize)
    except ValueError as exc:
        return damaged(str(exc))
    if (loff, lpages, doff) != (g.leaf_start, g.leaf_pages, g.data_start):
        return damaged("layout offsets do not match the disk size")
    if not 0 < count <= TOP_MAX or depth >= 64:
        return damaged("bad tree-top node count")
    top = raw[_TOP_OFFSET:_TOP_OFFSET + count * HASH_SIZE]
    if raw[_TOP_OFFSET + count * HASH_SIZE:_SIG_OFFSET].count(0) != (TOP_MAX - count) * HASH_SIZE:
        return damaged("unused tree-top entries are not zero")
    if root_from_level(top, depth) != root:
        return damaged("tree top does not hash to the root")
    return Slot(SlotKind.VALID, Superblock(sid, lsize, epoch, counter, root, fp, depth, top),
                disk_id=sid)
