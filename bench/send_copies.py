"""What one more replica's payload costs the kernel, apart from trustvbd (#11).

    .venv/bin/python bench/send_copies.py [--gib 1] [--rounds 3] [--fanout]

`send`: the sender's CPU (user + system) per GiB of 256 KiB payloads into a Unix socket
(SO_SNDBUF 4 MiB, as the encryption domain's links), the copy each replica beyond the
first costs the encryption domain, against vmsplice(2) of the same pages into a pipe and
splice(2) from it into the socket, which hands the socket references to the pages instead
of copying them (the pages must then stay unchanged until the receiver has read them). A
receiver process reads and pwrites into a file, as a driver does.

`hazard`: why vmsplice cannot simply be guarded. The sender waits until SIOCOUTQ says
the socket holds none of its bytes (the receiver "consumed" them), then reuses its buffer;
the receiver, instead of reading, splices the socket into a pipe of its own and reads that
pipe afterwards. Printed: how many of the bytes it then reads are the sender's later ones.
A driver is untrusted, so any of its bytes in a reused buffer (plaintext, keys) would leak.

`pwrite`: a driver's pwrite of 256 KiB payloads into a fresh file (page cache allocated by
the write) at offsets aligned to 256 KiB against offsets 8 KiB past that (where a
replica's ciphertext lies: docs/format.md puts the data area after 8 KiB of superblock
slots and the leaf pages).

`--fanout` (instead of the above): the same payloads to two receivers (two replicas),
the sender pinned to CPU 0 and the receivers to CPU 1 (as `up`'s domains often run):
`two sends` copies each payload into each socket, as the encryption domain does; `pipe
tee` writes it once into a pipe, tee(2)s that into a second pipe and splices each pipe
into its socket, so the kernel copies it once and both sockets hold references to the
same kernel pages (pages only ever holding what both receivers get: no vmsplice hazard).
`sendfile ring` writes it once into a slot of a 16 MiB memfd ring (where the encryption
domain would seal it) and sendfile(2)s the slot into each socket: the sockets take
references to the ring's pages, which are used again and again (no fresh kernel page per
payload at all; a slot is rewritten 16 MiB later, after both receivers read it).
`shared ring` is a driver protocol that does not exist yet: the payload copied once into
a slot of a memfd each receiver has mapped read-only, and only a 16-byte descriptor
(offset, length) sent to each; the receiver pwrites straight from its mapping and answers
one byte, and a slot is rewritten only once both answered its last payload (no payload
byte crosses a socket). `ring each` is the same with one ring per receiver, the payload
copied into each (what a ring that no other driver can see costs).
Besides the sender, the receivers' CPU (with --feed, the feeder's too) is printed.
Every round is printed, not only the median: on this VM a round is now and then several
times slower, all of the extra in the copy into the socket's fresh pages (bench/README).

`--feed` (with --fanout) is `up`'s page flow: a feeder on CPU 1 sends the sender each
payload first (nbdcopy's writes; the sender's receive frees those pages on CPU 0), and
the receivers write into files that grow (new page cache per payload, not rewritten).

Medians of --rounds after one unmeasured run of each way; prints the load average.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import functools
import mmap
import os
import resource
import socket
import statistics
import tempfile
import termios
from collections.abc import Callable

CHUNK = 256 << 10
F_SETPIPE_SZ = 1031
_libc = ctypes.CDLL(None, use_errno=True)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc.vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_uint]
_libc.vmsplice.restype = ctypes.c_ssize_t
_libc.tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
_libc.tee.restype = ctypes.c_ssize_t


def _cpu(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


RING = 64  # payload slots of the `sendfile ring` and `shared ring` ways' memfd
DESCRIPTOR = 16  # `shared ring`, `ring each`: a slot's offset and length, 8 bytes each
RINGS = ("shared ring", "ring each")  # the ways whose receivers read the sender's memfd


def _receive(sock: socket.socket, path: str, wrap: int = 256 << 20) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    view = memoryview(bytearray(CHUNK))
    offset = 0
    while n := sock.recv_into(view):
        os.pwrite(fd, view[:n], offset % wrap)
        offset += n
    os.close(fd)


def _receive_shared(sock: socket.socket, ring: int, path: str, wrap: int) -> None:
    """A driver of the `shared ring` way: each message names a slot (offset, length) of
    the sender's memfd, mapped here read-only, which it pwrites from; then an ack."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    slots = mmap.mmap(ring, RING * CHUNK, prot=mmap.PROT_READ)
    view = memoryview(slots)
    offset = 0
    while True:
        head = sock.recv(DESCRIPTOR, socket.MSG_WAITALL)
        if len(head) < DESCRIPTOR:
            break
        at, length = int.from_bytes(head[:8], "little"), int.from_bytes(head[8:], "little")
        os.pwrite(fd, view[at:at + length], offset % wrap)
        offset += length
        sock.sendall(b"a")
    view.release()
    slots.close()
    os.close(fd)


def _feed(sock: socket.socket, total: int) -> None:
    payload = os.urandom(CHUNK)
    for _ in range(total // CHUNK):
        sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)


def send_once(way: str, total: int, path: str) -> float:
    """Sender CPU seconds per GiB: `copy` (sendall) or `vmsplice` (vmsplice + splice)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    pid = os.fork()
    if pid == 0:
        a.close()
        try:
            _receive(b, path)
        finally:
            os._exit(0)
    b.close()
    source = mmap.mmap(-1, 4 * CHUNK)  # four payloads, as ciphertext buffers taking turns
    source.write(os.urandom(4 * CHUNK))
    base = ctypes.addressof(ctypes.c_char.from_buffer(source))
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    start = _cpu()
    for i in range(total // CHUNK):
        at = (i % 4) * CHUNK
        if way == "copy":
            a.sendall(memoryview(source)[at:at + CHUNK])
            continue
        left = CHUNK
        while left:
            iov = _IoVec(base + at + CHUNK - left, left)
            n = _libc.vmsplice(w, ctypes.byref(iov), 1, 0)
            if n < 0:
                raise OSError(ctypes.get_errno(), "vmsplice")
            moved = 0
            while moved < n:
                moved += os.splice(r, a.fileno(), n - moved)
            left -= n
    used = _cpu() - start
    a.shutdown(socket.SHUT_WR)
    os.waitpid(pid, 0)
    a.close()
    os.close(r)
    os.close(w)
    return used / (total / (1 << 30))


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return a, b


def _child(other: socket.socket, work: Callable[[], None]) -> int:
    """Forks a process on CPU 1 that runs `work`; the parent's `other` end is closed there."""
    pid = os.fork()
    if pid == 0:
        other.close()
        try:
            os.sched_setaffinity(0, {1 % (os.cpu_count() or 1)})
            work()
        finally:
            os._exit(0)
    return pid


FANOUT_CHILDREN: list[float] = []  # each fanout_once's receivers' (and feeder's) CPU per GiB


def fanout_once(way: str, total: int, tmp: str, feed: bool = False) -> float:
    """Sender CPU seconds per GiB of guest data sent to two receivers: `two sends`,
    `pipe tee` (one copy into a pipe, tee to a second, splice each into its socket),
    `sendfile ring` (one copy into a memfd ring slot, sendfile from it to each socket),
    `shared ring` or `ring each` (the receivers pwrite from their mapping of the ring: a
    descriptor sent, an ack received). The receivers' CPU goes to FANOUT_CHILDREN."""
    os.sched_setaffinity(0, {0})
    socks, pids = [], []
    wrap = total if feed else 256 << 20
    rings = [os.memfd_create("ciphertext") for _ in range(2 if way == "ring each" else 1)]
    for fd in rings:
        os.ftruncate(fd, RING * CHUNK)
    ring = rings[0]
    children = _cpu(resource.RUSAGE_CHILDREN)
    for i in range(2):
        a, b = _pair()
        target = os.path.join(tmp, f"replica{i}.img")
        receive = (functools.partial(_receive_shared, b, rings[i % len(rings)], target, wrap)
                   if way in RINGS else functools.partial(_receive, b, target, wrap))
        pids.append(_child(a, receive))
        b.close()
        socks.append(a)
    source = None
    if feed:
        source, theirs = _pair()
        pids.append(_child(source, lambda: _feed(theirs, total)))
        theirs.close()
    payload = bytearray(os.urandom(CHUNK))
    view = memoryview(payload)
    pipes = [os.pipe(), os.pipe()]
    for _, w in pipes:
        fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
    maps = [mmap.mmap(fd, RING * CHUNK) for fd in rings]
    slots = maps[0]
    unacked = 0  # `shared ring`: payloads sent whose acks (one per receiver) are not read
    start = _cpu()
    for i in range(total // CHUNK):
        if source is not None:
            got = 0
            while got < CHUNK:
                n = source.recv_into(view[got:])
                if not n:
                    raise OSError("the feeder stopped early")
                got += n
        if way in RINGS:
            if unacked == RING:  # the slot about to be rewritten: both receivers done with it
                for sock in socks:
                    if sock.recv(1, socket.MSG_WAITALL) != b"a":
                        raise OSError("a receiver stopped early")
                unacked -= 1
            at = (i % RING) * CHUNK
            for slots in maps:
                slots[at:at + CHUNK] = payload
            head = at.to_bytes(8, "little") + CHUNK.to_bytes(8, "little")
            for sock in socks:
                sock.sendall(head)
            unacked += 1
            continue
        if way == "sendfile ring":
            at = (i % RING) * CHUNK
            slots[at:at + CHUNK] = payload
            for sock in socks:
                done = 0
                while done < CHUNK:
                    done += os.sendfile(sock.fileno(), ring, at + done, CHUNK - done)
            continue
        if way == "two sends":
            for sock in socks:
                sock.sendall(payload)
            continue
        if os.write(pipes[0][1], payload) != CHUNK:
            raise OSError("short write into an empty pipe of the payload's size")
        if _libc.tee(pipes[0][0], pipes[1][1], CHUNK, 0) != CHUNK:
            raise OSError(ctypes.get_errno(), "tee")
        for (r, _), sock in zip(pipes, socks, strict=True):
            left = CHUNK
            while left:
                left -= os.splice(r, sock.fileno(), left)
    if way in RINGS:  # the last acks: the sender's part of their wake-ups
        for sock in socks:
            if len(sock.recv(unacked, socket.MSG_WAITALL)) != unacked:
                raise OSError("a receiver stopped early")
    used = _cpu() - start
    for sock in socks:
        sock.shutdown(socket.SHUT_WR)
    for pid in pids:
        os.waitpid(pid, 0)
    FANOUT_CHILDREN.append((_cpu(resource.RUSAGE_CHILDREN) - children) / (total / (1 << 30)))
    for sock in socks:
        sock.close()
    for fds in pipes:
        for fd in fds:
            os.close(fd)
    if source is not None:
        source.close()
    for slots, fd in zip(maps, rings, strict=True):
        slots.close()
        os.close(fd)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return used / (total / (1 << 30))


def splice_keeps_pages(size: int = 64 << 10) -> int:
    """Bytes of the sender's buffer, rewritten after SIOCOUTQ fell to 0, that a receiver
    which spliced the socket into its own pipe reads afterwards (0: vmsplice + an
    SIOCOUTQ wait would be safe; `size`: every later byte leaks)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    source = mmap.mmap(-1, size)
    source.write(b"C" * size)  # what the driver may see: "ciphertext"
    r, w = os.pipe()
    theirs_r, theirs_w = os.pipe()  # the receiver's own pipe
    for fd in (w, theirs_w):
        fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
    try:
        iov = _IoVec(ctypes.addressof(ctypes.c_char.from_buffer(source)), size)
        if _libc.vmsplice(w, ctypes.byref(iov), 1, 0) != size:
            raise OSError(ctypes.get_errno(), "vmsplice")
        moved = 0
        while moved < size:
            moved += os.splice(r, a.fileno(), size - moved)
        got = 0
        while got < size:
            got += os.splice(b.fileno(), theirs_w, size - got)
        outq = int.from_bytes(fcntl.ioctl(a.fileno(), termios.TIOCOUTQ, bytes(4)), "little")
        if outq:
            raise RuntimeError(f"SIOCOUTQ is {outq} after the receiver took every byte")
        source.seek(0)
        source.write(b"P" * size)  # reused: "plaintext"
        return os.read(theirs_r, size).count(b"P")
    finally:
        for fd in (r, w, theirs_r, theirs_w):
            os.close(fd)
        a.close()
        b.close()
        source.close()


def pwrite_once(shift: int, total: int, path: str) -> float:
    """CPU seconds per GiB of pwrites into a truncated file, `shift` bytes past alignment."""
    payload = os.urandom(CHUNK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, total + (1 << 20))
    start = _cpu()
    for offset in range(0, total, CHUNK):
        os.pwrite(fd, payload, offset + shift)
    used = _cpu() - start
    os.close(fd)
    return used / (total / (1 << 30))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fanout", action="store_true",
                        help="two receivers: two sends against pipe + tee, a sendfile ring and "
                             "rings the receivers map")
    parser.add_argument("--feed", action="store_true",
                        help="with --fanout: a feeder sends the sender each payload first, and "
                             "the receivers' files grow (up's page flow)")
    args = parser.parse_args()
    total = args.gib << 30
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        path = os.path.join(tmp, "target.img")
        ways: dict[str, Callable[[], float]]
        if args.fanout:
            ways = {name: functools.partial(fanout_once, name, total, tmp, args.feed)
                    for name in ("two sends", "pipe tee", "sendfile ring", "shared ring",
                                 "ring each")}
        else:
            ways = {"send copy": lambda: send_once("copy", total, path),
                    "send vmsplice": lambda: send_once("vmsplice", total, path),
                    "pwrite aligned": lambda: pwrite_once(0, total, path),
                    "pwrite +8 KiB": lambda: pwrite_once(8192, total, path)}
        runs: dict[str, list[float]] = {name: [] for name in ways}
        others: dict[str, list[float]] = {name: [] for name in ways}
        for way in ways.values():
            way()  # unmeasured
        for _ in range(args.rounds):
            for name, way in ways.items():  # interleaved
                FANOUT_CHILDREN.clear()
                runs[name].append(way())
                others[name].extend(FANOUT_CHILDREN)
        for name, cpus in runs.items():
            print(f"{name:15} {statistics.median(cpus):.3f} s CPU per GiB "
                  f"(runs: {', '.join(f'{c:.3f}' for c in cpus)})"
                  + (f"; receivers{' + feeder' if args.feed else ''} "
                     f"{statistics.median(others[name]):.3f}" if others[name] else ""))
    if args.fanout:
        print(f"load average: {os.getloadavg()[0]:.2f}")
        return 0
    leaked = splice_keeps_pages()
    print(f"hazard: after SIOCOUTQ fell to 0, a receiver that spliced into its own pipe read "
          f"{leaked} of {64 << 10} bytes the sender wrote later")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
