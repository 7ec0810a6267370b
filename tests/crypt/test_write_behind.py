"""Write-behind (blocks/write_behind.py): a small write is answered before its replica
takes it, and every guarantee of a waited write still holds around it."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.crypt.helpers import (
    BS,
    LAY,
    SIZE,
    IntentLogFiles,
    RawMemory,
    new_state,
    open_disk,
    pattern,
    run,
)
from trustvbd import eager
from trustvbd.blockdev import Backend, BlockError
from trustvbd.blocks import write_behind
from trustvbd.blocks.crypt_layer import CryptDisk, physical_size
from trustvbd.blocks.disk_state import DiskState
from trustvbd.blocks.intent_log import IntentLog
from trustvbd.blocks.layer import Layer
from trustvbd.blocks.reconnect import ReplicaLink
from trustvbd.blocks.replica import State
from trustvbd.blocks.write_behind import GATHER_BLOCKS, WRITE_BEHIND_BLOCKS, WRITE_BEHIND_MAX


class Gate(Layer):
    """Holds the replica's data writes while closed; fails them with `error` if set."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.opened = asyncio.Event()
        self.opened.set()
        self.held = 0
        self.error: int | None = None
        self.sent: list[tuple[int, int]] = []  # (first block, blocks) of each data write
        self.fua: list[bool] = []  # ... and whether it came with FUA
        self.flushes = 0

    async def pwrite(self, offset: int, data: Any, fua: bool = False) -> None:
        if offset >= LAY.data_start:
            self.sent.append(((offset - LAY.data_start) // BS, len(data) // BS))
            self.fua.append(fua)
            self.held += 1
            try:
                await self.opened.wait()
            finally:
                self.held -= 1
            if self.error is not None:
                raise BlockError(self.error, "driver says no")
        await self.next.pwrite(offset, data, fua)

    async def flush(self) -> None:
        self.flushes += 1
        await self.next.flush()


async def gated_disk(tmp_path: Path, linked: bool = False) -> tuple[Any, RawMemory, Gate, CryptDisk]:
    """A new disk's state under tmp_path, its one replica in memory behind an open Gate
    (with `linked`, behind a ReplicaLink too, which never reconnects: flushes it skips)."""
    kek = new_state(tmp_path)
    mem = RawMemory(physical_size(SIZE))
    gate = Gate(mem)

    async def never() -> Backend:
        raise ConnectionError("not in this test")

    below: Backend = ReplicaLink(gate, "r0", never) if linked else gate
    return kek, mem, gate, await open_disk(tmp_path, below, kek)


async def turns(n: int = 50) -> None:
    """Let the event loop run everything that is ready, a few times over."""
    for _ in range(n):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (in 1 ms steps) until `condition` holds; fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def intent_leaves(state: Path, block: int) -> list[bytes]:
    """New leaves the trusted intent log holds for `block`, read as a restart would."""
    log = DiskState(state, "vm1").open_intent()
    try:
        records = log.read().records
    finally:
        log.close()
    return [r.new[(block - r.first_block) * 32:(block - r.first_block + 1) * 32]
            for r in records if r.first_block <= block < r.first_block + len(r.new) // 32]


def test_an_answered_write_is_recorded_and_nothing_reads_around_it(tmp_path: Path) -> None:
    async def go() -> None:
        kek, mem, gate, disk = await gated_disk(tmp_path)
        await disk.pwrite(3 * BS, pattern(3))
        await disk.commit()  # the intent log starts afresh

        gate.opened.clear()
        await asyncio.wait_for(disk.pwrite(3 * BS, pattern(3, 1)), 10)  # answered
        await until(lambda: gate.held == 1)  # sent on its own, GATHER_S after it
        # Its intent record is in the trusted log before the ciphertext left.
        assert intent_leaves(tmp_path, 3) == [bytes(disk._leaves.get(3, 4))]
        read = asyncio.ensure_future(disk.pread(3 * BS, BS))
        overwrite = asyncio.ensure_future(disk.pwrite(3 * BS, pattern(3, 2)))
        await turns()
        assert not read.done() and not overwrite.done()  # both wait for the replica
        assert bytes(await disk.pread(4 * BS, BS)) == bytes(BS)  # other blocks do not
        gate.opened.set()
        assert bytes(await read) == pattern(3, 1)
        await overwrite
        assert bytes(await disk.pread(3 * BS, BS)) == pattern(3, 2)

        gate.opened.clear()
        await disk.pwrite(5 * BS, pattern(5, 1))
        flush = asyncio.ensure_future(disk.flush())
        await turns()
        assert not flush.done()  # a FLUSH covers writes answered early: it waits for them
        gate.opened.set()
        await flush
        await disk.close()

        disk = await open_disk(tmp_path, mem, kek)
        assert bytes(await disk.pread(3 * BS, 3 * BS)) == pattern(3, 2) + bytes(BS) + pattern(5, 1)
        await disk.close()

    run(go())


def test_fua_big_and_too_many_writes_wait_for_the_replica(tmp_path: Path) -> None:
    async def go() -> None:
        _, _, gate, disk = await gated_disk(tmp_path)
        gate.opened.clear()
        waited = [asyncio.ensure_future(disk.pwrite(0, pattern(0), fua=True)),
                  asyncio.ensure_future(disk.pwrite(BS, b"\x01" * (WRITE_BEHIND_BLOCKS * BS)))]
        apart = [100 + 2 * i for i in range(WRITE_BEHIND_MAX)]  # not adjacent: none gathered
        for b in apart:
            await asyncio.wait_for(disk.pwrite(b * BS, pattern(b)), 10)
        one_more = asyncio.ensure_future(disk.pwrite(99 * BS, pattern(99)))
        # All at the replica (the last one behind once its GATHER_S passed), three waited for.
        await until(lambda: gate.held == WRITE_BEHIND_MAX + 3)
        assert not any(w.done() for w in [*waited, one_more])
        gate.opened.set()
        await asyncio.gather(*waited, one_more)
        for b in [99, *apart]:
            assert bytes(await disk.pread(b * BS, BS)) == pattern(b)
        await disk.close()

    run(go())


def test_a_failed_write_behind_is_said_by_reads_and_the_next_flush(tmp_path: Path) -> None:
    """ENOSPC stays ENOSPC; until the FLUSH reports it, writes wait and fail themselves."""

    async def go() -> None:
        _, _, gate, disk = await gated_disk(tmp_path)
        for b in (7, 8, 9):
            await disk.pwrite(b * BS, pattern(b))
        await disk.flush()

        gate.error = errno.ENOSPC
        await disk.pwrite(7 * BS, pattern(7, 1))  # answered, then failed by the replica
        await disk.settle()
        with pytest.raises(BlockError, match=r"block\(s\) 7 lost a write") as lost:
            await disk.pread(6 * BS, 3 * BS)
        assert lost.value.errno == errno.EIO
        with pytest.raises(BlockError, match="driver says no") as own:
            await disk.pwrite(8 * BS, pattern(8, 1))  # waited now: fails itself
        assert own.value.errno == errno.ENOSPC
        assert bytes(await disk.pread(8 * BS, BS)) == pattern(8)

        gate.error = None
        with pytest.raises(BlockError, match=r"block\(s\) 7 were answered, then failed on the "
                           r"replicas \(driver says no\)") as flushed:
            await disk.flush()
        assert flushed.value.errno == errno.ENOSPC
        await disk.flush()  # said once
        assert bytes(await disk.pread(7 * BS, 3 * BS)) == pattern(7) + pattern(8) + pattern(9)
        assert disk.integrity_events == 0

        gate.opened.clear()  # answered early again once the failure was said
        await asyncio.wait_for(disk.pwrite(9 * BS, pattern(9, 1)), 10)
        gate.opened.set()
        assert bytes(await disk.pread(9 * BS, BS)) == pattern(9, 1)
        await disk.close()

    run(go())


def test_a_failed_write_behind_is_said_to_every_connection_once(tmp_path: Path) -> None:
    """Two guests (or one guest's several connections) share a disk: a write behind that
    failed is said by the next FLUSH of every connection open when it failed, once each;
    one connection's FLUSH does not take the error away from the other. A connection
    opened after it failed hears it too while no FLUSH has said it (multi-conn: its FLUSH
    vouches for writes answered on any connection), not once one has."""

    async def go() -> None:
        _, _, gate, disk = await gated_disk(tmp_path)
        alice, bob = disk.flusher(), disk.flusher()
        await disk.pwrite(3 * BS, pattern(3))
        await alice()
        gate.error = errno.ENOSPC
        await disk.pwrite(3 * BS, pattern(3, 1))  # answered, then failed by the replica
        await disk.settle()
        carol = disk.flusher()  # attached after the failure, before any FLUSH said it
        gate.error = None
        for flush in (bob, alice, carol):
            with pytest.raises(BlockError, match=r"block\(s\) 3 were answered, then failed") as e:
                await flush()
            assert e.value.errno == errno.ENOSPC
            await flush()  # said once to each
        dave = disk.flusher()  # attached after FLUSHes said it: not his to hear of
        await dave()
        with pytest.raises(BlockError, match="were answered, then failed"):
            await disk.flush()  # the disk's own flush (tools) is one more such connection
        assert bytes(await disk.pread(3 * BS, BS)) == pattern(3)
        await disk.close()

    run(go())


def test_closing_waits_for_writes_behind(tmp_path: Path) -> None:
    async def go() -> None:
        kek, mem, gate, disk = await gated_disk(tmp_path)
        gate.opened.clear()
        await disk.pwrite(11 * BS, pattern(11))
        closing = asyncio.ensure_future(disk.close())
        await turns()
        assert not closing.done()
        gate.opened.set()
        await closing
        disk = await open_disk(tmp_path, mem, kek)
        assert bytes(await disk.pread(11 * BS, BS)) == pattern(11)
        await disk.close()

    run(go())


async def open_pair(tmp: Path, kek: Any, gates: list[Gate]) -> CryptDisk:
    return await CryptDisk.open_mirrored(tmp, "vm1", [(f"r{i}", g) for i, g in enumerate(gates)],
                                         kek)


def test_a_replica_dying_under_writes_behind_degrades_and_loses_nothing(tmp_path: Path) -> None:
    """Mirrored: one driver fails the writes answered early; the other has them, the guest
    sees no error, the anchor stops listing the failed one, and a reopen from the survivor
    alone reads every flushed block."""

    async def go() -> None:
        kek = new_state(tmp_path)
        mems = [RawMemory(physical_size(SIZE)) for _ in range(2)]
        gates = [Gate(m) for m in mems]
        disk = await open_pair(tmp_path, kek, gates)
        gates[1].opened.clear()
        for b in range(20, 30):
            await asyncio.wait_for(disk.pwrite(b * BS, pattern(b, 1)), 10)  # all answered
        await until(lambda: gates[1].held == 1)  # gathered into one, sent once its timer ran
        gates[1].error = errno.EIO  # the second driver dies with 10 writes in flight
        gates[1].opened.set()
        await disk.flush()  # no error: every write reached a current replica
        assert disk.replicas.replicas[1].state is not State.CURRENT
        anchor = DiskState(tmp_path, "vm1").read_anchor()
        assert not anchor.lists_current("r1")
        await disk.close()
        survivor = await open_disk(tmp_path, mems[0], kek)
        for b in range(20, 30):
            assert bytes(await survivor.pread(b * BS, BS)) == pattern(b, 1)
        await survivor.close()

    run(go())


def test_every_replica_dying_under_writes_behind_fails_the_next_flush(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = [RawMemory(physical_size(SIZE)) for _ in range(2)]
        gates = [Gate(m) for m in mems]
        disk = await open_pair(tmp_path, kek, gates)
        await disk.pwrite(40 * BS, pattern(40))
        await disk.flush()
        for g in gates:
            g.opened.clear()
        await asyncio.wait_for(disk.pwrite(40 * BS, pattern(40, 1)), 10)  # answered
        for g in gates:
            g.error = errno.EIO
            g.opened.set()
        await disk.settle()
        with pytest.raises(BlockError) as lost:
            await disk.pread(40 * BS, BS)
        assert lost.value.errno == errno.EIO
        with pytest.raises(BlockError) as flushed:
            await disk.flush()
        assert flushed.value.errno == errno.EIO
        await disk.close()

    run(go())


@pytest.fixture
def no_gather_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of writes behind leaves only when something sends it (the timer is a minute)."""
    monkeypatch.setattr(write_behind, "GATHER_S", 60.0)


def test_adjacent_writes_behind_go_to_the_replica_as_one_write(tmp_path: Path,
                                                               no_gather_timer: None) -> None:
    """A file written one block at a time costs one replica write per run, not per block;
    the runs held go together when one is GATHER_BLOCKS long or one more than HELD_RUNS
    would be held (or on the timer, or when something waits); every block reads back."""

    async def go() -> None:
        kek, mem, gate, disk = await gated_disk(tmp_path)
        for b in range(10, 20):
            await asyncio.wait_for(disk.pwrite(b * BS, pattern(b)), 10)  # each answered
        await disk.pwrite(50 * BS, pattern(50))  # elsewhere: a second run
        await disk.pwrite(20 * BS, pattern(20))  # the first run goes on
        await turns()
        assert gate.sent == []  # all wait to be joined
        for b in range(300, 300 + GATHER_BLOCKS + 3):  # within one leaf page
            await disk.pwrite(b * BS, pattern(b))
        await disk._commits.durable()  # runs leave once their records are (crypt_commit.py)
        await turns()
        # The third run full: every run goes, in one loop turn; 332-334 wait.
        assert sorted(gate.sent) == [(10, 11), (50, 1), (300, GATHER_BLOCKS)]
        sent = len(gate.sent)
        # Apart, and on the same leaf page (blocks 256-383; a write to another page waits
        # for it, which sends what is held).
        singles = [*range(256, 300, 2), *range(336, 384, 2)][:write_behind.HELD_RUNS]
        assert len(singles) == write_behind.HELD_RUNS
        for b in singles:  # with 332's run, one run more than HELD_RUNS: all go
            await disk.pwrite(b * BS, pattern(b))
        await disk._commits.durable()
        await turns()
        assert sorted(gate.sent[sent:]) == sorted([(300 + GATHER_BLOCKS, 3),
                                                   *((b, 1) for b in singles)])
        await disk.flush()
        await disk.close()
        disk = await open_disk(tmp_path, mem, kek)
        for b in [*range(10, 21), 50, *range(300, 300 + GATHER_BLOCKS + 3), *singles]:
            assert bytes(await disk.pread(b * BS, BS)) == pattern(b), b
        await disk.close()

    run(go())


def test_random_writes_behind_leave_held_runs_plus_one_at_a_time(tmp_path: Path,
                                                                 no_gather_timer: None) -> None:
    """Random writes are a run each: HELD_RUNS of them wait unsent (each departure asks for
    an intent-log sync; with 8 a sync and a departure went per ~9 writes at QD16), one
    more sends them all in one departure. A rewrite of any held run, not only the first,
    is found by its blocks and replaces its ciphertext, sent once."""

    async def go() -> None:
        kek, mem, gate, disk = await gated_disk(tmp_path)
        assert write_behind.HELD_RUNS >= 32
        apart = [2 * i for i in range(write_behind.HELD_RUNS + 1)]  # one leaf page
        for b in apart[:-1]:
            await disk.pwrite(b * BS, pattern(b))
        await disk._commits.durable()
        await turns()
        assert gate.sent == []  # all held
        middle = apart[len(apart) // 2]
        assert disk._behind.held_run(middle, middle + 1) is not None
        await disk.pwrite(middle * BS, pattern(middle, 1))  # rewritten while held
        assert gate.sent == []
        await disk.pwrite(apart[-1] * BS, pattern(apart[-1]))  # one run more: all go
        await disk._commits.durable()
        await turns()
        assert sorted(gate.sent) == [(b, 1) for b in apart]
        await disk.flush()
        await disk.close()
        disk = await open_disk(tmp_path, mem, kek)
        for b in apart:
            want = pattern(b, 1) if b == middle else pattern(b)
            assert bytes(await disk.pread(b * BS, BS)) == want, b
        await disk.close()

    run(go())


def test_writes_held_unsent_stay_below_the_writes_behind_limit(tmp_path: Path,
                                                               no_gather_timer: None) -> None:
    """Files written side by side a block at a time (runs that grow slowly, each under
    GATHER_BLOCKS) leave once HELD_WRITES writes wait, not only on the timer: held writes
    never fill the writes-behind limit, which would make every later write wait for its
    own replica write while they still waited for the timer."""

    async def go() -> None:
        kek, mem, gate, disk = await gated_disk(tmp_path)
        await disk.commit()
        streams = (10, 150, 300)  # three files, each on its own leaf page
        rounds = WRITE_BEHIND_MAX // 2
        for i in range(rounds):
            for s in streams:
                b = s + i
                await asyncio.wait_for(disk.pwrite(b * BS, pattern(b)), 10)
                # The guest's round trip: what left meanwhile was synced and answered.
                await until(lambda: not disk._behind._sending)
        behind = disk._behind
        # Every write answered before its replica: none met the limit.
        assert behind.started == rounds * len(streams)
        # Each departure took HELD_WRITES writes (a run of each file), not a run per write
        # (the first two went alone: loading the next file's leaf page sent what was held).
        assert len(gate.sent) <= 2 + len(streams) * (rounds * len(streams) // write_behind.HELD_WRITES)
        await disk.flush()
        await disk.close()
        disk = await open_disk(tmp_path, mem, kek)
        for s in streams:
            for b in range(s, s + rounds):
                assert bytes(await disk.pread(b * BS, BS)) == pattern(b), b
        await disk.close()

    run(go())


def test_a_held_block_rewritten_a_few_bytes_at_a_time_waits_for_no_replica(
        tmp_path: Path, no_gather_timer: None) -> None:
    """e2fsprogs writes superblock fields a few bytes at a time, one request after another.
    Each rewrite of a block whose write is still held unsent replaces that write (sealed,
    recorded, answered) instead of sending it and waiting for the replica: the replica gets
    one write, of the last content. A power cut before it left finds the flushed content."""

    async def go() -> None:
        kek, mem, gate, disk = await gated_disk(tmp_path / "s")
        await disk.pwrite(0, pattern(0))
        await disk.flush()
        sent = len(gate.sent)
        gate.opened.clear()  # the replica takes nothing from now on
        expect = bytearray(pattern(0))
        for i in range(12):
            at = 1024 + 6 * i
            piece = bytes([i + 1]) * (2 if i % 2 else 4)
            write = asyncio.ensure_future(disk.pwrite(at, piece))
            await turns()
            assert write.done(), i  # answered, with the replica holding nothing new
            await write
            expect[at:at + len(piece)] = piece
        assert gate.sent[sent:] == []
        await disk._commits.durable()
        # A power cut now: the records are durable, the ciphertext never reached the replica.
        shutil.copytree(tmp_path / "s", tmp_path / "cut")
        cut = RawMemory(len(mem.raw))
        cut.raw[:] = mem.raw
        after = await open_disk(tmp_path / "cut", cut, kek)
        assert bytes(await after.pread(0, BS)) == pattern(0)
        await after.close()
        gate.opened.set()
        assert bytes(await disk.pread(0, BS)) == expect  # (the read sends the run)
        await disk.flush()
        assert [s for s in gate.sent[sent:] if s[0] == 0] == [(0, 1)]  # one write, the last
        await disk.close()
        disk = await open_disk(tmp_path / "s", mem, kek)
        assert bytes(await disk.pread(0, BS)) == expect
        await disk.close()

    run(go())


class SyncedLog(IntentLogFiles):
    """Real files; keeps the intent log as of its last fdatasync (what a power cut leaves)."""

    synced = b""

    def fdatasync(self, fd: int) -> None:
        if fd in self.log_fds:
            self.synced = os.pread(fd, os.fstat(fd).st_size, 0)
        super().fdatasync(fd)


def test_a_runs_intent_records_are_durable_before_its_ciphertext_leaves(
        tmp_path: Path, no_gather_timer: None) -> None:
    """Writes behind are answered once recorded; a run's ciphertext leaves only once the
    intent log holding every one of its records is fdatasync'ed (a driver may persist it at
    once; a power cut must not leave ciphertext that no durable record explains)."""

    async def go() -> None:
        kek = new_state(tmp_path)
        mem = RawMemory(physical_size(SIZE))
        seen: list[list[bytes]] = []
        files = SyncedLog()

        class Checking(Gate):
            async def pwrite(self, offset: int, data: Any, fua: bool = False) -> None:
                if offset >= LAY.data_start:  # what a power cut would find in the log now
                    first = (offset - LAY.data_start) // BS
                    durable = tmp_path / "durable.log"
                    durable.write_bytes(files.synced)
                    log = IntentLog(durable)
                    try:
                        records = log.read().records
                    finally:
                        log.close()
                    seen.append([b"".join(r.new[(b - r.first_block) * 32:(b - r.first_block + 1) * 32]
                                          for r in records
                                          if r.first_block <= b < r.first_block + len(r.new) // 32)
                                 for b in range(first, first + len(data) // BS)])
                await super().pwrite(offset, data, fua)

        disk = await CryptDisk.open(tmp_path, "vm1", Checking(mem), "r0", kek, files=files)
        await disk.commit()  # the log starts afresh
        for b in range(10, 20):
            await disk.pwrite(b * BS, pattern(b))
        await disk.pwrite(50 * BS, pattern(50))  # elsewhere: a second run
        await turns()
        assert seen == []  # answered and recorded; nothing sent yet
        assert bytes(await disk.pread(12 * BS, BS)) == pattern(12)  # a read sends both
        assert seen == [[bytes(disk._leaves.get(b, b + 1)) for b in range(10, 20)],
                        [bytes(disk._leaves.get(50, 51))]]
        await disk.close()
        disk = await open_disk(tmp_path, mem, kek)
        for b in [*range(10, 20), 50]:
            assert bytes(await disk.pread(b * BS, BS)) == pattern(b), b
        await disk.close()

    run(go())


def test_the_gather_timer_fires_once_per_quiet_run_on_a_millisecond_clock() -> None:
    """uvloop's clock counts milliseconds: the timer must not fire again and again until the
    next millisecond when `now - last` misses GATHER_S by a rounding error (it did: a FUSE
    copy's encryption domain woke several times per write)."""
    import uvloop

    async def go() -> int:
        sent: list[int] = []

        async def send(first: int, old: Any, ct: Any, fua: bool) -> None:
            sent.append(first)

        behind = write_behind.WriteBehind("vm1", send)
        fired = 0
        waited = behind._waited

        def counting() -> None:
            nonlocal fired
            fired += 1
            waited()
        behind._waited = counting  # type: ignore[method-assign]
        for b in range(0, 400, 20):  # twenty runs, each left alone for its timer
            behind.add_all([(b, 1, bytes(32), bytes(BS), 0)])
            behind.add_all([(b + 1, 1, bytes(32), bytes(BS), 0)])
            await until(lambda: not behind._runs)
        await behind.drain()
        assert sent == list(range(0, 400, 20))
        return fired

    assert uvloop.run(go()) <= 40  # once per run, twice if a write came after arming


def test_whatever_waits_for_gathered_blocks_sends_them_at_once(tmp_path: Path,
                                                                no_gather_timer: None) -> None:
    """A read, an overlapping write, a zero, a FLUSH and a close do not wait for the timer."""

    async def go() -> None:
        kek, mem, gate, disk = await gated_disk(tmp_path)
        await disk.pwrite(5 * BS, pattern(5))
        await disk.pwrite(6 * BS, pattern(6))
        await turns()
        assert gate.sent == []  # 5 waits to be joined, and 6 joins it
        assert bytes(await asyncio.wait_for(disk.pread(6 * BS, BS), 5)) == pattern(6)
        assert gate.sent == [(5, 2)]
        await disk.pwrite(7 * BS, pattern(7))
        await asyncio.wait_for(disk.pwrite(7 * BS + 100, b"\xee" * 10), 5)  # read-modify-write
        await disk.pwrite(20 * BS, pattern(20))
        await disk.pwrite(21 * BS, pattern(21))
        await asyncio.wait_for(disk.zero(21 * BS, BS), 5)
        await disk.pwrite(30 * BS, pattern(30))
        await asyncio.wait_for(disk.flush(), 5)
        await disk.pwrite(31 * BS, pattern(31))
        await asyncio.wait_for(disk.close(), 5)
        disk = await open_disk(tmp_path, mem, kek)
        seven = bytearray(pattern(7))
        seven[100:110] = b"\xee" * 10
        expect = {5: pattern(5), 6: pattern(6), 7: bytes(seven), 20: pattern(20), 21: bytes(BS),
                  30: pattern(30), 31: pattern(31)}
        for b, data in expect.items():
            assert bytes(await disk.pread(b * BS, BS)) == data, b
        await disk.close()

    run(go())


def test_a_gathered_run_the_replica_fails_loses_each_of_its_writes(tmp_path: Path,
                                                                   no_gather_timer: None) -> None:
    async def go() -> None:
        _, _, gate, disk = await gated_disk(tmp_path)
        for b in range(30, 34):
            await disk.pwrite(b * BS, pattern(b))
        await disk.flush()
        gate.error = errno.EIO
        for b in range(30, 34):
            await disk.pwrite(b * BS, pattern(b, 1))  # answered; gathered
        await disk.settle()
        assert gate.sent[-1] == (30, 4)
        for b in range(30, 34):
            with pytest.raises(BlockError, match=rf"block\(s\) {b} lost a write"):
                await disk.pread(b * BS, BS)
        gate.error = None
        with pytest.raises(BlockError, match=r"block\(s\) 30-33 were answered, then failed"):
            await disk.flush()
        for b in range(30, 34):
            assert bytes(await disk.pread(b * BS, BS)) == pattern(b)  # what the replica kept
        await disk.close()

    run(go())


def test_a_flush_sends_the_unsent_run_with_fua_and_flushes_meanwhile(tmp_path: Path,
                                                                     no_gather_timer: None) -> None:
    """The run a FLUSH finds unsent goes with FUA (durable by itself), so the replica flush
    for the writes answered before it need not wait for it; the FLUSH answers once both
    are done, and only then is it vouched for (flush mark)."""

    async def go() -> None:
        kek, mem, gate, disk = await gated_disk(tmp_path)
        await disk.pwrite(1 * BS, pattern(1))
        await disk.flush()
        await disk.pwrite(7 * BS, pattern(7))
        await disk.settle()  # 7 reached the replica; 8 and 9 continue it
        flushes = gate.flushes
        gate.opened.clear()
        await disk.pwrite(8 * BS, pattern(8))
        await disk.pwrite(9 * BS, pattern(9))  # one unsent run
        flush = asyncio.ensure_future(disk.flush())
        # The replica flushes with the run held (the run leaves once its records are durable).
        await until(lambda: gate.flushes > flushes and gate.held == 1)
        assert gate.held == 1 and gate.sent[-1] == (8, 2) and gate.fua[-1]
        await turns()
        assert not flush.done()  # the FLUSH waits for the run too
        assert not [r for r in intent_records(tmp_path) if not r.new][1:]  # one mark (earlier)
        gate.opened.set()
        await asyncio.wait_for(flush, 5)
        assert len([r for r in intent_records(tmp_path) if not r.new]) == 2  # now vouched for
        await disk.close()
        disk = await open_disk(tmp_path, mem, kek)
        assert bytes(await disk.pread(8 * BS, 2 * BS)) == pattern(8) + pattern(9)
        await disk.close()

    run(go())


@pytest.fixture
def no_expected_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """No write is taken for one a FLUSH follows (each waits for its FLUSH to send it)."""
    monkeypatch.setattr(write_behind, "FLUSH_STREAK", 1 << 30)


def test_a_write_then_flush_costs_the_replica_one_fua_write_and_no_flush(
        tmp_path: Path, no_gather_timer: None, no_expected_flush: None) -> None:
    """A guest's write then FLUSH: the FLUSH sends the write (waiting to be joined, or sent on
    and still waiting for its loop turn) with FUA, and the replica link then has nothing to
    flush (reconnect.py): the driver syncs once. So too after a FUA write. Several runs go
    plain and one flush follows. A write without FUA since makes the FLUSH go. Every block
    reads back after a reopen."""

    async def go() -> None:
        kek, mem, gate, disk = await gated_disk(tmp_path, linked=True)
        await disk.pwrite(1 * BS, pattern(1))
        await disk.flush()
        flushes = gate.flushes
        await disk.pwrite(40 * BS, pattern(40))
        await disk.flush()
        assert gate.sent[-1] == (40, 1) and gate.fua[-1] and gate.flushes == flushes
        for b in range(60, 60 + GATHER_BLOCKS):  # a full run: sent on at once
            await disk.pwrite(b * BS, pattern(b))
        await disk.flush()  # it still waits for its loop turn: it goes with FUA
        assert gate.sent[-1] == (60, GATHER_BLOCKS) and gate.fua[-1]
        assert gate.flushes == flushes
        await disk.pwrite(90 * BS, pattern(90), fua=True)
        await disk.flush()
        assert gate.fua[-1] and gate.flushes == flushes
        await disk.pwrite(150 * BS, pattern(150))
        await disk.pwrite(170 * BS, pattern(170))
        await disk.flush()  # two runs: plain writes, then one flush (not a sync per run)
        assert sorted(gate.sent[-2:]) == [(150, 1), (170, 1)] and gate.fua[-2:] == [False, False]
        assert gate.flushes == flushes + 1
        flushes = gate.flushes
        await disk.pwrite(100 * BS, pattern(100))
        await disk.settle()  # sent without FUA (the timer's work)
        await disk.pwrite(120 * BS, pattern(120))
        await disk.flush()
        assert gate.fua[-2:] == [False, True] and gate.flushes == flushes + 1
        await disk.close()
        disk = await open_disk(tmp_path, mem, kek)
        for b in (1, 40, *range(60, 60 + GATHER_BLOCKS), 90, 100, 120, 150, 170):
            assert bytes(await disk.pread(b * BS, BS)) == pattern(b), b
        await disk.close()

    run(go())


def test_a_flush_sends_its_fua_run_before_it_first_waits(tmp_path: Path,
                                                        no_gather_timer: None) -> None:
    """The run a FLUSH sends on with FUA is handed to the replica in the FLUSH's own
    step, not by a task one loop turn later: the driver starts its sync that much
    sooner, and the FLUSH waits for nothing else first."""

    async def go() -> None:
        kek, mem, gate, disk = await gated_disk(tmp_path)
        await disk.pwrite(1 * BS, pattern(1))
        await disk.flush()
        await disk.pwrite(40 * BS, pattern(40))
        await disk._commits.durable()  # its record synced meanwhile (it started with it)
        assert gate.sent[-1] != (40, 1)  # waiting to be joined
        flush = eager.start(asyncio.get_running_loop(), disk.flush())
        assert gate.sent[-1] == (40, 1) and gate.fua[-1]
        if flush is not None:  # (None: it ended in that step, nothing left to wait for)
            await asyncio.wait_for(flush, 5)
        await disk.close()
        disk = await open_disk(tmp_path, mem, kek)
        assert bytes(await disk.pread(40 * BS, BS)) == pattern(40)
        await disk.close()

    run(go())


def test_a_write_after_flushes_that_each_followed_one_write_goes_at_once_with_fua(
        tmp_path: Path, no_gather_timer: None) -> None:
    """A guest that FLUSHes after each write (fsync per write, a database's log): once
    FLUSH_STREAK FLUSHes in a row came right after one write each, the next write goes to
    the replica with FUA before it is answered (its FLUSH then only waits for it and
    writes the mark, and the replica is not flushed); a second write before the FLUSH ends the streak, and
    writes are gathered again. Everything reads back after a reopen."""

    async def go() -> None:
        kek, mem, gate, disk = await gated_disk(tmp_path, linked=True)
        for b in range(write_behind.FLUSH_STREAK):
            await disk.pwrite(b * BS, pattern(b))
            await disk.flush()
        flushes, sent = gate.flushes, len(gate.sent)
        await disk.pwrite(40 * BS, pattern(40))
        await disk._commits.durable()
        assert gate.sent[-1] == (40, 1) and gate.fua[-1]  # on its way once its record is durable
        await disk.flush()
        assert gate.flushes == flushes and len(gate.sent) == sent + 1
        assert len([r for r in intent_records(tmp_path) if not r.new]) == write_behind.FLUSH_STREAK + 1
        await disk.pwrite(50 * BS, pattern(50))  # expected to be flushed: sent at once
        await disk.pwrite(51 * BS, pattern(51))  # ... but another write came first
        await disk.pwrite(52 * BS, pattern(52))
        await disk._commits.durable()
        await turns()
        assert gate.sent[-1] == (50, 1) and gate.fua[-1]  # 51 and 52 wait, gathered
        await disk.flush()
        assert gate.sent[-1] == (51, 2) and gate.fua[-1]
        await disk.pwrite(60 * BS, pattern(60))  # the streak starts again: gathered
        await disk._commits.durable()
        await turns()
        assert gate.sent[-1] == (51, 2)
        await disk.flush()
        await disk.close()
        disk = await open_disk(tmp_path, mem, kek)
        for b in (*range(write_behind.FLUSH_STREAK), 40, 50, 51, 52, 60):
            assert bytes(await disk.pread(b * BS, BS)) == pattern(b), b
        await disk.close()

    run(go())


def test_a_write_sent_early_that_fails_fails_the_flush_and_writes_no_mark(
        tmp_path: Path, no_gather_timer: None) -> None:
    """The replica fails a write sent at once for the FLUSH expected after it: that FLUSH
    says so (with the replica's errno), is not vouched for by a mark but commits instead
    (settling what the block holds), and the block reads as before."""

    async def go() -> None:
        _, _, gate, disk = await gated_disk(tmp_path)
        for b in range(write_behind.FLUSH_STREAK):
            await disk.pwrite(b * BS, pattern(b))
            await disk.flush()
        await disk.pwrite(30 * BS, pattern(7))
        await disk.flush()
        epoch = disk.epoch
        gate.error = errno.ENOSPC
        await disk.pwrite(30 * BS, pattern(30))
        await until(lambda: gate.sent[-1] == (30, 1) and gate.fua[-1])
        with pytest.raises(BlockError, match=r"block\(s\) 30 were answered, then failed") as e:
            await asyncio.wait_for(disk.flush(), 5)
        assert e.value.errno == errno.ENOSPC and disk.epoch > epoch
        gate.error = None
        assert bytes(await disk.pread(30 * BS, BS)) == pattern(7)
        await disk.close()

    run(go())


class Reads(Layer):
    """Counts the replica's reads of block 3."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.reads = 0

    async def pread(self, offset: int, length: int) -> Any:
        if offset <= LAY.data_offset(3) < offset + length:
            self.reads += 1
        return await self.next.pread(offset, length)


def test_a_block_rewritten_a_few_bytes_at_a_time_is_merged_without_replica_reads(
        tmp_path: Path) -> None:
    """e2fsprogs updates superblock fields 2 or 4 bytes at a time: once a block was written
    partly, the read-modify-write of it after a write of this domain uses the plaintext it
    wrote (its leaf still that write's), not a replica read. Only blocks written partly are
    remembered so (the first partial write of a block reads it): other writes keep nothing.
    A block it did not write last, a block zeroed since and a block whose replica write
    failed are read (or refused) as before; every byte reads back."""

    async def go() -> None:
        kek = new_state(tmp_path)
        mem = RawMemory(physical_size(SIZE))
        reads = Reads(mem)
        gate = Gate(reads)
        disk = await open_disk(tmp_path, gate, kek)
        want = bytearray(pattern(3))
        await disk.pwrite(3 * BS, pattern(3))
        await disk.pwrite(3 * BS + 1020, b"\x01\x02")  # its first partial write reads it
        want[1020:1022] = b"\x01\x02"
        assert reads.reads == 1
        await disk.pwrite(3 * BS, bytes(want))  # a whole-block write of it is now remembered
        for i, at in enumerate(range(1024, 1100, 4)):
            await disk.pwrite(3 * BS + at, bytes([i]) * 2)
            want[at:at + 2] = bytes([i]) * 2
        assert reads.reads == 1
        await disk.pwrite(3 * BS + 4000, b"\xee" * 200)  # and a write across two blocks
        want[4000:] = b"\xee" * 96
        assert reads.reads == 1  # block 4 was never written: zeros, no read
        assert bytes(await disk.pread(4 * BS, 104)) == b"\xee" * 104
        await disk.pwrite(4 * BS, pattern(4))
        await disk.flush()
        await disk.close()
        disk = await open_disk(tmp_path, gate, kek)  # a new domain remembers nothing
        await disk.pwrite(3 * BS + 10, b"ab")
        want[10:12] = b"ab"
        assert reads.reads == 2
        assert bytes(await disk.pread(3 * BS, BS)) == want
        await disk.zero(3 * BS, BS)
        await disk.pwrite(3 * BS + 10, b"cd")  # zeroed since it was remembered: zeros
        assert bytes(await disk.pread(3 * BS, BS)) == bytes(10) + b"cd" + bytes(BS - 12)
        await disk.pwrite(5 * BS, pattern(5))
        await disk.settle()
        gate.error = errno.EIO
        await disk.pwrite(5 * BS, pattern(5, 1))  # answered, then failed by the replica
        await disk.settle()
        with pytest.raises(BlockError, match=r"lost a write"):
            await disk.pwrite(5 * BS + 7, b"x")  # as a read of it would say
        gate.error = None
        with pytest.raises(BlockError, match="were answered, then failed"):
            await disk.flush()
        await disk.close()
        disk = await open_disk(tmp_path, mem, kek)
        assert bytes(await disk.pread(3 * BS, 2 * BS)) == (
            bytes(10) + b"cd" + bytes(BS - 12) + pattern(4))
        assert bytes(await disk.pread(5 * BS, BS)) == pattern(5)  # what the replica kept
        await disk.close()

    run(go())


def test_a_flush_whose_fua_run_fails_says_so_and_writes_no_mark(tmp_path: Path,
                                                                no_gather_timer: None) -> None:
    async def go() -> None:
        _, _, gate, disk = await gated_disk(tmp_path)
        await disk.pwrite(12 * BS, pattern(12))
        await disk.flush()
        epoch = disk.epoch
        await disk.pwrite(11 * BS, pattern(11))
        await disk.settle()
        await disk.pwrite(12 * BS, pattern(12, 1))  # continues 11: unsent
        gate.error = errno.ENOSPC
        with pytest.raises(BlockError, match=r"block\(s\) 12 were answered, then failed") as e:
            await asyncio.wait_for(disk.flush(), 5)
        assert e.value.errno == errno.ENOSPC and gate.fua[-1]
        # Not vouched for by a mark: the FLUSH committed instead, settling what block 12 holds.
        assert disk.epoch > epoch
        gate.error = None
        assert bytes(await disk.pread(12 * BS, BS)) == pattern(12)
        await disk.close()

    run(go())


def intent_records(state: Path) -> list[Any]:
    log = DiskState(state, "vm1").open_intent()
    try:
        return log.read().records
    finally:
        log.close()
