"""SizeLimit: present only the first `size` bytes of a larger backend (nbdkit's truncate filter)."""

from __future__ import annotations

from trustvbd.blockdev import Backend, Buffer, check_range
from trustvbd.blocks.layer import Layer


class SizeLimit(Layer):
    def __init__(self, next: Backend, size: int) -> None:
        super().__init__(next)
        if size > next.size:
            raise ValueError(f"cannot present {size} bytes over a backend of {next.size}")
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def pread(self, offset: int, length: int) -> Buffer:
        check_range(self._size, offset, length)
        return await self.next.pread(offset, length)

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        check_range(self._size, offset, len(data))
        await self.next.pwrite(offset, data, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        check_range(self._size, offset, length)
        await self.next.trim(offset, length, fua)

    async def zero(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
        fast: bool = False,
    ) -> None:
        check_range(self._size, offset, length)
        await self.next.zero(offset, length, fua, may_trim, fast)

    async def cache(self, offset: int, length: int) -> None:
        check_range(self._size, offset, length)
        await self.next.cache(offset, length)
