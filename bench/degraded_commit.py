"""A commit while a replica is behind (#11): what storing its dirty map costs, by disk size.

In a fresh process per tree (this one, and `--baseline DIR` if given): a mirror of two
sparse in-memory replicas (tests/crypt/test_lazy_leaves.SparseMemory), one of which then
fails its writes; `--scatter` single blocks written at random over the disk (not timed;
past 64 Ki of them the map coarsens); then `--rounds` times: 16 blocks written at the start and 16 at the end of
the disk, then a full commit (CryptDisk.commit, what a FLUSH does every CHECKPOINT_BLOCKS
logged blocks or when membership changes). Reported per commit: wall time and the
process's CPU time (median, max), and the size of the stored map (behind/r1).

    .venv/bin/python bench/degraded_commit.py --size 16TiB --baseline /tmp/base_bc6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BS = 4096


async def one(size: int, rounds: int, scatter: int) -> dict[str, float]:
    from tests.crypt.test_lazy_leaves import SparseMemory
    from trustvbd.blockdev import BlockError, Buffer
    from trustvbd.blocks.crypt_layer import CryptDisk, Layout, create_disk_state, load_kek
    from trustvbd.blocks.layer import Layer

    class Failable(Layer):
        fail = False

        async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
            if self.fail:
                raise BlockError(5, "injected")
            await self.next.pwrite(offset, data, fua)

        async def flush(self) -> None:
            if self.fail:
                raise BlockError(5, "injected")
            await self.next.flush()

        async def close(self) -> None:
            pass

    lay = Layout(size)
    links = [Failable(SparseMemory(lay.physical_size)) for _ in range(2)]
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tvdc") as tmp:
        state = Path(tmp)
        kek = load_kek(state)
        create_disk_state(state, "big", size, kek)
        disk = await CryptDisk.open_mirrored(state, "big", [("r0", links[0]), ("r1", links[1])], kek)
        await disk.pwrite(0, bytes(BS))
        await disk.commit()
        links[1].fail = True
        rng = random.Random(7)
        for n, b in enumerate(rng.randrange(lay.blocks) for _ in range(scatter)):
            await disk.pwrite(b * BS, bytes([1]) * BS)
            if n % 4096 == 4095:
                await disk.flush()  # the log stands for a commit (no map written)
        walls, cpus = [], []
        for i in range(rounds):
            for b0 in (16 * i, lay.blocks - 16 * (i + 1)):
                await disk.pwrite(b0 * BS, bytes([i + 1]) * (16 * BS))
            w0, c0 = time.perf_counter(), time.process_time()
            await disk.commit()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        out["map_bytes"] = (state / "disks" / "big" / "behind" / "r1").stat().st_size
        await disk.close()
    out |= {"commit_wall_median_s": statistics.median(walls), "commit_wall_max_s": max(walls),
            "commit_cpu_median_s": statistics.median(cpus), "commit_cpu_max_s": max(cpus)}
    return out


def parse_size(text: str) -> int:
    for unit, mult in (("GiB", 1 << 30), ("TiB", 1 << 40)):
        if text.endswith(unit):
            return int(text[:-len(unit)]) * mult
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="16TiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scatter", type=int, default=0)
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also measure the trustvbd tree in DIR (git archive of a commit)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        sys.path.insert(0, str(args.child))
        print(json.dumps(asyncio.run(one(parse_size(args.size), args.rounds, args.scatter))))
        return
    trees = [("this tree", ROOT)]
    if args.baseline is not None:
        trees.append((f"baseline {args.baseline}", args.baseline.resolve()))
    for name, tree in trees:
        got = subprocess.run([sys.executable, __file__, "--size", args.size, "--rounds",
                              str(args.rounds), "--scatter", str(args.scatter), "--child",
                              str(tree)], cwd=tree,
                             capture_output=True, text=True, check=True)
        print(name, json.loads(got.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
