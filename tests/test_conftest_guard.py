"""The suite's own guard: a failure whose traceback has a frame with no line number is
reported as a failure, not an INTERNALERROR that stops the whole run (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LINELESS = '''
import pytest

def _no_lines():
    raise ValueError("the real failure")

_no_lines.__code__ = _no_lines.__code__.replace(co_linetable=b"")

def test_call():
    _no_lines()

@pytest.fixture
def broken():
    _no_lines()

def test_setup(broken):
    pass

def test_fine():
    assert 1 + 1 == 2
'''


def test_a_failure_with_a_lineless_frame_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "test_lineless.py").write_text(LINELESS)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--tb=native", "--rootdir", str(tmp_path), str(tmp_path / "test_lineless.py")],
        cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert "INTERNALERROR" not in out, out
    assert "1 failed, 1 passed, 1 error" in out, out
    assert "ValueError: the real failure" in out and "in _no_lines" in out, out
