"""What each replica costs per GiB read: held `up` servers, nbdcopy reads interleaved
(issue #11: 2 replicas at least 1.0x of 1 on sequential reads).

    .venv/bin/python bench/replica_reads.py [--baseline DIR] [--replicas 1 2] [--size 512MiB]
                                            [--rounds 6] [--reads 2] [--rt] [--perf]
                                            [--nbdcopy-args "--requests=16"] [--json FILE]

For each tree (this checkout, and DIR with --baseline) and replica count: `up` (encrypted)
over that many trustvbd drivers, one nbdcopy of SIZE into it from a page-cached file and
one read to warm, held for the whole run. Then --rounds rounds, the servers in turn
(the order reversed every other round), each measured over --reads nbdcopy reads to
null:: MB/s; CPU seconds per GiB of each role (bench/procstat.py; `client` is nbdcopy);
nbdcopy's page faults per GiB; context switches per GiB of the encryption domain's and
the drivers' threads (/proc, voluntary and not). --perf adds exact counts per GiB (perf
stat: the domain's, the drivers' and nbdcopy's system calls that move data or wait,
context switches, task-clock ms). --rt runs this script, the servers it starts and
nbdcopy at SCHED_FIFO 10 (root): on a machine shared with others' load the rows then get
a core whenever they can run, but the vCPUs never idle, so an idle machine's wake-up
costs are not reproduced. Prints medians and every round.

Unlike bench/run.py's rows (one read right after a fresh server's first write), these
reads are warm: they measure the read path, not what a write leaves behind.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import procstat
from servers import format_size, parse_size, trustvbd_up, workdir

GiB = 1 << 30
CALLS = ("readv", "writev", "read", "write", "recvfrom", "sendto", "sendfile64", "poll",
         "epoll_pwait", "futex")
EVENTS = ",".join(["task-clock", "context-switches", *(f"syscalls:sys_enter_{c}" for c in CALLS)])
COUNTED = {"crypt": "crypt", "driver": "driver"}  # roles whose threads perf stat attaches to


def switches(work: Path) -> dict[str, int]:
    """Context switches so far of every thread of the domain and the drivers, by role."""
    out: dict[str, int] = {}
    for pid, (role, _) in procstat.snapshot(work).items():
        if role not in COUNTED:
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                lines = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    key = f"cs {role}" + (" invol" if line.startswith("non") else "")
                    out[key] = out.get(key, 0) + int(line.split()[1])
    return out


def perf_counts(path: Path, prefix: str) -> dict[str, float]:
    """perf stat -x, output: event -> count, named `prefix event`."""
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 3 and fields[0].replace(".", "", 1).isdigit():
            name = fields[2].removeprefix("syscalls:sys_enter_")
            out[f"{prefix} {name}"] = out.get(f"{prefix} {name}", 0.0) + float(fields[0])
    return out


def measure(work: Path, uri: str, size: int, reads: int, nbdcopy: list[str], perf: bool,
            scratch: Path) -> dict[str, float]:
    """One measurement of `reads` reads: MB/s, CPU s per GiB by role, counts per GiB."""
    snap = procstat.snapshot(work)
    counters: list[subprocess.Popen[bytes]] = []
    if perf:
        for role in COUNTED:
            pids = ",".join(str(p) for p, (r, _) in snap.items() if r == role)
            counters.append(subprocess.Popen(["perf", "stat", "-x", ",", "-e", EVENTS, "-p", pids,
                                              "-o", str(scratch / f"perf.{role}")]))
        time.sleep(0.3)  # attached before the reads start
        (scratch / "perf.client").unlink(missing_ok=True)
    sw0 = switches(work)
    client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    for _ in range(reads):
        wrap = ["perf", "stat", "-x", ",", "-e", EVENTS, "--append", "-o",
                str(scratch / "perf.client")] if perf else []
        subprocess.run([*wrap, "nbdcopy", *nbdcopy, uri, "null:"], check=True)
    elapsed = time.monotonic() - start
    client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = procstat.snapshot(work)
    sw1 = switches(work)
    for counter in counters:
        counter.send_signal(2)  # SIGINT: perf stat prints its counts and exits
        counter.wait()
    gib = reads * size / GiB
    cpu = procstat.used(snap, after)
    cpu["client"] = client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime
    row = {"MB/s": reads * size / elapsed / 1e6}
    row |= {role: seconds / gib for role, seconds in cpu.items() if seconds > 0}
    row |= {key: (sw1[key] - sw0.get(key, 0)) / gib for key in sw1}
    row["client page faults"] = (client1.ru_minflt - client0.ru_minflt) / gib
    if perf:
        for role in (*COUNTED, "client"):
            row |= {k: v / gib for k, v in perf_counts(scratch / f"perf.{role}", role).items() if v}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="also the rows of the trustvbd package in DIR")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=parse_size, default=parse_size("512MiB"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reads", type=int, default=2, help="nbdcopy reads per measurement")
    ap.add_argument("--rt", action="store_true", help="run at SCHED_FIFO 10 (root)")
    ap.add_argument("--perf", action="store_true", help="exact counts per GiB (perf stat)")
    ap.add_argument("--nbdcopy-args", default="", help="more nbdcopy options, e.g. --requests=16")
    ap.add_argument("--json", type=Path, help="also write every round here")
    args = ap.parse_args()
    if args.rt:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))  # the servers inherit it
    nbdcopy = shlex.split(args.nbdcopy_args)
    trees: dict[str, Path | None] = {"this": None}
    if args.baseline is not None:
        trees["baseline"] = args.baseline
    results: dict[str, list[dict[str, float]]] = {}
    with ExitStack() as stack, workdir() as scratch:
        source = scratch / "source.img"
        with open(source, "wb") as f:
            f.write(os.urandom(args.size))
        rows = []
        for name, tree in trees.items():
            for replicas in args.replicas:
                work = stack.enter_context(workdir())
                uri, stop = trustvbd_up(args.size, True, replicas, tree=tree).start(work)
                stack.callback(stop)
                subprocess.run(["nbdcopy", str(source), uri], check=True)
                subprocess.run(["nbdcopy", *nbdcopy, uri, "null:"], check=True)  # warm
                rows.append((f"{name}, {replicas} replica{'s' if replicas > 1 else ''}", work, uri))
        for i in range(args.rounds):
            for label, work, uri in rows if i % 2 == 0 else rows[::-1]:
                row = measure(work, uri, args.size, args.reads, nbdcopy, args.perf, scratch)
                row["load"] = os.getloadavg()[0]
                results.setdefault(label, []).append(row)
                print(f"[round {i + 1}/{args.rounds}] {label}: {row['MB/s']:,.0f} MB/s", file=sys.stderr)
    print(f"## nbdcopy reads of {format_size(args.size)} x {args.reads}, {args.rounds} rounds"
          f"{' ' + args.nbdcopy_args if args.nbdcopy_args else ''}{', SCHED_FIFO' if args.rt else ''}: "
          "medians; CPU s, counts per GiB\n")
    keys = sorted({k for rows_ in results.values() for row in rows_ for k in row},
                  key=lambda k: (k != "MB/s", k.startswith(("cs ", "crypt ", "driver ", "client ")), k))
    labels = list(results)
    print("| | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for key in keys:
        cells = [statistics.median(r.get(key, 0.0) for r in results[label]) for label in labels]
        print(f"| {key} | " + " | ".join(f"{c:,.3f}" if c < 10 else f"{c:,.0f}" for c in cells) + " |")
    print("\nMB/s each round: " + "; ".join(
        f"{label} " + " ".join(f"{r['MB/s']:.0f}" for r in results[label]) for label in labels))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
