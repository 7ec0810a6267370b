"""The anchor file: two slots written in place, so a commit costs one fdatasync.

Replacing the file atomically (temp file, fsync, rename, fsync of the directory)
cost ~12 ms on ext4 here, most of a FLUSH; overwriting one 512-byte slot and
fdatasync'ing it costs ~0.5 ms. Each write goes to the slot not holding the
newest anchor, with a sequence number one higher, so a write torn by a crash
leaves the newest complete slot in charge: old or new, never neither.
Byte layout: docs/format.md, section 2.3. A version-1 file (one 92-byte record)
is still read; the first write replaces it atomically with the two-slot form.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

SLOT = 512
SLOTS = 2
_RECORD = struct.Struct(">8sII16sQQQ32s")  # magic, version, seq, disk id, size, epoch, counter, root
_MAGIC = b"TVBDANCR"
_VERSION = 2
RECORD_SIZE = _RECORD.size + 4  # and a CRC-32
Fields = tuple[bytes, int, int, int, bytes]  # disk id, logical size, epoch, counter high, root


def encode_slot(disk_id: bytes, logical_size: int, epoch: int, counter_high: int, root: bytes,
                seq: int) -> bytes:
    body = _RECORD.pack(_MAGIC, _VERSION, seq, disk_id, logical_size, epoch, counter_high, root)
    return (body + struct.pack(">I", zlib.crc32(body))).ljust(SLOT, b"\0")


def decode_slot(raw: bytes) -> tuple[int, Fields] | None:
    """(seq, (disk id, size, epoch, counter high, root)) of a complete slot, else None."""
    record = raw[:RECORD_SIZE]
    if len(record) != RECORD_SIZE or zlib.crc32(record[:-4]) != struct.unpack(">I", record[-4:])[0]:
        return None
    magic, version, seq, disk_id, size, epoch, counter, root = _RECORD.unpack_from(record)
    if magic != _MAGIC or version != _VERSION:
        return None
    return seq, (disk_id, size, epoch, counter, root)


def newest(raw: bytes) -> tuple[int, Fields] | None:
    """(seq, fields) of the newest complete slot of a two-slot file, or None if there is none."""
    found = [got for i in range(SLOTS) if (got := decode_slot(raw[i * SLOT:(i + 1) * SLOT]))]
    if len(found) < 2:
        return found[0] if found else None
    (s0, f0), (s1, f1) = found
    if (s0 - s1) % (1 << 32) == 1:
        return s0, f0
    if (s1 - s0) % (1 << 32) == 1:
        return s1, f1
    return None  # two complete slots that are not one write apart: not written by this code


class AnchorSlots:
    """In-place writes of the two-slot anchor file, once it exists in that form."""

    def __init__(self, path: Path, seq: int) -> None:
        self.path = path
        self.seq = seq  # of the newest slot; slot index = seq % 2
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def write(self, fields: Fields) -> None:
        """Overwrite the older slot with `fields` and sync it: the commit point of a commit."""
        seq = (self.seq + 1) % (1 << 32)
        view = memoryview(encode_slot(*fields, seq=seq))
        offset = (seq % SLOTS) * SLOT
        while view:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done
        os.fdatasync(self._fd)
        self.seq = seq

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def new_file(fields: Fields) -> bytes:
    """A whole two-slot file holding `fields` as sequence 1 (slot 1; slot 0 empty)."""
    return bytes(SLOT) + encode_slot(*fields, seq=1)
