"""The driver domain: a dumb, UNTRUSTED NBD block server over sparse files.

It is trusted with nothing: under `trustvbd up` it only ever sees ciphertext and
signed metadata, and any NBD server (qemu-nbd, nbdkit, a remote host) can take
its place. It has no policy and no keys; it serves one export per file. Under
`up` it needs no path at all: the launcher hands it each open backing file
(`--export-fd`) and its listening socket (`--listen-fd`), as a hypervisor grants
a device, and runs it under its own user (domains/sandbox.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from trustvbd.blocks.file import FileBackend
from trustvbd.domains import messages as m
from trustvbd.domains.common import die_with_parent, ready, run, setup_logging
from trustvbd.domains.control import ControlChannel, ControlClosed, handed_socket
from trustvbd.nbd.server import Export, ExportRefused, NbdServer, PeerInfo
from trustvbd.xenstore.client import XsClient
from trustvbd.xenstore.wire import XsError

log = logging.getLogger("trustvbd.driver")
# The launcher answers a store request within its own 10 s (the store's request timeout)
# plus an audited decision: more than that is a launcher that is gone or stuck.
STORE_TIMEOUT = 30.0
STORE_RETRY = (0.5, 10.0)  # a store that does not answer: asked again after 0.5 s, doubling


@dataclass
class ExportSpec:
    name: str
    path: Path
    size: int
    fd: int | None = None  # an open file handed over by the launcher


class FileExports:
    """One shared FileBackend per export, so every connection sees the same file (multi-conn)."""

    def __init__(self, specs: list[ExportSpec], default: str | None) -> None:
        self.backends = {s.name: FileBackend(str(s.path), s.size, fd=s.fd) for s in specs}
        self.default = default

    def list_exports(self, peer: PeerInfo) -> list[tuple[str, str]]:
        return [(name, f"{b.size} bytes in {b.path}") for name, b in self.backends.items()]

    async def open_export(self, peer: PeerInfo, name: str) -> Export:
        if name == "" and self.default is not None:
            name = self.default
        backend = self.backends.get(name)
        if backend is None:
            known = ", ".join(sorted(self.backends))
            raise ExportRefused("unknown", f"no export named {name!r}; this driver serves: {known}")
        return Export(name, backend, f"{backend.size} bytes")

    def knows(self, peer: PeerInfo, name: str) -> bool:
        return (name or self.default) in self.backends

    def release_export(self, peer: PeerInfo, export: Export) -> None:
        pass

    async def close(self) -> None:
        for backend in self.backends.values():
            await backend.close()


def listening_socket(unix_path: str | None, tcp: str | None) -> socket.socket:
    if unix_path:
        path = Path(unix_path)
        if path.is_socket():
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
    else:
        assert tcp is not None
        host, _, port = tcp.rpartition(":")
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), int(port)))
    sock.listen(128)
    return sock


def uri_for(sock: socket.socket, export: str) -> str:
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"nbd+unix:///{export}?socket={address}"
    host = f"[{address[0]}]" if sock.family == socket.AF_INET6 else address[0]
    return f"nbd://{host}:{address[1]}/{export}"


async def join_store(channel: ControlChannel) -> XsClient | None:
    """As a Xen driver domain's blkback does: ask the hypervisor for a channel to the store
    (policy decides, the decision is audited) and advertise, in each backend directory the
    launcher made for this driver, what it offers: flushes reach the disk. None: no store.

    Run after the driver says it is ready (a stopped store held that up 10 s): a store that
    does not answer (UNREACHABLE) is asked again with back-off until it does."""
    delay = STORE_RETRY[0]
    while True:
        try:
            reply, fds = await channel.ask(m.DomainChannelQuery("store"), m.ChannelGranted,
                                           timeout=STORE_TIMEOUT)
            if not (isinstance(reply, m.Failed) and reply.code is m.ErrorCode.UNREACHABLE):
                break
            log.info("no channel to the store yet (%s); asking again in %.1f s", reply.message,
                     delay)
        except (ControlClosed, TimeoutError, ValueError) as exc:
            log.warning("cannot advertise in the store: %s", exc)
            return None
        await asyncio.sleep(delay)
        delay = min(delay * 2, STORE_RETRY[1])
    try:
        try:
            sock = handed_socket(reply, fds, m.ChannelGranted, "channel")
        except ConnectionError as exc:
            log.warning("no channel to the store: %s", exc)
            return None
        xs = await XsClient.connect(sock=sock)
        try:
            for frontend in await xs.directory("backend/vbd"):  # relative: its own home
                for device in await xs.directory(f"backend/vbd/{frontend}"):
                    await xs.write(f"backend/vbd/{frontend}/{device}/feature-flush-cache", "1")
        except BaseException:
            await xs.close()
            raise
        return xs
    except (ConnectionError, TimeoutError, XsError, ValueError) as exc:
        log.warning("cannot advertise in the store: %s", exc)
        return None


async def serve(specs: list[ExportSpec], sock: socket.socket, default: str | None,
                ready_fd: int | None, announce: bool, primary: bool = True,
                unlink: bool = True, control_fd: int | None = None) -> int:
    exports = FileExports(specs, default)
    server = NbdServer(exports, identity="driver", rings=True)  # docs/driver-ring.md
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(server.serve_socket(sock))
    control = None
    joining: asyncio.Task[XsClient | None] | None = None
    if primary and control_fd is not None:
        control = ControlChannel(socket.socket(fileno=control_fd), None, "hv")
        control.start()
        joining = asyncio.create_task(join_store(control))  # not waited for: see join_store
    if announce:
        for spec in specs:
            print(uri_for(sock, spec.name if default is None else ""), flush=True)
        print("ready", flush=True)
    ready(ready_fd)
    if primary:
        log.info("serving %d export(s) on %s", len(specs), sock.getsockname())
    await stop.wait()
    serving.cancel()
    if joining is not None:
        joining.cancel()
        store = await asyncio.gather(joining, return_exceptions=True)
        if isinstance(store[0], XsClient):
            await store[0].close()
    if control is not None:
        control.close()
    await server.close()
    await exports.close()
    if primary and unlink and sock.family == socket.AF_UNIX:  # not a handed-over socket
        Path(sock.getsockname()).unlink(missing_ok=True)
    sock.close()
    return 0


def serve_in_workers(workers: int, specs: list[ExportSpec], sock: socket.socket, default: str | None,
                     ready_fd: int | None, announce: bool, unlink: bool = True,
                     control_fd: int | None = None) -> int:
    """Serve from `workers` processes sharing one listening socket (one event loop each).

    Python's event loop is one core; multi-connection clients (nbdcopy opens four)
    then spread over several. Every process opens the same files, so a FLUSH on any
    connection (fdatasync) still persists what every connection wrote: multi-conn holds.
    Forked before any event loop or thread exists.
    """
    children = []
    for _ in range(workers - 1):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                die_with_parent()
                code = run(serve(specs, sock, default, None, announce=False, primary=False))
            finally:
                os._exit(code)
        children.append(pid)
    try:
        return run(serve(specs, sock, default, ready_fd, announce, unlink=unlink,
                         control_fd=control_fd))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def parse_export(text: str) -> ExportSpec:
    name, sep, rest = text.partition("=")
    path, sep2, size = rest.rpartition(":")
    if not sep or not sep2 or not size.isdigit():
        raise argparse.ArgumentTypeError(f"--export {text!r}: expected NAME=PATH:SIZE_IN_BYTES")
    return ExportSpec(name, Path(path), int(size))


def parse_export_fd(text: str) -> ExportSpec:
    name, sep, rest = text.partition("=")
    fd, sep2, size = rest.partition(":")
    if not sep or not sep2 or not fd.isdigit() or not size.isdigit():
        raise argparse.ArgumentTypeError(f"--export-fd {text!r}: expected NAME=FD:SIZE_IN_BYTES")
    return ExportSpec(name, Path(f"(file descriptor {fd})"), int(size), int(fd))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trustvbd.domains.driver")
    parser.add_argument("--export", type=parse_export, action="append", default=[])
    parser.add_argument("--export-fd", type=parse_export_fd, action="append", default=[],
                        help="serve an open file the launcher handed over")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket")
    where.add_argument("--listen")
    where.add_argument("--listen-fd", type=int, help="an already listening socket")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--supervised", action="store_true", help="die with the launcher")
    parser.add_argument("--workers", type=int, default=default_workers())
    # Its control channel to the hypervisor (domains/messages.py), the only way it may ask
    # for a channel to another domain: it asks for one to the store.
    parser.add_argument("--control-fd", type=int)
    parser.add_argument("--confine", action="store_true",
                        help="once holding its descriptors, open no path again (Landlock, seccomp)")
    args = parser.parse_args(argv)
    setup_logging("driver", forks=True)
    if args.supervised:
        die_with_parent()
    specs = args.export + args.export_fd
    if not specs:
        parser.error("give at least one --export or --export-fd")
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
    else:
        sock = listening_socket(args.socket, args.listen)
    if args.confine:
        confine_self()
    return serve_in_workers(args.workers, specs, sock, None, args.ready_fd, announce=False,
                            unlink=args.listen_fd is None, control_fd=args.control_fd)


def confine_self() -> None:
    """Wall this driver off from the host's files before it serves (domains/confine.py).

    What it loads lazily is loaded first: after this, no module file can be read.
    """
    import concurrent.futures.thread  # noqa: F401  (asyncio's default executor)

    import uvloop  # noqa: F401  (the event loop, domains/common.py)

    from trustvbd.domains.confine import confine

    done, missing = confine()
    if done:
        log.info("confined: %s", "; ".join(done))
    for what in missing:
        log.warning("not confined by %s: this driver can still open the host's world-readable"
                    " files", what)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run_standalone(file: str, size: int, socket_path: str | None, listen: str | None,
                   workers: int | None = None) -> int:
    """`trustvbd driver`: one file, one export, served under its own name and as the default."""
    setup_logging("driver", forks=True)
    workers = workers or default_workers()
    name = Path(file).stem or "disk"
    try:
        sock = listening_socket(socket_path, listen)
    except OSError as exc:
        print(f"trustvbd driver: cannot listen on {socket_path or listen}: {exc.strerror}",
              file=sys.stderr)
        return 1
    try:
        spec = ExportSpec(name, Path(file), size)
        FileBackend(str(spec.path), size).close_now()  # fail early on an unusable file
    except OSError as exc:
        print(f"trustvbd driver: cannot open {file}: {exc.strerror}", file=sys.stderr)
        return 1
    return serve_in_workers(workers, [spec], sock, name, None, announce=True)


if __name__ == "__main__":
    sys.exit(main())
