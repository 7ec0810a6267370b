"""WRITEs to a file export, served by the native loop (FileBackend, ServedFromFile;
nbd/file_serve.py): what lands, in what order, FUA, what a failing write answers, and a
short write, driven by libnbd and a raw client. No WRITE comes to Python at all."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import nbd  # Debian's python3-libnbd, put on sys.path by tests/conftest.py
import pytest

from tests.nbd.helpers import RawClient, ServerThread
from trustvbd.blockdev import Buffer, ServedFromFile, provides
from trustvbd.blocks.file import FileBackend
from trustvbd.nbd import protocol as p
from trustvbd.nbd.exports import Export, StaticExports

MiB = 1 << 20


class CountingFile(FileBackend):
    """A FileBackend that records what the server asked of Python: writes (offset, length,
    fua) and zeroes ("zero", offset, length)."""

    def __init__(self, path: str, size: int, fd: int | None = None) -> None:
        super().__init__(path, size, fd=fd)
        self.calls: list[tuple[object, ...]] = []

    def write_now(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.calls.append((offset, len(data), fua))
        super().write_now(offset, data, fua)

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.calls.append((offset, len(data), fua))
        await super().pwrite(offset, data, fua)

    def zero_now(self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
                 fast: bool = False) -> None:
        self.calls.append(("zero", offset, length))
        super().zero_now(offset, length, fua, may_trim, fast)


def test_writes_fua_ones_too_are_pwritten_natively(short_tmp: Path) -> None:
    # Plain and FUA WRITEs, small and large, and a FLUSH: none reaches Python.
    disk = short_tmp / "disk.img"
    fb = CountingFile(str(disk), 4 * MiB)
    assert provides(fb, ServedFromFile)
    small, large = os.urandom(4096), os.urandom(256 * 1024)
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        h.pwrite(large, MiB)
        h.pwrite(small, 8192, nbd.CMD_FLAG_FUA)
        h.pwrite(large[::-1], 2 * MiB, nbd.CMD_FLAG_FUA)
        h.flush()
        assert h.pread(len(large), MiB) == large
        h.shutdown()
    assert fb.calls == []
    data = disk.read_bytes()
    assert data[8192:12288] == small
    assert data[MiB:MiB + len(large)] == large
    assert data[2 * MiB:2 * MiB + len(large)] == large[::-1]
    fb.close_now()


def test_writes_keep_their_order_with_requests_python_serves(short_tmp: Path) -> None:
    # One send: a WRITE, a TRIM of a range and a WRITE into that range, then a large WRITE.
    # The TRIM goes to Python (zero_now); no later WRITE may overtake it, or the second
    # WRITE's data would read back as zeros.
    disk = short_tmp / "disk.img"
    disk.write_bytes(b"\x5a" * (2 * MiB))
    fb = CountingFile(str(disk), 2 * MiB)
    first, second, large = b"\x01" * 4096, b"\x02" * 4096, os.urandom(256 * 1024)

    def request(cmd: int, cookie: int, offset: int, length: int, data: bytes = b"") -> bytes:
        return struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, cmd, cookie, offset, length) + data

    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop"):
        c = RawClient(str(short_tmp / "s.sock"))
        c.go()
        c.sock.sendall(request(p.Cmd.WRITE, 1, 0, 4096, first)
                       + request(p.Cmd.TRIM, 2, 65536, 65536)
                       + request(p.Cmd.WRITE, 3, 65536, 4096, second)
                       + request(p.Cmd.WRITE, 4, MiB, len(large), large))
        assert [c.simple_reply() for _ in range(4)] == [(0, 1), (0, 2), (0, 3), (0, 4)]
        c.request(p.Cmd.DISC)
        assert c.closed_by_peer()
        c.close()
    assert fb.calls == [("zero", 65536, 65536)]  # the TRIM alone came to Python
    data = disk.read_bytes()
    assert data[:4096] == first
    assert data[65536:65536 + 4096] == second
    assert data[65536 + 4096:2 * 65536] == bytes(65536 - 4096)
    assert data[MiB:MiB + len(large)] == large
    fb.close_now()


def test_a_failing_write_answers_its_error_and_the_connection_goes_on(short_tmp: Path) -> None:
    # A file the kernel refuses to write (opened read-only behind a writable export): every
    # WRITE fails with EBADF, which NBD carries as EIO, its payload read all the same (the
    # next request follows it); reads go on on the same connection. All natively.
    disk = short_tmp / "disk.img"
    disk.write_bytes(b"\x5a" * MiB)
    fb = CountingFile(str(disk), MiB, fd=os.open(disk, os.O_RDONLY))
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        for payload in (b"\x01" * 4096, b"\x02" * (3 * MiB // 4)):
            with pytest.raises(nbd.Error) as err:
                h.pwrite(payload, 0)
            assert err.value.errno == "EIO"
        assert h.pread(4096, 0) == b"\x5a" * 4096
        h.shutdown()
    assert fb.calls == []
    assert disk.read_bytes() == b"\x5a" * MiB
    fb.close_now()


def test_a_short_write_is_finished_or_fails_with_its_cause(short_tmp: Path) -> None:
    # The file size limit (ulimit -f) cuts a pwrite short at the limit; the next one fails
    # with EFBIG. In a child process: the limit applies to the whole process.
    disk = short_tmp / "disk.img"
    script = textwrap.dedent(f"""
        import errno, resource, signal
        from trustvbd.blockdev import BlockError
        from trustvbd.blocks.file import FileBackend
        fb = FileBackend({str(disk)!r}, 2 << 20)  # made whole before the limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        fb.write_now((1 << 20) - 8192, b"a" * 8192)  # up to the limit: whole
        try:
            fb.write_now((1 << 20) - 4096, b"b" * 8192)  # 4096 bytes fit, then EFBIG
        except BlockError as exc:
            print(exc.errno == errno.EFBIG, exc.message)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == f"True write on {disk}: File too large", out.stderr
    data = disk.read_bytes()
    assert data[MiB - 8192:MiB] == b"a" * 4096 + b"b" * 4096  # the part that fit, kept
    assert data[MiB:] == bytes(MiB)


def test_zeros_where_no_hole_can_be_punched_are_written_in_bounded_pieces(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A WRITE_ZEROES (zero_now) on a file system that cannot punch holes writes zeros:
    in pieces within 32 KiB-aligned spans of the file, as the native loop writes WRITEs,
    never one buffer of the whole length (which a 4 GiB request would have allocated)."""
    disk = short_tmp / "disk.img"
    fb = CountingFile(str(disk), 4 * MiB)
    fb.write_now(0, b"\xff" * (4 * MiB))
    fb.calls.clear()

    def cannot_punch(fd: int, offset: int, length: int) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr("trustvbd.blocks.file.punch_hole", cannot_punch)
    offset, length = 5000, MiB + 3000
    fb.zero_now(offset, length)
    writes: list[tuple[int, int]] = []
    for off, n, _ in fb.calls[1:]:  # (after zero_now's own record)
        assert isinstance(off, int) and isinstance(n, int)
        writes.append((off, n))
    assert sum(n for _, n in writes) == length
    assert all(off // 32768 == (off + n - 1) // 32768 and n <= 32768 for off, n in writes)
    assert len(writes) == 33  # to the first 32 KiB boundary, 31 whole pieces, the rest
    data = disk.read_bytes()
    assert data[offset:offset + length] == bytes(length)
    assert data[offset - 1] == data[offset + length] == 0xff
    fb.close_now()
