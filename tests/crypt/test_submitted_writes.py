"""Writes behind sent without a task (WriteBehind.submit, ReplicaSet.submit_runs): their edges.

The disk sits on a real replica link (SpaceWatch over ReplicaLink over NbdClient) to a real
NBD server in a thread, whose storage fails or stalls writes on command. A single replica's
link reconnects a broken connection: a write behind submitted on it that fails is sent again
the general way, so the guest sees what a waited write would have made it see.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.crypt.helpers import BS, SIZE, IntentLogFiles, RawMemory, new_state, pattern, run
from tests.crypt.test_native_reads import opened
from tests.crypt.test_write_behind import until
from tests.nbd.helpers import ServerThread
from trustvbd.blockdev import Backend, BlockError, Buffer
from trustvbd.blocks import write_behind
from trustvbd.blocks.crypt_layer import CryptDisk, physical_size
from trustvbd.blocks.layer import Layer
from trustvbd.blocks.reconnect import ReplicaLink
from trustvbd.blocks.replica import State
from trustvbd.blocks.space import SpaceWatch
from trustvbd.nbd.client import NbdClient
from trustvbd.nbd.exports import Export, StaticExports


class Storage(Layer):
    """A driver's storage that fails or stalls writes on command (knobs set from the test's
    thread, read by the server's loop)."""

    def __init__(self) -> None:
        super().__init__(RawMemory(physical_size(SIZE)))
        self.fail: int | None = None  # errno every write fails with
        self.fail_at: set[int] = set()  # offsets whose writes fail with EIO
        self.delay = 0.0  # seconds before a write is done
        self.writes = 0
        self.fua_writes = 0

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.writes += 1
        self.fua_writes += fua
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise BlockError(self.fail, "injected write error")
        if offset in self.fail_at:
            raise BlockError(errno.EIO, "injected write error at this offset")
        await self.next.pwrite(offset, data, fua)


@contextlib.contextmanager
def driver(tmp: Path) -> Iterator[tuple[Storage, str]]:
    storage = Storage()
    with ServerThread(StaticExports([Export("", storage)]), tmp / "d0.sock") as server:
        yield storage, server.uri()


def link_of(disk: CryptDisk) -> ReplicaLink:
    link = disk.replicas.replicas[0].link
    assert isinstance(link, SpaceWatch) and isinstance(link.next, ReplicaLink)
    return link.next


APART = [7 * i + 3 for i in range(20)]  # not adjacent: one run each


@pytest.fixture(autouse=True)
def no_gather_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs leave only after a reply or when something waits, never on the gather timer
    (a loaded machine would let it fire between two writes and send them by a task).
    HELD_RUNS 8: the departures these tests count are of 9 runs (APART's 20: 9, 9, 2)."""
    monkeypatch.setattr(write_behind, "GATHER_S", 60.0)
    monkeypatch.setattr(write_behind, "HELD_RUNS", 8)


async def write_apart(disk: CryptDisk) -> None:
    """Each write as a guest sends them: the next one a few loop turns later."""
    for b in APART:
        await disk.pwrite(b * BS, pattern(b))
        for _ in range(3):
            await asyncio.sleep(0)


def test_writes_behind_to_one_replica_go_without_a_task_and_read_back(short_tmp: Path) -> None:
    with driver(short_tmp) as (_, uri):
        async def go() -> None:
            async with opened(short_tmp, [uri]) as disk:
                await write_apart(disk)
                await disk.settle()
                # Two batches of HELD_RUNS + 1 runs went after a reply, the last two, held,
                # with the drain: every run without a task.
                assert disk._behind.sends == 20 and disk._behind.submitted == 20
                await disk.flush()
                for b in APART:  # from the replica, verified
                    assert bytes(await disk.pread(b * BS, BS)) == pattern(b), b
        run(go())


def test_runs_a_flush_or_the_gather_timer_sends_go_without_a_task(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FLUSH that finds one run sends it with FUA, submitted; so does the gather timer
    (without FUA): no run costs a task, and the data reads back."""
    with driver(short_tmp) as (storage, uri):
        async def go() -> None:
            async with opened(short_tmp, [uri]) as disk:
                await disk.flush()
                fua = storage.fua_writes
                monkeypatch.setattr(write_behind, "GATHER_S", 0.001)
                await disk.pwrite(5 * BS, pattern(5))
                for _ in range(500):
                    if not disk._behind.running:
                        break
                    await asyncio.sleep(0.01)
                assert disk._behind.submitted == disk._behind.sends == 1
                assert storage.fua_writes == fua
                monkeypatch.setattr(write_behind, "GATHER_S", 60.0)
                await disk.pwrite(3 * BS, pattern(3))
                await disk.flush()
                assert disk._behind.submitted == disk._behind.sends == 2
                assert storage.fua_writes == fua + 1
                await disk.flush()
                for b in (3, 5):
                    assert bytes(await disk.pread(b * BS, BS)) == pattern(b), b
        run(go())


def test_a_submitted_write_whose_connection_breaks_goes_again_after_a_reconnect(
        short_tmp: Path) -> None:
    """The connection cut with writes behind in flight: each is sent again on the new
    connection (the guest was answered; nothing fails), and the next FLUSH says the driver
    restarted, as after any reconnect with writes not flushed; the data is all there."""
    with driver(short_tmp) as (storage, uri):
        async def go() -> None:
            async with opened(short_tmp, [uri]) as disk:
                await disk.flush()
                storage.delay = 0.3
                await write_apart(disk)  # answered at once
                while storage.writes == 0:
                    await asyncio.sleep(0.01)
                link = link_of(disk)
                link.next.abandon("cut by the test")  # type: ignore[attr-defined]
                storage.delay = 0.0
                await asyncio.wait_for(disk.settle(), 10)
                assert link.reconnects == 1 and disk._behind.failures == 0
                with pytest.raises(BlockError) as err:
                    await disk.flush()
                assert err.value.errno == errno.EIO and "restarted" in err.value.message
                await disk.flush()
                for b in APART:
                    assert bytes(await disk.pread(b * BS, BS)) == pattern(b), b
        run(go())


def test_a_submitted_write_the_driver_fails_is_said_by_reads_and_the_next_flush(
        short_tmp: Path) -> None:
    """A driver out of space: each write behind, answered already, is tried once more the
    general way and fails again; its block reads as EIO, and once the driver has room
    again the next FLUSH fails with ENOSPC (once), as for a write behind sent in a task."""
    nine = APART[:9]  # HELD_RUNS + 1 runs: they go after the ninth reply, submitted
    with driver(short_tmp) as (storage, uri):
        async def go() -> None:
            async with opened(short_tmp, [uri]) as disk:
                await disk.flush()
                storage.fail = errno.ENOSPC
                tries = storage.writes
                for b in nine:
                    await disk.pwrite(b * BS, pattern(b, 1))  # answered
                    for _ in range(3):
                        await asyncio.sleep(0)
                await disk.settle()
                assert disk._behind.submitted == 9 and disk._behind.failures == 9
                assert storage.writes == tries + 18  # submitted, then once more by pwrite
                for b in nine:
                    with pytest.raises(BlockError) as read_err:
                        await disk.pread(b * BS, BS)
                    assert read_err.value.errno == errno.EIO
                storage.fail = None
                with pytest.raises(BlockError, match="were answered, then failed") as flush_err:
                    await disk.flush()
                assert flush_err.value.errno == errno.ENOSPC
                await disk.flush()  # said once
                for b in nine:
                    assert bytes(await disk.pread(b * BS, BS)) == bytes(BS)  # never written
                    await disk.pwrite(b * BS, pattern(b, 2))
                await disk.flush()
                for b in nine:
                    assert bytes(await disk.pread(b * BS, BS)) == pattern(b, 2)
        run(go())


class HeldLogSyncs(IntentLogFiles):
    """Real files; the intent log's syncs (on its thread) wait while `held` is clear."""

    def __init__(self) -> None:
        super().__init__()
        self.held = threading.Event()
        self.held.set()
        self.entered = 0  # intent-log syncs begun

    def fdatasync(self, fd: int) -> None:
        if fd in self.log_fds:
            self.entered += 1
            assert self.held.wait(10)
        super().fdatasync(fd)


def test_departures_one_sync_lets_go_leave_as_one_batch_after_it(short_tmp: Path) -> None:
    """Runs sent on while the intent log's sync is under way wait for the next sync, which
    covers all their records: the departures it lets go leave together, one submit per
    replica (not one each), and only after their records are durable. Every write reaches
    both drivers and reads back."""
    with mirror_drivers(short_tmp) as (storages, uris):
        async def go() -> None:
            files = HeldLogSyncs()
            kek = new_state(short_tmp / "state")
            links: list[tuple[str, Backend]] = []
            for i, uri in enumerate(uris):
                async def connect(uri: str = uri) -> Backend:
                    return await NbdClient.open_uri(uri)
                link = ReplicaLink(await connect(), f"r{i}", connect, retry_window=0)
                links.append((f"r{i}", SpaceWatch(link, "vm1", f"r{i}")))
            disk = await CryptDisk.open_mirrored(short_tmp / "state", "vm1", links, kek,
                                                 files=files)
            try:
                await disk.flush()
                batches = [count_batches(client_of(disk, i)) for i in range(2)]
                before = [s.writes for s in storages]
                files.held.clear()
                entered = files.entered
                await write_apart(disk)  # departures of 9 and 9 runs; 2 runs held
                disk._behind.send_now()  # those 2 leave too: a third departure
                await until(lambda: files.entered == entered + 1)
                for _ in range(20):
                    await asyncio.sleep(0)
                # The first departure's sync is held: nothing has left.
                assert batches == [[], []]
                assert [s.writes for s in storages] == before
                files.held.set()
                await asyncio.wait_for(disk.settle(), 10)
                # The first departure alone after the first sync; the other two, whose
                # records came after that sync began, together after the second.
                assert batches == [[9, 11]] * 2
                assert [s.writes - w for s, w in zip(storages, before, strict=True)] == [20, 20]
                await disk.flush()
                for b in APART:
                    assert bytes(await disk.pread(b * BS, BS)) == pattern(b)
            finally:
                files.held.set()
                await asyncio.wait_for(disk.close(), 10)
        run(go())


class FailingLog(IntentLogFiles):
    """Real files; the intent log's writes fail on command."""

    fail = False

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        if self.fail and fd in self.log_fds:
            raise OSError(errno.EIO, "injected intent log write error")
        return super().pwrite(fd, data, offset)


def test_runs_whose_records_cannot_be_written_are_lost_not_sent_and_the_flush_says_so(
        short_tmp: Path) -> None:
    """The intent log refuses the records held for runs about to be submitted: no
    ciphertext leaves without its record; each write is lost (read as EIO) and said by the
    next FLUSH, and no writer is left counted (the FLUSH does not hang)."""
    with driver(short_tmp) as (storage, uri):
        async def go() -> None:
            files = FailingLog()
            kek = new_state(short_tmp / "state")
            link = ReplicaLink(await NbdClient.open_uri(uri), "r0",
                               lambda: NbdClient.open_uri(uri))
            disk = await CryptDisk.open_mirrored(short_tmp / "state", "vm1",
                                                 [("r0", SpaceWatch(link, "vm1", "r0"))], kek,
                                                 files=files)
            try:
                await disk.flush()
                before = storage.writes
                files.fail = True
                nine = APART[:9]  # HELD_RUNS + 1 runs: they go after the ninth reply
                for b in nine:
                    await disk.pwrite(b * BS, pattern(b))  # answered, records held
                    for _ in range(3):
                        await asyncio.sleep(0)
                await asyncio.wait_for(disk.settle(), 10)
                assert storage.writes == before  # no ciphertext without its record
                assert disk._behind.failures == 9
                with pytest.raises(BlockError) as read_err:
                    await disk.pread(nine[0] * BS, BS)
                assert read_err.value.errno == errno.EIO
                with pytest.raises(BlockError, match=r"cannot (append to|sync)"):
                    await disk.pwrite(APART[9] * BS, pattern(APART[9]))  # waits, fails itself
                files.fail = False
                with pytest.raises(BlockError, match=r"cannot (append to|sync)") as flush_err:
                    await asyncio.wait_for(disk.flush(), 10)
                assert flush_err.value.errno == errno.EIO
            finally:
                files.fail = False
                await asyncio.wait_for(disk.close(), 10)  # a writer left counted would hang it
        run(go())


@contextlib.contextmanager
def mirror_drivers(tmp: Path) -> Iterator[tuple[list[Storage], list[str]]]:
    storages = [Storage(), Storage()]
    with contextlib.ExitStack() as stack:
        uris = [stack.enter_context(ServerThread(StaticExports([Export("", s)]),
                                                 tmp / f"m{i}.sock")).uri()
                for i, s in enumerate(storages)]
        yield storages, uris


def data_area(disk: CryptDisk, storage: Storage, b: int) -> bytes:
    offset = disk._lay.data_offset(b)
    return bytes(storage.next.raw[offset:offset + BS])  # type: ignore[attr-defined]


def test_writes_behind_to_a_mirror_go_without_a_task_to_every_replica(short_tmp: Path) -> None:
    """Each run goes to both drivers by callbacks (ReplicaSet.submit_runs), not by a task
    and a fan-out coroutine; both hold the same ciphertext, which reads back verified."""
    with mirror_drivers(short_tmp) as (storages, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk:
                await disk.flush()
                before = [s.writes for s in storages]
                await write_apart(disk)
                await disk.settle()
                assert disk._behind.sends == 20 and disk._behind.submitted == 20
                assert [s.writes - w for s, w in zip(storages, before, strict=True)] == [20, 20]
                for b in APART:
                    assert data_area(disk, storages[0], b) == data_area(disk, storages[1], b)
                    assert data_area(disk, storages[0], b) != bytes(BS)
                await disk.flush()
                assert disk._behind.failures == 0
                for b in APART:
                    assert bytes(await disk.pread(b * BS, BS)) == pattern(b), b
        run(go())


def test_a_mirrored_write_behind_one_driver_fails_degrades_that_replica_only(
        short_tmp: Path) -> None:
    """One driver fails the submitted writes: its replica is degraded with those blocks
    dirty, the writes stand on the other (nothing is lost, no FLUSH fails), as in pwrite's
    fan-out."""
    with mirror_drivers(short_tmp) as (storages, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk:
                await disk.flush()
                storages[1].fail = errno.EIO
                nine = APART[:9]  # HELD_RUNS + 1 runs: they go after the ninth reply
                for b in nine:
                    await disk.pwrite(b * BS, pattern(b, 1))
                    for _ in range(3):
                        await asyncio.sleep(0)
                await disk.settle()
                assert disk._behind.submitted == 9 and disk._behind.failures == 0
                r0, r1 = disk.replicas.replicas
                assert r0.state is State.CURRENT and r1.state is not State.CURRENT
                assert all(b in r1.dirty for b in nine)
                await disk.flush()
                for b in nine:
                    assert bytes(await disk.pread(b * BS, BS)) == pattern(b, 1), b
        run(go())


def test_a_mirrored_write_behind_every_driver_fails_is_tried_again_then_said(
        short_tmp: Path) -> None:
    """Every driver fails the submitted writes: each is sent once more the general way
    (pwrite's fan-out), fails there too, and is said as any lost write behind: its blocks
    read EIO and the next FLUSH fails once; no replica is degraded for it."""
    with mirror_drivers(short_tmp) as (storages, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk:
                await disk.flush()
                for s in storages:
                    s.fail = errno.EIO
                tries = [s.writes for s in storages]
                nine = APART[:9]
                for b in nine:
                    await disk.pwrite(b * BS, pattern(b, 1))
                    for _ in range(3):
                        await asyncio.sleep(0)
                await disk.settle()
                assert disk._behind.submitted == 9 and disk._behind.failures == 9
                assert [s.writes - t for s, t in zip(storages, tries, strict=True)] == [18, 18]
                assert [r.state for r in disk.replicas.replicas] == [State.CURRENT] * 2
                with pytest.raises(BlockError) as read_err:
                    await disk.pread(nine[0] * BS, BS)
                assert read_err.value.errno == errno.EIO
                for s in storages:
                    s.fail = None
                with pytest.raises(BlockError, match="were answered, then failed"):
                    await disk.flush()
                await disk.flush()  # said once
        run(go())


def client_of(disk: CryptDisk, i: int) -> NbdClient:
    link = disk.replicas.replicas[i].link
    assert isinstance(link, SpaceWatch) and isinstance(link.next, ReplicaLink)
    client = link.next.next
    assert isinstance(client, NbdClient)
    return client


def count_batches(client: NbdClient) -> list[int]:
    """The sizes of the batches submitted on `client`, as they come."""
    sizes: list[int] = []
    submit = client.submit_writes

    def counting(writes: list[tuple[int, Buffer]], *args: Any) -> Any:
        sizes.append(len(writes))
        return submit(writes, *args)
    client.submit_writes = counting  # type: ignore[method-assign,assignment]
    return sizes


def test_runs_leaving_in_one_loop_turn_go_to_each_replica_as_one_batch(short_tmp: Path) -> None:
    """The runs a loop turn sends (HELD_RUNS + 1 after a reply, the rest with the drain)
    cost each replica one submit and one future for all of them, not one each; every
    write reaches both drivers and reads back."""
    with mirror_drivers(short_tmp) as (storages, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk:
                await disk.flush()
                batches = [count_batches(client_of(disk, i)) for i in range(2)]
                before = [s.writes for s in storages]
                await write_apart(disk)
                await disk.settle()
                # (Departures one sync lets go leave together: how many a sync covers
                # depends on the thread's timing; the next test holds it to see that.)
                assert batches[0] == batches[1] and sum(batches[0]) == 20
                assert batches[0][0] == 9 and len(batches[0]) <= 3, batches
                assert disk._behind.submitted == 20
                assert [s.writes - w for s, w in zip(storages, before, strict=True)] == [20, 20]
                await disk.flush()
                for b in APART:
                    assert bytes(await disk.pread(b * BS, BS)) == pattern(b), b
        run(go())


def test_one_run_of_a_batch_failing_on_one_driver_degrades_that_replica_for_its_blocks(
        short_tmp: Path) -> None:
    """A batch's outcomes are each run's own: one driver failing one run of nine degrades
    its replica with that run's block dirty, and the other eight stand there; nothing is
    lost, no FLUSH fails."""
    with mirror_drivers(short_tmp) as (storages, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk:
                await disk.flush()
                nine = APART[:9]
                storages[1].fail_at = {disk._lay.data_offset(nine[4])}
                batches = [count_batches(client_of(disk, i)) for i in range(2)]
                for b in nine:
                    await disk.pwrite(b * BS, pattern(b, 1))
                    for _ in range(3):
                        await asyncio.sleep(0)
                await disk.settle()
                assert batches == [[9]] * 2  # one batch, whose fourth run failed on r1
                assert disk._behind.submitted == 9 and disk._behind.failures == 0
                r0, r1 = disk.replicas.replicas
                assert r0.state is State.CURRENT and r1.state is not State.CURRENT
                assert nine[4] in r1.dirty
                for b in nine[:4] + nine[5:]:
                    assert data_area(disk, storages[0], b) == data_area(disk, storages[1], b)
                assert data_area(disk, storages[1], nine[4]) == bytes(BS)
                await disk.flush()
                for b in nine:
                    assert bytes(await disk.pread(b * BS, BS)) == pattern(b, 1), b
        run(go())


def test_one_run_of_a_batch_every_driver_fails_is_lost_alone(short_tmp: Path) -> None:
    """Every driver fails one run of a batch of nine: that run alone is sent again the
    general way, fails there too and is said (its block reads EIO, the next FLUSH fails
    naming it); the other eight stand on both replicas, none of which is degraded."""
    with mirror_drivers(short_tmp) as (storages, uris):
        async def go() -> None:
            async with opened(short_tmp, uris) as disk:
                await disk.flush()
                nine = APART[:9]
                lost = nine[6]
                for s in storages:
                    s.fail_at = {disk._lay.data_offset(lost)}
                tries = [s.writes for s in storages]
                batches = [count_batches(client_of(disk, i)) for i in range(2)]
                for b in nine:
                    await disk.pwrite(b * BS, pattern(b, 1))
                    for _ in range(3):
                        await asyncio.sleep(0)
                await disk.settle()
                assert batches == [[9, 1]] * 2  # one batch; the lost run again by pwrite
                assert disk._behind.submitted == 9 and disk._behind.failures == 1
                assert [s.writes - t for s, t in zip(storages, tries, strict=True)] == [10, 10]
                assert [r.state for r in disk.replicas.replicas] == [State.CURRENT] * 2
                with pytest.raises(BlockError) as read_err:
                    await disk.pread(lost * BS, BS)
                assert read_err.value.errno == errno.EIO
                for b in nine:
                    if b != lost:
                        assert bytes(await disk.pread(b * BS, BS)) == pattern(b, 1), b
                for s in storages:
                    s.fail_at = set()
                with pytest.raises(BlockError, match=f"block\\(s\\) {lost}\\b"):
                    await disk.flush()
                await disk.flush()  # said once
        run(go())
