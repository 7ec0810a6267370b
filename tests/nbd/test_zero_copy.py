"""Zero-copy read replies (sendfile): right bytes, right order, nothing kept or lost."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nbd.helpers import RawClient, ServerThread
from trustvbd.blockdev import FileRange
from trustvbd.blocks.file import FileBackend
from trustvbd.nbd import protocol as p
from trustvbd.nbd.exports import Export, StaticExports
from trustvbd.nbd.zero_copy import OutPart, materialize, send_now

MiB = 1 << 20


def drain(sock: socket.socket, into: bytearray) -> threading.Thread:
    """Read `sock` to EOF into `into`, in a thread."""
    def run() -> None:
        while chunk := sock.recv(1 << 20):
            into.extend(chunk)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture
def data_file(short_tmp: Path) -> Iterator[tuple[int, bytes]]:
    content = os.urandom(4 * MiB)
    path = short_tmp / "data.img"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    yield fd, content
    os.close(fd)


def finish(a: socket.socket, b: socket.socket, rest: list[OutPart]) -> bytes:
    """Send `rest` blocking, close, and return everything `b` received."""
    got = bytearray()
    reader = drain(b, got)
    a.setblocking(True)
    for buf in materialize(rest):
        a.sendall(buf)
    a.close()
    reader.join(10)
    return bytes(got)


def test_a_full_socket_leaves_the_rest_in_order_and_later_ranges_unread(
    data_file: tuple[int, bytes]
) -> None:
    fd, content = data_file
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    a.setblocking(False)
    later_range = FileRange(fd, 3 * MiB, MiB)
    parts: list[OutPart] = [b"head1", FileRange(fd, 0, 2 * MiB), bytearray(b"head2"),
             memoryview(b"head3"), later_range, b"tail"]
    expected = b"head1" + content[:2 * MiB] + b"head2head3" + content[3 * MiB:] + b"tail"
    unsent, later = send_now(a.fileno(), parts)  # nobody reads yet: the socket fills up
    assert len(unsent) == 1 and 0 < len(unsent[0]) < 2 * MiB  # stopped inside the first range
    assert later == parts[2:] and later[2] is later_range  # not read into memory
    assert finish(a, b, [*unsent, *later]) == expected


def test_small_replies_go_out_at_once(data_file: tuple[int, bytes]) -> None:
    fd, content = data_file
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    a.setblocking(False)
    parts: list[OutPart] = [b"h" * 28, FileRange(fd, 4096, 8192)] * 4
    assert send_now(a.fileno(), parts) == ([], [])  # 33 KiB fit in the socket's buffer
    assert finish(a, b, []) == (b"h" * 28 + content[4096:4096 + 8192]) * 4


def test_a_range_past_the_end_of_a_shrunk_file_reads_zeros(short_tmp: Path) -> None:
    path = short_tmp / "short.img"
    path.write_bytes(b"x" * 1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        part = FileRange(fd, 0, 4096)
        assert part.read() == b"x" * 1000 + bytes(3096)
        assert part.read(500) == b"x" * 500 + bytes(3096)
        a, b = socket.socketpair()
        a.setblocking(False)
        unsent, later = send_now(a.fileno(), [part])  # sendfile stops at the end of the file
        assert finish(a, b, [*unsent, *later]) == b"x" * 1000 + bytes(3096)
    finally:
        os.close(fd)


def test_an_unreadable_range_raises_instead_of_sending_anything_else(short_tmp: Path) -> None:
    fd = os.open(short_tmp, os.O_RDONLY)  # a directory: sendfile and pread both refuse
    try:
        a, _b = socket.socketpair()
        with pytest.raises(IsADirectoryError):
            send_now(a.fileno(), [b"header", FileRange(fd, 0, 4096)])
    finally:
        os.close(fd)


# --- through the server: Python's way with both event loops, and the native loop ----------------
@pytest.fixture(params=["asyncio", "uvloop", "native"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def serving(exports: StaticExports, path: Path, loop_kind: str) -> ServerThread:
    """A server whose file connections Python serves (an idle timeout keeps them from the
    native loop, nbd/file_serve.py), or ("native") the native loop does."""
    if loop_kind == "native":
        return ServerThread(exports, path, "uvloop")
    return ServerThread(exports, path, loop_kind, idle_timeout=3600.0)


def read_request(offset: int, length: int, cookie: int) -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, cookie, offset, length)


def test_pipelined_reads_from_a_file_with_a_slow_reader(
    short_tmp: Path, loop_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 reads of 1 MiB sent at once, replies read late: they wait for the socket to
    drain and go by sendfile, only the end of the one each full socket cut is read into
    memory; every reply has its own bytes."""
    read_bytes = [0, 0]  # bytes read into memory, calls
    real_read = FileRange.read

    def counted_read(self: FileRange, start: int = 0) -> bytes:
        data = real_read(self, start)
        read_bytes[0] += len(data)
        read_bytes[1] += 1
        return data

    monkeypatch.setattr(FileRange, "read", counted_read)
    content = os.urandom(16 * MiB)
    (short_tmp / "d.img").write_bytes(content)
    backend = FileBackend(str(short_tmp / "d.img"))
    with serving(StaticExports([Export("", backend)]), short_tmp / "s.sock", loop_kind) as srv:
        for structured in (False, True):
            c = RawClient(srv.address, timeout=20)
            c.go(structured=structured)
            offsets = [(i * 5 % 16) * MiB for i in range(64)]
            c.sock.sendall(b"".join(read_request(off, MiB, i) for i, off in enumerate(offsets)))
            time.sleep(0.3)  # let the server fill the socket and queue the rest
            for _ in offsets:
                if structured:
                    magic, flags, typ, cookie, length = struct.unpack(">IHHQI", c.recv_exact(20))
                    assert (magic, typ, flags) == (p.STRUCTURED_REPLY_MAGIC, p.ChunkType.OFFSET_DATA,
                                                   p.ReplyFlag.DONE)
                    (offset,) = struct.unpack(">Q", c.recv_exact(8))
                    assert offset == offsets[cookie] and length == MiB + 8
                else:
                    error, cookie = c.simple_reply()
                    assert error == 0
                data = c.recv_exact(MiB)
                assert data == content[offsets[cookie]:offsets[cookie] + MiB], f"reply {cookie}"
            c.close()
    asyncio.run(backend.close())
    print("read into memory:", read_bytes)
    if loop_kind == "native":
        assert read_bytes == [0, 0]  # sendfile blocks until the socket takes the rest
    else:
        assert 0 < read_bytes[0] < 32 * MiB, read_bytes  # of 128 MiB sent


class UnreadableBackend(FileBackend):
    """A file whose reads fail only after the reply has begun (as a disk error would)."""

    def __init__(self, path: str, bad_fd: int) -> None:
        super().__init__(path)
        self.bad_fd = bad_fd

    def file_range(self, offset: int, length: int) -> FileRange:
        return FileRange(self.bad_fd, offset, length)

    def file_fd(self) -> int:
        return self.bad_fd


def test_a_read_error_after_the_reply_began_drops_the_connection(
    short_tmp: Path, loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    (short_tmp / "d.img").write_bytes(bytes(MiB))
    bad = os.open(short_tmp, os.O_RDONLY)
    backend = UnreadableBackend(str(short_tmp / "d.img"), bad)
    good = FileBackend(str(short_tmp / "d.img"))
    exports = StaticExports([Export("bad", backend), Export("good", good)])
    try:
        with caplog.at_level(logging.ERROR, "trustvbd.nbd.server"), \
                serving(exports, short_tmp / "s.sock", loop_kind) as srv:
            c = RawClient(srv.address)
            c.go("bad")
            c.request(p.Cmd.READ, 0, 65536, cookie=1)
            with pytest.raises(EOFError):  # never a full reply with made-up bytes
                c.recv_exact(16 + 65536)
            assert any("read error after a reply began" in r.getMessage() for r in caplog.records)
            other = RawClient(srv.address)
            other.go("good")
            other.request(p.Cmd.READ, 4096, 4096, cookie=2)
            assert other.simple_reply() == (0, 2)
            assert other.recv_exact(4096) == bytes(4096)
            other.close()
    finally:
        os.close(bad)
        asyncio.run(backend.close())
        asyncio.run(good.close())
