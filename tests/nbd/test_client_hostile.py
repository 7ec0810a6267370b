"""NbdClient against a hostile fake server (a raw socket script in a thread).

Every misbehaviour must end in a clear BlockError, quickly: no hang, and no
allocation driven by the server's numbers (oversized replies are refused from
their header, before their payload is read).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest

from tests.nbd.helpers import new_loop
from trustvbd.blockdev import BlockError
from trustvbd.nbd import protocol as p
from trustvbd.nbd.client import NbdClient
from trustvbd.nbd.client_connect import SOCKET_BUFFER

MiB = 1 << 20
Script = Callable[["FakeServer"], None]


class FakeServer:
    """The server end of a socketpair, driven by a test script in a thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def option(self) -> tuple[int, bytes]:
        magic, opt, length = struct.unpack(">QII", self.recv_exact(16))
        assert magic == p.IHAVEOPT
        return opt, self.recv_exact(length)

    def reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QIII", p.OPTION_REPLY_MAGIC, opt, rep, len(data)) + data)

    def handshake(self, size: int = 16 * MiB, flags: int = 0x1FD,
                  block: tuple[int, int, int] = (512, 4096, 32 * MiB)) -> None:
        self.sock.sendall(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3))
        self.recv_exact(4)
        while True:
            opt, _ = self.option()
            if opt == p.Opt.STRUCTURED_REPLY:
                self.reply(opt, p.Rep.ACK)
            elif opt == p.Opt.GO:
                self.reply(opt, p.Rep.INFO, struct.pack(">HIII", 3, *block))
                self.reply(opt, p.Rep.INFO, struct.pack(">HQH", 0, size, flags))
                self.reply(opt, p.Rep.ACK)
                return

    def request(self) -> tuple[int, int, int, int, int]:
        magic, flags, typ, cookie, offset, length = struct.unpack(">IHHQQI", self.recv_exact(28))
        assert magic == p.REQUEST_MAGIC
        if typ == p.Cmd.WRITE:
            self.recv_exact(length)
        return flags, typ, cookie, offset, length

    def chunk(self, cookie: int, typ: int, payload: bytes, done: bool = True,
              length: int | None = None) -> None:
        self.sock.sendall(struct.pack(
            ">IHHQI", p.STRUCTURED_REPLY_MAGIC, int(done), typ, cookie,
            len(payload) if length is None else length) + payload)

    def idle(self) -> None:
        """Keep the connection open, saying nothing, until the client hangs up."""
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass


def with_fake_server(script: Script, body: Callable[[NbdClient], object] | None = None,
                     loop: str = "asyncio", **kw: object) -> BlockError:
    """Run `script` as the server; connect, run `body`; return the BlockError raised."""
    ours, theirs = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            script(FakeServer(theirs))
        except (EOFError, OSError):
            pass  # the client hung up: expected
        except BaseException as exc:
            errors.append(exc)
        finally:
            theirs.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def main() -> None:
        client = await NbdClient.connect(ours, "disk", **kw)  # type: ignore[arg-type]
        try:
            if body is not None:
                await body(client)  # type: ignore[misc]
        finally:
            await client.close()

    ev = new_loop(loop)
    started = time.monotonic()
    try:
        with pytest.raises(BlockError) as err:
            ev.run_until_complete(asyncio.wait_for(main(), 10))
    finally:
        ev.close()
    assert time.monotonic() - started < 5, "the client took too long to give up"
    thread.join(5)
    assert not errors, errors
    return err.value


def read(offset: int = 0, length: int = 4096) -> Callable[[NbdClient], object]:
    return lambda client: client.pread(offset, length)


def transmission(misbehave: Callable[[FakeServer, int, int], None], **hs: object) -> Script:
    def script(srv: FakeServer) -> None:
        srv.handshake(**hs)  # type: ignore[arg-type]
        _, _, cookie, _offset, length = srv.request()
        misbehave(srv, cookie, length)
        srv.idle()

    return script


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_oversized_data_chunk_is_refused_from_its_header(loop: str) -> None:
    # Claims 1 GiB of data for a 4 KiB read and sends only the header.
    err = with_fake_server(transmission(
        lambda s, c, n: s.chunk(c, p.ChunkType.OFFSET_DATA, struct.pack(">Q", 0),
                                length=(1 << 30) + 8)), read(), loop)
    assert err.errno == errno.EIO and "for a read of 4096 bytes" in str(err)


def test_oversized_simple_reply_desynchronises_into_a_clear_error() -> None:
    def misbehave(s: FakeServer, cookie: int, n: int) -> None:
        s.sock.sendall(struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, cookie) + b"\xee" * (n + 64))

    async def body(client: NbdClient) -> None:
        await client.pread(0, 4096)  # gets its 4096 bytes; the extra bytes are garbage
        await client.pread(0, 4096)

    err = with_fake_server(transmission(misbehave), body, structured_replies=False)
    assert err.errno == errno.EIO and "bad reply magic" in str(err)


def test_unknown_cookie() -> None:
    err = with_fake_server(transmission(
        lambda s, c, n: s.sock.sendall(struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, c + 1000))),
        read())
    assert err.errno == errno.EIO and "unknown cookie" in str(err)


def test_bad_reply_magic() -> None:
    err = with_fake_server(transmission(lambda s, c, n: s.sock.sendall(b"\x00" * 16)), read())
    assert "bad reply magic" in str(err)


@pytest.mark.parametrize("case", ["short", "overlap", "outside", "hole-size", "none-not-done"])
def test_wrong_chunk_sizes(case: str) -> None:
    def misbehave(s: FakeServer, cookie: int, n: int) -> None:
        data = p.ChunkType.OFFSET_DATA
        if case == "short":
            s.chunk(cookie, data, struct.pack(">Q", 0) + bytes(n // 2))
        elif case == "overlap":
            s.chunk(cookie, data, struct.pack(">Q", 0) + bytes(n // 2), done=False)
            s.chunk(cookie, data, struct.pack(">Q", n // 4) + bytes(n // 2))
        elif case == "outside":
            s.chunk(cookie, data, struct.pack(">Q", 1 << 40) + bytes(512))
        elif case == "hole-size":
            s.chunk(cookie, p.ChunkType.OFFSET_HOLE, struct.pack(">QI", 0, n), length=16)
        else:
            s.chunk(cookie, p.ChunkType.NONE, b"", done=False)

    err = with_fake_server(transmission(misbehave), read())
    assert err.errno == errno.EIO and "broke the protocol" in str(err)


def test_server_that_never_replies_times_out_every_pending_request() -> None:
    async def body(client: NbdClient) -> None:
        results = await asyncio.gather(*(client.pread(k * 4096, 4096) for k in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, BlockError) and r.errno == errno.ETIMEDOUT for r in results)
        assert "no reply to READ" in str(results[0])
        assert client.broken is not None
        await client.pread(0, 4096)  # fails fast now

    def script(srv: FakeServer) -> None:
        srv.handshake()
        srv.idle()

    err = with_fake_server(script, body, request_timeout=0.3)
    assert err.errno == errno.EIO and "unusable" in str(err)


def test_error_chunk_and_eshutdown() -> None:
    def script(srv: FakeServer) -> None:
        srv.handshake()
        _, _, cookie, _, _ = srv.request()
        msg = b"bad sector \x1b[31m"
        srv.chunk(cookie, p.ChunkType.ERROR, struct.pack(">IH", p.NbdErr.EIO, len(msg)) + msg)
        _, _, cookie, _, _ = srv.request()
        srv.sock.sendall(struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, p.NbdErr.ESHUTDOWN, cookie))
        _, typ, _, _, _ = srv.request()
        assert typ == p.Cmd.DISC  # the client obeys ESHUTDOWN with a soft disconnect
        srv.idle()

    async def body(client: NbdClient) -> None:
        with pytest.raises(BlockError) as err:
            await client.pread(0, 4096)
        assert err.value.errno == errno.EIO and "bad sector ?[31m" in str(err.value)
        with pytest.raises(BlockError) as err:
            await client.flush()
        assert err.value.errno == errno.ESHUTDOWN
        await asyncio.sleep(0.1)
        await client.pread(0, 4096)

    err = with_fake_server(script, body)
    assert err.errno == errno.ESHUTDOWN


def test_server_hangs_up_mid_request() -> None:
    def script(srv: FakeServer) -> None:
        srv.handshake()
        srv.request()
        srv.sock.sendall(struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 1) + b"x" * 100)

    err = with_fake_server(script, read(), structured_replies=False)
    assert err.errno == errno.EIO and "closed the connection" in str(err)


# --- handshake -------------------------------------------------------------------------
def test_handshake_refusal_carries_the_servers_message() -> None:
    def script(srv: FakeServer) -> None:
        srv.sock.sendall(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3))
        srv.recv_exact(4)
        while (opt := srv.option()[0]) != p.Opt.GO:
            srv.reply(opt, p.Rep.ACK)
        srv.reply(opt, p.Rep.ERR_POLICY, b"guest may not attach this disk")
        srv.idle()

    err = with_fake_server(script)
    assert err.errno == errno.EACCES and "guest may not attach this disk" in str(err)


@pytest.mark.parametrize("case", ["magic", "oldstyle", "giant-reply", "size", "block-sizes",
                                  "info-flood", "silence"])
def test_hostile_handshakes(case: str) -> None:
    def script(srv: FakeServer) -> None:
        if case == "magic":
            srv.sock.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        elif case == "oldstyle":
            srv.sock.sendall(struct.pack(">QQH", p.NBDMAGIC, 0x00420281861253, 0))
        elif case == "giant-reply":
            srv.sock.sendall(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3))
            srv.recv_exact(4)
            opt, _ = srv.option()
            srv.sock.sendall(struct.pack(">QIII", p.OPTION_REPLY_MAGIC, opt, p.Rep.ACK, 1 << 31))
        elif case == "size":
            srv.handshake(size=2**64 - 1)
        elif case == "block-sizes":
            srv.handshake(block=(3, 4096, 32 * MiB))
        elif case == "info-flood":
            srv.sock.sendall(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3))
            srv.recv_exact(4)
            while (opt := srv.option()[0]) != p.Opt.GO:
                srv.reply(opt, p.Rep.ACK)
            for _ in range(1000):
                srv.reply(opt, p.Rep.INFO, struct.pack(">HQH", 0, MiB, 1))
        srv.idle()

    err = with_fake_server(script, handshake_timeout=0.5)
    expected = errno.ETIMEDOUT if case == "silence" else errno.EIO
    assert err.errno == expected, err
    assert "NBD server" in str(err)


# --- a full socket ------------------------------------------------------------------------
def test_a_write_the_socket_cannot_take_yet_keeps_the_bytes_it_was_given() -> None:
    """The server reads nothing for a while: what the socket does not take of a WRITE
    waits in the client, as a copy, so a caller that reuses its buffer once its write is
    cancelled (an AEAD slot, a receive buffer) changes nothing on the wire."""
    size = 16 * MiB  # far more than a socket buffer holds
    received: list[bytes] = []
    go_on = threading.Event()

    def script(srv: FakeServer) -> None:
        srv.handshake()
        go_on.wait(10)
        typ, length = struct.unpack(">IHHQQI", srv.recv_exact(28))[2::3]
        assert typ == p.Cmd.WRITE
        received.append(srv.recv_exact(length))
        srv.idle()

    async def body(client: NbdClient) -> None:
        buf = bytearray(b"\x61" * size)
        write = asyncio.ensure_future(client.pwrite(0, memoryview(buf)))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if client._engine is not None and client._engine.queued:
                break
        assert client._engine is not None and 0 < client._engine.queued < size
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        buf[:] = b"\x7a" * size  # the caller reuses its buffer
        go_on.set()
        for _ in range(500):
            if received:
                break
            await asyncio.sleep(0.01)
        client.abandon("the test is done")
        await client.pread(0, 512)  # raises: the connection was given up

    err = with_fake_server(script, body)
    assert "the test is done" in str(err)
    assert received == [b"\x61" * size]


def _full_socket_then(payloads: list[bytes | bytearray | memoryview], cancel: bool
                      ) -> tuple[list[bytes], list[int]]:
    """WRITEs of `payloads` (one after another, at offset 0) to a server that reads
    nothing until they are all queued and the first has filled the socket; with `cancel`,
    every write but the first is cancelled and its buffer overwritten with 0x7a before
    the server reads. What the server received, and the engine's `copied` once all were
    queued."""
    received: list[bytes] = []
    go_on = threading.Event()
    copied: list[int] = []

    def script(srv: FakeServer) -> None:
        srv.handshake()
        go_on.wait(10)
        for _ in payloads:
            typ, length = struct.unpack(">IHHQQI", srv.recv_exact(28))[2::3]
            assert typ == p.Cmd.WRITE
            received.append(srv.recv_exact(length))
        srv.idle()

    async def body(client: NbdClient) -> None:
        writes = []
        for data in payloads:
            view = data if isinstance(data, bytes) else memoryview(data)[:]
            writes.append(asyncio.ensure_future(client.pwrite(0, view)))
            for _ in range(100):
                await asyncio.sleep(0.01)
                if client._engine is not None and client._engine.queued:
                    break
        engine = client._engine
        assert engine is not None and 0 < engine.queued < sum(map(len, payloads))
        copied.append(engine.copied)
        if cancel:
            for write, data in zip(writes[1:], payloads[1:], strict=True):
                write.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await write
                data[:] = b"\x7a" * len(data)  # type: ignore[index]  # the caller reuses it
        go_on.set()
        for _ in range(500):
            if len(received) == len(payloads):
                break
            await asyncio.sleep(0.01)
        client.abandon("the test is done")
        await asyncio.gather(*writes, return_exceptions=True)
        await client.pread(0, 512)  # raises: the connection was given up

    err = with_fake_server(script, body)
    assert "the test is done" in str(err)
    return received, copied


def test_a_bytes_payload_the_socket_cannot_take_yet_is_held_not_copied() -> None:
    """A WRITE of a `bytes` object (ciphertext is one) waits behind a full socket as it
    is: nothing can change it, so the client copies none of it (each replica link of a
    mirror would otherwise copy every payload its driver had not taken yet), nor does a
    view of one; a bytearray's is copied, as the caller may reuse it."""
    size = 16 * MiB  # far more than a socket buffer holds
    frozen = bytes([0x61]) * size
    received, copied = _full_socket_then([frozen], cancel=False)
    assert copied == [0]
    assert received == [frozen]
    received, copied = _full_socket_then([memoryview(frozen)], cancel=False)  # a view of bytes
    assert copied == [0]
    assert received == [frozen]
    received, copied = _full_socket_then([bytearray(frozen)], cancel=False)
    assert copied == [size]
    assert received == [frozen]


def test_a_write_queued_behind_a_full_socket_keeps_the_bytes_it_was_given() -> None:
    """A WRITE queued while the socket is already full (the client waiting for it to
    drain) and then cancelled: its caller's later change to the buffer is not what the
    server receives."""
    # Fills the socket (the kernel doubles SO_SNDBUF), leaving less than HIGH_WATER queued.
    first = bytes([0x62]) * (2 * SOCKET_BUFFER + 2 * MiB)
    later = bytearray(b"\x61" * 4096)
    received, _ = _full_socket_then([first, later], cancel=True)
    assert received == [first, b"\x61" * 4096]
