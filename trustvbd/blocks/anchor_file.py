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

from trustvbd.fileops import OS_FILES, FileOps

SLOT = 512
SLOTS = 2
_RECORD = struct.Struct(">8sII16sQQQ32s")  # magic, version, seq, disk id, size, epoch, counter, root
_MAGIC = b"TVBDANCR"
_VERSION = 2          # no replica membership
_VERSION_MEMBERS = 3  # then a replica count and (state, replica id) entries
_ENTRY = struct.Struct(">B16s")
MAX_MEMBERS = 8
RECORD_SIZE = _RECORD.size + 4  # and a CRC-32 (version 2)
Members = tuple[tuple[bytes, int], ...] | None  # (replica id, state 1..3); None: not recorded
Fields = tuple[bytes, int, int, int, bytes, Members]  # disk id, size, epoch, counter high, root


def encode_slot(disk_id: bytes, logical_size: int, epoch: int, counter_high: int, root: bytes,
                members: Members = None, *, seq: int) -> bytes:
    version = _VERSION if members is None else _VERSION_MEMBERS
    body = _RECORD.pack(_MAGIC, version, seq, disk_id, logical_size, epoch, counter_high, root)
    if members is not None:
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"{len(members)} replicas; at most {MAX_MEMBERS}")
        body += struct.pack(">I", len(members))
        body += b"".join(_ENTRY.pack(state, rid) for rid, state in members)
    return (body + struct.pack(">I", zlib.crc32(body))).ljust(SLOT, b"\0")


def decode_slot(raw: bytes) -> tuple[int, Fields] | None:
    """(seq, (disk id, size, epoch, counter high, root, members)) of a complete slot, else None."""
    if len(raw) < RECORD_SIZE:
        return None
    magic, version, seq, disk_id, size, epoch, counter, root = _RECORD.unpack_from(raw)
    if magic != _MAGIC or version not in (_VERSION, _VERSION_MEMBERS):
        return None
    end = _RECORD.size
    members: Members = None
    if version == _VERSION_MEMBERS:
        (count,) = struct.unpack_from(">I", raw, end)
        if count > MAX_MEMBERS:
            return None
        entries = [_ENTRY.unpack_from(raw, end + 4 + i * _ENTRY.size) for i in range(count)]
        end += 4 + count * _ENTRY.size
        if any(state not in (1, 2, 3) for state, _ in entries):
            return None
        members = tuple((rid, state) for state, rid in entries)
    if zlib.crc32(raw[:end]) != struct.unpack_from(">I", raw, end)[0]:
        return None
    return seq, (disk_id, size, epoch, counter, root, members)


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

    def __init__(self, path: Path, seq: int, ops: FileOps = OS_FILES) -> None:
        self.path = path
        self.seq = seq  # of the newest slot; slot index = seq % 2
        self._ops = ops  # tests cut the power here (trustvbd/fileops.py)
        self._fd = ops.open(path, os.O_RDWR)

    def write(self, fields: Fields) -> None:
        """Overwrite the older slot with `fields` and sync it: the commit point of a commit."""
        seq = (self.seq + 1) % (1 << 32)
        view = memoryview(encode_slot(*fields, seq=seq))
        offset = (seq % SLOTS) * SLOT
        while view:
            done = self._ops.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done
        self._ops.fdatasync(self._fd)
        self.seq = seq

    def close(self) -> None:
        if self._fd >= 0:
            self._ops.close(self._fd)
            self._fd = -1


def new_file(fields: Fields) -> bytes:
    """A whole two-slot file holding `fields` as sequence 1 (slot 1; slot 0 empty)."""
    return bytes(SLOT) + encode_slot(*fields, seq=1)
