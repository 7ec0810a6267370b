"""AEAD threads: big requests sealed and opened off the event loop, byte for byte as inline."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from tests.crypt.helpers import BS, LAY, flip, make_replica, new_state, open_disk, run
from trustvbd.blocks import aead_pool
from trustvbd.blocks.aead_pool import AeadPool
from trustvbd.blocks.crypt_layer import IntegrityError
from trustvbd.crypt.aead import LEAF_SIZE, BlockCipher

KEY, DISK_ID = bytes(range(32)), bytes(range(100, 116))
N = 600


def plaintext(n: int = N) -> bytes:
    return b"".join(i.to_bytes(4, "big") * (BS // 4) for i in range(n))


def test_threads_seal_and_open_byte_for_byte_as_inline() -> None:
    cipher = BlockCipher(KEY, DISK_ID, 42)
    plain = plaintext()
    want = cipher.seal(7, 1000, plain)

    async def go() -> None:
        pool = AeadPool(2)
        try:
            assert await pool.seal(cipher, 7, 1000, memoryview(plain)) == want
            ct, leaves = want
            damaged = bytearray(ct)
            for b in (3, 256, 599):
                damaged[b * BS + 100] ^= 0x40
            got, bad = await pool.open(cipher, 7, damaged, leaves)
            assert bad == [3, 256, 599]
            for b in range(N):
                assert got[b * BS:(b + 1) * BS] == (bytes(BS) if b in bad else plain[b * BS:(b + 1) * BS]), b
            assert pool.jobs_offloaded == 2
        finally:
            await pool.close()
    run(go())


def test_small_requests_stay_on_the_event_loop() -> None:
    cipher = BlockCipher(KEY, DISK_ID, 42)
    n = aead_pool.BULK_MIN - 1

    async def go() -> None:
        pool = AeadPool(1)
        try:
            ct, leaves = await pool.seal(cipher, 0, 1, plaintext(n))
            assert await pool.open(cipher, 0, ct, leaves) == (plaintext(n), [])
            assert pool.jobs_offloaded == 0
        finally:
            await pool.close()
    run(go())


def test_the_event_loop_runs_while_a_thread_seals() -> None:
    """The GIL is released during the work: the loop ticks while a big request is sealed."""
    cipher = BlockCipher(KEY, DISK_ID, 1)
    plain = bytes(16 * 1024 * 1024)  # ~10-30 ms of AES-GCM

    async def go() -> int:
        pool = AeadPool(1)
        ticks = 0
        try:
            job = asyncio.ensure_future(pool.seal(cipher, 0, 1, plain))
            while not job.done():
                ticks += 1
                await asyncio.sleep(0)
            ct, leaves = await job
            assert len(ct) == len(plain) and len(leaves) == len(plain) // BS * LEAF_SIZE
        finally:
            await pool.close()
        return ticks
    assert run(go()) > 10


def test_a_cancelled_caller_leaves_nothing_behind() -> None:
    """A queued or running job of a cancelled caller ends on its own and its result is dropped;
    the caller may overwrite its buffer meanwhile (the job copies it under the GIL)."""
    cipher = BlockCipher(KEY, DISK_ID, 9)
    buf = bytearray(plaintext(256))

    async def go() -> None:
        pool = AeadPool(1)
        try:
            jobs = [asyncio.ensure_future(pool.seal(cipher, 0, 1, memoryview(buf))) for _ in range(8)]
            await asyncio.sleep(0)
            for job in jobs:
                job.cancel()
            buf[:] = bytes(len(buf))  # the caller's buffer, reused
            ct, leaves = await pool.seal(cipher, 0, 1, buf)
            assert await pool.open(cipher, 0, ct, leaves) == (bytes(len(buf)), [])
        finally:
            await pool.close()
        assert all(j.cancelled() or j.done() for j in jobs)
    run(go())


def test_threads_are_gone_after_close() -> None:
    async def go() -> None:
        pool = AeadPool(2)
        await pool.seal(BlockCipher(KEY, DISK_ID), 0, 1, plaintext(64))
        assert any(t.name.startswith("trustvbd-aead") for t in threading.enumerate())
        await pool.close()
        assert not any(t.name.startswith("trustvbd-aead") for t in threading.enumerate())
    run(go())


def test_crypt_disk_with_threads_reads_writes_and_catches_tampering(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        replica = make_replica("memory", tmp_path)
        pool = AeadPool(1)
        try:
            events: list[dict] = []
            disk = await open_disk(tmp_path, replica, kek, events=events, aead=pool)
            data = os.urandom(512 * BS)
            await disk.pwrite(0, data)
            piece = 64 * BS
            await asyncio.gather(*(disk.pwrite(at, data[at:at + piece]) for at in range(0, len(data), piece)))
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
        finally:
            await pool.close()
    run(go())


def test_thread_count_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTVBD_AEAD_THREADS", "3")
    assert aead_pool.default_threads() == 3
    monkeypatch.setenv("TRUSTVBD_AEAD_THREADS", "0")
    assert aead_pool.default_threads() == 0
    for bad in ("x", "-1", "65"):
        monkeypatch.setenv("TRUSTVBD_AEAD_THREADS", bad)
        with pytest.raises(ValueError, match="TRUSTVBD_AEAD_THREADS"):
            aead_pool.default_threads()
    monkeypatch.delenv("TRUSTVBD_AEAD_THREADS")
    assert aead_pool.default_threads() == max(0, min(4, (os.cpu_count() or 1) - 2))
