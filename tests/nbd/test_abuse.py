"""Bounded under abuse (#9.6): a guest's connections that never read their replies hold at
most that guest's memory budget, and other guests are served meanwhile; connections that
never finish the handshake, or sit idle, are closed after their time."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nbd.helpers import RawClient, wait_for
from trustvbd.nbd import protocol as p

MiB = 1 << 20
BUDGET_MIB = 64


class AbuseServer:
    def __init__(self, directory: Path, budget_mib: int, handshake: float, idle: float) -> None:
        self.dir = directory
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.nbd.abuse_server", str(directory), str(budget_mib),
             str(handshake), str(idle)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, cwd=Path(__file__).parents[2])
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def status(self) -> dict[str, dict[str, int]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server(short_tmp: Path) -> Iterator[AbuseServer]:
    """Short time limits, for the tests of those limits."""
    s = AbuseServer(short_tmp, BUDGET_MIB, handshake=1.0, idle=1.0)
    yield s
    s.stop()


@pytest.fixture
def patient_server(short_tmp: Path) -> Iterator[AbuseServer]:
    """Time limits far beyond the test, so a slow machine's flood is not cut short by them."""
    s = AbuseServer(short_tmp, BUDGET_MIB, handshake=60.0, idle=60.0)
    yield s
    s.stop()


def flood(path: str, connections: int, reads: int, export: str = "d") -> list[RawClient]:
    """Connections that ask for `reads` MiB-sized reads each and never read a reply."""
    clients = []
    for _ in range(connections):
        c = RawClient(path)
        c.go(export)
        c.sock.sendall(b"".join(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, i,
                                            (i % 64) * MiB, MiB) for i in range(reads)))
        clients.append(c)
    return clients


def read_ok(path: str) -> None:
    c = RawClient(path)
    c.go("d")
    c.request(p.Cmd.READ, 0, 4096, cookie=1)
    assert c.simple_reply() == (0, 1)
    assert c.recv_exact(4096) == bytes(4096)
    c.close()


def test_stuck_readers_hold_at_most_their_guests_budget(patient_server: AbuseServer) -> None:
    """32 connections x 16 MiB of reads, none read: without the budget the server grew by
    ~230 MiB here (and more the longer it runs); with it, by ~80 MiB: its guest's 64 MiB."""
    server = patient_server
    base = server.peak_rss()
    a = flood(str(server.dir / "a.sock"), 32, 16)
    try:
        wait_for(lambda: server.status()["a"]["used"] >= BUDGET_MIB * MiB * 3 // 4, 20,
                 "guest a's connections to fill its budget")
        time.sleep(0.5)  # let anything that would overshoot do so
        read_ok(str(server.dir / "b.sock"))  # another guest is served meanwhile
        status = server.status()
        assert status["a"]["peak"] <= (BUDGET_MIB + 2 * 32) * MiB, status
        grown = server.peak_rss() - base
        assert grown < 140 * MiB, f"the server grew by {grown >> 20} MiB"
    finally:
        for c in a:
            c.close()
    wait_for(lambda: server.status()["a"]["used"] == 0, 20, "guest a's budget to be given back")
    read_ok(str(server.dir / "a.sock"))  # and guest a is served again


def test_a_guest_over_its_budget_still_opens_connections(patient_server: AbuseServer) -> None:
    """Only transmission is paused by the budget: a new connection's handshake is answered
    (it used to wait, unanswered, until the handshake timeout)."""
    server = patient_server
    late = RawClient(str(server.dir / "a.sock"), timeout=10)
    late.start()  # in its handshake when the budget goes over
    a = flood(str(server.dir / "a.sock"), 8, 16)
    a.append(late)
    try:
        wait_for(lambda: server.status()["a"]["peak"] >= BUDGET_MIB * MiB, 20,
                 "guest a's connections to go over its budget")
        late.go("d", fresh=False)  # raises TimeoutError if the handshake was paused
    finally:
        for c in a:
            c.close()


def test_silent_and_idle_connections_are_closed(server: AbuseServer) -> None:
    silent = RawClient(str(server.dir / "a.sock"), timeout=10)
    silent.greeting()  # then nothing: the handshake never finishes
    idle = RawClient(str(server.dir / "a.sock"), timeout=10)
    idle.go("d")
    busy = RawClient(str(server.dir / "a.sock"), timeout=10)
    busy.go("d")
    started = time.monotonic()
    for i in range(8):  # 2 s of a request every 0.25 s: never idle
        busy.request(p.Cmd.READ, 0, 512, cookie=i)
        assert busy.simple_reply() == (0, i)
        busy.recv_exact(512)
        time.sleep(0.25)
    assert silent.closed_by_peer(timeout=5) and idle.closed_by_peer(timeout=5)
    assert time.monotonic() - started < 8
    busy.request(p.Cmd.READ, 0, 512, cookie=99)
    assert busy.simple_reply() == (0, 99)


def test_a_loop_of_options_ends_the_handshake(patient_server: AbuseServer) -> None:
    # Not the 1 s handshake limit: 256 round trips may take longer on a loaded machine.
    c = RawClient(str(patient_server.dir / "b.sock"))
    c.start()
    answered = 0
    with pytest.raises((EOFError, ConnectionResetError)):
        for _ in range(1000):
            c.option(p.Opt.STRUCTURED_REPLY)
            c.option_reply()
            answered += 1
    assert answered == 256

