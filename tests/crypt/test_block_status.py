"""CryptDisk.block_status: holes from the leaves alone, with bounded work per call."""

from __future__ import annotations

from pathlib import Path

from tests.crypt.helpers import BS, RawMemory, new_state, open_disk, pattern, run
from tests.crypt.test_lazy_leaves import SparseMemory
from trustvbd.blockdev import HOLE, ZERO, BlockError
from trustvbd.blocks.allocation import STATUS_PAGES
from trustvbd.blocks.crypt_layer import Layout
from trustvbd.blocks.disk_state import load_kek

PAGE = 128  # blocks per leaf page
HZ = HOLE | ZERO


def covered(extents: list[tuple[int, int]]) -> int:
    return sum(n for n, _ in extents)


def test_a_16_tib_disk_answers_from_few_pages_and_after_a_restart(tmp_path: Path) -> None:
    size = 16 << 40
    lay = Layout(size)
    replica = SparseMemory(lay.physical_size)
    far = 3 * PAGE * 1000 + 7  # a block ~1.5 GiB in

    async def go() -> None:
        kek = new_state(tmp_path, size=size)
        disk = await open_disk(tmp_path, replica, kek)
        assert await disk.block_status(0, 4 << 30) == [(4 << 30, HZ)]
        for b in (0, 1, 2, far):
            await disk.pwrite(b * BS, pattern(b))
        await disk.trim(BS, BS)  # block 1 is a hole again
        await disk.pwrite(lay.blocks * BS - BS, pattern(9))  # the last block
        want = [(BS, 0), (BS, HZ), (BS, 0), ((far - 3) * BS, HZ), (BS, 0),
                ((4 << 30) - (far + 1) * BS, HZ)]
        assert await disk.block_status(0, 4 << 30) == want
        await disk.close()
        disk = await open_disk(tmp_path, replica, kek)  # nothing resident now
        assert await disk.block_status(0, 4 << 30) == want
        assert disk._leaves.loads == 2  # the two pages with data, nothing else
        # Unaligned: the extents start at the offset asked for and end at its end.
        assert await disk.block_status(BS + 100, 2 * BS) == [(BS - 100, HZ), (BS, 0), (100, HZ)]
        assert await disk.block_status(size - 2 * BS, 2 * BS) == [(BS, HZ), (BS, 0)]
        try:
            await disk.block_status(size - BS, 2 * BS)
            raise AssertionError("a range past the end was answered")
        except BlockError as exc:
            assert "outside the device" in exc.message
        await disk.close()

    run(go())


def test_work_per_call_is_bounded_and_the_rest_comes_on_the_next_call(tmp_path: Path) -> None:
    pages = STATUS_PAGES + 20
    size = pages * PAGE * BS
    lay = Layout(size)
    replica = RawMemory(lay.physical_size)

    async def go() -> None:
        kek = new_state(tmp_path, size=size)
        disk = await open_disk(tmp_path, replica, kek)
        for p in range(pages):  # one block per page: every page has data
            await disk.pwrite(p * PAGE * BS, pattern(p))
        await disk.close()
        disk = await open_disk(tmp_path, replica, load_kek(tmp_path), leaf_cache_pages=8)
        first = await disk.block_status(0, size)
        assert covered(first) == STATUS_PAGES * PAGE * BS  # stopped short, at a page's end
        assert first[:3] == [(BS, 0), ((PAGE - 1) * BS, HZ), (BS, 0)]
        assert disk._leaves.loads == STATUS_PAGES
        assert disk._leaves.resident() <= 8  # loaded and let go, through the bounded cache
        rest = await disk.block_status(covered(first), size - covered(first))
        assert covered(rest) == size - covered(first)
        assert len(first) + len(rest) == 2 * pages
        await disk.close()

    run(go())


def test_written_pages_are_one_data_extent_and_a_hole_among_them_is_still_found(
        tmp_path: Path) -> None:
    """A page whose leaves are all written is one data extent (found without looking at each
    leaf); one trimmed or zeroed block in a written page, or a block never written after
    written ones, is still its own hole."""
    pages = 3
    size = pages * PAGE * BS
    lay = Layout(size)
    replica = RawMemory(lay.physical_size)

    async def go() -> None:
        kek = new_state(tmp_path, size=size)
        disk = await open_disk(tmp_path, replica, kek)
        for b in range(pages * PAGE - 1):  # all but the very last block
            await disk.pwrite(b * BS, pattern(b))
        assert await disk.block_status(0, size) == [((pages * PAGE - 1) * BS, 0), (BS, HZ)]
        await disk.trim((PAGE + 5) * BS, BS)
        await disk.zero((2 * PAGE + 127) * BS - BS, BS)  # the one before the never written
        assert await disk.block_status(0, size) == [
            ((PAGE + 5) * BS, 0), (BS, HZ), ((PAGE - 6) * BS + (PAGE - 2) * BS, 0), (2 * BS, HZ)]
        await disk.close()
        disk = await open_disk(tmp_path, replica, load_kek(tmp_path))  # leaves from the replica
        assert await disk.block_status(PAGE * BS, PAGE * BS) == [
            (5 * BS, 0), (BS, HZ), ((PAGE - 6) * BS, 0)]
        await disk.close()

    run(go())
