"""What a hand-off between processes costs on this machine: a QD1 request's chain modelled.

    bench/wake_cost.py [--rounds 3] [--n 5000] [--budget-us 100] [--modes ...]

A QD1 read through `up` wakes four processes in turn (guest -> encryption domain -> driver
-> encryption domain -> guest), nbdkit + luks two (guest -> nbdkit -> guest). This measures
those chains with nothing but the hand-offs in them: a client and one relay ("2 hops") or a
client, a relay and a server behind it ("4 hops"), one byte over Unix stream sockets each
way, every process in a loop of poll + recv + send (Python, so each hop carries a few µs of
interpreter work, the same in every mode). Modes, each a chain and a placement:

  2hop, 4hop            unpinned: where the scheduler puts each wake-up
  2hop@0,1 4hop@0,1,0   pinned: client on CPU 0, relay on 1, server on 0 (comma list per role)
  4hop@x,0,0            relay and server on CPU 0, client free (as `[placement] cpus = [0]`)
  4hop+spin, +yield     the relay busy-polls its next socket (at most --budget-us, with
                        os.sched_yield() in the loop for +yield) instead of sleeping

Per mode and round: the client's round trip p50 / p99 µs, and per round trip each role's
CPU µs, sleeps (voluntary context switches), preemptions (involuntary), and how often the
relay ran on the CPU the client ran on just before (same-CPU hand-offs). Rounds interleave
the modes. On a loaded machine wake-ups land on busy CPUs (cheap local switches); on an idle
VM whose idle vCPUs halt, a wake-up on the other vCPU costs the host a round trip: compare
2hop against 4hop there to see what the chain's length alone costs (bench/README.md, #13).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import select
import socket
import statistics
import sys
import time

_libc = ctypes.CDLL(None, use_errno=True)
_getcpu = _libc.sched_getcpu


def _cpu_list(spec: str, roles: int) -> list[int | None]:
    cpus: list[int | None] = [None if c in ("", "x") else int(c) for c in spec.split(",")]
    return (cpus + [None] * roles)[:roles]


def _usage() -> tuple[float, int, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_nvcsw, ru.ru_nivcsw


def _wait(sock: socket.socket, spin_s: float, yield_: bool) -> None:
    """Until `sock` is readable: busy-polled for at most spin_s, then asleep in poll."""
    fd = sock.fileno()
    if spin_s > 0:
        end = time.perf_counter() + spin_s
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while time.perf_counter() < end:
            if poller.poll(0):
                return
            if yield_:
                os.sched_yield()
    select.select([fd], [], [])


def _serve(up: socket.socket, down: socket.socket | None, spin_s: float, yield_: bool,
           report: socket.socket) -> None:
    """A relay (down: the server behind it) or the server (down None), until EOF."""
    start = _usage()
    n = 0
    while True:
        _wait(up, spin_s, yield_)
        b = up.recv(1)
        if not b:
            break
        if down is not None:
            down.send(b)
            _wait(down, spin_s, yield_)
            b = down.recv(1)
        up.send(bytes([_getcpu() & 0xFF]))
        n += 1
    end = _usage()
    report.send(json.dumps([end[0] - start[0], end[1] - start[1], end[2] - start[2]]).encode())
    if down is not None:
        down.close()


def _child(cpu: int | None, close: list[socket.socket], up: socket.socket,
           down: socket.socket | None, spin_s: float, yield_: bool, report: socket.socket) -> int:
    """A forked relay or server on `cpu` (None: free), the parent's other ends closed in it."""
    pid = os.fork()
    if pid == 0:
        try:
            for sock in close:
                sock.close()
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            _serve(up, down, spin_s, yield_, report)
        finally:
            os._exit(0)
    return pid


def run_mode(mode: str, n: int, budget_us: int) -> dict[str, float]:
    chain, _, place = mode.partition("@")
    chain, _, spin = chain.partition("+")
    hops = int(chain.removesuffix("hop"))
    cpus = _cpu_list(place, 3)
    spin_s = budget_us / 1e6 if spin else 0.0
    yield_ = spin == "yield"
    c_sock, r_up = socket.socketpair()
    reports = []
    pids = []
    r_down: socket.socket | None = None
    if hops == 4:
        r_down, s_up = socket.socketpair()
        rep_s, rep_s_w = socket.socketpair()
        pids.append(_child(cpus[2], [c_sock, r_up, r_down], s_up, None, 0.0, False, rep_s_w))
        s_up.close()
        reports.append(("server", rep_s))
    rep_r, rep_r_w = socket.socketpair()
    pids.append(_child(cpus[1], [c_sock], r_up, r_down, spin_s, yield_, rep_r_w))
    reports.insert(0, ("relay", rep_r))
    r_up.close()
    if r_down is not None:
        r_down.close()
    before = os.sched_getaffinity(0)
    if cpus[0] is not None:
        os.sched_setaffinity(0, {cpus[0]})
    times: list[float] = []
    same = 0
    try:
        start = _usage()
        for _ in range(n):
            cpu = _getcpu()
            t = time.perf_counter_ns()
            c_sock.send(b"x")
            select.select([c_sock], [], [])
            got = c_sock.recv(1)
            times.append((time.perf_counter_ns() - t) / 1e3)
            same += got[0] == cpu & 0xFF
        end = _usage()
    finally:
        os.sched_setaffinity(0, before)
        c_sock.close()
    out = {"p50": statistics.median(times), "p99": sorted(times)[len(times) * 99 // 100],
           "same_cpu": same / n, "client_cpu": (end[0] - start[0]) / n * 1e6,
           "client_sleeps": (end[1] - start[1]) / n}
    for role, sock in reports:
        cpu_s, vol, invol = json.loads(sock.recv(200))
        out[f"{role}_cpu"] = cpu_s / n * 1e6
        out[f"{role}_sleeps"] = vol / n
        out[f"{role}_preempted"] = invol / n
        sock.close()
    for pid in pids:
        os.waitpid(pid, 0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=5000, help="round trips per mode and round")
    ap.add_argument("--budget-us", type=int, default=100, help="the spinning relay's budget")
    ap.add_argument("--modes", nargs="+", default=[
        "2hop", "4hop", "2hop@0,1", "4hop@0,1,0", "4hop@x,0,0", "4hop+spin", "4hop+yield"])
    args = ap.parse_args()
    for r in range(args.rounds):
        modes = args.modes if r % 2 == 0 else args.modes[::-1]
        for mode in modes:
            res = run_mode(mode, args.n, args.budget_us)
            roles = " ".join(
                f"{role} cpu {res[f'{role}_cpu']:.1f} sleeps {res[f'{role}_sleeps']:.2f}"
                + (f" preempted {res[f'{role}_preempted']:.2f}" if role != "client" else "")
                for role in ("client", "relay", "server") if f"{role}_cpu" in res)
            print(f"r{r} {mode:12} p50 {res['p50']:7.1f} p99 {res['p99']:8.1f} µs | same-cpu "
                  f"{res['same_cpu']:.2f} | per round trip: {roles} | load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
