"""What a replica that is behind lacks (its dirty map, blocks/block_runs.py): bounded by a
cap past which it coarsens yet misses nothing, kept across a restart together with the
blocks a driver rolled back within an epoch may lack, and resynced from whichever
replica can serve, a failing source being charged for its own failure."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from tests.crypt.helpers import BS, LAY, new_state, pattern, run
from tests.crypt.test_mirror import NBLOCKS, Faulty, data_areas, fill, memories, open_set, settle
from trustvbd.blockdev import Backend, BlockError, Buffer
from trustvbd.blocks import block_runs
from trustvbd.blocks.disk_state import DiskState, Member
from trustvbd.blocks.replica import State


async def until(cond: object, what: str, tries: int = 3000) -> None:
    for _ in range(tries):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never: {what}")


def test_scattered_writes_past_the_cap_coarsen_the_map_yet_the_resync_is_exact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for 8 runs, 150 scattered single-block writes while a replica is away:
    its map (in memory and stored) stays within 8 runs, takes in blocks never written,
    and after a restart the resync copies every block written (and the extra ones,
    verified), so both replicas end byte-identical and the one resynced serves alone."""
    monkeypatch.setattr(block_runs, "MAX_RUNS", 8)

    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        links = [Faulty(m) for m in mems]
        disk = await open_set(tmp_path, kek, list(links))
        data = bytearray(await fill(disk))
        await disk.close()  # a full commit: nothing written since it when r1 leaves
        disk = await open_set(tmp_path, kek, list(links))
        links[1].fail_writes = True
        scattered = sorted(range(3, NBLOCKS, NBLOCKS // 150))[:150]
        for b in scattered:
            data[b * BS:(b + 1) * BS] = pattern(b, 9)
            await disk.pwrite(b * BS, pattern(b, 9))
        await disk.flush()
        r1 = disk.replicas.replicas[1]
        assert r1.state is State.DEGRADED and r1.dirty.run_count <= 8
        assert set(scattered) <= set(r1.dirty) and r1.dirty.coarsened > 0
        assert len(r1.dirty) > len(scattered)  # coarsened: blocks it does not lack, too
        await disk.close()
        stored = DiskState(tmp_path, "vm1").read_dirty_map("r1", NBLOCKS)
        assert stored is not None and set(scattered) <= set(stored[1])
        assert stored[1].run_count <= 8
        links[1].fail_writes = False
        disk = await open_set(tmp_path, kek, list(links))  # a restart of the domain
        await settle(disk)
        assert disk.replicas.replicas[1].resync_total >= len(scattered)
        await disk.close()
        areas = data_areas(mems)
        assert areas[0] == areas[1]
        links[0].fail_reads = True  # r1 alone must serve every block
        disk = await open_set(tmp_path, kek, list(links))
        assert bytes(await disk.pread(0, NBLOCKS * BS)) == data
        await disk.close()
    run(go())


def test_blocks_a_rolled_back_driver_may_lack_survive_a_restart(tmp_path: Path) -> None:
    """Blocks written since the last full commit are on a replica only as far as its
    driver kept them: one that comes back on a new connection with a copy from before
    them (same epoch: FLUSHes between full commits sync only the intent log) gets them
    again. That held within one run of the domain; now they are in the stored map, so a
    restart in between still resyncs them and the replica never serves them stale."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        links = [Faulty(m) for m in mems]
        disk = await open_set(tmp_path, kek, list(links))
        data = bytearray(await fill(disk))
        await disk.close()
        disk = await open_set(tmp_path, kek, list(links))
        before = bytes(mems[1].raw)  # the copy its driver will put back
        for b in range(10, 20):
            data[b * BS:(b + 1) * BS] = pattern(b, 2)
        await disk.pwrite(10 * BS, bytes(data[10 * BS:20 * BS]))
        await disk.flush()  # durable through the intent log: no full commit
        links[1].fail_writes = True
        data[50 * BS:51 * BS] = pattern(50, 3)
        await disk.pwrite(50 * BS, pattern(50, 3))
        await disk.flush()  # r1 left: a full commit, its map first
        await disk.close()
        state = DiskState(tmp_path, "vm1")
        assert state.read_anchor().member("r1") is Member.BEHIND
        stored = state.read_dirty_map("r1", NBLOCKS)
        assert stored is not None and set(stored[1]) == {*range(10, 20), 50}, stored
        mems[1].raw[:] = before  # its driver restarted on an old copy of the same epoch
        links[1].fail_writes = False
        disk = await open_set(tmp_path, kek, list(links))  # a restart of the domain
        await settle(disk)
        await disk.close()
        areas = data_areas(mems)
        assert areas[0] == areas[1], "the replica was taken back without the blocks it lacked"
        links[0].fail_reads = True
        disk = await open_set(tmp_path, kek, list(links))
        assert bytes(await disk.pread(0, NBLOCKS * BS)) == data
        await disk.close()
    run(go())


@pytest.mark.parametrize("copies", [2, 3])
def test_a_resync_source_that_fails_is_charged_and_the_resync_goes_on(
        tmp_path: Path, copies: int) -> None:
    """The replica a resync reads from fails its reads: that replica's last_error says
    so, not the resyncing one's. With another current replica the resync goes on from
    it; with none it waits (said in status) and finishes once the source reads again."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(copies)
        links = [Faulty(m) for m in mems]
        disk = await open_set(tmp_path, kek, list(links))
        data = bytearray(await fill(disk))
        await disk.close()
        disk = await open_set(tmp_path, kek, list(links))
        links[1].fail_writes = True
        for b in range(30, 60, 2):  # apart: one source read each, from current ones in turn
            data[b * BS:(b + 1) * BS] = pattern(b, 4)
            await disk.pwrite(b * BS, pattern(b, 4))
        await disk.flush()
        r0, r1 = disk.replicas.replicas[:2]
        assert r1.state is State.DEGRADED
        links[0].fail_reads = True  # the source (the only one, with 2 replicas)
        links[1].fail_writes = False
        if copies == 2:
            await until(lambda: r1.resync_waiting is not None, "the resync waits for a source")
            assert r1.state is State.RESYNCING and "injected read error" in r1.resync_waiting
            status = r1.status()
            assert "injected read error" in status["resync"]["waiting_for_source"]
            links[0].fail_reads = False
        await settle(disk)
        assert r1.resync_waiting is None and r1.state is State.CURRENT
        assert "injected read error" in str(r0.last_error), r0.status()
        assert "read" not in str(r1.last_error), r1.status()  # its own error: the write
        await disk.close()
        areas = data_areas(mems)
        assert all(a == areas[0] for a in areas)
        links[0].fail_reads = False
        disk = await open_set(tmp_path, kek, list(links))
        assert bytes(await disk.pread(0, NBLOCKS * BS)) == data
        await disk.close()
    run(go())


class Recording(Faulty):
    """Faulty, and the offsets of the writes it took."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.offsets: list[tuple[int, int]] = []

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await super().pwrite(offset, data, fua)
        self.offsets.append((offset, len(data)))

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
                   fast: bool = False) -> None:
        await self.next.zero(offset, length, fua, may_trim, fast)
        self.offsets.append((offset, length))


def test_a_replica_joins_with_the_leaf_pages_it_missed_not_the_whole_table(tmp_path: Path) -> None:
    """Its joining commit sends the leaf pages of the blocks it missed, written or
    discarded while it was away (O(its map), not the whole table: 128 GiB at 16 TiB),
    and afterwards it alone serves every block, the discarded ones as zeros."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        recording = Recording(mems[1])
        links = [Faulty(mems[0]), recording]
        disk = await open_set(tmp_path, kek, list(links))
        data = bytearray(await fill(disk))  # every leaf page holds written leaves
        await disk.close()
        disk = await open_set(tmp_path, kek, list(links))
        links[1].fail_writes = True
        data[5 * BS:6 * BS] = pattern(5, 6)
        await disk.pwrite(5 * BS, pattern(5, 6))  # leaf page 0
        data[300 * BS:311 * BS] = bytes(11 * BS)
        await disk.zero(300 * BS, 11 * BS)  # leaf page 2: leaves only, no data sent
        await disk.flush()
        assert disk.replicas.replicas[1].state is State.DEGRADED
        recording.offsets.clear()
        links[1].fail_writes = False
        await settle(disk)
        table = range(LAY.leaf_page_offset(0), LAY.leaf_page_offset(LAY.leaf_pages))
        sent = {(off - table.start) // BS + i for off, n in recording.offsets
                if off in table for i in range(-(-n // BS))}
        assert sent == {0, 2}, sent
        await disk.close()
        links[0].fail_reads = True
        disk = await open_set(tmp_path, kek, list(links))
        assert bytes(await disk.pread(0, NBLOCKS * BS)) == data
        await disk.close()
    run(go())


def test_a_leaf_page_found_altered_on_a_replica_is_rewritten_when_it_rejoins(
        tmp_path: Path) -> None:
    """A joining replica gets the leaf pages it missed, not the whole table: a leaf page
    found altered on it (its driver lied) must be among them, or the replica would keep
    the bad page once current and, alone, fail the reads of those blocks."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        links = [Faulty(m) for m in mems]
        disk = await open_set(tmp_path, kek, list(links))
        data = await fill(disk)
        await disk.close()
        at = LAY.leaf_page_offset(3)
        mems[1].raw[at + 100] ^= 1  # r1's leaf page 3 (blocks 384-511)
        disk = await open_set(tmp_path, kek, list(links))
        assert bytes(await disk.pread(0, BS)) == data[:BS]  # page 0 from r0: the next from r1
        assert bytes(await disk.pread(400 * BS, BS)) == data[400 * BS:401 * BS]
        assert disk.replicas.replicas[1].state is not State.CURRENT, "r1's page was not read"
        await settle(disk)
        await disk.close()
        assert mems[1].raw[at:at + BS] == mems[0].raw[at:at + BS]
        links[0].fail_reads = True
        disk = await open_set(tmp_path, kek, list(links))
        assert bytes(await disk.pread(0, NBLOCKS * BS)) == data
        await disk.close()
    run(go())


def test_a_coarsened_run_over_terabytes_never_written_is_skipped_not_walked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a 16 TiB mirror, with room for 2 runs, writes at the start, the middle and the
    end coarsen the map into one run over the whole disk. The resync skips what may not
    be written (found from the tree) instead of walking 4 billion blocks 256 at a time
    (hours), and both replicas end holding the same written blocks."""
    from tests.crypt.test_lazy_leaves import SparseMemory
    from trustvbd.blocks.crypt_layer import Layout, physical_size

    class Holes(SparseMemory):
        """Zeroes are holes, as nbdkit file and memory make them (the join of a map
        coarsened over the whole disk zeroes the empty part of its leaf table)."""

        async def zero(self, offset: int, length: int, fua: bool = False,
                       may_trim: bool = False, fast: bool = False) -> None:
            assert offset % BS == 0 and length % BS == 0
            gone = [p for p in self.pages if offset // BS <= p < (offset + length) // BS]
            for p in gone:
                del self.pages[p]

    monkeypatch.setattr(block_runs, "MAX_RUNS", 2)
    size = 16 << 40
    lay = Layout(size)
    spots = [0, lay.blocks // 2, lay.blocks - 1]

    async def go(tmp: Path) -> None:
        kek = new_state(tmp, "vm1", size)
        mems = [Holes(physical_size(size)) for _ in range(2)]
        links = [Faulty(m) for m in mems]  # type: ignore[arg-type]
        disk = await open_set(tmp, kek, list(links))
        await disk.pwrite(BS, pattern(1))
        await disk.close()
        disk = await open_set(tmp, kek, list(links))
        links[1].fail_writes = True
        for b in spots:
            await disk.pwrite(b * BS, pattern(b, 5))
        await disk.flush()
        r1 = disk.replicas.replicas[1]
        assert r1.dirty.run_count <= 2 and len(r1.dirty) > lay.blocks // 2  # coarsened
        links[1].fail_writes = False
        await settle(disk, tries=20_000)
        await disk.close()
        for b in spots:
            at = lay.data_offset(b) // BS
            assert mems[1].pages.get(at) == mems[0].pages.get(at) is not None, b

    run(go(tmp_path))


class StallsWrites(Faulty):
    """Faulty, and once `allowed` is set, takes that many more writes, then stalls."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.allowed: int | None = None
        self.stalled = asyncio.Event()

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if self.allowed is not None and not self.fail_writes:
            if self.allowed == 0:
                self.stalled.set()
                await asyncio.Event().wait()  # never answered (the domain dies meanwhile)
            self.allowed -= 1
        await super().pwrite(offset, data, fua)


def test_a_rebuild_cut_short_by_a_crash_is_taken_up_again_not_refused(tmp_path: Path) -> None:
    """r1 comes back wiped and is rebuilt whole; the domain dies (no close, no commit)
    after the rebuild copied its first blocks. r1 now shows blank superblocks over our
    ciphertext (superblocks come last, at its join), which looks like data that is not
    ours: the stored map says it is being rebuilt (written when the rebuild started), so
    the next open rebuilds it again rather than refusing it for good as 'failed'."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        stalls = StallsWrites(mems[1])
        links = [Faulty(mems[0]), stalls]
        disk = await open_set(tmp_path, kek, list(links))
        data = bytearray(await fill(disk))
        await disk.close()
        disk = await open_set(tmp_path, kek, list(links))
        mems[1].raw[:] = bytes(len(mems[1].raw))  # its operator wiped it, and its driver
        stalls.fail_writes = True                 # fails writes for a while
        data[7 * BS:8 * BS] = pattern(7, 3)
        await disk.pwrite(7 * BS, pattern(7, 3))
        await disk.flush()  # r1 behind: its map, the anchor
        r1 = disk.replicas.replicas[1]
        assert r1.state is State.DEGRADED
        stalls.allowed = 1  # the rebuild's first copy lands, the second never ends
        stalls.fail_writes = False
        await asyncio.wait_for(stalls.stalled.wait(), 10)
        assert r1.whole_table and any(mems[1].raw[LAY.data_start:])
        stored = DiskState(tmp_path, "vm1").read_dirty_map("r1", NBLOCKS)
        assert stored is not None and stored.rebuilding, stored
        # The domain dies here: a new one opens the disk over the same drivers.
        links = [Faulty(mems[0]), Faulty(mems[1])]
        disk = await open_set(tmp_path, kek, list(links))
        r1 = disk.replicas.replicas[1]
        assert r1.state is not State.FAILED, r1.status()
        await settle(disk)
        await disk.close()
        assert DiskState(tmp_path, "vm1").read_dirty_map("r1", NBLOCKS) is None
        assert bytes(mems[0].raw) == bytes(mems[1].raw)
        links[0].fail_reads = True  # r1 alone serves every block
        disk = await open_set(tmp_path, kek, list(links))
        assert bytes(await disk.pread(0, NBLOCKS * BS)) == data
        await disk.close()
    run(go())


class LosesUnflushed(Faulty):
    """Faulty, and a driver whose writes are durable only once flushed: with `lose_at_flush`
    its next flush fails and every write since the last one is undone (a power cut under
    the driver's cache)."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.undo: list[tuple[int, bytes]] = []
        self.lose_at_flush = False

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        old = bytes(await self.next.pread(offset, len(data)))
        await super().pwrite(offset, data, fua)
        if not fua:
            self.undo.append((offset, old))

    async def flush(self) -> None:
        if self.lose_at_flush and not self.fail_writes:
            self.lose_at_flush = False
            for offset, old in reversed(self.undo):
                await self.next.pwrite(offset, old)
            self.undo.clear()
            raise BlockError(errno.EIO, "injected: the driver lost its cache")
        await super().flush()
        self.undo.clear()


def test_copies_a_driver_lost_before_the_resync_flushed_them_are_copied_again(
        tmp_path: Path) -> None:
    """r1's resync copies the blocks it missed, then its flush fails and its driver loses
    every write since its last flush (the copies too). r1 is degraded and taken back: the
    blocks copied but never flushed are dirty again, so they are copied again, and r1
    alone serves every block once current. Before, they were dropped from its dirty set
    when copied, and r1 joined without them (its reads of them failed verification)."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        loses = LosesUnflushed(mems[1])
        links = [Faulty(mems[0]), loses]
        disk = await open_set(tmp_path, kek, list(links))
        data = bytearray(await fill(disk))
        await disk.close()
        disk = await open_set(tmp_path, kek, list(links))
        loses.fail_writes = True
        for b in range(10, 20):
            data[b * BS:(b + 1) * BS] = pattern(b, 8)
        await disk.pwrite(10 * BS, bytes(data[10 * BS:20 * BS]))
        await disk.flush()
        r1 = disk.replicas.replicas[1]
        assert r1.state is State.DEGRADED and set(range(10, 20)) <= set(r1.dirty)
        loses.lose_at_flush = True
        loses.fail_writes = False
        await settle(disk)
        assert not loses.lose_at_flush, "the resync never flushed"
        await disk.close()
        areas = data_areas(mems)
        assert areas[0] == areas[1], "r1 joined without blocks its driver lost"
        links[0].fail_reads = True
        disk = await open_set(tmp_path, kek, list(links))
        assert bytes(await disk.pread(0, NBLOCKS * BS)) == data
        await disk.close()
    run(go())


def test_a_replica_that_left_before_a_discard_was_committed_gets_its_leaf_page(
        tmp_path: Path) -> None:
    """Blocks 300-310 are discarded (leaves only, nothing sent) while both replicas are
    current; r1 fails the FLUSH that follows, so the commit writes that leaf page to r0
    only. When r1 rejoins it must be sent that page: before, it got only the pages of the
    blocks written since the last commit (a discarded block is not 'written'), and after
    r0 was gone every block of that page was lost (the page on r1 no longer matched the
    trusted tree)."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        links = [Faulty(mems[0]), Faulty(mems[1])]
        disk = await open_set(tmp_path, kek, list(links))
        data = bytearray(await fill(disk))
        await disk.close()
        disk = await open_set(tmp_path, kek, list(links))
        await disk.zero(300 * BS, 11 * BS)
        data[300 * BS:311 * BS] = bytes(11 * BS)
        links[1].fail_writes = True
        await disk.flush()  # r1 fails the flush: a full commit without it
        r1 = disk.replicas.replicas[1]
        assert r1.state is State.DEGRADED
        links[1].fail_writes = False
        await settle(disk)
        await disk.close()
        assert bytes(mems[0].raw) == bytes(mems[1].raw)
        links[0].fail_reads = True  # r1 alone serves every block
        disk = await open_set(tmp_path, kek, list(links))
        assert bytes(await disk.pread(0, NBLOCKS * BS)) == data
        await disk.close()
    run(go())


def test_scrub_finds_an_altered_leaf_page_and_the_replica_gets_it_again(tmp_path: Path) -> None:
    """A driver alters a leaf page of its current replica while the domain has that page
    cached (so no read ever loads it). Scrub checks every leaf page that may be written
    against the trusted tree: it reports the page, r1 is degraded and rejoins with the page
    rewritten, and afterwards r1 alone serves every block. Before, scrub checked the data
    blocks only: the page stayed altered, and with r0 gone its blocks were lost."""
    async def go() -> None:
        kek = new_state(tmp_path)
        mems = memories(2)
        links = [Faulty(mems[0]), Faulty(mems[1])]
        events: list[dict[str, object]] = []
        disk = await open_set(tmp_path, kek, list(links), events)
        data = await fill(disk)
        await disk.close()  # committed: no commit rewrites the page later
        disk = await open_set(tmp_path, kek, list(links), events)
        assert bytes(await disk.pread(0, NBLOCKS * BS)) == data  # every page cached
        mems[1].raw[LAY.leaf_page_offset(1) + 40] ^= 0x10
        result = await disk.scrub()
        assert result["r1"]["leaf_pages_bad"] == 1 and result["r0"]["leaf_pages_bad"] == 0, result
        assert result["r0"]["leaf_pages_checked"] == LAY.leaf_pages, result
        assert any(e["replica"] == "r1" and "leaf page(s) 1 " in str(e["message"])
                   for e in events), events
        r1 = disk.replicas.replicas[1]
        assert r1.state is not State.CURRENT
        await settle(disk)
        await disk.close()
        assert bytes(mems[0].raw) == bytes(mems[1].raw)
        links[0].fail_reads = True  # r1 alone serves every block
        disk = await open_set(tmp_path, kek, list(links))
        assert bytes(await disk.pread(0, NBLOCKS * BS)) == data
        assert (await disk.scrub())["r1"]["leaf_pages_bad"] == 0
        await disk.close()
    run(go())


def test_a_replica_scrub_did_not_read_is_said_not_scrubbed(tmp_path: Path) -> None:
    """A degraded replica is not read by scrub: its line said "0 blocks checked, 0 bad, 0
    repaired", which reads as clean. Its result now says it was not scrubbed, and why."""
    async def go() -> None:
        kek = new_state(tmp_path)
        links = [Faulty(m) for m in memories(2)]
        disk = await open_set(tmp_path, kek, list(links))
        await fill(disk)
        links[1].fail_writes = links[1].fail_reads = True
        await disk.pwrite(0, pattern(0, 7))
        await disk.flush()
        assert disk.replicas.replicas[1].state is not State.CURRENT
        result = await disk.scrub()
        assert "not_scrubbed" not in result["r0"] and result["r0"]["checked"] > 0, result
        assert result["r1"]["checked"] == 0, result
        assert result["r1"]["not_scrubbed"].startswith("it is degraded: not read here"), result
        links[1].fail_writes = links[1].fail_reads = False
        await disk.close()
    run(go())
