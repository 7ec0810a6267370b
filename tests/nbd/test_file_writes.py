"""WRITEs to a file export, served inline (FileBackend.write_now, WritesAtOnce): what lands,
what a failing write answers, and a short write, driven by libnbd."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbd  # Debian's python3-libnbd, put on sys.path by tests/conftest.py
import pytest

from tests.nbd.helpers import ServerThread
from trustvbd.blockdev import Buffer, WritesAtOnce, provides
from trustvbd.blocks.file import FileBackend
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


def test_writes_land_inline_with_fua_passed_on(short_tmp: Path) -> None:
    disk = short_tmp / "disk.img"
    fb = CountingFile(str(disk), 4 * MiB)
    assert provides(fb, WritesAtOnce)
    small, large = os.urandom(4096), os.urandom(256 * 1024)  # sliced, and a pooled payload
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        h.pwrite(large, MiB)
        h.pwrite(small, 8192, nbd.CMD_FLAG_FUA)
        h.pwrite(large, 2 * MiB)  # the pooled buffer again, with new contents
        assert h.pread(len(large), MiB) == large
        h.shutdown()
    assert fb.calls == [(MiB, len(large), False), (8192, 4096, True), (2 * MiB, len(large), False)]
    data = disk.read_bytes()
    assert data[8192:12288] == small
    assert data[MiB:MiB + len(large)] == data[2 * MiB:2 * MiB + len(large)] == large
    fb.close_now()


def test_a_failing_write_answers_its_error_and_the_connection_goes_on(short_tmp: Path) -> None:
    # A file the kernel refuses to write (opened read-only behind a writable export): every
    # WRITE fails with EBADF, which NBD carries as EIO; reads go on on the same connection.
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
