"""Reusable buffers for large WRITE payloads (a server connection's ProtocolCore.pool)."""

from __future__ import annotations

import sys


class BufferPool:
    """Reusable bytearrays for large payloads, so each one is not allocated and zeroed anew.

    The user gives a buffer back with put() only when nothing else refers to it, or
    with give_back() when something still may: the transport holds the buffer it
    received a payload into until buffer_updated() returns, so a request served inline
    from there cannot tell its payload free yet. A given-back buffer is reused from a
    later get() on, once nothing but the pool refers to it (no memoryview, no buffer
    export, no backend keeping it); one still referred to then waits among the given
    back (at most MAX_PER_SIZE of them; past that they are left to the garbage
    collector), so a buffer is never handed out while anything else refers to it.
    """

    MAX_PER_SIZE = 16

    def __init__(self) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._returned: list[bytearray] = []
        self.allocated = 0  # buffers made anew (the rest came from the pool)

    def get(self, size: int) -> bytearray:
        if self._returned:
            self._collect()
        free = self._free.get(size)
        if free:
            return free.pop()
        self.allocated += 1
        return bytearray(size)

    def give_back(self, buf: bytearray | memoryview) -> None:
        """`buf`: a buffer from get(), or a view of one (a received WRITE's payload)."""
        owner = buf.obj if type(buf) is memoryview else buf
        if type(owner) is bytearray and len(self._returned) < self.MAX_PER_SIZE:
            self._returned.append(owner)

    def _collect(self) -> None:
        returned, self._returned = self._returned, []
        for buf in returned:
            # 3 references: the list, `buf`, getrefcount's argument. Any memoryview of
            # it, export of it or holder of it adds one.
            if sys.getrefcount(buf) == 3:
                self.put(buf)
            else:  # still in use (e.g. by the transport's view until its read returns)
                self._returned.append(buf)

    def put(self, buf: bytearray) -> None:
        free = self._free.setdefault(len(buf), [])
        if len(free) < self.MAX_PER_SIZE and len(self._free) <= 8:
            free.append(buf)
