"""The ciphertext ring a driver maps read-only (docs/driver-ring.md): its descriptor
passed once, in the handshake, by SCM_RIGHTS over the NBD connection's Unix socket.

The encryption domain makes the ring (a memfd sealed against resizing) and passes a
read-only descriptor of it; a driver checks what it received before it agrees: one
descriptor, open read-only, sealed against shrinking and growing, the size announced.
A driver that maps it can then never write it, and never fault on it (a shrunk file
would raise SIGBUS on a read past its new end).
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import os
import socket
import stat

RING_MAX = 1 << 30  # the largest ring a driver maps
PAGE = 4096
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def make_ring(size: int, name: str = "trustvbd-ring") -> tuple[int, int]:
    """A new ring of `size` bytes: (its read-write descriptor, a read-only one to pass)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
        # Reopened through /proc: a new open file description, read-only, so whoever
        # receives it cannot map it writable (mmap PROT_WRITE MAP_SHARED: EACCES).
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(fd)
        raise
    return fd, ro


def check_ring(fd: int, size: int) -> str | None:
    """Why the descriptor received cannot be the ring of `size` bytes; None if it can."""
    if not 0 < size <= RING_MAX or size % PAGE:
        return f"a ring of {size} bytes: it must be a multiple of {PAGE} up to {RING_MAX}"
    try:
        st = os.fstat(fd)
        mode = fcntl.fcntl(fd, fcntl.F_GETFL)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        return f"the descriptor is not a sealed memory file ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "the descriptor is not a regular (memory) file"
    if mode & os.O_ACCMODE != os.O_RDONLY:
        return "the descriptor is not open read-only (reopen it O_RDONLY through /proc/self/fd)"
    if seals & SEALS != SEALS:
        return "the ring is not sealed against resizing (F_SEAL_SHRINK and F_SEAL_GROW)"
    if st.st_size != size:
        return f"the ring is {st.st_size} bytes, not the {size} announced"
    return None


def wake(ready: asyncio.Future[None]) -> None:
    """A reader's or writer's callback: `ready` is done."""
    if not ready.done():
        ready.set_result(None)


def send_fd(sock: socket.socket, fd: int) -> None:
    """One byte carrying `fd` (SCM_RIGHTS); the socket's buffer has room for it."""
    sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


async def receive_fd(sock_fd: int) -> tuple[int | None, str | None]:
    """On the loop: the one byte carrying one descriptor, from the socket `sock_fd` (its
    transport's reading paused): (descriptor, None), or (None, why not)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=os.dup(sock_fd))
    try:
        sock.setblocking(False)
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())
        data, ancillary, flags, _ = sock.recvmsg(1, socket.CMSG_SPACE(4 * 4),
                                                 socket.MSG_CMSG_CLOEXEC)
    finally:
        sock.close()  # the duplicate; the transport's descriptor stays open
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
    if len(data) != 1 or len(fds) != 1 or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        if not data:
            return None, "the connection closed before the ring's descriptor came"
        return None, f"expected one byte carrying one descriptor, got {len(data)} carrying {len(fds)}"
    return fds[0], None
