"""Benchmarks against peers, in one run (not part of the test suite).

    .venv/bin/python bench/run.py [--suite plain|crypt|all] [--size 1GiB] [--reps 3]
                                  [--only NAME ...] [--json] [--from-json FILE]

plain: `trustvbd driver`, `trustvbd up` (pass-through), nbdkit file, qemu-nbd raw.
crypt: `trustvbd up` (encrypted: one replica, mirrored over 2 and over 3 drivers),
       with --pinned CPUS also 1 and 2 replicas with [placement] cpus and nbdkit + luks
       under taskset (docs/placement.md),
       nbdkit + luks filter, qemu-nbd LUKS (if installed), plain nbdkit file; and
       sequential rows of `up` over nbdkit file drivers (1 and 2 replicas) with and
       without 10 ms added to every driver reply (nbdkit's delay filter), beside
       nbdkit + luks over the same delay.

Each server gets: nbdcopy sequential write of SIZE from a page-cached file, nbdcopy
sequential read to null:, fio's nbd engine 4 KiB random read and write at QD 16, and
4 KiB random read and write at QD 1 (latency p50, p99). For each, the CPU time of every
process of the server (/proc/PID/stat), per GiB or per 100k requests. Medians of --reps
runs, servers interleaved within each repetition; ratios against the suite's reference
and between named rows. --json prints everything measured (every repetition) as JSON on
stdout instead of the tables; --from-json prints the tables of such a file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procstat
from servers import (
    Server,
    format_size,
    have,
    make_luks,
    nbdkit_file,
    nbdkit_luks,
    parse_size,
    qemu_nbd,
    trustvbd_driver,
    trustvbd_up,
    workdir,
)

GiB = 1 << 30
DELAY_MS = 10
Rep = dict[str, Any]  # one repetition of one server: workload -> measurements

# (label, numerator row, denominator row): the ratios the issues set targets on.
RATIOS = [
    ("driver / [baseline]", "trustvbd driver", "trustvbd driver [baseline]"),
    ("2 replicas / 1", "trustvbd up (encrypted, 2 replicas)", "trustvbd up (encrypted)"),
    ("2 replicas / 1 [baseline]", "trustvbd up (encrypted, 2 replicas) [baseline]",
     "trustvbd up (encrypted) [baseline]"),
    ("1 replica / [baseline]", "trustvbd up (encrypted)", "trustvbd up (encrypted) [baseline]"),
    ("2 replicas / [baseline]", "trustvbd up (encrypted, 2 replicas)",
     "trustvbd up (encrypted, 2 replicas) [baseline]"),
    ("3 replicas / 1", "trustvbd up (encrypted, 3 replicas)", "trustvbd up (encrypted)"),
    ("3 replicas / 1 [baseline]", "trustvbd up (encrypted, 3 replicas) [baseline]",
     "trustvbd up (encrypted) [baseline]"),
    ("1 replica / nbdkit file", "trustvbd up (encrypted)", "nbdkit file"),
    (f"+{DELAY_MS} ms / none, 1 replica", f"trustvbd up (encrypted, nbdkit drivers +{DELAY_MS} ms)",
     "trustvbd up (encrypted, nbdkit drivers)"),
    (f"+{DELAY_MS} ms / none, 2 replicas",
     f"trustvbd up (encrypted, 2 replicas, nbdkit drivers +{DELAY_MS} ms)",
     "trustvbd up (encrypted, 2 replicas, nbdkit drivers)"),
    (f"+{DELAY_MS} ms / none, nbdkit + luks", f"nbdkit + luks filter +{DELAY_MS} ms",
     "nbdkit + luks filter"),
]
# --pinned: each pinned row against its free row, and pinned `up` against pinned nbdkit + luks.
PINNED = [
    ("1 replica, pinned / free", "trustvbd up (encrypted, pinned)", "trustvbd up (encrypted)"),
    ("2 replicas, pinned / free", "trustvbd up (encrypted, 2 replicas, pinned)",
     "trustvbd up (encrypted, 2 replicas)"),
    ("nbdkit + luks, pinned / free", "nbdkit + luks filter, pinned", "nbdkit + luks filter"),
    ("2 replicas / nbdkit + luks, both pinned", "trustvbd up (encrypted, 2 replicas, pinned)",
     "nbdkit + luks filter, pinned"),
    ("2 replicas / nbdkit + luks, both free", "trustvbd up (encrypted, 2 replicas)",
     "nbdkit + luks filter"),
]
RATIOS += PINNED
# Table columns: (header, workload, key)
COLUMNS = [
    ("write MB/s", "write", "MB/s"),
    ("read MB/s", "read", "MB/s"),
    ("rewrite MB/s", "rewrite", "MB/s"),
    ("randread IOPS", "randread", "IOPS"),
    ("randwrite IOPS", "randwrite", "IOPS"),
    ("QD1 read p50 µs", "qd1 randread", "p50 us"),
    ("QD1 read p99 µs", "qd1 randread", "p99 us"),
    ("QD1 write p50 µs", "qd1 randwrite", "p50 us"),
    ("QD1 write p99 µs", "qd1 randwrite", "p99 us"),
]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def fio(uri: str, rw: str, depth: int, runtime: int, size: int) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--name=t", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
         f"--iodepth={depth}", f"--size={min(size, 256 << 20)}", f"--runtime={runtime}",
         "--time_based", "--lat_percentiles=1", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read" if "read" in rw else "write"]
    pct = job["lat_ns"].get("percentile", {})
    return {"IOPS": float(job["iops"]), "requests": int(job["total_ios"]),
            "p50 us": pct.get("50.000000", 0) / 1e3, "p99 us": pct.get("99.000000", 0) / 1e3}


def measure(server: Server, size: int, source: Path, runtime: int,
            only: tuple[str, ...] | None = None, rewrite: bool = False,
            request_size: int | None = None) -> Rep:
    rep: Rep = {"load": os.getloadavg()[0]}  # beside the figures: the machine is shared
    with workdir() as work:
        if server.luks_image:
            make_luks(work, size)
        uri, stop = server.start(work)
        try:
            def run(name: str, what: Callable[[], tuple[dict[str, float], float]]) -> None:
                """`what` returns (results, how much work it did in reporting units)."""
                before = procstat.snapshot(work)
                client = resource.getrusage(resource.RUSAGE_CHILDREN)
                result, units = what()
                cpu = procstat.used(before, procstat.snapshot(work))
                done = resource.getrusage(resource.RUSAGE_CHILDREN)  # the client (nbdcopy, fio)
                cpu["client"] = (done.ru_utime + done.ru_stime) - (client.ru_utime + client.ru_stime)
                rep[name] = {**result, "cpu": {role: s / units for role, s in cpu.items()}}

            def copy(cmd: list[str]) -> Callable[[], tuple[dict[str, float], float]]:
                return lambda: ({"MB/s": size / timed(cmd) / 1e6}, size / GiB)

            def random(rw: str, depth: int) -> Callable[[], tuple[dict[str, float], float]]:
                def go() -> tuple[dict[str, float], float]:
                    result = fio(uri, rw, depth, runtime, size)
                    return result, result["requests"] / 100_000
                return go

            workloads = [w for w in server.workloads if only is None or w in only]
            if workloads and "seq" not in workloads:
                # Random reads of blocks never written measure no read at all (the
                # encryption domain answers zeroes from its leaves): write them first.
                subprocess.run(["nbdcopy", str(source), uri], check=True)
            if "seq" in workloads:
                nbdcopy = ["nbdcopy", *([f"--request-size={request_size}"] if request_size else [])]
                run("write", copy([*nbdcopy, str(source), uri]))
                run("read", copy([*nbdcopy, uri, "null:"]))
                if rewrite:
                    run("rewrite", copy([*nbdcopy, str(source), uri]))
            if "random" in workloads:
                run("randread", random("randread", 16))
                run("randwrite", random("randwrite", 16))
            if "qd1" in workloads:
                run("qd1 randread", random("randread", 1))
                run("qd1 randwrite", random("randwrite", 1))
        finally:
            stop()
    return rep


def suites(args: argparse.Namespace, size: int) -> list[tuple[str, list[Server], str]]:
    out: list[tuple[str, list[Server], str]] = []
    if args.suite in ("plain", "all"):
        plain = [trustvbd_driver(size), trustvbd_up(size, False), nbdkit_file(size), qemu_nbd(size)]
        if args.baseline is not None:
            plain.append(trustvbd_driver(size, tree=args.baseline))
        out.append(("plain", plain, "qemu-nbd raw"))
    if args.suite in ("crypt", "all"):
        crypt = [trustvbd_up(size, True), trustvbd_up(size, True, 2), trustvbd_up(size, True, 3),
                 nbdkit_luks(), *([qemu_nbd(size, luks=True)] if have("qemu-nbd") else []),
                 nbdkit_file(size)]
        for replicas in (1, 2):
            crypt += [trustvbd_up(size, True, replicas, nbdkit_drivers=True),
                      trustvbd_up(size, True, replicas, nbdkit_drivers=True, delay_ms=DELAY_MS)]
        crypt.append(nbdkit_luks(DELAY_MS))
        if args.baseline is not None:
            crypt += [trustvbd_up(size, True, replicas, tree=args.baseline) for replicas in (1, 2, 3)]
        if args.pinned:
            crypt += [trustvbd_up(size, True, replicas, cpus=args.pinned) for replicas in (1, 2)]
            crypt.append(nbdkit_luks(cpus=args.pinned))
        out.append(("crypt", crypt, "nbdkit + luks filter"))
    if args.only:
        out = [(name, [s for s in servers if any(s.name == o[:-1] if o.endswith("$") else o in s.name
                                                  for o in args.only)], ref)
               for name, servers, ref in out]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["plain", "crypt", "all"], default="all")
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fio-runtime", type=int, default=5)
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="only the servers whose name contains one of these (NAME$: is)")
    parser.add_argument("--workloads", nargs="+", choices=["seq", "random", "qd1"],
                        help="only these kinds of measurement (default: each row's all)")
    parser.add_argument("--rewrite", action="store_true",
                        help="after the sequential read, write the same data again: backing "
                             "files whose page cache exists (the first write allocates it)")
    parser.add_argument("--request-size", metavar="SIZE",
                        help="nbdcopy's request size (its default: 256 KiB)")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also the rows of `trustvbd driver` (plain suite) and of 1, 2 and 3 "
                             "replicas (crypt suite) with the trustvbd package in DIR (e.g. "
                             "`git archive main | tar -x -C DIR` and main's built "
                             "trustvbd/_native.abi3.so), for A/B")
    parser.add_argument("--pinned", type=lambda text: [int(c) for c in text.split(",")],
                        metavar="CPUS", help="also `up` rows (1 and 2 replicas) with [placement] "
                        "cpus = [CPUS] (the encryption domain and its drivers on them, "
                        "docs/placement.md) and nbdkit + luks under `taskset -c CPUS`; e.g. 0")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="print the tables of an earlier --json run and exit")
    args = parser.parse_args()
    if args.from_json:
        report(json.loads(args.from_json.read_text()))
        return 0
    size = parse_size(args.size)
    request_size = parse_size(args.request_size) if args.request_size else None
    doc: dict[str, Any] = {"options": {"size": size, "reps": args.reps,
                                       "request_size": args.request_size,
                                       "fio_runtime": args.fio_runtime,
                                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "cpus": os.cpu_count()},
                           "suites": {}}
    with workdir() as src_dir:
        source = src_dir / "source.img"
        with open(source, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
        subprocess.run(["cat", str(source)], stdout=subprocess.DEVNULL, check=True)  # page-cache it
        for suite, servers, reference in suites(args, size):
            runs: dict[str, list[Rep]] = {s.name: [] for s in servers}
            doc["suites"][suite] = {"reference": reference, "servers": runs}
            for rep in range(args.reps):
                for server in servers:  # interleaved, so drift hits every server alike
                    print(f"[{suite} rep {rep + 1}/{args.reps}] {server.name}", file=sys.stderr)
                    runs[server.name].append(measure(server, size, source, args.fio_runtime,
                                                       args.workloads and tuple(args.workloads),
                                                       args.rewrite, request_size))
            if not args.json:
                report({"options": doc["options"], "suites": {suite: doc["suites"][suite]}})
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        print()
    return 0


def median(reps: list[Rep], workload: str, key: str) -> float | None:
    values = [r[workload][key] for r in reps if workload in r]
    return statistics.median(values) if values else None


def median_cpu(reps: list[Rep], workload: str) -> dict[str, float]:
    roles = {role for r in reps if workload in r for role in r[workload]["cpu"]}
    return {role: statistics.median(r[workload]["cpu"].get(role, 0.0) for r in reps if workload in r)
            for role in sorted(roles)}


def server_cpu(by_role: dict[str, float]) -> float:
    """The server's CPU: every role but the client's (nbdcopy, fio)."""
    return sum(s for role, s in by_role.items() if role != "client")


def replica_costs(runs: dict[str, list[Rep]]) -> list[str]:
    """Issue #11's CPU criterion: per role, the CPU per GiB each replica beyond the first
    adds over the 1-replica row of the same run (and of the baseline's, if measured)."""
    out = []
    for suffix in ("", " [baseline]"):
        one = runs.get(f"trustvbd up (encrypted){suffix}")
        for n in (2, 3):
            more = runs.get(f"trustvbd up (encrypted, {n} replicas){suffix}")
            if not one or not more:
                continue
            cells = []
            for workload in ("write", "read"):
                a, b = median_cpu(more, workload), median_cpu(one, workload)
                cells.append(", ".join(f"{role} {(a.get(role, 0.0) - b.get(role, 0.0)) / (n - 1):+.2f}"
                                       for role in sorted(set(a) | set(b))
                                       if role in ("crypt", "driver")))
            out.append(f"| {n} replicas vs 1{suffix}, per extra replica | " + " | ".join(cells) + " |")
    return out


def per_rep_ratios(runs: dict[str, list[Rep]]) -> list[str]:
    """Issue #11's MB/s ratios repetition by repetition: each repetition ran the rows one
    after the other, so its ratio is less exposed to the machine's drift than a ratio of
    medians; with the load average at each repetition's start."""
    out = []
    for label, num, den in RATIOS:
        if not label.startswith(("2 replicas / 1", "3 replicas / 1")) or num not in runs \
                or den not in runs:
            continue
        pairs = list(zip(runs[num], runs[den], strict=False))
        cells = []
        for workload in ("write", "read"):
            ratios = [a[workload]["MB/s"] / b[workload]["MB/s"] for a, b in pairs
                      if workload in a and workload in b]
            cells.append(" ".join(f"{r:.2f}" for r in ratios) +
                         (f" (median {statistics.median(ratios):.2f})" if ratios else ""))
        loads = [r["load"] for pair in pairs for r in pair if "load" in r]
        cells.append(f"{min(loads):.1f}-{max(loads):.1f}" if loads else "")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def pinned_rounds(runs: dict[str, list[Rep]]) -> list[str]:
    """--pinned: each repetition's ratio, pinned row / its free row (or up / nbdkit + luks),
    of each random workload's figure and of the server's CPU per request."""
    out = []
    for label, num, den in PINNED:
        if num not in runs or den not in runs:
            continue
        cells = []
        for workload, key in (("randread", "IOPS"), ("randwrite", "IOPS"),
                              ("qd1 randread", "p50 us"), ("qd1 randwrite", "p50 us")):
            pairs = [(a[workload], b[workload]) for a, b in zip(runs[num], runs[den], strict=False)
                     if workload in a and workload in b]
            if not pairs:
                continue
            fig = [a[key] / b[key] for a, b in pairs if b[key]]
            cpu = [server_cpu(a["cpu"]) / server_cpu(b["cpu"]) for a, b in pairs
                   if server_cpu(b["cpu"])]
            cells.append(f"{workload} {key} " + " ".join(f"{r:.2f}" for r in fig)
                         + "; CPU/request " + " ".join(f"{r:.2f}" for r in cpu))
        out.append(f"| {label} | " + " / ".join(cells) + " |")
    return out


def report(doc: dict[str, Any]) -> None:
    opts = doc["options"]
    for suite, data in doc["suites"].items():
        runs: dict[str, list[Rep]] = data["servers"]
        reference = data["reference"]
        ref = runs.get(reference, [])
        requests = f" in {opts['request_size']} requests" if opts.get("request_size") else ""
        print(f"\n## {suite}: nbdcopy {format_size(opts['size'])} sequential{requests}, fio nbd 4 KiB random "
              f"QD16 and QD1 ({opts['fio_runtime']} s); medians of {opts['reps']}; "
              f"(x) = ratio to {reference}\n")
        print("| server | " + " | ".join(c[0] for c in COLUMNS) + " |")
        print("|---|" + "---|" * len(COLUMNS))
        for name, reps in runs.items():
            cells = []
            for _, workload, key in COLUMNS:
                value = median(reps, workload, key)
                base = median(ref, workload, key) if ref else None
                if value is None:
                    cells.append("")
                else:
                    ratio = f" ({value / base:.2f}x)" if base else ""
                    cells.append(f"{value:,.0f}{ratio}")
            print(f"| {name} | " + " | ".join(cells) + " |")
        lines = []
        for label, num, den in RATIOS:
            if num in runs and den in runs:
                cells = []
                for header, workload, key in COLUMNS:
                    a, b = median(runs[num], workload, key), median(runs[den], workload, key)
                    if a is not None and b:
                        cells.append(f"{header} {a / b:.2f}x")
                for workload in ("write", "read", "rewrite"):
                    a, b = (server_cpu(median_cpu(runs[x], workload)) for x in (num, den))
                    if a and b:
                        cells.append(f"CPU/GiB {workload} {a / b:.2f}x")
                lines.append(f"| {label} | " + ", ".join(cells) + " |")
        if lines:
            print("\n| ratio | medians |\n|---|---|")
            print("\n".join(lines))
        each = per_rep_ratios(runs)
        if each:
            print("\n| ratio, each repetition (servers interleaved) | write | read | load average |"
                  "\n|---|---|---|---|")
            print("\n".join(each))
        pinned = pinned_rounds(runs)
        if pinned:
            print("\n| pinned (--pinned), each repetition | figure and server CPU per request,"
                  " ratios |\n|---|---|")
            print("\n".join(pinned))
        extra = replica_costs(runs)
        if extra:
            print("\n| what one more replica adds (s CPU per GiB, by role) | write | read |"
                  "\n|---|---|---|")
            print("\n".join(extra))
        print(f"\n### {suite}: CPU seconds per process role: sequential per GiB, random per 100k "
              "requests (medians)\n")
        print("| server | workload | CPU by role (client: nbdcopy or fio) | total (server) |"
              "\n|---|---|---|---|")
        for name, reps in runs.items():
            for workload in ("write", "read", "rewrite", "randread", "randwrite", "qd1 randread",
                             "qd1 randwrite"):
                cpu = median_cpu(reps, workload)
                if cpu:
                    parts = ", ".join(f"{role} {s:.2f}" for role, s in cpu.items())
                    print(f"| {name} | {workload} | {parts} | {server_cpu(cpu):.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
