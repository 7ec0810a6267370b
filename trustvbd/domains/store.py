"""The store domain: serves the XenStore protocol (trustvbd.xenstore.core) on Unix sockets.

Two ways in, as with Xen's xenstored:

- The public socket (`--socket PATH`, mode 0600), for the administrator and
  xenstore-utils (`XENSTORED_PATH=PATH xenstore-ls /`). A client whose SO_PEERCRED
  uid is 0, or the store's own uid, is domain 0 (privileged); anyone else is hung up on.
- A connection per domain, handed over by the launcher: over the control channel
  (`--control-fd`, one JSON packet per message, as every domain's) it sends
  `{"op": "connect", "domid": N, "name": ..., "label": ...}`. The store gives domain N
  its home /local/domain/N, fires @introduceDomain, makes a socket pair, serves one
  end as domain N and returns the other end (SCM_RIGHTS) for the launcher to give to
  that domain. `"op": "introduce"` does the same without a connection, for domains
  that speak no XenStore (guests, NBD servers run by others); `{"op": "release",
  "domid": N}` fires @releaseDomain.

Check (a): a write pairing a frontend with a backend directory waits for the
access-control domain (`--acm-socket`): the two domains' labels must share an STE
type; every decision, refusals included, lands in its audit log. Without
`--acm-socket` (a store run alone for tests) pairings are allowed, with a warning.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import sys
from typing import Any

from trustvbd.acm.client import AcmClient
from trustvbd.domains.common import die_with_parent, ready, setup_logging
from trustvbd.domains.control import ControlChannel
from trustvbd.xenstore.core import PairQuestion, Session, Store

log = logging.getLogger("trustvbd.store")
UNLABELED = "__UNLABELED__"
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class StoreDomain:
    def __init__(self, store: Store, acm: AcmClient | None) -> None:
        self.store, self.acm = store, acm
        store.ask_pairings = True
        self.domains: dict[int, tuple[str, str]] = {}  # domid -> name, label
        self.writers: dict[Session, asyncio.StreamWriter] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    # -- connections -----------------------------------------------------------------
    async def public_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                       _PEERCRED.size))
        if uid not in (0, os.getuid()):
            log.warning("refused a client of the public socket: uid %d (pid %d) is neither root"
                        " nor the store's user", uid, pid)
            writer.close()
            return
        await self.serve(reader, writer, self.store.connect(0, True, f"admin pid {pid}"))

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    session: Session) -> None:
        self.writers[session] = writer
        try:
            while not session.closed:
                data = await reader.read(65536)
                if not data:
                    break
                session.receive_data(data)
                self.pump()
        except (ConnectionError, OSError):
            pass
        finally:
            self.store.disconnect(session)
            self.writers.pop(session, None)
            writer.close()

    def pump(self) -> None:
        """Send every session what the last request made for it; start asking questions."""
        for session, writer in list(self.writers.items()):
            out = session.data_to_send()
            if out and not writer.is_closing():
                writer.write(out)
            if writer.transport.get_write_buffer_size() > self.store.quotas.pending_output:
                session.close("does not read its replies and watch events")
            if session.closed:
                writer.close()  # after what is buffered: the peer may still read why
        for question in self.store.take_questions():
            task = asyncio.get_running_loop().create_task(self.ask(question))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def ask(self, question: PairQuestion) -> None:
        p = question.pairing
        allowed = True
        if self.acm is not None:
            fe_name, fe_label = self.domains.get(p.frontend_domid, (f"domain {p.frontend_domid}", UNLABELED))
            be_name, be_label = self.domains.get(p.backend_domid, (f"domain {p.backend_domid}", UNLABELED))
            decision = await self.acm.channel(fe_name, fe_label, be_name, be_label)
            allowed = decision.allowed
            if not allowed:
                log.warning("pairing %s with %s refused: %s", p.frontend_dir, p.backend_dir,
                            decision.reason)
        self.store.answer(question, allowed)
        self.pump()

    # -- the launcher's requests -----------------------------------------------------
    async def control(self, message: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        for fd in fds:
            os.close(fd)
        op, domid = message.get("op"), message.get("domid")
        if not isinstance(domid, int) or not 0 < domid <= 0xFFFF:
            return {"ok": False, "error": f"domid must be an integer 1..65535, not {domid!r}"}, []
        if op in ("introduce", "connect"):
            self.domains[domid] = (str(message.get("name") or f"domain {domid}"),
                                   str(message.get("label") or UNLABELED))
            if domid not in self.store.introduced:
                self.store.add_domain(domid)
            if op == "introduce":  # a domain that speaks no XenStore itself (a guest, a peer server)
                self.pump()
                return {"ok": True}, []
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            session = self.store.connect(domid, False, self.domains[domid][0])
            task = asyncio.get_running_loop().create_task(self.serve(reader, writer, session))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self.pump()
            return {"ok": True}, [theirs.detach()]
        if op == "release":
            self.store.release_domain(domid)
            self.pump()
            return {"ok": True}, []
        return {"ok": False, "error": f"unknown op {op!r}"}, []


def listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)  # xenstored's socket is root's only; SO_PEERCRED checks again
    sock.listen(64)
    return sock


async def serve(args: argparse.Namespace) -> int:
    acm = None
    if args.acm_fd is not None:  # a connection the launcher made (it survives no acm restart)
        acm = AcmClient(sock=socket.socket(fileno=args.acm_fd))
    elif args.acm_socket:
        acm = AcmClient(args.acm_socket)
    if acm is None:
        log.warning("no access-control domain: every frontend/backend pairing is allowed")
    domain = StoreDomain(Store(), acm)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if args.supervised:  # a terminal's Ctrl-C is for the launcher, which stops us in order
        loop.add_signal_handler(signal.SIGINT, lambda: None)
    else:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    sock = socket.socket(fileno=args.listen_fd) if args.listen_fd is not None else listen(args.socket)
    server = await asyncio.start_unix_server(domain.public_client, sock=sock)
    channel = None
    if args.control_fd is not None:
        channel = ControlChannel(socket.socket(fileno=args.control_fd), domain.control, "hv")
        channel.start()
    ready(args.ready_fd)
    if args.ready_fd is None:
        print(f"store serving {args.socket}\nready", flush=True)
    waiters = [loop.create_task(stop.wait())]
    if channel is not None:  # the launcher gone means stop
        waiters.append(loop.create_task(channel.closed.wait()))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    server.close()
    for writer in domain.writers.values():
        writer.close()
    if args.listen_fd is None:  # a socket handed over is its binder's to remove
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
    if acm is not None:
        await acm.close()
    return 0


def build_parser(prog: str = "python -m trustvbd.domains.store") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Serve the XenStore protocol.")
    parser.add_argument("--socket", required=True, help="public Unix socket (domain 0 clients)")
    parser.add_argument("--acm-socket", help="access-control domain socket, for pairing checks")
    parser.add_argument("--acm-fd", type=int, help="an open connection to the access-control domain")
    parser.add_argument("--listen-fd", type=int, help="serve this listening socket (bound by the"
                        " launcher at --socket) instead of binding --socket")
    parser.add_argument("--control-fd", type=int, help="control channel from the launcher")
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--supervised", action="store_true", help="die with the launcher")
    return parser


def run(args: argparse.Namespace) -> int:
    setup_logging("store")
    if args.supervised:
        die_with_parent()
    if len(args.socket.encode()) > 107:
        print(f"trustvbd store: socket path {args.socket!r} is longer than 107 bytes;"
              " choose a shorter one", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(args))
    except OSError as exc:
        print(f"trustvbd store: cannot serve on {args.socket}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
