"""The encryption domain's CPU per 4 KiB random WRITE, per thread, in a real `up`.

    .venv/bin/python bench/write_threads.py [--rounds 3] [--replicas 2] [--seconds 4]
        [--qd 16] [--counts] [TREE ...]

For each round and each tree ("." is this checkout; another is a `git archive` with its own
trustvbd/_native.abi3.so, as bench/run.py --baseline takes it), interleaved: `up` with one
512 MiB disk over `--replicas` trustvbd drivers, the disk written once by fio, then fio's
nbd engine writes 4 KiB at random offsets at `--qd` for `--seconds`. Printed per write: the
encryption domain's CPU (/proc/PID/stat), the drivers' together, and each of the domain's
threads (its event loop, the intent log's sync thread, ...) with its sleeps per write
(voluntary context switches: each one a wake-up this VM pays for). The thread split says
what the per-process figure of bench/run.py cannot: the loop's share, and how often the
log syncs (one sleep of its thread per sync). A TREE ending in "+tmpfs" is measured with
its state directory, so the intent log, on tmpfs (/dev/shm), the drivers' files on the disk
as ever: what the log's syncs cost the row (`. .+tmpfs`). With --counts (needs `perf` and root), the
domain's system calls per write too, counted over the fio run by `perf stat` of the syscall
tracepoints (exact, unlike strace, which slows the domain several times): fdatasync per
write is the log's syncs, writev the sends to the drivers, read/write the guest's requests
and replies and the drivers' replies, futex the sync thread's hand-offs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
from pathlib import Path

import procstat
from run import fio
from servers import trustvbd_up, workdir

SIZE = 512 << 20
TICK = os.sysconf("SC_CLK_TCK")
SYSCALLS = ("fdatasync", "writev", "write", "read", "readv", "epoll_pwait", "futex", "pwrite64")


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


def count_syscalls(pid: int) -> subprocess.Popen[str]:
    """`perf stat` of `pid`'s system calls (SYSCALLS) until stopped (counted)."""
    events = ",".join(f"syscalls:sys_enter_{name}" for name in SYSCALLS)
    try:
        return subprocess.Popen(["perf", "stat", "-x,", "-e", events, "-p", str(pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise SystemExit("write_threads.py: --counts runs `perf stat`, and perf is not "
                         "installed here (apt-get install linux-perf), or leave out --counts") from None


def counted(perf: subprocess.Popen[str], writes: int) -> str:
    """Stop `perf stat` and say its counts per write."""
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate()
    counts: dict[str, int] = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_") and fields[0].isdigit():
            counts[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0])
    if not counts:
        return f"| perf stat counted nothing (root? perf_event_paranoid?): {err.strip()[-200:]}"
    syncs = counts.get("fdatasync", 0)
    per = " ".join(f"{name} {counts[name] / writes:.3f}" for name in SYSCALLS if name in counts)
    per_sync = f" (writes per log sync {writes / syncs:.1f})" if syncs else ""
    return f"| syscalls per write {sum(counts.values()) / writes:.2f}: {per}{per_sync}"


def measure(tree: str, replicas: int, seconds: int, qd: int, counts: bool = False) -> str:
    path, tmpfs = tree.removesuffix("+tmpfs"), tree.endswith("+tmpfs")
    server = trustvbd_up(SIZE, True, replicas, tree=None if path == "." else Path(path))
    with workdir() as work, (workdir(Path("/dev/shm")) if tmpfs else contextlib.nullcontext()) as state:
        if state is not None:  # the state directory (the intent log) on tmpfs: syncs cost nothing
            (work / "st").symlink_to(state)
        uri, stop = server.start(work)
        try:
            subprocess.run(["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
                            "--bs=1M", f"--size={min(SIZE, 256 << 20)}", "--output-format=terse"],
                           check=True, capture_output=True)
            crypt = next(pid for pid, (role, _) in procstat.snapshot(work).items()
                         if role == "crypt")
            perf = count_syscalls(crypt) if counts else None
            before, roles_before = threads(crypt), procstat.snapshot(work)
            result = fio(uri, "randwrite", qd, seconds, SIZE)
            after, roles = threads(crypt), procstat.used(roles_before, procstat.snapshot(work))
            syscalls = counted(perf, int(result["requests"])) if perf is not None else ""
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
            f"{roles.get('driver', 0.0) / n * 1e6:5.1f} us per write | {split} {syscalls}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--qd", type=int, default=16)
    parser.add_argument("--counts", action="store_true",
                        help="the domain's system calls per write (perf stat, root)")
    parser.add_argument("trees", nargs="*", default=["."])
    args = parser.parse_args()
    for _ in range(args.rounds):
        for tree in args.trees:
            print(measure(tree, args.replicas, args.seconds, args.qd, args.counts), flush=True)


if __name__ == "__main__":
    main()
