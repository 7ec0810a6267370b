"""The two-slot anchor file: in-place writes, a torn slot never loses the anchor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trustvbd.blocks import anchor_file
from trustvbd.blocks.disk_state import Anchor, DiskState, TrustedStateError

DISK_ID = bytes(range(16))


def anchor(epoch: int, counter: int = 100) -> Anchor:
    return Anchor(DISK_ID, 1 << 30, epoch, counter, bytes([epoch % 256]) * 32)


def state(tmp_path: Path) -> DiskState:
    s = DiskState(tmp_path, "d")
    s.dir.mkdir(parents=True, exist_ok=True)
    return s


def test_writes_alternate_slots_in_place_and_the_newest_counts(tmp_path: Path) -> None:
    s = state(tmp_path)
    s.write_anchor(anchor(0))
    inode = os.stat(s.anchor_path).st_ino
    for epoch in range(1, 6):
        s.write_anchor(anchor(epoch, 100 + epoch))
        assert s.read_anchor() == anchor(epoch, 100 + epoch)
        assert DiskState(tmp_path, "d").read_anchor() == anchor(epoch, 100 + epoch)  # a fresh reader
    assert os.stat(s.anchor_path).st_ino == inode  # no rename after the first write
    assert os.path.getsize(s.anchor_path) == 1024
    s.close()
    s = state(tmp_path)  # a reopened state goes on from the newest slot
    s.write_anchor(anchor(6))
    s.write_anchor(anchor(2))  # last write wins, even going back (a restored backup)
    assert s.read_anchor() == anchor(2)


def test_a_torn_slot_leaves_the_previous_anchor(tmp_path: Path) -> None:
    s = state(tmp_path)
    s.write_anchor(anchor(1))
    s.write_anchor(anchor(2))
    raw = bytearray(s.anchor_path.read_bytes())
    newest = 2 % 2  # slot index = sequence number % 2; anchor 2 is sequence 2
    raw[newest * 512 + 70] ^= 0xFF  # the crash hit the write of anchor 2
    s.anchor_path.write_bytes(bytes(raw))
    assert DiskState(tmp_path, "d").read_anchor() == anchor(1)
    raw[(1 - newest) * 512 + 3] ^= 0xFF
    s.anchor_path.write_bytes(bytes(raw))
    with pytest.raises(TrustedStateError, match="corrupt"):
        DiskState(tmp_path, "d").read_anchor()


def test_version_1_file_is_read_and_replaced_by_the_two_slot_form(tmp_path: Path) -> None:
    s = state(tmp_path)
    s.anchor_path.write_bytes(anchor(7).encode())  # what earlier versions wrote (92 bytes)
    assert s.read_anchor() == anchor(7)
    s.write_anchor(anchor(8))
    assert os.path.getsize(s.anchor_path) == 1024 and s.read_anchor() == anchor(8)


def test_sequence_numbers_wrap(tmp_path: Path) -> None:
    fields = (DISK_ID, 4096, 3, 9, bytes(32))
    raw = anchor_file.encode_slot(*fields, seq=0) + anchor_file.encode_slot(*fields[:2], 2, 9,
                                                                          bytes(32), seq=2**32 - 1)
    assert anchor_file.newest(raw) == (0, (*fields, None))  # 0 follows 2^32 - 1
    same = anchor_file.encode_slot(*fields, seq=5) * 2
    assert anchor_file.newest(same) is None  # two slots of one write: not ours


def test_replica_entries_round_trip_and_a_bad_entry_is_incomplete(tmp_path: Path) -> None:
    from trustvbd.blocks.disk_state import Member, replica_id

    s = state(tmp_path)
    members = ((replica_id("a"), Member.CURRENT), (replica_id("b"), Member.BEHIND))
    full = Anchor(DISK_ID, 1 << 30, 4, 100, bytes(32), members)
    s.write_anchor(anchor(3))
    s.write_anchor(full)
    got = DiskState(tmp_path, "d").read_anchor()
    assert got == full and got.member("b") is Member.BEHIND and got.member("c") is None
    raw = bytearray(s.anchor_path.read_bytes())
    slot = 0 if raw[8:12] == b"\0\0\0\3" else 512
    raw[slot + 92] = 9  # a state that does not exist: that slot is not complete
    s.anchor_path.write_bytes(bytes(raw))
    assert DiskState(tmp_path, "d").read_anchor() == anchor(3)
