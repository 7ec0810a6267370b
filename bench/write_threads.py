"""The encryption domain's CPU per 4 KiB random WRITE, per thread, in a real `up`.

    .venv/bin/python bench/write_threads.py [--rounds 3] [--replicas 2] [--seconds 4]
        [--qd 16] [TREE ...]

For each round and each tree ("." is this checkout; another is a `git archive` with its own
trustvbd/_native.abi3.so, as bench/run.py --baseline takes it), interleaved: `up` with one
512 MiB disk over `--replicas` trustvbd drivers, the disk written once by fio, then fio's
nbd engine writes 4 KiB at random offsets at `--qd` for `--seconds`. Printed per write: the
encryption domain's CPU (/proc/PID/stat), the drivers' together, and each of the domain's
threads (its event loop, the intent log's sync thread, ...) with its sleeps per write
(voluntary context switches: each one a wake-up this VM pays for). The thread split says
what the per-process figure of bench/run.py cannot: the loop's share, and how often the
log syncs (one sleep of its thread per sync).
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import procstat
from run import fio
from servers import trustvbd_up, workdir

SIZE = 512 << 20
TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[str, tuple[str, float, int]]:
    """tid -> (name, CPU seconds, voluntary context switches) of each thread of `pid`."""
    out: dict[str, tuple[str, float, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        task = Path(f"/proc/{pid}/task/{tid}")
        try:
            name = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:
            continue  # it ended
        fields = stat[stat.rindex(")") + 2:].split()
        slept = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / TICK, slept)
    return out


def measure(tree: str, replicas: int, seconds: int, qd: int) -> str:
    server = trustvbd_up(SIZE, True, replicas, tree=None if tree == "." else Path(tree))
    with workdir() as work:
        uri, stop = server.start(work)
        try:
            subprocess.run(["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
                            "--bs=1M", f"--size={min(SIZE, 256 << 20)}", "--output-format=terse"],
                           check=True, capture_output=True)
            crypt = next(pid for pid, (role, _) in procstat.snapshot(work).items()
                         if role == "crypt")
            before, roles_before = threads(crypt), procstat.snapshot(work)
            result = fio(uri, "randwrite", qd, seconds, SIZE)
            after, roles = threads(crypt), procstat.used(roles_before, procstat.snapshot(work))
        finally:
            stop()
    n = result["requests"]
    per: dict[str, list[float]] = {}
    for tid, (name, cpu, slept) in after.items():
        _, cpu0, slept0 = before.get(tid, (name, 0.0, 0))
        key = "loop" if tid == str(crypt) else name.split()[0]
        acc = per.setdefault(key, [0.0, 0.0])
        acc[0] += cpu - cpu0
        acc[1] += slept - slept0
    split = " ".join(f"{key} {cpu / n * 1e6:.1f} us/{slept / n:.2f} sleeps"
                     for key, (cpu, slept) in sorted(per.items())
                     if cpu / n * 1e6 >= 0.05 or slept / n >= 0.005)
    return (f"{tree:>16} load {os.getloadavg()[0]:4.1f} IOPS {result['IOPS'] / 1e3:5.1f}k "
            f"crypt {roles.get('crypt', 0.0) / n * 1e6:5.1f} us drivers "
            f"{roles.get('driver', 0.0) / n * 1e6:5.1f} us per write | {split}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--qd", type=int, default=16)
    parser.add_argument("trees", nargs="*", default=["."])
    args = parser.parse_args()
    for _ in range(args.rounds):
        for tree in args.trees:
            print(measure(tree, args.replicas, args.seconds, args.qd), flush=True)


if __name__ == "__main__":
    main()
