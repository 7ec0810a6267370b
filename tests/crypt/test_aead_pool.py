"""AEAD worker processes: same bytes as inline, failures found, a dead or stuck worker costs only speed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.crypt.helpers import BS, LAY, flip, make_replica, new_state, open_disk, run
from trustvbd.blockdev import Backend, Buffer, Lent
from trustvbd.blocks import aead_jobs, aead_pool
from trustvbd.blocks.aead_pool import AeadPool
from trustvbd.blocks.crypt_layer import IntegrityError
from trustvbd.blocks.layer import Layer
from trustvbd.crypt.aead import LEAF_SIZE, BlockCipher

KEY, DISK_ID = bytes(range(32)), bytes(range(100, 116))
N = 600  # several jobs of aead_jobs.MAX_BLOCKS blocks, the last one shorter


def plaintext(n: int = N) -> bytes:
    return b"".join(i.to_bytes(4, "big") * (BS // 4) for i in range(n))


@contextlib.asynccontextmanager
async def started_pool() -> AsyncIterator[AeadPool]:
    pool = await AeadPool.start(1)
    try:
        yield pool
    finally:
        await pool.close()


def encrypt_inline(plain: bytes, first_block: int = 7, first_version: int = 1000) -> tuple[bytearray, bytearray]:
    n = len(plain) // BS
    out, leaves = bytearray(n * BS + 16), bytearray(n * LEAF_SIZE)
    BlockCipher(KEY, DISK_ID).encrypt(first_block, first_version, memoryview(plain), memoryview(out),
                                      memoryview(leaves))
    return out[:n * BS], leaves


def test_workers_encrypt_byte_for_byte_as_inline() -> None:
    async def go() -> None:
        async with started_pool() as pool:
            bulk = pool.cipher(KEY, DISK_ID)
            plain = plaintext()
            out, leaves = bytearray(N * BS + 16), bytearray(N * LEAF_SIZE)
            await bulk.encrypt(7, 1000, memoryview(plain), memoryview(out), memoryview(leaves))
            assert pool.jobs_offloaded >= 1
            want_out, want_leaves = encrypt_inline(plain)
            assert out[:N * BS] == want_out
            assert leaves == want_leaves
    run(go())


def test_workers_find_damaged_blocks_in_every_job() -> None:
    async def go() -> None:
        async with started_pool() as pool:
            bulk = pool.cipher(KEY, DISK_ID)
            plain = plaintext()
            ct, leaves = encrypt_inline(plain)
            for b in (3, 256, 599):
                ct[b * BS + 100] ^= 0x40
            before = pool.jobs_offloaded
            bad = await bulk.decrypt(7, memoryview(ct), memoryview(leaves), memoryview(ct))  # in place
            assert pool.jobs_offloaded > before
            assert bad == [3, 256, 599]
            for b in range(N):
                got = ct[b * BS:(b + 1) * BS]
                assert got == (bytes(BS) if b in bad else plain[b * BS:(b + 1) * BS]), b
    run(go())


def test_a_key_of_another_disk_fails_every_block() -> None:
    async def go() -> None:
        async with started_pool() as pool:
            other = pool.cipher(KEY, bytes(16))  # same key, other disk id: AAD differs
            ct, leaves = encrypt_inline(plaintext(64))
            bad = await other.decrypt(7, memoryview(ct), memoryview(leaves), memoryview(ct))
            assert bad == list(range(64))
    run(go())


def test_killed_worker_mid_job_costs_only_speed(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with started_pool() as pool:
            bulk = pool.cipher(KEY, DISK_ID)
            plain = plaintext()
            ct, leaves = encrypt_inline(plain)
            (pid,) = pool.worker_pids()
            os.kill(pid, signal.SIGSTOP)  # the jobs queue up and wait
            task = asyncio.ensure_future(bulk.decrypt(7, memoryview(ct), memoryview(leaves), memoryview(ct)))
            await asyncio.sleep(0.1)
            assert not task.done()
            os.kill(pid, signal.SIGKILL)
            assert await asyncio.wait_for(task, 10) == []
            assert ct == plain
            # A new worker takes its place, with the disk's key: work goes to it again.
            await restarted(pool, 1)
            assert pool.worker_pids() != [pid]
            offloaded = pool.jobs_offloaded
            ct2, leaves2 = encrypt_inline(plain)
            assert await bulk.decrypt(7, memoryview(ct2), memoryview(leaves2), memoryview(ct2)) == []
            assert ct2 == plain and pool.jobs_offloaded > offloaded
    with caplog.at_level(logging.WARNING, "trustvbd.crypt.aead"):
        run(go())
    assert "out of service" in caplog.text and "it exited" in caplog.text
    assert "AEAD worker 0 restarted" in caplog.text


async def restarted(pool: AeadPool, times: int) -> None:
    for _ in range(200):
        if pool.restarts == times and pool.live_workers == 1:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"restarts {pool.restarts}, live workers {pool.live_workers}")


def test_a_worker_that_keeps_dying_is_left_down(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(aead_pool, "MAX_RESTARTS", 1)

    async def go() -> None:
        async with started_pool() as pool:
            bulk = pool.cipher(KEY, DISK_ID)
            os.kill(pool.worker_pids()[0], signal.SIGKILL)
            await restarted(pool, 1)
            os.kill(pool.worker_pids()[0], signal.SIGKILL)
            for _ in range(200):
                if pool.live_workers == 0:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            assert pool.live_workers == 0 and pool.restarts == 1
            plain = plaintext()
            ct, leaves = encrypt_inline(plain)  # done here now, still correct
            assert await bulk.decrypt(7, memoryview(ct), memoryview(leaves), memoryview(ct)) == []
            assert ct == plain
    with caplog.at_level(logging.ERROR, "trustvbd.crypt.aead"):
        run(go())
    assert "not restarting it again" in caplog.text


def test_stuck_worker_is_killed_and_its_work_done_inline(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(aead_pool, "WORKER_STALL", 0.3)

    async def go() -> None:
        async with started_pool() as pool:
            bulk = pool.cipher(KEY, DISK_ID)
            plain = plaintext(64)
            (pid,) = pool.worker_pids()
            os.kill(pid, signal.SIGSTOP)
            out, leaves = bytearray(64 * BS + 16), bytearray(64 * LEAF_SIZE)
            await asyncio.wait_for(bulk.encrypt(7, 1000, memoryview(plain), memoryview(out), memoryview(leaves)), 10)
            assert (out[:64 * BS], leaves) == encrypt_inline(plain)
            for _ in range(50):  # SIGKILL ends even a stopped process
                if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("stuck worker still alive")
            await restarted(pool, 1)
    with caplog.at_level(logging.ERROR, "trustvbd.crypt.aead"):
        run(go())
    assert "took more than" in caplog.text


def test_cancelled_request_keeps_its_slot_until_the_worker_answers() -> None:
    async def go() -> None:
        async with started_pool() as pool:
            bulk = pool.cipher(KEY, DISK_ID)
            ct, leaves = encrypt_inline(plaintext())
            (pid,) = pool.worker_pids()
            os.kill(pid, signal.SIGSTOP)
            task = asyncio.ensure_future(bulk.decrypt(7, memoryview(ct), memoryview(leaves), memoryview(ct)))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.free_slots < aead_jobs.SLOTS  # the worker may still write them
            os.kill(pid, signal.SIGCONT)
            for _ in range(100):
                if pool.free_slots == aead_jobs.SLOTS:
                    break
                await asyncio.sleep(0.02)
            assert pool.free_slots == aead_jobs.SLOTS
            assert pool.live_workers == 1
    run(go())


def test_cancelled_one_job_request_keeps_its_one_slot_until_the_worker_answers() -> None:
    """#9.1: the job whose future the cancel hit is still the worker's: its slot waits too.

    (With several jobs the others' slots were kept, but the awaited one went back at
    once, for the next job to be overwritten by the old job's late output.)
    """
    async def go() -> None:
        async with started_pool() as pool:
            bulk = pool.cipher(KEY, DISK_ID)
            n = aead_jobs.MAX_BLOCKS
            ct, leaves = encrypt_inline(plaintext(n))
            (pid,) = pool.worker_pids()
            os.kill(pid, signal.SIGSTOP)
            task = asyncio.ensure_future(bulk.decrypt(7, memoryview(ct), memoryview(leaves),
                                                      memoryview(ct)))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.free_slots == aead_jobs.SLOTS - 1
            os.kill(pid, signal.SIGCONT)
            for _ in range(100):
                if pool.free_slots == aead_jobs.SLOTS:
                    break
                await asyncio.sleep(0.02)
            assert pool.free_slots == aead_jobs.SLOTS and pool.live_workers == 1
            out, want = bytearray(n * BS), plaintext(n)  # and the worker still serves
            assert await bulk.decrypt(7, memoryview(ct), memoryview(leaves), memoryview(out)) == []
            assert out == want
    run(go())


def test_small_requests_stay_inline() -> None:
    async def go() -> None:
        async with started_pool() as pool:
            bulk = pool.cipher(KEY, DISK_ID)
            n = aead_pool.BULK_MIN - 1
            ct, leaves = encrypt_inline(plaintext(n))
            assert await bulk.decrypt(7, memoryview(ct), memoryview(leaves), memoryview(ct)) == []
            assert pool.jobs_offloaded == 0
    run(go())


def test_crypt_disk_with_workers_reads_writes_and_catches_tampering(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        replica = make_replica("memory", tmp_path)
        async with started_pool() as pool:
            events: list[dict] = []
            disk = await open_disk(tmp_path, replica, kek, events=events, aead=pool)
            data = os.urandom(512 * BS)
            await disk.pwrite(0, data)  # more than one job: encrypted in slots, copied out
            piece = aead_jobs.MAX_BLOCKS * BS
            await asyncio.gather(*(disk.pwrite(at, data[at:at + piece])  # one job each: sent from its slot
                                   for at in range(0, len(data), piece)))
            await disk.flush()
            assert bytes(await disk.pread(0, len(data))) == data
            assert pool.jobs_offloaded >= 2
            await disk.close()
            flip(replica, LAY.data_start + 300 * BS + 5)
            disk = await open_disk(tmp_path, replica, kek, events=events, aead=pool)
            with pytest.raises(IntegrityError) as err:
                await disk.pread(0, len(data))
            assert err.value.blocks == [300]
            assert bytes(await disk.pread(0, 300 * BS)) == data[:300 * BS]
            assert bytes(await disk.pread(301 * BS, 211 * BS)) == data[301 * BS:]
            assert len(events) >= 1
            await disk.close()
    run(go())


class HeldWrites(Layer):
    """Replica writes wait until the test lets them go."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.go = asyncio.Event()
        self.started = asyncio.Event()

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.started.set()
        await self.go.wait()
        await self.next.pwrite(offset, data, fua)


def test_cancelled_write_keeps_its_slot_until_the_replica_write_ends(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        replica = make_replica("memory", tmp_path)
        async with started_pool() as pool:
            held = HeldWrites(replica)
            held.go.set()  # opening writes freely
            disk = await open_disk(tmp_path, held, kek, aead=pool)
            held.go.clear()
            held.started.clear()
            data = os.urandom(aead_jobs.MAX_BLOCKS * BS)
            task = asyncio.ensure_future(disk.pwrite(0, data))
            await asyncio.wait_for(held.started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The ciphertext may still be on its way: its slot stays taken.
            assert pool.free_slots == aead_jobs.SLOTS - 1
            held.go.set()
            for _ in range(100):
                if pool.free_slots == aead_jobs.SLOTS:
                    break
                await asyncio.sleep(0.01)
            assert pool.free_slots == aead_jobs.SLOTS
            # The write went through after all: the block reads as the new data.
            assert bytes(await disk.pread(0, len(data))) == data
            await disk.close()
    run(go())


def test_worker_count_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTVBD_AEAD_WORKERS", "3")
    assert aead_pool.default_workers() == 3
    monkeypatch.setenv("TRUSTVBD_AEAD_WORKERS", "0")
    assert aead_pool.default_workers() == 0
    for bad, says in (("two", "is not a number"), ("-1", "out of range"), ("65", "out of range")):
        monkeypatch.setenv("TRUSTVBD_AEAD_WORKERS", bad)
        with pytest.raises(ValueError, match=says):
            aead_pool.default_workers()
    monkeypatch.delenv("TRUSTVBD_AEAD_WORKERS")
    assert aead_pool.default_workers() == max(0, min(4, (os.cpu_count() or 1) - 1))


def test_job_redone_inline_does_not_spill_into_a_run_done_inline_before_it() -> None:
    """Run 0 goes to a worker that dies, runs 1-2 find no slot: run 0 is redone last, here."""
    async def go() -> None:
        async with started_pool() as pool:
            bulk = pool.cipher(KEY, DISK_ID)
            pool._free_slots[:] = [0]  # one slot: only the first run goes to the worker
            n = 3 * aead_jobs.MAX_BLOCKS
            plain = plaintext(n)
            (pid,) = pool.worker_pids()
            os.kill(pid, signal.SIGSTOP)
            out, leaves = bytearray(n * BS + 16), bytearray(n * LEAF_SIZE)
            task = asyncio.ensure_future(bulk.encrypt(7, 1000, memoryview(plain), memoryview(out),
                                                      memoryview(leaves)))
            await asyncio.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(task, 10)
            assert pool.jobs_offloaded == 1
            assert (out[:n * BS], leaves) == encrypt_inline(plain)
    run(go())


def test_reads_lend_their_slot_until_released_and_never_leak_it(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        replica = make_replica("memory", tmp_path)
        async with started_pool() as pool:
            disk = await open_disk(tmp_path, replica, kek, aead=pool)
            run_bytes = aead_jobs.MAX_BLOCKS * BS
            data = os.urandom(2 * run_bytes)
            await disk.pwrite(0, data)
            lent = await disk.pread_lent(run_bytes, run_bytes)  # one job: decrypted in its slot
            assert isinstance(lent, Lent)
            assert bytes(lent.view) == data[run_bytes:]
            assert pool.free_slots == aead_jobs.SLOTS - 1  # the NBD server still sends from it
            part = await disk.pread_lent(BS + 1, run_bytes - BS)  # unaligned: a window on a slot
            assert isinstance(part, Lent) and bytes(part.view) == data[BS + 1:run_bytes + 1]
            lent.release()
            part.release()
            assert pool.free_slots == aead_jobs.SLOTS
            assert bytes(await disk.pread(0, run_bytes)) == data[:run_bytes]  # pread copies
            assert pool.free_slots == aead_jobs.SLOTS
            await disk.close()
            flip(replica, LAY.data_start + 5 * BS + 9)
            disk = await open_disk(tmp_path, replica, kek, aead=pool)
            with pytest.raises(IntegrityError):
                await disk.pread_lent(0, run_bytes)
            assert pool.free_slots == aead_jobs.SLOTS  # a refused read gives its slot back at once
            await disk.close()
    run(go())
