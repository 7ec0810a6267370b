"""CPU time per process of a running server, from /proc/PID/stat (user + system).

The processes are those noted in the work directory's bench.pids and all their
descendants, each given a role: the module a trustvbd domain runs (crypt,
aead_worker, driver, acm, store), `up` for the launcher, or the program's name.
"""

from __future__ import annotations

import os
from pathlib import Path

from servers import PIDS

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of `pid`, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # from field 3 (state) on
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def parent(pid: int) -> int:
    """The parent of `pid` (0 if it is gone)."""
    st = _stat(pid)
    return st[0] if st is not None else 0


def _role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in argv if a]
    if "-m" in args[:-1]:
        module = args[args.index("-m") + 1]
        if module == "trustvbd.cli":
            rest = args[args.index("-m") + 2:]
            return rest[0] if rest else "cli"
        return module.rsplit(".", 1)[-1]
    return os.path.basename(args[0]) if args else "?"


def snapshot(work: Path) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) for the server running in `work`."""
    try:
        noted = dict(line.split() for line in (work / PIDS).read_text().splitlines() if line)
    except OSError:
        return {}
    roots = {int(pid): role for pid, role in noted.items()}
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            parents[int(entry)], cpu[int(entry)] = st
    out: dict[int, tuple[str, float]] = {}
    for pid in cpu:
        p, hops = pid, 0
        while p not in roots and p > 1 and hops < 64:
            p, hops = parents.get(p, 0), hops + 1
        if p in roots:
            out[pid] = (roots[pid] if pid in roots else _role(pid), cpu[pid])
    return out


def used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per role between two snapshots (a process started in between counts whole)."""
    roles: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        start = before.get(pid, (role, 0.0))[1]
        roles[role] = roles.get(role, 0.0) + max(seconds - start, 0.0)
    return roles
