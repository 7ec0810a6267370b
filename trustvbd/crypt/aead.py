"""Block AEAD: AES-256-GCM over 4 KiB blocks, bound to (disk, block number, version).

One `BlockCipher` per disk reuses one AESGCM object and encrypts or decrypts a
whole request per call into caller-provided buffers, so the hot path makes no
per-block allocations. The *leaf* of a block (32 bytes: version u64 BE, GCM tag,
key id u64 BE) is everything needed to check the block later; leaves
live in the leaf table, the ciphertext alone in the data area.

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

import functools
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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


_KEY_CONTEXT = b"trustvbd-block-key-v1\x00"


def leaf_version(leaves: bytes | bytearray | memoryview, index: int) -> int:
    """The version field of leaf `index` in a run of leaves."""
    return int(_unpack_from(">Q", leaves, index * LEAF_SIZE)[0])


def leaf_key_id(leaves: bytes | bytearray | memoryview, index: int) -> int:
    """The key id field of leaf `index` (bytes 24-31)."""
    return int(_unpack_from(">Q", leaves, index * LEAF_SIZE + 24)[0])


def new_key_id() -> int:
    """A random non-zero key id for one open of a disk."""
    while not (kid := int.from_bytes(os.urandom(8), "big")):
        pass
    return kid


def block_key(data_key: bytes, disk_id: bytes, key_id: int) -> bytes:
    """The AES-256 key of blocks written under `key_id` (0: the data key itself)."""
    if key_id == 0:
        return bytes(data_key)
    info = _KEY_CONTEXT + bytes(disk_id) + key_id.to_bytes(8, "big")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(data_key)


@functools.cache
def _versions(n: int) -> struct.Struct:
    """Unpacks the version and key id fields of n leaves in one call."""
    return struct.Struct(">" + "Q16xQ" * n)


class BlockViews:
    """Per-block views of a run of n blocks, their leaves and the output, cut once.

    In Python, cutting the memoryviews costs about as much per block as the rest
    of the loop around the AES call. An AEAD worker keeps the views of each slot
    and reuses them for every job (1.61 -> 1.29 us per 4 KiB block decrypted,
    1.62 -> 1.21 encrypted). For one-off buffers, cutting views up front costs more
    than it saves (2.8 -> 5.0 us for one block), so BlockCipher has two loops per
    operation: encrypt/decrypt slice as they go, encrypt_views/decrypt_views take
    views. Same construction; tests check both against plain AES-GCM.

    Decrypting uses `data` (ciphertext), `leaf_tag`, `out`; encrypting uses `data`
    (plaintext), `out_tagged` (each block with room for the tag GCM appends; so
    `out` needs n*4096 + 16 bytes), `out_tag`, `leaf_version`, `leaf_tag`, `leaf_key_id`.
    """

    __slots__ = ("data", "leaf_key_id", "leaf_tag", "leaf_version", "leaves", "out", "out_tag",
                 "out_tagged")

    def __init__(self, data: memoryview, leaves: memoryview, out: memoryview, n: int, *,
                 encrypt: bool) -> None:
        bs, ls = BLOCK_SIZE, LEAF_SIZE
        self.leaves = leaves
        self.data = [data[i * bs:(i + 1) * bs] for i in range(n)]
        self.leaf_tag = [leaves[i * ls + 8:i * ls + 8 + TAG_SIZE] for i in range(n)]
        self.out: list[memoryview] = []
        self.out_tagged: list[memoryview] = []
        self.out_tag: list[memoryview] = []
        self.leaf_version: list[memoryview] = []
        self.leaf_key_id: list[memoryview] = []
        if encrypt:
            self.out_tagged = [out[i * bs:(i + 1) * bs + TAG_SIZE] for i in range(n)]
            self.out_tag = [out[(i + 1) * bs:(i + 1) * bs + TAG_SIZE] for i in range(n)]
            self.leaf_version = [leaves[i * ls:i * ls + 8] for i in range(n)]
            self.leaf_key_id = [leaves[i * ls + 24:i * ls + 32] for i in range(n)]
        else:
            self.out = [out[i * bs:(i + 1) * bs] for i in range(n)]


class BlockCipher:
    """AES-256-GCM for the blocks of one disk."""

    def __init__(self, data_key: bytes, disk_id: bytes, key_id: int = 0) -> None:
        """Encrypts under `key_id` (one per open, see new_key_id); decrypts any leaf's."""
        if len(data_key) != 32 or len(disk_id) != 16:
            raise ValueError("data key must be 32 bytes and disk id 16 bytes")
        self._data_key = bytes(data_key)
        self._disk_id = bytes(disk_id)
        self._keys: dict[int, AESGCM] = {}
        self.key_id = key_id
        self._key_id_bytes = key_id.to_bytes(8, "big")
        self._aead = self._aead_for(key_id)
        # Scratch buffers made once per cipher, not per call: encrypt and decrypt
        # never suspend, so no two calls use them at the same time (all callers
        # run on one event loop thread), and a 4 KiB request paid for them anew.
        # disk_id(16) | block(8) | version(8) | 0000: the first 32 bytes are the
        # AAD and the last 12 the nonce, so one pack_into per block sets both.
        self._scratch = bytearray(self._disk_id + bytes(20))
        view = memoryview(self._scratch)
        self._aad, self._nonce, self._version = view[0:32], view[24:36], view[24:32]
        # decrypt_into wants ciphertext || tag contiguous; the tag lives in the leaf.
        self._joined = bytearray(BLOCK_SIZE + TAG_SIZE)
        jv = memoryview(self._joined)
        self._j_ct, self._j_tag = jv[:BLOCK_SIZE], jv[BLOCK_SIZE:]

    def _aead_for(self, key_id: int) -> AESGCM:
        aead = self._keys.get(key_id)
        if aead is None:
            if len(self._keys) >= 256:  # ids of many past opens: keep the map bounded
                self._keys.clear()
            aead = self._keys[key_id] = AESGCM(block_key(self._data_key, self._disk_id, key_id))
        return aead

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
        kid = self._key_id_bytes
        o = lo = 0
        b, v = first_block, first_version
        for _ in range(n):
            e = o + BLOCK_SIZE
            _pack_into(">QQ", scratch, 16, b, v)
            enc(nonce, plain[o:e], aad, out[o:e + TAG_SIZE])
            leaves[lo:lo + 8] = nonce[:8]
            leaves[lo + 8:lo + 24] = out[e:e + TAG_SIZE]
            leaves[lo + 24:lo + 32] = kid
            o = e
            lo += LEAF_SIZE
            b += 1
            v += 1

    def encrypt_views(self, first_block: int, first_version: int, views: BlockViews, n: int) -> None:
        """As encrypt, over the first n blocks of views cut beforehand."""
        if n > len(views.out_tagged):  # zip() below would quietly stop short
            raise ValueError(f"views for {len(views.out_tagged)} blocks cannot encrypt {n}")
        views.leaves[:n * LEAF_SIZE] = bytes(n * LEAF_SIZE)
        scratch, aad, nonce, version = self._scratch, self._aad, self._nonce, self._version
        enc = self._aead.encrypt_into
        delta = first_version - first_block
        for b, plain, out, tag, leaf_version, leaf_tag, leaf_kid in zip(
            range(first_block, first_block + n), views.data, views.out_tagged, views.out_tag,
            views.leaf_version, views.leaf_tag, views.leaf_key_id,
            strict=False,  # the views may cover more than n
        ):
            _pack_into(">QQ", scratch, 16, b, b + delta)
            enc(nonce, plain, aad, out)
            leaf_version[:] = version
            leaf_tag[:] = tag
            leaf_kid[:] = self._key_id_bytes

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
        dec_kid = self.key_id
        dec = self._aead.decrypt_into
        o = lo = 0
        b = first_block
        for i in range(n):
            e = o + BLOCK_SIZE
            v, kid = _unpack_from(">Q16xQ", leaves, lo)
            if kid != dec_kid:  # written in another open of the disk
                dec_kid, dec = kid, self._aead_for(kid).decrypt_into
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

    def decrypt_views(self, first_block: int, views: BlockViews, n: int) -> list[int]:
        """As decrypt, over the first n blocks of views cut beforehand."""
        if n > len(views.out):  # zip() below would quietly stop short
            raise ValueError(f"views for {len(views.out)} blocks cannot decrypt {n}")
        bad: list[int] = []
        scratch, aad, nonce = self._scratch, self._aad, self._nonce
        joined, j_ct, j_tag = self._joined, self._j_ct, self._j_tag
        dec_kid = self.key_id
        dec = self._aead.decrypt_into
        fields = _versions(n).unpack_from(views.leaves)
        for b, cipher, leaf_tag, out, v, kid in zip(
            range(first_block, first_block + n), views.data, views.leaf_tag, views.out,
            fields[0::2], fields[1::2], strict=False,  # the views may cover more than n
        ):
            if kid != dec_kid:  # written in another open of the disk
                dec_kid, dec = kid, self._aead_for(kid).decrypt_into
            if v == 0 or v == POISON_VERSION:
                out[:] = _ZERO_BLOCK
                if v:
                    bad.append(b - first_block)
                continue
            j_ct[:] = cipher
            j_tag[:] = leaf_tag
            _pack_into(">QQ", scratch, 16, b, v)
            try:
                dec(nonce, joined, aad, out)
            except InvalidTag:
                out[:] = _ZERO_BLOCK
                bad.append(b - first_block)
        return bad
