"""The mirror's write fan-out alone: CPU per GiB of the sender and of each driver (issue #11).

    .venv/bin/python bench/fanout.py [--replicas 1 2 3] [--size 512MiB] [--depth 16] [--reps 3]

A ReplicaSet over N `trustvbd driver` processes (each its own sparse file, Unix socket),
linked as the encryption domain links them (NbdClient, ReplicaLink, SpaceWatch), receives
SIZE of 256 KiB writes (--request), `depth` at a time, of one ciphertext-sized buffer: no guest, no
encryption, no commit. Reported per GiB written: this process's CPU (user, system) and each
driver's (all its worker processes), wall-clock MB/s, and the load average. What grows from
1 to 2 replicas is the cost of one more replica, on both sides of the socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import procstat
from servers import TRUSTVBD, parse_size, sparse, start_ready, stop_proc, workdir

from trustvbd.blocks.reconnect import ReplicaLink
from trustvbd.blocks.replica import Replica
from trustvbd.blocks.replica_set import ReplicaSet
from trustvbd.blocks.space import SpaceWatch
from trustvbd.crypt.superblock import Layout
from trustvbd.nbd.client import NbdClient

GiB = 1 << 30
REQUEST = 256 << 10


def start_driver(work: Path, i: int, size: int,
                 tree: Path | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    sock = work / f"d{i}.sock"
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree is not None else None
    proc = start_ready([*TRUSTVBD, "driver", "--file", str(sparse(work / f"d{i}.img", size)),
                        "--size", str(size), "--socket", str(sock)], work, f"driver{i}",
                       env=env, cwd="/")  # `-m` would put the current directory's tree first
    return f"nbd+unix:///?socket={sock}", proc


async def fan_out(uris: list[str], size: int, depth: int,
                  request: int = REQUEST) -> tuple[float, float, float]:
    """(seconds, user CPU s, system CPU s) of writing `size` bytes through a ReplicaSet."""
    lay = Layout.for_size(size)
    replicas = []
    for i, uri in enumerate(uris):
        client = await NbdClient.open_uri(uri)

        async def never() -> NbdClient:
            raise ConnectionError("the benchmark does not reconnect")
        link = ReplicaLink(client, f"d{i}", never, retry_window=0 if len(uris) > 1 else 10.0)
        replicas.append(Replica(f"d{i}", SpaceWatch(link, "bench", f"d{i}")))
    rs = ReplicaSet("bench", lay, replicas)
    data = memoryview(os.urandom(request))
    offsets = iter(range(lay.data_start, lay.data_start + size, request))

    async def writer() -> None:
        for offset in offsets:
            await rs.pwrite(offset, data)

    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(depth)))
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    await rs.flush()
    await rs.close()
    return elapsed, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def by_driver(work: Path) -> dict[str, float]:
    """CPU seconds of each driver, its forked workers included (the writes hit one of them)."""
    roots = {int(pid): role for pid, role in
             (line.split() for line in (work / "bench.pids").read_text().splitlines() if line)}
    out: dict[str, float] = {}
    for pid, (_, seconds) in procstat.snapshot(work).items():
        root = pid if pid in roots else procstat.parent(pid)
        if root in roots:
            out[roots[root]] = out.get(roots[root], 0.0) + seconds
    return out


def measure(replicas: int, size: int, depth: int, tree: Path | None = None,
            request: int = REQUEST) -> dict[str, float]:
    import uvloop

    with workdir() as work, contextlib.ExitStack() as stops:  # a driver started is stopped
        uris = []
        for i in range(replicas):
            uri, proc = start_driver(work, i, Layout.for_size(size).physical_size, tree)
            stops.callback(stop_proc(proc))
            uris.append(uri)
        before = by_driver(work)
        elapsed, user, system = uvloop.run(fan_out(uris, size, depth, request))
        after = by_driver(work)
        drivers = {k: after[k] - before.get(k, 0.0) for k in after}
    gib = size / GiB
    out = {"MB/s": size / elapsed / 1e6, "sender user": user / gib, "sender sys": system / gib,
           "load": os.getloadavg()[0]}
    out.update({role: s / gib for role, s in sorted(drivers.items())})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--size", default="512MiB")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--request", default="256KiB", help="bytes per write")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also rows whose drivers run the trustvbd package in DIR (A/B)")
    args = parser.parse_args()
    size = parse_size(args.size)
    rows = [(str(n), n, None) for n in args.replicas]
    if args.baseline is not None:
        rows += [(f"{n} [baseline drivers]", n, args.baseline) for n in args.replicas]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in rows}
    for rep in range(args.reps):
        for name, n, tree in rows:  # interleaved: drift hits every row alike
            result = measure(n, size, args.depth, tree, parse_size(args.request))
            runs[name].append(result)
            print(f"rep {rep + 1} {name} replica(s): " + ", ".join(
                f"{k} {v:.2f}" for k, v in result.items()), file=sys.stderr)
    print(f"\n{args.size} of {args.request} writes, depth {args.depth}, medians of {args.reps}; "
          "CPU in s per GiB written\n")
    keys = sorted({k for rs in runs.values() for r in rs for k in r},
                  key=lambda k: (k != "MB/s", k == "load", k))
    print("| replicas | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for n, results in runs.items():
        cells = [f"{statistics.median(r.get(k, 0.0) for r in results):.2f}" for k in keys]
        print(f"| {n} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
