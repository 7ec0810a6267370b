"""Python calls and CPU per small guest WRITE (or READ) on the encryption domain's loop thread.

    cd /tmp && PYTHONPATH=TREE TREE/.venv/bin/python TREE/bench/write_calls.py [--qd 16]
        [--writes 8000] [--replicas 2] [--reps 3] [--budget] [--flush | --read] [--mib 64] [--kib 4]
        [--nbdkit]

The disk over in-memory NBD drivers in threads (as tests/crypt/test_native_reads.py opens
it; their Python takes the GIL from the loop thread: with --nbdkit they are nbdkit memory
processes instead, as `up`'s drivers are processes), served by our NbdServer on a Unix
socket on uvloop (as the domain runs it); a libnbd
guest in a subprocess writes 4 KiB blocks at random offsets with `--qd` requests in flight
(no FUA, no FLUSH until the end), or with --seq one after another from block 0 (as
fuse2fs writes a file's data, one 4 KiB request at a time), or with --flush one at a time
each followed by a FLUSH (fsync per write; counts are then per write + FLUSH pair, and the
loop thread's CPU holds the syncs made on it), or with --read READs at random offsets of a
disk all written before (the native read plane's path). --budget serves the guest as
the encryption domain does, with a memory budget ([limits] memory, 256 MiB) and an idle
timeout; without it, neither. --kib 256 writes 256 KiB instead (nbdcopy's requests, which
are not answered behind but wait for their replicas: the fan-out's Python per write).
The cycle collector and the heap are set as in the domain.
Counted on the event loop's thread only (the drivers and the guest are elsewhere): Python
calls (`sys.setprofile` "call" events) and C calls per write, and that thread's CPU
(time.thread_time) per write, profiled and unprofiled, and its sleeps per write (voluntary
context switches: each one a wake-up this VM pays for in the kernel), unprofiled. With PYTHONPATH set to another
tree (`git archive COMMIT | tar -x -C DIR`, with an extension built from that commit) it
measures that tree: a same-run A/B that the machine's load barely disturbs (counts are
exact; CPU is per request, not throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from tests.crypt.helpers import RawMemory, new_state
from tests.nbd.helpers import ServerThread
from trustvbd.blockdev import Backend
from trustvbd.blocks.crypt_layer import CryptDisk, physical_size
from trustvbd.blocks.reconnect import RETRY_WINDOW, ReplicaLink
from trustvbd.config import Limits
from trustvbd.domains.common import keep_freed_memory, quiet_garbage_collector
from trustvbd.nbd.budget import MemoryBudget
from trustvbd.nbd.client import NbdClient
from trustvbd.nbd.exports import Export, StaticExports
from trustvbd.nbd.server import NbdServer

TOP = int(os.environ.get("WRITE_CALLS_TOP", "0"))  # print the busiest functions
GUEST = r"""
import random, sys
sys.path.append("/usr/lib/python3/dist-packages")
import nbd
uri, qd, count, blocks, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
unit = int(sys.argv[7])
seq, flush, read = sys.argv[6] == "seq", sys.argv[6] == "flush", sys.argv[6] == "read"
rnd = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
raw = rnd.randbytes(unit)
buf = nbd.Buffer.from_bytearray(bytearray(raw))
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
sent = 0
while flush and sent < count:
    h.pwrite(raw, rnd.randrange(blocks) * unit)
    h.flush()
    sent += 1
while sent < count or h.aio_in_flight() > 0:
    while sent < count and h.aio_in_flight() < qd:
        if read:
            h.aio_pread(buf, rnd.randrange(blocks) * unit)
        else:
            h.aio_pwrite(buf, (sent % blocks if seq else rnd.randrange(blocks)) * unit)
        sent += 1
    h.poll(-1)
h.flush()
h.shutdown()
"""


@contextlib.contextmanager
def drivers(tmp: Path, n: int, size: int, nbdkit: bool) -> Iterator[list[str]]:
    if nbdkit:  # drivers in processes of their own, as `up` has them
        socks = [tmp / f"d{i}.sock" for i in range(n)]
        procs = [subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory",
                                   str(physical_size(size))]) for sock in socks]
        try:
            deadline = time.monotonic() + 30
            while not all(sock.exists() for sock in socks) and time.monotonic() < deadline:
                time.sleep(0.02)
            yield [f"nbd+unix:///?socket={sock}" for sock in socks]
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
        return
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(ServerThread(StaticExports([Export("", RawMemory(
            physical_size(size)))]), tmp / f"d{i}.sock")).uri() for i in range(n)]


@contextlib.asynccontextmanager
async def opened(tmp: Path, uris: list[str], size: int) -> AsyncIterator[CryptDisk]:
    kek = new_state(tmp / "state", size=size)
    links: list[tuple[str, Backend]] = []
    for i, uri in enumerate(uris):
        # Each behind a ReplicaLink, as the domain has them (crypt_stack.py): it skips a
        # FLUSH when every write since the last went with FUA. A mirror's links do not
        # retry (retry_window 0): with one, its writes behind went one by one by pwrite.
        connect = partial(NbdClient.open_uri, uri, request_timeout=30.0)
        links.append((f"r{i}", ReplicaLink(await connect(), f"r{i}", connect,
                                           retry_window=0 if len(uris) > 1 else RETRY_WINDOW)))
    disk = await CryptDisk.open_mirrored(tmp / "state", "vm1", links, kek)
    try:
        yield disk
    finally:
        await disk.close()


def sleeps() -> int:
    """This thread's voluntary context switches so far: how often it slept."""
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


async def measure(tmp: Path, disk: CryptDisk, qd: int, writes: int, profile: bool,
                  seed: int, mode: str, budget: bool, unit: int = 4096
                  ) -> tuple[float, float, float, float]:
    sock = tmp / f"g{seed}.sock"
    server = NbdServer(StaticExports([Export("", disk)]), identity="bench-guest",
                       budget=MemoryBudget(Limits().memory) if budget else None,
                       idle_timeout=Limits().idle_timeout if budget else None)
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(sock))
    listening.listen(4)
    serving = asyncio.ensure_future(server.serve_socket(listening))
    blocks = disk.size // unit
    guest = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", "-c", GUEST, f"nbd+unix:///?socket={sock}", str(qd), str(writes),
        str(blocks), str(seed), mode, str(unit), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert guest.stdin is not None and guest.stdout is not None
    await guest.stdout.readline()  # connected
    counts = {"call": 0, "c_call": 0}
    where: dict[str, int] = {}

    def count(frame: FrameType, event: str, arg: Any) -> None:
        if event in counts:
            counts[event] += 1
            if TOP:
                code = frame.f_code
                key = (f"{Path(code.co_filename).name}:{code.co_name}" if event == "call"
                       else f"C {getattr(arg, '__qualname__', arg)}")
                where[key] = where.get(key, 0) + 1

    cpu0, slept0 = time.thread_time(), sleeps()
    if profile:
        sys.setprofile(count)
    try:
        guest.stdin.write(b"go\n")
        await guest.stdin.drain()
        await guest.wait()
    finally:
        sys.setprofile(None)
    cpu, slept = time.thread_time() - cpu0, sleeps() - slept0
    for key, n in sorted(where.items(), key=lambda kv: -kv[1])[:TOP]:
        print(f"  {n / writes:6.2f} {key}")
    await server.close()
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    listening.close()
    return counts["call"] / writes, counts["c_call"] / writes, cpu / writes * 1e6, slept / writes


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="wc", dir="/tmp") as d:
        tmp = Path(d)
        size = args.mib << 20
        with drivers(tmp, args.replicas, size, args.nbdkit) as uris:
            async with opened(tmp, uris, size) as disk:
                mode = ("flush" if args.flush else "seq" if args.seq else "read" if args.read
                        else "random")
                what = "write + FLUSH pair" if args.flush else "read" if args.read else "write"
                if args.read:  # all of it written: each READ goes to a replica
                    for at in range(0, size, 1 << 20):
                        await disk.pwrite(at, b"\x5a" * (1 << 20))
                    await disk.flush()
                for rep in range(args.reps):
                    calls, ccalls, _, _ = await measure(tmp, disk, args.qd, args.writes, True, 2 * rep,
                                                        mode, args.budget, args.kib * 1024)
                    _, _, cpu, slept = await measure(tmp, disk, args.qd, args.writes, False, 2 * rep + 1,
                                                     mode, args.budget, args.kib * 1024)
                    print(f"{mode} qd {1 if args.flush else args.qd} replicas "
                          f"{args.replicas}: {calls:.1f} Python calls, "
                          f"{ccalls:.1f} C calls per {what}; loop thread CPU {cpu:.1f} us per "
                          f"{what}, {slept:.2f} sleeps per {what} (unprofiled)", flush=True)
                if args.read:
                    print(f"reads started natively: {disk._plane.started}")
                started = getattr(getattr(disk, "_wplane", None), "started", None)
                if started is not None:
                    print(f"writes taken natively: {started}")
                behind = getattr(disk, "_behind", None)
                if behind is not None:
                    print(f"writes behind: {behind.started}, replica writes (runs) {behind.sends}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qd", type=int, default=16)
    parser.add_argument("--writes", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--mib", type=int, default=64, help="the disk's size in MiB")
    parser.add_argument("--nbdkit", action="store_true",
                        help="drivers: nbdkit memory processes, not threads of this process")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seq", action="store_true",
                        help="sequential 4 KiB writes (as a file copy through FUSE), not random")
    parser.add_argument("--flush", action="store_true",
                        help="one write at a time, each followed by a FLUSH (fsync per write)")
    parser.add_argument("--read", action="store_true",
                        help="reads at random offsets of a disk all written, not writes")
    parser.add_argument("--kib", type=int, default=4,
                        help="KiB per write (256: nbdcopy's sequential writes, which wait for "
                        "their replicas)")
    parser.add_argument("--budget", action="store_true",
                        help="a memory budget and an idle timeout, as the encryption domain has")
    import uvloop  # the encryption domain's loop (domains/common.py)

    # The domain's collector and heap settings (domains/common.py, crypt.py): without them
    # the cycle collector took ~18 % of the loop thread here (perf), a cost the domain has not.
    keep_freed_memory()
    quiet_garbage_collector()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(parser.parse_args()))
