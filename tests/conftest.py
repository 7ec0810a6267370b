"""Shared fixtures. Debian's libnbd Python module lives outside the venv."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from types import TracebackType

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


def _lineless(tb: TracebackType | None) -> bool:
    while tb is not None:
        if tb.tb_lineno is None:
            return True
        tb = tb.tb_next
    return False


def _plain_format(exc: BaseException) -> str:
    """An exception and its causes, each frame's line number or '?' (no line table lookup)."""
    parts: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        frames = []
        tb = e.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            line = "?" if tb.tb_lineno is None else tb.tb_lineno
            frames.append(f'  File "{code.co_filename}", line {line}, in {code.co_name}')
            tb = tb.tb_next
        parts.append("\n".join([*frames, f"{type(e).__qualname__}: {e}"]))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return "\n\nwhich came while handling, or was caused by:\n".join(parts)


def _raise_plainly_if_lineless(exc: Exception) -> None:
    """pytest 9.2 (and Python's traceback module) crash formatting a traceback with a frame
    that has no line number: the whole run stops with INTERNALERROR. Such a failure is
    raised again as one whose message is its traceback, formatted without line tables."""
    chain: BaseException | None = exc
    while chain is not None and not _lineless(chain.__traceback__):
        chain = chain.__cause__ or chain.__context__
    if chain is not None:
        raise AssertionError(f"(a frame without a line number)\n{_plain_format(exc)}") from None


def _reraised_plainly_if_lineless(item: pytest.Item) -> Generator[None, None, None]:
    """Around a test's setup, call and teardown alike (the three hooks below)."""
    try:
        return (yield)
    except Exception as exc:
        _raise_plainly_if_lineless(exc)
        raise


pytest_runtest_setup = pytest_runtest_call = pytest_runtest_teardown = pytest.hookimpl(
    wrapper=True)(_reraised_plainly_if_lineless)


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
