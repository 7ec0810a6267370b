"""A 16 TiB mirror with a driver gone (#11.3 at the size users have): what the replica
lacks is remembered in trusted state as runs, not as a bitmap of the disk (512 MiB at
16 TiB, rewritten at every commit while it was away), and only that is resynced.

The drivers are nbdkit's file plugin on sparse files in /dev/shm (tmpfs: ext4 files
stop at 16 TiB, and the disk's replica is larger); only what is written takes room.
"""

from __future__ import annotations

import contextlib
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

from tests import support
from tests.interop import clients
from tests.support import System, pids_of_children
from trustvbd.crypt.superblock import Layout

pytestmark = pytest.mark.interop

SIZE = 16 << 40
LAY = Layout(SIZE)


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    """A state/config directory on disk and a backing directory on tmpfs."""
    root = Path(tempfile.mkdtemp(prefix="tvm", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="tvm", dir="/dev/shm"))
    yield root, shm
    shutil.rmtree(shm, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


class Nbdkit:
    """nbdkit's file plugin serving one sparse file, killed and restarted on command."""

    def __init__(self, root: Path, shm: Path, name: str) -> None:
        self.file = shm / f"{name}.img"
        self.sock = root / f"{name}.sock"
        self.pidfile = root / f"{name}.pid"
        with open(self.file, "wb") as f:
            f.truncate(LAY.physical_size)
        self.pid = 0

    def start(self) -> None:
        self.pidfile.unlink(missing_ok=True)
        subprocess.run(["nbdkit", "-U", str(self.sock), "-P", str(self.pidfile), "file",
                        str(self.file)], check=True)
        support.wait_for_path(self.pidfile)
        while not self.pidfile.read_text().strip():
            time.sleep(0.01)
        self.pid = int(self.pidfile.read_text())

    def kill(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            while support.process_alive(self.pid):
                time.sleep(0.02)
            self.pid = 0
            self.sock.unlink(missing_ok=True)


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The [start, end) ranges of `path` that hold data (SEEK_DATA / SEEK_HOLE)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end, at = os.fstat(fd).st_size, 0
        while at < end:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after `at`
                break
            at = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, at))
    finally:
        os.close(fd)
    return out


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_16_tib_mirror_remembers_and_resyncs_only_what_its_dead_driver_missed(
        dirs: tuple[Path, Path]) -> None:
    """One driver killed; writes at the start and the end of the disk, FLUSH; `up`
    restarted while it is still gone; the driver back: exactly the blocks written are
    resynced, the stored dirty map is a few runs (72 bytes, not 512 MiB), the encryption
    domain stays small, and the backing files end byte-identical wherever either holds data."""
    root, shm = dirs
    drivers = [Nbdkit(root, shm, f"d{i}") for i in range(2)]
    for d in drivers:
        d.start()
    s = System(root, support.config(
        *(support.driver(f"d{i}", "S", uri=f"nbd+unix:///?socket={d.sock}")
          for i, d in enumerate(drivers)),
        support.disk("disk", "L", ["d0", "d1"], size="16TiB"), support.guest("vm", "G")))
    nbd = clients.libnbd()
    writes = {1 << 20: b"\x3a" * (64 << 10), SIZE - (128 << 10): b"\xc5" * (64 << 10)}

    def replicas() -> dict[str, dict]:  # type: ignore[type-arg]
        out = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
        return {r["name"]: r for r in out["disks"][0]["replicas"]}

    try:
        s.start(timeout=60)
        drivers[1].kill()
        h = nbd.NBD()
        h.connect_uri(s.uri("vm", "disk"))
        for off, data in writes.items():
            h.pwrite(data, off)
        h.flush()  # a full commit: d1's map, then the anchor listing it as behind
        h.shutdown()
        st = replicas()
        assert st["d1"]["state"] == "degraded" and st["d1"]["dirty_blocks"] == 32, st
        behind = root / "state" / "disks" / "disk" / "behind" / "d1"
        assert behind.stat().st_size == 40 + 2 * 16  # two runs (docs/format.md 2.7)
        s.stop()

        s.start(timeout=60)  # d1 still gone: what it lacks comes from trusted state
        st = replicas()
        assert st["d1"]["state"] == "degraded" and st["d1"]["dirty_blocks"] == 32, st
        drivers[1].start()
        deadline = time.monotonic() + 60
        while (st := replicas())["d1"]["state"] != "current":
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        assert st["d1"]["resync"]["total"] == 32 and st["d1"]["resync"]["done"] == 32, st
        assert not behind.exists()
        assert s.proc is not None
        crypt = [p for p in pids_of_children(s.proc.pid)
                 if b"crypt" in Path(f"/proc/{p}/cmdline").read_bytes()]
        rss = [_rss_kib(p) for p in crypt]
        assert rss and max(rss) < 400 * 1024, rss  # KiB: no O(disk) map in memory
        h = nbd.NBD()
        h.connect_uri(s.uri("vm", "disk"))
        for off, data in writes.items():
            assert h.pread(len(data), off) == data
        h.shutdown()
        s.stop()  # the final commit reaches both

        spans = sorted(set(data_extents(drivers[0].file)) | set(data_extents(drivers[1].file)))
        assert sum(b - a for a, b in spans) < 1 << 20, spans  # sparse: ~150 KiB hold data
        with open(drivers[0].file, "rb") as f0, open(drivers[1].file, "rb") as f1:
            for a, b in spans:
                f0.seek(a)
                f1.seek(a)
                assert f0.read(b - a) == f1.read(b - a), f"the replicas differ in [{a}, {b})"
        for off in writes:  # the data written is on both, as ciphertext (not zeros)
            at = LAY.data_offset(off // 4096)
            assert any(a <= at < b for a, b in data_extents(drivers[1].file)), off
    finally:
        s.kill()
        for d in drivers:
            d.kill()
