"""The block-device interface every layer speaks, and the pass-through layer base.

Modelled on nbdkit's plugin/filter split: a `Backend` is anything that stores
bytes at offsets (a file, an NBD server, another layer); a `Layer` wraps a
`Backend` (its `next`) and intercepts only the calls it cares about.

All offsets and lengths are in bytes. Callers (the NBD server) have already
checked that a request lies inside `size`; a backend may still check again.
Errors are raised as `BlockError` carrying an errno value, which the NBD
server maps to an NBD error code for that one request.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview


class BlockError(Exception):
    """A request failed; `errno` says how (EIO, EINVAL, ENOSPC, EPERM, ENOTSUP, ...)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message

    def __str__(self) -> str:
        return f"{errno.errorcode.get(self.errno, self.errno)}: {self.message}"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the NBD server advertises exactly these flags."""

    read_only: bool = False
    flush: bool = True
    fua: bool = True
    trim: bool = True
    zero: bool = True
    fast_zero: bool = False
    cache: bool = True
    # True only if a FLUSH on any connection persists writes completed on all
    # connections to the same backend object (true when they share one object).
    multi_conn: bool = True


@runtime_checkable
class Backend(Protocol):
    """An asynchronous block device."""

    @property
    def size(self) -> int: ...

    @property
    def capabilities(self) -> Capabilities: ...

    async def pread(self, offset: int, length: int) -> Buffer: ...

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int, fua: bool = False) -> None: ...

    async def zero(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
        fast: bool = False,
    ) -> None:
        """Write zeros. With `fast`, raise BlockError(ENOTSUP) unless it is cheap."""
        ...

    async def cache(self, offset: int, length: int) -> None: ...

    async def close(self) -> None: ...


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


async def pread_into(backend: Backend, offset: int, into: memoryview) -> None:
    """Read into a caller's buffer: straight off the wire where the backend can (NBD), else a copy."""
    direct = getattr(backend, "pread_into", None)
    if direct is not None:
        await direct(offset, into)
        return
    data = await backend.pread(offset, into.nbytes)
    if len(data) != into.nbytes:
        raise BlockError(errno.EIO, f"backend returned {len(data)} bytes for a {into.nbytes}-byte read")
    into[:] = data


def check_range(size: int, offset: int, length: int) -> None:
    """Raise EINVAL unless [offset, offset+length) lies inside a device of `size`."""
    if offset < 0 or length < 0 or offset + length > size:
        raise BlockError(
            errno.EINVAL, f"request [{offset}, {offset + length}) is outside the device of {size} bytes"
        )
