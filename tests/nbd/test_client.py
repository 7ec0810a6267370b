"""NbdClient as a Backend against our own server, qemu-nbd and nbdkit."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from pathlib import Path

import pytest

from tests.nbd.helpers import Peer, ServerThread, new_loop
from tests.nbd.test_server_clients import ScriptedBackend
from trustvbd import eager
from trustvbd._native import NbdClientEngine
from trustvbd.blockdev import Backend, BlockError, Buffer, Capabilities
from trustvbd.blocks.file import MemoryBackend
from trustvbd.nbd.client import NbdBackend, NbdClient
from trustvbd.nbd.exports import Export, StaticExports

MiB = 1 << 20


def run_async(coro: object, loop: str = "asyncio") -> object:
    ev = new_loop(loop)
    try:
        return ev.run_until_complete(coro)  # type: ignore[arg-type]
    finally:
        ev.close()


async def exercise(client: NbdClient) -> None:
    """Round trips every Backend call, including requests larger than one payload."""
    assert isinstance(client, Backend)
    data = os.urandom(MiB)
    await client.pwrite(0, data, fua=True)
    assert bytes(await client.pread(0, MiB)) == data
    big = os.urandom(33 * MiB)  # split into two requests (32 MiB maximum payload)
    await client.pwrite(MiB, big)
    assert bytes(await client.pread(MiB, 33 * MiB)) == big
    reads = await asyncio.gather(*(client.pread(k * 4096, 4096) for k in range(64)))
    assert b"".join(bytes(r) for r in reads) == data[: 64 * 4096]
    await client.zero(0, 8192)
    assert bytes(await client.pread(0, 8192)) == bytes(8192)
    await client.trim(MiB, 4096)
    await client.cache(0, MiB)
    await client.flush()
    with pytest.raises(BlockError) as err:
        await client.pread(client.size - 512, 1024)
    assert err.value.errno == errno.EINVAL


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("structured", [True, False])
def test_against_our_server(short_tmp: Path, loop: str, structured: bool) -> None:
    backend = ScriptedBackend(64 * MiB)
    with ServerThread(StaticExports([Export("d", backend)]), short_tmp / "s.sock", loop) as srv:
        async def main() -> None:
            client = await NbdClient.open_uri(srv.uri("d"), structured_replies=structured)
            assert client.size == 64 * MiB and client.export_name == "d"
            assert client.capabilities == Capabilities(fast_zero=True)
            assert client.block_sizes == (1, 4096, 32 * MiB)  # 64 MiB advertised, 32 MiB used
            await exercise(client)
            backend.fail_read_at[0] = errno.ENOSPC
            with pytest.raises(BlockError) as err:
                await client.pread(0, 512)
            assert err.value.errno == errno.ENOSPC
            if structured:  # the server's message travels in the error chunk
                assert "injected failure at 0" in str(err.value)
            with pytest.raises(BlockError) as err:
                await client.zero(0, 4096, fast=True)
            assert err.value.errno == errno.ENOTSUP
            await client.close()
            assert client.broken is not None
            with pytest.raises(BlockError):
                await client.pread(0, 512)

        run_async(main(), loop)


def test_read_only_and_unknown_export(short_tmp: Path) -> None:
    ro = ScriptedBackend(MiB, Capabilities(read_only=True))
    with ServerThread(StaticExports([Export("ro", ro)]), short_tmp / "s.sock") as srv:
        async def main() -> None:
            client = await NbdBackend.open_uri(srv.uri("ro"))
            assert client.capabilities.read_only
            with pytest.raises(BlockError) as err:
                await client.pwrite(0, bytes(512))
            assert err.value.errno == errno.EPERM
            await client.close()
            with pytest.raises(BlockError) as err:
                await NbdClient.open_uri(srv.uri("nope"))
            assert err.value.errno == errno.ENOENT and "no export named 'nope'" in str(err.value)

        run_async(main())


@pytest.mark.parametrize("peer", ["qemu-nbd", "nbdkit"])
def test_against_peer_servers(short_tmp: Path, peer: str) -> None:
    image = short_tmp / "peer.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    server = (Peer.qemu_nbd if peer == "qemu-nbd" else Peer.nbdkit)(image, short_tmp)
    try:
        async def main() -> None:
            client = await NbdClient.open_uri(server.uri())
            assert client.size == 64 * MiB
            await exercise(client)
            await client.close()

        run_async(main(), "uvloop")
    finally:
        server.stop()


def test_connect_errors_are_clear() -> None:
    async def main() -> None:
        with pytest.raises(BlockError) as err:
            await NbdClient.open_uri("nbd+unix:///x?socket=/nonexistent/none.sock")
        assert "cannot connect" in str(err.value)
        with pytest.raises(ValueError, match="not an NBD URI"):
            await NbdClient.open_uri("http://example/x")

    run_async(main())


def test_two_clients_on_one_server_share_data(short_tmp: Path) -> None:
    shared = MemoryBackend(MiB)
    with ServerThread(StaticExports([Export("", shared)]), short_tmp / "s.sock") as srv:
        async def main() -> None:
            a = await NbdClient.open_uri(srv.uri())
            b = await NbdClient.open_uri(srv.uri())
            await a.pwrite(0, b"\x42" * 4096)
            await a.flush()
            assert bytes(await b.pread(0, 4096)) == b"\x42" * 4096
            await asyncio.gather(a.close(), b.close())

        run_async(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_requests_of_one_turn_leave_together_and_a_cancelled_one_keeps_its_bytes(
        short_tmp: Path, loop: str) -> None:
    """Writes made in one event-loop turn go out in one batch after it; a write cancelled
    while its batch waits still sends the bytes it was given, not what its caller puts
    into the buffer once the cancellation reached it (an AEAD slot, a receive buffer)."""
    shared = MemoryBackend(MiB)
    with ServerThread(StaticExports([Export("", shared)]), short_tmp / "s.sock", loop) as srv:
        async def main() -> None:
            client = await NbdClient.open_uri(srv.uri())
            writes = [asyncio.ensure_future(client.pwrite(k * 4096, bytes([k]) * 4096))
                      for k in range(1, 9)]
            buf = bytearray(b"\x61" * 4096)
            doomed = asyncio.ensure_future(client.pwrite(0, memoryview(buf)))
            await asyncio.sleep(0)  # every request is queued; the batch has not left
            assert client._engine is not None  # 9 requests (header + payload) wait, none sent
            assert client._engine.queued == 9 * (28 + 4096)
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            buf[:] = b"\x7a" * 4096  # the caller reuses its buffer
            await asyncio.gather(*writes)
            await client.flush()
            assert bytes(await client.pread(0, 4096)) == b"\x61" * 4096
            for k in range(1, 9):
                assert bytes(await client.pread(k * 4096, 4096)) == bytes([k]) * 4096
            await client.close()

        run_async(main(), loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_fua_write_or_a_flush_leaves_at_once_with_what_was_queued_before_it(
        short_tmp: Path, loop: str) -> None:
    """A FLUSH waits for its FUA write and for its own reply: they go to the socket when
    made, not at the end of the loop turn, and take the requests queued before them."""
    shared = MemoryBackend(MiB)
    with ServerThread(StaticExports([Export("", shared)]), short_tmp / "s.sock", loop) as srv:
        async def main() -> None:
            client = await NbdClient.open_uri(srv.uri())
            engine = client._engine
            assert engine is not None
            plain = [asyncio.ensure_future(client.pwrite(k * 4096, bytes([k]) * 4096))
                     for k in (1, 2)]
            await asyncio.sleep(0)
            assert engine.queued == 2 * (28 + 4096)  # plain writes wait for the turn's end
            fua = client.submit_writes([(3 * 4096, bytes([3]) * 4096)], fua=True)
            assert fua is not None and engine.queued == 0  # all three are on the socket
            flush = eager.start(asyncio.get_running_loop(), client.flush())
            assert flush is not None and engine.queued == 0
            await asyncio.gather(*plain, fua, flush)
            assert bytes(await client.pread(4096, 3 * 4096)) == b"".join(
                bytes([k]) * 4096 for k in (1, 2, 3))
            await client.close()

        run_async(main(), loop)


class FullAt(ScriptedBackend):
    """Writes at `full` fail with ENOSPC; every write waits `write_delay` first."""

    def __init__(self, size: int, full: int) -> None:
        super().__init__(size)
        self.full = full

    async def pwrite(self, offset: int, data: object, fua: bool = False) -> None:
        if self.write_delay:
            await asyncio.sleep(self.write_delay)
        if offset == self.full:
            raise BlockError(errno.ENOSPC, "injected: no space left")
        await self.next.pwrite(offset, data, fua)  # type: ignore[arg-type]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_submitted_writes_hold_request_slots_and_fail_as_pwrite_does(
        short_tmp: Path, loop: str) -> None:
    """submit_writes (a mirror's writes without a coroutine) queues WRITEs at once while a
    request slot is free for each and gives each slot back with its reply; one future for
    them all gets each one's outcome in order: None, or for an error reply the BlockError
    pwrite raises, for a broken connection the reason. It declines (None, nothing queued)
    what pwrite must do: too few free slots (a coroutine waits for one, in turn), a request
    outside the device, a connection already broken."""
    backend = FullAt(MiB, full=3 * 4096)
    with ServerThread(StaticExports([Export("", backend)]), short_tmp / "s.sock", loop) as srv:
        async def main() -> None:
            client = await NbdClient.open_uri(srv.uri(), max_in_flight=2)
            backend.write_delay = 0.05
            assert client.submit_writes([(0, b"\x01" * 4096), (4096, b"\x02" * 4096),
                                         (8192, b"\x03" * 4096)]) is None  # 2 slots, not 3
            assert client._free_slots == 2 and not client._waiters
            first = client.submit_writes([(0, b"\x01" * 4096)])
            second = client.submit_writes([(4096, b"\x02" * 4096)])
            assert first is not None and second is not None
            assert client.submit_writes([(8192, b"\x03" * 4096)]) is None  # both slots taken
            waiting = asyncio.ensure_future(client.pwrite(8192, b"\x03" * 4096))
            await asyncio.sleep(0)
            assert not waiting.done()
            assert await asyncio.gather(first, second) == [[None], [None]]  # each succeeded
            await waiting  # got a slot from the replies
            assert bytes(await client.pread(0, 3 * 4096)) == b"\x01" * 4096 + b"\x02" * 4096 \
                + b"\x03" * 4096
            full = client.submit_writes([(3 * 4096, b"\x04" * 4096), (4 * 4096, b"\x08" * 4096)])
            assert full is not None
            no_space, went = await full  # one failed, the other went through
            assert no_space is not None and went is None
            assert no_space.errno == errno.ENOSPC and "failed WRITE [12288, 16384)" in str(no_space)
            assert bytes(await client.pread(4 * 4096, 4096)) == b"\x08" * 4096
            assert client.submit_writes(
                [(0, b"\x05" * 4096), (MiB - 512, b"\x05" * 4096)]) is None  # pwrite: EINVAL
            assert client._free_slots == 2 and not client._waiters  # nothing of it queued
            backend.write_delay = 5.0
            stuck = client.submit_writes([(0, b"\x06" * 4096), (4096, b"\x06" * 4096)])
            assert stuck is not None
            await asyncio.sleep(0.01)
            client.abandon("test gives up")
            outcomes = await stuck
            assert len(outcomes) == 2 and all(
                e is not None and e.errno == errno.ETIMEDOUT and "test gives up" in str(e)
                for e in outcomes)
            assert client._free_slots == 2  # the failed requests' slots came back
            assert client.submit_writes([(0, b"\x07" * 4096)]) is None
            await client.close()
            # A timeout names the oldest unanswered write's own range (the batch shares
            # one deadline and one waiter) and fails every write of the batch.
            client = await NbdClient.open_uri(srv.uri(), request_timeout=0.3)
            stuck = client.submit_writes([(3 * 4096, b"\x06" * 4096), (4096, b"\x06" * 512)])
            assert stuck is not None
            outcomes = await stuck
            assert len(outcomes) == 2 and all(
                e is not None and e.errno == errno.ETIMEDOUT
                and "no reply to WRITE [12288, 16384) within 0.3 s" in str(e) for e in outcomes)
            await client.close()

        run_async(main(), loop)


def test_a_batch_of_writes_is_queued_whole_with_consecutive_cookies_or_not_at_all() -> None:
    """NbdClientEngine.request_writes (submit_writes' one call per batch): each write gets
    the next cookie, in order, and goes out as a WRITE with its own payload; a batch with
    a write that must not be sent (over 32 MiB) queues none of them and uses no cookie;
    replies pair by cookie in any order, and each batch is handed over once, when its last
    write is answered, with the error replies by index."""
    engine = NbdClientEngine(None, False)
    data: list[Buffer] = [b"\x01" * 4096, bytearray(b"\x02" * 512), memoryview(b"\x03" * 8192)[4096:]]
    writes = [(4096, data[0]), (0, data[1]), (1 << 40, data[2])]
    with pytest.raises(ValueError, match="32 MiB"):
        engine.request_writes(0, [(0, b"x"), (0, bytes((32 << 20) + 1))], 1.0)
    assert engine.queued == 0 and engine.pending == 0 and engine.writes_oldest is None
    assert engine.request_writes(1, writes, 2.0) == 1  # FUA on each
    assert engine.request_writes(0, [(8192, b"\x04")], 3.0) == 4
    assert engine.writes_oldest == (2.0, 4096, 4096)
    out = b"".join(bytes(part) for part in engine.take_output())
    at = 0
    for cookie, (offset, payload) in enumerate([*writes, (8192, b"\x04")], start=1):
        head = struct.unpack_from(">IHHQQI", out, at)
        assert head == (0x25609513, 1 if cookie < 4 else 0, 1, cookie, offset, len(payload))
        assert out[at + 28:at + 28 + len(payload)] == bytes(payload)
        at += 28 + len(payload)
    assert at == len(out)
    def replies(*answers: tuple[int, int]) -> bytes:
        return b"".join(struct.pack(">IIQ", 0x67446698, err, cookie) for cookie, err in answers)

    done, broken, _, _, answered = engine.feed(replies((3, 28), (1, 0)))
    assert broken is None and done == [] and answered == (2, [])  # the batch is not whole
    assert engine.writes_oldest == (2.0, 0, 512)  # its oldest write still unanswered
    done, broken, _, _, answered = engine.feed(replies((4, 0), (2, 5)))
    assert broken is None and done == []
    assert answered == (2, [(4, None), (1, [(2, 28, ""), (1, 5, "")])])
    assert engine.pending == 0 and engine.writes_oldest is None
    # A connection that breaks: each batch says which of its writes had no reply.
    assert engine.request_writes(0, writes, 4.0) == 5
    done, broken, _, _, answered = engine.feed(replies((6, 5)))
    assert answered == (1, [])
    assert engine.abandon_writes() == [(5, [(1, 5, "")], [0, 2])]
    assert engine.abandon_writes() == [] and engine.writes_oldest is None
    # With the export's bounds (size, minimum block, maximum payload), a batch with a write
    # outside them queues nothing and uses no cookie (None: the caller goes through pwrite).
    queued = engine.queued
    batches: list[tuple[list[tuple[int, Buffer]], tuple[int, int, int]]] = [
        ([(0, b"x" * 512), (1024, b"y" * 512)], (1024, 512, 4096)),  # past the end
        ([(-512, b"x" * 512)], (1024, 512, 4096)),
        ([(256, b"x" * 512)], (1024, 512, 4096)),  # unaligned
        ([(0, b"x" * 1024)], (4096, 512, 512))]  # over the maximum
    for batch, bounds in batches:
        assert engine.request_writes(0, batch, 5.0, bounds) is None
    assert engine.queued == queued and engine.writes_oldest is None
    assert engine.request_writes(0, [(512, b"z" * 100)], 5.0, (612, 512, 4096)) == 8  # short last



def test_a_connection_opened_from_a_coroutine_stepped_by_hand_has_its_timeouts(
        short_tmp: Path) -> None:
    """A guest request's handler is stepped by hand until it suspends (trustvbd.eager), and
    what it calls may connect (a single replica's link reconnects inside it): open_uri
    then runs with no current task, where asyncio.timeout raised RuntimeError ("Timeout
    should be used inside a task"). It must connect, and its handshake timeout still hold.
    (`up`'s own connector, blocks/reconnect.py's, is covered in
    tests/interop/test_native_bounds.py.)"""
    image = short_tmp / "peer.img"
    with open(image, "wb") as f:
        f.truncate(MiB)
    server = Peer.nbdkit(image, short_tmp)
    silent = short_tmp / "silent.sock"
    try:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            opened: asyncio.Future[object] = loop.create_future()

            async def reconnect(uri: str) -> None:
                try:
                    client = await NbdClient.open_uri(uri, handshake_timeout=0.3)
                    opened.set_result(client.size)
                    await client.close()
                except BaseException as exc:  # what the link would log and retry after
                    opened.set_result(exc)

            loop.call_soon(eager.start, loop, reconnect(server.uri()))  # no task is running
            assert await opened == MiB
            # A server that accepts and never says a word: the handshake timeout holds.
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(silent))
            listener.listen()
            try:
                opened = loop.create_future()
                loop.call_soon(eager.start, loop, reconnect(f"nbd+unix:///?socket={silent}"))
                failed = await asyncio.wait_for(opened, 10)
                assert isinstance(failed, BlockError) and failed.errno == errno.ETIMEDOUT, failed
            finally:
                listener.close()

        run_async(main(), "uvloop")
    finally:
        server.stop()
