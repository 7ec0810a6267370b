"""Mirroring at the layer level: CryptDisk over a ReplicaSet of in-memory replicas.

Real NBD drivers (hostile ones, qemu-nbd, nbdkit) are in tests/interop/test_mirror_nbd.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.crypt.helpers import BS, LAY, SIZE, RawMemory, new_state, pattern, run
from tests.nbd.helpers import ServerThread
from tests.nbd.test_client import FullAt
from trustvbd.blockdev import Backend, BlockError, Buffer
from trustvbd.blocks.block_runs import BlockRuns
from trustvbd.blocks.crypt_layer import CryptDisk, IntegrityError, physical_size
from trustvbd.blocks.disk_state import Anchor, DiskState, Member, replica_id
from trustvbd.blocks.layer import Layer
from trustvbd.blocks.ranges import RangeLock
from trustvbd.blocks.reconnect import ReplicaLink
from trustvbd.blocks.replica import Replica, State
from trustvbd.blocks.replica_set import ReplicaSet
from trustvbd.blocks.space import SpaceWatch
from trustvbd.nbd.client import NbdClient
from trustvbd.nbd.exports import Export, StaticExports

NBLOCKS = SIZE // BS


class Faulty(Layer):
    """A replica that fails on command, and survives CryptDisk.close() for reopening."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.fail_writes = False
        self.fail_reads = False
        self.writes = 0

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if self.fail_writes:
            raise BlockError(errno.EIO, "injected write error")
        self.writes += 1
        await self.next.pwrite(offset, data, fua)

    async def flush(self) -> None:
        if self.fail_writes:
            raise BlockError(errno.EIO, "injected flush error")
        await self.next.flush()

    async def pread(self, offset: int, length: int) -> Buffer:
        if self.fail_reads:
            raise BlockError(errno.EIO, "injected read error")
        return await self.next.pread(offset, length)

    async def close(self) -> None:
        pass


def memories(n: int) -> list[RawMemory]:
    return [RawMemory(physical_size(SIZE)) for _ in range(n)]


async def open_set(tmp: Path, kek: Any, replicas: Sequence[Backend],
                   events: list[dict[str, Any]] | None = None) -> CryptDisk:
    return await CryptDisk.open_mirrored(
        tmp, "vm1", [(f"r{i}", r) for i, r in enumerate(replicas)], kek,
        on_integrity_event=events.append if events is not None else None)


async def settle(disk: CryptDisk, tries: int = 2000) -> None:
    for _ in range(tries):
        if len(disk.replicas.current) == len(disk.replicas.replicas):
            return
        if disk.replicas.joining():
            await disk.flush()
        await asyncio.sleep(0.001)
    raise AssertionError(f"replicas did not settle: {disk.replicas.status()}")


def data_areas(mems: list[RawMemory]) -> list[bytes]:
    return [bytes(m.raw[LAY.data_start:LAY.physical_size]) for m in mems]


async def fill(disk: CryptDisk, tag: int = 0) -> bytes:
    data = b"".join(pattern(b, tag) for b in range(NBLOCKS))
    await disk.pwrite(0, data)
    await disk.flush()
    return data


@pytest.mark.parametrize("copies", [2, 3])
def test_writes_reach_every_replica_and_reads_are_spread(tmp_path: Path, copies: int) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(copies)
        counted = [Faulty(m) for m in mems]
        disk = await open_set(tmp_path, kek, counted)
        data = await fill(disk)
        assert len(set(bytes(m.raw) for m in mems)) == 1, "replicas are byte-identical"
        reads = [0] * copies
        for i, c in enumerate(counted):
            orig = c.pread

            async def counting(offset: int, length: int, i: int = i, orig: Any = orig) -> Buffer:
                reads[i] += 1
                return await orig(offset, length)
            c.pread = counting  # type: ignore[method-assign]
        for b in range(0, NBLOCKS, 8):
            assert bytes(await disk.pread(b * BS, 8 * BS)) == data[b * BS:(b + 8) * BS]
        assert all(n > 0 for n in reads), f"reads not spread: {reads}"
        await disk.close()
        anchor = DiskState(tmp_path, "vm1").read_anchor()
        assert anchor.members is not None and len(anchor.members) == copies
        assert all(anchor.member(f"r{i}") is Member.CURRENT for i in range(copies))
    run(go())


def test_a_flush_hashes_no_replica_name(tmp_path: Path) -> None:
    """A FLUSH the intent log stands for compares the membership with the anchor's before
    and after its log sync: each time a SHA-256 of every replica's name, now each name's
    anchor id is made once."""
    async def go() -> None:
        disk = await open_set(tmp_path, new_state(tmp_path), memories(2))
        await fill(disk)
        before = replica_id.cache_info()
        for b in range(5):
            await disk.pwrite(b * BS, pattern(b, 1))
            await disk.flush()
        after = replica_id.cache_info()
        assert after.misses == before.misses, (before, after)
        assert after.hits >= before.hits + 5 * 2 * 2, (before, after)  # compared, twice a FLUSH
        await disk.close()
    run(go())


@pytest.mark.parametrize("copies", [2, 3])
def test_one_percent_corrupt_reads_exact_and_is_repaired(tmp_path: Path, copies: int) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(copies)
        events: list[dict[str, Any]] = []
        disk = await open_set(tmp_path, kek, list(mems), events)
        data = await fill(disk)
        rng = random.Random(11)
        bad = rng.sample(range(NBLOCKS), max(1, NBLOCKS // 100))
        for b in bad:
            mems[1].raw[LAY.data_offset(b) + rng.randrange(BS)] ^= 1 << rng.randrange(8)
        assert bytes(await disk.pread(0, SIZE)) == data
        # Reads go to the replicas in turn: each bad block is read from each once.
        for b in bad:
            for _ in range(copies):
                assert bytes(await disk.pread(b * BS, BS)) == data[b * BS:(b + 1) * BS]
        r1 = disk.replicas.replicas[1]
        assert r1.repaired == len(bad) and r1.state is State.CURRENT
        assert len(set(data_areas(mems))) == 1, "the corrupted replica was repaired"
        assert {b for e in events for b in e["blocks"]} == set(bad)
        assert all(e["replica"] == "r1" for e in events)
        await disk.close()
    run(go())


def test_bad_on_every_replica_is_eio_never_old_data(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        events: list[dict[str, Any]] = []
        disk = await open_set(tmp_path, kek, list(mems), events)
        old = await fill(disk, 0)
        stale = [bytes(m.raw) for m in mems]
        await fill(disk, 1)
        for m, s in zip(mems, stale, strict=True):  # both drivers replay the old data area
            m.raw[LAY.data_start:] = s[LAY.data_start:]
        with pytest.raises(IntegrityError) as exc:
            await disk.pread(5 * BS, BS)
        assert exc.value.errno == errno.EIO and exc.value.blocks == [5]
        assert old[5 * BS:6 * BS] not in str(exc.value).encode()
        assert {e["replica"] for e in events} == {"r0", "r1"}
        await disk.close()
    run(go())


@pytest.mark.parametrize("copies", [2, 3])
def test_failed_writes_degrade_remember_and_resync(tmp_path: Path, copies: int) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(copies)
        faulty = [Faulty(m) for m in mems]
        disk = await open_set(tmp_path, kek, list(faulty))
        data = bytearray(await fill(disk))
        # A full commit (at close), so that the blocks written since the last one (which a
        # driver rolled back within an epoch may lack: they are in the map too) are none.
        await disk.close()
        disk = await open_set(tmp_path, kek, list(faulty))
        faulty[1].fail_writes = True
        for b in (3, 4, 100):  # the guest sees success
            data[b * BS:(b + 1) * BS] = pattern(b, 7)
            await disk.pwrite(b * BS, pattern(b, 7))
        await disk.flush()
        r1 = disk.replicas.replicas[1]
        assert r1.state is State.DEGRADED and {3, 4, 100} <= set(r1.dirty)
        await disk.close()
        # Trusted state remembers, across a restart of the domain.
        state = DiskState(tmp_path, "vm1")
        anchor = state.read_anchor()
        assert anchor.member("r1") is Member.BEHIND
        stored = state.read_dirty_map("r1", NBLOCKS)
        assert stored is not None and {3, 4, 100} <= set(stored[1]) and len(stored[1]) < 10
        # Reopen while r1 still fails: it stays behind, the disk serves from the rest.
        disk = await open_set(tmp_path, kek, list(faulty))
        assert disk.replicas.replicas[1].state is State.DEGRADED
        assert bytes(await disk.pread(0, SIZE)) == data
        # Heal it: only the dirty blocks are copied, then it rejoins.
        writes_before = faulty[1].writes
        faulty[1].fail_writes = False
        await settle(disk)
        copied = faulty[1].writes - writes_before
        assert copied < 12, f"{copied} writes: more than the dirty blocks and the joining commit"
        await disk.close()
        diff = [i for i in range(0, len(mems[0].raw), BS) if mems[0].raw[i:i + BS] != mems[1].raw[i:i + BS]]
        assert not diff, diff
        assert len(set(bytes(m.raw) for m in mems)) == 1
        assert DiskState(tmp_path, "vm1").read_dirty_map("r1", NBLOCKS) is None
    run(go())


def test_writes_not_yet_flushed_are_dirty_on_a_replica_that_fails_before_the_flush(
        tmp_path: Path) -> None:
    """The driver may lose what it acknowledged but was never asked to flush: a replica
    degraded before the next flush must resync those blocks too, in runs or apart."""
    async def go() -> None:
        kek = new_state(tmp_path)
        faulty = [Faulty(m) for m in memories(2)]
        disk = await open_set(tmp_path, kek, list(faulty))
        await fill(disk)  # flushed: not dirty later
        for b0, n in ((10, 4), (14, 6), (40, 2), (7, 1)):  # a growing run, a gap, one behind
            await disk.pwrite(b0 * BS, b"".join(pattern(b, 5) for b in range(b0, b0 + n)))
        await disk.settle()  # on both drivers (write-behind)
        faulty[1].fail_writes = True
        await disk.pwrite(60 * BS, pattern(60, 5))  # the guest sees success
        await disk.settle()
        r1 = disk.replicas.replicas[1]
        assert r1.state is State.DEGRADED
        assert set(r1.dirty) == {*range(10, 20), 40, 41, 7, 60}, r1.dirty
        await disk.flush()
        faulty[1].fail_writes = False
        await settle(disk)
        await disk.close()
        assert len({bytes(f.next.raw) for f in faulty}) == 1  # type: ignore[attr-defined]
    run(go())


class Stalled(Layer):
    """A replica whose writes wait until released; records how each one ended."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.ended: list[str] = []

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.02)  # stopping takes a while (a request on the wire)
            self.ended.append("cancelled")
            raise
        await self.next.pwrite(offset, data, fua)
        self.ended.append("written")


def test_a_cancelled_mirrored_write_stops_every_replica_write_before_it_returns() -> None:
    """The caller of a write (a guest connection closing, the domain stopping) may be
    cancelled at any await: the fan-out then cancels every replica's write and returns
    only once each has stopped, so none runs on behind the range lock it held."""
    async def go() -> None:
        slow = [Stalled(RawMemory(physical_size(SIZE))) for _ in range(2)]
        rs = ReplicaSet("vm1", LAY, [Replica(f"r{i}", s) for i, s in enumerate(slow)])
        write = asyncio.ensure_future(rs.pwrite(LAY.data_offset(5), pattern(5, 1)))
        await asyncio.gather(*(s.started.wait() for s in slow))
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        assert [s.ended for s in slow] == [["cancelled"], ["cancelled"]]
        # One replica fails, the other writes: the write succeeds, the failed one degrades.
        for s in slow:
            s.release.set()

        async def failing(offset: int, data: Buffer, fua: bool = False) -> None:
            raise BlockError(errno.EIO, "injected")
        slow[1].pwrite = failing  # type: ignore[method-assign]
        await rs.pwrite(LAY.data_offset(6), pattern(6, 1))
        assert slow[0].ended[-1] == "written"
        assert [r.state for r in rs.replicas] == [State.CURRENT, State.DEGRADED]
        assert 6 in rs.replicas[1].dirty
        await rs.close()
    run(go())


def test_a_mirrored_write_cancelled_after_its_first_replica_answered() -> None:
    """The fan-out runs the first replica's write in the caller's task and the others in
    tasks of their own: cancelled while it waits for the others (the first one done), it
    still cancels each of them and returns only once they have stopped; a failure of the
    first replica alone degrades that one, as of any other."""
    async def go() -> None:
        mems = [RawMemory(physical_size(SIZE)) for _ in range(3)]
        slow = [Stalled(m) for m in mems[1:]]
        links: list[Backend] = [Faulty(mems[0]), *slow]
        rs = ReplicaSet("vm1", LAY, [Replica(f"r{i}", link) for i, link in enumerate(links)])
        write = asyncio.ensure_future(rs.pwrite(LAY.data_offset(5), pattern(5, 1)))
        await asyncio.gather(*(s.started.wait() for s in slow))
        await asyncio.sleep(0)
        assert links[0].writes == 1  # type: ignore[attr-defined]
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        assert [s.ended for s in slow] == [["cancelled"], ["cancelled"]]
        for s in slow:
            s.release.set()
        links[0].fail_writes = True  # type: ignore[attr-defined]
        await rs.pwrite(LAY.data_offset(6), pattern(6, 1))
        assert [s.ended[-1] for s in slow] == ["written", "written"]
        assert [r.state for r in rs.replicas] == [State.DEGRADED, State.CURRENT, State.CURRENT]
        assert 6 in rs.replicas[0].dirty
        await rs.close()
    run(go())


def test_mirrored_writes_through_real_links_are_submitted_and_recorded(short_tmp: Path) -> None:
    """The encryption domain's replica links (SpaceWatch over ReplicaLink over NbdClient)
    take a mirrored write without a coroutine (Submits): each layer still records what its
    pwrite would (a driver out of space is noted once, the replica degrades and keeps the
    block dirty); a write cancelled while its replies wait returns at once and each
    request slot comes back with its late reply."""
    backends = [FullAt(physical_size(SIZE), full=LAY.data_offset(6)) for _ in range(2)]
    backends[0].full = -1
    with contextlib.ExitStack() as stack:
        uris = [stack.enter_context(ServerThread(StaticExports([Export("", b)]),
                                                 short_tmp / f"s{i}.sock")).uri()
                for i, b in enumerate(backends)]

        async def go() -> None:
            clients = [await NbdClient.open_uri(uri, max_in_flight=4) for uri in uris]
            submitted = [0, 0]
            for i, client in enumerate(clients):
                submit = client.submit_writes

                def counting(*args: Any, i: int = i, submit: Any = submit) -> Any:
                    submitted[i] += 1
                    return submit(*args)
                client.submit_writes = counting  # type: ignore[method-assign,assignment]

            async def never() -> Backend:
                raise ConnectionError("not in this test")
            space = [SpaceWatch(ReplicaLink(c, f"r{i}", never, retry_window=0), "vm1", f"r{i}")
                     for i, c in enumerate(clients)]
            rs = ReplicaSet("vm1", LAY, [Replica(f"r{i}", w) for i, w in enumerate(space)])
            await rs.pwrite(LAY.data_offset(5), pattern(5, 1))
            assert submitted == [1, 1] and [r.state for r in rs.replicas] == [State.CURRENT] * 2
            backends[0].write_delay = 0.2
            write = asyncio.ensure_future(rs.pwrite(LAY.data_offset(7), pattern(7, 1)))
            await asyncio.sleep(0.02)
            write.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(write, 0.1)  # not the 0.2 s the reply takes
            assert clients[0]._free_slots == 3 and submitted == [2, 2]
            await asyncio.sleep(0.3)
            assert clients[0]._free_slots == 4
            backends[0].write_delay = 0.0
            await rs.pwrite(LAY.data_offset(6), pattern(6, 1))  # r1's driver is full there
            assert [r.state for r in rs.replicas] == [State.CURRENT, State.DEGRADED]
            assert 6 in rs.replicas[1].dirty and "ENOSPC" in str(rs.replicas[1].last_error)
            assert space[1].status()["space"] == "full" and space[0].status()["space"] == "ok"
            assert bytes(await clients[0].pread(LAY.data_offset(6), BS)) == pattern(6, 1)
            await rs.close()
        run(go())


class Submitting(Faulty):
    """A replica that queues writes without a coroutine (Submits), answered a loop turn
    later, unless told to decline (then the fan-out takes its pwrite)."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.declines = False
        self.ended: list[Exception | None] = []

    def submit_writes(self, writes: list[tuple[int, Buffer]], fua: bool = False,
                      retried: bool = False) -> asyncio.Future[list[BlockError | None]] | None:
        if self.declines:
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[BlockError | None]] = loop.create_future()

        def answer() -> None:
            if future.done():
                return
            outcomes: list[BlockError | None] = []
            for offset, data in writes:
                if self.fail_writes:
                    outcomes.append(BlockError(errno.EIO, "injected submitted write error"))
                else:
                    self.writes += 1
                    self.next.raw[offset:offset + len(data)] = data  # type: ignore[attr-defined]
                    outcomes.append(None)
            future.set_result(outcomes)
        loop.call_soon(answer)
        return future

    def write_ended(self, error: Exception | None) -> None:
        self.ended.append(error)


def test_a_replica_link_passes_a_submitted_write_s_outcome_down() -> None:
    """The reconnecting link between the fan-out and a connection hands each submitted
    write's outcome on, so a layer below it (a space watch, say) is told too."""
    async def go() -> None:
        async def never() -> Backend:
            raise ConnectionError("not in this test")
        below = Submitting(RawMemory(physical_size(SIZE)))
        link = ReplicaLink(below, "r0", never, retry_window=0)
        future = link.submit_writes([(LAY.data_offset(5), pattern(5, 1))])
        assert future is not None
        assert await future == [None]
        link.write_ended(None)
        below.fail_writes = True
        future = link.submit_writes([(LAY.data_offset(6), pattern(6, 1))])
        assert future is not None
        [failed] = await future
        assert isinstance(failed, BlockError)
        link.write_ended(failed)
        assert below.ended == [None, failed]
    run(go())


@pytest.mark.parametrize("declining", [0, 1])
def test_a_fan_out_of_submitted_and_coroutine_writes(declining: int) -> None:
    """Replicas whose links submit and one whose link declines (its slots are full, say)
    in one fan-out: every replica gets the write, each submitting link hears its outcome
    once, and a failure on either kind degrades only that replica."""
    async def go() -> None:
        links = [Submitting(RawMemory(physical_size(SIZE))) for _ in range(3)]
        links[declining].declines = True
        rs = ReplicaSet("vm1", LAY, [Replica(f"r{i}", link) for i, link in enumerate(links)])
        await rs.pwrite(LAY.data_offset(5), pattern(5, 1))
        assert [link.writes for link in links] == [1, 1, 1]
        assert [len(link.ended) for link in links] == [0 if i == declining else 1
                                                        for i in range(3)]
        links[declining].fail_writes = True
        other = (declining + 1) % 3
        links[other].fail_writes = True
        await rs.pwrite(LAY.data_offset(6), pattern(6, 1))
        states = [r.state for r in rs.replicas]
        assert states[declining] is State.DEGRADED and states[other] is State.DEGRADED
        assert states[3 - declining - other] is State.CURRENT
        assert isinstance(links[other].ended[-1], BlockError)
        assert all(6 in rs.replicas[i].dirty for i in (declining, other))
        await rs.close()
    run(go())


def test_read_errors_fail_over_and_repair(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        faulty = [Faulty(m) for m in mems]
        disk = await open_set(tmp_path, kek, list(faulty))
        data = await fill(disk)
        faulty[0].fail_reads = True
        for b in range(0, NBLOCKS, 64):
            assert bytes(await disk.pread(b * BS, 64 * BS)) == data[b * BS:(b + 64) * BS]
        assert disk.replicas.replicas[0].repaired > 0
        await disk.close()
    run(go())


def test_rollback_of_one_replica_is_never_served(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        disk = await open_set(tmp_path, kek, list(mems))
        await fill(disk, 0)
        old = bytes(mems[1].raw)
        new = await fill(disk, 1)
        await disk.close()
        mems[1].raw[:] = old  # the driver of r1 rolls back to an earlier epoch
        events: list[dict[str, Any]] = []
        disk = await open_set(tmp_path, kek, list(mems), events)
        assert disk.replicas.replicas[1].state is not State.CURRENT
        assert any(e["what"] == "rollback" and e["replica"] == "r1" for e in events)
        for _ in range(4):
            assert bytes(await disk.pread(0, SIZE)) == new
        await settle(disk)
        await disk.close()
        assert bytes(mems[0].raw) == bytes(mems[1].raw)
    run(go())


def test_all_current_replicas_rolled_back_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        disk = await open_set(tmp_path, kek, list(mems))
        await fill(disk, 0)
        old = [bytes(m.raw) for m in mems]
        await fill(disk, 1)
        await disk.close()
        for m, o in zip(mems, old, strict=True):
            m.raw[:] = o
        with pytest.raises(Exception, match="stale"):
            await open_set(tmp_path, kek, list(mems))
    run(go())


@pytest.mark.parametrize("copies", [2, 3])
def test_wiped_replica_is_rebuilt_whole(tmp_path: Path, copies: int) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(copies)
        disk = await open_set(tmp_path, kek, list(mems))
        data = await fill(disk)
        await disk.close()
        mems[-1].raw[:] = bytes(len(mems[-1].raw))  # a new, empty backing file
        disk = await open_set(tmp_path, kek, list(mems))
        assert disk.replicas.replicas[-1].state is not State.CURRENT
        assert bytes(await disk.pread(0, SIZE)) == data
        await settle(disk)
        await disk.close()
        assert len(set(bytes(m.raw) for m in mems)) == 1
    run(go())


class EveryOtherReadFails(Faulty):
    """A flaky driver: one read in two answers EIO (nbdkit's error filter, made certain)."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.reads = 0

    async def pread(self, offset: int, length: int) -> Buffer:
        self.reads += 1
        if self.reads % 2:
            raise BlockError(errno.EIO, "injected transient read error")
        return await self.next.pread(offset, length)


def test_flaky_replica_is_admitted_and_rebuilt(tmp_path: Path) -> None:
    """Admitting a wiped replica reads ~40 small pieces of it: a driver that fails some
    reads must still get back in (each metadata read is tried again), not stay degraded."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        disk = await open_set(tmp_path, kek, list(mems))
        data = await fill(disk)
        await disk.close()
        mems[1].raw[:] = bytes(len(mems[1].raw))
        flaky = EveryOtherReadFails(mems[1])
        disk = await open_set(tmp_path, kek, [mems[0], flaky])
        await settle(disk)
        assert flaky.reads > 10, "the admission read the replica"
        await disk.close()
        assert bytes(mems[0].raw) == bytes(mems[1].raw)
        disk = await open_set(tmp_path, kek, [Faulty(mems[1])])
        assert bytes(await disk.pread(0, SIZE)) == data
        await disk.close()
    run(go())


def test_foreign_replica_is_refused_and_untouched(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        new_state(tmp_path, "other")
        mems = memories(2)
        disk = await open_set(tmp_path, kek, list(mems))
        data = await fill(disk)
        await disk.close()
        other = RawMemory(physical_size(SIZE))
        od = await CryptDisk.open(tmp_path, "other", Faulty(other), "o0", kek)
        await od.pwrite(0, b"x" * BS)
        await od.close()
        mems[1].raw[:] = other.raw
        before = bytes(mems[1].raw)
        disk = await open_set(tmp_path, kek, list(mems))
        r1 = disk.replicas.replicas[1]
        assert r1.state is State.FAILED and "another trustvbd disk" in (r1.last_error or "")
        await disk.pwrite(0, pattern(0, 9))
        await disk.flush()
        assert bytes(await disk.pread(BS, SIZE - BS)) == data[BS:]
        await disk.close()
        assert bytes(mems[1].raw) == before, "a foreign replica is never written"
        anchor = DiskState(tmp_path, "vm1").read_anchor()
        assert anchor.member("r1") is Member.REBUILD
    run(go())


@pytest.mark.parametrize("form", ["version 1 file", "version 2 slots"])
def test_anchors_written_before_mirroring_open(tmp_path: Path, form: str) -> None:
    """The one-record file of version 1 and the two-slot file without replica entries."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mem = RawMemory(physical_size(SIZE))
        disk = await open_set(tmp_path, kek, [Faulty(mem)])
        data = await fill(disk)
        await disk.close()
        state = DiskState(tmp_path, "vm1")
        a = state.read_anchor()
        if form == "version 1 file":  # written by hand, as docs/format.md 2.3 says
            body = struct.pack(">8sII16sQQQ32s", b"TVBDANCR", 1, 0, a.disk_id, a.logical_size,
                               a.epoch, a.counter_high, a.root)
            state.anchor_path.write_bytes(body + struct.pack(">I", zlib.crc32(body)))
        else:
            state.write_anchor(Anchor(a.disk_id, a.logical_size, a.epoch, a.counter_high, a.root))
            state.close()
        assert state.read_anchor().members is None
        disk = await open_set(tmp_path, kek, [Faulty(mem)])
        assert bytes(await disk.pread(0, SIZE)) == data
        await disk.close()
        assert DiskState(tmp_path, "vm1").read_anchor().member("r0") is Member.CURRENT
    run(go())


def test_a_replica_coming_back_is_judged_before_it_takes_writes(tmp_path: Path) -> None:
    """Back from a failure: blank -> rebuilt whole; another disk's -> refused, never written."""
    async def go() -> None:
        kek = new_state(tmp_path)
        new_state(tmp_path, "other")
        other = RawMemory(physical_size(SIZE))
        od = await CryptDisk.open(tmp_path, "other", Faulty(other), "o0", kek)
        await od.pwrite(0, b"y" * BS)
        await od.close()
        mems = memories(3)
        faulty = [Faulty(m) for m in mems]
        disk = await open_set(tmp_path, kek, list(faulty))
        data = bytearray(await fill(disk))
        # Away (unreachable: no reads either, so no admission can judge them before the
        # swap below; their driver is changed while away, as an operator would).
        for f in faulty[1:]:
            f.fail_writes = f.fail_reads = True
        await disk.pwrite(0, pattern(0, 5))
        data[:BS] = pattern(0, 5)
        await disk.flush()
        mems[1].raw[:] = bytes(len(mems[1].raw))  # wiped while away
        mems[2].raw[:] = other.raw                # now holds another disk
        before = bytes(mems[2].raw)
        for f in faulty[1:]:
            f.fail_writes = f.fail_reads = False
        for _ in range(2000):
            states = [r.state for r in disk.replicas.replicas]
            if states[1] is State.CURRENT and states[2] is State.FAILED:
                break
            if disk.replicas.joining():
                await disk.flush()
            await asyncio.sleep(0.001)
        assert [r.state for r in disk.replicas.replicas] == [State.CURRENT, State.CURRENT, State.FAILED]
        assert "another trustvbd disk" in (disk.replicas.replicas[2].last_error or "")
        assert bytes(await disk.pread(0, SIZE)) == data
        await disk.close()
        assert bytes(mems[0].raw) == bytes(mems[1].raw), "the wiped replica was rebuilt whole"
        assert bytes(mems[2].raw) == before, "a replica holding another disk is never written"
    run(go())


class Cable(Faulty):
    """A link whose connection can be cut; reconnect_once works once the driver is back."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.broken: str | None = None
        self.driver_up = True
        self.reconnects = 0

    def cut(self) -> None:
        self.broken, self.driver_up = "connection reset", False

    async def reconnect_once(self) -> None:
        if not self.driver_up:
            raise BlockError(errno.ECONNREFUSED, "driver down")
        self.broken = None
        self.reconnects += 1

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if self.broken:
            raise BlockError(errno.EIO, self.broken)
        await super().pwrite(offset, data, fua)

    async def pread(self, offset: int, length: int) -> Buffer:
        if self.broken:
            raise BlockError(errno.EIO, self.broken)
        return await super().pread(offset, length)

    async def flush(self) -> None:
        if self.broken:
            raise BlockError(errno.EIO, self.broken)
        await super().flush()


def test_every_replica_gone_is_eio_audited_and_it_comes_back(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        cables = [Cable(m) for m in mems]
        events: list[dict[str, Any]] = []
        disk = await open_set(tmp_path, kek, list(cables), events)
        data = await fill(disk)
        await disk.pwrite(0, pattern(0, 3))  # acknowledged, not flushed
        await disk.settle()  # and on the drivers (write-behind) before they go
        for c in cables:
            c.cut()
        with pytest.raises(BlockError) as exc:
            await disk.pread(BS, BS)
        assert exc.value.errno == errno.EIO
        assert any(e["what"] == "unavailable" for e in events), events
        for c in cables:
            c.driver_up = True
        for _ in range(500):  # reconnected in the background, still current: reads work again
            if all(c.broken is None for c in cables):
                break
            await asyncio.sleep(0.01)
        assert bytes(await disk.pread(BS, BS)) == data[BS:2 * BS]
        # The flush that follows cannot vouch for the write acknowledged before the cut.
        with pytest.raises(BlockError, match="not flushed may be lost"):
            await disk.flush()
        await disk.flush()
        await disk.close()
    run(go())


def test_lost_writes_met_by_a_background_commit_still_fail_the_guests_flush(
        tmp_path: Path) -> None:
    """Every replica reconnected with writes acknowledged but not flushed. A commit that
    runs for a joining replica (no guest waits for it) meets that first: the guest's next
    FLUSH must still say the writes may be lost, not succeed (red team)."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        cables = [Cable(m) for m in mems]
        disk = await open_set(tmp_path, kek, list(cables))
        await fill(disk)
        await disk.pwrite(0, pattern(0, 3))  # acknowledged, not flushed
        await disk.settle()
        for c in cables:
            c.cut()
        with pytest.raises(BlockError):
            await disk.pread(BS, BS)
        for c in cables:
            c.driver_up = True
        for _ in range(500):
            if all(c.broken is None for c in cables):
                break
            await asyncio.sleep(0.01)
        disk._commit_soon()  # as when a replica finishes its resync
        for _ in range(500):
            if not disk._background:
                break
            await asyncio.sleep(0.01)
        assert not disk._background
        with pytest.raises(BlockError, match="not flushed may be lost"):
            await disk.flush()
        await disk.flush()
        await disk.close()
    run(go())


def test_writes_every_replica_may_have_lost_fail_the_next_flush_of_every_connection(
        tmp_path: Path) -> None:
    """Two connections share the disk (two guests, or one guest's multi-conn): every
    replica lost its connection with a write acknowledged, not flushed. Each connection's
    next FLUSH says the writes may be lost, once; one's FLUSH does not take the error away
    from the other (red team: bob's FLUSH did, and alice's, whose write it was, succeeded),
    and one opened after a FLUSH said it does not hear it."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        cables = [Cable(m) for m in mems]
        disk = await open_set(tmp_path, kek, list(cables))
        await fill(disk)
        alice, bob = disk.flusher(), disk.flusher()
        await disk.pwrite(0, pattern(0, 3))  # alice's: acknowledged, not flushed
        await disk.settle()
        for c in cables:
            c.cut()
        with pytest.raises(BlockError):
            await disk.pread(BS, BS)
        for c in cables:
            c.driver_up = True
        for _ in range(500):
            if all(c.broken is None for c in cables):
                break
            await asyncio.sleep(0.01)
        for flush in (bob, alice):
            with pytest.raises(BlockError, match="not flushed may be lost") as lost:
                await flush()
            assert lost.value.errno == errno.EIO
            await flush()  # said once to each
        await disk.flusher()()  # opened after it was said
        await disk.close()
    run(go())


class SilentReads(Layer):
    """A replica whose reads get no reply until released or until the connection is
    dropped (`abandon`, as NbdClient: every waiting request fails with ETIMEDOUT)."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.answer = asyncio.Event()
        self.dropped: str | None = None
        self.answered_at = 0.0
        self._since: float | None = None
        self._gone = asyncio.Event()
        self.reads = 0

    def pending_since(self) -> float | None:
        return self._since

    def abandon(self, reason: str) -> None:
        self.dropped = reason
        self._gone.set()

    async def pread(self, offset: int, length: int) -> Buffer:
        self.reads += 1
        self._since = asyncio.get_running_loop().time()
        try:
            waits = [asyncio.ensure_future(e.wait()) for e in (self.answer, self._gone)]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        finally:
            self._since = None
        if self.dropped is not None:
            raise BlockError(errno.ETIMEDOUT, f"{self.dropped}; connection closed")
        return await self.next.pread(offset, length)


class Verifies:
    def bad_blocks(self, first_block: int, ciphertext: memoryview) -> list[int]:
        return []

    def written(self, block: int) -> bool:
        return False

    def written_ranges(self) -> list[tuple[int, int]]:
        return []

    def first_written(self, b0: int, b1: int) -> tuple[int, int] | None:
        return None

    def written_since_commit(self) -> list[int]:
        return []

    async def altered_pages(self, link: Backend, p0: int, p1: int) -> list[int]:
        return []


def test_a_read_left_unanswered_for_the_lag_is_served_by_the_next_replica() -> None:
    """A read from a replica that does not answer is sent to the next replica once it has
    waited `lag` (+ a quarter, the watch period); when that one serves it, the silent
    replica's connection is dropped and it is degraded: no later read goes to it. If the
    next replica fails the read too, the first one decides: nobody is cut off."""
    async def go() -> None:
        mems = [RawMemory(physical_size(SIZE)) for _ in range(2)]
        silent, honest = SilentReads(mems[0]), Faulty(mems[1])
        for m in mems:
            await m.pwrite(LAY.data_offset(3), pattern(3, 1))
        rs = ReplicaSet("vm1", LAY, [Replica("r0", silent), Replica("r1", honest)])
        rs.verifier, rs.locks, rs.lag = Verifies(), RangeLock(), 0.2

        async def attempt(link: Backend) -> bytes:
            return bytes(await link.pread(LAY.data_offset(3), BS))

        loop = asyncio.get_running_loop()
        # The next replica fails the hedge: the first read waits for its own reply.
        honest.fail_reads = True
        rs._next_reader = 0  # r0 first
        started = loop.time()
        read = asyncio.ensure_future(rs.read(3, 1, attempt))
        await asyncio.sleep(0.5)
        assert not read.done() and silent.dropped is None
        silent.answer.set()
        assert await read == pattern(3, 1)
        assert [r.state for r in rs.replicas] == [State.CURRENT, State.CURRENT]
        # Now the next replica serves it: the silent one is cut off after about `lag`.
        silent.answer.clear()
        honest.fail_reads = False
        rs._next_reader = 0
        started = loop.time()
        # Without the hedge this read would wait forever (r0 never answers); the bound is
        # loose so a loaded machine cannot fail it, and still far below "forever".
        assert await asyncio.wait_for(rs.read(3, 1, attempt), 5) == pattern(3, 1)
        waited = loop.time() - started
        assert 0.2 <= waited < 2.0, waited
        assert silent.dropped is not None and "replica_lag 0.2 s" in silent.dropped
        assert rs.replicas[0].state is not State.CURRENT
        assert "replica_lag" in (rs.replicas[0].last_error or "")
        asked = silent.reads
        for _ in range(4):  # later reads go to the current replica only
            assert await asyncio.wait_for(rs.read(3, 1, attempt), 5) == pattern(3, 1)
        assert silent.reads == asked, "a read went to the replica that was cut off"
        assert not rs._hedges
        await rs.close()
    run(go())


def test_a_read_two_silent_replicas_leave_unanswered_is_served_by_the_third() -> None:
    """#11's 'one hedge per read': of three replicas the first two answer no reads. The
    read goes to r0, is hedged to r1 after `lag`, and to r2 after another `lag`, which
    serves it: about 2 * lag, where it used to wait for r1 forever (the request timeout)."""
    async def go() -> None:
        mems = [RawMemory(physical_size(SIZE)) for _ in range(3)]
        silent = [SilentReads(mems[0]), SilentReads(mems[1])]
        honest = Faulty(mems[2])
        for m in mems:
            await m.pwrite(LAY.data_offset(3), pattern(3, 1))
        rs = ReplicaSet("vm1", LAY, [Replica("r0", silent[0]), Replica("r1", silent[1]),
                                     Replica("r2", honest)])
        rs.verifier, rs.locks, rs.lag = Verifies(), RangeLock(), 0.2

        async def attempt(link: Backend) -> bytes:
            return bytes(await link.pread(LAY.data_offset(3), BS))

        loop = asyncio.get_running_loop()
        rs._next_reader = 0  # r0 first, then r1, then r2 (all equally idle)
        started = loop.time()
        assert await asyncio.wait_for(rs.read(3, 1, attempt), 5) == pattern(3, 1)
        waited = loop.time() - started
        assert 0.4 <= waited < 2.5, waited
        assert silent[0].dropped is not None and "replica 'r2' served it" in silent[0].dropped
        assert rs.replicas[0].state is not State.CURRENT
        assert silent[1].reads == 1 and silent[1].dropped is None  # asked, not cut off by this
        assert not rs._hedges
        silent[1].answer.set()
        await rs.close()
    run(go())


class FailsAfterServing(Faulty):
    """Faulty, and armed: serves the next read, then fails the one after (a read-repair's
    second read of the source it just read from)."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.armed = 0

    async def pread(self, offset: int, length: int) -> Buffer:
        if self.armed:
            self.armed -= 1
            if not self.armed:
                raise BlockError(errno.EIO, "injected read error after serving")
        return await super().pread(offset, length)


def test_a_read_repair_whose_source_fails_is_charged_to_the_source(tmp_path: Path) -> None:
    """r1 holds a damaged block; r0 serves the read, then fails the read-repair's second
    read. That is r0's failure: r0 is charged, r1 stays current (the bad block is never
    served) and the next read repairs it. It used to degrade r1 ("read-repair source
    failed"), leaving the flaky r0 to serve alone."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        source = FailsAfterServing(mems[0])
        disk = await open_set(tmp_path, kek, [source, Faulty(mems[1])])
        data = await fill(disk)
        mems[1].raw[LAY.data_offset(5) + 100] ^= 4
        r0, r1 = disk.replicas.replicas
        source.armed = 2
        disk.replicas._next_reader = 1  # r1 first: it fails verification, r0 serves
        assert bytes(await disk.pread(5 * BS, BS)) == data[5 * BS:6 * BS]
        assert source.armed == 0, "the repair did not read the source again"
        assert r1.state is State.CURRENT and r1.repaired == 0, r1.status()
        assert "read-repair" not in str(r1.last_error), r1.status()
        assert r0.state is State.CURRENT and r0.errors == 1
        assert "read-repair source read of blocks 5-5 failed" in str(r0.last_error), r0.status()
        disk.replicas._next_reader = 1
        assert bytes(await disk.pread(5 * BS, BS)) == data[5 * BS:6 * BS]
        assert r1.repaired == 1 and len(set(data_areas(mems))) == 1
        await disk.close()
    run(go())


class HeldWrites(Layer):
    """A replica whose writes get no reply until `answer` is set or the connection is
    dropped (`abandon`, as NbdClient: every waiting request fails with ETIMEDOUT)."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.answer = asyncio.Event()
        self.dropped: str | None = None
        self.answered_at = 0.0
        self._since: float | None = None
        self._gone = asyncio.Event()

    def pending_since(self) -> float | None:
        return self._since

    def abandon(self, reason: str) -> None:
        self.dropped = reason
        self._gone.set()

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._since = loop.time()
        try:
            waits = [asyncio.ensure_future(e.wait()) for e in (self.answer, self._gone)]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        finally:
            self._since = None
        if self.dropped is not None:
            raise BlockError(errno.ETIMEDOUT, f"{self.dropped}; connection closed")
        await self.next.pwrite(offset, data, fua)
        self.answered_at = loop.time()


class Prompt(Layer):
    """A replica that answers at once, and says when (Watched)."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.answered_at = 0.0

    def pending_since(self) -> float | None:
        return None

    def abandon(self, reason: str) -> None:
        raise AssertionError(f"a prompt replica was cut off: {reason}")

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self.next.pwrite(offset, data, fua)
        self.answered_at = asyncio.get_running_loop().time()


@pytest.mark.parametrize("other", [State.RESYNCING, State.CURRENT])
def test_a_current_writer_is_cut_off_for_lagging_only_if_another_current_one_answers(
        other: State) -> None:
    """r0, current, leaves a write unanswered past `lag` while r1 answers at once. If r1
    is current, r0 is cut off (degraded) and the write stands on r1. If r1 is resyncing it
    cannot serve the block, so cutting r0 off failed the guest's write (a write no current
    replica took fails): r0 is kept and the write waits for it, as when every writer is
    slow (the request timeout decides)."""
    async def go() -> None:
        mems = [RawMemory(physical_size(SIZE)) for _ in range(2)]
        held, prompt = HeldWrites(mems[0]), Prompt(mems[1])
        rs = ReplicaSet("vm1", LAY, [Replica("r0", held), Replica("r1", prompt, state=other)])
        rs.verifier, rs.locks, rs.lag = Verifies(), RangeLock(), 0.2
        write = asyncio.ensure_future(rs.pwrite(LAY.data_offset(3), pattern(3, 1)))
        for _ in range(200):  # two looks of the watch past `lag`, with room for a loaded machine
            if write.done():
                break
            await asyncio.sleep(0.01)
        if other is State.CURRENT:
            await asyncio.wait_for(write, 5)
            assert held.dropped is not None and "replica_lag 0.2 s" in held.dropped
            assert rs.replicas[0].state is not State.CURRENT
        else:
            assert not write.done() and held.dropped is None
            held.answer.set()
            await asyncio.wait_for(write, 5)
            assert rs.replicas[0].state is State.CURRENT and rs.replicas[0].errors == 0
        assert mems[1].raw[LAY.data_offset(3):LAY.data_offset(4)] == pattern(3, 1)
        await rs.close()
    run(go())


class FullDriver(Layer):
    """A replica out of space: writes fail with ENOSPC at once ("fail"), or once told to
    (each held until its event in `held` is set: "hold"), or go through ("ok")."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.mode = "ok"
        self.held: list[asyncio.Event] = []

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if self.mode == "hold":
            go = asyncio.Event()
            self.held.append(go)
            await go.wait()
            raise BlockError(errno.ENOSPC, "no space left (held)")
        if self.mode == "fail":
            raise BlockError(errno.ENOSPC, "no space left")
        await self.next.pwrite(offset, data, fua)

    async def close(self) -> None:
        pass


def test_a_replica_degraded_again_during_its_resync_is_said_resyncing_once_per_trip_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A write sent to a full replica before it was degraded fails while its resync runs
    (degrading it again), then the resync's own write fails: the next try is quiet, as
    every retry of that trip back (it was said twice: the resync's failure met a replica
    no longer resyncing, so the trip never noted that it had tried one)."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        full = FullDriver(mems[1])
        disk = await open_set(tmp_path, kek, [mems[0], full])
        await fill(disk)
        r1 = disk.replicas.replicas[1]
        full.mode = "hold"  # a write to the last 16 blocks in flight on r1
        in_flight = asyncio.ensure_future(disk.pwrite((NBLOCKS - 16) * BS, bytes(16 * BS)))
        while not full.held:
            await asyncio.sleep(0.001)
        full.mode = "fail"
        await disk.pwrite(0, bytes(16 * BS))  # r1 degraded; its trip back begins
        full.mode = "hold"
        for _ in range(2000):  # its resync's first copy (blocks 0-15, free) is held
            if r1.state is State.RESYNCING and len(full.held) == 2:
                break
            await asyncio.sleep(0.001)
        assert r1.state is State.RESYNCING and len(full.held) == 2, disk.replicas.status()
        full.held[0].set()  # the write in flight fails: r1 degraded again
        await in_flight
        assert r1.state is State.DEGRADED
        full.held[1].set()  # then the resync's copy fails too
        full.mode = "ok"
        await settle(disk)
        await disk.close()
        assert mems[0].raw[LAY.data_start:] == mems[1].raw[LAY.data_start:]

    with caplog.at_level("DEBUG", logger="trustvbd"):
        run(go())
    said = [r for r in caplog.records if "resyncing" in r.getMessage()
            and r.pathname.endswith("replica_recovery.py")]
    assert [r.levelname for r in said][:1] == ["WARNING"], said
    assert [r.levelname for r in said].count("WARNING") == 1, [r.getMessage() for r in said]


def test_a_replica_failing_many_writes_at_once_takes_the_unflushed_blocks_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver stalled under a guest writing without FLUSH: when it is cut off, every write
    in flight to it fails, and each failure degrades it again. Each added every block written
    since the last flush to its dirty set once more (thousands of runs x 64 writes in flight),
    which held the event loop, and so every guest of the domain, for 5-10 s after the lag
    had already cut the driver off (red team: SIGSTOP of a driver under random writes). The
    unflushed runs are taken once, as it leaves the write set; the dirty set is the same."""
    unflushed, in_flight = 1500, 40
    size = 2 * (unflushed + in_flight) * BS
    lay = type(LAY)(size)
    adds = 0
    real_add = BlockRuns.add

    def counted(self: BlockRuns, b0: int, b1: int) -> None:
        nonlocal adds
        adds += 1
        real_add(self, b0, b1)

    async def go() -> None:
        mems = [RawMemory(physical_size(size)) for _ in range(2)]
        full = FullDriver(mems[0])
        rs = ReplicaSet("vm1", lay, [Replica("r0", full), Replica("r1", mems[1])])
        rs.verifier, rs.locks = Verifies(), RangeLock()  # type: ignore[assignment]
        r0 = rs.replicas[0]
        taken_back: list[set[int]] = []  # its dirty set as its resync began

        def change() -> None:
            if r0.state is State.RESYNCING and not taken_back:
                taken_back.append(set(r0.dirty))
                monkeypatch.undo()
        rs.on_change = change
        for i in range(unflushed):  # every other block: one run each, none flushed
            await rs.pwrite(lay.data_offset(2 * i), pattern(2 * i))
        full.mode = "hold"
        first = 2 * unflushed
        writes = [asyncio.ensure_future(rs.pwrite(lay.data_offset(first + 2 * i), pattern(i)))
                  for i in range(in_flight)]
        while len(full.held) < in_flight:
            await asyncio.sleep(0.001)
        monkeypatch.setattr(BlockRuns, "add", counted)
        for go_on in full.held:
            go_on.set()
        await asyncio.gather(*writes)  # r1 took them: the guest sees success
        while not taken_back:
            await asyncio.sleep(0.001)
        assert taken_back[0] == set(range(0, 2 * (unflushed + in_flight), 2))
        assert adds < 2 * (unflushed + in_flight), adds  # it was unflushed x in_flight
        await rs.close()
    run(go())


class FullFileSystem(Layer):
    """A driver on a full file system: writes over blocks it holds go through, a write to
    any other block fails with ENOSPC, until `free` is set."""

    def __init__(self, next: Backend, held: int) -> None:
        super().__init__(next)
        self.held, self.free = held, False

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if not self.free and offset + len(data) > self.held:
            raise BlockError(errno.ENOSPC, "No space left on device")
        await self.next.pwrite(offset, data, fua)


def test_a_full_driver_taking_writes_over_blocks_it_holds_is_said_full_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """A full file system still takes writes over the blocks it holds: a degraded replica's
    resync, retried every 2 s, wrote those, then met ENOSPC. Each try logged 'takes writes
    again' and then 'is out of space' (two lines every 2 s for as long as the driver stayed
    full: red team, a driver's directory on a full tmpfs). Writes going through end the
    episode only once a flush (or a FUA write) went through after them with no ENOSPC."""
    async def go() -> None:
        fs = FullFileSystem(RawMemory(physical_size(SIZE)), held=16 * BS)
        watch = SpaceWatch(fs, "vm1", "drv-b", mirrored=True)
        for _ in range(5):  # a resync's try: blocks it holds, then one it must allocate
            await watch.pwrite(0, bytes(16 * BS))
            with pytest.raises(BlockError):
                await watch.pwrite(16 * BS, bytes(BS))
            assert watch.status()["space"] == "full"
        await watch.flush()  # nothing went through since the last ENOSPC: still full
        assert watch.status()["space"] == "full"
        fs.free = True
        await watch.pwrite(16 * BS, bytes(BS))
        assert watch.status()["space"] == "full"  # until it is flushed
        await watch.flush()
        assert watch.status() == {"space": "ok"}
        fs.free = False
        with pytest.raises(BlockError):
            await watch.pwrite(32 * BS, bytes(BS))
        fs.free = True
        await watch.pwrite(32 * BS, bytes(BS), fua=True)  # durable by itself
        assert watch.status() == {"space": "ok"}
    caplog.set_level("WARNING", logger="trustvbd.crypt.space")
    run(go())
    said = [r.getMessage() for r in caplog.records]
    assert [("out of space" in m, "takes writes again" in m) for m in said] == [
        (True, False), (False, True), (True, False), (False, True)], said
