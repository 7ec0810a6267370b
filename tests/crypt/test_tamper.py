"""A hostile driver: flipped bytes, swapped or spliced blocks, replays, forged zeros."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.crypt.helpers import (
    BS,
    LAY,
    SIZE,
    RawMemory,
    make_replica,
    new_state,
    open_disk,
    patch,
    pattern,
    read_blocks,
    replica_bytes,
    run,
    set_replica_bytes,
)
from trustvbd.blocks.crypt_layer import (
    ForeignReplicaError,
    IntegrityError,
    StaleReplicaError,
    physical_size,
    verify_replica,
)
from trustvbd.blocks.disk_state import DiskState

SLOT = 4096
WRITTEN = range(0, 300)  # blocks 0-299 written; 300-511 never written
KINDS = ["memory", "file"]


async def _written_disk(state: Path, replica: RawMemory | object, name: str = "vm1") -> None:
    kek = new_state(state, name)
    disk = await open_disk(state, replica, kek, name)  # type: ignore[arg-type]
    await disk.pwrite(0, b"".join(pattern(b) for b in WRITTEN))
    await disk.flush()
    await disk.close()


def _expected(blocks: range) -> dict[int, bytes]:
    return {b: pattern(b) if b in WRITTEN else bytes(BS) for b in blocks}


@pytest.fixture(scope="module")
def golden() -> Iterator[tuple[Path, bytes]]:
    """One written disk (state dir + replica bytes) that each example copies and tampers with."""
    root = Path(tempfile.mkdtemp(prefix="tvgold"))
    replica = RawMemory(physical_size(SIZE))
    run(_written_disk(root / "state", replica))
    yield root / "state", bytes(replica.raw)
    shutil.rmtree(root, ignore_errors=True)


def _affected_by(offset: int) -> set[int]:
    """Blocks whose reads must fail after one byte at `offset` on the replica changes."""
    if offset < LAY.leaf_start:
        return set()  # a superblock: an event, but every block still reads
    if offset < LAY.data_start:
        page = (offset - LAY.leaf_start) // BS
        if page * 128 > max(WRITTEN):
            return set()  # the trusted tree knows the page is empty: it is never read
        return set(LAY.leaf_page_blocks(page * 128))  # its leaves can no longer be trusted
    block = (offset - LAY.data_start) // BS
    return {block} if block in WRITTEN else set()  # never-written blocks are not read


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, physical_size(SIZE) - 1), mask=st.integers(1, 255))
def test_flip_any_byte_fails_exactly_the_affected_blocks(golden: tuple[Path, bytes], offset: int,
                                                         mask: int) -> None:
    state_src, image = golden
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        shutil.copytree(state_src, state)
        replica = RawMemory(len(image))
        replica.raw[:] = image
        replica.raw[offset] ^= mask
        events: list[dict] = []

        async def go() -> tuple[dict[int, bytes], set[int], int]:
            from trustvbd.blocks.disk_state import load_kek

            disk = await open_disk(state, replica, load_kek(state), events=events)
            good, bad = await read_blocks(disk, range(LAY.blocks))
            n = disk.integrity_events
            await disk.close()
            return good, bad, n

        good, bad, n_events = run(go())
        affected = _affected_by(offset)
        assert bad == affected
        expected = _expected(range(LAY.blocks))
        for b, data in good.items():
            assert data == expected[b], f"block {b} reads wrong data"
        # Every detected change is reported: superblock damage at open, data at read.
        if offset < LAY.leaf_start or affected:
            assert n_events >= 1 and events and events[0]["replica"] == "r0"
        else:
            assert n_events == 0


@pytest.mark.parametrize("kind", KINDS)
def test_swapped_blocks_fail_and_neighbours_read(tmp_path: Path, kind: str) -> None:
    async def go() -> None:
        replica = make_replica(kind, tmp_path)
        await _written_disk(tmp_path, replica)
        raw = replica_bytes(replica)
        a, b = LAY.data_offset(10), LAY.data_offset(200)
        da, db = bytes(raw[a:a + BS]), bytes(raw[b:b + BS])
        patch(replica, a, db)
        patch(replica, b, da)
        from trustvbd.blocks.disk_state import load_kek

        disk = await open_disk(tmp_path, replica, load_kek(tmp_path))
        good, bad = await read_blocks(disk, range(0, 300))
        assert bad == {10, 200}
        assert good[11] == pattern(11) and good[199] == pattern(199)
        assert disk.integrity_events == 2
        with pytest.raises(IntegrityError) as exc:
            await disk.pread(9 * BS, 3 * BS)  # a multi-block read containing a bad block
        assert exc.value.errno == 5 and exc.value.blocks == [10]
        assert "'vm1'" in str(exc.value) and "'r0'" in str(exc.value) and "10" in str(exc.value)
        # Rewriting a bad block heals it.
        await disk.pwrite(10 * BS, pattern(10))
        assert bytes(await disk.pread(10 * BS, BS)) == pattern(10)
        await disk.close()

    run(go())


def test_block_and_leaf_spliced_from_another_disk_fail(tmp_path: Path) -> None:
    async def go() -> None:
        mine, other = RawMemory(LAY.physical_size), RawMemory(LAY.physical_size)
        await _written_disk(tmp_path, mine, "mine")
        await _written_disk(tmp_path, other, "other")
        from trustvbd.blocks.disk_state import load_kek

        kek = load_kek(tmp_path)
        # Data only: the leaf is ours, the ciphertext theirs.
        d7 = LAY.data_offset(7)
        mine.raw[d7:d7 + BS] = other.raw[d7:d7 + BS]
        disk = await open_disk(tmp_path, mine, kek, "mine")
        good, bad = await read_blocks(disk, range(0, 20))
        assert bad == {7}
        await disk.close()
        # Data and leaf: the leaf page no longer matches our trusted page hashes.
        l7 = LAY.leaf_offset(7)
        mine.raw[d7:d7 + BS] = other.raw[d7:d7 + BS]
        mine.raw[l7:l7 + 32] = other.raw[l7:l7 + 32]
        disk = await open_disk(tmp_path, mine, kek, "mine")
        good, bad = await read_blocks(disk, range(0, 300))
        assert 7 in bad and bad <= set(LAY.leaf_page_blocks(7))
        assert good[200] == pattern(200)
        await disk.close()

    run(go())


@pytest.mark.parametrize("kind", KINDS)
def test_rolled_back_replica_is_stale(tmp_path: Path, kind: str) -> None:
    async def go() -> None:
        replica = make_replica(kind, tmp_path)
        await _written_disk(tmp_path, replica)
        saved = bytes(replica_bytes(replica))
        from trustvbd.blocks.disk_state import load_kek

        kek = load_kek(tmp_path)
        disk = await open_disk(tmp_path, replica, kek)
        await disk.pwrite(5 * BS, pattern(5, 1))
        await disk.commit()
        trusted = disk.epoch
        await disk.close()
        set_replica_bytes(replica, saved)
        with pytest.raises(StaleReplicaError) as exc:
            await open_disk(tmp_path, replica, kek)
        msg = str(exc.value)
        assert "stale" in msg and "'r0'" in msg and str(trusted) in msg and "epoch 2" in msg
        # A blank replica under a non-zero anchor is stale too, never re-formatted.
        set_replica_bytes(replica, bytes(len(saved)))
        with pytest.raises(StaleReplicaError, match="epoch 0"):
            await open_disk(tmp_path, replica, kek)
        assert replica_bytes(replica).count(0) == len(saved)  # nothing was written

    run(go())


def test_replayed_block_with_its_old_leaf_is_detected(tmp_path: Path) -> None:
    async def go() -> None:
        replica = RawMemory(LAY.physical_size)
        await _written_disk(tmp_path, replica)
        from trustvbd.blocks.disk_state import load_kek

        kek = load_kek(tmp_path)
        d3, l3 = LAY.data_offset(3), LAY.leaf_offset(3)
        old_data, old_leaf = bytes(replica.raw[d3:d3 + BS]), bytes(replica.raw[l3:l3 + 32])
        disk = await open_disk(tmp_path, replica, kek)
        await disk.pwrite(3 * BS, pattern(3, 1))
        await disk.flush()
        # While the disk is open: the trusted leaf table is in memory.
        replica.raw[d3:d3 + BS] = old_data
        with pytest.raises(IntegrityError):
            await disk.pread(3 * BS, BS)
        await disk.close()  # nothing dirty: the replayed data stays in place
        replica.raw[l3:l3 + 32] = old_leaf
        disk = await open_disk(tmp_path, replica, kek)
        with pytest.raises(IntegrityError):
            await disk.pread(3 * BS, BS)  # never the old bytes
        assert bytes(await disk.pread(200 * BS, BS)) == pattern(200)
        await disk.close()

    run(go())


def test_replay_inside_the_commit_window_is_detected(tmp_path: Path) -> None:
    """Between commits the replica's leaf table is old; an older version of a block
    written twice in the window must not be accepted after the first was overwritten."""

    async def go() -> None:
        replica = RawMemory(LAY.physical_size)
        await _written_disk(tmp_path, replica)
        from trustvbd.blocks.disk_state import load_kek

        kek = load_kek(tmp_path)
        disk = await open_disk(tmp_path, replica, kek)
        d3 = LAY.data_offset(3)
        committed = bytes(replica.raw[d3:d3 + BS])
        await disk.pwrite(3 * BS, pattern(3, 1))
        await disk.settle()  # answered before the replica took it (write_behind.py)
        first = bytes(replica.raw[d3:d3 + BS])
        await disk.pwrite(3 * BS, pattern(3, 2))
        await disk.settle()
        for replay in (committed, first):  # the open disk knows the exact version
            replica.raw[d3:d3 + BS] = replay
            with pytest.raises(IntegrityError):
                await disk.pread(3 * BS, BS)
        # A crash now, with the driver presenting the first write: recovery may only
        # accept versions the trusted intent log recorded, and this one it did: it is
        # "old or new content" for an unflushed block, never an error.
        disk._state.close()
        disk._commits.tree.close()
        disk = await open_disk(tmp_path, replica, kek)
        assert bytes(await disk.pread(3 * BS, BS)) == pattern(3, 1)
        await disk.close()

    run(go())


def test_driver_cannot_forge_zeros(tmp_path: Path) -> None:
    async def go() -> None:
        replica = RawMemory(LAY.physical_size)
        await _written_disk(tmp_path, replica)
        from trustvbd.blocks.disk_state import load_kek

        kek = load_kek(tmp_path)
        b = 250
        replica.raw[LAY.data_offset(b):LAY.data_offset(b) + BS] = bytes(BS)
        replica.raw[LAY.leaf_offset(b):LAY.leaf_offset(b) + 32] = bytes(32)
        disk = await open_disk(tmp_path, replica, kek)
        good, bad = await read_blocks(disk, range(LAY.blocks))
        assert b in bad and bad == set(LAY.leaf_page_blocks(b))
        assert good[0] == pattern(0) and good[400] == bytes(BS)
        await disk.close()
        # The damage is remembered (committed as "lost"), not forgotten on the next open.
        disk = await open_disk(tmp_path, replica, kek)
        with pytest.raises(IntegrityError):
            await disk.pread(b * BS, BS)
        await disk.close()

    run(go())


def test_foreign_replicas_are_refused_and_left_untouched(tmp_path: Path) -> None:
    async def go() -> None:
        from trustvbd.blocks.disk_state import load_kek

        kek = new_state(tmp_path, "mine")
        noise = RawMemory(LAY.physical_size)
        noise.raw[:] = (b"\x5a\xc3" * (LAY.physical_size // 2))
        with pytest.raises(ForeignReplicaError, match="not a trustvbd disk"):
            await open_disk(tmp_path, noise, kek, "mine")
        other = RawMemory(LAY.physical_size)
        await _written_disk(tmp_path, other, "other")
        before = bytes(other.raw)
        with pytest.raises(ForeignReplicaError, match=r"another trustvbd disk.*give this disk its own backing file"):
            await open_disk(tmp_path, other, load_kek(tmp_path), "mine")
        assert bytes(other.raw) == before
        # Zero superblocks but data where blocks go: not blank, not ours.
        sparse = RawMemory(LAY.physical_size)
        sparse.raw[LAY.data_offset(0):LAY.data_offset(0) + 5] = b"ext4!"
        with pytest.raises(ForeignReplicaError, match="refusing to format"):
            await open_disk(tmp_path, sparse, kek, "mine")

    run(go())


def test_verify_replica_offline(tmp_path: Path) -> None:
    async def go() -> None:
        replica = RawMemory(LAY.physical_size)
        await _written_disk(tmp_path, replica)
        public = DiskState(tmp_path, "vm1").public_key()
        assert (tmp_path / "disks" / "vm1" / "disk.pub").read_bytes() == public
        report = await verify_replica(replica, public)
        assert report.ok, str(report)
        assert report.written_blocks == 300 and report.epoch == 2
        assert any("NOT" in line for line in str(report).splitlines())
        # Another key proves nothing.
        other = RawMemory(LAY.physical_size)
        await _written_disk(tmp_path, other, "other")
        report = await verify_replica(replica, DiskState(tmp_path, "other").public_key())
        assert not report.ok and "no superblock signed by this key" in str(report)
        # A tampered leaf page is named.
        replica.raw[LAY.leaf_offset(300) + 5] ^= 0x40
        report = await verify_replica(replica, public)
        assert not report.ok and report.bad_pages == [2]
        assert set(report.bad_blocks) >= set(range(256, 384))
        # A tampered older superblock slot is named; the newest still covers the table.
        replica.raw[LAY.leaf_offset(300) + 5] ^= 0x40
        replica.raw[SLOT + 100] ^= 1
        report = await verify_replica(replica, public)
        assert not report.ok and any("slot 1" in p for p in report.problems)
        assert report.bad_pages == [] and report.epoch == 2
        # With the newest slot damaged, the older one is all that is left to judge by.
        replica.raw[SLOT + 100] ^= 1
        replica.raw[100] ^= 1
        report = await verify_replica(replica, public)
        assert report.epoch == 1 and any("slot 0" in p for p in report.problems)
        assert any("newer than" in p for p in report.problems)

    run(go())
