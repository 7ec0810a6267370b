"""Mirroring end to end: `trustvbd up` over 2 and 3 real NBD drivers, real NBD guests.

The drivers are hostile (tests/hostile_driver.py: one misbehaviour at a time, on
command), qemu-nbd and nbdkit (with its error and delay filters). Guests are
qemu-io, nbdcopy and qemu-img. Whatever one driver does, the guest sees no error
and reads exactly what it wrote; afterwards scrub leaves the replicas identical.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interop.clients import libnbd
from tests.support import TRUSTVBD, System, read_lines_until, run, wait_for_path
from trustvbd.blocks.replica_recovery import FAILED_RECHECK
from trustvbd.crypt.superblock import Layout

pytestmark = pytest.mark.interop

MIB = 1 << 20
SIZE = 8 * MIB
HALF = SIZE // 2
LAY = Layout(SIZE)
PHYS = LAY.physical_size


class Driver:
    """One hostile driver process with its control socket."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.file = root / f"{name}.img"
        self.sock = root / f"{name}.sock"
        self.control = root / f"{name}.ctl"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.hostile_driver", "--file", str(self.file), "--size",
             str(PHYS), "--socket", str(self.sock), "--control", str(self.control)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[2])
        read_lines_until(self.proc, "ready", 30)

    def set(self, mode: str, **kw: Any) -> None:
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(self.control))
            c.sendall(json.dumps({"mode": mode, **kw}).encode() + b"\n")
            assert c.recv(16) == b"ok\n"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.communicate(timeout=10)
        self.proc = None


class Mirror:
    def __init__(self, root: Path, copies: int, limits: str = "",
                 request_timeout: float = 2) -> None:
        self.root = root
        self.drivers = [Driver(root, f"h{i}") for i in range(copies)]
        for d in self.drivers:
            d.start()
        drivers = "".join(
            f'[[driver]]\nname = "{d.name}"\nlabel = "S"\nuri = "nbd+unix:///?socket={d.sock}"\n'
            for d in self.drivers)
        names = ", ".join(f'"{d.name}"' for d in self.drivers)
        text = (f'state_dir = "state"\n{limits}{drivers}[[disk]]\nname = "payroll"\n'
                f'size = {SIZE}\nlabel = "P"\nreplicas = [{names}]\n[[guest]]\nname = "vm1"\n'
                'label = "P"\n')
        self.system = System(root, text, env={"TRUSTVBD_REQUEST_TIMEOUT": str(request_timeout)})

    @property
    def uri(self) -> str:
        return self.system.uri("vm1", "payroll")

    def status(self) -> dict[str, dict[str, Any]]:
        out = json.loads(self.system.cli("status", "-c", str(self.system.config), "--json").stdout)
        disk = next(d for d in out["disks"] if d["name"] == "payroll")
        return {r["name"]: r for r in disk["replicas"]}

    def wait_all_current(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if all(r["state"] == "current" for r in st.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"replicas not current after {timeout} s: {st}")
            time.sleep(0.2)

    def scrub(self) -> dict[str, Any]:
        out = self.system.cli("scrub", "-c", str(self.system.config), "payroll", "--json", check=False)
        assert out.returncode in (0, 2), out.stderr
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def data_areas(self) -> list[bytes]:
        out = []
        for d in self.drivers:
            with open(d.file, "rb") as f:
                f.seek(LAY.data_start)
                out.append(f.read(SIZE))
        return out

    def close(self) -> None:
        self.system.kill()
        for d in self.drivers:
            d.kill()


def wait_current(system: System, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
        replicas = out["disks"][0]["replicas"]
        if all(r["state"] == "current" for r in replicas):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas not current after {timeout} s: {replicas}")
        time.sleep(0.2)


def qemu_io(uri: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", "raw", uri]
    for c in cmds:
        args += ["-c", c]
    out = run(args)
    assert "Pattern verification failed" not in out.stdout + out.stderr, out.stdout


@pytest.fixture(scope="module", params=[2, 3], ids=["2-replicas", "3-replicas"])
def mirror(request: pytest.FixtureRequest) -> Iterator[Mirror]:
    root = Path(tempfile.mkdtemp(prefix="tvm", dir="/tmp"))
    m = Mirror(root, request.param)
    try:
        m.system.start()
        yield m
    finally:
        m.close()
        shutil.rmtree(root, ignore_errors=True)


def _check_identical_after_scrub(m: Mirror) -> None:
    m.wait_all_current()
    first = m.scrub()
    assert first["bad"] == first["repaired"], first
    again = m.scrub()
    assert again["bad"] == 0, again
    areas = m.data_areas()
    assert all(a == areas[0] for a in areas), "replicas' data areas differ after scrub"


@pytest.mark.parametrize("mode", ["flip", "stale", "swap", "drop_writes", "fake_flush"])
def test_a_lying_driver_is_outvoted_and_repaired(mirror: Mirror, mode: str) -> None:
    m, liar = mirror, mirror.drivers[0]
    qemu_io(m.uri, f"write -P 0xa1 0 {SIZE}", "flush")
    # A share of drop_writes' writes may be none: the write reaches a replica as a few
    # joined requests, and which of them the seeded share drops depends on the tests before.
    liar.set(mode, rate=1.0 if mode == "drop_writes" else 0.2)
    qemu_io(m.uri, f"write -P 0xb2 0 {HALF}", "flush")
    if mode == "fake_flush":
        liar.set("crash")  # it lied about the flush and lost the writes
    # Several full reads: requests go to the replicas in turn, so the liar serves some.
    for _ in range(len(m.drivers) + 1):
        qemu_io(m.uri, f"read -P 0xb2 0 {HALF}", f"read -P 0xa1 {HALF} {HALF}")
    out = Path(m.root) / "out.img"
    run(["nbdcopy", m.uri, str(out)])
    expect = b"\xb2" * HALF + b"\xa1" * HALF
    assert out.read_bytes() == expect
    liar.set("honest")
    st = m.status()
    assert st["h0"]["repaired_blocks"] > 0 or st["h0"]["state"] != "current", st
    _check_identical_after_scrub(m)


@pytest.mark.parametrize("mode", ["stall", "stall_reads", "disconnect", "garbage", "huge_length",
                                  "wrong_cookie", "stall_mid_reply"])
def test_a_failing_driver_is_dropped_and_resynced(mirror: Mirror, mode: str) -> None:
    m, bad = mirror, mirror.drivers[-1]
    qemu_io(m.uri, f"write -P 0x11 0 {SIZE}", "flush")
    bad.set(mode)
    started = time.monotonic()
    qemu_io(m.uri, f"write -P 0x22 0 {HALF}", "flush")  # no error for the guest
    for _ in range(2):  # reads in turn reach the bad driver too (huge_length lies on reads)
        qemu_io(m.uri, f"read -P 0x22 0 {HALF}", f"read -P 0x11 {HALF} {HALF}")
    assert time.monotonic() - started < 60, "a stalled driver held up the guest"
    st = m.status()
    assert st[bad.name]["state"] in ("degraded", "resyncing"), st
    assert st[bad.name]["last_error"], st
    qemu_io(m.uri, f"read -P 0x22 0 {HALF}", f"read -P 0x11 {HALF} {HALF}")
    bad.set("honest")
    m.wait_all_current()
    assert m.status()[bad.name]["reconnects"] >= (1 if mode != "stall" else 0)
    _check_identical_after_scrub(m)


def test_a_stalling_driver_is_dropped_after_replica_lag_not_its_timeout(short_tmp: Path) -> None:
    """The request timeout is 15 s; `replica_lag` 1 s drops the stalled driver much sooner."""
    m = Mirror(short_tmp, 2, limits="[limits]\nreplica_lag = 1\n", request_timeout=15)
    bad = m.drivers[1]
    try:
        m.system.start()
        qemu_io(m.uri, f"write -P 0x11 0 {SIZE}", "flush")
        bad.set("stall")
        started = time.monotonic()
        qemu_io(m.uri, f"write -P 0x22 0 {HALF}", "flush")  # no error for the guest
        took = time.monotonic() - started
        assert took < 10, f"the stalled driver held the write for {took:.1f} s"
        st = m.status()
        assert st[bad.name]["state"] in ("degraded", "resyncing"), st
        assert "replica_lag" in st[bad.name]["last_error"], st
        assert st["h0"]["state"] == "current", st
        qemu_io(m.uri, f"read -P 0x22 0 {HALF}", f"read -P 0x11 {HALF} {HALF}")
        bad.set("honest")
        # Its admission read sent while it stalled is hedged: dropped after replica_lag
        # (1 s), not the request timeout (15 s), then it is taken back at the next try.
        m.wait_all_current(timeout=12)
        _check_identical_after_scrub(m)
    finally:
        m.close()


def _restart_with(m: Mirror, bad: Driver, mode: str) -> tuple[float, float]:
    """Start `m`, fill the disk, stop; restart with `bad` misbehaving as `mode`. Returns
    the seconds the healthy start and the restart took until ready."""
    started = time.monotonic()
    m.system.start()
    healthy = time.monotonic() - started
    qemu_io(m.uri, f"write -P 0x11 0 {SIZE}", "flush")
    m.system.stop()
    bad.set(mode)
    started = time.monotonic()
    m.system.start()
    return healthy, time.monotonic() - started


def test_up_starts_without_waiting_for_a_stalled_driver(short_tmp: Path) -> None:
    """`up` restarted while one driver answers no requests (its handshake is honest): the
    open reads every replica's superblocks at once and, once the other has shown the
    current copy, gives the silent one `replica_lag` (1 s), not the request timeout
    (60 s: far beyond the seconds a start varies by under load, where with 12 s a restart
    6.2 s slower than the healthy start failed). That one is left out (degraded), never
    served, and resynced once it answers."""
    lag, timeout = 1.0, 60.0
    m = Mirror(short_tmp, 2, limits=f"[limits]\nreplica_lag = {lag:g}\n", request_timeout=timeout)
    bad = m.drivers[1]
    try:
        healthy, took = _restart_with(m, bad, "stall")
        assert took - healthy < timeout / 2, (
            f"ready after {took:.1f} s (healthy: {healthy:.1f} s): the open waited for the "
            "stalled driver")
        st = m.status()
        assert st["h0"]["state"] == "current", st
        assert st[bad.name]["state"] == "degraded" and "replica_lag" in st[bad.name]["last_error"], st
        # Served by h0 alone, promptly; the writes make dirty blocks the resync must copy.
        started = time.monotonic()
        qemu_io(m.uri, f"read -P 0x11 0 {SIZE}", f"write -P 0x22 0 {HALF}", "flush",
                f"read -P 0x22 0 {HALF}", f"read -P 0x11 {HALF} {HALF}")
        assert time.monotonic() - started < timeout / 2, "the guest waited for the stalled driver"
        assert m.status()[bad.name]["state"] == "degraded"
        bad.set("honest")
        m.wait_all_current(timeout=30)
        _check_identical_after_scrub(m)
    finally:
        m.close()


def test_up_starts_without_waiting_for_a_driver_stalled_in_its_handshake(short_tmp: Path) -> None:
    """`up` restarted while one driver accepts connections but says nothing (no greeting):
    every driver is connected at once, and once the other one's handshake is done, the
    silent one gets `replica_lag` (1 s), not the handshake timeout (10 s). It starts
    degraded and is brought back once it talks again."""
    lag = 1.0
    m = Mirror(short_tmp, 2, limits=f"[limits]\nreplica_lag = {lag:g}\n")
    bad = m.drivers[1]
    try:
        healthy, took = _restart_with(m, bad, "stall_handshake")
        assert took - healthy < 5, (
            f"ready after {took:.1f} s (healthy: {healthy:.1f} s): the open waited for the "
            "driver's handshake")
        st = m.status()
        assert st["h0"]["state"] == "current", st
        assert st[bad.name]["state"] == "degraded" and "replica_lag" in st[bad.name]["last_error"], st
        qemu_io(m.uri, f"read -P 0x11 0 {SIZE}", f"write -P 0x22 0 {HALF}", "flush")
        bad.set("honest")
        m.wait_all_current(timeout=30)
        qemu_io(m.uri, f"read -P 0x22 0 {HALF}", f"read -P 0x11 {HALF} {HALF}")
        _check_identical_after_scrub(m)
    finally:
        m.close()


def test_status_shows_a_dead_driver_at_once_and_it_comes_back_without_guest_io(
        short_tmp: Path) -> None:
    """A driver killed while no guest does I/O: its connection's end is seen on the socket,
    so `status` stops calling its replica current within moments (not at the next
    request), and once the driver is back the replica is reconnected and resynced on its own."""
    m = Mirror(short_tmp, 2)
    victim = m.drivers[1]
    try:
        m.system.start()
        qemu_io(m.uri, f"write -P 0x33 0 {SIZE}", "flush")
        m.wait_all_current()
        victim.kill()
        deadline = time.monotonic() + 5
        while (st := m.status())[victim.name]["state"] == "current":
            assert time.monotonic() < deadline, f"still current 5 s after its driver died: {st}"
            time.sleep(0.1)
        assert st[victim.name]["state"] == "degraded" and st["h0"]["state"] == "current", st
        assert st[victim.name]["last_error"], st  # lost, or the reconnect being refused
        victim.start()
        m.wait_all_current(timeout=30)
        assert m.status()[victim.name]["reconnects"] >= 1
        qemu_io(m.uri, f"read -P 0x33 0 {SIZE}")
        _check_identical_after_scrub(m)
    finally:
        m.close()


@pytest.mark.parametrize("mode", ["stall_reads", "stall", "slow_reads"])
def test_a_read_a_driver_leaves_unanswered_is_served_after_replica_lag(
        short_tmp: Path, mode: str) -> None:
    """A guest reading one block at a time (libnbd, queue depth 1): the first read that
    goes to a driver which answers no reads (or answers them 4 s late) waits `replica_lag`
    (1 s), not the request timeout (8 s), and is served by the other replica; that driver
    is cut off (its late replies are dropped with its connection), so no later read waits
    for it; it is resynced once it answers again."""
    lag, timeout = 1.0, 8.0
    m = Mirror(short_tmp, 2, limits=f"[limits]\nreplica_lag = {lag:g}\n", request_timeout=timeout)
    bad = m.drivers[1]
    nbd = libnbd()
    try:
        m.system.start()
        qemu_io(m.uri, f"write -P 0x11 0 {SIZE}", "write -P 0x22 1M 4k", "flush")
        bad.set(mode, delay=4)
        guest = nbd.NBD()
        guest.connect_uri(m.uri)
        waits = []
        for i in range(8):  # reads alternate between the replicas: one reaches `bad`
            started = time.monotonic()
            data = guest.pread(4096, i * 65536)
            waits.append(time.monotonic() - started)
            assert data == b"\x11" * 4096, f"read {i} returned wrong data"
        slow = [w for w in waits if w >= lag * 0.9]
        assert len(slow) == 1, f"waits {waits}: one read should have waited about {lag} s"
        assert slow[0] < lag + 2.5 < timeout, f"waits {waits}: the stalled read was not hedged"
        st = m.status()
        assert st[bad.name]["state"] in ("degraded", "resyncing"), st
        assert "replica_lag" in st[bad.name]["last_error"] and st["h0"]["state"] == "current", st
        # The guest's connection is fine and reads the other block right.
        assert guest.pread(4096, MIB) == b"\x22" * 4096
        bad.set("honest")
        m.wait_all_current(timeout=7)  # its admission read is hedged: sooner than the 8 s timeout
        for i in range(4):  # `bad` serves again, promptly
            started = time.monotonic()
            assert guest.pread(4096, i * 65536 + 4096) == b"\x11" * 4096
            assert time.monotonic() - started < lag * 0.9
        guest.shutdown()
        _check_identical_after_scrub(m)
    finally:
        m.close()


def test_a_driver_that_answers_reads_late_stays_out_until_it_is_prompt(short_tmp: Path) -> None:
    """A driver that answers every read 3 s late (replica_lag 1 s) is cut off at the first
    read that reaches it, and then kept out: its admission reads are hedged too, so it is
    not taken back only to cost the guest `lag` again at the next read it gets (it used
    to cycle: cut off, resynced, current, cut off, every ~4 s). Prompt again, it is back."""
    lag, timeout = 1.0, 8.0
    m = Mirror(short_tmp, 2, limits=f"[limits]\nreplica_lag = {lag:g}\n", request_timeout=timeout)
    slow_driver = m.drivers[1]
    nbd = libnbd()
    try:
        m.system.start()
        qemu_io(m.uri, "write -P 0x11 0 1M", "flush")
        slow_driver.set("slow_reads", delay=3)
        guest = nbd.NBD()
        guest.connect_uri(m.uri)
        reads = 0
        started = time.monotonic()
        while time.monotonic() - started < 10:  # room for two cycles of the old behaviour
            assert guest.pread(4096, (reads % 256) * 4096) == b"\x11" * 4096
            reads += 1
            time.sleep(0.002)
        # Counted by the domain, not timed here: under load any read may take `lag`.
        st = m.status()[slow_driver.name]
        assert st["lag_cutoffs"] == 1, f"cut off {st['lag_cutoffs']} times in {reads} reads: {st}"
        text = m.system.cli("status", "-c", str(m.system.config)).stdout
        assert f"replica {slow_driver.name}: degraded" in text and "cut off 1 time(s) for lagging" in text, text
        assert st["state"] == "degraded", st
        assert "admission read" in st["last_error"] and "replica_lag" in st["last_error"], st
        slow_driver.set("honest")
        m.wait_all_current(timeout=timeout)
        guest.shutdown()
    finally:
        m.close()


def test_a_driver_that_answers_writes_late_is_taken_back_ever_more_rarely(short_tmp: Path) -> None:
    """A driver that does every write at once but answers it 3 s late (replica_lag 1 s)
    passes its admission (reads are prompt), so it is taken back and cut off again; each
    trip back costs a guest write `lag` or more. Cut off again soon after it was taken
    back, it waits longer each time (4 s, 8 s, ...): in 14 s the guest's writes wait
    about 4 times, where they used to wait 8 times (cut off, resynced, cut off, every
    ~3 s), and the guest's data is intact."""
    m = Mirror(short_tmp, 2, limits="[limits]\nreplica_lag = 1\n", request_timeout=8)
    slow_driver = m.drivers[1]
    nbd = libnbd()
    try:
        m.system.start()
        slow_driver.set("slow_writes", delay=3)
        guest = nbd.NBD()
        guest.connect_uri(m.uri)
        waits, n = [], 0
        started = time.monotonic()
        while time.monotonic() - started < 14:
            t = time.monotonic()
            guest.pwrite(bytes([n % 251]) * 4096, (n % 256) * 4096)
            waits.append(time.monotonic() - t)
            n += 1
        slow = [round(w, 2) for w in waits if w >= 0.9]
        assert len(slow) <= 5, f"{len(slow)} of {n} writes waited for the slow driver: {slow}"
        for i in range(min(n, 256)):
            last = max(k for k in range(n) if k % 256 == i)
            assert guest.pread(4096, i * 4096) == bytes([last % 251]) * 4096
        guest.shutdown()
    finally:
        m.close()


def test_a_flood_of_lies_with_nobody_reading_the_log_does_not_stall_the_guest(
        short_tmp: Path) -> None:
    """A driver that lies on every read made the encryption domain log two lines per read
    (its integrity event, its repair). `up`'s stderr here is a pipe nobody reads (as a
    terminal paused with Ctrl-S, or a stalled `| tee`): once it was full, the domain's event
    loop blocked in a log write and every guest stalled. Log lines are written by a thread
    of their own now (what does not fit is dropped and counted, never waited for:
    tests/domains/test_common.py), and a liar's events and repairs are said once per window,
    as the audit log records them, so it cannot fill the log either."""
    m = Mirror(short_tmp, 2)
    liar = m.drivers[0]
    nbd = libnbd()
    try:
        m.system.start()  # its stderr is a pipe that nothing reads until it stops
        qemu_io(m.uri, "write -P 0x11 0 1M", "flush")
        liar.set("flip", rate=1.0)
        guest = nbd.NBD()
        guest.connect_uri(m.uri)
        done: list[int] = []

        def reads() -> None:
            for i in range(3000):  # in turn: ~1500 reach the liar, each an event and a line
                assert guest.pread(4096, (i % 256) * 4096) == b"\x11" * 4096
                done.append(i)

        reader = threading.Thread(target=reads, daemon=True)
        reader.start()
        reader.join(60)
        assert len(done) == 3000, f"the guest stalled after {len(done)} reads"
        guest.shutdown()
        assert m.status()["h0"]["repaired_blocks"] > 500
        err = m.system.stop()
        said = [line for line in err.splitlines()
                if "integrity: " in line or "block(s) of replica h0" in line]
        assert 2 <= len(said) <= 12, said  # the first of each, a line per 10 s, at stop
    finally:
        m.close()


def test_a_refused_replica_is_never_written_and_is_rebuilt_once_wiped(short_tmp: Path) -> None:
    """A driver comes back holding bytes that are not ours: refused (failed), and looked at
    again now and then by reading only, so its data stays as it was. Its operator then
    wipes it: it used to stay refused until `up` restarted; now it is rebuilt whole."""
    m = Mirror(short_tmp, 2, request_timeout=4)
    bad = m.drivers[1]
    try:
        m.system.start()
        qemu_io(m.uri, f"write -P 0x11 0 {SIZE}", "flush")
        bad.kill()
        bad.file.write_bytes(os.urandom(PHYS))
        foreign = bad.file.read_bytes()
        bad.start()
        deadline = time.monotonic() + 30
        while m.status()[bad.name]["state"] != "failed":  # reads in turn reach it, then admit
            assert time.monotonic() < deadline, m.status()
            qemu_io(m.uri, "read -P 0x11 0 64k", "read -P 0x11 64k 64k")
        assert "not a trustvbd disk" in m.status()[bad.name]["last_error"]
        time.sleep(FAILED_RECHECK * 1.5)  # looked at again at least once
        assert bad.file.read_bytes() == foreign, "a refused replica was written"
        qemu_io(m.uri, "write -P 0x22 0 1M", "flush")
        bad.kill()
        os.truncate(bad.file, 0)
        os.truncate(bad.file, PHYS)
        bad.start()
        m.wait_all_current(timeout=FAILED_RECHECK * 6)
        _check_identical_after_scrub(m)
        qemu_io(m.uri, "read -P 0x22 0 1M", f"read -P 0x11 1M {SIZE - MIB}")
    finally:
        m.close()


def _start_slow_scrub(m: Mirror, delay: float = 0.3) -> subprocess.Popen[str]:
    """The disk written whole, one replica's reads slowed (8 steps of 256 blocks: about
    8 x `delay` s), and `trustvbd scrub --json` started on it: a scrub to cut short."""
    qemu_io(m.uri, f"write -P 0x11 0 {SIZE}", "flush")
    m.drivers[1].set("slow_reads", delay=delay)
    return subprocess.Popen([*TRUSTVBD, "scrub", "-c", str(m.system.config), "payroll",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_scrub_cut_short_by_a_killed_encryption_domain_says_so(short_tmp: Path) -> None:
    """kill -9 of the encryption domain during a scrub: the scrub command ends with one line
    saying what happened and what to do (it said "disk 'payroll' vanished from status"),
    the domain is restarted, and a scrub then runs to its end."""
    m = Mirror(short_tmp, 2)
    try:
        m.system.start()
        scrub = _start_slow_scrub(m)
        time.sleep(0.8)
        out = json.loads(m.system.cli("status", "-c", str(m.system.config), "--json").stdout)
        os.kill(next(d["pid"] for d in out["domains"] if d["kind"] == "crypt"), signal.SIGKILL)
        _, err = scrub.communicate(timeout=60)
        assert scrub.returncode == 1
        assert m.system.proc is not None
        assert err.splitlines() == [  # and not that `up` stopped: it runs (its pid) and restarts it
            "trustvbd scrub: the scrub of disk 'payroll' did not finish: the encryption domain"
            f" serving it stopped or was restarted meanwhile (`trustvbd up`, pid {m.system.proc.pid},"
            " is still running and restarts it: see `trustvbd status`); run the scrub again"]
        m.drivers[1].set("honest")
        deadline = time.monotonic() + 30
        while True:  # restarted: guests are served again
            try:
                qemu_io(m.uri, f"read -P 0x11 0 {SIZE}")
                break
            except AssertionError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        _check_identical_after_scrub(m)
    finally:
        m.close()


def test_a_scrub_cut_short_by_a_killed_up_says_so(short_tmp: Path) -> None:
    """kill -9 of `up` during a scrub: the scrub command says the scrub was cut short and
    what to do, not that `up` is "not running" as if the scrub had never started."""
    m = Mirror(short_tmp, 2)
    try:
        m.system.start()
        scrub = _start_slow_scrub(m)
        out = json.loads(m.system.cli("status", "-c", str(m.system.config), "--json").stdout)
        deadline = time.monotonic() + 30
        while not (out["disks"][0].get("scrub") or {}).get("running"):
            assert time.monotonic() < deadline, out["disks"][0]
            time.sleep(0.05)
            out = json.loads(m.system.cli("status", "-c", str(m.system.config), "--json").stdout)
        m.system.kill()  # SIGKILL
        got, err = scrub.communicate(timeout=60)
        assert scrub.returncode == 3
        why = ("the scrub of disk 'payroll' was cut short: `trustvbd up` stopped while it ran;"
               f" start it again (trustvbd up -c {m.system.config}) and run the scrub again")
        assert err.splitlines() == [f"trustvbd scrub: {why}"]
        assert json.loads(got) == {"disk": "payroll", "error": why}
    finally:
        m.close()


def _status_json(m: Mirror) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        m.system.cli("status", "-c", str(m.system.config), "--json").stdout)
    return out


def _pending_connections(path: Path) -> int:
    """Connections queued on a listening Unix socket that its server has not accepted."""
    out = subprocess.run(["ss", "-xlnH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == str(path):
            return int(fields[2])
    return 0


def test_a_scrub_whose_poll_is_in_flight_when_up_is_killed_says_up_stopped(
        short_tmp: Path) -> None:
    """The other order of a killed `up`: the scrub command's `status` poll is already queued
    on `up`'s control socket when `up` dies (here: `up` frozen by SIGSTOP, then SIGKILL), so it
    sees a reset connection, not a refused one. It printed a ConnectionResetError traceback;
    under load its words depended on which death it noticed first. Now: `up` stopped."""
    # About 16 s of scrub (it is cut short): a `status` call between seeing it run and the
    # SIGSTOP can take seconds on a loaded machine, and a 2.4 s scrub then ended before `up`
    # was stopped, so it polled no more. Requests may take 30 s: a read 2 s late is slow,
    # not a dropped replica (the default 2 s timeout dropped it and the scrub ended at once).
    m = Mirror(short_tmp, 2, request_timeout=30)
    try:
        m.system.start()
        assert m.system.proc is not None
        scrub = _start_slow_scrub(m, delay=2.0)
        deadline = time.monotonic() + 30
        while not (_status_json(m)["disks"][0].get("scrub") or {}).get("running"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(m.system.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while _pending_connections(short_tmp / "state" / "control.sock") < 1:
            assert time.monotonic() < deadline, "the scrub command polled no more"
            time.sleep(0.05)  # its next `status` poll is queued, unanswered
        m.system.kill()  # SIGKILL ends a stopped process too
        got, err = scrub.communicate(timeout=60)
        why = ("the scrub of disk 'payroll' was cut short: `trustvbd up` stopped while it ran;"
               f" start it again (trustvbd up -c {m.system.config}) and run the scrub again")
        assert (scrub.returncode, err.splitlines()) == (3, [f"trustvbd scrub: {why}"])
        assert json.loads(got) == {"disk": "payroll", "error": why}
    finally:
        m.close()


def test_status_and_scrub_say_a_disk_is_opening_while_the_domain_restarts(
        short_tmp: Path) -> None:
    """A killed encryption domain is restarted and opens its disks again (here held up by a
    driver stalled in its handshake, `replica_lag` 6 s): meanwhile `status` said the disk had
    "failed: None" and `scrub` that it "is not encrypted: there is nothing to verify
    against". Both say it is opening now, and the scrub works once it is open. (The lag is
    long enough for a `status` call to land in the window on a loaded machine: with 2 s it
    was missed there.)"""
    m = Mirror(short_tmp, 2, limits="[limits]\nreplica_lag = 6\n")
    try:
        m.system.start()
        qemu_io(m.uri, f"write -P 0x11 0 {HALF}", "flush")
        m.drivers[1].set("stall_handshake")
        out = json.loads(m.system.cli("status", "-c", str(m.system.config), "--json").stdout)
        os.kill(next(d["pid"] for d in out["domains"] if d["kind"] == "crypt"), signal.SIGKILL)
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while "serving" not in seen:
            assert time.monotonic() < deadline, seen
            out = json.loads(m.system.cli("status", "-c", str(m.system.config), "--json").stdout)
            state = out["disks"][0]["state"]
            if state.startswith("unknown: "):  # the domain restarts, or does not have it yet
                continue
            seen.add(state)
            if state != "serving":
                scrub = m.system.cli("scrub", "-c", str(m.system.config), "payroll", check=False)
                assert "not encrypted" not in scrub.stderr, scrub.stderr
                # (or it opened meanwhile, and the scrub ran)
                assert scrub.returncode == 0 or "is still opening" in scrub.stderr, scrub.stderr
        assert seen == {"opening", "serving"}, seen
        # A scrub that cannot run says why on stdout too with --json (scripts read stdout).
        bad = m.system.cli("scrub", "-c", str(m.system.config), "nosuchdisk", "--json",
                           check=False)
        assert bad.returncode == 1, bad
        assert "nosuchdisk" in json.loads(bad.stdout)["error"], bad.stdout
        m.drivers[1].set("honest")
        qemu_io(m.uri, f"read -P 0x11 0 {HALF}")
        _check_identical_after_scrub(m)
    finally:
        m.close()


@pytest.mark.parametrize("fua", [True, False], ids=["fua", "behind"])
def test_the_last_current_replica_lost_while_the_other_resyncs_comes_back_current(
        short_tmp: Path, fua: bool) -> None:
    """h1 resyncs (slowly: its writes are answered 1 s late) when h0, the only current
    replica, is killed. A guest write meanwhile failed on h0 but went through on h1, so h0
    was degraded in h1's favour: no replica was current any more, h1 (missing blocks) could
    not finish its resync without a source, h0 waited for a source to resync from, and the
    disk served nothing until `up` was restarted (found with fio and drivers killed in
    turn). A write no current replica took fails (a small one without FUA, answered before
    the drivers, at the next FLUSH); h0, restarted, is current again."""
    m = Mirror(short_tmp, 2)
    h0, h1 = m.drivers
    nbd = libnbd()
    try:
        m.system.start()
        qemu_io(m.uri, f"write -P 0x11 0 {SIZE}", "flush")
        h1.set("disconnect")
        qemu_io(m.uri, f"write -P 0x22 0 {HALF}", "flush")
        h1.set("slow_writes", delay=1)  # its resync: 8 runs, 1 s each
        deadline = time.monotonic() + 20
        while m.status()["h1"]["state"] != "resyncing":
            assert time.monotonic() < deadline, m.status()
            time.sleep(0.1)
        h0.kill()
        guest = nbd.NBD()
        guest.connect_uri(m.uri)
        try:
            guest.pwrite(b"\x33" * 4096, HALF, nbd.CMD_FLAG_FUA if fua else 0)
            guest.flush()
            wrote = True
        except nbd.Error:
            wrote = False
        h0.start()
        h1.set("honest")
        deadline = time.monotonic() + 30
        while True:
            try:
                got = guest.pread(HALF + 4096, 0)
                break
            except nbd.Error:
                assert time.monotonic() < deadline, m.status()
                with contextlib.suppress(nbd.Error):  # reports a write lost behind
                    guest.flush()
                time.sleep(0.2)
        assert got[:HALF] == b"\x22" * HALF
        assert got[HALF:] in ((b"\x33" if wrote else b"\x11") * 4096, b"\x11" * 4096)
        deadline = time.monotonic() + 30
        while not all(r["state"] == "current" for r in m.status().values()):
            assert time.monotonic() < deadline, m.status()
            with contextlib.suppress(nbd.Error):  # h1 joins at a commit
                guest.flush()
            time.sleep(0.2)
        guest.shutdown()
    finally:
        m.close()


def test_one_replica_that_answers_no_reads_fails_the_read_after_the_request_timeout(
        short_tmp: Path) -> None:
    """With nowhere else to read from, a driver that never answers a read costs the guest
    the request timeout (2 s here) twice at most: once, a reconnect, once more; then EIO,
    and the guest's connection stays usable. No hang; it serves again once it answers."""
    m = Mirror(short_tmp, 1, request_timeout=2)
    bad = m.drivers[0]
    nbd = libnbd()
    try:
        m.system.start()
        qemu_io(m.uri, "write -P 0x11 0 64k", "flush")
        bad.set("stall_reads")
        guest = nbd.NBD()
        guest.connect_uri(m.uri)
        for i in range(2):
            started = time.monotonic()
            with pytest.raises(nbd.Error, match="Input/output error"):
                guest.pread(4096, i * 4096)
            waited = time.monotonic() - started
            assert 2 <= waited < 2 * 2 + 3, f"read {i} failed after {waited:.1f} s"
        bad.set("honest")
        assert guest.pread(4096, 8192) == b"\x11" * 4096
        guest.shutdown()
    finally:
        m.close()


def test_uniformly_slow_drivers_are_not_dropped(short_tmp: Path) -> None:
    """Both drivers take 1.2 s per write (nbdkit's delay filter), more than replica_lag:
    neither is ahead of the other, so neither is dropped; the writes just take longer."""
    pids, drivers = [], ""
    for name in ("a", "b"):
        img, sock, pid = short_tmp / f"{name}.img", short_tmp / f"{name}.sock", short_tmp / f"{name}.pid"
        with open(img, "wb") as f:
            f.truncate(PHYS)
        run(["nbdkit", "-U", str(sock), "-P", str(pid), "--filter=delay", "file", str(img),
             "wdelay=1200ms"])
        wait_for_path(pid)
        pids.append(pid)
        drivers += f'[[driver]]\nname = "{name}"\nlabel = "S"\nuri = "nbd+unix:///?socket={sock}"\n'
    text = (f'state_dir = "state"\n[limits]\nreplica_lag = 1\n{drivers}[[disk]]\n'
            f'name = "payroll"\nsize = {SIZE}\nlabel = "P"\nreplicas = ["a", "b"]\n'
            '[[guest]]\nname = "vm1"\nlabel = "P"\n')
    system = System(short_tmp, text)
    try:
        system.start()
        uri = system.uri("vm1", "payroll")
        qemu_io(uri, "write -P 0x33 0 64k", "write -P 0x44 1M 64k", "flush",
                "read -P 0x33 0 64k", "read -P 0x44 1M 64k")
        out = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
        replicas = out["disks"][0]["replicas"]
        assert all(r["state"] == "current" and r["errors"] == 0 for r in replicas), replicas
    finally:
        system.kill()
        for pidfile in pids:
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError, FileNotFoundError):
                pass


def test_kill_a_driver_during_writes_then_restart_everything(mirror: Mirror) -> None:
    m, victim = mirror, mirror.drivers[1]
    src = Path(m.root) / "src.img"
    src.write_bytes(os.urandom(SIZE))
    copy = subprocess.Popen(["nbdcopy", str(src), m.uri], stderr=subprocess.PIPE, text=True)
    time.sleep(0.05)
    victim.kill()
    _, err = copy.communicate(timeout=120)
    assert copy.returncode == 0, f"the guest saw an error: {err}"
    # More writes with the driver surely gone (on a fast day the copy beat the kill).
    qemu_io(m.uri, "write -P 0x5c 1M 256k", "flush")
    data = bytearray(src.read_bytes())
    data[MIB:MIB + 256 * 1024] = b"\x5c" * (256 * 1024)
    src.write_bytes(data)
    st = m.status()
    assert st[victim.name]["state"] == "degraded" and st[victim.name]["dirty_blocks"] > 0, st
    # Restart `up` while the driver is still gone: the dirty map is in trusted state.
    m.system.stop()
    m.system.start()
    st = m.status()
    assert st[victim.name]["state"] == "degraded" and st[victim.name]["dirty_blocks"] > 0, st
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), m.uri])
    victim.start()
    m.wait_all_current()
    m.system.stop()  # the final commit reaches every replica: then they are byte-identical
    files = [d.file.read_bytes() for d in m.drivers]
    assert all(f == files[0] for f in files), "backing files differ after resync"
    m.system.start()
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), m.uri])


@pytest.mark.parametrize("copies", [2, 3])
def test_a_driver_rolled_back_within_an_epoch_is_resynced_not_taken_as_it_is(
        short_tmp: Path, copies: int) -> None:
    """A driver restarted with its file as it was before the last FLUSH (an old copy put
    back): FLUSHes between full commits sync only the trusted intent log, so that copy
    shows the current epoch and passes for up to date. What was written since the last
    commit must still be copied to it before it counts as current again, so that once
    the other replicas are gone it serves every flushed write rather than EIO."""
    m = Mirror(short_tmp, copies)
    victim = m.drivers[-1]
    try:
        m.system.start()
        qemu_io(m.uri, "write -P 0x11 0 256k", "flush")
        m.wait_all_current()
        old = victim.file.read_bytes()
        qemu_io(m.uri, "write -P 0x22 0 256k", "write -P 0x23 1M 4k", "flush")
        victim.kill()
        victim.file.write_bytes(old)
        victim.start()
        deadline = time.monotonic() + 30
        while (st := m.status())[victim.name]["state"] != "current" or st[victim.name]["reconnects"] < 1:
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        for d in m.drivers[:-1]:
            d.kill()
        qemu_io(m.uri, "read -P 0x22 0 256k", "read -P 0x23 1M 4k")
    finally:
        m.close()


def test_a_driver_rolled_back_within_an_epoch_is_resynced_across_a_restart_of_up(
        short_tmp: Path) -> None:
    """As above, with `up` restarted while the driver is away: the blocks written since
    the last full commit before it left (which its old copy lacks, at the same epoch) are
    kept in trusted state with its dirty map, so the new `up` still resyncs them rather
    than serving the old copy as current."""
    m = Mirror(short_tmp, 2)
    victim = m.drivers[-1]
    try:
        m.system.start()
        qemu_io(m.uri, "write -P 0x11 0 256k", "flush")
        m.wait_all_current()
        m.system.stop()  # a full commit: the copy below shows its epoch
        m.system.start()
        m.wait_all_current()
        old = victim.file.read_bytes()
        qemu_io(m.uri, "write -P 0x22 0 256k", "flush")  # through the intent log: same epoch
        victim.kill()
        qemu_io(m.uri, "write -P 0x33 2M 4k", "flush")  # a full commit: the victim is behind
        m.system.stop()
        victim.file.write_bytes(old)  # its driver comes back with the old copy
        m.system.start()
        victim.start()
        m.wait_all_current()
        m.drivers[0].kill()  # the victim alone serves
        qemu_io(m.uri, "read -P 0x22 0 256k", "read -P 0x33 2M 4k")
    finally:
        m.close()


def test_third_party_drivers_with_fault_injection(short_tmp: Path) -> None:
    """qemu-nbd and nbdkit (error filter: 10 % of reads fail) as the two replicas."""
    a, b = short_tmp / "a.img", short_tmp / "b.img"
    for f in (a, b):
        with open(f, "wb") as fh:
            fh.truncate(PHYS)
    qsock, ksock = short_tmp / "q.sock", short_tmp / "k.sock"
    qpid, kpid = short_tmp / "q.pid", short_tmp / "k.pid"
    run(["qemu-nbd", "-f", "raw", "-k", str(qsock), "-e", "8", "-t", "--fork",
         "--pid-file", str(qpid), str(a)])
    run(["nbdkit", "-U", str(ksock), "-P", str(kpid), "--filter=error", "--filter=delay",
         "file", str(b), "error-pread=EIO", "error-pread-rate=10%", "rdelay=5ms"])
    wait_for_path(qpid)
    wait_for_path(kpid)
    text = (f'state_dir = "state"\n[[driver]]\nname = "q"\nlabel = "S"\n'
            f'uri = "nbd+unix:///?socket={qsock}"\n[[driver]]\nname = "k"\nlabel = "S"\n'
            f'uri = "nbd+unix:///?socket={ksock}"\n[[disk]]\nname = "payroll"\nsize = {SIZE}\n'
            'label = "P"\nreplicas = ["q", "k"]\n[[guest]]\nname = "vm1"\nlabel = "P"\n')
    system = System(short_tmp, text)
    try:
        system.start()
        uri = system.uri("vm1", "payroll")
        src = short_tmp / "src.img"
        src.write_bytes(os.urandom(SIZE))
        run(["nbdcopy", str(src), uri])
        for _ in range(3):  # reads alternate; nbdkit fails 10 % of its share: no guest error
            run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri])
        wait_current(system)  # one that failed a read at start comes back by itself
        system.stop()
        ad, bd = a.read_bytes()[:PHYS], b.read_bytes()[:PHYS]
        assert ad == bd, "qemu-nbd's and nbdkit's files differ"
    finally:
        system.kill()
        for pidfile in (qpid, kpid):
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
