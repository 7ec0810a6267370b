"""A hostile client gets an exact error or loses its own connection; everyone else is served."""

from __future__ import annotations

import asyncio
import gc
import logging
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nbd.helpers import RawClient, ServerThread, wait_for
from trustvbd.blockdev import Buffer
from trustvbd.blocks.file import FileBackend, MemoryBackend
from trustvbd.nbd import protocol as p
from trustvbd.nbd.connection_limits import MAX_TASKS
from trustvbd.nbd.core import ProtocolCore, Role
from trustvbd.nbd.exports import Export, StaticExports

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture(params=["asyncio", "uvloop", "file"])
def server(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[ServerThread]:
    """Python's transmission with both event loops, and ("file") a file export's, which
    the native loop serves once attached (nbd/file_serve.py)."""
    if request.param == "file":
        backend: MemoryBackend | FileBackend = FileBackend(str(short_tmp / "h.img"), SIZE)
    else:
        backend = MemoryBackend(SIZE)
    provider = StaticExports([Export("", backend)])
    loop = "uvloop" if request.param == "file" else request.param
    with ServerThread(provider, short_tmp / "h.sock", loop, handshake_timeout=1.0) as srv:
        yield srv
    asyncio.run(backend.close())


def raw_client(server: ServerThread) -> RawClient:
    assert server.sock_path is not None, "these tests serve on a unix socket"
    return RawClient(server.sock_path)


def others_still_served(server: ServerThread) -> None:
    """A fresh, well-behaved client can still write and read."""
    c = raw_client(server)
    size, _ = c.go()
    assert size == SIZE
    c.request(p.Cmd.WRITE, 4096, 512, cookie=1, data=b"\x5a" * 512)
    assert c.simple_reply() == (0, 1)
    c.request(p.Cmd.READ, 4096, 512, cookie=2)
    assert c.simple_reply() == (0, 2)
    assert c.recv_exact(512) == b"\x5a" * 512
    c.request(p.Cmd.DISC)
    assert c.closed_by_peer()


def test_bad_request_magic_disconnects(server: ServerThread) -> None:
    c = raw_client(server)
    c.go()
    c.sock.sendall(b"\xba\xad\xf0\x0d" + bytes(24))
    assert c.closed_by_peer()
    others_still_served(server)


def test_bad_option_magic_and_bad_client_flags_disconnect(server: ServerThread) -> None:
    c = raw_client(server)
    c.start()
    c.sock.sendall(b"NOTMAGIC" + struct.pack(">II", p.Opt.GO, 0))
    assert c.closed_by_peer()
    c = raw_client(server)
    c.start(client_flags=0x80)  # a flag nobody defined
    assert c.closed_by_peer()
    others_still_served(server)


def test_unknown_and_malformed_options_get_error_replies(server: ServerThread) -> None:
    c = raw_client(server)
    c.start()
    c.option(12345, b"whatever")
    opt, rep, text = c.option_reply()
    assert (opt, rep) == (12345, p.Rep.ERR_UNSUP) and b"not supported" in text
    c.option(p.Opt.STARTTLS)
    assert c.option_reply()[1] == p.Rep.ERR_UNSUP
    c.option(p.Opt.LIST, b"junk")
    assert c.option_reply()[1] == p.Rep.ERR_INVALID
    c.option(p.Opt.GO, b"\xff\xff\xff\xff\0\0")  # name length overruns the option
    assert c.option_reply()[1] == p.Rep.ERR_INVALID
    c.option(p.Opt.SET_META_CONTEXT, b"\0" * 8)  # before NBD_OPT_STRUCTURED_REPLY
    _, rep, text = c.option_reply()
    assert rep == p.Rep.ERR_INVALID and b"needs structured replies" in text
    size, _ = c.go(fresh=False)  # the same connection is still usable
    assert size == SIZE


def test_giant_option_length_disconnects(server: ServerThread) -> None:
    c = raw_client(server)
    c.start()
    c.sock.sendall(struct.pack(">QII", p.IHAVEOPT, p.Opt.GO, 0xFFFFFFFF))
    assert c.closed_by_peer()
    others_still_served(server)


def test_unknown_command_and_flags_get_einval(server: ServerThread) -> None:
    c = raw_client(server)
    c.go()
    c.request(99, 0, 512, cookie=11)
    assert c.simple_reply() == (p.NbdErr.EINVAL, 11)
    c.request(p.Cmd.BLOCK_STATUS, 0, 512, cookie=12)
    assert c.simple_reply() == (p.NbdErr.EINVAL, 12)
    c.request(p.Cmd.READ, 0, 512, flags=0x4000, cookie=13)
    assert c.simple_reply() == (p.NbdErr.EINVAL, 13)
    others_still_served(server)


def test_out_of_range_requests(server: ServerThread) -> None:
    c = raw_client(server)
    c.go()
    c.request(p.Cmd.READ, SIZE - 512, 1024, cookie=1)
    assert c.simple_reply() == (p.NbdErr.EINVAL, 1)  # and no payload follows
    c.request(p.Cmd.WRITE, SIZE, 512, cookie=2, data=bytes(512))
    assert c.simple_reply() == (p.NbdErr.ENOSPC, 2)  # payload was consumed, stream in sync
    c.request(p.Cmd.TRIM, 2**63, 512, cookie=3)
    assert c.simple_reply() == (p.NbdErr.EINVAL, 3)
    c.request(p.Cmd.WRITE_ZEROES, SIZE - 512, 4096, cookie=4)
    assert c.simple_reply() == (p.NbdErr.ENOSPC, 4)
    c.request(p.Cmd.READ, 0, 512, cookie=5)
    assert c.simple_reply() == (0, 5) and len(c.recv_exact(512)) == 512
    others_still_served(server)


def test_oversized_requests_past_the_end_are_refused_and_the_stream_stays_in_sync(
        server: ServerThread) -> None:
    c = raw_client(server)
    c.go(structured=True)
    c.request(p.Cmd.READ, 0, 64 * MiB, cookie=21)
    magic, _flags, typ, cookie, length = struct.unpack(">IHHQI", c.recv_exact(20))
    assert (magic, typ, cookie) == (p.STRUCTURED_REPLY_MAGIC, p.ChunkType.ERROR, 21)
    error, _msg_len = struct.unpack(">IH", c.recv_exact(6))
    assert error == p.NbdErr.EINVAL and b"beyond the export size" in c.recv_exact(length - 6)
    # A long write past the end: its payload is consumed piece by piece, then refused.
    c.request(p.Cmd.WRITE, 0, 40 * MiB, cookie=22, data=bytes(40 * MiB))
    magic, _flags, typ, cookie, length = struct.unpack(">IHHQI", c.recv_exact(20))
    assert (typ, cookie) == (p.ChunkType.ERROR, 22)
    assert struct.unpack(">IH", c.recv_exact(6))[0] == p.NbdErr.ENOSPC
    c.recv_exact(length - 6)
    c.request(p.Cmd.READ, 0, 512, cookie=23)
    assert struct.unpack(">IHHQI", c.recv_exact(20))[3] == 23
    others_still_served(server)


def test_a_refused_write_too_long_to_drain_is_answered_and_closed_at_once(
        server: ServerThread) -> None:
    """A WRITE claiming 4 GiB - 1 bytes past the end: the refusal comes at once and the
    connection closes, instead of the server reading (and the connection being held by)
    up to 4 GiB of a payload it refuses anyway. Up to the advertised maximum payload a
    refused WRITE's payload is still drained (the test above), the stream kept in sync."""
    c = raw_client(server)
    c.go()
    c.sock.settimeout(10)
    c.request(p.Cmd.WRITE, SIZE - 4096, 2**32 - 1, cookie=31, data=bytes(4096))
    assert c.simple_reply() == (p.NbdErr.ENOSPC, 31)
    assert c.closed_by_peer()
    others_still_served(server)


def test_truncated_messages_close_cleanly(server: ServerThread,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """And the log says what happened without calling it an attack: a driver's log showed
    a WARNING "sent a truncated message (N bytes)" each time the encryption domain gave up
    on a write (its timeout, a lag cut-off), which reads like one."""
    caplog.set_level(logging.INFO, logger="trustvbd.nbd.server")
    c = raw_client(server)
    c.go()
    c.sock.sendall(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 0, 4096) + b"x" * 100)
    c.sock.shutdown(2)
    c.close()
    c = raw_client(server)
    c.start()
    c.sock.sendall(struct.pack(">QII", p.IHAVEOPT, p.Opt.GO, 100) + b"\0\0")  # half an option
    c.close()
    wait_for(lambda: server.connection_count() == 0, what="truncated connections to go")
    others_still_served(server)
    said = [r for r in caplog.records if "bytes into a message" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO, caplog.text
    assert "closed the connection 128 bytes into a message" in said[0].getMessage()
    assert "gives up on a request (its timeout, or a mirror cutting a lagging replica" in (
        said[0].getMessage())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_client_that_hangs_up_mid_payload_leaves_no_garbage_holding_its_buffer(
        server: ServerThread) -> None:
    """The domains run Python's cycle collector rarely (common.quiet_garbage_collector), so
    a big WRITE's payload buffer must be freed by reference counting alone when its sender
    hangs up halfway. A cycle through the protocol core kept each one (up to 32 MiB) until a
    full collection: a guest that connects, starts a big WRITE and hangs up, over and over,
    grew the encryption domain by ~32 MiB a time (2 GB in seconds), past any budget."""
    gc.collect()
    gc.disable()
    try:
        c = raw_client(server)
        c.go()
        c.sock.sendall(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 0, 2 * MiB)
                       + b"x" * (MiB + 7))
        c.close()
        wait_for(lambda: server.connection_count() == 0, what="the connection to end")
        time.sleep(0.1)  # its last callbacks
        left = [o for o in gc.get_objects() if isinstance(o, ProtocolCore) and o.role is Role.SERVER]
        assert not left, "a server connection's protocol core outlived it (a reference cycle)"
    finally:
        gc.enable()
    others_still_served(server)


def test_silent_client_is_dropped_after_the_handshake_timeout(server: ServerThread) -> None:
    c = raw_client(server)
    c.greeting()  # and then nothing
    assert c.closed_by_peer(timeout=5)
    others_still_served(server)


def test_client_that_never_reads_replies_cannot_grow_the_server(server: ServerThread) -> None:
    c = raw_client(server)
    c.go()
    c.sock.setblocking(False)
    request = struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, 1, 0, 4 * MiB) * 64
    sent = 0
    try:
        for _ in range(200):  # 12800 reads of 4 MiB = 50 GiB if all were answered
            sent += c.sock.send(request)
    except BlockingIOError:
        pass  # the server stopped reading: back-pressure works
    assert sent < len(request) * 200
    others_still_served(server)
    c.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_long_simple_read_reply_is_never_interleaved(short_tmp: Path, loop_kind: str) -> None:
    """Without structured replies a 40 MiB reply goes out in parts; a small request sent
    right behind it is answered only after the last byte of the long one."""
    size = 48 * MiB
    backend = MemoryBackend(size)
    pattern = bytes(range(256)) * (size // 256)
    with ServerThread(StaticExports([Export("", backend)]), short_tmp / "s.sock", loop_kind) as srv:
        assert srv.sock_path is not None
        c = RawClient(srv.sock_path, timeout=30)
        c.go()
        c.request(p.Cmd.WRITE, 0, size, cookie=1, data=pattern)
        assert c.simple_reply() == (0, 1)
        c.request(p.Cmd.READ, 1, 40 * MiB, cookie=2)
        c.request(p.Cmd.READ, 7, 5, cookie=3)
        assert c.simple_reply() == (0, 2)
        assert c.recv_exact(40 * MiB) == pattern[1:1 + 40 * MiB]
        assert c.simple_reply() == (0, 3)
        assert c.recv_exact(5) == pattern[7:12]


class StalledBackend(MemoryBackend):
    """Reads wait until the test opens the gate (a driver that stalls)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()
        self.started = 0

    async def pread(self, offset: int, length: int) -> Buffer:
        self.started += 1
        await self.gate.wait()
        return await super().pread(offset, length)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_requests_waiting_on_a_stalled_backend_stop_at_the_task_limit(
        short_tmp: Path, loop_kind: str) -> None:
    """More small READs than MAX_TASKS against a backend that stalls: the server runs
    exactly MAX_TASKS of them and reads no further; when the backend moves, every
    request is answered once, by its cookie."""
    backend = StalledBackend(SIZE)
    count = MAX_TASKS + 100
    with ServerThread(StaticExports([Export("", backend)]), short_tmp / "t.sock",
                      loop_kind) as srv:
        assert srv.sock_path is not None
        c = RawClient(srv.sock_path)
        c.go()
        c.sock.sendall(b"".join(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, cookie,
                                            cookie * 512, 512) for cookie in range(count)))
        wait_for(lambda: backend.started >= MAX_TASKS, 5, "the stalled reads to start")
        assert srv.call(asyncio.sleep(0.2, backend.started)) == MAX_TASKS
        srv.loop.call_soon_threadsafe(backend.gate.set)
        cookies = []
        for _ in range(count):
            error, cookie = c.simple_reply()
            assert error == 0
            cookies.append(cookie)
            c.recv_exact(512)
        assert sorted(cookies) == list(range(count))
        c.close()
