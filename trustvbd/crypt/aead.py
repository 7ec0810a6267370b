"""Block AEAD: AES-256-GCM over 4 KiB blocks, bound to (disk, block number, version).

One `BlockCipher` per disk reuses one AESGCM object and encrypts or decrypts a
whole request per call into caller-provided buffers, so the hot path makes no
per-block allocations. The *leaf* of a block (32 bytes: version u64 BE, GCM tag,
8 reserved zero bytes) is everything needed to check the block later; leaves
live in the leaf table, the ciphertext alone in the data area.

Nonce = version u64 BE || 0x00000000. Versions come from one per-disk counter
that is reserved in trusted state before use, so (key, nonce) never repeats.
AAD = disk_id (16) || block u64 BE || version u64 BE: a block cannot be moved,
spliced from another disk or replayed under another version unnoticed.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

BLOCK_SIZE = 4096
TAG_SIZE = 16
LEAF_SIZE = 32
# A leaf with this version marks a block whose authentic leaf was lost (its leaf
# page failed verification): reads fail until the block is rewritten. The
# counter never reaches it.
POISON_VERSION = 0xFFFF_FFFF_FFFF_FFFF
ZERO_LEAF = bytes(LEAF_SIZE)
_ZERO_BLOCK = bytes(BLOCK_SIZE)
POISON_LEAF = POISON_VERSION.to_bytes(8, "big") + bytes(LEAF_SIZE - 8)

_pack_into = struct.pack_into
_unpack_from = struct.unpack_from


def leaf_version(leaves: bytes | bytearray | memoryview, index: int) -> int:
    """The version field of leaf `index` in a run of leaves."""
    return int(_unpack_from(">Q", leaves, index * LEAF_SIZE)[0])


class BlockCipher:
    """AES-256-GCM for the blocks of one disk."""

    def __init__(self, data_key: bytes, disk_id: bytes) -> None:
        if len(data_key) != 32 or len(disk_id) != 16:
            raise ValueError("data key must be 32 bytes and disk id 16 bytes")
        self._aead = AESGCM(data_key)
        self._disk_id = bytes(disk_id)
        # Scratch buffers made once per cipher, not per call: encrypt and decrypt
        # never suspend, so no two calls use them at the same time (all callers
        # run on one event loop thread), and a 4 KiB request paid for them anew.
        # disk_id(16) | block(8) | version(8) | 0000: the first 32 bytes are the
        # AAD and the last 12 the nonce, so one pack_into per block sets both.
        self._scratch = bytearray(self._disk_id + bytes(20))
        view = memoryview(self._scratch)
        self._aad, self._nonce = view[0:32], view[24:36]
        # decrypt_into wants ciphertext || tag contiguous; the tag lives in the leaf.
        self._joined = bytearray(BLOCK_SIZE + TAG_SIZE)
        jv = memoryview(self._joined)
        self._j_ct, self._j_tag = jv[:BLOCK_SIZE], jv[BLOCK_SIZE:]

    def encrypt(
        self, first_block: int, first_version: int, plain: memoryview, out: memoryview,
        leaves: memoryview,
    ) -> None:
        """Encrypt n = len(plain)/4096 blocks with versions first_version.. in order.

        `out` must hold n*4096 + 16 bytes (GCM appends each tag after its block;
        the next block's ciphertext then overwrites it, after we copied it into
        the leaf). `leaves` receives n leaves.
        """
        n = len(plain) // BLOCK_SIZE
        if len(out) < n * BLOCK_SIZE + TAG_SIZE or len(leaves) < n * LEAF_SIZE:
            raise ValueError("output buffers too small")
        leaves[:n * LEAF_SIZE] = bytes(n * LEAF_SIZE)
        scratch, aad, nonce = self._scratch, self._aad, self._nonce
        enc = self._aead.encrypt_into
        o = lo = 0
        b, v = first_block, first_version
        for _ in range(n):
            e = o + BLOCK_SIZE
            _pack_into(">QQ", scratch, 16, b, v)
            enc(nonce, plain[o:e], aad, out[o:e + TAG_SIZE])
            leaves[lo:lo + 8] = nonce[:8]
            leaves[lo + 8:lo + 24] = out[e:e + TAG_SIZE]
            o = e
            lo += LEAF_SIZE
            b += 1
            v += 1

    def decrypt(
        self, first_block: int, cipher: memoryview, leaves: memoryview, out: memoryview,
    ) -> list[int]:
        """Decrypt n blocks into `out`, each checked against its leaf.

        Version-0 leaves yield zeros without looking at the ciphertext (the leaf
        is authenticated, so a driver can neither forge nor hide zeros). Returns
        the indices (0-based within the run) of blocks that failed; their output
        is zeroed, never partially decrypted data. `out` may be `cipher` itself
        (decrypt in place): each block is read before its output is written.
        """
        n = len(out) // BLOCK_SIZE
        if len(cipher) < n * BLOCK_SIZE or len(leaves) < n * LEAF_SIZE:
            raise ValueError("input buffers too small")
        bad: list[int] = []
        scratch, aad, nonce = self._scratch, self._aad, self._nonce
        joined, j_ct, j_tag = self._joined, self._j_ct, self._j_tag
        dec = self._aead.decrypt_into
        o = lo = 0
        b = first_block
        for i in range(n):
            e = o + BLOCK_SIZE
            v = _unpack_from(">Q", leaves, lo)[0]
            if v == 0 or v == POISON_VERSION:
                out[o:e] = _ZERO_BLOCK
                if v:
                    bad.append(i)
            else:
                j_ct[:] = cipher[o:e]
                j_tag[:] = leaves[lo + 8:lo + 24]
                _pack_into(">QQ", scratch, 16, b, v)
                try:
                    dec(nonce, joined, aad, out[o:e])
                except InvalidTag:
                    out[o:e] = _ZERO_BLOCK
                    bad.append(i)
            o = e
            lo += LEAF_SIZE
            b += 1
        return bad
