"""Guest WRITEs done in the native write plane (crypt_write.write_route, WritePlane): what
it takes, what it declines, and that what it records is what the Python path recorded.

The disk sits on real replica links to real NBD servers in threads (as in
test_native_reads.py), is served by our NbdServer on a Unix socket, and is written by a
real guest: libnbd in a thread, its requests pipelined so that several arrive in one
batch. Each test checks how many writes the plane took, then what the general path
guarantees: the data reads back verified (natively and the general way), the intent log
holds a record per write that the log's own reader accepts, holds and writers are all
given back, and a write the plane declines is served the general way with nothing of it
done twice.
"""

from __future__ import annotations

import asyncio
import errno
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.crypt.helpers import BS, pattern, run
from tests.crypt.test_native_reads import Driver, drivers, opened, served
from trustvbd.blockdev import BlockError, Buffer
from trustvbd.blocks.crypt_layer import CryptDisk
from trustvbd.blocks.intent_log import IntentLog
from trustvbd.blocks.write_behind import WRITE_BEHIND_BLOCKS

sys.path.append("/usr/lib/python3/dist-packages")  # Debian's libnbd module
nbd: Any = pytest.importorskip("nbd")


def guest_writes(uri: str, writes: list[tuple[int, bytes, bool]]) -> None:
    """A libnbd guest sends every write at once (FUA where the bool says so), then waits
    for all of them; raises if any failed."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset,
                                flags=nbd.CMD_FLAG_FUA if fua else 0)
                   for offset, data, fua in writes]
        for cookie in cookies:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
    finally:
        h.shutdown()


async def write_as_guest(uri: str, writes: list[tuple[int, bytes, bool]]) -> None:
    await asyncio.wait_for(asyncio.to_thread(guest_writes, uri, writes), 30)


async def warm(disk: CryptDisk, *blocks: int) -> None:
    """Load the leaf pages of these blocks (a write there): the plane takes only writes
    whose pages are in memory (the first write of a page loads it the general way)."""
    for b in blocks:
        await disk.pwrite(b * BS, pattern(b))
    await disk._behind.drain()


def settled(disk: CryptDisk) -> None:
    """Every write behind ended: no hold, no writer, nothing behind."""
    assert disk._behind.running == 0
    assert disk._commits._writers == 0
    assert disk._leaves.table.holds == 0


def test_a_batch_of_small_writes_is_done_natively(short_tmp: Path) -> None:
    """Pipelined 4 KiB-multiple writes without FUA (adjacent ones, which the writes behind
    gather, and scattered ones) all go through the plane; they read back verified, natively
    and the general way; the intent log holds one record per write whose
    leaves are the table's, and nothing stays held."""
    blocks = [(b, 1 + b % 3) for b in range(0, 48, 4)] + [(b, 1) for b in range(200, 208)]
    writes = [(b * BS, b"".join(pattern(b + i) for i in range(n)), False) for b, n in blocks]
    with drivers(short_tmp, 2) as (_, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await warm(disk, 100, 250)
                before = disk._wplane.started
                await write_as_guest(guest.uri, writes)
                assert disk._wplane.started - before == len(writes)
                await disk._behind.drain()
                settled(disk)
                log = IntentLog(disk._commits.intent.path).read()
                recorded = {r.first_block: r for r in log.records if r.new}
                for b, n in blocks:
                    assert recorded[b].new == disk._leaves.get(b, b + n)
                    assert recorded[b].old == bytes(32 * n)  # never written before
                for b, n in blocks:
                    want = b"".join(pattern(b + i) for i in range(n))
                    assert bytes(await guest.read(b * BS, n * BS)) == want
                    assert bytes(await disk.pread(b * BS, n * BS)) == want
                await disk.flush()
                settled(disk)
        run(go())


def test_writes_the_plane_declines_go_the_general_way(short_tmp: Path) -> None:
    """FUA, a partial block, WRITE_BEHIND_BLOCKS blocks, a range someone holds, and any
    write once the writes behind are full: none is taken natively, each is served the
    general way, exactly once, and reads back."""
    with drivers(short_tmp, 1) as (_, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await warm(disk, 100)
                big = b"".join(pattern(b) for b in range(WRITE_BEHIND_BLOCKS))
                declined: list[tuple[int, bytes, bool]] = [
                    (5 * BS, pattern(5), True),  # FUA: waits for its replicas
                    (7 * BS + 100, pattern(7)[:300], False),  # byte-granular: read-modify-write
                    (32 * BS, big, False)]  # too big to go behind
                for write in declined:
                    before, versions = disk._wplane.started, disk._commits._next_version
                    await write_as_guest(guest.uri, [write])
                    assert disk._wplane.started == before, write[:1]
                    blocks = -(-(write[0] % BS + len(write[1])) // BS)
                    assert disk._commits._next_version == versions + blocks  # sealed once
                assert bytes(await disk.pread(5 * BS, BS)) == pattern(5)
                assert bytes(await disk.pread(7 * BS + 100, 300)) == pattern(7)[:300]
                assert bytes(await disk.pread(32 * BS, len(big))) == big
                # A range held (as a resync or a read holds it): declined, and the general
                # way waits for the hold.
                hold = disk._locks.try_acquire(9, 10, True)
                assert hold is not None
                before = disk._wplane.started
                writing = asyncio.ensure_future(write_as_guest(guest.uri, [(9 * BS, pattern(9), False)]))
                await asyncio.sleep(0.3)
                assert not writing.done()
                disk._locks.release(hold)
                await writing
                assert disk._wplane.started == before
                assert bytes(await disk.pread(9 * BS, BS)) == pattern(9)
                # No room behind: the next writes wait for their replicas.
                disk._behind.limit = 0
                await write_as_guest(guest.uri, [(b * BS, pattern(b), False) for b in range(40, 44)])
                assert disk._wplane.started == before
                disk._behind.limit = 64
                await write_as_guest(guest.uri, [(b * BS, pattern(b + 1), False) for b in range(40, 44)])
                assert disk._wplane.started == before + 4
                for b in range(40, 44):
                    assert bytes(await disk.pread(b * BS, BS)) == pattern(b + 1)
                await disk._behind.drain()
                settled(disk)
        run(go())


class FailingWrites(Driver):
    """A driver whose writes fail on command."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_writes: int | None = None

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if self.fail_writes is not None:
            raise BlockError(self.fail_writes, "injected write error")
        await self.next.pwrite(offset, data, fua)


def test_a_lost_write_behind_stops_the_plane_until_a_flush_reports_it(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A native write whose replica write fails after the guest was answered: its blocks
    read as EIO, later writes are not taken natively (they wait for their replicas and fail
    themselves), the guest's FLUSH fails once, and after it the plane takes writes again."""
    import tests.crypt.test_native_reads as reads
    monkeypatch.setattr(reads, "Driver", FailingWrites)
    with drivers(short_tmp, 1) as (backends, uris):
        failing = backends[0]
        assert isinstance(failing, FailingWrites)

        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await warm(disk, 100)
                failing.fail_writes = errno.EIO
                before = disk._wplane.started
                await write_as_guest(guest.uri, [(3 * BS, pattern(3), False)])
                assert disk._wplane.started == before + 1
                await disk._behind.drain()
                with pytest.raises(BlockError) as lost:
                    await disk.pread(3 * BS, BS)
                assert lost.value.errno == errno.EIO
                with pytest.raises(Exception):  # noqa: B017 - libnbd's error
                    await write_as_guest(guest.uri, [(4 * BS, pattern(4), False)])
                assert disk._wplane.started == before + 1  # not taken: it failed itself
                failing.fail_writes = None
                with pytest.raises(BlockError) as flushed:
                    await guest.client.flush()
                assert "injected write error" in flushed.value.message
                await guest.client.flush()
                await write_as_guest(guest.uri, [(5 * BS, pattern(5), False)])
                assert disk._wplane.started == before + 2
                assert bytes(await disk.pread(5 * BS, BS)) == pattern(5)
                await disk._behind.drain()
                settled(disk)
        run(go())


class StallingWrites(Driver):
    """A driver whose writes wait while `stalled` (set from the test's thread), counted."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = False
        self.writes = 0

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.writes += 1
        while self.stalled:
            await asyncio.sleep(0.005)
        await self.next.pwrite(offset, data, fua)


def test_writes_past_a_full_write_behind_wait_for_room_and_go_natively(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest pipelining more writes than the writes behind may hold while the replica
    stalls: the writes past the limit are held (the connection stops reading) until a run
    ends, then taken by the plane; none goes to the replica alone (the general way, which
    did it before), the limit holds all along, and every write reads back."""
    import tests.crypt.test_native_reads as reads
    monkeypatch.setattr(reads, "Driver", StallingWrites)
    blocks = [300 + 2 * i for i in range(12)]  # apart: none gathered with another
    with drivers(short_tmp, 1) as (backends, uris):
        replica = backends[0]
        assert isinstance(replica, StallingWrites)

        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await warm(disk, 300)
                behind = disk._behind
                behind.limit = 4
                before, sent = disk._wplane.started, replica.writes
                replica.stalled = True
                writing = asyncio.ensure_future(write_as_guest(
                    guest.uri, [(b * BS, pattern(b + 1), False) for b in blocks]))
                # Until the writes past the limit either wait for room behind, or one went
                # to the replica alone (a fifth replica write: each write behind is a run).
                try:
                    await until(lambda: getattr(behind, "_room_waits", 0) > 0
                                or replica.writes > sent + 4)
                    held, alone = behind.running, replica.writes - sent
                finally:
                    replica.stalled = False
                await writing
                assert held == 4
                assert alone <= 4
                assert disk._wplane.started - before == len(blocks)
                for b in blocks:
                    assert bytes(await disk.pread(b * BS, BS)) == pattern(b + 1)
                await behind.drain()
                settled(disk)
        run(go())


def test_writes_queued_past_a_full_write_behind_go_natively_together(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writes that queued while the writes behind were full go through the plane
    together once room is made (armed and collected once for as many as there is room for:
    Connection._write_queued), not one `write_inline` call each, as they did; a partial
    write among them and a FUA write after them (the plane declines both) are served the
    usual way in their place in the order; the limit holds at every collection, and all
    read back."""
    import tests.crypt.test_native_reads as reads
    monkeypatch.setattr(reads, "Driver", StallingWrites)
    blocks = [400 + 2 * i for i in range(16)]  # apart: none gathered with another
    writes = [(b * BS, pattern(b + 1), False) for b in blocks]
    writes.insert(9, (500 * BS + 100, b"\xab" * 10, False))  # partial: declined
    writes.append((502 * BS, pattern(7), True))  # FUA: declined (and a commit follows)
    with drivers(short_tmp, 1) as (backends, uris):
        replica = backends[0]
        assert isinstance(replica, StallingWrites)

        async def go() -> None:
            async with opened(short_tmp, uris) as disk:
                await warm(disk, 400, 500)
                behind = disk._behind
                behind.limit = 4
                collected: list[int] = []  # writes per collection by the connection
                singles = 0  # writes the plane took alone (write_inline)
                taken, inline = disk.writes_taken, disk.write_inline

                def counting_taken() -> None:
                    started = behind.started
                    taken()
                    collected.append(behind.started - started)
                    assert behind.running <= 4

                def counting_inline(offset: int, data: Buffer, fua: bool = False) -> bool:
                    nonlocal singles
                    took = inline(offset, data, fua)
                    singles += took
                    return took
                disk.writes_taken = counting_taken  # type: ignore[method-assign]
                disk.write_inline = counting_inline  # type: ignore[method-assign]
                async with served(short_tmp, disk) as guest:
                    before = disk._wplane.started
                    replica.stalled = True
                    writing = asyncio.ensure_future(write_as_guest(guest.uri, writes))
                    try:
                        await until(lambda: behind._room_waits > 0)
                    finally:
                        replica.stalled = False
                    await writing
                    assert disk._wplane.started - before == len(blocks)
                    assert sum(collected) + singles == len(blocks)
                    assert max(collected[1:], default=0) > 1, collected  # after the stall
                    assert singles <= 4, (singles, collected)
                    for b in blocks:
                        assert bytes(await disk.pread(b * BS, BS)) == pattern(b + 1)
                    want = bytearray(pattern(500))  # (warm wrote it)
                    want[100:110] = b"\xab" * 10
                    assert bytes(await disk.pread(500 * BS, BS)) == bytes(want)
                    assert bytes(await disk.pread(502 * BS, BS)) == pattern(7)
                    await behind.drain()
                    settled(disk)
        run(go())


async def until(condition: Any, tries: int = 10000) -> None:
    """Wait (in 1 ms steps) until `condition()` holds."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


def test_a_block_written_partly_keeps_its_plaintext_past_the_plane(short_tmp: Path) -> None:
    """A block written a few bytes at a time (e2fsprogs' superblock): the one-block write
    between two such updates is declined by the plane (the general way keeps its
    plaintext), so the next partial write needs no replica read; other blocks' one-block
    writes still go natively."""
    with drivers(short_tmp, 1) as (backends, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk, served(short_tmp, disk) as guest:
                await warm(disk, 100)
                await write_as_guest(guest.uri, [(2 * BS + 10, b"abc", False)])
                before = disk._wplane.started
                await write_as_guest(guest.uri, [(2 * BS, pattern(2), False),
                                                 (6 * BS, pattern(6), False)])
                assert disk._wplane.started == before + 1  # block 6 only
                await disk._behind.drain()
                reads = backends[0].reads
                await write_as_guest(guest.uri, [(2 * BS + 20, b"xyz", False)])
                assert backends[0].reads == reads  # merged with the kept plaintext
                want = bytearray(pattern(2))
                want[20:23] = b"xyz"
                assert bytes(await disk.pread(2 * BS, BS)) == bytes(want)
                assert bytes(await disk.pread(6 * BS, BS)) == pattern(6)
        run(go())
