"""A FLUSH that the intent log stands for (crypt_commit.py): durable without a commit,
never letting a replica roll a flushed block back, and a commit when the log must not."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.crypt.helpers import BS, LAY, SIZE, RawMemory, new_state, open_disk, pattern, run
from trustvbd.blockdev import Backend, BlockError
from trustvbd.blocks import crypt_commit, intent_log, write_behind
from trustvbd.blocks.crypt_layer import CryptDisk, IntegrityError, physical_size
from trustvbd.blocks.disk_state import DiskState
from trustvbd.blocks.intent_log import IntentLog, IntentRecord
from trustvbd.blocks.reconnect import ReplicaLink
from trustvbd.fileops import OsFileOps


async def crash(disk: CryptDisk) -> None:
    """The encryption domain dies: no closing commit."""
    disk._commits.intent.close()
    disk._commits.tree.close()
    disk._state.close()


def test_a_flushed_block_survives_a_crash_without_a_commit(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        mem = RawMemory(physical_size(SIZE))
        disk = await open_disk(tmp_path, mem, kek)
        epoch = disk.epoch
        for b in (1, 2, 300):
            await disk.pwrite(b * BS, pattern(b, 1))
        await disk.flush()
        await disk.pwrite(2 * BS, pattern(2, 2), fua=True)  # FUA: the same, for one write
        assert disk.epoch == epoch  # no commit
        await crash(disk)
        disk = await open_disk(tmp_path, mem, kek)
        got = bytes(await disk.pread(BS, 2 * BS)) + bytes(await disk.pread(300 * BS, BS))
        assert got == pattern(1, 1) + pattern(2, 2) + pattern(300, 1)
        assert disk.integrity_events == 0
        await disk.close()

    run(go())


@pytest.mark.parametrize("older", ["committed", "written since"])
def test_a_replica_cannot_roll_a_flushed_block_back_after_a_crash(tmp_path: Path,
                                                                  older: str) -> None:
    """Recovery accepts any version the log recorded since the last commit, but none older
    than a flush mark's: the driver replaying the block's committed ciphertext, or one
    written since but before the FLUSH, gets an integrity error, never the old data."""

    async def go() -> None:
        kek = new_state(tmp_path)
        mem = RawMemory(physical_size(SIZE))
        disk = await open_disk(tmp_path, mem, kek)
        at = LAY.data_offset(7)
        await disk.pwrite(7 * BS, pattern(7, 1))
        await disk.commit()
        committed = bytes(mem.raw[at:at + BS])
        await disk.pwrite(7 * BS, pattern(7, 2))
        await disk.settle()
        written_since = bytes(mem.raw[at:at + BS])
        await disk.pwrite(7 * BS, pattern(7, 3))
        await disk.flush()
        await crash(disk)
        mem.raw[at:at + BS] = committed if older == "committed" else written_since
        disk = await open_disk(tmp_path, mem, kek)
        with pytest.raises(IntegrityError):
            await disk.pread(7 * BS, BS)
        await disk.close()

    run(go())


def test_unflushed_writes_after_a_flush_may_show_but_nothing_older(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        mem = RawMemory(physical_size(SIZE))
        disk = await open_disk(tmp_path, mem, kek)
        await disk.pwrite(9 * BS, pattern(9, 1))
        await disk.flush()
        await disk.pwrite(9 * BS, pattern(9, 2))  # not flushed; the replica took it
        await disk.settle()
        await crash(disk)
        disk = await open_disk(tmp_path, mem, kek)
        assert bytes(await disk.pread(9 * BS, BS)) == pattern(9, 2)
        await disk.close()

    run(go())


def test_a_flush_commits_once_enough_was_logged(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypt_commit, "CHECKPOINT_BLOCKS", 4)
    async def go() -> None:
        kek = new_state(tmp_path)
        disk = await open_disk(tmp_path, RawMemory(physical_size(SIZE)), kek)
        epoch = disk.epoch
        await disk.pwrite(0, pattern(0) * 3)
        await disk.flush()
        assert disk.epoch == epoch  # 3 blocks logged: the log stands for a commit
        await disk.pwrite(10 * BS, pattern(10))
        await disk.flush()
        assert disk.epoch == epoch + 1  # 4: a commit, and the log starts afresh
        await disk.pwrite(20 * BS, pattern(20))
        await disk.flush()
        assert disk.epoch == epoch + 1
        await disk.close()

    run(go())


def test_a_flush_syncs_the_log_in_its_room_without_growing_it(tmp_path: Path) -> None:
    """A FLUSH's records and mark go into zeroed room written at the last commit, so its
    fdatasyncs write data pages only: the file's size and allocation do not change."""

    async def go() -> None:
        kek = new_state(tmp_path)
        disk = await open_disk(tmp_path, RawMemory(physical_size(SIZE)), kek)
        path = DiskState(tmp_path, "vm1").intent_path
        await disk.pwrite(0, pattern(0))
        await disk.flush()
        first, epoch = os.stat(path), disk.epoch
        for b in range(1, 40):
            await disk.pwrite(b * BS, pattern(b))
            await disk.flush()
        assert disk.epoch == epoch  # flush marks, no commit (which resets the log)
        now = os.stat(path)
        assert (now.st_size, now.st_blocks) == (first.st_size, first.st_blocks)
        assert first.st_size == intent_log.LOG_ROOM
        await crash(disk)

    run(go())


def test_records_go_after_the_last_one_as_the_room_grows_and_after_a_reopen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intent_log, "LOG_ROOM", 256)
    path = tmp_path / "intent.log"
    log = IntentLog(path)
    log.reset(7)
    assert os.path.getsize(path) == 256
    for b in range(40):  # 80 bytes each: the room grows several times
        log.append(b, bytes(32), bytes([b + 1]) * 32)
    log.close()
    log = IntentLog(path)  # a reopen finds the end of the records, not the file's
    log.append(99, bytes(32), b"\xff" * 32)
    log.mark_flushed()
    contents = log.read()
    log.close()
    assert contents.base_epoch == 7
    assert [r.first_block for r in contents.records] == [*range(40), 99, 0]
    assert contents.records[5].new == b"\x06" * 32 and contents.records[-1].new == b""
    assert os.path.getsize(path) > 256 and os.path.getsize(path) % 256 == 0


def test_a_reset_leaves_no_record_of_the_older_log_to_read(tmp_path: Path) -> None:
    """The room after a reset is fresh zeros: records of the log before it, further along
    the file, can never be read as the new log's."""
    path = tmp_path / "intent.log"
    log = IntentLog(path)
    log.reset(1)
    for b in range(300):
        log.append(b, bytes(32), b"\x01" * 32)
    log.sync()
    log.reset(2)
    log.append(5, bytes(32), b"\x02" * 32)
    log.append(6, bytes(32), b"\x02" * 32)  # ends where a record of the older log began
    log.sync()
    log.close()
    log = IntentLog(path)
    contents = log.read()
    log.close()
    assert contents.base_epoch == 2
    assert [(r.first_block, r.new) for r in contents.records] == [(5, b"\x02" * 32),
                                                                   (6, b"\x02" * 32)]


def last_record(tmp_path: Path) -> IntentRecord:
    """The last record of disk vm1's intent log, as it is on disk now."""
    log = DiskState(tmp_path, "vm1").open_intent()
    try:
        return log.read().records[-1]
    finally:
        log.close()


class FailingLogSync(OsFileOps):
    """Real files; fdatasync of the intent log fails (EIO) once `failing` is set."""

    failing = False

    def fdatasync(self, fd: int) -> None:
        if self.failing and os.readlink(f"/proc/self/fd/{fd}").endswith("intent.log"):
            raise OSError(errno.EIO, "Input/output error")
        super().fdatasync(fd)


async def open_failing_sync(tmp_path: Path) -> tuple[FailingLogSync, CryptDisk]:
    kek = new_state(tmp_path)
    files = FailingLogSync()
    disk = await CryptDisk.open(tmp_path, "vm1", RawMemory(physical_size(SIZE)), "r0", kek,
                                files=files)
    return files, disk


async def flush_fails_with_eio_and_no_mark(disk: CryptDisk, state: Path, block: int) -> None:
    """The FLUSH fails with EIO for the log's sync, and the last record is still the write
    of `block` (one block): no flush mark was written after it."""
    with pytest.raises(BlockError, match=r"cannot sync .*intent\.log") as failed:
        await asyncio.wait_for(disk.flush(), 10)
    assert failed.value.errno == errno.EIO
    last = last_record(state)
    assert (last.first_block, len(last.new)) == (block, 32)


def test_a_flush_whose_log_sync_fails_says_eio_and_vouches_for_nothing(tmp_path: Path) -> None:
    """The records' sync runs on a thread while the writes behind and the replica flush are in
    flight: its failure still fails the FLUSH (no mark is vouched for) and nothing hangs."""

    async def go() -> None:
        files, disk = await open_failing_sync(tmp_path)
        await disk.pwrite(3 * BS, pattern(3))
        await disk.flush()
        await disk.pwrite(4 * BS, pattern(4))  # answered before the replica (write_behind.py)
        files.failing = True
        await flush_fails_with_eio_and_no_mark(disk, tmp_path, 4)
        files.failing = False
        await flush_after_a_loss(disk, 4)
        assert bytes(await disk.pread(3 * BS, BS)) == pattern(3)
        assert bytes(await disk.pread(4 * BS, BS)) in (pattern(4), bytes(BS))
        await crash(disk)

    run(go())


async def flush_after_a_loss(disk: CryptDisk, block: int) -> None:
    """Once the log syncs again: a FLUSH succeeds, or first says (once) that the write of
    `block` was lost, its ciphertext never sent: its records did not sync, and an fdatasync
    that failed is not retried into a promise (the kernel may have dropped those pages)."""
    try:
        await asyncio.wait_for(disk.flush(), 10)
    except BlockError as exc:
        assert exc.errno == errno.EIO and f"block(s) {block}" in exc.message, exc
        await asyncio.wait_for(disk.flush(), 10)


def test_a_write_a_flush_is_expected_to_follow_waits_for_its_records_and_a_failed_sync_says_eio(
        tmp_path: Path) -> None:
    """A write a FLUSH is expected to follow goes to the replica at once with FUA, but only
    once its records are durable (write_behind.py): if their sync fails, the write is not
    sent, and the FLUSH fails with EIO and writes no mark."""

    async def go() -> None:
        kek = new_state(tmp_path)
        files, mem = FailingLogSync(), RawMemory(physical_size(SIZE))
        disk = await CryptDisk.open(tmp_path, "vm1", mem, "r0", kek, files=files)
        for b in range(write_behind.FLUSH_STREAK):
            await disk.pwrite(b * BS, pattern(b))
            await disk.flush()
        files.failing = True
        sent = disk._behind.sends
        await disk.pwrite(9 * BS, pattern(9))  # taken for one a FLUSH follows
        await flush_fails_with_eio_and_no_mark(disk, tmp_path, 9)
        assert bytes(mem.raw[disk._lay.data_offset(9):disk._lay.data_offset(10)]) == bytes(BS)
        assert disk._behind.sends == sent + 1 and disk._behind.failures == 1  # lost, not sent
        files.failing = False
        await flush_after_a_loss(disk, 9)
        assert bytes(await disk.pread(9 * BS, BS)) == bytes(BS)
        await crash(disk)

    run(go())


class HeldSync(OsFileOps):
    """fdatasync waits until `release` is set, then takes what the file holds then."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.synced: bytes | None = None

    def fdatasync(self, fd: int) -> None:
        self.entered.set()
        assert self.release.wait(10)
        self.synced = os.pread(fd, 1 << 20, 0)
        super().fdatasync(fd)


def test_a_reset_waits_for_a_sync_running_on_a_thread(tmp_path: Path) -> None:
    """A FLUSH syncs the records on a thread and may fall back to a commit, which resets the
    log: inside that sync, a reset could make a truncated, not yet rewritten log durable."""
    ops = HeldSync()
    log = IntentLog(tmp_path / "intent.log", ops)
    log.reset(1)
    for b in range(3):
        log.append(b, bytes(32), b"\x01" * 32)
    before = os.pread(log._fd, 1 << 20, 0)
    syncing = threading.Thread(target=log.sync)
    syncing.start()
    assert ops.entered.wait(10)
    resetting = threading.Thread(target=log.reset, args=(2,))
    resetting.start()
    resetting.join(0.2)
    assert resetting.is_alive()  # waits for the sync
    ops.release.set()
    syncing.join(10)
    resetting.join(10)
    assert ops.synced == before  # the sync saw the whole log, never a truncated one
    assert log.read().base_epoch == 2
    log.close()


class CountedWrites(OsFileOps):
    """Counts pwrites since the last fdatasync."""

    def __init__(self) -> None:
        self.unsynced = 0

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        self.unsynced += 1
        return super().pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        self.unsynced = 0


def test_a_tree_record_counted_by_a_sync_is_written_by_it(tmp_path: Path) -> None:
    """The group commit's sync (on a thread) takes the count of records appended, writes
    the held ones and fdatasyncs. A commit's tree record was counted first and written
    after, outside the lock: a sync landing between the two called it durable unwritten,
    and the commit's own `durable()` then skipped the sync its leaf pages wait for. Here
    the sync lands exactly there."""
    ops = CountedWrites()
    log = IntentLog(tmp_path / "intent.log", ops)
    log.reset(1)
    log.sync()
    put = log._put

    def sync_first(rec: bytes | bytearray) -> None:
        log.sync()  # the thread's sync, between the count and the write
        put(rec)

    log._put = sync_first  # type: ignore[method-assign]
    log.append_tree(1, {0: b"\x07" * 32})
    assert log.all_durable
    assert ops.unsynced == 0, "a record counted durable was written after the sync"
    log.close()


class StepLog(OsFileOps):
    """Real files; each intent-log record written and each sync of it, in `steps` (shared
    with the replica below), with the thread the sync ran on."""

    def __init__(self, steps: list[str]) -> None:
        self.steps = steps

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("intent.log") and data[:4] == b"IREC":
            # A flush mark is a leaf record of no blocks (intent_log.mark_flushed).
            self.steps.append("mark" if data[4:8] == bytes(4) and len(data) == 20 else "record")
        return super().pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("intent.log"):
            on = "loop" if threading.current_thread() is threading.main_thread() else "thread"
            self.steps.append(f"log sync on the {on}")
        super().fdatasync(fd)


class StepReplica(RawMemory):
    def __init__(self, size: int, steps: list[str]) -> None:
        super().__init__(size)
        self.steps = steps

    async def pwrite(self, offset: int, data: Any, fua: bool = False) -> None:
        await super().pwrite(offset, data, fua)
        self.steps.append("replica write, FUA" if fua else "replica write")

    async def flush(self) -> None:
        await super().flush()
        self.steps.append("replica flush")


def test_a_flush_after_each_write_syncs_the_log_on_the_loop_in_order(tmp_path: Path) -> None:
    """A guest that FLUSHes after each write (fsync per write): the write a FLUSH is expected
    to follow has its record synced, then goes to the replica with FUA, both before the write
    is answered; then the FLUSH's mark is written and synced; both syncs on the event loop's
    own thread (group_commit.py _sync_next: a hand-over to the log's thread and back cost two
    wake-ups the FLUSH waited for), and nothing else between."""

    async def go() -> None:
        kek = new_state(tmp_path)
        steps: list[str] = []
        # Behind the link a driver has: no FLUSH when every write since the last went with FUA.
        link = ReplicaLink(StepReplica(physical_size(SIZE), steps), "r0", never)
        disk = await CryptDisk.open(tmp_path, "vm1", link, "r0", kek,  # type: ignore[arg-type]
                                    files=StepLog(steps))
        for b in range(write_behind.FLUSH_STREAK):
            await disk.pwrite(b * BS, pattern(b))
            await disk.flush()
        for b in (9, 30, 200):
            del steps[:]
            await disk.pwrite(b * BS, pattern(b))  # taken for one a FLUSH follows
            # Its record synced and its FUA write sent before it was answered (the FLUSH
            # then waits for the driver's sync and the mark's): never the write first.
            assert steps == ["record", "log sync on the loop", "replica write, FUA"], (b, steps)
            await disk.flush()
            assert steps == ["record", "log sync on the loop", "replica write, FUA", "mark",
                             "log sync on the loop"], (b, steps)
        await crash(disk)

    run(go())


async def never() -> Backend:
    raise ConnectionError("a simulated replica does not reconnect")
