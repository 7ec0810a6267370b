"""Block AEAD: AES-256-GCM over 4 KiB blocks, bound to (disk, block number, version).

The work is done by the native codec (`native/src/block_codec/`, the module
trustvbd._native, on `ring`); this module is its only caller. One `BlockCipher`
per disk seals or opens a whole request per call, the GIL released while it
works, so a thread can do a big request while the event loop serves others
(blocks/aead_pool.py). The *leaf* of a block (32 bytes: version u64 BE, GCM tag,
key id u64 BE) is everything needed to check the block later; leaves live in the
leaf table, the ciphertext alone in the data area.

Nonce = version u64 BE || 0x00000000. Versions come from one per-disk counter
that is reserved in trusted state before use, so within one open no nonce
repeats. Restoring the trusted state (and a replica) from a backup would replay
the counter, so every open also picks a random 64-bit *key id* and encrypts
under a block key derived from the data key and that id (HKDF-SHA-256); the id
is stored in the leaf, so (key, nonce) never repeats whatever is restored. Key
id 0 is the data key itself: leaves written before key ids existed.
AAD = disk_id (16) || block u64 BE || version u64 BE: a block cannot be moved,
spliced from another disk or replayed under another version unnoticed.
"""

from __future__ import annotations

import os
import struct

from trustvbd._native import BlockCodec

BLOCK_SIZE = 4096
TAG_SIZE = 16
LEAF_SIZE = 32
# A leaf with this version marks a block whose authentic leaf was lost (its leaf
# page failed verification): reads fail until the block is rewritten. The
# counter never reaches it.
POISON_VERSION = 0xFFFF_FFFF_FFFF_FFFF
ZERO_LEAF = bytes(LEAF_SIZE)
POISON_LEAF = POISON_VERSION.to_bytes(8, "big") + bytes(LEAF_SIZE - 8)

_unpack_from = struct.unpack_from

Buffer = bytes | bytearray | memoryview


def leaf_version(leaves: Buffer, index: int) -> int:
    """The version field of leaf `index` in a run of leaves."""
    return int(_unpack_from(">Q", leaves, index * LEAF_SIZE)[0])


def leaf_key_id(leaves: Buffer, index: int) -> int:
    """The key id field of leaf `index` (bytes 24-31)."""
    return int(_unpack_from(">Q", leaves, index * LEAF_SIZE + 24)[0])


def new_key_id() -> int:
    """A random non-zero key id for one open of a disk."""
    while not (kid := int.from_bytes(os.urandom(8), "big")):
        pass
    return kid


class BlockCipher:
    """AES-256-GCM for the blocks of one disk. Safe to call from several threads at once."""

    def __init__(self, data_key: bytes, disk_id: bytes, key_id: int = 0) -> None:
        """Seals under `key_id` (one per open, see new_key_id); opens any leaf's."""
        if len(data_key) != 32 or len(disk_id) != 16:
            raise ValueError("data key must be 32 bytes and disk id 16 bytes")
        self._codec = BlockCodec(bytes(data_key), bytes(disk_id), key_id)
        self.key_id = key_id

    @property
    def codec(self) -> BlockCodec:
        """The native codec itself, for the native read plane (which opens blocks with it)."""
        return self._codec

    def seal(self, first_block: int, first_version: int, plain: Buffer) -> tuple[bytes, bytes]:
        """(ciphertext, leaves) of n = len(plain)/4096 whole blocks, versions first_version.. in order.

        ValueError for a partial block or versions outside 1..POISON_VERSION-1.
        """
        return self._codec.seal(first_block, first_version, plain)

    def open(self, first_block: int, ciphertext: Buffer, leaves: Buffer) -> tuple[bytes, list[int]]:
        """(plaintext, bad) of n = len(ciphertext)/4096 blocks, each checked against its leaf.

        `leaves` holds exactly n leaves. Version-0 leaves yield zeros without looking at
        the ciphertext (the leaf is authenticated, so a driver can neither forge nor hide
        zeros). `bad` lists the indices (0-based within the run) of blocks that failed;
        their plaintext is zeros, never partially decrypted data.
        """
        return self._codec.open(first_block, ciphertext, leaves)

    def open_in_place(self, first_block: int, data: bytearray | memoryview, leaves: Buffer) -> list[int]:
        """As open(), but the plaintext replaces the ciphertext in `data` (writable, contiguous).

        Returns `bad`; those blocks are left as zeros, never partly decrypted. Saves open()'s
        copy into a new object; it holds the GIL while it works, so nothing else in this
        process may use `data` meanwhile (a thread doing I/O into it, say). ValueError for a
        read-only or scattered buffer or a bad size, `data` then untouched.
        """
        return self._codec.open_in_place(first_block, data, leaves)

    def bad_blocks(self, first_block: int, ciphertext: Buffer, leaves: Buffer) -> list[int]:
        """The indices of blocks of `ciphertext` that do not verify against `leaves`."""
        return self._codec.open(first_block, ciphertext, leaves)[1]
