"""Guest READs served in the native read plane (crypt_read.read_route, ReadPlane): their
own edges.

The disk sits on real replica links (SpaceWatch over ReplicaLink over NbdClient) to real
NBD servers in threads, whose backends lie, fail or stall on command, and is served to a
guest by our NbdServer, read by an NbdClient. Each test checks that the read went
natively (the plane started it) and then that what the general path guarantees still
holds: verified data, failover with no error, read-repair, one integrity event per lie,
the lag hedge, the request timeout, a reconnect of a single replica, and a guest that
goes away with reads in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.crypt.helpers import BS, SIZE, RawMemory, new_state, pattern, run
from tests.nbd.helpers import RawClient, ServerThread
from trustvbd.blockdev import Backend, BlockError, Buffer
from trustvbd.blocks.crypt_layer import CryptDisk, physical_size
from trustvbd.blocks.layer import Layer
from trustvbd.blocks.reconnect import ReplicaLink
from trustvbd.blocks.replica import State
from trustvbd.blocks.space import SpaceWatch
from trustvbd.nbd import client_transmission, connection_limits
from trustvbd.nbd import protocol as p
from trustvbd.nbd.client import NbdClient
from trustvbd.nbd.connection import Connection
from trustvbd.nbd.exports import Export, StaticExports
from trustvbd.nbd.server import SOCKET_BUFFER, NbdServer


class Driver(Layer):
    """A driver's storage that lies, fails or stalls reads on command (set from the test's
    thread; the server's loop reads the knobs)."""

    def __init__(self) -> None:
        super().__init__(RawMemory(physical_size(SIZE)))
        self.flip = False        # flip a bit of every block a read returns
        self.fail: int | None = None  # errno every read fails with
        self.delay = 0.0         # seconds before a read is answered
        self.reads = 0

    async def pread(self, offset: int, length: int) -> Buffer:
        self.reads += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise BlockError(self.fail, "injected read error")
        data = bytearray(await self.next.pread(offset, length))
        if self.flip:
            for at in range(0, length, BS):
                data[at] ^= 1
        return data


@contextlib.contextmanager
def drivers(tmp: Path, n: int) -> Iterator[tuple[list[Driver], list[str]]]:
    backends = [Driver() for _ in range(n)]
    with contextlib.ExitStack() as stack:
        uris = [stack.enter_context(ServerThread(StaticExports([Export("", b)]),
                                                 tmp / f"d{i}.sock")).uri()
                for i, b in enumerate(backends)]
        yield backends, uris


@contextlib.asynccontextmanager
async def opened(tmp: Path, uris: list[str], lag: float = 5.0,
                 events: list[dict[str, Any]] | None = None,
                 timeout: float = 30.0, max_in_flight: int = 128) -> AsyncIterator[CryptDisk]:
    """The disk over the drivers, as the encryption domain links them (a single replica's
    link reconnects; a mirror's does not)."""
    kek = new_state(tmp / "state")
    window = 10.0 if len(uris) == 1 else 0.0
    links: list[tuple[str, Backend]] = []
    for i, uri in enumerate(uris):
        async def connect(uri: str = uri) -> Backend:
            return await NbdClient.open_uri(uri, request_timeout=timeout,
                                            max_in_flight=max_in_flight)
        link = ReplicaLink(await connect(), f"r{i}", connect, retry_window=window)
        links.append((f"r{i}", SpaceWatch(link, "vm1", f"r{i}")))
    disk = await CryptDisk.open_mirrored(
        tmp / "state", "vm1", links, kek,
        on_integrity_event=events.append if events is not None else None, lag=lag)
    try:
        yield disk
    finally:
        await disk.close()


class Guest:
    """The disk served by our NbdServer on a Unix socket, and a guest's NbdClient."""

    def __init__(self, disk: CryptDisk, server: NbdServer, uri: str, client: NbdClient) -> None:
        self.disk, self.server, self.uri, self.client = disk, server, uri, client

    async def read(self, offset: int, length: int) -> Buffer:
        """A guest READ (raises what the guest gets); fails the test unless the plane
        started it natively."""
        before = self.disk._plane.started
        try:
            return await asyncio.wait_for(self.client.pread(offset, length), 10)
        finally:
            assert self.disk._plane.started == before + 1, "the read did not go natively"


@contextlib.asynccontextmanager
async def served(tmp: Path, disk: CryptDisk) -> AsyncIterator[Guest]:
    server = NbdServer(StaticExports([Export("", disk)]), identity="test-guest")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(tmp / "guest.sock"))
    listening.listen(4)
    serving = asyncio.ensure_future(server.serve_socket(listening))
    uri = f"nbd+unix:///?socket={tmp / 'guest.sock'}"
    client = await NbdClient.open_uri(uri)
    try:
        yield Guest(disk, server, uri, client)
    finally:
        await client.close()
        await server.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        listening.close()


async def write_blocks(disk: CryptDisk, blocks: range) -> None:
    for b in blocks:
        await disk.pwrite(b * BS, pattern(b))
    await disk.flush()


def first(disk: CryptDisk, i: int) -> None:
    """The next read goes to replica i first (both equally idle)."""
    disk.replicas._next_reader = i
    disk._plane.set_turn(i)


def test_a_lying_replica_is_outvoted_reported_once_and_repaired(short_tmp: Path) -> None:
    """The first replica's reply fails verification when the plane opens it: the read goes
    on in the general path at the next replica, the guest gets the right bytes, the lie is
    one integrity event, and the blocks are written back to the liar. When every replica
    lies the read fails with EIO and never old data."""
    with drivers(short_tmp, 2) as (backends, uris):
        async def go() -> None:
            events: list[dict[str, Any]] = []
            async with opened(short_tmp, uris, events=events) as disk, \
                    served(short_tmp, disk) as guest:
                await write_blocks(disk, range(8, 12))
                backends[0].flip = True
                first(disk, 0)
                got = await guest.read(9 * BS, 2 * BS)
                assert bytes(got) == pattern(9) + pattern(10)
                assert [(e["what"], e["replica"], e["blocks"]) for e in events] == [
                    ("data", "r0", [9, 10])]
                r0, r1 = disk.replicas.replicas
                assert r0.repaired == 2 and r0.state is State.CURRENT and r1.errors == 0
                backends[0].flip = False
                first(disk, 0)
                assert bytes(await guest.read(9 * BS, 2 * BS)) == pattern(9) + pattern(10)
                # A byte range inside a block comes back as asked.
                first(disk, 1)
                assert bytes(await guest.read(8 * BS + 100, 50)) == pattern(8)[100:150]
                events.clear()
                for b in backends:
                    b.flip = True
                with pytest.raises(BlockError) as refused:
                    await guest.read(11 * BS, BS)
                assert refused.value.errno == errno.EIO
                assert "failed verification on every current replica" in refused.value.message
                assert sorted((e["what"], e["replica"]) for e in events) == [
                    ("data", "r0"), ("data", "r1")]
                for b in backends:
                    b.flip = False
                assert bytes(await guest.read(11 * BS, BS)) == pattern(11)
                assert not disk._locks.reads_held
        run(go())


def test_a_failing_replica_fails_over_without_an_error(short_tmp: Path) -> None:
    """An error reply from the first replica: served by the next one, the failure counted
    on the replica and its blocks rewritten (read-repair); no error reaches the guest. The
    request slots come back (later reads still go natively)."""
    with drivers(short_tmp, 2) as (backends, uris):
        async def go() -> None:
            events: list[dict[str, Any]] = []
            async with opened(short_tmp, uris, events=events) as disk, \
                    served(short_tmp, disk) as guest:
                await write_blocks(disk, range(4))
                clients = [r.link.native_client() for r in disk.replicas.replicas]  # type: ignore[attr-defined]
                slots = [c._free_slots for c in clients]
                backends[1].fail = errno.EIO
                first(disk, 1)
                assert bytes(await guest.read(0, 4 * BS)) == b"".join(
                    pattern(b) for b in range(4))
                r0, r1 = disk.replicas.replicas
                assert r0.errors == 0
                assert r1.errors == 1 and "injected read error" in (r1.last_error or "")
                assert r1.repaired == 4 and not events  # an error is not a lie
                backends[1].fail = None
                for _ in range(200):  # more reads than request slots
                    assert bytes(await guest.read(2 * BS, BS)) == pattern(2)
                assert [c._free_slots for c in clients] == slots
        run(go())


def test_a_stalled_replica_is_hedged_at_the_lag(short_tmp: Path) -> None:
    """A native read to a replica that does not answer is seen by the replica set's watch:
    after `lag` it goes up to Python, which asks the next replica; that one serves it, and
    the silent one is dropped and degraded, long before its request timeout."""
    with drivers(short_tmp, 2) as (backends, uris):
        async def go() -> None:
            async with opened(short_tmp, uris, lag=0.2) as disk, \
                    served(short_tmp, disk) as guest:
                await write_blocks(disk, range(3, 4))
                backends[0].delay = 3.0
                first(disk, 0)
                loop = asyncio.get_running_loop()
                started = loop.time()
                assert bytes(await guest.read(3 * BS, BS)) == pattern(3)
                waited = loop.time() - started
                assert 0.2 <= waited < 2.5, waited  # r0 would answer at 3 s
                r0 = disk.replicas.replicas[0]
                assert r0.state is not State.CURRENT
                assert "replica_lag" in (r0.last_error or "")
                assert not disk._locks.reads_held
                backends[0].delay = 0.0
        run(go())


def test_a_single_stalled_replica_times_out_and_is_asked_again(short_tmp: Path) -> None:
    """One replica that does not answer a native read within the request timeout: its
    connection is dropped (the read is not held forever), the read goes on in the general
    path, whose link reconnects and asks again."""
    with drivers(short_tmp, 1) as (backends, uris):
        async def go() -> None:
            async with opened(short_tmp, uris, timeout=0.5) as disk, \
                    served(short_tmp, disk) as guest:
                await write_blocks(disk, range(6, 7))
                backends[0].delay = 1.5
                loop = asyncio.get_running_loop()
                started = loop.time()
                reading = asyncio.ensure_future(guest.read(6 * BS, BS))
                await asyncio.sleep(0.3)
                backends[0].delay = 0.0  # for the read asked again, not the stalled one
                assert bytes(await reading) == pattern(6)
                assert 0.5 <= loop.time() - started < 1.5  # timed out, not the stalled reply
                link = disk.replicas.replicas[0].link
                assert isinstance(link, SpaceWatch) and isinstance(link.next, ReplicaLink)
                assert link.next.reconnects == 1
                assert not disk._locks.reads_held
        run(go())


def test_a_single_replica_whose_connection_breaks_under_a_read_is_reconnected(
        short_tmp: Path) -> None:
    """One replica: a native read whose connection breaks goes on in the general path,
    whose link reconnects and asks again; the guest gets its bytes, and the next read goes
    natively again, to the new connection."""
    with drivers(short_tmp, 1) as (backends, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await write_blocks(disk, range(5, 6))
                backends[0].delay = 0.3
                reading = asyncio.ensure_future(guest.read(5 * BS, BS))
                await asyncio.sleep(0.05)
                link = disk.replicas.replicas[0].link
                assert isinstance(link, SpaceWatch) and isinstance(link.next, ReplicaLink)
                old = link.next.next
                old.abandon("cut by the test")  # type: ignore[attr-defined]
                backends[0].delay = 0.0
                assert bytes(await reading) == pattern(5)
                assert link.next.reconnects == 1
                assert bytes(await guest.read(5 * BS, BS)) == pattern(5)
                assert link.next.next is not old
                assert link.next.next.native_engine().native_pending == 0  # type: ignore[attr-defined]
        run(go())


def test_a_guest_gone_with_reads_in_flight_leaves_nothing_held(short_tmp: Path) -> None:
    """A guest that disconnects with native reads waiting for slow drivers: its connection
    ends once they are answered (the late replies are dropped), the range locks are
    released (a write to those blocks goes through), and the server closes. A server
    closed with reads still waiting for a stalled driver gives them up after its timeout:
    nothing is held either."""
    with drivers(short_tmp, 2) as (backends, uris):
        async def go() -> None:
            async with opened(short_tmp, uris, lag=60.0) as disk, \
                    served(short_tmp, disk) as served_guest:
                server, uri = served_guest.server, served_guest.uri
                await write_blocks(disk, range(16))
                await served_guest.client.close()
                await asyncio.sleep(0.05)
                for b in backends:
                    b.delay = 0.3
                guest = await NbdClient.open_uri(uri)
                reads = [asyncio.ensure_future(guest.pread(b * BS, BS)) for b in range(16)]
                await asyncio.sleep(0.1)
                (conn,) = server.connections
                assert conn._native_running == 16 and not conn._tasks  # natively, no task
                guest.abandon("the guest goes away")
                await asyncio.gather(*reads, return_exceptions=True)
                await asyncio.wait_for(conn.wait_closed(), 5)
                assert not conn._native_running and not server.connections
                for b in backends:
                    b.delay = 0.0
                await asyncio.wait_for(disk.pwrite(0, pattern(0, 1)), 5)
                assert not disk._locks.reads_held
                # A stalled driver and a server that closes: the reads are given up.
                backends[0].delay = backends[1].delay = 3.0
                guest = await NbdClient.open_uri(uri)
                stuck = asyncio.ensure_future(guest.pread(3 * BS, BS))
                await asyncio.sleep(0.1)
                (conn,) = server.connections
                assert conn._native_running == 1
                await asyncio.wait_for(conn.close(timeout=0.2), 5)
                assert not conn._native_running and not disk._locks.reads_held
                await asyncio.wait_for(disk.pwrite(3 * BS, pattern(3, 1)), 5)
                guest.abandon("done")
                await asyncio.gather(stuck, return_exceptions=True)
                for b in backends:
                    b.delay = 0.0
        run(go())


def test_a_write_waiting_for_a_native_read_goes_on_when_it_ends(short_tmp: Path) -> None:
    """A write to blocks a native read holds waits for the read (the range lock), and is
    woken when the plane releases the hold natively."""
    with drivers(short_tmp, 1) as (backends, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await write_blocks(disk, range(7, 8))
                backends[0].delay = 0.3
                reading = asyncio.ensure_future(guest.read(7 * BS, BS))
                await asyncio.sleep(0.1)
                assert disk._locks.reads_held == 1
                writing = asyncio.ensure_future(disk.pwrite(7 * BS, pattern(7, 1)))
                await asyncio.sleep(0.05)
                assert not writing.done()  # waits for the read's hold
                assert bytes(await reading) == pattern(7)
                await asyncio.wait_for(writing, 5)
                backends[0].delay = 0.0
                assert bytes(await guest.client.pread(7 * BS, BS)) == pattern(7, 1)
        run(go())


@pytest.mark.parametrize("copies", [1, 2])
def test_native_and_general_reads_agree(short_tmp: Path, copies: int) -> None:
    """The same reads both ways give the same bytes: aligned, unaligned, across leaf pages,
    and blocks never written (the plane answers those with zeros at once, as pread does:
    no replica asked)."""
    with drivers(short_tmp, copies) as (_, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await write_blocks(disk, range(120, 136))  # leaf page 0 ends at block 127
                for offset, length in [(120 * BS, 16 * BS), (121 * BS + 7, 3 * BS), (127 * BS, 2 * BS),
                                       (135 * BS + 4000, 96), (120 * BS + 5, 10 * BS)]:
                    want = bytes(await disk.pread(offset, length))
                    assert bytes(await guest.read(offset, length)) == want
                # Big reads, many at once and again: their pooled buffers are handed out
                # again only once their replies have left.
                want = bytes(await disk.pread(120 * BS, 16 * BS))
                for _ in range(3):
                    got = await asyncio.gather(*(guest.client.pread(120 * BS, 16 * BS)
                                                 for _ in range(40)))
                    assert all(bytes(g) == want for g in got)
                before, zeros = disk._plane.started, disk._plane.zeros
                for offset, length in [(300 * BS, BS), (301 * BS + 5, 3 * BS), (256 * BS, 64 * BS)]:
                    want = bytes(await disk.pread(offset, length))
                    assert want == bytes(length)  # never written
                    assert bytes(await guest.client.pread(offset, length)) == want
                assert disk._plane.started == before  # no replica asked
                assert disk._plane.zeros == zeros + 3
                # A READ partly of written blocks goes to a replica as any other.
                assert bytes(await guest.read(135 * BS, 2 * BS)) == pattern(135) + bytes(BS)
        run(go())


@pytest.mark.parametrize("copies", [1, 2])
def test_small_and_big_native_replies_of_one_batch_leave_in_order(short_tmp: Path,
                                                                  copies: int) -> None:
    """Many READs at once, small (copied in among the reply headers when the output is
    cut, their buffers reused by the next ones) and big (a buffer of their own) mixed,
    aligned and not: every reply carries its own bytes, batch after batch, and none
    carries what an earlier read left in a reused buffer."""
    with drivers(short_tmp, copies) as (_, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await write_blocks(disk, range(64))
                everything = b"".join(pattern(b) for b in range(64))
                shapes = [(0, BS), (3 * BS + 17, 2 * BS - 40), (8 * BS, 5 * BS),
                          (20 * BS + 1, 100), (30 * BS, 4 * BS), (40 * BS + 4095, 2),
                          (41 * BS, 6 * BS + 9)]
                for round_ in range(6):
                    before = disk._plane.started
                    reads = [(o + (round_ % 3) * BS, n) for o, n in shapes] * 4
                    got = await asyncio.gather(*(guest.client.pread(o, n) for o, n in reads))
                    for (offset, length), data in zip(reads, got, strict=True):
                        assert bytes(data) == everything[offset:offset + length]
                    assert disk._plane.started == before + len(reads)
        run(go())


def test_native_reads_keep_the_connections_bounds(short_tmp: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest with more READs in flight than a connection may run: at most MAX_TASKS of
    them run natively at once (the rest wait, reading paused), and every one is answered."""
    monkeypatch.setattr(connection_limits, "MAX_TASKS", 4)
    with drivers(short_tmp, 2) as (backends, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await write_blocks(disk, range(32))
                for b in backends:
                    b.delay = 0.05
                before = disk._plane.started
                reads = [asyncio.ensure_future(guest.client.pread(b * BS, BS)) for b in range(32)]
                (conn,) = guest.server.connections
                most = 0
                while not all(r.done() for r in reads):
                    most = max(most, conn._native_running + len(conn._tasks))
                    await asyncio.sleep(0.005)
                assert [bytes(r.result()) for r in reads] == [pattern(b) for b in range(32)]
                assert 0 < most <= 4
                assert disk._plane.started > before
        run(go())


def test_reads_after_one_the_plane_declines_still_go_natively(short_tmp: Path) -> None:
    """A batch whose first READ the plane declines (of 0 bytes: pread answers it) has its
    later READs started natively all the same, since reads commute; but a READ after a
    WRITE served the general way is served after it, and sees it."""
    with drivers(short_tmp, 2) as (_, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await write_blocks(disk, range(8))
                await guest.read(0, BS)  # the route and the leaf page are ready
                before = disk._plane.started
                got = await asyncio.gather(guest.client.pread(0, 0),
                                           *(guest.client.pread(b * BS, BS) for b in range(1, 5)))
                assert [bytes(g) for g in got] == [b""] + [pattern(b) for b in range(1, 5)]
                assert disk._plane.started == before + 4
                # Sent together: a declined READ, a WRITE (the batch began with a READ, so the
                # write plane is not armed: the general way) and a READ of what it wrote.
                _, _, after = await asyncio.gather(guest.client.pread(0, 0),
                                                   guest.client.pwrite(6 * BS, pattern(6, 1)),
                                                   guest.client.pread(6 * BS, BS))
                assert bytes(after) == pattern(6, 1)
        run(go())


def test_a_replicas_batch_of_native_replies_calls_no_python(short_tmp: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Many READs at once over 2 replicas: a guest batch's READs leave for the replicas from
    the guest's parse (no Python send per link), a replica connection's batch that did
    nothing but answer native reads is finished by its engine (NbdClientEngine.ready: slots
    back, no resolve), and the guest connection's replies settle once per loop turn
    (_native_settled), not once per replica batch (_native_replied). Every reply is right."""
    batches: list[Any] = []
    sends: list[NbdClient] = []
    resolve, send_outgoing = client_transmission.resolve, client_transmission._send_outgoing

    def counted(client: NbdClient, batch: Any) -> None:
        batches.append((client, batch))
        resolve(client, batch)

    def counted_send(client: NbdClient) -> None:
        sends.append(client)
        send_outgoing(client)

    monkeypatch.setattr(client_transmission, "resolve", counted)
    monkeypatch.setattr(NbdClient, "resolve", counted)
    monkeypatch.setattr(client_transmission, "_send_outgoing", counted_send)
    calls = {"replied": 0, "settled": 0}
    for name in ("replied", "settled"):
        method = getattr(Connection, f"_native_{name}")

        def wrapper(conn: Connection, method: Any = method, name: str = name) -> None:
            calls[name] += 1
            method(conn)

        monkeypatch.setattr(Connection, f"_native_{name}", wrapper)
    with drivers(short_tmp, 2) as (_, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await write_blocks(disk, range(64))
                await guest.read(0, BS)  # the route and the leaf pages are ready
                batches.clear()
                sends.clear()
                calls.update(replied=0, settled=0)
                before = disk._plane.started
                for _ in range(4):
                    got = await asyncio.gather(*(guest.client.pread(b * BS, BS) for b in range(64)))
                    assert [bytes(g) for g in got] == [pattern(b) for b in range(64)]
                assert disk._plane.started == before + 4 * 64
                links = [(c, batch) for c, batch in batches if c is not guest.client]
                only_reads = [batch for _, batch in links
                              if not batch[0] and batch[4] is None and batch[3] is not None
                              and not batch[3][2]]
                assert only_reads == []
                assert [c for c in sends if c is not guest.client] == []
                assert calls["replied"] == 0
                assert 0 < calls["settled"] < 4 * 64
        run(go())


def test_reads_past_a_replicas_request_slots_wait_for_those_native_replies_free(
        short_tmp: Path) -> None:
    """Replica connections with 2 request slots each and 32 READs at once: the plane takes
    what the slots allow, the rest wait for a slot (the general way); the native replies
    hand theirs on to them (the engine leaves that to resolve: none is free), and every
    read is answered right."""
    with drivers(short_tmp, 2) as (_, uris):
        async def go() -> None:
            async with opened(short_tmp, uris, max_in_flight=2) as disk, \
                    served(short_tmp, disk) as guest:
                await write_blocks(disk, range(32))
                await guest.read(0, BS)
                before = disk._plane.started
                for _ in range(3):
                    got = await asyncio.wait_for(asyncio.gather(
                        *(guest.client.pread(b * BS, BS) for b in range(32))), 20)
                    assert [bytes(g) for g in got] == [pattern(b) for b in range(32)]
                assert disk._plane.started > before
        run(go())


def test_a_guest_that_reads_no_reply_stops_native_reads_at_the_output_bound(
        short_tmp: Path) -> None:
    """A guest sends READs and reads none of their replies: the native replies wait in the
    connection's output once the socket is full, reading stops once WRITE_BUFFER_HIGH bytes
    wait there, and READs sent meanwhile are not started. When the guest reads, every reply
    comes whole, each with its own bytes, and the READs held back are served too."""
    big = 64 * 1024
    # Replies of more than the socket holds (its buffer, doubled by the kernel) and twice
    # the connection's output bound besides.
    count = 2 * (SOCKET_BUFFER + connection_limits.WRITE_BUFFER_HIGH) // big
    with drivers(short_tmp, 2) as (_, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await write_blocks(disk, range(SIZE // BS))
                everything = b"".join(pattern(b) for b in range(SIZE // BS))
                loop = asyncio.get_running_loop()
                (theirs,) = guest.server.connections  # the guest's NbdClient
                raw = RawClient(str(short_tmp / "guest.sock"), timeout=20)
                await loop.run_in_executor(None, raw.go)
                (conn,) = guest.server.connections - {theirs}
                offsets = [(i * big) % (SIZE - big) for i in range(2 * count)]
                before = disk._plane.started


                def send(cookies: range) -> None:
                    raw.sock.sendall(b"".join(struct.pack(
                        ">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, i, offsets[i], big)
                        for i in cookies))

                await loop.run_in_executor(None, send, range(count))
                async with asyncio.timeout(20):
                    while not conn._reading_paused or conn._native_running or conn._tasks:
                        await asyncio.sleep(0.01)
                assert conn._transport is not None
                held = conn._out_bytes + conn._transport.get_write_buffer_size()
                assert connection_limits.WRITE_BUFFER_HIGH <= held <= 2 * big * count
                started = disk._plane.started
                assert before < started <= before + count
                await loop.run_in_executor(None, send, range(count, 2 * count))  # paused
                await asyncio.sleep(0.2)
                assert disk._plane.started == started  # none of them started

                def read_all() -> dict[int, bytes]:
                    got = {}
                    for _ in range(2 * count):
                        error, cookie = raw.simple_reply()
                        assert error == 0
                        got[cookie] = raw.recv_exact(big)
                    return got

                got = await loop.run_in_executor(None, read_all)
                raw.close()
                assert sorted(got) == list(range(2 * count))
                for cookie, data in got.items():
                    offset = offsets[cookie]
                    assert data == everything[offset:offset + big], cookie
        run(go())
