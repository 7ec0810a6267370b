"""The store domain: serves the XenStore protocol (trustvbd.xenstore.core) on Unix sockets.

Two ways in, as with Xen's xenstored:

- The public socket (`--socket PATH`, mode 0600), for the administrator and
  xenstore-utils (`XENSTORED_PATH=PATH xenstore-ls /`). A client whose SO_PEERCRED
  uid is 0, or the store's own uid, is domain 0 (privileged); anyone else is hung up on.
- A connection per domain, handed over by the launcher. Over the control channel
  (`--control-fd`, typed messages of domains/messages.py) it sends StoreConnect
  (domain id, name, label): the store gives domain N its home /local/domain/N, fires
  @introduceDomain, makes a socket pair, serves one end as domain N and returns the
  other (SCM_RIGHTS) for the launcher to give to that domain. StoreIntroduce does the
  same without a connection, for domains that speak no XenStore (guests, NBD servers
  run by others); StoreRelease fires @releaseDomain; RecheckPairings (after a policy
  load) asks again for every pairing and tears down those now forbidden.

Check (a): a write pairing a frontend with a backend directory waits for the
access-control domain: the two domains' labels must share an STE type; every
decision, refusals included, lands in its audit log. Under the launcher the store
reaches that domain by no path: it asks the launcher for a channel (AcmChannelQuery),
which the launcher opens once the access-control domain allows it, and asks again
after a loss. Run alone, `--acm-socket` names one; without it pairings are allowed,
with a warning.

With `--tree-dir-fd` the store keeps its state in that directory (`tree.json`, a
base, and `tree.log`, a journal of changes since; see xenstore/snapshot.py), written
before any reply that depends on it goes out, and starts from it when it is there: a
store the launcher restarts goes on with the tree.
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
from collections.abc import Coroutine
from typing import Any

from trustvbd.acm.client import AcmClient
from trustvbd.domains import messages as m
from trustvbd.domains import stack_dump
from trustvbd.domains.common import die_with_parent, ready, setup_logging
from trustvbd.domains.control import ControlChannel, ControlClosed, handed_socket, typed
from trustvbd.xenstore import snapshot
from trustvbd.xenstore.core import PairQuestion, Session, Store
from trustvbd.xenstore.pairing import Pairing

log = logging.getLogger("trustvbd.store")
UNLABELED = "__UNLABELED__"
BASE_FILE, JOURNAL_FILE = "tree.json", "tree.log"
JOURNAL_MIN = 256 * 1024  # bytes of journal before a new base (or the base's size, if larger)
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
CONTROL_ASKS = (m.StoreIntroduce, m.StoreConnect, m.StoreRelease, m.RecheckPairings)


class TreeFile:
    """The store's state in a directory (an open descriptor): a base replaced whole by a
    rename, and a journal appended to after each change (xenstore/snapshot.py), so a store
    killed at any instant leaves every change it answered for."""

    def __init__(self, dir_fd: int) -> None:
        self.dir_fd = dir_fd
        self.journal_fd: int | None = None
        self.base_size = self.journal_size = 0

    def read(self) -> tuple[bytes, bytes] | None:
        """The base and the journal, None if there is no base."""
        parts: list[bytes | None] = []
        for name in (BASE_FILE, JOURNAL_FILE):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dir_fd)
            except FileNotFoundError:
                parts.append(None)
                continue
            with open(fd, "rb") as f:
                parts.append(f.read())
        base, journal = parts
        return None if base is None else (base, journal or b"")

    @property
    def compact(self) -> bool:
        """Time for a new base: the journal outgrew it (or there is none yet)."""
        return self.journal_fd is None or self.journal_size > max(JOURNAL_MIN, self.base_size)

    def rewrite(self, base: bytes) -> None:
        """A new base, then an empty journal (a crash between the two replays a journal the
        base already holds, which changes nothing)."""
        tmp = BASE_FILE + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dir_fd)
        with open(fd, "wb") as f:
            f.write(base)
        os.replace(tmp, BASE_FILE, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        if self.journal_fd is not None:
            os.close(self.journal_fd)
            self.journal_fd = None
        self.journal_fd = os.open(JOURNAL_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                                  | os.O_APPEND | os.O_CLOEXEC, 0o600, dir_fd=self.dir_fd)
        self.base_size, self.journal_size = len(base), 0

    def append(self, line: bytes) -> None:
        assert self.journal_fd is not None
        view = memoryview(line)
        while view:
            view = view[os.write(self.journal_fd, view):]
        self.journal_size += len(line)


class StoreDomain:
    def __init__(self, store: Store, acm: AcmClient | None, tree_file: TreeFile | None = None,
                 domains: snapshot.Domains | None = None) -> None:
        self.store, self.acm, self.tree_file = store, acm, tree_file
        store.ask_pairings = True
        self.domains: snapshot.Domains = domains or {}  # domid -> name, label
        self.writers: dict[Session, asyncio.StreamWriter] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.saved = store.revision
        self.journal: snapshot.Journal | None = None  # None: the next save writes a new base
        self.save_failed = False
        self.channel: ControlChannel | None = None

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
        """Save what changed, then send every session what the last request made for it
        (so no reply speaks of a change a restart would lose); start asking questions."""
        self.save()
        for session, writer in list(self.writers.items()):
            out = session.data_to_send()
            if out and not writer.is_closing():
                writer.write(out)
            if writer.transport.get_write_buffer_size() > self.store.quotas.pending_output:
                session.close("does not read its replies and watch events")
            if session.closed:
                writer.close()  # after what is buffered: the peer may still read why
        for question in self.store.take_questions():
            self.spawn(self.ask(question))

    def save(self) -> None:
        """Put every change since the last save on disk: a journal line, or a new base."""
        if self.tree_file is None or self.store.revision == self.saved:
            return
        try:
            if self.journal is None or self.tree_file.compact:
                self.tree_file.rewrite(snapshot.dump(self.store, self.domains))
                self.journal = snapshot.Journal(self.store, self.domains)
            elif (line := self.journal.entry(self.store, self.domains)) is not None:
                self.tree_file.append(line)
            if self.save_failed:
                log.warning("the tree is saved again")
            self.save_failed = False
        except OSError as exc:  # keep serving; a new base is tried at the next change
            if not self.save_failed:
                log.error("cannot save the tree (a restarted store would miss the newest"
                          " changes): %s", exc)
            self.save_failed, self.journal = True, None
        self.saved = self.store.revision

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- check (a) ---------------------------------------------------------------------
    async def decide(self, p: Pairing) -> tuple[bool, str]:
        """May these two domains be paired (STE)? Fails closed."""
        if self.acm is None:
            return True, "no access-control domain"
        fe_name, fe_label = self.domains.get(p.frontend_domid, (f"domain {p.frontend_domid}", UNLABELED))
        be_name, be_label = self.domains.get(p.backend_domid, (f"domain {p.backend_domid}", UNLABELED))
        decision = await self.acm.channel(fe_name, fe_label, be_name, be_label)
        return decision.allowed, decision.reason

    async def ask(self, question: PairQuestion) -> None:
        p = question.pairing
        try:
            allowed, reason = await self.decide(p)
        except Exception as exc:  # never leave a writer parked
            log.exception("pairing %s with %s: no decision", p.frontend_dir, p.backend_dir)
            allowed, reason = False, str(exc)
        if not allowed:
            log.warning("pairing %s with %s refused: %s", p.frontend_dir, p.backend_dir, reason)
        self.store.answer(question, allowed)
        self.pump()

    async def recheck(self) -> m.PairingsRechecked:
        """Every pairing in the tree, asked again (after a policy load); those refused now are
        torn down: both ends Closing then Closed, the directories no longer theirs to write."""
        kept, torn = 0, []
        for p in self.store.pairings():
            allowed, reason = await self.decide(p)
            if allowed:
                kept += 1
                continue
            log.warning("pairing %s with %s is forbidden by the new policy; tearing it down: %s",
                        p.frontend_dir, p.backend_dir, reason)
            self.store.tear_down(p)
            torn.append(m.TornDown(p.frontend_dir, p.backend_dir, reason))
            self.pump()
        return m.PairingsRechecked(kept, torn)

    async def acm_channel(self) -> socket.socket:
        """A (new) channel to the access-control domain, from the launcher."""
        if self.channel is None:
            raise ConnectionError("no launcher to ask for a channel to the access-control domain")
        try:
            reply, fds = await self.channel.ask(m.AcmChannelQuery(), m.ChannelGranted, timeout=10)
        except (ControlClosed, TimeoutError, m.MessageError) as exc:
            raise ConnectionError(f"the launcher gave no channel: {exc}") from None
        return handed_socket(reply, fds, m.ChannelGranted, "channel")

    # -- the launcher's requests -----------------------------------------------------
    async def control(self, msg: m.Message, fds: list[int]) -> tuple[m.Message, list[int]]:
        for fd in fds:
            os.close(fd)
        if isinstance(msg, m.RecheckPairings):
            return await self.recheck(), []
        assert isinstance(msg, m.StoreIntroduce | m.StoreConnect | m.StoreRelease)
        if not 0 < msg.domid <= 0xFFFF:
            raise ValueError(f"{msg.TYPE}: domid must be 1..65535, not {msg.domid}")
        if isinstance(msg, m.StoreRelease):
            self.store.release_domain(msg.domid)
            self.pump()
            return m.Done(), []
        if self.domains.get(msg.domid) != (msg.name, msg.label):
            self.domains[msg.domid] = (msg.name, msg.label)
            self.store.revision += 1  # names and labels are saved too
            self.store.meta_revision += 1
        if msg.domid not in self.store.introduced:
            self.store.add_domain(msg.domid)
        if isinstance(msg, m.StoreIntroduce):  # speaks no XenStore itself (a guest, a peer server)
            self.pump()
            return m.Done(), []
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        session = self.store.connect(msg.domid, False, msg.name)
        self.spawn(self.serve(reader, writer, session))
        self.pump()
        return m.StoreConnected(msg.domid), [theirs.detach()]


def listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)  # xenstored's socket is root's only; SO_PEERCRED checks again
    sock.listen(64)
    return sock


def restored(tree_file: TreeFile | None) -> tuple[Store, snapshot.Domains]:
    """The tree saved by a store before us (restarted by the launcher), else a new one."""
    saved = tree_file.read() if tree_file is not None else None
    if saved is None:
        return Store(), {}
    try:
        store, domains = snapshot.load(*saved)
    except snapshot.SnapshotError as exc:
        raise SystemExit(f"trustvbd store: the saved tree ({BASE_FILE} and {JOURNAL_FILE} in"
                         f" the store's directory) is {exc}; `trustvbd up` starts a new one"
                         ) from None
    log.warning("restarted: %d nodes and %d domains restored from the saved tree",
                len(store.tree.nodes), len(domains))
    return store, domains


async def serve(args: argparse.Namespace) -> int:
    tree_file = TreeFile(args.tree_dir_fd) if args.tree_dir_fd is not None else None
    store, domains = restored(tree_file)
    acm = None
    domain = StoreDomain(store, None, tree_file, domains)
    if args.control_fd is not None:
        # Under the launcher: channels to the access-control domain come from it, on demand.
        acm = AcmClient(reconnect=domain.acm_channel)
    elif args.acm_socket:
        acm = AcmClient(args.acm_socket)
    else:
        log.warning("no access-control domain: every frontend/backend pairing is allowed")
    domain.acm = acm
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if args.supervised:  # a terminal's Ctrl-C is for the launcher, which stops us in order
        loop.add_signal_handler(signal.SIGINT, lambda: None)
    else:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    stack_dump.install("store")
    sock = socket.socket(fileno=args.listen_fd) if args.listen_fd is not None else listen(args.socket)
    server = await asyncio.start_unix_server(domain.public_client, sock=sock)
    channel = None
    if args.control_fd is not None:
        channel = ControlChannel(socket.socket(fileno=args.control_fd),
                                 typed(domain.control, *CONTROL_ASKS), "hv")
        domain.channel = channel
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
    parser.add_argument("--acm-socket", help="access-control domain socket, for pairing checks"
                        " (a store run alone; under the launcher channels come from it)")
    parser.add_argument("--listen-fd", type=int, help="serve this listening socket (bound by the"
                        " launcher at --socket) instead of binding --socket")
    parser.add_argument("--control-fd", type=int, help="control channel from the launcher")
    parser.add_argument("--tree-dir-fd", type=int, help="a directory to keep the tree in")
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
