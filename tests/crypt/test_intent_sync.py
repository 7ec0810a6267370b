"""The intent log's group commit runs on the log's own thread (IntentLog.sync_soon).

Not the loop's default executor: sealing jobs of large writes (aead_pool.py) and anything
else queue there, and a write's record must not wait behind them to become durable. The
thread ends with the log, and a log dropped without close does not keep it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.crypt.helpers import BS, SIZE, make_replica, new_state, open_disk, pattern, run
from trustvbd.blocks import intent_log
from trustvbd.blocks.intent_log import IntentLog
from trustvbd.fileops import OsFileOps


def sync_threads(name: str) -> list[str]:
    """The threads of this process named "sync NAME" (the intent log's native thread is
    not in `threading.enumerate`): their ids."""
    found = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):  # (a thread that just ended)
            if Path(f"/proc/self/task/{tid}/comm").read_text().strip() == f"sync {name}"[:15]:
                found.append(tid)
    return found


def test_a_write_s_record_is_synced_while_the_loop_s_default_executor_is_busy(
        tmp_path: Path) -> None:
    """The default executor's only thread is busy (a long sealing job, say): a write behind
    still has its record synced and reaches its replica, and a FLUSH completes, without
    waiting for that job."""
    async def go() -> None:
        kek = new_state(tmp_path / "state", size=SIZE)
        disk = await open_disk(tmp_path / "state", make_replica("memory", tmp_path), kek)
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1)
        loop.set_default_executor(executor)
        release = threading.Event()
        busy = loop.run_in_executor(None, release.wait)
        try:
            await disk.pwrite(5 * BS, pattern(5, 1))  # answered before its replica
            await asyncio.wait_for(disk.settle(), 10)  # its record durable, then sent
            await asyncio.wait_for(disk.flush(), 10)
            assert not busy.done()
        finally:
            release.set()
            await busy
        assert bytes(await disk.pread(5 * BS, BS)) == pattern(5, 1)
        await disk.close()
        executor.shutdown()
    run(go())


def test_closing_the_disk_ends_its_intent_log_s_sync_thread(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path / "state", size=SIZE)
        disk = await open_disk(tmp_path / "state", make_replica("memory", tmp_path), kek)
        name = disk._commits.intent.path.parent.name
        before = sync_threads(name)
        await disk.pwrite(7 * BS, pattern(7, 1))
        await disk.settle()  # the write behind leaves: its record synced on the thread
        await disk.flush()  # (a FLUSH syncs on the loop: group_commit.GroupCommit._sync_next)
        started = [t for t in sync_threads(name) if t not in before]
        assert len(started) == 1  # one per disk, started by its first sync
        thread = disk._commits.intent._sync_thread
        assert thread is not None and thread.alive
        await disk.close()
        assert not thread.alive and not set(sync_threads(name)) & set(started)
    run(go())


def test_a_log_dropped_without_close_lets_its_sync_thread_end(tmp_path: Path) -> None:
    """A log closed is refused a sync (EBADF, said to the caller, no thread started); one
    dropped unclosed (a test's abandoned disk, a crash path) does not keep its thread, nor
    does one dropped while a sync is under way."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        for name in ("dropped", "dropped-busy"):
            (tmp_path / name).mkdir()
            log = IntentLog(tmp_path / name / "intent.log")
            log.reset(1)
            log.append(3, bytes(32), bytes(32))
            done: asyncio.Future[BaseException | None] = loop.create_future()
            log.sync_soon(loop, done.set_result)
            if name == "dropped":
                assert await asyncio.wait_for(done, 10) is None and log.all_durable
            deadline = time.monotonic() + 10  # (a new thread names itself once it runs)
            while not sync_threads(name) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert len(sync_threads(name)) == 1
            del log
            gc.collect()
            deadline = time.monotonic() + 10
            while sync_threads(name) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not sync_threads(name)

        (tmp_path / "closed").mkdir()
        closed = IntentLog(tmp_path / "closed" / "intent.log")
        closed.close()
        refused: asyncio.Future[BaseException | None] = loop.create_future()
        closed.sync_soon(loop, refused.set_result)
        error = await asyncio.wait_for(refused, 10)
        assert isinstance(error, OSError) and error.errno == errno.EBADF
        assert not sync_threads("closed")
    run(go())


class GatedSync(OsFileOps):
    """Real files; each fdatasync waits for `gate` first (a sync under way, held there)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.syncs = 0

    def fdatasync(self, fd: int) -> None:
        assert self.gate.wait(10)
        super().fdatasync(fd)
        self.syncs += 1


def _a_sync_under_way(tmp_path: Path) -> tuple[GatedSync, IntentLog,
                                                asyncio.Future[BaseException | None]]:
    """An intent log with one record and its sync asked of the log's thread (`sync_soon`),
    held at the gate; the future hears the outcome. Call inside the running loop."""
    loop = asyncio.get_running_loop()
    ops = GatedSync()
    log = IntentLog(tmp_path / "intent.log", ops)
    log.reset(1)
    log.append(3, bytes(32), b"\x03" * 32)
    done: asyncio.Future[BaseException | None] = loop.create_future()
    log.sync_soon(loop, done.set_result)
    return ops, log, done


def test_a_reset_or_a_close_waits_for_the_sync_under_way_and_its_caller_hears_later(
        tmp_path: Path) -> None:
    """The sync runs on the log's native thread (sync_soon): a reset does not truncate the
    log under it (the sync's fdatasync ends first, and its window is not taken for the new
    log's), a close does not close the file under it, and its caller is told on a later
    loop turn, not inside the reset or close."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        ops, log, done = _a_sync_under_way(tmp_path)
        threading.Timer(0.05, ops.gate.set).start()
        log.reset(2, {5: b"\x05" * 32})  # waits for the sync's fdatasync
        assert ops.syncs == 1 and not done.done()
        assert await asyncio.wait_for(done, 10) is None and log.all_durable
        log.append(4, bytes(32), b"\x04" * 32)
        again: asyncio.Future[BaseException | None] = loop.create_future()
        log.sync_soon(loop, again.set_result)
        assert await asyncio.wait_for(again, 10) is None and log.all_durable
        contents = log.read()
        assert contents.base_epoch == 2 and [r.first_block for r in contents.records] == [4]
        assert [t.hashes for t in contents.trees] == [{5: b"\x05" * 32}]

        ops.gate.clear()
        log.append(6, bytes(32), b"\x06" * 32)
        last: asyncio.Future[BaseException | None] = loop.create_future()
        log.sync_soon(loop, last.set_result)
        threading.Timer(0.05, ops.gate.set).start()
        log.close()  # waits for the sync's fdatasync
        assert ops.syncs == 3 and not last.done()
        assert await asyncio.wait_for(last, 10) is None and log.all_durable
    run(go())


def test_the_pipe_is_watched_once_and_a_stale_readiness_ends_no_sync(tmp_path: Path) -> None:
    """The loop watches the sync thread's pipe from the first sync until the close (a reader
    added and removed per sync cost the loop a poll handle and several system calls per
    departure of writes behind): ten syncs, one reader, none left after the close. A
    readiness left over from a sync a reset took earlier in the same loop iteration does
    not end the sync under way since (nor fail it): that one ends when its fdatasync does."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        added: list[int] = []
        removed: list[int] = []
        add_reader, remove_reader = loop.add_reader, loop.remove_reader

        def adding(fd: int, callback: Any, *args: Any) -> None:
            added.append(fd)
            add_reader(fd, callback, *args)

        def removing(fd: int) -> bool:
            removed.append(fd)
            return remove_reader(fd)
        loop.add_reader = adding  # type: ignore[method-assign,assignment]
        loop.remove_reader = removing  # type: ignore[method-assign,assignment]
        ops = GatedSync()
        ops.gate.set()
        log = IntentLog(tmp_path / "intent.log", ops)
        log.reset(1)
        for b in range(10):
            log.append(b, bytes(32), b"\x03" * 32)
            done: asyncio.Future[BaseException | None] = loop.create_future()
            log.sync_soon(loop, done.set_result)
            assert await asyncio.wait_for(done, 10) is None and log.all_durable
        assert len(added) == 1 and removed == []

        ops.gate.clear()
        log.append(11, bytes(32), b"\x04" * 32)
        pending: asyncio.Future[BaseException | None] = loop.create_future()
        log.sync_soon(loop, pending.set_result)
        intent_log._readable(weakref.ref(log))  # stale: no sync has ended
        await asyncio.sleep(0.05)
        assert not pending.done() and not log.all_durable
        ops.gate.set()
        assert await asyncio.wait_for(pending, 10) is None and log.all_durable
        log.close()
        assert added == removed
    run(go())


def test_a_sync_whose_wake_up_pipe_breaks_is_told_as_failed_and_the_next_gets_a_new_thread(
        tmp_path: Path) -> None:
    """The sync thread wakes the loop by a byte on a pipe, and `take` reads it after taking
    the outcome. A pipe that cannot be read then (here its read end replaced by a
    directory, so the thread's write fails and the read says EISDIR) used to raise out of
    `take` with the outcome gone: the reset raised, and whoever waited for the sync (a
    FLUSH) never heard. Now the sync is told as failed (its records are synced again), the
    thread that can wake no one says it is not alive and takes no more asks, and the next
    sync runs on a new thread."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        ops, log, done = _a_sync_under_way(tmp_path)
        thread = log._sync_thread
        assert thread is not None
        directory = os.open(tmp_path, os.O_RDONLY)
        try:
            os.dup2(directory, thread.fileno())  # the pipe's read end: gone
        finally:
            os.close(directory)
        ops.gate.set()
        log.reset(2)  # waits for the sync, takes its outcome
        error = await asyncio.wait_for(done, 10)
        assert isinstance(error, OSError) and "pipe" in str(error), error
        assert not log.all_durable and not thread.alive

        log.append(4, bytes(32), b"\x04" * 32)
        again: asyncio.Future[BaseException | None] = loop.create_future()
        log.sync_soon(loop, again.set_result)
        assert await asyncio.wait_for(again, 10) is None and log.all_durable
        assert log._sync_thread is not thread
        log.close()
    run(go())
