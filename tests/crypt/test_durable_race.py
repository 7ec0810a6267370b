"""Commits.durable against the intent log's sync thread (group_commit.py): the thread
advances `durable` whenever its fdatasync ends, so a sync may end between any two
statements of the event loop's code that reads it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from tests.crypt.helpers import BS, SIZE, RawMemory, new_state, open_disk, pattern, run
from trustvbd.blocks.crypt_layer import physical_size
from trustvbd.blocks.group_commit import GroupCommit


def test_a_sync_ending_between_durables_checks_does_not_leave_it_waiting(tmp_path: Path) -> None:
    """A sequential copy with 2 replicas hung for good (seen once in ~40 runs of a
    512 MiB nbdcopy): a 256 KiB WRITE waited in `durable` for a sync nobody would run.
    `durable` found a record not yet durable, then the sync under way on the log's
    thread ended, then `when_durable` found everything durable and said so by its
    return value, without calling back: nothing was left to wake the WRITE. Here the
    log's own sync (the real one) runs exactly there, as the thread's may."""

    async def go() -> None:
        kek = new_state(tmp_path)
        disk = await open_disk(tmp_path, RawMemory(physical_size(SIZE)), kek)
        commits, group = disk._commits, disk._commits.group
        await disk.pwrite(3 * BS, pattern(3))  # a write behind: its record not yet synced
        assert not commits.intent.all_durable

        def sync_then_check(then: Callable[[OSError | None], None], here: bool = False) -> bool:
            commits.intent.sync()  # the thread's sync ending now
            return GroupCommit.when_durable(group, then, here)

        group.when_durable = sync_then_check  # type: ignore[method-assign]
        await asyncio.wait_for(commits.durable(), 5)
        del group.when_durable
        await disk.flush()
        assert bytes(await disk.pread(3 * BS, BS)) == pattern(3)
        await disk.close()

    run(go())
