"""Terabyte disks (#12.2): create and open time and the encryption layer's memory, by disk size.

For each size, in a fresh process (so its peak RSS is that size's alone): make the
trusted state, open the disk over a sparse in-memory replica (first start: it is
formatted), write 4 KiB blocks at random offsets over the whole disk and flush,
close, open again (restart), read them back (each read loads its leaf page from
the replica and checks it against the tree file), close. Times are wall clock;
RSS is VmHWM (peak) and its growth over the process before the disk existed.

    .venv/bin/python bench/terabyte.py                      # 1GiB 1TiB 16TiB
    .venv/bin/python bench/terabyte.py --sizes 16TiB --writes 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BS = 4096


def parse_size(text: str) -> int:
    units = {"GiB": 1 << 30, "TiB": 1 << 40}
    for unit, mult in units.items():
        if text.endswith(unit):
            return int(text[:-len(unit)]) * mult
    return int(text)


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def one(size: int, writes: int, cache_pages: int) -> dict[str, float]:
    from tests.crypt.test_lazy_leaves import SparseMemory
    from trustvbd.blocks.crypt_layer import CryptDisk, Layout, create_disk_state, load_kek
    from trustvbd.blocks.layer import Layer

    class Unclosing(Layer):
        async def close(self) -> None:
            pass

    lay = Layout(size)
    replica = SparseMemory(lay.physical_size)
    rng = random.Random(size)
    blocks = [rng.randrange(lay.blocks) for _ in range(writes)]
    base = status("VmRSS")
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tvtb") as tmp:
        state = Path(tmp)
        kek = load_kek(state)
        t0 = time.perf_counter()
        create_disk_state(state, "big", size, kek)
        out["create_s"] = time.perf_counter() - t0

        async def open_disk() -> CryptDisk:
            return await CryptDisk.open(state, "big", Unclosing(replica), "r0", kek,
                                        leaf_cache_pages=cache_pages)

        t0 = time.perf_counter()
        disk = await open_disk()
        out["first_open_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in blocks:
            await disk.pwrite(b * BS, b.to_bytes(8, "big") * 512)
        await disk.flush()
        out["writes_per_s"] = writes / (time.perf_counter() - t0)
        await disk.close()
        t0 = time.perf_counter()
        disk = await open_disk()
        out["restart_open_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in blocks:
            assert bytes(await disk.pread(b * BS, BS)) == b.to_bytes(8, "big") * 512
        out["cold_reads_per_s"] = writes / (time.perf_counter() - t0)
        await disk.close()
        tree = state / "disks" / "big" / "tree"
        out["tree_file_mib"] = tree.stat().st_size / 2**20
        out["tree_allocated_mib"] = tree.stat().st_blocks * 512 / 2**20
    out["peak_rss_mib"] = status("VmHWM") / 2**20
    out["rss_growth_mib"] = (status("VmHWM") - base) / 2**20
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1GiB", "1TiB", "16TiB"])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--cache-pages", type=int, default=4096)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        res = asyncio.run(one(parse_size(args.one), args.writes, args.cache_pages))
        print(json.dumps(res))
        return 0
    print(f"{'size':>6} {'create':>8} {'1st open':>9} {'restart':>8} {'writes/s':>9} "
          f"{'reads/s':>8} {'peak RSS':>9} {'growth':>7} {'tree file':>10} {'allocated':>10}")
    for text in args.sizes:
        got = subprocess.run([sys.executable, __file__, "--one", text, "--writes", str(args.writes),
                              "--cache-pages", str(args.cache_pages)],
                             check=True, capture_output=True, text=True)
        r = json.loads(got.stdout.splitlines()[-1])
        print(f"{text:>6} {r['create_s']:7.3f}s {r['first_open_s']:8.3f}s {r['restart_open_s']:7.3f}s "
              f"{r['writes_per_s']:9.0f} {r['cold_reads_per_s']:8.0f} {r['peak_rss_mib']:7.1f}Mi "
              f"{r['rss_growth_mib']:5.1f}Mi {r['tree_file_mib']:8.1f}Mi {r['tree_allocated_mib']:8.1f}Mi")
    return 0


if __name__ == "__main__":
    sys.exit(main())
