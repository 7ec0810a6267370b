"""Reading a file that must be a regular one: a config, a policy, a key, an audit log.

A FIFO put in such a file's place holds open() until a writer comes (for good, in a
domain's event loop), and a device (/dev/zero) is read until memory runs out: each is
opened non-blocking, refused unless regular, and read up to a bound.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class NotRegularFile(OSError):
    """The path names a directory, a FIFO, a socket or a device (`mode`: its st_mode)."""

    def __init__(self, path: str | Path, what: str, mode: int) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({what} is one)", str(path))
        self.mode = mode


def open_regular(path: str | Path, what: str) -> int:
    """A descriptor of `path` for reading; NotRegularFile (an OSError) unless it is a
    regular file (`what` names what it should be, e.g. "a config"), OSError as open(2)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, what, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd  # (O_NONBLOCK changes nothing for a regular file)


def read_regular(path: str | Path, what: str, limit: int) -> bytes:
    """At most `limit` + 1 bytes of `path` (so a caller sees a file over its limit), as
    open_regular refuses or opens it."""
    fd = open_regular(path, what)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)
