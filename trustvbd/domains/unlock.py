"""What unlocks an encryption domain's disks, handed over once through a pipe.

The launcher reads the passphrase (at start-up only) and the key file, writes
them into a pipe whose read end only the new encryption domain holds, zeroes its
own copies and forgets them: it keeps no secret once the domains run, and no
secret is ever in a child's environment or on its command line.

Wire format (the pipe carries nothing else; end of file ends it):
    1 byte tag (1 = passphrase, UTF-8; 2 = key file, 32 bytes), 2 bytes length
    (big-endian), that many bytes. At most one record per tag.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from dataclasses import dataclass, field

PASSPHRASE, KEY_FILE = 1, 2
_RECORD = struct.Struct(">BH")
MAX_TOTAL = 8192


class UnlockError(Exception):
    pass


def erase_from_environment(name: str) -> None:
    """Drop `name` from this process's environment and zero its value where it started.

    os.environ.pop alone only unsets libc's pointer: the bytes stay in the block the kernel
    shows as /proc/PID/environ (to root and the same user) for the life of the process. The
    value is overwritten in place first, through the pointer libc still holds.
    """
    prefix = name.encode() + b"="
    entries = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
    index = 0
    while (address := entries[index]) is not None:
        entry = ctypes.string_at(address)
        if entry.startswith(prefix):
            ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
        index += 1
    os.environ.pop(name, None)  # and no child inherits it


@dataclass
class Unlock:
    """Secrets as bytearrays, so their holder can zero them (`forget`)."""

    passphrase: bytearray | None = field(default=None, repr=False)
    key_file: bytearray | None = field(default=None, repr=False)

    def forget(self) -> None:
        for secret in (self.passphrase, self.key_file):
            if secret is not None:
                secret[:] = bytes(len(secret))
        self.passphrase = self.key_file = None

    def encode(self) -> bytearray:
        out = bytearray()
        for tag, secret in ((PASSPHRASE, self.passphrase), (KEY_FILE, self.key_file)):
            if secret is not None:
                out += _RECORD.pack(tag, len(secret)) + secret
        return out


def decode(data: bytes | bytearray) -> Unlock:
    found = Unlock()
    view, at = memoryview(data), 0
    while at < len(view):
        if len(view) - at < _RECORD.size:
            raise UnlockError("the launcher's unlock pipe ended inside a record header")
        tag, length = _RECORD.unpack_from(view, at)
        at += _RECORD.size
        if at + length > len(view):
            raise UnlockError("the launcher's unlock pipe ended inside a record")
        value = bytearray(view[at:at + length])
        at += length
        if tag == PASSPHRASE and found.passphrase is None:
            found.passphrase = value
        elif tag == KEY_FILE and found.key_file is None:
            found.key_file = value
        else:
            raise UnlockError(f"the launcher's unlock pipe holds an unknown or repeated tag {tag}")
    return found


def send_unlock(unlock: Unlock) -> int:
    """A pipe holding `unlock`: returns its read end (for pass_fds); the write end is closed.

    The payload is far below the pipe's buffer, so the write never blocks.
    """
    read_end, write_end = os.pipe()
    try:
        payload = unlock.encode()
        if len(payload) > MAX_TOTAL:
            raise UnlockError(f"unlock material of {len(payload)} bytes is over {MAX_TOTAL}")
        os.write(write_end, payload)
        payload[:] = bytes(len(payload))
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return read_end


def _not_a_pipe(mode: int) -> str | None:
    """What a descriptor that is no pipe is, in words (None for a pipe)."""
    if stat.S_ISFIFO(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISREG, "a regular file"))
    return next((words for test, words in kinds if test(mode)), "no pipe")


def receive_unlock(fd: int, sent_by: str = "the launcher") -> Unlock:
    """Read everything from the pipe, close it, decode; the buffer is zeroed after.

    The sender writes everything and closes its end before handing the read end over, so
    the read never waits: a descriptor with nothing more to read and no end of file (its
    write end still open somewhere) is refused instead of waited on.
    """
    buf = bytearray()
    try:
        kind = _not_a_pipe(os.fstat(fd).st_mode)
        if kind is not None:
            raise UnlockError(f"{sent_by}'s unlock descriptor is {kind}, not a pipe: send the"
                              " read end of a pipe holding the passphrase")
        os.set_blocking(fd, False)
        while chunk := os.read(fd, 4096):
            buf += chunk
            if len(buf) > MAX_TOTAL:
                raise UnlockError(f"{sent_by}'s unlock pipe holds over {MAX_TOTAL} bytes")
    except BlockingIOError:
        buf[:] = bytes(len(buf))
        raise UnlockError(f"{sent_by}'s unlock pipe is still open for writing: write the"
                          " passphrase, close the write end, then send the read end") from None
    finally:
        os.close(fd)
    try:
        return decode(buf)
    finally:
        buf[:] = bytes(len(buf))
