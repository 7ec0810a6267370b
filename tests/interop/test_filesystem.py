"""A real filesystem on a trustvbd disk: mkfs.ext4 through nbdfuse, files written with fuse2fs.

e2fsprogs writes superblock fields a few bytes at a time; a server that refuses small
requests loses those writes silently through fuse2fs, and e2fsck then finds wrong counts.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import System, run

pytestmark = pytest.mark.interop

CONFIG = """
state_dir = "state"
[[driver]]
name = "drv"
label = "S"
dir = "backing"
[[disk]]
name = "fs"
size = "64MiB"
label = "D"
replicas = ["drv"]
[[guest]]
name = "vm"
label = "G"
"""


def wait_until(cond: Callable[[], object], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    if proc.poll() is None:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, capture_output=True)
    try:
        # Generous: on a heavily loaded machine nbdfuse can take tens of seconds to exit
        # after unmount, whatever the server; a real hang still fails.
        proc.wait(180)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args!r} did not exit after unmounting {mountpoint}") from None


@contextmanager
def exposed(uri: str, work: Path) -> Iterator[Path]:
    """The export as the file DIR/nbd, through nbdfuse."""
    where = work / "exposed"
    where.mkdir(exist_ok=True)
    proc = subprocess.Popen(["nbdfuse", str(where), uri])
    try:
        wait_until(lambda: (where / "nbd").exists() or proc.poll() is not None, "nbdfuse")
        assert proc.poll() is None, "nbdfuse exited"
        yield where / "nbd"
    finally:
        stop(proc, where)


@contextmanager
def mounted(image: Path, work: Path, *options: str) -> Iterator[Path]:
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(["fuse2fs", "-f", "-o", ",".join(["fakeroot", *options]), str(image),
                             str(mnt)], stderr=subprocess.PIPE)
    try:
        wait_until(lambda: os.path.ismount(mnt) or proc.poll() is not None, "fuse2fs")
        assert proc.poll() is None, f"fuse2fs exited: {proc.stderr.read()!r}"  # type: ignore[union-attr]
        yield mnt
    finally:
        stop(proc, mnt)  # fuse2fs writes everything back and flushes before it exits


@contextmanager
def shared_mounts(root: Path) -> Iterator[None]:
    """Mounts under `root` made shared. A domain with its own mount namespace (sandbox._expose:
    every encryption domain and driver started meanwhile on this machine, other tests' too)
    copies the FUSE mounts here; with shared ones the copies are slaves, so `fusermount -u`
    unmounts them too. Else the copy held the filesystem and its daemon (fuse2fs, nbdfuse)
    did not exit until that domain did. systemd makes a host's mounts shared; this machine's
    / is private, hence the bind mount."""
    if os.geteuid() != 0:
        yield
        return
    subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(root)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False, capture_output=True)


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_ext4_through_fuse_survives_a_restart_clean() -> None:
    root = Path(tempfile.mkdtemp(prefix="tvf", dir="/tmp"))
    system = System(root, CONFIG)
    with shared_mounts(root):
        try:
            _write_restart_and_check(system, root)
        finally:
            system.kill()
    shutil.rmtree(root, ignore_errors=True)


def _write_restart_and_check(system: System, root: Path) -> None:
    system.start()
    uri = system.uri("vm", "fs")
    rng = random.Random(12)
    with exposed(uri, root) as image:
        run(["mkfs.ext4", "-q", "-F", str(image)])
        with mounted(image, root) as mnt:
            for i in range(300):
                d = mnt / f"d{i % 12}"
                d.mkdir(exist_ok=True)
                (d / f"f{i}").write_bytes(rng.randbytes(rng.randrange(1, 40_000)))
            written = checksums(mnt)
    system.stop()
    system.start()
    with exposed(system.uri("vm", "fs"), root) as image:
        fsck = run(["e2fsck", "-fn", str(image)], check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        passes = [line for line in fsck.stdout.splitlines() if line.startswith("Pass ")]
        other = [line for line in fsck.stdout.splitlines()
                 if line not in passes and not line.startswith(f"{image}: ")]
        assert len(passes) == 5 and not other, fsck.stdout  # clean, with no message
        with mounted(image, root, "ro") as mnt:
            assert checksums(mnt) == written
            assert len(written) == 300
    system.stop()
