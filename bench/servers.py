"""The servers the benchmarks start: ours and the peers, each in its own work directory.

A server's `start(work)` returns (uri, stop), or raises having stopped whatever it had
started (an ExitStack of stops, handed over with `pop_all()` once all is up). Every
process whose CPU time the benchmark should account is noted in `work/bench.pids` (pid
and role); the processes it starts (the domains of `up`) are found as its descendants.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from trustvbd.blocks.crypt_layer import physical_size  # noqa: E402
from trustvbd.config import format_size, parse_size  # noqa: E402,F401  (used by workloads.py)

TRUSTVBD = [sys.executable, "-m", "trustvbd.cli"]
BASELINE_VENV = ".venv-bench"  # made inside a --baseline tree (tree_python)
PASS = "bench-passphrase"
PIDS = "bench.pids"
# What each kind of row is measured with (see run.py).
ALL = ("seq", "random", "qd1")
SEQ = ("seq",)


@dataclass
class Server:
    name: str
    start: Callable[[Path], tuple[str, Callable[[], None]]]  # workdir -> (uri, stop)
    workloads: tuple[str, ...] = ALL
    luks_image: bool = False  # needs work/luks.img made first
    tags: dict[str, str] = field(default_factory=dict)


def note_pid(work: Path, pid: int, role: str) -> None:
    with open(work / PIDS, "a") as f:
        f.write(f"{pid} {role}\n")


def read_pidfile(path: Path, timeout: float = 30) -> int:
    """The pid in `path` once it is written whole (nbdkit creates the file, then writes it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if text.endswith("\n") and text.strip().isdigit():
            return int(text)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} holds no pid")
        time.sleep(0.05)


def wait_socket(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def stop_pidfile(pidfile: Path) -> Callable[[], None]:
    """Stops the daemon whose pid is in `pidfile` (SIGTERM, SIGKILL after 10 s); nothing to
    stop if no pid ever appeared there (it never got as far as running)."""
    def stop() -> None:
        try:
            pid = read_pidfile(pidfile, timeout=5)
        except RuntimeError:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
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
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    return stop


def start_daemon(argv: list[str], sock: Path, pidfile: Path, work: Path, role: str,
                 quiet: bool = False) -> Callable[[], None]:
    """Run a server that forks into the background writing `pidfile`, wait for its socket,
    note its pid; returns its stop. If it does not come up, it is stopped before raising."""
    out = subprocess.DEVNULL if quiet else None
    subprocess.run(argv, check=True, stdout=out, stderr=out)
    stop = stop_pidfile(pidfile)
    with contextlib.ExitStack() as undo:
        undo.callback(stop)
        wait_socket(sock)
        note_pid(work, read_pidfile(pidfile), role)
        undo.pop_all()
    return stop


def start_ready(argv: list[str], work: Path, role: str, **popen: Any) -> subprocess.Popen[bytes]:
    """Start a server that prints "ready" on stdout once it serves, note its pid; if it
    exits first (or anything fails), it is stopped before raising."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, **popen)
    with contextlib.ExitStack() as undo:
        undo.callback(stop_proc(proc))
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == b"ready":
                note_pid(work, proc.pid, role)
                undo.pop_all()
                return proc
        raise RuntimeError(f"{role} ({argv[0]}) exited {proc.wait(30)} before it was ready")
    raise AssertionError("unreachable")  # mypy: ExitStack may swallow exceptions


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def delay_args(delay_ms: int) -> tuple[list[str], list[str]]:
    """nbdkit (options, parameters) that add `delay_ms` to every read and write reply, with
    enough threads that requests overlap their delays as a remote driver's would."""
    if not delay_ms:
        return [], []
    return ["--threads=64", "--filter=delay"], [f"rdelay={delay_ms}ms", f"wdelay={delay_ms}ms"]


def nbdkit_file(size: int, delay_ms: int = 0) -> Server:
    def start(work: Path) -> tuple[str, Callable[[], None]]:
        options, params = delay_args(delay_ms)
        return _nbdkit(work, "nbdkit", sparse(work / "disk.img", size), options, params)
    return Server("nbdkit file" + (f" +{delay_ms} ms" if delay_ms else ""), start,
                  SEQ if delay_ms else ALL)


def nbdkit_luks(delay_ms: int = 0, cpus: list[int] | None = None) -> Server:
    """nbdkit's file plugin with the luks filter; with `cpus`, it and its threads pinned
    there (taskset), as `up`'s [placement] pins a disk's domains: like against like."""
    def start(work: Path) -> tuple[str, Callable[[], None]]:
        # The delay filter outermost: 10 ms per guest request (below luks it would be
        # paid per sector, as luks calls the plugin sector by sector).
        options, params = delay_args(delay_ms)
        return _nbdkit(work, "nbdkit", work / "luks.img", [*options, "--filter=luks"],
                       [f"passphrase={PASS}", *params], taskset=cpus)
    return Server("nbdkit + luks filter" + (f" +{delay_ms} ms" if delay_ms else "")
                  + (", pinned" if cpus else ""), start, SEQ if delay_ms else ALL, luks_image=True)


def _nbdkit(work: Path, name: str, image: Path, options: list[str], params: list[str],
            role: str = "nbdkit", taskset: list[int] | None = None) -> tuple[str, Callable[[], None]]:
    sock, pid = work / f"{name}.sock", work / f"{name}.pid"
    pin = ["taskset", "-c", ",".join(map(str, taskset))] if taskset else []
    stop = start_daemon([*pin, "nbdkit", "-U", str(sock), "-P", str(pid), *options, "file", str(image),
                         *params], sock, pid, work, role)
    return f"nbd+unix:///?socket={sock}", stop


def qemu_nbd(size: int, luks: bool = False) -> Server:
    def start(work: Path) -> tuple[str, Callable[[], None]]:
        sock, pid = work / "qemu.sock", work / "qemu.pid"
        if luks:
            args = ["--object", f"secret,id=s0,data={PASS}", "--image-opts",
                    f"driver=luks,key-secret=s0,file.filename={work / 'luks.img'}"]
        else:
            args = ["-f", "raw", str(sparse(work / "disk.img", size))]
        stop = start_daemon(["qemu-nbd", "-k", str(sock), "-e", "8", "-t", "--fork",
                             "--pid-file", str(pid), *args], sock, pid, work, "qemu-nbd")
        return f"nbd+unix:///?socket={sock}", stop
    return Server("qemu-nbd LUKS" if luks else "qemu-nbd raw", start, luks_image=luks)


def have(program: str) -> bool:
    return shutil.which(program) is not None


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


@functools.cache
def tree_python(tree: Path) -> str:
    """An interpreter that imports trustvbd from `tree` and everything else from ours.

    A domain started with a clean environment (the driver domains) cannot be pointed at
    `tree` by PYTHONPATH: started with this interpreter (`up` uses sys.executable), it
    runs the tree's code too, so an A/B covers the driver domain. A venv without pip whose
    one .pth puts `tree` ahead of our site-packages (whose own .pth files, among them the
    editable install of the checkout, are then not read)."""
    venv = tree / BASELINE_VENV
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # Written once per run: a tree made by another checkout points at that one's packages,
    # which may be gone (the baseline then failed to start with no module `cryptography`).
    ours = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "trustvbd_tree.pth").write_text("\n".join([str(tree.resolve()), *ours]) + "\n")
    return str(python)


def trustvbd_cli(tree: Path | None) -> list[str]:
    return TRUSTVBD if tree is None else [tree_python(tree), "-m", "trustvbd.cli"]


def trustvbd_driver(size: int, tree: Path | None = None) -> Server:
    """`trustvbd driver` alone; with `tree`, the trustvbd package found there (PYTHONPATH)."""
    def start(work: Path) -> tuple[str, Callable[[], None]]:
        sock = work / "drv.sock"
        proc = start_ready([*trustvbd_cli(tree), "driver", "--file", str(work / "disk.img"), "--size",
                            str(size), "--socket", str(sock)], work, "driver", cwd=work,
                           env=None if tree is None else {**os.environ, "PYTHONPATH": str(tree)})
        return f"nbd+unix:///?socket={sock}", stop_proc(proc)
    return Server("trustvbd driver" + (" [baseline]" if tree is not None else ""), start)


def trustvbd_up(size: int, encrypt: bool, replicas: int = 1, nbdkit_drivers: bool = False,
                delay_ms: int = 0, tree: Path | None = None, cpus: list[int] | None = None,
                extra_env: dict[str, str] | None = None) -> Server:
    """`up` with one disk over `replicas` drivers, each its own process and file: trustvbd's
    own driver domains, or nbdkit file servers given by uri (with `delay_ms` per reply).

    With `tree`, the launcher and the trusted domains run the trustvbd package found there
    (an A/B baseline such as `git archive main`), the driver domains too: they start with
    a clean environment, with the interpreter `up` runs on (tree_python).
    With `cpus`, `[placement] cpus` pins the encryption domain and its drivers there
    (docs/placement.md); the launcher, the access-control domain, the store stay free.
    `extra_env`: set for the launcher, so for its trusted domains (TRUSTVBD_SPIN_US)."""
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree is not None else None
    if extra_env:
        env = {**(env or os.environ), **extra_env}
    def start(work: Path) -> tuple[str, Callable[[], None]]:
        with contextlib.ExitStack() as undo:  # stops, last started first
            drivers = ""
            for i in range(replicas):
                if nbdkit_drivers:
                    image = sparse(work / f"n{i}.img", physical_size(size))
                    options, params = delay_args(delay_ms)
                    uri, stop = _nbdkit(work, f"n{i}", image, options, params, "driver")
                    undo.callback(stop)
                    drivers += f'[[driver]]\nname = "d{i}"\nlabel = "S"\nuri = "{uri}"\n'
                else:
                    drivers += f'[[driver]]\nname = "d{i}"\nlabel = "S"\ndir = "b{i}"\n'
            names = ", ".join(f'"d{i}"' for i in range(replicas))
            placement = f"[placement]\ncpus = {cpus}\n" if cpus else ""
            config = work / "tv.toml"
            config.write_text(
                f'state_dir = "st"\n{placement}{drivers}'
                f'[[disk]]\nname = "disk"\nsize = {size}\nlabel = "L"\nreplicas = [{names}]\n'
                f'encrypt = {"true" if encrypt else "false"}\n[[guest]]\nname = "g"\nlabel = "G"\n')
            # cwd: `-m` puts the current directory first on sys.path, before PYTHONPATH, so
            # run from the checkout, the "baseline" would import the checkout's package.
            proc = subprocess.Popen([*trustvbd_cli(tree), "up", "-c", str(config)], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, env=env, cwd=work)
            undo.callback(stop_proc(proc))
            assert proc.stdout is not None
            uri = ""
            for raw in proc.stdout:
                line = raw.decode().strip()
                if line.startswith("guest g disk disk "):
                    uri = line.split()[-1]
                if line == "ready":
                    break
            else:
                raise RuntimeError(f"trustvbd up exited {proc.wait(30)} before it was ready")
            note_pid(work, proc.pid, "up")
            return uri, undo.pop_all().close
        raise AssertionError("unreachable")  # mypy: ExitStack may swallow exceptions

    if not encrypt:
        name = "trustvbd up (pass-through)"
    else:
        name = "trustvbd up (encrypted" + (f", {replicas} replicas" if replicas > 1 else "")
        if nbdkit_drivers:
            name += ", nbdkit drivers" + (f" +{delay_ms} ms" if delay_ms else "")
        name += ", pinned)" if cpus else ")"
    if tree is not None:
        name += " [baseline]"
    return Server(name, start, SEQ if nbdkit_drivers else ALL)


@contextlib.contextmanager
def workdir(root: Path | None = None) -> Iterator[Path]:
    """A scratch directory under `root` (/tmp: the disk), removed after: /dev/shm puts a
    server's files and syncs on tmpfs, where what is left is the path's own cost."""
    path = Path(tempfile.mkdtemp(prefix="tvb", dir=root or "/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
