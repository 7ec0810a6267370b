"""Small writes done inline (CryptDisk.write_inline, WritesInline): the NBD server runs the
common guest WRITE as one call with no coroutine; every other write is declined with nothing
done, and goes the general way (pwrite)."""

from __future__ import annotations

import errno
from pathlib import Path

import nbd  # Debian's python3-libnbd, put on sys.path by tests/conftest.py
import pytest

from tests.crypt.helpers import BS, SIZE, RawMemory, new_state, open_disk, pattern, run
from tests.nbd.helpers import ServerThread
from trustvbd.blockdev import Backend, BlockError, Buffer, WritesInline, provides
from trustvbd.blocks import crypt_commit
from trustvbd.blocks.crypt_layer import physical_size
from trustvbd.blocks.layer import Layer
from trustvbd.blocks.write_behind import WRITE_BEHIND_BLOCKS
from trustvbd.nbd.exports import Export, StaticExports


def test_the_common_write_is_done_inline_and_every_other_is_declined_untouched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        replica = RawMemory(physical_size(SIZE))
        kek = new_state(tmp_path)
        disk = await open_disk(tmp_path, replica, kek)
        assert provides(disk, WritesInline)
        # The leaf page is not in memory yet: loading it waits, so pwrite does it.
        assert disk.write_inline(3 * BS, pattern(3)) is False
        assert disk._behind.started == 0 and disk._commits._writers == 0
        await disk.pwrite(2 * BS, pattern(2))
        await disk.flush()
        assert disk.write_inline(3 * BS, pattern(3)) is True
        assert disk._behind.started == 2  # answered before its replica, as pwrite does
        # Block 3's write is still held behind: its range is not free.
        assert disk._behind._runs, "the write should still wait to be joined"
        writers = disk._commits._writers
        assert disk.write_inline(3 * BS, pattern(9)) is False
        assert disk._commits._writers == writers and disk._behind.started == 2
        assert bytes(await disk.pread(3 * BS, BS)) == pattern(3)  # it sends it

        def untouched() -> tuple[int, int, bytes]:
            return (disk._commits._next_version, disk._behind.started,
                    bytes(disk._leaves.get(0, 64)))

        before = untouched()
        big = b"".join(pattern(b) for b in range(WRITE_BEHIND_BLOCKS))
        declined = [(5 * BS, pattern(5), True),  # FUA: waits for its replicas
                    (5 * BS + 1, b"x", False),  # a partial block: read-modify-write
                    (0, big, False),  # too big to go behind
                    (0, b"", False)]
        for offset, data, fua in declined:
            assert disk.write_inline(offset, data, fua) is False, (offset, len(data), fua)
            assert untouched() == before
        # A commit that this write could make due: the general way awaits it.
        monkeypatch.setattr(crypt_commit, "AUTO_COMMIT_BLOCKS", disk._commits.intent_blocks + 1)
        assert disk.write_inline(7 * BS, pattern(7)) is False and untouched() == before
        monkeypatch.undo()
        with pytest.raises(BlockError) as outside:
            disk.write_inline(SIZE, pattern(0))
        assert outside.value.errno == errno.EINVAL and untouched() == before
        # The declined ones through pwrite, then all of it read back after a restart.
        await disk.pwrite(3 * BS, pattern(9))
        await disk.pwrite(5 * BS, pattern(5), fua=True)
        assert disk.write_inline(6 * BS, pattern(6)) is True
        await disk.flush()
        await disk.close()
        disk = await open_disk(tmp_path, replica, kek)
        for b, want in [(2, pattern(2)), (3, pattern(9)), (5, pattern(5)), (6, pattern(6)), (7, bytes(BS))]:
            assert bytes(await disk.pread(b * BS, BS)) == want, b
        await disk.close()

    run(go())


class Inline(Layer):
    """A backend doing writes to even blocks inline, declining odd ones (pwrite serves
    them), and failing inline writes at block 10; it records which way each went."""

    def __init__(self, below: Backend) -> None:
        super().__init__(below)
        self.ways: list[tuple[str, int]] = []

    def write_inline(self, offset: int, data: Buffer, fua: bool = False) -> bool:
        if offset == 10 * BS:
            raise BlockError(errno.ENOSPC, "injected: no room")
        if offset // BS % 2:
            return False
        self.ways.append(("inline", offset // BS))
        raw = self.next
        assert isinstance(raw, RawMemory)
        raw.raw[offset:offset + len(data)] = data
        return True

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.ways.append(("pwrite", offset // BS))
        await self.next.pwrite(offset, data, fua)


def test_the_server_answers_inline_writes_and_serves_declined_ones_the_general_way(
        short_tmp: Path) -> None:
    backend = Inline(RawMemory(64 * BS))
    with ServerThread(StaticExports([Export("", backend)]), short_tmp / "s.sock",
                      "uvloop") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        for b in range(6):
            h.pwrite(pattern(b), b * BS, nbd.CMD_FLAG_FUA if b == 4 else 0)
        with pytest.raises(nbd.Error) as failed:
            h.pwrite(pattern(10), 10 * BS)
        assert "No space left on device" in str(failed.value)
        assert h.pread(6 * BS, 0) == b"".join(pattern(b) for b in range(6))
        h.shutdown()
    assert backend.ways == [("inline", 0), ("pwrite", 1), ("inline", 2), ("pwrite", 3),
                            ("inline", 4), ("pwrite", 5)]
