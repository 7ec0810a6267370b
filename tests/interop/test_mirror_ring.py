"""A mirror's large writes through the ciphertext ring its drivers map read-only
(blocks/write_ring.py, docs/driver-ring.md), end to end: `trustvbd up` over real
`trustvbd driver` processes (which take the ring) and qemu-nbd (which does not), a
real guest (nbdcopy). The replicas' data areas must come out identical, the guest
must read back what it wrote, and a driver that comes back is given a new ring."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.clients import nbdcopy_both_ways
from tests.support import TRUSTVBD, System, read_lines_until, run, wait_for_path
from trustvbd.crypt.superblock import Layout

pytestmark = pytest.mark.interop

MIB = 1 << 20
SIZE = 16 * MIB
LAY = Layout(SIZE)


class Ours:
    def __init__(self, root: Path, name: str) -> None:
        self.name, self.file, self.sock = name, root / f"{name}.img", root / f"{name}.sock"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*TRUSTVBD, "driver", "--file", str(self.file), "--size", str(LAY.physical_size),
             "--socket", str(self.sock)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        read_lines_until(self.proc, "ready", 30)

    def pids(self) -> list[int]:
        assert self.proc is not None
        pid = self.proc.pid
        return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]

    def received(self) -> int:
        """Bytes its processes read by read(2)-like calls so far: its sockets' payloads
        (a pwrite from the ring reads nothing)."""
        total = 0
        for p in self.pids():
            for line in Path(f"/proc/{p}/io").read_text().splitlines():
                if line.startswith("rchar:"):
                    total += int(line.split()[1])
        return total

    def rings(self) -> set[int]:
        """The inodes of the rings this driver's processes map (all read-only, shared)."""
        found = set()
        for p in self.pids():
            for line in Path(f"/proc/{p}/maps").read_text().splitlines():
                if "trustvbd-ring" in line:
                    fields = line.split()
                    assert fields[1] == "r--s", line  # never writable
                    found.add(int(fields[4]))
        return found

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)
        self.proc = None


class Qemu:
    def __init__(self, root: Path, name: str) -> None:
        self.name, self.file, self.sock = name, root / f"{name}.img", root / f"{name}.sock"
        self.file.write_bytes(b"")
        os.truncate(self.file, LAY.physical_size)
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "-k", str(self.sock), "-t", "--cache=none", str(self.file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_path(self.sock, 30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Mirror:
    def __init__(self, root: Path, kinds: list[str], env: dict[str, str] | None = None,
                 limits: str = "") -> None:
        self.drivers: list[Ours | Qemu] = []
        for i, kind in enumerate(kinds):
            if kind == "ours":
                d = Ours(root, f"o{i}")
                d.start()
                self.drivers.append(d)
            else:
                self.drivers.append(Qemu(root, f"q{i}"))
        drivers = "".join(
            f'[[driver]]\nname = "{d.name}"\nlabel = "S"\nuri = "nbd+unix:///?socket={d.sock}"\n'
            for d in self.drivers)
        names = ", ".join(f'"{d.name}"' for d in self.drivers)
        text = (f'state_dir = "state"\n{limits}{drivers}[[disk]]\nname = "payroll"\n'
                f'size = {SIZE}\nlabel = "P"\nreplicas = [{names}]\n[[guest]]\nname = "vm1"\n'
                'label = "P"\n')
        self.system = System(root, text, env=env or {})
        self.system.start()
        self.uri = self.system.uri("vm1", "payroll")

    def wait_all_current(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = json.loads(self.system.cli("status", "-c", str(self.system.config),
                                             "--json").stdout)
            replicas = out["disks"][0]["replicas"]
            if all(r["state"] == "current" for r in replicas):
                return
            assert time.monotonic() < deadline, f"replicas not current: {replicas}"
            time.sleep(0.2)

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


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tvr", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("kinds", [["ours", "ours"], ["ours", "qemu", "ours"]],
                         ids=["2-ours", "3-with-qemu-nbd"])
def test_large_writes_go_through_the_ring_and_the_replicas_stay_identical(
        root: Path, kinds: list[str]) -> None:
    m = Mirror(root, kinds)
    try:
        ours = [d for d in m.drivers if isinstance(d, Ours)]
        src = root / "src.img"
        src.write_bytes(os.urandom(12 * MIB))
        before = [d.received() for d in ours]
        run(["nbdcopy", str(src), m.uri])
        received = [d.received() - b for d, b in zip(ours, before, strict=True)]
        # Descriptors, not payloads: 12 MiB written, far less received by each driver.
        assert all(r < 2 * MIB for r in received), received
        back = root / "back.img"
        run(["nbdcopy", m.uri, str(back)])
        assert back.read_bytes()[:12 * MIB] == src.read_bytes()
        rings = [d.rings() for d in ours]
        assert all(len(r) == 1 for r in rings) and rings[0] == rings[1], rings  # one, shared
        m.wait_all_current()
        areas = m.data_areas()
        assert all(a == areas[0] for a in areas), "replicas' data areas differ"
    finally:
        m.close()


def test_without_the_ring_no_driver_maps_one(root: Path) -> None:
    m = Mirror(root, ["ours", "ours"], env={"TRUSTVBD_RING": "0"})
    try:
        ours = [d for d in m.drivers if isinstance(d, Ours)]
        before = [d.received() for d in ours]
        nbdcopy_both_ways(m.uri, root, 4 * MIB)
        assert all(d.received() - b >= 4 * MIB for d, b in zip(ours, before, strict=True))
        assert all(not d.rings() for d in ours)
    finally:
        m.close()


def test_a_driver_that_comes_back_is_given_a_new_ring_and_is_resynced_exactly(root: Path
                                                                              ) -> None:
    m = Mirror(root, ["ours", "ours"])
    try:
        nbdcopy_both_ways(m.uri, root, 4 * MIB)
        first, second = m.drivers
        assert isinstance(first, Ours) and isinstance(second, Ours)
        old = first.rings()
        second.kill()
        while_down = root / "while-down.img"
        while_down.write_bytes(os.urandom(8 * MIB))
        run(["nbdcopy", str(while_down), m.uri])  # the survivor alone
        second.start()
        m.wait_all_current()
        src = root / "again.img"
        src.write_bytes(os.urandom(6 * MIB))
        run(["nbdcopy", str(src), m.uri])
        back = root / "back.img"
        run(["nbdcopy", m.uri, str(back)])
        assert back.read_bytes()[:6 * MIB] == src.read_bytes()
        new = second.rings()
        assert new and not new & old, (old, new)  # another memfd: nothing written after
        m.wait_all_current()
        areas = m.data_areas()
        assert areas[0] == areas[1], "replicas' data areas differ after the resync"
    finally:
        m.close()


def test_a_driver_that_never_answers_is_cut_off_and_the_others_go_on(root: Path) -> None:
    """Our driver stopped (SIGSTOP) holds the RING_WRITEs it received unanswered: the
    write waits replica_lag, the driver is cut off (only then is its slot reused), the
    other goes on alone; woken, it is resynced and the replicas agree."""
    m = Mirror(root, ["ours", "ours"], limits="[limits]\nreplica_lag = 1\n")
    try:
        nbdcopy_both_ways(m.uri, root, 4 * MIB)
        stalled = m.drivers[1]
        assert isinstance(stalled, Ours) and stalled.proc is not None
        for pid in stalled.pids():
            os.kill(pid, signal.SIGSTOP)
        try:
            src = root / "while-stalled.img"
            src.write_bytes(os.urandom(8 * MIB))
            started = time.monotonic()
            run(["nbdcopy", str(src), m.uri])
            assert time.monotonic() - started < 30
        finally:
            for pid in stalled.pids():
                os.kill(pid, signal.SIGCONT)
        back = root / "back-stalled.img"
        run(["nbdcopy", m.uri, str(back)])
        assert back.read_bytes()[:8 * MIB] == src.read_bytes()
        m.wait_all_current()
        run(["nbdcopy", m.uri, str(back)])  # now also from the resynced one, in turn
        assert back.read_bytes()[:8 * MIB] == src.read_bytes()
        areas = m.data_areas()
        assert areas[0] == areas[1], "replicas' data areas differ after the resync"
    finally:
        m.close()
