"""A Backend over a regular (sparse) file: what the untrusted driver domain serves.

The driver's connections are served natively once attached (ServedFromFile,
nbd/file_serve.py): their READs, WRITEs and FLUSHes go to `file_fd()` on a thread of
their own, the rare requests to the `*_now` methods from that thread. The coroutines
below serve a FileBackend any other way (TLS, a memory budget, an idle timeout; the
driver domain has none), inline on the event loop: on a page-cached file a thread hop
costs more than the system call (bench/README.md).
The driver uses several processes instead (domains/driver.py). A slow disk stalls
only this driver, and the trusted side times its requests out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from trustvbd.blockdev import HOLE, ZERO, BlockError, Buffer, Capabilities, check_range

_STATUS_EXTENTS = 1024  # per BLOCK_STATUS call: the client asks again for the rest
# Zeros where no hole can be punched are written in pieces within PIECE-aligned spans, as
# the native loop writes WRITEs (file_serve.rs PIECE): small page-cache folios, and one
# PIECE of memory for a WRITE_ZEROES of any length.
PIECE = 32 * 1024
_ZEROS = memoryview(bytes(PIECE))
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range (it then reads as zeros); raise OSError if unsupported."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackend:
    """One file, one export. The file is created sparse at `size` if missing."""

    def __init__(self, path: str, size: int | None = None, read_only: bool = False,
                 fd: int | None = None) -> None:
        """`fd`: an already open file (handed over by the launcher); `path` then only names it."""
        flags = os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT
        self.path = path
        self._fd = os.open(path, flags | os.O_CLOEXEC, 0o600) if fd is None else fd
        current = os.fstat(self._fd).st_size
        if size is None:
            size = current
        elif current < size:
            if read_only:
                os.close(self._fd)
                raise OSError(errno.EINVAL, f"{path} is {current} bytes, smaller than {size}")
            os.ftruncate(self._fd, size)
        self._size = size
        self._caps = Capabilities(read_only=read_only, fast_zero=True)

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def _io_error(self, what: str, exc: OSError) -> BlockError:
        return BlockError(exc.errno or errno.EIO, f"{what} on {self.path}: {exc.strerror}")

    async def pread(self, offset: int, length: int) -> Buffer:
        return self.read_now(offset, length)

    def read_now(self, offset: int, length: int) -> Buffer:
        """pread without a coroutine."""
        check_range(self._size, offset, length)
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise self._io_error("read", exc) from exc
        if len(data) < length:  # past the end of a file someone shrank: zeros
            data += bytes(length - len(data))
        return data

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.write_now(offset, data, fua)

    def write_now(self, offset: int, data: Buffer, fua: bool = False) -> None:
        """pwrite without a coroutine (also zero_now's where no hole can be punched)."""
        check_range(self._size, offset, len(data))
        try:
            done = os.pwrite(self._fd, data, offset)
            if done < len(data):  # short (a signal, a full disk): the rest, or its error
                self._pwrite_rest(memoryview(data)[done:], offset + done)
            if fua:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise self._io_error("write", exc) from exc

    def _pwrite_rest(self, view: memoryview, offset: int) -> None:
        while view:
            done = os.pwrite(self._fd, view, offset)
            view = view[done:]
            offset += done

    async def flush(self) -> None:
        self._sync("flush")

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.zero(offset, length, fua, may_trim=True)

    async def zero(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
        fast: bool = False,
    ) -> None:
        self.zero_now(offset, length, fua, may_trim, fast)

    def zero_now(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
        fast: bool = False,
    ) -> None:
        """ServedFromFile: `zero` without a coroutine."""
        check_range(self._size, offset, length)
        try:
            punch_hole(self._fd, offset, length)
        except OSError as exc:
            if fast:
                raise BlockError(errno.ENOTSUP, "this file system cannot punch holes") from exc
            self._write_zeros(offset, length)
        if fua:
            self._sync("flush")

    def _write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(PIECE - offset % PIECE, end - offset)
            self.write_now(offset, _ZEROS[:n])
            offset += n

    def _sync(self, what: str) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise self._io_error(what, exc) from exc

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.block_status_now(offset, length)

    def block_status_now(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The file's holes (SEEK_DATA/SEEK_HOLE) as HOLE|ZERO, the rest data; all data
        where the file system cannot tell."""
        check_range(self._size, offset, length)
        end, pos = offset + length, offset
        out: list[tuple[int, int]] = []
        try:
            while pos < end and len(out) < _STATUS_EXTENTS:
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = end  # nothing but hole from here to the end of the file
                if data > pos:
                    n = min(data, end) - pos
                    out.append((n, HOLE | ZERO))
                else:
                    n = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end) - pos
                    out.append((n, 0))
                pos += n
        except OSError:
            out.append((end - pos, 0))  # cannot tell: data is always a true answer
        return out

    async def cache(self, offset: int, length: int) -> None:
        self.cache_now(offset, length)

    def cache_now(self, offset: int, length: int) -> None:
        check_range(self._size, offset, length)
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def file_fd(self) -> int:
        """ServedFromFile: the server serves a connection natively on a duplicate of it."""
        return self._fd

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class MemoryBackend:
    """A Backend in memory: for tests of layers and protocol code."""

    def __init__(self, size: int) -> None:
        self._data = bytearray(size)
        self._caps = Capabilities(fast_zero=True)
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    async def pread(self, offset: int, length: int) -> Buffer:
        check_range(self.size, offset, length)
        return bytes(self._data[offset:offset + length])

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        check_range(self.size, offset, len(data))
        self._data[offset:offset + len(data)] = data

    async def flush(self) -> None:
        self.flushes += 1

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.zero(offset, length)

    async def zero(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
        fast: bool = False,
    ) -> None:
        check_range(self.size, offset, length)
        self._data[offset:offset + length] = bytes(length)

    async def cache(self, offset: int, length: int) -> None:
        check_range(self.size, offset, length)

    async def close(self) -> None:
        pass
