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


def pytest_configure(config: pytest.Config) -> None:
    """Refuse at once, in one line, when the reference policies are missing (not 24 odd failures)."""
    from tests.acm.util import POLICIES

    if not POLICIES.is_dir():
        raise pytest.UsageError(
            f"the tests read Xen's ACM policies from {POLICIES}, which does not exist: check out "
            "trustvbd next to the shared/ directory, or set TRUSTVBD_SHARED_DIR to that directory")


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
