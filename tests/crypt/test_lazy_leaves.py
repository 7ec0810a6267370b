"""Terabyte disks (#12.2): leaf pages on demand, a bounded cache, a tree file checked as loaded.

The replica of the 16 TiB disk is a sparse in-memory Backend (pages kept in a
dict), so only what is written costs memory; the trusted state is real files.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.crypt.helpers import (
    BS,
    RawMemory,
    make_replica,
    new_state,
    open_disk,
    pattern,
    run,
)
from trustvbd.blockdev import BlockError, Buffer, Capabilities, check_range
from trustvbd.blocks.crypt_layer import IntegrityError, Layout, TrustedStateError
from trustvbd.blocks.disk_state import DiskState, load_kek
from trustvbd.blocks.tree_file import HEADER_SIZE, file_size

TIB = 1 << 40


class SparseMemory:
    """A Backend whose unwritten 4 KiB pages read as zeros and cost nothing."""

    def __init__(self, size: int) -> None:
        self._size = size
        self.pages: dict[int, bytes] = {}
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(fast_zero=True)

    async def pread(self, offset: int, length: int) -> Buffer:
        check_range(self._size, offset, length)
        self.reads.append((offset, length))
        out = bytearray(length)
        for page in range(offset // BS, -(-(offset + length) // BS)):
            data = self.pages.get(page)
            if data is not None:
                lo = max(offset, page * BS)
                hi = min(offset + length, (page + 1) * BS)
                out[lo - offset:hi - offset] = data[lo - page * BS:hi - page * BS]
        return out

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        check_range(self._size, offset, len(data))
        view = memoryview(data).cast("B")
        for page in range(offset // BS, -(-(offset + len(view)) // BS)):
            cur = bytearray(self.pages.get(page, bytes(BS)))
            lo = max(offset, page * BS)
            hi = min(offset + len(view), (page + 1) * BS)
            cur[lo - page * BS:hi - page * BS] = view[lo - offset:hi - offset]
            self.pages[page] = bytes(cur)

    async def flush(self) -> None:
        pass

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        pass

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
                   fast: bool = False) -> None:
        await self.pwrite(offset, bytes(length))

    async def cache(self, offset: int, length: int) -> None:
        pass

    async def close(self) -> None:
        pass


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_16_tib_disk_is_made_and_opened_with_memory_independent_of_its_size(tmp_path: Path) -> None:
    size = 16 * TIB
    lay = Layout(size)
    replica = SparseMemory(lay.physical_size)
    rng = random.Random(16)
    blocks = sorted({rng.randrange(lay.blocks) for _ in range(60)} | {0, lay.blocks - 1})
    before = _rss()

    async def go() -> None:
        kek = new_state(tmp_path, size=size)
        disk = await open_disk(tmp_path, replica, kek)
        for b in blocks:
            await disk.pwrite(b * BS, pattern(b))
        await disk.flush()
        await disk.close()
        disk = await open_disk(tmp_path, replica, kek)  # the restart
        assert disk._leaves.resident() == 0  # an orderly close: nothing read at open
        for b in blocks:
            assert bytes(await disk.pread(b * BS, BS)) == pattern(b)
        assert bytes(await disk.pread((blocks[1] + 1) * BS, BS)) == bytes(BS) or blocks[2] == blocks[1] + 1
        await disk.close()

    run(go())
    growth = _rss() - before
    # The whole-table design needed 128 GiB of leaves and 2 GiB of tree for this disk.
    assert growth < 96 << 20, f"RSS grew by {growth >> 20} MiB"
    tree = DiskState(tmp_path, "vm1").tree_path
    assert tree.stat().st_size == file_size(lay.leaf_pages) > 2 << 30  # every level has room
    assert tree.stat().st_blocks * 512 < 32 << 20  # a hole but for the paths written
    assert len(replica.pages) < 2 * len(blocks) + 8  # leaf pages and data blocks written, no more


def test_a_small_cache_evicts_and_every_block_reads_back(tmp_path: Path) -> None:
    """64 leaf pages through a 4-page cache: pages come and go, changed ones are committed
    before they may go, and every block reads what was written, before and after a restart."""
    size = 64 * 128 * BS
    lay = Layout(size)
    rng = random.Random(4)
    model: dict[int, bytes] = {}

    async def go() -> None:
        kek = new_state(tmp_path, size=size)
        replica = make_replica("memory", tmp_path, size)
        disk = await open_disk(tmp_path, replica, kek, leaf_cache_pages=4)
        leaves = disk._leaves
        for i in range(400):
            b = rng.randrange(lay.blocks)
            n = min(rng.choice([1, 2, 200]), lay.blocks - b)
            if rng.random() < 0.6:
                data = b"".join(pattern(x, i) for x in range(b, b + n))
                await disk.pwrite(b * BS, data)
                for x in range(b, b + n):
                    model[x] = pattern(x, i)
            else:
                got = bytes(await disk.pread(b * BS, n * BS))
                want = b"".join(model.get(x, bytes(BS)) for x in range(b, b + n))
                assert got == want, f"blocks {b}+{n} after step {i}"
            # The bound: the cache, plus the pages of the one request in flight.
            assert leaves.resident() <= leaves.capacity + 2, leaves.resident()
            assert leaves.dirty_count <= leaves.capacity // 2 + 2
        assert leaves.evictions > 50 and leaves.loads > 50
        await disk.close()
        disk = await open_disk(tmp_path, replica, kek, leaf_cache_pages=4)
        for b in range(0, lay.blocks, 97):
            assert bytes(await disk.pread(b * BS, BS)) == model.get(b, bytes(BS))
        await disk.close()

    run(go())


def _written(tmp_path: Path, replica: RawMemory | SparseMemory, size: int, blocks: list[int]) -> None:
    async def go() -> None:
        disk = await open_disk(tmp_path, replica, new_state(tmp_path, size=size))
        for b in blocks:
            await disk.pwrite(b * BS, pattern(b))
        await disk.close()
    run(go())


def test_a_tampered_page_loaded_on_demand_fails_exactly_its_blocks(tmp_path: Path) -> None:
    size = 8 * 128 * BS
    lay = Layout(size)
    replica = RawMemory(lay.physical_size)
    _written(tmp_path, replica, size, [5, 5 * 128 + 3, 6 * 128])
    replica.raw[lay.leaf_page_offset(5) + 3 * 32 + 9] ^= 0x40  # block 643's tag, on page 5
    events: list[dict] = []

    async def go() -> None:
        disk = await open_disk(tmp_path, replica, load_kek(tmp_path), events=events)
        assert disk.integrity_events == 0  # not looked at yet: open read no leaf page
        assert bytes(await disk.pread(5 * BS, BS)) == pattern(5)
        with pytest.raises(IntegrityError) as err:
            await disk.pread((5 * 128 + 3) * BS, BS)
        assert err.value.blocks == [643]
        with pytest.raises(IntegrityError):
            await disk.pread(5 * 128 * BS, BS)  # every leaf of the page is in doubt
        assert bytes(await disk.pread(6 * 128 * BS, BS)) == pattern(6 * 128)
        await disk.close()

    run(go())
    leaf_events = [e for e in events if e["what"] == "leaf table"]
    assert len(leaf_events) == 1 and leaf_events[0]["blocks"] == list(range(640, 768))
    assert "leaf page 5 of replica 'r0' of disk 'vm1' was altered; blocks 640-767" in \
        leaf_events[0]["message"]


def test_a_tampered_or_rolled_back_tree_file_is_detected(tmp_path: Path) -> None:
    size = 256 * 128 * BS  # the superblock carries level 2 (64 nodes), not the pages
    lay = Layout(size)
    replica = SparseMemory(lay.physical_size)
    _written(tmp_path, replica, size, [2 * 128])
    state = DiskState(tmp_path, "vm1")
    old_tree = state.tree_path.read_bytes()

    async def write_more() -> None:
        disk = await open_disk(tmp_path, replica, load_kek(tmp_path))
        await disk.pwrite(7 * 128 * BS, pattern(7))
        await disk.close()
    run(write_more())
    good_tree = state.tree_path.read_bytes()

    # A node of the file altered: the blocks under it fail, named; others read.
    bad = bytearray(good_tree)
    bad[HEADER_SIZE + 2 * 32] ^= 1  # page 2's hash
    state.tree_path.write_bytes(bad)

    async def read_back() -> None:
        disk = await open_disk(tmp_path, replica, load_kek(tmp_path))
        with pytest.raises(BlockError) as err:
            await disk.pread(2 * 128 * BS, BS)
        assert "disk 'vm1': the trusted tree file" in str(err.value)
        assert "blocks 256-511 cannot be verified" in str(err.value)
        assert bytes(await disk.pread(7 * 128 * BS, BS)) == pattern(7)
        await disk.close()
    run(read_back())

    # The whole file rolled back to an older (clean) copy: refused at open.
    state.tree_path.write_bytes(old_tree)
    with pytest.raises(TrustedStateError, match="does not hash to the anchor's root"):
        run(open_disk(tmp_path, replica, load_kek(tmp_path)))


def test_after_a_crash_the_tree_file_is_repaired_from_the_intent_log(tmp_path: Path) -> None:
    """Tree nodes reach the file after the anchor and without fsync: a power cut can lose
    them. The intent log carries the page hashes, so the reopen re-hashes only those
    paths, reads only the leaf pages the log names, and everything reads back."""
    size = 64 * 128 * BS
    lay = Layout(size)
    replica = SparseMemory(lay.physical_size)
    state = DiskState(tmp_path, "vm1")
    blocks = [3, 9 * 128, 40 * 128 + 7, 63 * 128]

    async def crash() -> None:
        disk = await open_disk(tmp_path, replica, new_state(tmp_path, size=size))
        before = state.tree_path.read_bytes()
        for b in blocks:
            await disk.pwrite(b * BS, pattern(b))
        await disk.commit()
        await disk.pwrite(20 * 128 * BS, pattern(20))  # not flushed: the log names it
        await disk.settle()  # sent to the replica, so its intent record was written first
        # The power cut: the tree file's unsynced writes are lost, the process is gone.
        state.tree_path.write_bytes(before)
        disk._commits.tree.close()
        disk._state.close()

    async def reopen() -> None:
        replica.reads.clear()
        disk = await open_disk(tmp_path, replica, load_kek(tmp_path))
        leaf_reads = [o for o, _ in replica.reads if lay.leaf_start <= o < lay.data_start]
        assert leaf_reads == [lay.leaf_page_offset(20)]  # the logged page only
        for b in blocks:
            assert bytes(await disk.pread(b * BS, BS)) == pattern(b)
        assert bytes(await disk.pread(20 * 128 * BS, BS)) in (pattern(20), bytes(BS))
        await disk.close()

    run(crash())
    run(reopen())


def test_a_format_1_disk_is_refused_with_what_to_do(tmp_path: Path) -> None:
    new_state(tmp_path)
    state = DiskState(tmp_path, "vm1")
    shutil.move(state.tree_path, state.old_pages_path)  # as format 1 left it
    with pytest.raises(TrustedStateError, match=r"format 1 .* reads format 2 only and does not migrate"):
        run(open_disk(tmp_path, make_replica("memory", tmp_path), load_kek(tmp_path)))
    assert os.path.exists(state.old_pages_path)  # nothing changed


def test_a_page_changed_during_its_commit_stays_for_the_next(tmp_path: Path) -> None:
    """A read may adopt an older leaf (after a failed replica write) while a commit is
    writing that page: the page must stay changed, or its eviction would lose it."""
    size = 4 * 128 * BS

    async def go() -> None:
        disk = await open_disk(tmp_path, make_replica("memory", tmp_path, size),
                               new_state(tmp_path, size=size))
        await disk.pwrite(0, pattern(0))
        leaves = disk._leaves
        snapshot = leaves.dirty_pages()  # what a commit takes
        assert list(snapshot) == [0]
        leaves.set(1, leaves.get(0, 1))  # changed meanwhile
        leaves.committed(snapshot)
        assert leaves.dirty_pages() == {0: snapshot[0] + 1}
        await disk.commit()
        assert leaves.dirty_count == 0
        await disk.close()

    run(go())


def test_a_request_over_more_pages_than_the_cache_holds_completes(tmp_path: Path) -> None:
    """A request's leaf pages are pinned while it runs, so a request spanning more pages
    than the cache holds (a 32 MiB part of an unaligned request spans 65; the smallest
    leaf_cache allowed is 64 pages) grows the cache past its bound for its duration. It
    used to loop forever: each page it loaded, inserted into a cache whose every other page
    was pinned, was evicted again at once, before it could be pinned, and loaded again
    (red team: a 32 MiB read with leaf_cache = "256KiB" spun the encryption domain at
    full CPU, and `up` could not stop)."""
    size = 64 * 128 * BS
    lay = Layout(size)

    async def go() -> None:
        kek = new_state(tmp_path, size=size)
        replica = make_replica("memory", tmp_path, size)
        disk = await open_disk(tmp_path, replica, kek, leaf_cache_pages=4)
        data = b"".join(pattern(b) for b in range(lay.blocks))
        await disk.pwrite(0, data)
        await disk.close()
        disk = await open_disk(tmp_path, replica, kek, leaf_cache_pages=4)
        leaves = disk._leaves
        b0, n = 100, 6 * 128  # 7 leaf pages, the cache holds 4
        got = await asyncio.wait_for(disk.pread(b0 * BS, n * BS), 10)
        assert bytes(got) == data[b0 * BS:(b0 + n) * BS]
        await asyncio.wait_for(disk.pwrite(b0 * BS, data[:n * BS]), 10)
        assert leaves.resident() <= leaves.capacity + 8, leaves.resident()
        await disk.close()
        disk = await open_disk(tmp_path, replica, kek, leaf_cache_pages=4)
        assert bytes(await disk.pread(b0 * BS, n * BS)) == data[:n * BS]
        await disk.close()

    run(go())
