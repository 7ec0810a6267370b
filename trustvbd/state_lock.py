"""The state directory's lock: one `trustvbd up` per state directory, and no rekey while it runs."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StateLocked(Exception):
    """Someone else holds the lock; `pid` says who (as written into the lock file)."""

    def __init__(self, state_dir: Path, pid: str) -> None:
        super().__init__(f"state directory {state_dir} is locked by pid {pid}")
        self.state_dir, self.pid = state_dir, pid


class StateLockUnwritable(Exception):
    """The lock file could not be made or written (a full or read-only state directory):
    one line saying where, why and what to do; callers add what follows."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"cannot write the lock file {path.name} in the state directory"
                         f" {path.parent}: {exc.strerror or exc}; free space there (or make it"
                         " writable)")


class StateLock:
    """An flock on STATE_DIR/up.lock, holding the owner's pid, for the holder's lifetime.

    flock dies with its process, so a killed `up` never leaves a stale lock behind.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "up.lock"
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateLockUnwritable(self.path, exc) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise StateLocked(state_dir, pid) from None
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # a full state directory: the lock is not taken after all
            os.close(self.fd)
            raise StateLockUnwritable(self.path, exc) from None

    def release(self) -> None:
        os.ftruncate(self.fd, 0)
        os.close(self.fd)


def holder(state_dir: Path) -> int | None:
    """The pid holding STATE_DIR/up.lock (a running `up`), or None if no process holds it.

    Read from /proc/locks, so asking takes no lock: a probe's brief flock would make an `up`
    starting at that instant refuse to start. The lock goes with `up`'s last open file, so
    once a killed `up`'s sockets are closed this says None. A lock is ours by inode number
    and device, or inode number and the pid written in the file: btrfs subvolumes (and
    overlays) give stat() another device number than /proc/locks shows.
    """
    try:
        with open(state_dir / "up.lock", "rb") as f:
            st = os.fstat(f.fileno())
            written = f.read(32).decode(errors="replace").strip()
        with open("/proc/locks") as f_locks:
            table = f_locks.read()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue  # also a waiter's line ("N: -> FLOCK ...")
        dev, _, ino = fields[5].rpartition(":")
        if ino == str(st.st_ino) and (dev == device or fields[4] == written):
            return int(fields[4]) if fields[4].isdigit() else -1
    return None
