"""The intent log's group commit runs on the log's own thread (IntentLog.sync_soon).

Not the loop's default executor: sealing jobs of large writes (aead_pool.py) and anything
else queue there, and a write's record must not wait behind them to become durable. The
thread ends with the log, and a log dropped without close does not keep it.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.crypt.helpers import BS, SIZE, make_replica, new_state, open_disk, pattern, run
from trustvbd.blocks import intent_log
from trustvbd.blocks.intent_log import IntentLog


def sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sync ") and t.is_alive()]


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
        before = set(sync_threads())
        kek = new_state(tmp_path / "state", size=SIZE)
        disk = await open_disk(tmp_path / "state", make_replica("memory", tmp_path), kek)
        await disk.pwrite(7 * BS, pattern(7, 1))
        await disk.settle()  # the write behind leaves: its record synced on the thread
        await disk.flush()  # (a FLUSH syncs on the loop: crypt_commit.Commits._sync_next)
        started = [t for t in sync_threads() if t not in before]
        assert len(started) == 1  # one per disk, started by its first sync
        await disk.close()
        assert not started[0].is_alive()
    run(go())


def test_a_log_dropped_without_close_lets_its_sync_thread_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log closed is refused a sync (EBADF, said to the caller, no thread started); one
    dropped unclosed (a test's abandoned disk, a crash path) does not keep its thread."""
    monkeypatch.setattr(intent_log, "_IDLE_S", 0.05)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        before = set(sync_threads())
        log = IntentLog(tmp_path / "intent.log")
        log.reset(1)
        log.append(3, bytes(32), bytes(32))
        done: asyncio.Future[BaseException | None] = loop.create_future()
        log.sync_soon(loop, done.set_result)
        assert await asyncio.wait_for(done, 10) is None and log.all_durable
        [thread] = [t for t in sync_threads() if t not in before]
        del log
        gc.collect()
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not thread.is_alive()

        closed = IntentLog(tmp_path / "intent2.log")
        closed.close()
        refused: asyncio.Future[BaseException | None] = loop.create_future()
        closed.sync_soon(loop, refused.set_result)
        error = await asyncio.wait_for(refused, 10)
        assert isinstance(error, OSError) and error.errno == errno.EBADF
        assert not [t for t in sync_threads() if t not in before]
    run(go())
