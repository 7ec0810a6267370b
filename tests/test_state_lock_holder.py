"""state_lock.holder: who holds a state directory's lock, asked without taking it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trustvbd import state_lock
from trustvbd.state_lock import StateLock, StateLocked, holder


def test_holder_names_the_live_holder_and_none_once_it_is_killed(tmp_path: Path) -> None:
    assert holder(tmp_path) is None  # no lock file at all
    code = ("import sys, time; from pathlib import Path; from trustvbd.state_lock import StateLock;"
            f" lock = StateLock(Path({str(tmp_path)!r})); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        assert holder(tmp_path) == child.pid
        assert holder(tmp_path) == child.pid  # asking took no lock: still held, still its
        try:
            StateLock(tmp_path)
            raise AssertionError("the lock was free while its holder lived")
        except StateLocked as exc:
            assert exc.pid == str(child.pid)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=10)
    assert holder(tmp_path) is None  # the pid is still in the file; the lock is gone
    assert (tmp_path / "up.lock").read_text() == f"{child.pid}\n"
    mine = StateLock(tmp_path)
    assert holder(tmp_path) == os.getpid()
    mine.release()
    assert holder(tmp_path) is None


def test_holder_found_by_its_pid_where_stat_and_proc_locks_disagree_on_the_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On btrfs stat() gives a subvolume's device number, /proc/locks the filesystem's: the
    lock is then known by its inode and the pid written in the file (else a running `up` was
    taken for a stopped one)."""
    mine = StateLock(tmp_path)
    try:
        monkeypatch.setattr(state_lock.os, "major", lambda dev: 0xEE)
        assert holder(tmp_path) == os.getpid()
        (tmp_path / "up.lock").write_text("1\n")  # another pid: same inode, not this lock
        assert holder(tmp_path) is None
    finally:
        mine.release()
