"""A disk whose leaf table cannot fit in memory is refused before anything is allocated."""

from __future__ import annotations

import pytest

from trustvbd.domains import crypt_disks


def test_leaf_table_needs_are_checked_against_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypt_disks, "memory_available", lambda: 4 << 30)
    crypt_disks.check_memory("small", 64 << 30)  # a 512 MiB table: fine
    with pytest.raises(MemoryError, match=r"disk 'big' \(1099511627776 bytes\) needs 8\.2 GiB"):
        crypt_disks.check_memory("big", 1 << 40)
    monkeypatch.setattr(crypt_disks, "memory_available", lambda: 0)  # unknown: not refused
    crypt_disks.check_memory("big", 1 << 40)


def test_memory_available_reads_proc_meminfo() -> None:
    assert crypt_disks.memory_available() > 0
