"""CPU per 4 KiB request of trustvbd's NBD server path, A/B against another tree, with the
client's batching held fixed.

    .venv/bin/python bench/nbd_server_cpu.py --baseline DIR [--requests 100000] [--reps 5]
                                             [--servers driver crypt1 crypt2] [--this DIR]

Runs each server from this checkout (or from the tree --this names, so the checkout can
change while it runs) and from DIR (PYTHONPATH: e.g. `git archive main` with main's built
trustvbd/_native.abi3.so), interleaved: `driver` is `trustvbd driver` alone (the NBD
server over a file); `crypt1` and `crypt2` are `trustvbd up`, encrypted, over 1 and 2
replicas (its driver domains run this checkout's code in both rows, so only
the crypt domain is an A/B there). libnbd sends a fixed number of 4 KiB random writes,
then reads of the same blocks, in batches of --depth (all sent, then all awaited), so
both trees see the same batching whatever the load of the machine: fio's CPU per
request moves with its IOPS, since a loaded machine batches fewer requests per wake-up.
Prints CPU seconds per 100k requests of each process role (bench/procstat.py), medians
of --reps, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from pathlib import Path

import procstat
from servers import Server, trustvbd_driver, trustvbd_up, workdir

sys.path.append("/usr/lib/python3/dist-packages")  # Debian's python3-libnbd
import nbd  # type: ignore[import-not-found]

SIZE = 1 << 30
BLOCK = 4096


def drive(uri: str, kind: str, requests: int, depth: int) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    rnd = random.Random(7)
    bufs = [nbd.Buffer(BLOCK) for _ in range(depth)]
    payload = nbd.Buffer.from_bytearray(bytearray(os.urandom(BLOCK)))
    pending = [0]

    def done(error: nbd.Error) -> int:  # libnbd's c_int: the command's errno
        pending[0] -= 1
        if error.value:
            raise RuntimeError(f"{kind} failed: errno {error.value}")
        return 1  # retire the command

    for _ in range(requests // depth):
        for i in range(depth):
            offset = rnd.randrange(SIZE // BLOCK) * BLOCK
            if kind == "read":
                h.aio_pread(bufs[i], offset, completion=done)
            else:
                h.aio_pwrite(payload, offset, completion=done)
        pending[0] += depth
        while pending[0]:
            h.poll(-1)
    h.shutdown()


def one(server: Server, requests: int, depth: int) -> dict[str, dict[str, float]]:
    """kind -> role -> CPU seconds per 100k requests."""
    out = {}
    with workdir() as work:
        uri, stop = server.start(work)
        try:
            for kind in ("write", "read"):  # written first: reads then find data
                drive(uri, kind, depth * 64, depth)  # warm up: page cache, pools
                before = procstat.snapshot(work)
                drive(uri, kind, requests, depth)
                used = procstat.used(before, procstat.snapshot(work))
                out[kind] = {role: s * 100_000 / requests for role, s in used.items()}
        finally:
            stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--this", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--servers", nargs="+", choices=["driver", "crypt1", "crypt2"],
                        default=["driver", "crypt2"])
    args = parser.parse_args()
    base = args.baseline.resolve()
    this = args.this.resolve() if args.this is not None else None
    make = {"driver": (lambda tree: trustvbd_driver(SIZE, tree=tree), "driver"),
            "crypt1": (lambda tree: trustvbd_up(SIZE, True, 1, tree=tree), "crypt"),
            "crypt2": (lambda tree: trustvbd_up(SIZE, True, 2, tree=tree), "crypt")}
    print(f"load average {os.getloadavg()[0]:.2f} at start")
    for name in args.servers:
        build, role = make[name]
        runs: dict[str, list[dict[str, dict[str, float]]]] = {"this tree": [], "baseline": []}
        for _ in range(args.reps):
            runs["this tree"].append(one(build(this), args.requests, args.depth))
            runs["baseline"].append(one(build(base), args.requests, args.depth))
        for kind in ("read", "write"):
            cells = {}
            for tree, reps in runs.items():
                values = [rep[kind].get(role, 0.0) for rep in reps]
                cells[tree] = (statistics.median(values), values)
            (new, news), (old, olds) = cells["this tree"], cells["baseline"]
            print(f"{name}: 4 KiB random {kind} QD{args.depth}, {role} s CPU per 100k: this tree "
                  f"{new:.2f} ({', '.join(f'{x:.2f}' for x in news)}), baseline {old:.2f} "
                  f"({', '.join(f'{x:.2f}' for x in olds)}): {new / old:.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
