"""Benchmarks against peers, in one run (not part of the test suite).

    .venv/bin/python bench/run.py [--suite plain|crypt|all] [--size 1GiB] [--reps 3]

plain: `trustvbd driver`, `trustvbd up` (pass-through), nbdkit file, qemu-nbd raw.
crypt: `trustvbd up` (encrypted: one replica, mirrored over 2 and over 3 drivers),
       nbdkit + luks filter, qemu-nbd LUKS.

Each server gets: nbdcopy sequential write of SIZE from a page-cached file, nbdcopy
sequential read to null:, and fio's nbd engine 4 KiB random read and write at QD 16.
Medians of --reps runs; ratios against the named reference server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from trustvbd.config import format_size, parse_size  # noqa: E402

TRUSTVBD = [sys.executable, "-m", "trustvbd.cli"]
PASS = "bench-passphrase"


@dataclass
class Server:
    name: str
    start: Callable[[Path], tuple[str, Callable[[], None]]]  # workdir -> (uri, stop)


def wait_socket(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def stop_pidfile(pidfile: Path) -> Callable[[], None]:
    def stop() -> None:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
    return stop


def stop_proc(proc: subprocess.Popen[bytes]) -> Callable[[], None]:
    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    return stop


def nbdkit_file(size: int, filters: list[str] | None = None, image: str = "disk.img") -> Server:
    def start(work: Path) -> tuple[str, Callable[[], None]]:
        sock, pid = work / "nbdkit.sock", work / "nbdkit.pid"
        if image == "disk.img":
            with open(work / image, "wb") as f:
                f.truncate(size)
        subprocess.run(["nbdkit", "-U", str(sock), "-P", str(pid), "file", str(work / image),
                        *(filters or [])], check=True)
        wait_socket(sock)
        return f"nbd+unix:///?socket={sock}", stop_pidfile(pid)
    return Server("nbdkit file" if not filters else "nbdkit + luks filter", start)


def qemu_nbd(size: int, luks: bool = False) -> Server:
    def start(work: Path) -> tuple[str, Callable[[], None]]:
        sock, pid = work / "qemu.sock", work / "qemu.pid"
        if luks:
            args = ["--object", f"secret,id=s0,data={PASS}", "--image-opts",
                    f"driver=luks,key-secret=s0,file.filename={work / 'luks.img'}"]
        else:
            with open(work / "disk.img", "wb") as f:
                f.truncate(size)
            args = ["-f", "raw", str(work / "disk.img")]
        subprocess.run(["qemu-nbd", "-k", str(sock), "-e", "8", "-t", "--fork", "--pid-file",
                        str(pid), *args], check=True)
        wait_socket(sock)
        return f"nbd+unix:///?socket={sock}", stop_pidfile(pid)
    return Server("qemu-nbd LUKS" if luks else "qemu-nbd raw", start)


def make_luks(work: Path, size: int) -> None:
    # qemu-img's PBKDF timing sometimes fails on a busy machine ("Unable to get accurate
    # CPU usage": its CPU clock ticks too coarsely); it works on another try.
    for _attempt in range(20):
        result = subprocess.run(["qemu-img", "create", "-q", "-f", "luks", "--object",
                                 f"secret,id=s0,data={PASS}", "-o", "key-secret=s0,iter-time=100",
                                 str(work / "luks.img"), str(size)])
        if result.returncode == 0:
            return
    raise RuntimeError("qemu-img could not create the LUKS image")


def trustvbd_driver(size: int) -> Server:
    def start(work: Path) -> tuple[str, Callable[[], None]]:
        sock = work / "drv.sock"
        proc = subprocess.Popen([*TRUSTVBD, "driver", "--file", str(work / "disk.img"), "--size",
                                 str(size), "--socket", str(sock)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        while proc.stdout.readline().strip() != b"ready":
            if proc.poll() is not None:
                raise RuntimeError("trustvbd driver failed to start")
        return f"nbd+unix:///?socket={sock}", stop_proc(proc)
    return Server("trustvbd driver", start)


def trustvbd_up(size: int, encrypt: bool, replicas: int = 1) -> Server:
    """`up` with one disk over `replicas` trustvbd drivers (each its own process and file)."""
    def start(work: Path) -> tuple[str, Callable[[], None]]:
        config = work / "tv.toml"
        drivers = "".join(f'[[driver]]\nname = "d{i}"\nlabel = "S"\ndir = "b{i}"\n'
                          for i in range(replicas))
        names = ", ".join(f'"d{i}"' for i in range(replicas))
        config.write_text(
            f'state_dir = "st"\n{drivers}'
            f'[[disk]]\nname = "disk"\nsize = {size}\nlabel = "L"\nreplicas = [{names}]\n'
            f'encrypt = {"true" if encrypt else "false"}\n[[guest]]\nname = "g"\nlabel = "G"\n')
        proc = subprocess.Popen([*TRUSTVBD, "up", "-c", str(config)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        uri = ""
        while True:
            line = proc.stdout.readline().decode().strip()
            if line.startswith("guest g disk disk "):
                uri = line.split()[-1]
            if line == "ready":
                break
            if not line and proc.poll() is not None:
                raise RuntimeError("trustvbd up failed to start")
        return uri, stop_proc(proc)
    if not encrypt:
        return Server("trustvbd up (pass-through)", start)
    return Server("trustvbd up (encrypted)" if replicas == 1 else
                  f"trustvbd up (encrypted, {replicas} replicas)", start)


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def fio_iops(uri: str, rw: str, runtime: int) -> float:
    out = subprocess.run(
        ["fio", "--name=t", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
         "--iodepth=16", "--size=256m", f"--runtime={runtime}", "--time_based",
         "--output-format=json"], check=True, capture_output=True, text=True).stdout
    data = json.loads(out[out.index("{"):])
    job = data["jobs"][0]
    return float(job["read" if "read" in rw else "write"]["iops"])


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tvb", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def measure(server: Server, size: int, source: Path, runtime: int, luks: bool) -> dict[str, float]:
    with workdir() as work:
        if luks:
            make_luks(work, size)
        uri, stop = server.start(work)
        try:
            w = timed(["nbdcopy", str(source), uri])
            r = timed(["nbdcopy", uri, "null:"])
            result = {"write MB/s": size / w / 1e6, "read MB/s": size / r / 1e6,
                      "randread IOPS": fio_iops(uri, "randread", runtime),
                      "randwrite IOPS": fio_iops(uri, "randwrite", runtime)}
        finally:
            stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["plain", "crypt", "all"], default="all")
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fio-runtime", type=int, default=5)
    args = parser.parse_args()
    size = parse_size(args.size)
    suites: list[tuple[str, list[Server], str, bool]] = []
    if args.suite in ("plain", "all"):
        suites.append(("plain", [trustvbd_driver(size), trustvbd_up(size, False), nbdkit_file(size),
                                 qemu_nbd(size)], "qemu-nbd raw", False))
    if args.suite in ("crypt", "all"):
        suites.append(("crypt", [trustvbd_up(size, True), trustvbd_up(size, True, 2),
                                 trustvbd_up(size, True, 3), nbdkit_file(size, ["--filter=luks",
                       f"passphrase={PASS}"], image="luks.img"), qemu_nbd(size, luks=True)],
                       "nbdkit + luks filter", True))
    with workdir() as src_dir:
        source = src_dir / "source.img"
        with open(source, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
        subprocess.run(["cat", str(source)], stdout=subprocess.DEVNULL, check=True)  # page-cache it
        for suite, servers, reference, luks in suites:
            results: dict[str, dict[str, list[float]]] = {s.name: {} for s in servers}
            for rep in range(args.reps):
                for server in servers:  # interleaved, so drift hits every server alike
                    print(f"[{suite} rep {rep + 1}/{args.reps}] {server.name}", file=sys.stderr)
                    for key, value in measure(server, size, source, args.fio_runtime, luks).items():
                        results[server.name].setdefault(key, []).append(value)
            print_table(suite, results, reference, size, args.reps)
    return 0


def print_table(suite: str, results: dict[str, dict[str, list[float]]], reference: str, size: int,
                reps: int) -> None:
    metrics = ["write MB/s", "read MB/s", "randread IOPS", "randwrite IOPS"]
    ref = {m: statistics.median(results[reference][m]) for m in metrics}
    print(f"\n## {suite}: nbdcopy {format_size(size)} sequential, fio nbd 4 KiB random QD16;"
          f" medians of {reps}; (x) = ratio to {reference}\n")
    print("| server | " + " | ".join(metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for name, values in results.items():
        cells = []
        for m in metrics:
            med = statistics.median(values[m])
            cells.append(f"{med:,.0f} ({med / ref[m]:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
