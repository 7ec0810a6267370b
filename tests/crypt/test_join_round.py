"""Who joins in a commit (crypt_commit._commit_now): only the replicas that took every
step of it. One degraded during a long commit and copied up again before its end is
joining once more, but missed what the commit sent it before: it must wait for the next."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

from tests.crypt.helpers import BS, new_state, pattern, run
from tests.crypt.test_mirror import Faulty, fill, memories, open_set, settle
from tests.crypt.test_mirror_dirty import until
from trustvbd.blockdev import Backend, BlockError, Buffer
from trustvbd.blocks.replica import State
from trustvbd.crypt.superblock import SLOT_SIZE, SLOTS


class HeldFlush(Faulty):
    """Faulty, and its flushes wait while `hold` is clear."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.hold = asyncio.Event()
        self.hold.set()
        self.held = 0

    async def flush(self) -> None:
        if not self.hold.is_set():
            self.held += 1
            await self.hold.wait()
        await super().flush()


class FailsOneWrite(Faulty):
    """Faulty, and fails the first write at `offset` once armed."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.offset: int | None = None

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if offset == self.offset:
            self.offset = None
            raise BlockError(errno.EIO, "injected superblock write error")
        await super().pwrite(offset, data, fua)


def test_a_replica_degraded_and_copied_up_again_within_one_commit_joins_at_the_next(
        tmp_path: Path) -> None:
    """r1 rejoins; its joining commit's superblock write fails on it (it is degraded), and
    while r0's flush of that commit is slow, r1 is taken back and copied up again. The
    commit ends with r1 joining again, but r1 never got its superblock: it must not be
    current after that commit, only after the next, and then hold exactly r0's bytes.
    Before, the commit's end check (`resyncing and joining`) let it join with the new
    superblock missing, and no later commit sent it."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        r0_link, r1_link = HeldFlush(mems[0]), FailsOneWrite(mems[1])
        disk = await open_set(tmp_path, kek, [r0_link, r1_link])
        await fill(disk)
        await disk.close()
        disk = await open_set(tmp_path, kek, [r0_link, r1_link])
        r1 = disk.replicas.replicas[1]
        r1_link.fail_writes = True
        await disk.pwrite(3 * BS, pattern(3, 5))
        await disk.flush()
        assert r1.state is State.DEGRADED
        joining_epoch = disk.epoch + 1
        r1_link.offset = (joining_epoch % SLOTS) * SLOT_SIZE  # its joining superblock
        r0_link.hold.clear()
        r1_link.fail_writes = False  # r1 is resynced and joins in a commit of its own
        await until(lambda: r0_link.held, "the joining commit flushes r0")
        assert r1_link.offset is None and r1.state is not State.CURRENT
        await until(lambda: r1.state is State.RESYNCING and r1.joining,
                    "r1 copied up again during the commit")
        r0_link.hold.set()
        await until(lambda: disk.epoch == joining_epoch, "the joining commit ends")
        assert r1.state is State.RESYNCING and r1.joining, (
            "r1 joined in a commit whose superblock it never got")
        await settle(disk)  # the next commit: r1 joins in it
        assert disk.epoch > joining_epoch
        await disk.close()
        assert bytes(mems[0].raw) == bytes(mems[1].raw)
    run(go())
