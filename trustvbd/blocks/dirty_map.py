"""The stored dirty map of a replica that is behind (STATE_DIR/disks/NAME/behind/R).

Version 3 (written): the blocks as runs (first block, block count), so the file grows
with the runs of a BlockRuns (block_runs.py, at most MAX_RUNS: 1 MiB), never with the
disk: a commit while a replica is behind writes O(the map), not O(disk); and a flag
saying the replica is being rebuilt whole, so that a rebuild cut short by a restart is
taken up again, not refused as data that is not ours (its superblocks stay blank until
it joins). Version 2 (the runs, no flags) and version 1 (a bitmap of every block of the
disk: 512 MiB at 16 TiB) are still read. Byte layouts: docs/format.md 2.7. Sans-I/O:
bytes in, bytes out (disk_state.py does the files).
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from array import array
from typing import NamedTuple

from trustvbd.blocks.block_runs import BlockRuns
from trustvbd.blocks.state_checks import crc_at

_HEADER = struct.Struct(">8sIIQQ")  # magic, version, runs (v2; v1: zero), since, blocks
_MAGIC = b"TVBDBHND"
_FLAGS = struct.Struct(">I")  # version 3: after the header
_REBUILDING = 1  # flag bit 0: being rebuilt whole
_RUN = 16  # first block u64, block count u64
# Bytes of a version-1 bitmap looked at for set bits in one go (zero spans are skipped in C).
_V1_CHUNK = 1 << 20
_SET_BYTES = re.compile(rb"[^\x00]+")


class StoredMap(NamedTuple):
    since: int          # the last epoch the replica took whole
    blocks: BlockRuns   # the blocks it may lack
    rebuilding: bool    # being rebuilt whole (version 3 flag; False in older versions)


def encode(since: int, blocks: int, dirty: BlockRuns, rebuilding: bool = False) -> bytes:
    """Version 3: the header, the flags, the runs, a CRC-32 of all before it."""
    body = array("q")
    for b0, b1 in dirty.runs():
        body.append(b0)
        body.append(b1 - b0)
    if sys.byteorder == "little":
        body.byteswap()
    out = (_HEADER.pack(_MAGIC, 3, dirty.run_count, since, blocks)
           + _FLAGS.pack(_REBUILDING if rebuilding else 0) + body.tobytes())
    return out + struct.pack(">I", zlib.crc32(out))


def decode(raw: bytes, blocks: int) -> StoredMap | None:
    """The map, or None if `raw` is not a whole map of any version for a disk of `blocks`
    blocks (then the replica is rebuilt whole)."""
    if len(raw) < _HEADER.size + 4 or zlib.crc32(memoryview(raw)[:-4]) != crc_at(raw, len(raw) - 4):
        return None
    magic, version, nruns, since, count = _HEADER.unpack_from(raw)
    if magic != _MAGIC or count != blocks:
        return None
    flags = 0
    if version == 1:
        got = _decode_bitmap(raw, blocks)
    elif version == 2:
        got = _decode_runs(raw, _HEADER.size, nruns, blocks)
    elif version == 3 and len(raw) >= _HEADER.size + _FLAGS.size + 4:
        (flags,) = _FLAGS.unpack_from(raw, _HEADER.size)
        if flags & ~_REBUILDING:  # a flag this reader does not know: not a map it can trust
            return None
        got = _decode_runs(raw, _HEADER.size + _FLAGS.size, nruns, blocks)
    else:
        return None
    return None if got is None else StoredMap(since, got, bool(flags & _REBUILDING))


def _decode_runs(raw: bytes, at: int, nruns: int, blocks: int) -> BlockRuns | None:
    """The runs from byte `at` on (version 2 and 3)."""
    if len(raw) != at + _RUN * nruns + 4:
        return None
    body = array("q", raw[at:-4])
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
