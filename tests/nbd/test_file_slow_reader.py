"""READs of a file answered while the client reads their replies late, by the native
loop (sendfile) and the general way (an idle timeout keeps a connection from the native
loop): right bytes, right order; a read that fails after its reply began drops the
connection rather than send made-up bytes."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from pathlib import Path

import pytest

from tests.nbd.helpers import RawClient, ServerThread
from trustvbd.blocks.file import FileBackend
from trustvbd.nbd import protocol as p
from trustvbd.nbd.exports import Export, StaticExports

MiB = 1 << 20


@pytest.fixture(params=["asyncio", "uvloop", "native"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def serving(exports: StaticExports, path: Path, loop_kind: str) -> ServerThread:
    """A server whose file connections go the general way (an idle timeout keeps them from
    the native loop, nbd/file_serve.py), or ("native") the native loop serves them."""
    if loop_kind == "native":
        return ServerThread(exports, path, "uvloop")
    return ServerThread(exports, path, loop_kind, idle_timeout=3600.0)


def read_request(offset: int, length: int, cookie: int) -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, cookie, offset, length)


def test_pipelined_reads_from_a_file_with_a_slow_reader(short_tmp: Path, loop_kind: str) -> None:
    """64 reads of 1 MiB sent at once, replies read late: they wait for the socket to
    drain (natively: by sendfile, which blocks until the socket takes the rest); every
    reply has its own bytes, in order."""
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


class UnreadableBackend(FileBackend):
    """A file whose reads by the native loop fail only after the reply has begun (sendfile
    from a directory's descriptor: as a disk error would)."""

    def __init__(self, path: str, bad_fd: int) -> None:
        super().__init__(path)
        self.bad_fd = bad_fd

    def file_fd(self) -> int:
        return self.bad_fd


def test_a_read_error_after_the_reply_began_drops_the_connection(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Natively only: the general way reads before it frames a reply.
    (short_tmp / "d.img").write_bytes(bytes(MiB))
    bad = os.open(short_tmp, os.O_RDONLY)
    backend = UnreadableBackend(str(short_tmp / "d.img"), bad)
    good = FileBackend(str(short_tmp / "d.img"))
    exports = StaticExports([Export("bad", backend), Export("good", good)])
    try:
        with caplog.at_level(logging.ERROR, "trustvbd.nbd.server"), \
                serving(exports, short_tmp / "s.sock", "native") as srv:
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
