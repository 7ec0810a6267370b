"""WRITEs to a file export: pwritten by the native session as they are parsed (FileBackend,
WritesToFile), or inline (write_now, WritesAtOnce) for FUA ones and whatever the session
hands back; what lands, in what order, what a failing write answers, and a short write,
driven by libnbd and a raw client."""

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
from trustvbd.blockdev import Buffer, WritesAtOnce, WritesToFile, provides
from trustvbd.blocks.file import FileBackend
from trustvbd.nbd import protocol as p
from trustvbd.nbd.exports import Export, StaticExports

MiB = 1 << 20


class CountingFile(FileBackend):
    """A FileBackend that records what the server asked of write_now (offset, length, fua)."""

    def __init__(self, path: str, size: int, fd: int | None = None) -> None:
        super().__init__(path, size, fd=fd)
        self.calls: list[tuple[int, int, bool]] = []

    def write_now(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.calls.append((offset, len(data), fua))
        super().write_now(offset, data, fua)


def test_writes_are_pwritten_natively_and_fua_ones_inline(short_tmp: Path) -> None:
    # Only the FUA write reaches write_now (it needs its fdatasync); the others the native
    # session pwrites as it parses them, the pooled payload too, reused with new contents.
    disk = short_tmp / "disk.img"
    fb = CountingFile(str(disk), 4 * MiB)
    assert provides(fb, WritesAtOnce) and provides(fb, WritesToFile)
    small, large = os.urandom(4096), os.urandom(256 * 1024)  # sliced, and a pooled payload
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        h.pwrite(large, MiB)
        h.pwrite(small, 8192, nbd.CMD_FLAG_FUA)
        h.pwrite(large, 2 * MiB)  # the pooled buffer again, with new contents
        assert h.pread(len(large), MiB) == large
        h.shutdown()
    assert fb.calls == [(8192, 4096, True)]
    data = disk.read_bytes()
    assert data[8192:12288] == small
    assert data[MiB:MiB + len(large)] == data[2 * MiB:2 * MiB + len(large)] == large
    fb.close_now()


def test_writes_keep_their_order_with_requests_python_serves(short_tmp: Path) -> None:
    # One send: a WRITE, a TRIM of a range and a WRITE into that range, then a large WRITE.
    # The first is pwritten natively; once the TRIM goes to Python, no later WRITE of that
    # batch may overtake it, or the second WRITE's data would read back as zeros.
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
        assert sorted(c.simple_reply() for _ in range(4)) == [(0, 1), (0, 2), (0, 3), (0, 4)]
        c.request(p.Cmd.DISC)
        assert c.closed_by_peer()
        c.close()
    assert (0, 4096, False) not in fb.calls  # the first one was done natively
    data = disk.read_bytes()
    assert data[:4096] == first
    assert data[65536:65536 + 4096] == second
    assert data[65536 + 4096:2 * 65536] == bytes(65536 - 4096)
    assert data[MiB:MiB + len(large)] == large
    fb.close_now()


def test_a_failing_write_answers_its_error_and_the_connection_goes_on(short_tmp: Path) -> None:
    # A file the kernel refuses to write (opened read-only behind a writable export): every
    # WRITE fails with EBADF, which NBD carries as EIO; reads go on on the same connection.
    # The native pwrite fails first and hands the WRITE to write_now, which answers it.
    disk = short_tmp / "disk.img"
    disk.write_bytes(b"\x5a" * MiB)
    fb = CountingFile(str(disk), MiB, fd=os.open(disk, os.O_RDONLY))
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        for payload in (b"\x01" * 4096, b"\x02" * (256 * 1024)):
            with pytest.raises(nbd.Error) as err:
                h.pwrite(payload, 0)
            assert err.value.errno == "EIO"
        assert h.pread(4096, 0) == b"\x5a" * 4096
        h.shutdown()
    assert fb.calls == [(0, 4096, False), (0, 256 * 1024, False)]
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
