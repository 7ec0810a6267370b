"""A replica of a mirror taken back after an outage (#11.3, #11.8) over third-party drivers
(nbdkit file, with its error filter): what its join costs the driver, and what its
failure costs the guest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support
from tests.interop import clients
from tests.nbd.helpers import Peer
from tests.support import System
from trustvbd.blocks.disk_state import DiskState
from trustvbd.crypt.superblock import Layout

pytestmark = pytest.mark.interop

MIB = 1 << 20


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tvj", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _nbdkit(root: Path, name: str, image: Path, *extra: str) -> Peer:
    home = root / name
    home.mkdir(exist_ok=True)
    return Peer.nbdkit(image, home, *extra)


def _states(s: System) -> dict[str, str]:
    out = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    return {r["name"]: r["state"] for r in out["disks"][0]["replicas"]}


def _wait_state(s: System, name: str, want: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (state := _states(s))[name] != want:
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


def _kill(peer: Peer) -> None:
    os.kill(peer.pid, signal.SIGKILL)
    while support.process_alive(peer.pid):
        time.sleep(0.02)
    peer.sock.unlink(missing_ok=True)
    peer.pidfile.unlink(missing_ok=True)


def _wipe(image: Path, size: int) -> None:
    """Its operator wiped it: a blank sparse file of the same size."""
    with open(image, "wb") as f:
        f.truncate(size)


def _mirror(root: Path, size: str, a: Peer, b: Peer) -> System:
    return System(root, support.config(
        support.driver("a", "S", uri=a.uri()), support.driver("b", "S", uri=b.uri()),
        support.disk("disk", "L", ["a", "b"], size=size), support.guest("vm", "G")))


def _sparse_mirror(root: Path, size: int) -> tuple[list[Path], int, Peer, Peer, System]:
    """A mirror of `size` bytes over two nbdkit file drivers on sparse files (not started):
    (images, their size, driver a, driver b, system)."""
    phys = Layout(size).physical_size
    images = [root / "a.img", root / "b.img"]
    for image in images:
        with open(image, "wb") as f:
            f.truncate(phys)
    a, b = _nbdkit(root, "a", images[0]), _nbdkit(root, "b", images[1])
    return images, phys, a, b, _mirror(root, f"{size >> 30}GiB", a, b)


def test_a_replica_taken_back_after_a_short_outage_stays_sparse(root: Path) -> None:
    """A driver of a 64 GiB sparse mirror is gone while two blocks are written, then comes
    back: it is resynced and joins. Its join wrote the empty part of the leaf table (512 MiB
    here, 128 GiB for 16 TiB) as WRITE_ZEROES with NO_HOLE: nbdkit file allocated all of
    it. Such a join sends only the leaf pages of the blocks it missed now (9d76ce4)."""
    size = 64 << 30
    images, _, a, b, s = _sparse_mirror(root, size)
    nbd = clients.libnbd()
    try:
        s.start()
        h = nbd.NBD()
        h.connect_uri(s.uri("vm", "disk"))
        h.pwrite(b"\x11" * 4096, 0)
        h.flush()
        _kill(b)
        h.pwrite(b"\x22" * 4096, size - 4096)
        h.flush()
        b = _nbdkit(root, "b", images[1])
        _wait_state(s, "b", "current")
        allocated = os.stat(images[1]).st_blocks * 512
        assert allocated < 16 * MIB, f"replica b holds {allocated} bytes after its join"
        _kill(a)  # b alone serves both blocks
        assert h.pread(4096, 0) == b"\x11" * 4096
        assert h.pread(4096, size - 4096) == b"\x22" * 4096
        h.shutdown()
    finally:
        s.kill()
        a.stop()
        b.stop()


def test_a_wiped_replica_rebuilt_whole_stays_sparse(root: Path) -> None:
    """A driver of a 64 GiB sparse mirror comes back wiped (its file blank): it is rebuilt
    whole, and its join writes the empty part of the leaf table (512 MiB here, 128 GiB for
    16 TiB) as WRITE_ZEROES. With NO_HOLE, which forbids the driver to leave holes, nbdkit
    file allocated all of it (on tmpfs, qemu-nbd wrote 23 GB of zeros into memory until
    the machine ran out). The zeroes may be holes now."""
    size = 64 << 30
    images, phys, a, b, s = _sparse_mirror(root, size)
    nbd = clients.libnbd()
    try:
        s.start()
        h = nbd.NBD()
        h.connect_uri(s.uri("vm", "disk"))
        h.pwrite(b"\x11" * 4096, 0)
        h.flush()
        h.pwrite(b"\x22" * 4096, size - 4096)
        h.flush()
        _kill(b)
        _wipe(images[1], phys)
        b = _nbdkit(root, "b", images[1])
        _wait_state(s, "b", "current")
        allocated = os.stat(images[1]).st_blocks * 512
        assert allocated < 16 * MIB, f"replica b holds {allocated} bytes after its join"
        _kill(a)  # b alone serves both blocks
        assert h.pread(4096, 0) == b"\x11" * 4096
        assert h.pread(4096, size - 4096) == b"\x22" * 4096
        h.shutdown()
    finally:
        s.kill()
        a.stop()
        b.stop()


def test_a_replica_that_fails_its_join_is_degraded_not_the_guests_flush(root: Path) -> None:
    """A wiped driver coming back takes the rebuild's writes but fails WRITE_ZEROES
    (nbdkit's error filter, ENOSPC): its join fails in the commit of a guest's FLUSH. That
    replica was never current, so the FLUSH must succeed on the current one and the
    joining replica stay out (degraded), not fail the guest; taken back, its unfinished
    rebuild (data under blank superblocks) is rebuilt again, not refused as "data that is
    not ours" for good."""
    images, phys, a, b, s = _sparse_mirror(root, 4 << 30)
    nbd = clients.libnbd()
    try:
        s.start()
        h = nbd.NBD()
        h.connect_uri(s.uri("vm", "disk"))
        h.pwrite(b"\x11" * 4096, 0)
        h.flush()
        h.pwrite(b"\x22" * 4096, 4096)
        h.flush()
        _kill(b)
        _wipe(images[1], phys)
        failing = root / "zeroes-fail"
        failing.touch()
        b = _nbdkit(root, "b", images[1], "--filter=error", "error=ENOSPC",
                    "error-zero-rate=100%", f"error-zero-file={failing}")
        deadline = time.monotonic() + 6
        i = 0
        while time.monotonic() < deadline:  # each FLUSH commits: b's join fails in it
            h.pwrite(bytes([i % 256]) * 4096, 8192, nbd.CMD_FLAG_FUA)
            h.flush()
            i += 1
        assert _states(s)["b"] in ("degraded", "resyncing"), _states(s)
        assert h.pread(4096, 4096) == b"\x22" * 4096
        failing.unlink()
        deadline = time.monotonic() + 40
        while _states(s)["b"] != "current":  # taken back after its hold (4-8 s by now)
            assert time.monotonic() < deadline, _states(s)
            h.pwrite(b"\x33" * 4096, 12288, nbd.CMD_FLAG_FUA)
            time.sleep(0.2)
        _kill(a)
        assert h.pread(4096 * 4, 0) == b"\x11" * 4096 + b"\x22" * 4096 + bytes([(i - 1) % 256]) * 4096 + b"\x33" * 4096
        h.shutdown()
        err = s.stop()
        # Held back longer each time its join failed soon after it was taken back, not
        # taken back (and a commit made for it) in a tight loop.
        assert 1 <= err.count("degraded: joining failed") <= 6, err
    finally:
        s.kill()
        a.stop()
        b.stop()


def test_a_rebuild_cut_short_by_a_crash_of_up_is_taken_up_again(root: Path) -> None:
    """Driver b comes back wiped and is rebuilt whole, slowly (nbdkit's delay filter on
    its writes); `up` is killed (SIGKILL) once the rebuild's first copies landed, before
    any commit. b then shows our ciphertext under blank superblocks (they come last, at
    its join), which looked like data that is not ours: after the restart b was refused
    for good ('failed') until wiped again. The stored map says it is being rebuilt now
    (docs/format.md 2.7), so the restarted `up` rebuilds it, and b alone serves every
    block afterwards."""
    size = 1 << 30
    images, phys, a, b, s = _sparse_mirror(root, size)
    data = bytes(range(256)) * (8 * MIB // 256)  # 8 MiB: 8 copies of the rebuild
    nbd = clients.libnbd()
    try:
        s.start()
        h = nbd.NBD()
        h.connect_uri(s.uri("vm", "disk"))
        h.pwrite(data, 0)
        h.flush()
        h.shutdown()
        _kill(b)
        _wipe(images[1], phys)
        b = _nbdkit(root, "b", images[1], "--filter=delay", "delay-write=300ms")
        deadline = time.monotonic() + 30
        while os.stat(images[1]).st_blocks * 512 < MIB:  # the first copy landed
            assert time.monotonic() < deadline, _states(s)
            time.sleep(0.05)
        s.kill()
        stored = DiskState(root / "state", "disk").read_dirty_map("b", size // 4096)
        assert stored is not None and stored.rebuilding, stored
        _kill(b)
        b = _nbdkit(root, "b", images[1])
        s.start()
        deadline = time.monotonic() + 60
        while (state := _states(s))["b"] != "current":
            assert state["b"] != "failed" and time.monotonic() < deadline, s.cli(
                "status", "-c", str(s.config)).stdout
            time.sleep(0.2)
        _kill(a)  # b alone serves every block
        h = nbd.NBD()
        h.connect_uri(s.uri("vm", "disk"))
        assert h.pread(len(data), 0) == data
        h.shutdown()
    finally:
        s.kill()
        a.stop()
        b.stop()


def _replicas(s: System) -> dict[str, dict]:  # type: ignore[type-arg]
    out = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    return {r["name"]: r for r in out["disks"][0]["replicas"]}


def test_a_resync_whose_source_fails_its_reads_waits_and_charges_the_source(root: Path) -> None:
    """b comes back after missing writes while a, the only current replica, fails every
    read (nbdkit's error filter, EIO, while a file exists): b's resync waits, says so in
    `status` (resync.waiting_for_source), stays resyncing and is not charged (a's
    last_error holds the read failure). Once a reads again, b is copied up, joins, and
    alone serves every block."""
    images, _, a, b, s = _sparse_mirror(root, 1 << 30)
    _kill(a)
    failing = root / "reads-fail"
    a = _nbdkit(root, "a", images[0], "--filter=error", "error=EIO", "error-pread-rate=100%",
                f"error-pread-file={failing}")
    data = bytes(range(256)) * (MIB // 256)
    nbd = clients.libnbd()
    try:
        s.start()
        h = nbd.NBD()
        h.connect_uri(s.uri("vm", "disk"))
        h.pwrite(data, 0)
        h.flush()
        _kill(b)
        h.pwrite(data[::-1], 4 * MIB)  # b misses it
        h.flush()
        failing.touch()
        b = _nbdkit(root, "b", images[1])
        deadline = time.monotonic() + 30
        while not (st := _replicas(s))["b"].get("resync", {}).get("waiting_for_source"):
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        assert st["b"]["state"] == "resyncing", st
        assert "read" not in str(st["b"]["last_error"]), st  # its own: the lost connection
        assert st["a"]["state"] == "current", st
        assert str(st["a"]["last_error"]).startswith("read failed: EIO"), st
        assert st["b"]["resync"]["done"] == 0 and "failed READ" in st["b"]["resync"][
            "waiting_for_source"], st
        assert "resync waits for a replica to copy from" in s.cli(
            "status", "-c", str(s.config)).stdout
        failing.unlink()
        _wait_state(s, "b", "current")
        _kill(a)  # b alone serves every block
        assert h.pread(len(data), 0) == data
        assert h.pread(len(data), 4 * MIB) == data[::-1]
        h.shutdown()
    finally:
        s.kill()
        a.stop()
        b.stop()
