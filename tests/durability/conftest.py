"""Fixtures of the power-cut tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def cut_dir(tmp_path: Path) -> Iterator[Path]:
    """Where each power cut's trusted state is laid out anew (thousands of small files per
    test): in memory when the machine has /dev/shm, else under tmp_path."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path / "cut"
        return
    base = Path(tempfile.mkdtemp(prefix="trustvbd-cut-", dir=shm))
    try:
        yield base / "cut"
    finally:
        shutil.rmtree(base, ignore_errors=True)
