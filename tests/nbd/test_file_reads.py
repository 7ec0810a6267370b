"""READs of a file export, served by the native loop (FileBackend, ServedFromFile;
nbd/file_serve.py): small ones preaded among the replies, big ones by sendfile, longer
than one part in parts; a failing read, a file shrunk under the export, a batch of reads
larger than the loop gathers, driven by libnbd and a raw client. No READ comes to Python
(neither pread nor the read_now behind it)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import nbd  # Debian's python3-libnbd, put on sys.path by tests/conftest.py
import pytest

from tests.nbd.helpers import RawClient, ServerThread
from trustvbd.blockdev import Buffer, ServedFromFile, provides
from trustvbd.blocks.file import FileBackend
from trustvbd.nbd import protocol as p
from trustvbd.nbd.exports import Export, StaticExports
from trustvbd.nbd.protocol import REQUEST_PART

MiB = 1 << 20


class CountingFile(FileBackend):
    """A FileBackend that records every way Python could be asked for a read."""

    def __init__(self, path: str, size: int, fd: int | None = None) -> None:
        super().__init__(path, size, fd=fd)
        self.calls: list[tuple[str, int, int]] = []

    def read_now(self, offset: int, length: int) -> Buffer:
        self.calls.append(("read_now", offset, length))
        return super().read_now(offset, length)

    async def pread(self, offset: int, length: int) -> Buffer:
        self.calls.append(("pread", offset, length))
        return await super().pread(offset, length)


@pytest.mark.parametrize("structured", [True, False])
def test_small_big_and_parted_reads_are_served_natively(short_tmp: Path, structured: bool
                                                         ) -> None:
    size = REQUEST_PART + 2 * MiB
    disk = short_tmp / "disk.img"
    data = os.urandom(size)
    disk.write_bytes(data)
    fb = CountingFile(str(disk), size)
    assert provides(fb, ServedFromFile)
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop") as srv:
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        h.connect_uri(srv.uri())
        assert h.get_structured_replies_negotiated() == structured
        assert h.pread(4096, 8192) == data[8192:12288]
        assert h.pread(256 * 1024, MiB) == data[MiB:MiB + 256 * 1024]
        # Longer than one part: sent in parts of REQUEST_PART (structured: a chunk each).
        assert h.pread(REQUEST_PART + MiB, 4096) == data[4096:4096 + REQUEST_PART + MiB]
        h.shutdown()
    assert fb.calls == []
    fb.close_now()


def test_a_failing_read_answers_its_error_and_the_connection_goes_on(short_tmp: Path) -> None:
    # A file the kernel refuses to read (opened write-only behind the export): a small READ
    # fails with EBADF, which NBD carries as EIO; a write goes on on the same connection.
    disk = short_tmp / "disk.img"
    disk.write_bytes(bytes(MiB))
    fb = CountingFile(str(disk), MiB, fd=os.open(disk, os.O_WRONLY))
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        with pytest.raises(nbd.Error) as err:
            h.pread(4096, 0)
        assert err.value.errno == "EIO"
        h.pwrite(b"\x07" * 4096, 4096)
        h.shutdown()
    assert fb.calls == []
    assert disk.read_bytes()[4096:8192] == b"\x07" * 4096
    fb.close_now()


def test_a_read_past_the_end_of_a_shrunk_file_answers_zeros(short_tmp: Path) -> None:
    # Someone truncates the backing file under the export: what is gone reads as zeros
    # (as a hole would), never as a short reply; preaded and sent by sendfile alike.
    disk = short_tmp / "disk.img"
    disk.write_bytes(b"\x5a" * MiB)
    fb = CountingFile(str(disk), MiB)
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        os.truncate(disk, 6144)
        assert h.pread(4096, 4096) == b"\x5a" * 2048 + bytes(2048)
        assert h.pread(4096, 65536) == bytes(4096)
        assert h.pread(256 * 1024, 0) == b"\x5a" * 6144 + bytes(256 * 1024 - 6144)
        h.shutdown()
    assert fb.calls == []
    fb.close_now()


def test_a_batch_of_reads_beyond_what_the_loop_gathers_is_answered_in_order(
        short_tmp: Path) -> None:
    # 40 READs of 60 KiB in one send: preaded among the replies until 1 MiB of them wait,
    # which are written before the loop goes on. Every one is answered, in order, each
    # with its own data.
    size = 4 * MiB
    disk = short_tmp / "disk.img"
    data = os.urandom(size)
    disk.write_bytes(data)
    fb = CountingFile(str(disk), size)
    length, count = 60 * 1024, 40
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop"):
        c = RawClient(str(short_tmp / "s.sock"))
        c.go()
        c.sock.sendall(b"".join(
            struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, cookie, cookie * 65536, length)
            for cookie in range(count)))
        got = []
        for _ in range(count):
            error, cookie = c.simple_reply()
            assert error == 0
            got.append((cookie, c.recv_exact(length)))
        c.request(p.Cmd.DISC)
        assert c.closed_by_peer()
        c.close()
    assert got == [(cookie, data[cookie * 65536:cookie * 65536 + length])
                   for cookie in range(count)]
    assert fb.calls == []
    fb.close_now()
