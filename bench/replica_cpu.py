"""What each replica costs per GiB written, process role by role, user and system time apart,
A/B against another tree (issue #11: 2 replicas at least 0.8x of 1 on sequential writes).

    .venv/bin/python bench/replica_cpu.py --baseline DIR [--this DIR] [--replicas 1 2 3]
                                          [--size 512MiB] [--copies 4] [--reps 3]
                                          [--baseline-env KEY=VALUE ...]

`--baseline-env`: set for the baseline's runs (its launcher and trusted domains); with no
--baseline, the baseline is this tree too: `--baseline-env TRUSTVBD_RING=0` measures the
drivers' ciphertext ring (docs/driver-ring.md) against plain WRITEs, in one tree.

For each tree and replica count, interleaved: `up` (encrypted) over that many trustvbd
drivers, one nbdcopy of SIZE from a page-cached file first (fresh backing files: this VM
faults freed memory back in slowly, which swamps a driver's own cost), then --copies more
into the same files, measured: CPU seconds per GiB of each role (bench/procstat.py), split
into user and system time. `--this DIR` runs another tree than this checkout (so it may
change meanwhile); both trees run their own driver domains (servers.tree_python). Prints
medians of --reps and each repetition. No MB/s: on a shared machine they say how the cores
were shared, not what the code costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import procstat
from servers import format_size, parse_size, trustvbd_up, workdir

GiB = 1 << 30
ROLES = ("crypt", "driver", "nbdcopy")


def user_system(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of `pids` so far (those gone count nothing)."""
    user = system = 0.0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        user += int(fields[11]) / procstat.TICK
        system += int(fields[12]) / procstat.TICK
    return user, system


def one(tree: Path | None, replicas: int, size: int, copies: int, source: Path,
        env: dict[str, str] | None = None) -> dict[str, tuple[float, float]]:
    """role -> (user, system) CPU seconds per GiB over `copies` rewrites."""
    with workdir() as work:
        uri, stop = trustvbd_up(size, True, replicas, tree=tree, extra_env=env).start(work)
        try:
            subprocess.run(["nbdcopy", str(source), uri], check=True)
            roles: dict[str, list[int]] = {}
            for pid, (role, _) in procstat.snapshot(work).items():
                roles.setdefault(role, []).append(pid)
            before = {role: user_system(pids) for role, pids in roles.items()}
            client = os.times()
            for _ in range(copies):
                subprocess.run(["nbdcopy", str(source), uri], check=True)
            done = os.times()
            after = {role: user_system(pids) for role, pids in roles.items()}
        finally:
            stop()
    gib = copies * size / GiB
    out = {role: ((after[role][0] - before[role][0]) / gib, (after[role][1] - before[role][1]) / gib)
           for role in roles}
    out["nbdcopy"] = ((done.children_user - client.children_user) / gib,
                      (done.children_system - client.children_system) / gib)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--baseline-env", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--this", type=Path, default=None)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--size", default="512MiB")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    this = args.this.resolve() if args.this is not None else None
    trees = {"this tree": this,
             "baseline": args.baseline.resolve() if args.baseline is not None else this}
    envs = {"this tree": None, "baseline": dict(kv.split("=", 1) for kv in args.baseline_env)}
    with workdir() as scratch:
        source = scratch / "source.img"
        source.write_bytes(os.urandom(size))
        print(f"load average {os.getloadavg()[0]:.2f} at start; {args.copies} x "
              f"{format_size(size)} rewritten per run", flush=True)
        runs: dict[tuple[str, int], list[dict[str, tuple[float, float]]]] = {}
        for _ in range(args.reps):
            for replicas in args.replicas:
                for name, tree in trees.items():
                    runs.setdefault((name, replicas), []).append(
                        one(tree, replicas, size, args.copies, source, envs[name] or None))
        print(f"load average {os.getloadavg()[0]:.2f} at end\n")
    print("| replicas | tree | " + " | ".join(f"{r} user / sys" for r in ROLES)
          + " | crypt + drivers | each repetition (crypt + drivers) |")
    print("|---|---|" + "---|" * (len(ROLES) + 2))
    for replicas in args.replicas:
        for name in trees:
            reps = runs[(name, replicas)]
            cells = []
            for role in ROLES:
                user = statistics.median(r.get(role, (0.0, 0.0))[0] for r in reps)
                system = statistics.median(r.get(role, (0.0, 0.0))[1] for r in reps)
                cells.append(f"{user:.2f} / {system:.2f}")
            totals = [sum(sum(r.get(role, (0.0, 0.0))) for role in ("crypt", "driver"))
                      for r in reps]
            print(f"| {replicas} | {name} | " + " | ".join(cells)
                  + f" | {statistics.median(totals):.2f} | "
                  + " ".join(f"{t:.2f}" for t in totals) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
