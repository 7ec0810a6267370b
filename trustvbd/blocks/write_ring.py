"""The ciphertext ring a replica set's drivers map read-only (docs/driver-ring.md, #11).

With two or more writers, a large write's ciphertext is copied once into a slot of the
ring, and each driver that agreed the ring is sent a 16-byte descriptor instead of the
payload: the encryption domain copies it once, not once per replica socket. Only
ciphertext enters the ring (the caller seals in its own memory; never in place here,
where every driver reads). A slot is reused only once the write that took it ended:
every writer answered, or its link was cut off.

A driver whose link is dropped keeps its mapping until its connection ends: when a
writer leaves the set, the ring is replaced (`writers_changed`), and links connected
since are offered the new one; the others were given the old one, so writes go as
plain WRITEs until every writer holds the current ring. A ring's memory is released
once none of its slots is in use.
"""

from __future__ import annotations

import logging
import mmap
import os

from trustvbd.blockdev import Buffer
from trustvbd.nbd.ring import make_ring

log = logging.getLogger(__name__)

SLOT = 256 << 10  # nbdcopy's requests; larger writes go as plain WRITEs
SLOTS = 64
RING_MIN = 64 << 10  # smaller writes (runs behind, single blocks) are not worth a slot


def enabled() -> bool:
    """TRUSTVBD_RING=0 turns the ring off (a benchmark's A/B); it is on by default."""
    return os.environ.get("TRUSTVBD_RING", "1") != "0"


class _Generation:
    def __init__(self, size: int) -> None:
        rw, self.ro = make_ring(size)
        try:
            self.map = mmap.mmap(rw, size, flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(rw)
        self.size = size
        self.id = os.fstat(self.ro).st_ino  # what a connection that agreed it records
        self.free = list(range(size - SLOT, -1, -SLOT))
        self.taken = 0
        self.retired = False

    def release(self) -> None:
        self.map.close()
        os.close(self.ro)


class WriteRing:
    """The current ring of one replica set, and its slots."""

    def __init__(self, slots: int = SLOTS) -> None:
        self._size = slots * SLOT
        self._gen = _Generation(self._size)
        self._writers: frozenset[int] | None = None
        self.replaced = 0

    @property
    def id(self) -> int:
        return self._gen.id

    def offer(self) -> tuple[int, int]:
        """(read-only descriptor, size) for a link connecting now: a duplicate, the
        caller's to close (the ring may be replaced while it connects)."""
        return os.dup(self._gen.ro), self._size

    def writers_changed(self, writers: frozenset[int]) -> None:
        """The set's writers are now these (ids): a new ring if one of them left."""
        old, self._writers = self._writers, writers
        if old is None or writers >= old:
            return
        gen, self._gen = self._gen, _Generation(self._size)
        self.replaced += 1
        gen.retired = True
        if gen.taken == 0:
            gen.release()
        log.info("write ring: a writer left; a new ring (%d replaced)", self.replaced)

    def take(self, data: Buffer) -> tuple[_Generation, int] | None:
        """A slot holding a copy of `data`, or None (too small or large, none free)."""
        n = len(data)  # type: ignore[arg-type]
        gen = self._gen
        if not RING_MIN <= n <= SLOT or not gen.free:
            return None
        at = gen.free.pop()
        gen.map[at:at + n] = data
        gen.taken += 1
        return gen, at

    @staticmethod
    def give_back(gen: _Generation, at: int) -> None:
        gen.free.append(at)
        gen.taken -= 1
        if gen.retired and gen.taken == 0:
            gen.release()

    def close(self) -> None:
        self._gen.retired = True
        if self._gen.taken == 0:
            self._gen.release()
