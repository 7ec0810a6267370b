"""The encryption layer's read path: big reads opened in place in pooled buffers, locks
taken without waiting.

Big reads (64 KiB or more) from a replica that reads into a caller's buffer (the
NBD client to a driver) land in pooled buffers and are decrypted where they lie: the
plaintext handed on is that buffer. A buffer is handed out again only once nothing
else refers to it (the reply that carried it has left; a link still receiving into
it holds it). A tampered block fails the read and is left as zeros in the buffer,
which goes to nobody. A request whose blocks nobody holds and whose leaf pages are
in memory takes its range lock at once.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import random
from pathlib import Path
from typing import Any

import pytest

from tests.crypt.helpers import BS, RawMemory, flip, new_state, open_disk, run
from trustvbd.blockdev import Backend, BlockError
from trustvbd.blocks.crypt_layer import CryptDisk, IntegrityError, Kek, Layout, physical_size
from trustvbd.blocks.layer import Layer
from trustvbd.blocks.leaf_pages import LeafLocks
from trustvbd.blocks.ranges import RangeLock
from trustvbd.blocks.read_buffers import ReadBuffers
from trustvbd.crypt.superblock import LEAVES_PER_PAGE

SIZE = 1024 * BS  # 4 MiB: 8 leaf pages


class ReadsIntoMemory(Layer):
    """A replica that reads into the caller's buffer, as the NBD client does. It notes the
    id of every buffer it was given (not the buffer: holding it would keep it from reuse),
    can fail a read after writing garbage into it, and can hold on to a read's buffer
    after the read was given up, as a connection still receiving into it does."""

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.buffers: list[int] = []  # id of the bytearray behind each pread_into, in order
        self.fail_next = False
        self.stall_next = False
        self.held: list[memoryview] = []  # buffers of stalled reads, still "receiving"

    async def pread_into(self, offset: int, into: memoryview) -> None:
        self.buffers.append(id(into.obj))
        if self.stall_next:
            self.stall_next = False
            self.held.append(into)
            await asyncio.Event().wait()  # until cancelled
        await asyncio.sleep(0)  # as over a socket: other requests run meanwhile
        if self.fail_next:
            self.fail_next = False
            into[:] = bytes(len(into))  # a broken connection may leave anything behind
            raise BlockError(errno.EIO, "the driver went away mid-read")
        into[:] = await self.next.pread(offset, into.nbytes)

    async def close(self) -> None:
        pass  # the test reopens the same replica


async def _open(state_dir: Path, link: Backend, kek: Kek, **kw: Any) -> CryptDisk:
    return await CryptDisk.open(state_dir, "vm1", link, "r0", kek, **kw)


def _disk_over(tmp_path: Path) -> tuple[RawMemory, ReadsIntoMemory]:
    raw = RawMemory(physical_size(SIZE))
    return raw, ReadsIntoMemory(raw)


def test_big_reads_are_opened_in_reused_buffers_and_return_what_was_written(tmp_path: Path) -> None:
    kek = new_state(tmp_path, size=SIZE)
    _, link = _disk_over(tmp_path)
    rng = random.Random(13)
    image = bytearray(rng.randbytes(SIZE))

    async def go() -> None:
        disk = await _open(tmp_path, link, kek)
        await disk.pwrite(0, bytes(image))
        link.buffers.clear()
        for _ in range(3):
            # Several big reads at once, of two sizes, at block-aligned and odd offsets.
            spans = [(rng.randrange(0, SIZE - 300_000), rng.choice((64 * 1024, 256 * 1024 + 5)))
                     for _ in range(6)]
            got = await asyncio.gather(*(disk.pread(off, n) for off, n in spans))
            for (off, n), data in zip(spans, got, strict=True):
                assert bytes(data) == image[off:off + n]
            del got
            # A write between rounds: the next reads see it, not an old buffer's bytes.
            off = rng.randrange(0, SIZE // BS - 64) * BS
            image[off:off + 64 * BS] = rng.randbytes(64 * BS)
            await disk.pwrite(off, bytes(image[off:off + 64 * BS]))
            plain = await disk.pread(off, 64 * BS)
            assert bytes(plain) == image[off:off + 64 * BS]
            assert id(plain) == link.buffers[-1]  # opened where it was received
            del plain
        await disk.close()

    run(go())
    assert len(link.buffers) >= 21
    assert len(set(link.buffers)) < len(link.buffers)  # reused, not fresh each time


def test_a_buffer_is_reused_only_once_nothing_holds_it(tmp_path: Path) -> None:
    kek = new_state(tmp_path, size=SIZE)
    _, link = _disk_over(tmp_path)
    image = random.Random(4).randbytes(SIZE)

    async def go() -> None:
        disk = await _open(tmp_path, link, kek)
        await disk.pwrite(0, image)
        first = await disk.pread(0, 64 * BS)  # held, as a transport holds a reply not yet sent
        view = memoryview(await disk.pread(64 * BS, 64 * BS))  # held through a view only
        for off in range(128 * BS, 16 * 64 * BS, 64 * BS):
            assert bytes(await disk.pread(off, 64 * BS)) == image[off:off + 64 * BS]
        assert id(first) not in link.buffers[-14:] and id(view.obj) not in link.buffers[-14:]
        assert bytes(first) == image[:64 * BS] and bytes(view) == image[64 * BS:128 * BS]
        held = {id(first), id(view.obj)}
        del first, view
        for off in range(0, 4 * 64 * BS, 64 * BS):
            assert bytes(await disk.pread(off, 64 * BS)) == image[off:off + 64 * BS]
        assert held & set(link.buffers[-4:])  # free again: reused
        await disk.close()

    run(go())


def test_the_pool_holds_at_most_its_bytes_and_makes_room_for_another_size() -> None:
    k = 64 * 1024
    pool = ReadBuffers(4 * k)
    lent = [pool.get(k) for _ in range(6)]  # 4 pooled, 2 fresh ones beyond the bound
    assert len({id(b) for b in lent}) == 6
    assert id(pool.get(k)) not in {id(b) for b in lent}  # none free: a fresh one
    again = [id(b) for b in lent[:2]]
    del lent
    reused = pool.get(k)
    assert id(reused) in again  # the least recently lent free one
    big = pool.get(2 * k)  # room made by letting free 64 KiB buffers go
    big_id = id(big)
    del big
    assert id(pool.get(2 * k)) == big_id  # it was pooled, within the bound
    assert sum(len(b) for q in pool._pooled.values() for b in q) <= 4 * k


def test_small_reads_do_not_use_the_reused_buffers(tmp_path: Path) -> None:
    kek = new_state(tmp_path, size=SIZE)
    _, link = _disk_over(tmp_path)

    async def go() -> None:
        disk = await _open(tmp_path, link, kek)
        await disk.pwrite(0, bytes([7]) * (16 * BS))
        link.buffers.clear()
        assert bytes(await disk.pread(0, 15 * BS)) == bytes([7]) * (15 * BS)
        await disk.close()

    run(go())
    assert link.buffers == []


def test_a_tampered_block_in_a_big_read_fails_leaves_zeros_and_later_reads_are_right(
        tmp_path: Path) -> None:
    kek = new_state(tmp_path, size=SIZE)
    raw, _ = _disk_over(tmp_path)
    image = random.Random(5).randbytes(SIZE)
    seen: list[bytearray] = []

    class Keeps(ReadsIntoMemory):
        async def pread_into(self, offset: int, into: memoryview) -> None:
            seen.append(into.obj)  # type: ignore[arg-type] # kept: this test looks at it after
            await super().pread_into(offset, into)

    async def go() -> None:
        link = Keeps(raw)
        disk = await _open(tmp_path, link, kek)
        await disk.pwrite(0, image)
        await disk.flush()
        seen.clear()
        flip(raw, Layout(SIZE).data_offset(70) + 100)
        with pytest.raises(IntegrityError) as exc:
            await disk.pread(64 * BS, 64 * BS)
        assert exc.value.blocks == [70]
        # The refused read's buffer went to nobody; it holds no partial plaintext of the
        # tampered block (zeros), while the good blocks' plaintext stays in this domain.
        (buf,) = seen
        assert buf[6 * BS:7 * BS] == bytes(BS)
        assert buf[:6 * BS] == image[64 * BS:70 * BS]
        for off in (0, 128 * BS, 512 * BS):
            assert bytes(await disk.pread(off, 64 * BS)) == image[off:off + 64 * BS]
        await disk.close()

    run(go())


def test_a_failed_read_s_buffer_serves_later_reads_rightly(tmp_path: Path) -> None:
    kek = new_state(tmp_path, size=SIZE)
    _, link = _disk_over(tmp_path)
    image = random.Random(6).randbytes(SIZE)

    async def go() -> None:
        disk = await _open(tmp_path, link, kek)
        await disk.pwrite(0, image)
        first = await disk.pread(0, 64 * BS)  # held: the failed read gets another buffer
        link.fail_next = True
        try:
            await disk.pread(64 * BS, 64 * BS)
        except BlockError as exc:
            assert "went away" in str(exc)
        else:
            raise AssertionError("the failed read returned")
        failed = link.buffers[-1]
        gc.collect()  # the error's traceback, in a reference cycle, still holds the read's frame
        for off in range(0, 8 * 64 * BS, 64 * BS):
            assert bytes(await disk.pread(off, 64 * BS)) == image[off:off + 64 * BS]
        assert failed in link.buffers[2:]  # nothing held it: reused, and overwritten first
        assert bytes(first) == image[:64 * BS]
        await disk.close()

    run(go())


def test_a_given_up_read_s_buffer_is_not_reused_while_its_link_holds_it(tmp_path: Path) -> None:
    kek = new_state(tmp_path, size=SIZE)
    _, link = _disk_over(tmp_path)
    image = random.Random(7).randbytes(SIZE)

    async def go() -> None:
        disk = await _open(tmp_path, link, kek)
        await disk.pwrite(0, image)
        assert bytes(await disk.pread(0, 64 * BS)) == image[:64 * BS]
        link.stall_next = True
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(disk.pread(64 * BS, 64 * BS), 0.05)
        stalled = link.buffers[-1]
        (held,) = link.held
        for off in range(0, 8 * 64 * BS, 64 * BS):
            assert bytes(await disk.pread(off, 64 * BS)) == image[off:off + 64 * BS]
            held[:16] = b"late driver data"  # the connection still writes into it
        assert stalled not in link.buffers[-8:]
        link.held.clear()
        del held
        assert bytes(await disk.pread(0, 64 * BS)) == image[:64 * BS]
        assert link.buffers[-1] == stalled
        await disk.close()

    run(go())


def test_range_lock_taken_at_once_only_without_a_conflict() -> None:
    async def go() -> None:
        lock = RangeLock()
        r1 = lock.try_acquire(0, 10, False)
        r2 = lock.try_acquire(5, 15, False)
        assert r1 is not None and r2 is not None  # reads share
        assert lock.try_acquire(9, 12, True) is None  # a write waits for them
        assert lock.try_acquire(10, 12, True) is None  # still overlaps r2
        w = lock.try_acquire(15, 20, True)
        assert w is not None  # no overlap
        assert lock.try_acquire(19, 30, False) is None  # a read waits for the write
        lock.release(r1)
        lock.release(r2)
        lock.release(w)
        assert lock.try_acquire(0, 30, True) is not None

    run(go())


def test_range_lock_waits_for_exactly_the_overlapping_holds() -> None:
    async def go() -> None:
        lock = RangeLock()
        reads = [lock.try_acquire(i * 10, i * 10 + 10, False) for i in range(300)]
        assert all(r is not None for r in reads)
        write = asyncio.ensure_future(lock.acquire(995, 1005, True))  # overlaps reads 99, 100
        other = lock.try_acquire(2000, 2010, True)  # overlaps read 200 only
        assert other is None
        await asyncio.sleep(0)
        assert not write.done()
        lock.release(reads[99])  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert not write.done()
        lock.release(reads[100])  # type: ignore[arg-type]
        w = await asyncio.wait_for(write, 1)
        late = asyncio.ensure_future(lock.acquire(1000, 1001, False))  # a read behind the write
        await asyncio.sleep(0)
        assert not late.done()
        assert lock.try_acquire(3005, 3006, False) is not None  # no conflict elsewhere
        lock.release(w)
        lock.release(await asyncio.wait_for(late, 1))

    run(go())


def test_leaf_locks_taken_at_once_only_when_their_pages_are_in_memory(tmp_path: Path) -> None:
    kek = new_state(tmp_path, size=SIZE)
    raw = RawMemory(physical_size(SIZE))

    async def go() -> None:
        disk = await open_disk(tmp_path, raw, kek, leaf_cache_pages=2)
        for p in range(8):  # a leaf page per 128 blocks, each written once
            await disk.pwrite(p * LEAVES_PER_PAGE * BS, bytes([p + 1]) * BS)
        await disk.flush()
        await disk.close()
        disk = await open_disk(tmp_path, raw, kek, leaf_cache_pages=2)
        leaves = disk._leaves
        locks = LeafLocks(leaves)
        far = 7 * LEAVES_PER_PAGE
        assert not leaves.table.contains(far // LEAVES_PER_PAGE)
        assert locks.try_acquire(far, far + 1, False) is None  # its page must be read first
        hold = await locks.acquire(far, far + 1, False)
        again = locks.try_acquire(far, far + 1, False)  # resident now: no waiting
        assert again is not None
        # Held pages stay in memory while other pages come and go.
        for p in range(6):
            assert bytes(await disk.pread(p * LEAVES_PER_PAGE * BS, BS)) == bytes([p + 1]) * BS
        assert leaves.table.contains(7)
        locks.release(hold)
        locks.release(again)
        assert bytes(await disk.pread(far * BS, BS)) == bytes([8]) * BS
        await disk.close()

    run(go())
