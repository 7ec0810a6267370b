"""CPU of the encryption layer alone: a CryptDisk over an in-memory replica, no NBD, no driver.

    cd /tmp && PYTHONPATH=TREE TREE/.venv/bin/python TREE/bench/crypt_layer_cpu.py [--threads N] [--size MiB]

Sequential 256 KiB writes and reads (8 in flight) over the whole disk, then 20k 4 KiB random
writes and reads (16 in flight). Prints CPU seconds (this process, every thread, plus any
AEAD worker processes of trees before #13) per GiB and per 100k requests, and wall time.
With PYTHONPATH set to another tree (`git archive main | tar -x -C DIR`) it measures that
tree's package: an A/B of the data path's CPU that the machine's load disturbs far less
than throughput. Run it from outside the trees: an old tree's worker processes start with
`-m`, which puts the current directory's package first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from trustvbd.blocks.aead_pool import AeadPool
from trustvbd.blocks.crypt_layer import CryptDisk, create_disk_state, load_kek, physical_size
from trustvbd.blocks.file import MemoryBackend

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pool: Any) -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    for pid in pool.worker_pids() if hasattr(pool, "worker_pids") else []:  # trees before #13
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


async def measure(threads: int, size: int) -> list[tuple[str, float, str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="tvlayer"))
    kek = load_kek(tmp)
    create_disk_state(tmp, "d", size, kek)
    start = getattr(AeadPool, "start", None)
    pool: Any = await start(threads) if start is not None else AeadPool(threads)
    disk = await CryptDisk.open(tmp, "d", MemoryBackend(physical_size(size)), "r0", kek, aead=pool)
    chunk, block = os.urandom(256 << 10), os.urandom(4096)
    rng = random.Random(1)

    async def bounded(jobs: list[Callable[[], Awaitable[Any]]], depth: int) -> int:
        sem = asyncio.Semaphore(depth)

        async def one(job: Callable[[], Awaitable[Any]]) -> None:
            async with sem:
                await job()
        await asyncio.gather(*(one(j) for j in jobs))
        return len(jobs)

    def seq(write: bool) -> Awaitable[int]:
        return bounded([partial(disk.pwrite, o, chunk) if write else partial(disk.pread, o, len(chunk))
                        for o in range(0, size, len(chunk))], 8)

    def rand(write: bool) -> Awaitable[int]:
        offsets = [rng.randrange(size // 4096) * 4096 for _ in range(20_000)]
        return bounded([partial(disk.pwrite, o, block) if write else partial(disk.pread, o, 4096)
                        for o in offsets], 16)

    rows = []
    try:
        for name, run, per in (("sequential write", lambda: seq(True), "GiB"),
                               ("sequential read", lambda: seq(False), "GiB"),
                               ("4 KiB random write", lambda: rand(True), "100k requests"),
                               ("4 KiB random read", lambda: rand(False), "100k requests")):
            c0, t0 = cpu_seconds(pool), time.perf_counter()
            n = await run()
            c1, t1 = cpu_seconds(pool), time.perf_counter()
            scale = (1 << 30) / size if per == "GiB" else 100_000 / n
            rows.append((name, (c1 - c0) * scale, per, t1 - t0))
        await disk.flush()
    finally:
        await disk.close()
        await pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="AEAD threads (workers in old trees)")
    parser.add_argument("--size", type=int, default=256, help="MiB")
    args = parser.parse_args()
    for name, cpu, per, wall in asyncio.run(measure(args.threads, args.size << 20)):
        print(f"{name:20s} {cpu:6.2f} s CPU per {per:14s} (wall {wall:5.2f} s)")


if __name__ == "__main__":
    main()
