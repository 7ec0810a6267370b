"""base:allocation and NBD_CMD_BLOCK_STATUS: the handshake's metadata-context options and
the replies, with libnbd and a raw client that sends what libnbd never would."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import nbd  # Debian's python3-libnbd, put on sys.path by tests/conftest.py
import pytest

from tests.nbd.helpers import RawClient, ServerThread
from trustvbd.blocks.file import FileBackend, MemoryBackend
from trustvbd.nbd import protocol as p
from trustvbd.nbd.exports import Export, StaticExports

MiB = 1 << 20
SIZE = 8 * MiB
HOLE_ZERO = 3


@pytest.fixture
def server(short_tmp: Path) -> Iterator[ServerThread]:
    """Export "file": a sparse file with data at [1 MiB, 1 MiB + 64 KiB) and [4 MiB, 5 MiB);
    export "mem": a backend that cannot tell (all data)."""
    image = short_tmp / "img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
        f.seek(MiB)
        f.write(b"\x11" * 65536)
        f.seek(4 * MiB)
        f.write(b"\x22" * MiB)
    exports = [Export("file", FileBackend(str(image))), Export("mem", MemoryBackend(SIZE))]
    with ServerThread(StaticExports(exports), short_tmp / "b.sock") as srv:
        yield srv


def extents_of(h: nbd.NBD, length: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    got: list[int] = []

    def extent(context: str, at: int, entries: list[int], err: object) -> int:
        assert context == "base:allocation" and at == offset
        got.extend(entries)
        return 0

    h.block_status(length, offset, extent, flags)
    return list(zip(got[::2], got[1::2], strict=True))


def test_libnbd_sees_the_files_holes_and_data(server: ServerThread) -> None:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(server.uri("file"))
    assert h.can_meta_context("base:allocation")
    # File systems report data at their own granularity: at least the written bytes.
    ext = extents_of(h, SIZE, 0)
    assert sum(n for n, _ in ext) == SIZE
    at, data = 0, []
    for n, flags in ext:
        assert flags in (0, HOLE_ZERO)
        if flags == 0:
            data.append((at, at + n))
        at += n
    assert any(a <= MiB and MiB + 65536 <= b for a, b in data), ext
    assert any(a <= 4 * MiB and 5 * MiB <= b for a, b in data), ext
    assert ext[0] == (ext[0][0], HOLE_ZERO) and ext[0][0] >= 512 * 1024  # a hole first
    assert ext[-1][1] == HOLE_ZERO  # and last
    # REQ_ONE: exactly one extent, inside the range asked for.
    one = extents_of(h, 2 * MiB, 4 * MiB, nbd.CMD_FLAG_REQ_ONE)
    assert len(one) == 1 and one[0][1] == 0 and MiB <= one[0][0] <= 2 * MiB
    # Writes and trims show at once.
    h.pwrite(b"\x33" * 4096, 7 * MiB)
    assert extents_of(h, 4096, 7 * MiB, nbd.CMD_FLAG_REQ_ONE) == [(4096, 0)]
    h.trim(MiB, 4 * MiB)
    assert extents_of(h, MiB, 4 * MiB, nbd.CMD_FLAG_REQ_ONE) == [(MiB, HOLE_ZERO)]
    # Past the end: refused, the connection goes on.
    with pytest.raises(nbd.Error) as exc:
        extents_of(h, 8192, SIZE - 4096)
    assert "EINVAL" in str(exc.value) or "Invalid argument" in str(exc.value)
    assert h.pread(4096, 7 * MiB) == b"\x33" * 4096
    h.shutdown()


def test_a_backend_that_cannot_tell_is_all_data(server: ServerThread) -> None:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(server.uri("mem"))
    assert extents_of(h, SIZE - 512, 512) == [(SIZE - 512, 0)]
    h.shutdown()


def meta_option(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


def replies_until_ack(c: RawClient) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    while True:
        _, rep, data = c.option_reply()
        if rep == p.Rep.ACK:
            return out
        out.append((rep, data))
        if rep & p.REP_ERROR_BIT:
            return out


def structured_reply(c: RawClient) -> tuple[int, int, int, bytes]:
    magic, flags, typ, cookie, length = struct.unpack(">IHHQI", c.recv_exact(20))
    assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
    return flags, typ, cookie, c.recv_exact(length)


def test_meta_context_options_follow_the_spec(server: ServerThread) -> None:
    assert server.sock_path is not None
    c = RawClient(server.sock_path)
    c.start()
    # Before structured replies: refused, with the reason.
    c.option(p.Opt.SET_META_CONTEXT, meta_option("file", "base:allocation"))
    [(rep, text)] = replies_until_ack(c)
    assert rep == p.Rep.ERR_INVALID and b"NBD_OPT_STRUCTURED_REPLY first" in text
    c.option(p.Opt.STRUCTURED_REPLY)
    assert c.option_reply()[1] == p.Rep.ACK
    allocation = struct.pack(">I", 0) + b"base:allocation"
    for queries in ((), ("base:",), ("base:allocation", "qemu:dirty-bitmap:x")):
        c.option(p.Opt.LIST_META_CONTEXT, meta_option("file", *queries))
        assert replies_until_ack(c) == [(p.Rep.META_CONTEXT, allocation)], queries
    c.option(p.Opt.LIST_META_CONTEXT, meta_option("file", "qemu:allocation-depth"))
    assert replies_until_ack(c) == []  # unknown queries are ignored, not errors
    c.option(p.Opt.SET_META_CONTEXT, b"\0\0\0\x09file")  # truncated
    [(rep, text)] = replies_until_ack(c)
    assert rep == p.Rep.ERR_INVALID and b"malformed" in text
    # Selected for "mem", but GO picks "file": the context does not apply.
    c.option(p.Opt.SET_META_CONTEXT, meta_option("mem", "base:allocation"))
    [(rep, data)] = replies_until_ack(c)
    assert rep == p.Rep.META_CONTEXT and data == struct.pack(">I", 1) + b"base:allocation"
    c.go("file", fresh=False)
    c.request(p.Cmd.BLOCK_STATUS, 0, 4096, cookie=5)
    _, typ, cookie, body = structured_reply(c)
    assert (typ, cookie) == (p.ChunkType.ERROR, 5)
    assert struct.unpack_from(">I", body)[0] == p.NbdErr.EINVAL
    assert b"needs a metadata context; none was negotiated" in body
    c.close()


def test_meta_contexts_of_an_export_that_does_not_exist_are_refused(server: ServerThread) -> None:
    """NBD_REP_ERR_UNKNOWN, "the requested export is not available" (qemu-nbd answers so):
    it was an ACK, for SET with base:allocation selected, for an export no GO can open."""
    assert server.sock_path is not None
    c = RawClient(server.sock_path)
    c.start()
    c.option(p.Opt.STRUCTURED_REPLY)
    assert c.option_reply()[1] == p.Rep.ACK
    for opt in (p.Opt.LIST_META_CONTEXT, p.Opt.SET_META_CONTEXT):
        for queries in ((), ("base:allocation",)):
            c.option(opt, meta_option("nope", *queries))
            [(rep, text)] = replies_until_ack(c)
            assert rep == p.Rep.ERR_UNKNOWN and b"no export named 'nope' here" in text, (opt, text)
    c.option(p.Opt.SET_META_CONTEXT, meta_option("file", "base:allocation"))
    assert replies_until_ack(c) == [(p.Rep.META_CONTEXT, struct.pack(">I", 1) + b"base:allocation")]
    c.option(p.Opt.SET_META_CONTEXT, meta_option("nope", "base:allocation"))  # replaces it
    assert replies_until_ack(c)[0][0] == p.Rep.ERR_UNKNOWN
    c.go("file", fresh=False)
    c.request(p.Cmd.BLOCK_STATUS, 0, 4096, cookie=5)
    _, typ, cookie, body = structured_reply(c)
    assert (typ, cookie) == (p.ChunkType.ERROR, 5) and b"none was negotiated" in body
    c.close()


def test_a_second_structured_reply_option_is_refused_and_they_stay_on(server: ServerThread) -> None:
    """NBD_REP_ERR_INVALID, as qemu-nbd answers (libnbd's nbd_opt_structured_reply then
    returns false), structured replies still negotiated. It was a second ACK."""
    assert server.sock_path is not None
    c = RawClient(server.sock_path)
    c.start()
    c.option(p.Opt.STRUCTURED_REPLY)
    assert c.option_reply()[1] == p.Rep.ACK
    c.option(p.Opt.STRUCTURED_REPLY)
    [(rep, text)] = replies_until_ack(c)
    assert rep == p.Rep.ERR_INVALID and b"already negotiated" in text
    c.option(p.Opt.SET_META_CONTEXT, meta_option("mem", "base:allocation"))
    assert len(replies_until_ack(c)) == 1
    c.go("mem", fresh=False)
    c.request(p.Cmd.BLOCK_STATUS, 0, 4096, cookie=6, flags=p.CmdFlag.REQ_ONE)
    assert structured_reply(c)[1:3] == (p.ChunkType.BLOCK_STATUS, 6)
    c.close()


def test_block_status_on_the_wire(server: ServerThread) -> None:
    assert server.sock_path is not None
    c = RawClient(server.sock_path)
    c.start()
    c.option(p.Opt.STRUCTURED_REPLY)
    assert c.option_reply()[1] == p.Rep.ACK
    c.option(p.Opt.SET_META_CONTEXT, meta_option("mem", "base:allocation"))
    assert len(replies_until_ack(c)) == 1
    c.go("mem", fresh=False)
    c.request(p.Cmd.BLOCK_STATUS, 4096, 65536, cookie=6, flags=p.CmdFlag.REQ_ONE)
    flags, typ, cookie, body = structured_reply(c)
    assert (flags, typ, cookie) == (p.ReplyFlag.DONE, p.ChunkType.BLOCK_STATUS, 6)
    assert struct.unpack(">III", body) == (1, 65536, 0)
    for offset, length, flags_, cookie in ((SIZE - 512, 1024, 0, 7), (0, 0, 0, 8),
                                           (0, 512, p.CmdFlag.FUA, 9)):
        c.request(p.Cmd.BLOCK_STATUS, offset, length, cookie=cookie, flags=flags_)
        _, typ, got, body = structured_reply(c)
        assert (typ, got, struct.unpack_from(">I", body)[0]) == (p.ChunkType.ERROR, cookie,
                                                                 p.NbdErr.EINVAL)
    c.close()
