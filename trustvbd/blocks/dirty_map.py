"""The stored dirty map of a replica that is behind (STATE_DIR/disks/NAME/behind/R).

Version 2 (written): the blocks as runs (first block, block count), so the file grows
with the runs of a BlockRuns (block_runs.py, at most MAX_RUNS: 1 MiB), never with the
disk: a commit while a replica is behind writes O(the map), not O(disk). Version 1 (a
bitmap of every block of the disk: 512 MiB at 16 TiB) is still read. Byte layouts:
docs/format.md 2.7. Sans-I/O: bytes in, bytes out (disk_state.py does the files).
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from array import array

from trustvbd.blocks.block_runs import BlockRuns
from trustvbd.blocks.state_checks import crc_at

_HEADER = struct.Struct(">8sIIQQ")  # magic, version, runs (v2; v1: zero), since, blocks
_MAGIC = b"TVBDBHND"
_RUN = 16  # first block u64, block count u64
# Bytes of a version-1 bitmap looked at for set bits in one go (zero spans are skipped in C).
_V1_CHUNK = 1 << 20
_SET_BYTES = re.compile(rb"[^\x00]+")


def encode(since: int, blocks: int, dirty: BlockRuns) -> bytes:
    """Version 2: the header, the runs, a CRC-32 of all before it."""
    body = array("q")
    for b0, b1 in dirty.runs():
        body.append(b0)
        body.append(b1 - b0)
    if sys.byteorder == "little":
        body.byteswap()
    out = _HEADER.pack(_MAGIC, 2, dirty.run_count, since, blocks) + body.tobytes()
    return out + struct.pack(">I", zlib.crc32(out))


def decode(raw: bytes, blocks: int) -> tuple[int, BlockRuns] | None:
    """(the epoch it was written for, the blocks), or None if `raw` is not a whole map of
    either version for a disk of `blocks` blocks (then the replica is rebuilt whole)."""
    if len(raw) < _HEADER.size + 4 or zlib.crc32(memoryview(raw)[:-4]) != crc_at(raw, len(raw) - 4):
        return None
    magic, version, nruns, since, count = _HEADER.unpack_from(raw)
    if magic != _MAGIC or count != blocks:
        return None
    if version == 1:
        got = _decode_bitmap(raw, blocks)
    elif version == 2:
        got = _decode_runs(raw, nruns, blocks)
    else:
        return None
    return None if got is None else (since, got)


def _decode_runs(raw: bytes, nruns: int, blocks: int) -> BlockRuns | None:
    if len(raw) != _HEADER.size + _RUN * nruns + 4:
        return None
    body = array("q", raw[_HEADER.size:-4])
    if sys.byteorder == "little":
        body.byteswap()
    out = BlockRuns()
    end = 0
    for i in range(0, len(body), 2):
        first, n = body[i], body[i + 1]
        if first < end or n < 1 or first + n > blocks:  # out of order, empty or past the disk
            return None
        out.add(first, first + n)
        end = first + n
    return out


def _decode_bitmap(raw: bytes, blocks: int) -> BlockRuns | None:
    """Version 1: bit b mod 8 of byte b div 8 (least significant first) set = block b."""
    if len(raw) != _HEADER.size + -(-blocks // 8) + 4:
        return None
    bits = memoryview(raw)[_HEADER.size:-4]
    out = BlockRuns()
    for c0 in range(0, len(bits), _V1_CHUNK):
        chunk = bits[c0:c0 + _V1_CHUNK].tobytes()
        for m in _SET_BYTES.finditer(chunk):
            for at in range(m.start(), m.end()):
                byte, base = chunk[at], (c0 + at) * 8
                for j in range(8):
                    if byte >> j & 1:
                        out.add(base + j, base + j + 1)
    out.discard(blocks, blocks + 8)  # padding bits of the last byte (never set by a writer)
    return out
