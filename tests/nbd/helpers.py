"""Test plumbing for the NBD package: a server in a background thread, peer servers, raw sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustvbd.nbd import protocol as p
from trustvbd.nbd.server import NbdServer


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class ServerThread:
    """An NbdServer on a Unix socket, running its own event loop in a thread."""

    def __init__(self, provider: Any, sock_path: Path | None, loop: str = "asyncio",
                 **kw: Any) -> None:
        """`sock_path` None: listen on 127.0.0.1, port chosen by the kernel (self.port)."""
        self.sock_path = str(sock_path) if sock_path is not None else None
        self.port = 0
        self.loop = new_loop(loop)
        self.server: NbdServer | None = None
        self._provider, self._kw = provider, kw
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        if self.sock_path is None:
            listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listening.bind(("127.0.0.1", 0))
            self.port = listening.getsockname()[1]
        else:
            listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listening.bind(self.sock_path)
        listening.listen(64)

        async def main() -> None:
            self.server = NbdServer(self._provider, identity="test-guest", **self._kw)
            self._stop = asyncio.Event()
            serving = asyncio.create_task(self.server.serve_socket(listening))
            self._ready.set()
            await self._stop.wait()
            await self.server.close()
            await serving

        try:
            self.loop.run_until_complete(main())
        finally:
            listening.close()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "server thread did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(20)
            assert not self._thread.is_alive(), "server did not stop"

        if not self.loop.is_closed() and not self._thread.is_alive():
            self.loop.close()

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.sock_path}"

    @property
    def address(self) -> str | tuple[str, int]:
        """Where a client connects: the Unix socket path, else the loopback TCP port."""
        return self.sock_path if self.sock_path is not None else ("127.0.0.1", self.port)

    def connection_count(self) -> int:
        assert self.server is not None
        return len(self.server.connections)


def wait_for(cond: Callable[[], bool], timeout: float = 5, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)


class Peer:
    """A peer NBD server process (qemu-nbd or nbdkit) on a Unix socket, stopped by pid."""

    def __init__(self, cmd: list[str], sock: Path, pidfile: Path) -> None:
        self.sock, self.pidfile = sock, pidfile
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)
        wait_for(lambda: sock.exists() and pidfile.exists() and pidfile.read_text().strip() != "",
                 10, f"{cmd[0]} socket")
        self.pid = int(pidfile.read_text())

    @classmethod
    def qemu_nbd(cls, image: Path, tmp: Path, *extra: str) -> Peer:
        sock, pid = tmp / "q.sock", tmp / "q.pid"
        return cls(["qemu-nbd", "-f", "raw", "-k", str(sock), "-e", "8", "-t", "--fork",
                    "--pid-file", str(pid), *extra, str(image)], sock, pid)

    @classmethod
    def nbdkit(cls, image: Path, tmp: Path, *extra: str) -> Peer:
        sock, pid = tmp / "k.sock", tmp / "k.pid"
        return cls(["nbdkit", "-U", str(sock), "-P", str(pid), "file", str(image), *extra],
                   sock, pid)

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)


# --- a raw, deliberately naive NBD client for hostile tests --------------------------
class RawClient:
    """Speaks NBD byte by byte so tests can send anything at all."""

    def __init__(self, path: str | tuple[str, int], timeout: float = 5) -> None:
        family = socket.AF_UNIX if isinstance(path, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"connection closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def closed_by_peer(self, timeout: float = 5) -> bool:
        """True if the server closes the connection (reads until EOF or reset)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def greeting(self) -> int:
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        return flags

    def start(self, client_flags: int = 3) -> None:
        self.greeting()
        self.sock.sendall(struct.pack(">I", client_flags))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", p.IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == p.OPTION_REPLY_MAGIC
        return opt, rep, self.recv_exact(length)

    def go(self, export: str = "", structured: bool = False, fresh: bool = True) -> tuple[int, int]:
        """Negotiate up to transmission (from the greeting if `fresh`); returns (size, flags)."""
        if fresh:
            self.start()
        if structured:
            self.option(p.Opt.STRUCTURED_REPLY)
            assert self.option_reply()[1] == p.Rep.ACK
        name = export.encode()
        self.option(p.Opt.GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 3))
        size = flags = None
        while True:
            _, rep, data = self.option_reply()
            if rep == p.Rep.INFO and data[:2] == b"\0\0":
                _, size, flags = struct.unpack(">HQH", data)
            elif rep == p.Rep.ACK:
                assert size is not None and flags is not None
                return size, flags
            elif rep != p.Rep.INFO:
                raise AssertionError(f"GO refused: {rep:#x} {data!r}")

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                cookie: int = 7, data: bytes = b"") -> None:
        self.sock.sendall(
            struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data
        )

    def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == p.SIMPLE_REPLY_MAGIC, hex(magic)
        return error, cookie

    def close(self) -> None:
        self.sock.close()


class Activated:
    """A peer server (nbdkit, qemu-nbd) on a TCP port the kernel chose, handed over by systemd
    socket activation (LISTEN_FDS): no fixed port, no race for it. Stopped by pid."""

    def __init__(self, cmd: list[str]) -> None:
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        self.port = listening.getsockname()[1]
        fd = listening.fileno()
        # The socket must be fd 3 and LISTEN_PID the server's own pid: exec keeps it.
        shim = ("import os, sys\n"
                f"if {fd} != 3: os.dup2({fd}, 3); os.close({fd})\n"
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
                "os.execvp(sys.argv[1], sys.argv[1:])")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", shim, *cmd],
            pass_fds=(fd,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        listening.close()

    def stop(self) -> str:
        """Stop it; return what it said on stderr."""
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode(errors="replace")
