"""Failed replica writes, auto-commit, explicit mid-commit deaths, primitives."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.crypt.helpers import (
    BS,
    LAY,
    SIZE,
    FailingWrites,
    RawMemory,
    Unclosing,
    new_state,
    open_disk,
    pattern,
    run,
)
from trustvbd.blockdev import BlockError
from trustvbd.blocks import crypt_commit, intent_log
from trustvbd.blocks.crypt_layer import CryptDisk, physical_size
from trustvbd.blocks.disk_state import DiskState
from trustvbd.crypt.aead import BlockCipher
from trustvbd.crypt.tree import HashTree, page_hash, root_from_level


@pytest.mark.parametrize("behind", [False, True], ids=["waited", "behind"])
@pytest.mark.parametrize("lands", [False, True])
def test_failed_replica_write_reads_old_or_new_never_tampered(tmp_path: Path, lands: bool,
                                                              behind: bool) -> None:
    """An honest driver that fails a write (having stored it or not) is no attacker. A FUA
    write fails itself; one answered before the replica (write_behind.py) reads as EIO
    until the next FLUSH fails naming its blocks."""

    async def go() -> None:
        kek = new_state(tmp_path)
        mem = RawMemory(physical_size(SIZE))
        failing = FailingWrites(Unclosing(mem))
        disk = await CryptDisk.open(tmp_path, "vm1", failing, "r0", kek)
        await disk.pwrite(0, pattern(0) + pattern(1))
        await disk.flush()

        def fail(offset: int, length: int) -> bool:
            return offset >= LAY.data_start

        failing.failing = fail
        failing.store_anyway = lands
        if behind:
            await disk.pwrite(0, pattern(0, 2) + pattern(1, 2))
            with pytest.raises(BlockError, match=r"block\(s\) 1 lost a write"):
                await disk.pread(BS, BS)
            failing.failing = lambda offset, length: False
            with pytest.raises(BlockError, match=r"block\(s\) 0-1 were answered, then failed "
                               r"on the replicas \(driver write failed\)") as exc:
                await disk.flush()
            assert exc.value.errno == 5
        else:
            with pytest.raises(BlockError):
                await disk.pwrite(0, pattern(0, 2) + pattern(1, 2), fua=True)
        failing.failing = lambda offset, length: False
        got = bytes(await disk.pread(0, 2 * BS))
        assert got == (pattern(0, 2) + pattern(1, 2) if lands else pattern(0) + pattern(1))
        assert disk.integrity_events == 0
        await disk.flush()
        await disk.close()
        disk = await CryptDisk.open(tmp_path, "vm1", Unclosing(mem), "r0", kek)
        assert bytes(await disk.pread(0, 2 * BS)) == got
        await disk.close()

    run(go())


@pytest.mark.parametrize("lands", [[False, False], [True, False], [False, True]])
def test_repeated_failed_writes_keep_every_candidate(tmp_path: Path, lands: list[bool]) -> None:
    """Two failed writes in a row to one block: the replica may hold the committed data or
    either attempt, and each must still read (found by nbdkit's error filter end to end)."""

    async def go() -> None:
        kek = new_state(tmp_path)
        mem = RawMemory(physical_size(SIZE))
        failing = FailingWrites(Unclosing(mem))
        disk = await CryptDisk.open(tmp_path, "vm1", failing, "r0", kek)
        await disk.pwrite(0, pattern(0))
        await disk.flush()
        failing.failing = lambda offset, length: offset >= LAY.data_start
        for attempt, store in enumerate(lands, start=1):
            failing.store_anyway = store
            with pytest.raises(BlockError):
                await disk.pwrite(0, pattern(0, attempt), fua=True)
        failing.failing = lambda offset, length: False
        stored = max((i for i, store in enumerate(lands, start=1) if store), default=0)
        assert bytes(await disk.pread(0, BS)) == pattern(0, stored)
        assert disk.integrity_events == 0
        await disk.close()

    run(go())


def test_auto_commit_bounds_the_intent_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypt_commit, "AUTO_COMMIT_BLOCKS", 64)

    async def go() -> None:
        kek = new_state(tmp_path)
        mem = RawMemory(physical_size(SIZE))
        disk = await open_disk(tmp_path, mem, kek)
        start = disk.epoch
        for b in range(0, 256, 16):
            await disk.pwrite(b * BS, pattern(b) * 16)
        assert disk.epoch >= start + 3  # committed on its own, without a FLUSH
        log = DiskState(tmp_path, "vm1").open_intent()
        try:
            assert log.end < 64 * 64 + 4096  # the records; the zeroed room after them is fixed
            assert os.path.getsize(log.path) == intent_log.LOG_ROOM
        finally:
            log.close()
        await disk.close()

    run(go())


@pytest.mark.parametrize("die_at", ["before replica flush", "after replica flush", "before anchor",
                                    "after anchor"])
def test_death_mid_commit(tmp_path: Path, die_at: str, monkeypatch: pytest.MonkeyPatch) -> None:
    class Died(Exception):
        pass

    async def go() -> None:
        kek = new_state(tmp_path)
        mem = RawMemory(physical_size(SIZE))
        disk = await open_disk(tmp_path, mem, kek)
        await disk.pwrite(0, pattern(0) * 200)
        await disk.commit()
        await disk.pwrite(100 * BS, pattern(7) * 100)  # dirties leaf pages 0 and 1
        flushes = 0
        real_flush = mem.flush

        async def flush() -> None:  # one replica flush per commit, after leaf pages and superblock
            nonlocal flushes
            flushes += 1
            if die_at == "before replica flush":
                raise Died
            await real_flush()
            if die_at == "after replica flush":
                raise Died

        real_anchor = DiskState.write_anchor

        def anchor(self: DiskState, a: Any) -> None:
            if die_at == "before anchor":
                raise Died
            real_anchor(self, a)
            if die_at == "after anchor":
                raise Died

        monkeypatch.setattr(mem, "flush", flush)
        monkeypatch.setattr(DiskState, "write_anchor", anchor)
        epoch = disk.epoch
        with pytest.raises(Died):
            await disk.commit()
        disk._state.close()  # the domain is gone
        disk._commits.tree.close()
        monkeypatch.undo()
        disk = await open_disk(tmp_path, mem, kek)
        assert disk.integrity_events == 0
        assert disk.epoch == (epoch + 2 if die_at == "after anchor" else epoch + 1)
        got = bytes(await disk.pread(0, 200 * BS))
        assert got == pattern(0) * 100 + pattern(7) * 100  # flushed data was durable anyway
        await disk.close()

    run(go())


@settings(max_examples=40, deadline=None)
@given(pages=st.integers(1, 70), changes=st.lists(st.tuples(st.integers(0, 69), st.binary(
    min_size=32, max_size=32)), max_size=12))
def test_tree_update_equals_rebuild(pages: int, changes: list[tuple[int, bytes]]) -> None:
    hashes = bytearray(b"".join(page_hash(i, bytes([i]) * 4096) for i in range(pages)))
    tree = HashTree(hashes)
    assert tree.root == root_from_level(hashes, 0)
    upd = {i % pages: h for i, h in changes}
    tree.update(upd)
    for i, h in upd.items():
        hashes[i * 32:(i + 1) * 32] = h
    assert tree.root == HashTree(hashes).root == root_from_level(hashes, 0)
    depth, top = tree.top()
    assert len(top) // 32 <= 64 and root_from_level(top, depth) == tree.root


def test_block_cipher_binds_block_version_and_disk() -> None:
    key, disk_id = os.urandom(32), os.urandom(16)
    c = BlockCipher(key, disk_id)
    plain = os.urandom(3 * BS)
    ct, leaves = c.seal(10, 500, memoryview(plain))
    assert c.open(10, ct, leaves) == (plain, [])
    assert c.open(11, ct, leaves)[1] == [0, 1, 2]  # moved
    assert BlockCipher(key, os.urandom(16)).open(10, ct, leaves)[1] == [0, 1, 2]
    bumped = bytearray(leaves)
    bumped[7] ^= 1  # another version
    dec, bad = c.open(10, ct, bumped)
    assert bad == [0] and c.bad_blocks(10, ct, bumped) == [0]
    assert dec[:BS] == bytes(BS) and dec[BS:] == plain[BS:]  # failed output is zeros, not partial plaintext
    zero = bytearray(leaves)
    zero[32:64] = bytes(32)
    dec, bad = c.open(10, ct, zero)
    assert bad == [] and dec[BS:2 * BS] == bytes(BS)
    for version in (1, 12345):  # AES-256-GCM, nonce = version || 0, AAD = disk id || block || version
        ct, leaf = c.seal(40, version, memoryview(plain)[:BS])
        assert leaf[:8] == version.to_bytes(8, "big") and leaf[24:] == bytes(8)
        aad = disk_id + (40).to_bytes(8, "big") + version.to_bytes(8, "big")
        assert AESGCM(key).decrypt(version.to_bytes(8, "big") + bytes(4), ct + leaf[8:24], aad) == plain[:BS]
