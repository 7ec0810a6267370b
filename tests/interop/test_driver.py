"""`trustvbd driver` alone: a plain NBD server over a sparse file, with real clients."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop import clients
from tests.support import TRUSTVBD, read_lines_until, run

SIZE = 48 << 20  # room for a 40 MiB request
pytestmark = pytest.mark.interop


class Driver:
    def __init__(self, root: Path, *where: str) -> None:
        self.file = root / "disk.img"
        self.proc = subprocess.Popen(
            [*TRUSTVBD, "driver", "--file", str(self.file), "--size", str(SIZE), *where],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = read_lines_until(self.proc, "ready", 30)
        self.uri = lines[0]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    root = Path(tempfile.mkdtemp(prefix="tvd", dir="/tmp"))
    d = Driver(root, "--socket", str(root / "d.sock"))
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_announces_uri_and_creates_sparse_file(driver: Driver) -> None:
    assert re.fullmatch(r"nbd\+unix:///\?socket=/\S+/d\.sock", driver.uri)
    st = driver.file.stat()
    assert st.st_size == SIZE
    assert st.st_blocks * 512 < SIZE  # sparse


def test_qemu_io(driver: Driver) -> None:
    clients.qemu_io_patterns(driver.uri)


def test_qemu_img(driver: Driver, short_tmp: Path) -> None:
    clients.qemu_img_roundtrip(driver.uri, short_tmp, SIZE)


def test_nbdcopy(driver: Driver, short_tmp: Path) -> None:
    clients.nbdcopy_both_ways(driver.uri, short_tmp, 8 << 20)


def test_nbdinfo(driver: Driver) -> None:
    export = clients.nbdinfo_facts(driver.uri, SIZE)
    assert export["can_multi_conn"]
    assert export["can_fast_zero"]


def test_fio(driver: Driver) -> None:
    clients.fio_short(driver.uri)


def test_libnbd(driver: Driver) -> None:
    clients.libnbd_requests(driver.uri)


def test_byte_sized_and_long_requests(driver: Driver) -> None:
    clients.byte_sized_and_long_requests(driver.uri)


def test_named_export_and_unknown_export(driver: Driver) -> None:
    named = driver.uri.replace("///?", "///disk?")
    run(["qemu-io", "-f", "raw", named, "-c", "read 0 4k"])
    out = run(["nbdinfo", driver.uri.replace("///?", "///other?")], check=False)
    assert out.returncode != 0 and "other" in out.stderr


def test_data_is_in_the_file(driver: Driver) -> None:
    run(["qemu-io", "-f", "raw", driver.uri, "-c", "write -P 0x99 20M 4k", "-c", "flush"])
    with open(driver.file, "rb") as f:
        f.seek(20 << 20)
        assert f.read(4096) == b"\x99" * 4096


def test_tcp_listen_on_any_port(short_tmp: Path) -> None:
    d = Driver(short_tmp, "--listen", "127.0.0.1:0")
    try:
        assert re.fullmatch(r"nbd://127\.0\.0\.1:\d+/", d.uri)
        run(["qemu-io", "-f", "raw", d.uri, "-c", "write -P 7 0 4k", "-c", "read -P 7 0 4k"])
    finally:
        d.stop()


@pytest.mark.parametrize(("args", "words"), [
    (["--size", "lots"], "--size"),
    (["--size", "1MiB", "--socket", "/nonexistent-dir/x.sock"], "cannot listen"),
])
def test_bad_arguments(short_tmp: Path, args: list[str], words: str) -> None:
    base = ["driver", "--file", str(short_tmp / "f.img")]
    if "--socket" not in args:
        args = [*args, "--socket", str(short_tmp / "s.sock")]
    out = run([*TRUSTVBD, *base, *args], check=False, timeout=30)
    assert out.returncode != 0
    assert words in out.stderr


def test_help_and_version() -> None:
    assert "trustvbd 0.1.0" in run([*TRUSTVBD, "--version"]).stdout
    top = run([*TRUSTVBD, "--help"]).stdout
    for cmd in ("up", "status", "driver"):
        assert cmd in top
        assert "usage" in run([*TRUSTVBD, cmd, "--help"]).stdout
    assert os.environ.get("PATH")


def test_workers_share_one_file_across_connections(driver: Driver) -> None:
    """Connections land in different worker processes; all see one file (multi-conn holds)."""
    from tests.support import pids_of_children

    assert len(pids_of_children(driver.proc.pid)) == clients_workers() - 1
    nbd = clients.libnbd()
    handles = []
    for i in range(4):
        h = nbd.NBD()
        h.connect_uri(driver.uri)
        h.pwrite(bytes([0x60 + i]) * 65536, (24 << 20) + i * 65536)
        handles.append(h)
    handles[0].flush()
    for i, h in enumerate(handles):
        for j in range(4):  # every connection reads what every other one wrote
            assert h.pread(65536, (24 << 20) + j * 65536) == bytes([0x60 + j]) * 65536, (i, j)
        h.shutdown()


def clients_workers() -> int:
    from trustvbd.domains.driver import default_workers

    return default_workers()


def test_map_shows_the_files_holes(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="tvm", dir="/tmp"))
    d = Driver(root, "--socket", str(root / "d.sock"))
    try:
        run(["qemu-io", "-f", "raw", d.uri, "-c", f"write -P 0x5a {8 << 20} {1 << 20}"])
        out = json.loads(run(["nbdinfo", "--map", "--json", d.uri]).stdout)
        data = [(e["offset"], e["offset"] + e["length"]) for e in out if e["type"] == 0]
        # File systems report data at their own granularity: it covers what was written.
        assert len(data) == 1 and data[0][0] <= 8 << 20 and data[0][1] >= 9 << 20, out
        assert data[0][1] - data[0][0] < 4 << 20, out
        assert out[0]["type"] == 3 and out[-1]["type"] == 3  # holes (and zeros) around it
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_server_out_of_descriptors_serves_again_once_some_close(short_tmp: Path) -> None:
    """The NBD server's accept loop let accept(2)'s EMFILE through: out of descriptors for a
    moment (many clients at once), its listening socket was closed for good and every later
    client of that socket was refused. It waits now until some close, and serves them."""
    import resource
    import socket
    import time

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    sock = short_tmp / "d.sock"
    proc = subprocess.Popen([*TRUSTVBD, "driver", "--file", str(short_tmp / "d.img"), "--size",
                             "1MiB", "--socket", str(sock)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=few_files)
    try:
        lines = read_lines_until(proc, "ready", 30)
        uri = next(line for line in lines if line.startswith("nbd"))
        held = []
        for _ in range(60):  # more than the server has descriptors for
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(sock))
            held.append(c)
        time.sleep(1.5)
        for c in held:
            c.close()
        out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(1 << 20)
        assert proc.poll() is None
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    assert "cannot accept connections: Too many open files" in err, err[-3000:]
