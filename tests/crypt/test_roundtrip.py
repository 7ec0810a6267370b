"""Round trips, TRIM/WRITE_ZEROES, confidentiality and concurrency on Memory and File replicas."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.crypt.helpers import (
    BS,
    SIZE,
    Recording,
    Unclosing,
    make_replica,
    new_state,
    open_disk,
    pattern,
    replica_bytes,
    run,
)
from trustvbd.blocks.crypt_layer import CryptDisk, Layout
from trustvbd.blocks.layer import Layer

KINDS = ["memory", "file"]
SENTENCE = b"The payroll of Ms. Example is 123,456 a year; keep it secret. "


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_survives_reopen(tmp_path: Path, kind: str) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        replica = make_replica(kind, tmp_path)
        disk = await open_disk(tmp_path, replica, kek)
        assert disk.size == SIZE and disk.epoch == 1
        assert bytes(await disk.pread(0, SIZE)) == bytes(SIZE)  # never written: zeros
        data = {b: pattern(b) for b in (0, 1, 2, 127, 128, 300, 511)}
        for b, d in data.items():
            await disk.pwrite(b * BS, d)
        await disk.pwrite(3 * BS, pattern(3) * 5)  # multi-block, crossing nothing special
        await disk.pwrite(126 * BS, pattern(9) * 4)  # crosses a leaf page boundary
        assert bytes(await disk.pread(126 * BS, 4 * BS)) == pattern(9) * 4
        await disk.pwrite(1000, b"unaligned bytes")  # read-modify-write inside block 0
        expect = bytearray(data[0])
        expect[1000:1015] = b"unaligned bytes"
        assert bytes(await disk.pread(0, BS)) == expect
        await disk.pwrite(BS * 3 - 10, b"x" * 20)  # RMW straddling blocks 2 and 3
        got = bytes(await disk.pread(BS * 2, 2 * BS))
        assert got[BS - 10:BS + 10] == b"x" * 20
        assert got[:BS - 10] == data[2][:BS - 10]
        await disk.commit()
        epoch = disk.epoch
        snapshot = bytes(await disk.pread(0, SIZE))
        await disk.close()

        disk = await open_disk(tmp_path, replica, kek)
        assert disk.epoch == epoch + 1  # every open commits a new epoch
        assert bytes(await disk.pread(0, SIZE)) == snapshot
        assert bytes(await disk.pread(511 * BS, BS)) == data[511]
        assert disk.integrity_events == 0
        await disk.close()
        await replica.close()

    run(go())


@pytest.mark.parametrize("kind", KINDS)
def test_trim_and_write_zeroes(tmp_path: Path, kind: str) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        replica = make_replica(kind, tmp_path)
        disk = await open_disk(tmp_path, replica, kek)
        full = b"".join(pattern(b) for b in range(16))
        await disk.pwrite(0, full)
        await disk.trim(2 * BS, 3 * BS)  # whole blocks 2-4
        await disk.zero(8 * BS + 100, 2 * BS)  # partial 8, whole 9, partial 10
        await disk.zero(12 * BS, 2 * BS, fast=True)  # fast zero is always available
        await disk.trim(15 * BS + 5, 10)  # inside one block: rewritten with zeros
        expect = bytearray(full)
        expect[2 * BS:5 * BS] = bytes(3 * BS)
        expect[8 * BS + 100:10 * BS + 100] = bytes(2 * BS)
        expect[12 * BS:14 * BS] = bytes(2 * BS)
        expect[15 * BS + 5:15 * BS + 15] = bytes(10)
        assert bytes(await disk.pread(0, 16 * BS)) == expect
        await disk.flush()
        await disk.close()
        disk = await open_disk(tmp_path, replica, kek)
        assert bytes(await disk.pread(0, 16 * BS)) == expect
        # Zeroed whole blocks are version 0: no replica read at all.
        assert disk._leaves.get(9, 10) == bytes(32)
        await disk.zero(0, SIZE)
        assert bytes(await disk.pread(0, SIZE)) == bytes(SIZE)
        await disk.close()
        await replica.close()

    run(go())


@pytest.mark.parametrize("kind", KINDS)
def test_driver_sees_no_plaintext_name_or_keys(tmp_path: Path, kind: str) -> None:
    async def go() -> None:
        kek = new_state(tmp_path, name="payroll-secret")
        replica = make_replica(kind, tmp_path)
        disk = await open_disk(tmp_path, replica, kek, name="payroll-secret")
        text = (SENTENCE * (SIZE // len(SENTENCE) + 1))[:SIZE]
        await disk.pwrite(0, text)
        await disk.pwrite(7, SENTENCE)  # and an unaligned one
        await disk.flush()
        await disk.close()
        stored = bytes(replica_bytes(replica))
        secrets_ = [SENTENCE[:16], SENTENCE[30:46], b"payroll-secret", b"payroll"]
        secrets_.append((tmp_path / "kek.key").read_bytes()[:12])
        keys = (tmp_path / "disks" / "payroll-secret" / "keys").read_bytes()
        secrets_.append(keys[-60:-40])  # a slice of a wrapped key
        for needle in secrets_:
            assert needle not in stored
        # Equal plaintext blocks never give equal ciphertext.
        lay = Layout(SIZE)
        blocks = {stored[lay.data_offset(b):lay.data_offset(b) + BS] for b in range(512)}
        assert len(blocks) == 512
        await replica.close()

    run(go())


def test_flush_writes_only_dirty_leaf_pages_and_one_superblock(tmp_path: Path) -> None:
    """A FLUSH lets the intent log stand for a commit: the replica flushes, no leaf page or
    superblock is written; a commit writes only the dirty leaf pages and one superblock."""

    async def go() -> None:
        kek = new_state(tmp_path)
        lay = Layout(SIZE)
        rec = Recording(make_replica("memory", tmp_path), lay)
        disk = await CryptDisk.open(tmp_path, "vm1", rec, "r0", kek)
        rec.meta_writes.clear()
        rec.data_bytes = 0
        data = pattern(1) * 64  # 256 KiB: blocks 0-63, leaf page 0
        await disk.pwrite(0, data)
        await disk.pwrite(200 * BS, pattern(2) * 4)  # leaf page 1
        flushes, epoch = rec.flushes, disk.epoch
        await disk.flush()
        assert rec.data_bytes == len(data) + 4 * BS  # data once: no journal, no copy
        assert rec.meta_writes == [] and rec.flushes == flushes + 1 and disk.epoch == epoch
        await disk.commit()
        assert disk.epoch == epoch + 1
        meta = sorted(rec.meta_writes)
        pages = [(o, n) for o, n in meta if o >= lay.leaf_start]
        supers = [(o, n) for o, n in meta if o < lay.leaf_start]
        assert sum(n for _, n in pages) == 2 * BS and len(supers) == 1 and supers[0][1] == BS
        # A flush with nothing new writes nothing.
        rec.meta_writes.clear()
        flushes = rec.flushes
        await disk.flush()
        assert rec.meta_writes == [] and rec.flushes == flushes
        # FUA: the log stands for a commit too.
        await disk.pwrite(400 * BS, pattern(3), fua=True)
        assert rec.meta_writes == [] and rec.flushes == flushes + 1
        await disk.close()  # a close commits
        assert sum(n for _, n in rec.meta_writes) == 2 * BS  # one leaf page + one superblock

    run(go())


class Jitter(Layer):
    """Delays every replica call a little, so concurrent requests interleave."""

    def __init__(self, next, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
        super().__init__(next)
        self.rng = rng

    async def pread(self, offset, length):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.rng.random() * 0.002)
        data = await self.next.pread(offset, length)
        await asyncio.sleep(self.rng.random() * 0.002)
        return data

    async def pwrite(self, offset, data, fua=False):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.rng.random() * 0.002)
        data = bytes(data)
        await self.next.pwrite(offset, data, fua)


def test_concurrent_overlapping_requests_never_look_tampered(tmp_path: Path) -> None:
    """Reads racing writes (and commits) see old or new data, never an integrity error."""

    async def go() -> None:
        kek = new_state(tmp_path)
        rng = random.Random(7)
        replica = Jitter(Unclosing(make_replica("memory", tmp_path)), rng)
        disk = await CryptDisk.open(tmp_path, "vm1", replica, "r0", kek)
        nblocks = 24
        written: dict[int, set[bytes]] = {b: {bytes(BS)} for b in range(nblocks)}

        async def writer(i: int) -> None:
            b = rng.randrange(nblocks - 3)
            n = rng.choice([1, 2, 3])
            data = b"".join(pattern(b + k, i) for k in range(n))
            for k in range(n):
                written[b + k].add(data[k * BS:(k + 1) * BS])
            await disk.pwrite(b * BS, data, fua=rng.random() < 0.1)

        async def reader() -> None:
            b = rng.randrange(nblocks - 2)
            got = bytes(await disk.pread(b * BS, 2 * BS))
            for k in range(2):
                assert got[k * BS:(k + 1) * BS] in written[b + k]

        async def flusher() -> None:
            await disk.flush()

        tasks = []
        for i in range(300):
            r = rng.random()
            tasks.append(writer(i) if r < 0.45 else flusher() if r < 0.5 else reader())
        await asyncio.gather(*tasks)
        final = bytes(await disk.pread(0, nblocks * BS))
        await disk.close()
        assert disk.integrity_events == 0
        disk = await CryptDisk.open(tmp_path, "vm1", replica, "r0", kek)
        assert bytes(await disk.pread(0, nblocks * BS)) == final
        await disk.close()

    run(go())
