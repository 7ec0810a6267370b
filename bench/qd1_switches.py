"""QD1 4 KiB latency A/B on held servers, with what each process does per request.

    bench/qd1_switches.py [--trees this,/tmp/base,this@pin,this+TRUSTVBD_SPIN_US=100] [--luks]
        [--replicas 2]
        [--rounds 8] [--runtime 2] [--rw randread,randwrite] [--size 256MiB] [--depth 1]

Starts `trustvbd up` (encrypted, `--replicas` trustvbd drivers) once per tree (`this`: this
checkout; a directory: a tree made as bench/run.py's --baseline, its own extension in it;
`TREE@pin`: that tree with every thread of its encryption domain and drivers on CPU 0, fio
left free, to see what their hand-offs cost when they are not cross-CPU wake-ups; `TREE+K=V`:
that tree with K=V in its launcher's environment, several `+K=V` allowed) and, with
--luks, nbdkit + luks; writes the disk once (the reads then reach a driver), then runs fio
QD1 for `--runtime` seconds per server and workload, the servers' order reversed every
other round. Per run and role (crypt, driver, nbdkit): CPU µs per request (/proc/PID/stat),
voluntary and involuntary context switches per request (sleeps, and preemptions) and µs
spent waiting on a runqueue per request (/proc/PID/task/TID/schedstat), summed over the
role's threads (not nbdkit's: its connection's threads end with fio's connection, their
counts with them; its CPU is counted). Wall-clock figures on a shared machine are same-run
comparisons only; the switch counts are exact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import procstat
import servers

ROLES = ("crypt", "driver", "nbdkit")
SWITCHES = ("crypt", "driver")  # threads that outlive a guest connection


def fio(uri: str, rw: str, runtime: int, size: int, depth: int) -> dict[str, float]:
    cmd = ["fio", "--name=t", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
           f"--iodepth={depth}", f"--size={size}", f"--runtime={runtime}", "--time_based",
           "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read" if "read" in rw else "write"]
    pct = job["clat_ns"].get("percentile", {})
    return {"iops": float(job["iops"]), "n": int(job["total_ios"]),
            "p50": pct.get("50.000000", 0) / 1e3, "p90": pct.get("90.000000", 0) / 1e3,
            "p99": pct.get("99.000000", 0) / 1e3, "p999": pct.get("99.900000", 0) / 1e3}


def _field(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def threads(work: Path) -> dict[str, list[float]]:
    """role -> [voluntary switches, involuntary switches, runqueue wait s] over its threads."""
    out: dict[str, list[float]] = {}
    for pid, (role, _) in procstat.snapshot(work).items():
        if role not in SWITCHES:
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
                wait = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1]) / 1e9
            except (OSError, ValueError, IndexError):
                continue
            acc = out.setdefault(role, [0.0, 0.0, 0.0])
            acc[0] += _field(status, "voluntary_ctxt_switches")
            acc[1] += _field(status, "nonvoluntary_ctxt_switches")
            acc[2] += wait
    return out


def pin(work: Path, cpu: int) -> None:
    """Every thread of the server's encryption domain and drivers on `cpu`."""
    for pid, (role, _) in procstat.snapshot(work).items():
        if role in SWITCHES:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), {cpu})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", default="this",
                    help="comma-separated: this, or tree directories; @pin, +K=V (see above)")
    ap.add_argument("--luks", action="store_true", help="nbdkit + luks too")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--runtime", type=int, default=2)
    ap.add_argument("--rw", default="randread,randwrite")
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--depth", type=int, default=1, help="fio's iodepth (QD1 by default)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the servers are stopped
    size = servers.parse_size(args.size)
    held: list[tuple[str, Path, str]] = []
    with contextlib.ExitStack() as stack:
        pinned = []
        for name in args.trees.split(","):
            where, *assignments = name.split("+")
            env = dict(a.split("=", 1) for a in assignments)
            where = where.removesuffix("@pin")
            tree = None if where == "this" else Path(where)
            work = Path(stack.enter_context(servers.workdir()))
            uri, stop = servers.trustvbd_up(size, True, args.replicas, tree=tree,
                                            extra_env=env).start(work)
            stack.callback(stop)
            held.append((name, work, uri))
            if name.split("+")[0].endswith("@pin"):
                pinned.append(work)
        if args.luks:
            work = Path(stack.enter_context(servers.workdir()))
            servers.make_luks(work, size)
            uri, stop = servers.nbdkit_luks().start(work)
            stack.callback(stop)
            held.append(("luks", work, uri))
        source = Path(stack.enter_context(servers.workdir())) / "src.img"
        with open(source, "wb") as f:
            f.write(os.urandom(size))
        for _, _, uri in held:
            subprocess.run(["nbdcopy", str(source), uri], check=True)
        for work in pinned:
            pin(work, 0)
        for r in range(args.rounds):
            for name, work, uri in held if r % 2 == 0 else held[::-1]:
                for rw in args.rw.split(","):
                    cpu0, th0 = procstat.snapshot(work), threads(work)
                    res = fio(uri, rw, args.runtime, size, args.depth)
                    cpu = procstat.used(cpu0, procstat.snapshot(work))
                    th1 = threads(work)
                    n = max(res["n"], 1)
                    per = ""
                    for role in ROLES:
                        if role not in cpu:
                            continue
                        per += f" {role}: cpu {cpu[role] / n * 1e6:.1f}"
                        if role in th1:
                            d = [b - a for a, b in zip(th0.get(role, [0.0] * 3), th1[role], strict=True)]
                            per += (f" sleeps {d[0] / n:.2f} preempted {d[1] / n:.2f}"
                                    f" rq-wait {d[2] / n * 1e6:.1f}")
                        per += ";"
                    print(f"r{r} {name:16} {rw:9} p50 {res['p50']:7.1f} p90 {res['p90']:7.1f} "
                          f"p99 {res['p99']:8.1f} p99.9 {res['p999']:8.1f} "
                          f"iops {res['iops']:7.0f} load {os.getloadavg()[0]:4.1f} | per request:{per}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
