"""The wire format between the encryption domain and its AEAD workers (no I/O here).

AES-GCM from `cryptography` releases the GIL, but per 4 KiB block the Python
around each call holds it longer than the call itself, so threads only take
turns. Bulk AEAD therefore runs in worker processes that belong to the
encryption domain (same trust, same keys) and share memory with it:

- one memfd, cut into SLOTS slots of SLOT_SIZE bytes; a slot is
  IN (MAX_BLOCKS*4096 + 16) | OUT (same) | LEAVES (MAX_BLOCKS*32);
- messages on a SOCK_SEQPACKET socketpair, one datagram each, little-endian:

  key      b"K" disk u32, data_key 32 bytes, disk_id 16 bytes, key id u64 (this open's)
  forget   b"F" disk u32
  encrypt  b"E" job u32, disk u32, slot u32, n u32, first_block u64, first_version u64
           IN holds n plaintext blocks; the worker writes ciphertext to OUT and
           n leaves to LEAVES.
  decrypt  b"D" same fields (first_version 0); IN holds ciphertext, LEAVES the
           leaves; the worker decrypts IN in place.
  reply    job u32, status u8 (0 ok, 1 refused), count u32, count x u32 bad
           block indices (decrypt) — a refused job (unknown disk, bad sizes) is
           done again by the parent itself.
"""

from __future__ import annotations

import struct

from trustvbd.crypt.aead import BLOCK_SIZE, LEAF_SIZE, TAG_SIZE

MAX_BLOCKS = 64  # 256 KiB per job: bigger requests are cut into several jobs
SLOTS = 128
DATA_BYTES = MAX_BLOCKS * BLOCK_SIZE + TAG_SIZE
OUT_OFFSET = DATA_BYTES
LEAVES_OFFSET = 2 * DATA_BYTES
SLOT_SIZE = LEAVES_OFFSET + MAX_BLOCKS * LEAF_SIZE

KEY = struct.Struct("<cI32s16sQ")
FORGET = struct.Struct("<cI")
JOB = struct.Struct("<cIIIIQQ")
REPLY = struct.Struct("<IBI")
MAX_MESSAGE = REPLY.size + 4 * MAX_BLOCKS

OP_KEY, OP_FORGET, OP_ENCRYPT, OP_DECRYPT = b"K", b"F", b"E", b"D"
STATUS_OK, STATUS_REFUSED = 0, 1


def encode_reply(job: int, status: int, bad: list[int]) -> bytes:
    return REPLY.pack(job, status, len(bad)) + struct.pack(f"<{len(bad)}I", *bad)


def decode_reply(msg: bytes) -> tuple[int, int, list[int]]:
    """(job, status, bad indices); ValueError if the datagram is not a whole reply."""
    if len(msg) < REPLY.size:
        raise ValueError(f"AEAD worker reply of {len(msg)} bytes is too short")
    job, status, count = REPLY.unpack_from(msg)
    if count > MAX_BLOCKS or len(msg) != REPLY.size + 4 * count:
        raise ValueError(f"AEAD worker reply for job {job} has a bad length")
    return job, status, list(struct.unpack_from(f"<{count}I", msg, REPLY.size))
