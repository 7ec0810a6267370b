"""Shared fixtures. Debian's libnbd Python module lives outside the venv."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Appended, not prepended: the venv's packages keep priority.
sys.path.append("/usr/lib/python3/dist-packages")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tv", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_leftover_systems() -> Iterator[None]:
    from tests.support import STARTED, kill_started_since

    before = len(STARTED)
    yield
    kill_started_since(before)
