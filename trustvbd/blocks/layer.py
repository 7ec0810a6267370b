"""The pass-through layer base, and reading into a buffer from any backend.

A `Layer` wraps a `Backend` (its `next`) and intercepts only the calls it
cares about, the way nbdkit filters stack. The vocabulary (Backend, Buffer,
BlockError, ...) is in trustvbd/blockdev.py.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Coroutine
from typing import Any, cast

from trustvbd.blockdev import Backend, BlockError, Buffer, Capabilities, ReadsInto, provides

ReadInto = Callable[[int, memoryview], Coroutine[Any, Any, None]]


class Layer:
    """Pass every call to `next`; subclasses override what they intercept."""

    def __init__(self, next: Backend) -> None:
        self.next = next

    @property
    def size(self) -> int:
        return self.next.size

    @property
    def capabilities(self) -> Capabilities:
        return self.next.capabilities

    async def pread(self, offset: int, length: int) -> Buffer:
        return await self.next.pread(offset, length)

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self.next.pwrite(offset, data, fua)

    async def flush(self) -> None:
        await self.next.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.next.trim(offset, length, fua)

    async def zero(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
        fast: bool = False,
    ) -> None:
        await self.next.zero(offset, length, fua, may_trim, fast)

    async def cache(self, offset: int, length: int) -> None:
        await self.next.cache(offset, length)

    async def close(self) -> None:
        await self.next.close()


def reader_into(backend: Backend) -> ReadInto:
    """How to read into a caller's buffer from `backend`: straight off the wire where
    it can (ReadsInto, the NBD client), else a read and a copy. Resolve once, call often
    (ReplicaLink resolves per read: its connection may have been replaced)."""
    if provides(backend, ReadsInto):
        return cast(ReadsInto, backend).pread_into

    async def copy_into(offset: int, into: memoryview) -> None:
        data = await backend.pread(offset, into.nbytes)
        if len(data) != into.nbytes:
            raise BlockError(errno.EIO, f"backend returned {len(data)} bytes for a "
                             f"{into.nbytes}-byte read")
        into[:] = data

    return copy_into
