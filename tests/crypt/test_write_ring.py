"""The replica set's ciphertext ring (blocks/write_ring.py): slots held until given
back, none when all are taken (the caller sends plain WRITEs), and a new ring when a
writer leaves, the old one released only once its last slot is given back."""

from __future__ import annotations

import os

from trustvbd.blocks.write_ring import SLOT, WriteRing

KiB = 1024


def test_a_slot_is_never_handed_out_twice_until_given_back() -> None:
    ring = WriteRing(slots=2)
    a = ring.take(b"a" * (256 * KiB))
    b = ring.take(b"b" * (64 * KiB))
    assert a is not None and b is not None and a[1] != b[1]
    assert ring.take(b"c" * (128 * KiB)) is None  # a driver that never answers holds a
    ring.give_back(*b)
    c = ring.take(b"c" * (128 * KiB))
    assert c is not None and c[1] == b[1]
    gen, at = a
    assert gen.map[at:at + 4] == b"aaaa"  # untouched while held
    ring.give_back(*a)
    ring.give_back(*c)
    ring.close()


def test_small_and_oversized_writes_take_no_slot() -> None:
    ring = WriteRing(slots=2)
    assert ring.take(b"x" * 4096) is None  # runs behind, single blocks: plain
    assert ring.take(b"x" * (SLOT + 4096)) is None
    ring.close()


def test_a_writer_leaving_makes_a_new_ring_and_the_old_goes_when_its_slots_do() -> None:
    ring = WriteRing(slots=2)
    ring.writers_changed(frozenset({1, 2}))
    first = ring.id
    held = ring.take(b"h" * (64 * KiB))
    assert held is not None
    ring.writers_changed(frozenset({1, 2, 3}))  # one joined: the same ring
    assert ring.id == first
    ring.writers_changed(frozenset({1, 3}))  # one left: it must see nothing written after
    assert ring.id != first
    old = held[0]
    assert not old.map.closed  # its write still running
    fd, _ = ring.offer()
    assert os.fstat(fd).st_ino == ring.id
    os.close(fd)
    ring.give_back(*held)
    assert old.map.closed
    ring.close()
