"""Real-workload benchmarks against peers, in one run (not part of the test suite).

    .venv/bin/python bench/workloads.py [--suite fuse|flush|qd1|all] [--reps 1] [--files 300]
                                        [--data 200MiB] [--flushes 200] [--writes 5000]
                                        [--baseline DIR] [--workdir DIR]

fuse:  a filesystem copy through FUSE. For each server: nbdfuse exposes the export as a
       file, mkfs.ext4 formats it, fuse2fs mounts it, and `cp -r` copies a tree of --files
       files (--data bytes in all, page-cached) into it. Timed: from the copy's start until
       fuse2fs has exited after the unmount (it writes everything back and flushes). Then
       e2fsck -fn must find the filesystem clean. `trustvbd up` (encrypted) vs nbdkit file.
flush: FLUSH latency. One libnbd connection writes 4 KiB at a random offset, then FLUSHes,
       --flushes times after 20 such pairs to warm up; the FLUSH alone is timed (median,
       90th and 99th percentile), and the write + FLUSH pair (a write answered before the
       driver took it moves that wait into the FLUSH), with the CPU time per pair of each
       process role (the measure when other processes share the disk's syncs).
       `trustvbd up` (encrypted) vs nbd-server (Debian `nbd-server`, left out if it is not
       installed) and nbdkit file.
qd1:   serial 4 KiB writes at random offsets (one libnbd connection, no FLUSH), --writes of
       them: latency p50 and p99, and the CPU time per write of each process role.
--workdir DIR puts each server's files (trusted state, backing files) under DIR, not /tmp:
       /dev/shm (tmpfs) takes the disk's syncs out, so what is left is the path's cost.
--baseline DIR (repeatable) adds `trustvbd up` running the trustvbd package in DIR (`git archive main |
       tar -x -C DIR`) to every suite, so a before/after pair is measured in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procstat  # bench/procstat.py: CPU time per process role
import servers as common  # bench/servers.py: the servers and helpers run.py uses

sys.path.append("/usr/lib/python3/dist-packages")  # Debian's libnbd module

DISK = 1 << 30


def nbd_server(size: int) -> common.Server:
    def start(work: Path) -> tuple[str, Callable[[], None]]:
        sock, pid, conf, image = (work / "nbds.sock", work / "nbds.pid", work / "nbds.conf",
                                  work / "disk.img")
        with open(image, "wb") as f:
            f.truncate(size)
        conf.write_text(f"[generic]\nunixsock = {sock}\n[disk]\nexportname = {image}\nflush = true\nfua = true\n")
        stop = common.start_daemon(["nbd-server", "-C", str(conf), "-p", str(pid)], sock, pid,
                                   work, "nbd-server", quiet=True)
        return f"nbd+unix:///disk?socket={sock}", stop
    return common.Server("nbd-server", start)


def make_tree(root: Path, files: int, total: int) -> None:
    """`files` files of random sizes adding up to about `total` bytes, in 10 directories."""
    rng = random.Random(7)
    weights = [rng.random() for _ in range(files)]
    scale = total / sum(weights)
    chunk = os.urandom(1 << 20)
    for i, w in enumerate(weights):
        d = root / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        size = max(1, int(w * scale))
        with open(d / f"f{i}.bin", "wb") as f:
            while size > 0:
                f.write(chunk[:min(size, len(chunk))])
                size -= len(chunk)


def wait_gone(proc: subprocess.Popen[bytes], what: str, timeout: float = 300) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"{what} did not exit in {timeout} s") from None


def fuse_copy(uri: str, work: Path, source: Path) -> tuple[float, dict[str, float]]:
    """(seconds, CPU seconds by server role) of the copy, from its start until fuse2fs exited."""
    exposed, mnt = work / "fuse", work / "mnt"
    exposed.mkdir()
    mnt.mkdir()
    nbdfuse = subprocess.Popen(["nbdfuse", str(exposed), uri])
    fuse2fs = None
    try:
        common.wait_socket(exposed / "nbd")
        subprocess.run(["mkfs.ext4", "-q", "-F", str(exposed / "nbd")], check=True)
        fuse2fs = subprocess.Popen(["fuse2fs", "-f", "-o", "fakeroot", str(exposed / "nbd"),
                                    str(mnt)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline or fuse2fs.poll() is not None:
                raise RuntimeError("fuse2fs did not mount")
            time.sleep(0.05)
        before = procstat.snapshot(work)
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(source), str(mnt / "copy")], check=True)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        wait_gone(fuse2fs, "fuse2fs")
        elapsed = time.perf_counter() - t0
        cpu = procstat.used(before, procstat.snapshot(work))
        fsck = subprocess.run(["e2fsck", "-fn", str(exposed / "nbd")], capture_output=True,
                              text=True)
        if fsck.returncode != 0:
            raise RuntimeError(f"e2fsck -fn after the copy failed:\n{fsck.stdout}{fsck.stderr}")
        return elapsed, cpu
    finally:
        if fuse2fs is not None and fuse2fs.poll() is None:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            wait_gone(fuse2fs, "fuse2fs")
        subprocess.run(["fusermount3", "-u", str(exposed)], check=False)
        wait_gone(nbdfuse, "nbdfuse")


def flush_latency(uri: str, count: int,
                  work: Path) -> tuple[float, float, float, float, dict[str, float]]:
    """(FLUSH median, 90th and 99th percentile, write + FLUSH median) in seconds, and CPU
    seconds per write + FLUSH pair by role: a write answered before the driver took it makes
    the FLUSH after it wait for the driver. CPU is the measure under load: the FLUSH waits
    for syncs, which other processes' syncs on the same disk delay."""
    import nbd  # type: ignore[import-not-found]

    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(1)
    block = os.urandom(4096)
    for _ in range(20):  # warm up: the connection, leaf pages, an expected FLUSH's streak
        h.pwrite(block, rng.randrange(0, (64 << 20) // 4096) * 4096)
        h.flush()
    times, pairs = [], []
    before = procstat.snapshot(work)
    for _ in range(count):
        offset = rng.randrange(0, (64 << 20) // 4096) * 4096
        t0 = time.perf_counter()
        h.pwrite(block, offset)
        t1 = time.perf_counter()
        h.flush()
        t2 = time.perf_counter()
        times.append(t2 - t1)
        pairs.append(t2 - t0)
    cpu = procstat.used(before, procstat.snapshot(work))
    h.shutdown()
    times.sort()
    return (statistics.median(times), times[int(len(times) * 0.9)],
            times[int(len(times) * 0.99)], statistics.median(pairs),
            {role: s / count for role, s in cpu.items()})


def qd1_writes(uri: str, count: int, work: Path) -> tuple[float, float, dict[str, float]]:
    """(p50, p99 seconds, CPU seconds per write by role) of `count` serial 4 KiB writes."""
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(2)
    block = os.urandom(4096)
    times = []
    for _ in range(count // 10):  # warm up: connections, leaf pages, caches
        h.pwrite(block, rng.randrange(0, (64 << 20) // 4096) * 4096)
    before = procstat.snapshot(work)
    for _ in range(count):
        offset = rng.randrange(0, (64 << 20) // 4096) * 4096
        t0 = time.perf_counter()
        h.pwrite(block, offset)
        times.append(time.perf_counter() - t0)
    cpu = procstat.used(before, procstat.snapshot(work))
    h.flush()
    h.shutdown()
    times.sort()
    return (statistics.median(times), times[int(len(times) * 0.99)],
            {role: s / count for role, s in cpu.items()})


def table(title: str, unit: str, results: dict[str, list[float]], reference: str) -> None:
    """Medians of the repetitions, their ratio to `reference`'s, and each repetition's
    value in the order run (the spread, and which repetitions a slow machine hit)."""
    ref = statistics.median(results[reference])
    print(f"\n## {title}\n\n| server | {unit} | ratio to {reference} | each repetition |\n"
          "|---|---|---|---|")
    for name, values in results.items():
        med = statistics.median(values)
        each = " ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {med:.2f} | {med / ref:.2f}x | {each} |")
    sys.stdout.flush()


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


T = TypeVar("T")


def interleaved(suite: str, servers: list[Any], reps: int,
                measure: Callable[[str, Path], T], root: Path | None = None) -> dict[str, list[T]]:
    """`measure(uri, workdir)` on each server, started afresh each time, servers
    interleaved within each repetition (in reverse order every other one, so none is always
    first after another's syncs); the results by server name. Work directories under
    `root` (the default: /tmp)."""
    results: dict[str, list[T]] = {s.name: [] for s in servers}
    for rep in range(reps):
        for server in (servers if rep % 2 == 0 else servers[::-1]):
            print(f"[{suite} rep {rep + 1}/{reps}] {server.name}", file=sys.stderr)
            with common.workdir(root) as work:
                uri, stop = server.start(work)
                try:
                    results[server.name].append(measure(uri, work))
                finally:
                    stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["fuse", "flush", "qd1", "all"], default="all")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--data", default="200MiB")
    parser.add_argument("--flushes", type=int, default=200)
    parser.add_argument("--writes", type=int, default=5000)
    parser.add_argument("--baseline", type=Path, metavar="DIR", action="append", default=[],
                        help="also `trustvbd up` with the trustvbd package in DIR, for A/B "
                        "(repeatable: A/B/C, each named by its directory)")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="each server's files (state, backing files) under DIR, not /tmp: "
                        "/dev/shm takes the disk's syncs out (what is left is the path)")
    args = parser.parse_args()
    data = common.parse_size(args.data)
    ups = [common.trustvbd_up(DISK, True)]
    for tree in args.baseline:
        up = common.trustvbd_up(DISK, True, tree=tree.resolve())
        if len(args.baseline) > 1:  # told apart by their directories
            up = dataclasses.replace(up, name=up.name.replace("[baseline]", f"[{tree.name}]"))
        ups.append(up)
    print(f"start: {load()}", file=sys.stderr)
    if args.suite in ("fuse", "all"):
        with common.workdir() as src:
            make_tree(src / "tree", args.files, data)
            subprocess.run(["sh", "-c", f"cat {src}/tree/*/* > /dev/null"], check=True)
            servers = [*ups, common.nbdkit_file(DISK)]
            copies = interleaved("fuse", servers, args.reps,
                                 lambda uri, work: fuse_copy(uri, work, src / "tree"), args.workdir)
            results = {name: [t for t, _ in runs] for name, runs in copies.items()}
            table(f"FUSE copy: {args.files} files, {common.format_size(data)}, nbdfuse + fuse2fs"
                  f" (ext4); medians of {args.reps}; {load()}", "seconds", results, "nbdkit file")
            print("\nCPU seconds per copy by server role (medians):")
            for name, copy_runs in copies.items():
                copy_roles = sorted({r for _, cpu in copy_runs for r in cpu})
                print(f"- {name}: " + ", ".join(
                    f"{r} {statistics.median(c.get(r, 0.0) for _, c in copy_runs):.2f}"
                    for r in copy_roles))
    if args.suite in ("flush", "all"):
        peers = [common.nbdkit_file(DISK)]
        if shutil.which("nbd-server"):
            peers.insert(0, nbd_server(DISK))
        else:
            print("nbd-server is not installed: measuring nbdkit file only", file=sys.stderr)
        peer = peers[0]
        servers = [*ups, *peers]
        timed = interleaved("flush", servers, args.reps,
                            lambda uri, work: flush_latency(uri, args.flushes, work), args.workdir)
        p50 = {name: [t[0] * 1e3 for t in runs] for name, runs in timed.items()}
        p90 = {name: [t[1] * 1e3 for t in runs] for name, runs in timed.items()}
        p99 = {name: [t[2] * 1e3 for t in runs] for name, runs in timed.items()}
        pair = {name: [t[3] * 1e3 for t in runs] for name, runs in timed.items()}
        table(f"FLUSH after each 4 KiB write, {args.flushes} flushes: median; {load()}", "ms",
              p50, peer.name)
        table("FLUSH: 90th percentile", "ms", p90, peer.name)
        table("FLUSH: 99th percentile", "ms", p99, peer.name)
        table("4 KiB write + FLUSH: median", "ms", pair, peer.name)
        print("\nCPU µs per 4 KiB write + FLUSH pair by server role (medians):")
        for name, flush_runs in timed.items():
            flush_roles = sorted({r for *_, cpu in flush_runs for r in cpu})
            print(f"- {name}: " + ", ".join(
                f"{r} {statistics.median(c.get(r, 0.0) for *_, c in flush_runs) * 1e6:.0f}"
                for r in flush_roles))
            for r in ("crypt", "driver"):  # each repetition's, in the order run: the spread
                if r in flush_roles:
                    print(f"  {r} per repetition: " + " ".join(
                        f"{c.get(r, 0.0) * 1e6:.0f}" for *_, c in flush_runs))
    if args.suite in ("qd1", "all"):
        servers = [*ups, common.nbdkit_file(DISK)]
        lat = interleaved("qd1", servers, args.reps,
                          lambda uri, work: qd1_writes(uri, args.writes, work), args.workdir)
        print(f"\n## QD1 4 KiB random writes, {args.writes} per rep, medians of {args.reps}; "
              f"{load()}\n\n| server | p50 µs | p99 µs | CPU µs per write by role |\n"
              "|---|---|---|---|")
        for name, runs in lat.items():
            roles = {r for _, _, cpu in runs for r in cpu}
            cpu_cells = ", ".join(
                f"{r} {statistics.median(c.get(r, 0.0) for _, _, c in runs) * 1e6:.0f}"
                for r in sorted(roles))
            print(f"| {name} | {statistics.median(a for a, _, _ in runs) * 1e6:.0f} | "
                  f"{statistics.median(b for _, b, _ in runs) * 1e6:.0f} | {cpu_cells} |")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
