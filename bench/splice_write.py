"""Kernel CPU of taking write payloads from a socket into a file: copy, splice, mmap (#13, #11).

    .venv/bin/python bench/splice_write.py [--gib 2] [--rounds 3] [--chunk 262144]

The driver domain receives each WRITE payload into a buffer (recv_into) and pwrites it.
The alternatives measured here: splice the payload socket -> pipe (F_SETPIPE_SZ 1 MiB) ->
file (os.splice), which skips the copy into user memory; and receive it straight into a
shared mapping of the file (`mmap`; `mmap+populate` first faults the range in with
MADV_POPULATE_WRITE), which skips pwrite's copy. A sender process writes NBD-sized
payloads into a Unix socket pair; the receiver's CPU (user + system) per GiB is measured
for each way over a file whose page cache exists (`rewrite`) and over a freshly truncated
one (`fresh`). Each way runs once unmeasured, then `--rounds` times: on this VM the first
writes into freed memory after a while are slowed by the host giving the memory back
(page reporting), whichever way wrote them. Not part of the test suite; prints medians.
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import resource
import socket
import statistics
import tempfile

F_SETPIPE_SZ = 1031
MADV_POPULATE_WRITE = 23  # Linux 5.14


def _send(sock: socket.socket, total: int, chunk: int) -> None:
    payload = os.urandom(chunk)
    for _ in range(total // chunk):
        sock.sendall(payload)


def _take_by_copy(sock: socket.socket, fd: int, total: int, chunk: int) -> None:
    view = memoryview(bytearray(chunk))
    for off in range(0, total, chunk):
        got = 0
        while got < chunk:
            n = sock.recv_into(view[got:])
            if n == 0:
                raise EOFError("sender stopped early")
            got += n
        os.pwrite(fd, view, off)


def _take_by_splice(sock: socket.socket, fd: int, total: int, chunk: int) -> None:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
        off = 0
        for _ in range(total // chunk):
            left = chunk
            while left:
                n = os.splice(sock.fileno(), w, left)
                if n == 0:
                    raise EOFError("sender stopped early")
                moved = 0
                while moved < n:
                    moved += os.splice(r, fd, n - moved, offset_dst=off + moved)
                off += n
                left -= n
    finally:
        os.close(r)
        os.close(w)


def _take_by_mmap(sock: socket.socket, fd: int, total: int, chunk: int, populate: bool) -> None:
    with mmap.mmap(fd, total) as mapped:
        view = memoryview(mapped)
        try:
            for off in range(0, total, chunk):
                if populate:
                    mapped.madvise(MADV_POPULATE_WRITE, off, chunk)
                got = 0
                while got < chunk:
                    n = sock.recv_into(view[off + got:off + chunk])
                    if n == 0:
                        raise EOFError("sender stopped early")
                    got += n
        finally:
            view.release()


WAYS = {
    "copy": _take_by_copy,
    "splice": _take_by_splice,
    "mmap": lambda s, f, t, c: _take_by_mmap(s, f, t, c, False),
    "mmap+populate": lambda s, f, t, c: _take_by_mmap(s, f, t, c, True),
}


def one(way: str, path: str, total: int, chunk: int, fresh: bool) -> float:
    """Receiver CPU seconds per GiB for one run."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0), 0o600)
    os.ftruncate(fd, total)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        a.close()
        try:
            _send(b, total, chunk)
        finally:
            os._exit(0)
    b.close()
    before = resource.getrusage(resource.RUSAGE_SELF)
    WAYS[way](a, fd, total, chunk)
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.waitpid(pid, 0)
    a.close()
    os.close(fd)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu / (total / (1 << 30))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=256 * 1024)
    args = parser.parse_args()
    total = args.gib << 30
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        path = os.path.join(tmp, "target.img")
        for fresh in (False, True):
            runs: dict[str, list[float]] = {way: [] for way in WAYS}
            for way, cpus in runs.items():
                one(way, path, total, args.chunk, fresh=True)  # the file and its page cache exist
                cpus += [one(way, path, total, args.chunk, fresh) for _ in range(args.rounds)]
            kind = "fresh" if fresh else "rewrite"
            for way, cpus in runs.items():
                print(f"{kind:8} {way:6} {args.chunk // 1024} KiB writes: receiver CPU "
                      f"{statistics.median(cpus):.3f} s/GiB (runs: "
                      f"{', '.join(f'{c:.3f}' for c in cpus)})")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
