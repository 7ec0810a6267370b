"""Opening a disk whose leaf table is larger than one read: read in pieces, said as it goes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.crypt.helpers import make_replica, new_state, open_disk, pattern, run
from trustvbd.blocks import crypt_open
from trustvbd.crypt.aead import BLOCK_SIZE as BS

SIZE = 2048 * 128 * BS  # 1 GiB: 2048 leaf pages, an 8 MiB leaf table


def test_a_table_larger_than_one_read_opens_with_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypt_open, "TABLE_READ", 1 << 20)  # eight pieces
    monkeypatch.setattr(crypt_open, "PROGRESS_EVERY", 0.0)  # every step says so

    async def go() -> None:
        kek = new_state(tmp_path, size=SIZE)
        replica = make_replica("memory", tmp_path, SIZE)
        disk = await open_disk(tmp_path, replica, kek)
        ends = [0, 1000 * 128, SIZE // BS - 1]  # blocks on the first, a middle and the last page
        for b in ends:
            await disk.pwrite(b * BS, pattern(b))
        await disk.close()
        disk = await open_disk(tmp_path, replica, kek)  # the restart reads it all back
        for b in ends:
            assert bytes(await disk.pread(b * BS, BS)) == pattern(b)
        await disk.close()

    with caplog.at_level(logging.INFO, "trustvbd.blocks.crypt_open"):
        run(go())
    assert "reading the leaf table from 'r0': 50 %" in caplog.text
    assert "checking the leaf table of 'r0'" in caplog.text
