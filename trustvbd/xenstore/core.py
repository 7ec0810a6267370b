"""The store's protocol engine: sessions in, replies and watch events out, no I/O.

Like h11 for one server with many clients: the shell creates a `Session` per
connection (with the domain id it belongs to), feeds it the bytes it reads
(`receive_data`) and writes out what `data_to_send()` returns, for every session,
since one client's write fires other clients' watches. A session whose peer breaks
the framing (a payload over XENSTORE_PAYLOAD_MAX) or never reads its events is
closed (`closed` says why); every other bad request gets an ERROR reply.

Pairing a frontend with a backend directory (see `pairing`) needs the
access-control domain, which is I/O: such a write parks its session and shows up in
`take_questions()`; the shell asks and calls `answer()`, and the session resumes.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from trustvbd.xenstore import paths
from trustvbd.xenstore.pairing import Pairing, pairing_of, pairings_in
from trustvbd.xenstore.perms import Access, Acl, Caller
from trustvbd.xenstore.quotas import Quotas
from trustvbd.xenstore.transactions import Transaction
from trustvbd.xenstore.tree import Change, Tree
from trustvbd.xenstore.watches import Watch, WatchList
from trustvbd.xenstore.wire import (
    PAYLOAD_MAX,
    Decoder,
    Message,
    Op,
    ProtocolViolation,
    XsError,
    encode,
    error_reply,
    op_name,
    reply,
    watch_event,
)

log = logging.getLogger("trustvbd.xenstore")
OK = b"OK\0"
MAX_DOMID = 0xFFFF
INPUT_BACKLOG = 64 * 1024  # unread request bytes kept while a session waits for a decision
_TREE_OPS = {Op.READ, Op.WRITE, Op.MKDIR, Op.RM, Op.DIRECTORY, Op.DIRECTORY_PART, Op.GET_PERMS,
             Op.SET_PERMS}
_PRIVILEGED_OPS = {Op.INTRODUCE, Op.RELEASE, Op.RESUME, Op.SET_TARGET, Op.CONTROL}
# Requests that may change what a snapshot (xenstore/snapshot.py) holds.
_CHANGING_OPS = {Op.WRITE, Op.MKDIR, Op.RM, Op.SET_PERMS, Op.TRANSACTION_END, Op.INTRODUCE,
                 Op.RELEASE, Op.SET_TARGET}


@dataclass
class PairQuestion:
    """A WRITE that pairs two directories, waiting for the access-control domain's answer."""

    session: Session
    message: Message
    pairing: Pairing


@dataclass(eq=False)  # identity: the shell keys its sockets by session
class Session:
    store: Store
    domid: int
    privileged: bool
    name: str = ""
    decoder: Decoder = field(default_factory=Decoder)
    outbox: bytearray = field(default_factory=bytearray)
    transactions: dict[int, Transaction] = field(default_factory=dict)
    closed: str | None = None  # why the store dropped this connection
    waiting: PairQuestion | None = None

    def __post_init__(self) -> None:
        self.watches = WatchList(self.store.quotas)

    @property
    def caller(self) -> Caller:
        return Caller(self.domid, self.privileged, self.store.targets.get(self.domid))

    def receive_data(self, data: bytes) -> None:
        if self.closed:
            return
        self.decoder.feed(data)
        self.run()
        # Only a session parked on a decision keeps whole requests unprocessed.
        if self.decoder.pending > INPUT_BACKLOG:
            self.close(f"more than {INPUT_BACKLOG} bytes of requests queued")

    def run(self) -> None:
        while not self.closed and self.waiting is None:
            try:
                msg = self.decoder.next_message()
            except ProtocolViolation as exc:
                self.close(str(exc))
                return
            if msg is None:
                return
            self.store.handle(self, msg)

    def send(self, msg: Message) -> None:
        if self.closed:
            return
        self.outbox += encode(msg)
        if len(self.outbox) > self.store.quotas.pending_output:
            self.close(f"more than {self.store.quotas.pending_output} bytes of replies unread")

    def data_to_send(self) -> bytes:
        out = bytes(self.outbox)
        self.outbox.clear()
        return out

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = reason
            log.warning("dropping %s (domain %d): %s", self.name or "client", self.domid, reason)
        self.store.disconnect(self)


class Store:
    def __init__(self, quotas: Quotas | None = None, ask_pairings: bool = False) -> None:
        self.quotas = quotas or Quotas()
        self.tree = Tree(self.quotas)
        self.sessions: list[Session] = []
        self.introduced: set[int] = {0}
        self.targets: dict[int, int] = {}
        self.revoked: set[tuple[str, str]] = set()  # torn-down pairings: frontend, backend dir
        self.revision = 0  # goes up with (possible) changes: the shell saves when it moved
        self.meta_revision = 0  # goes up with changes to introduced, targets or revoked
        self.ask_pairings = ask_pairings
        self._questions: list[PairQuestion] = []
        self._tx_ids = itertools.count(1)
        self._approved_write: Message | None = None  # the pairing write being applied now
        self._handlers: dict[int, Callable[[Session, Message, Tree], bytes | None]] = {
            Op.READ: self._read, Op.WRITE: self._write, Op.MKDIR: self._mkdir, Op.RM: self._rm,
            Op.DIRECTORY: self._directory, Op.DIRECTORY_PART: self._directory_part,
            Op.GET_PERMS: self._get_perms, Op.SET_PERMS: self._set_perms, Op.WATCH: self._watch,
            Op.UNWATCH: self._unwatch, Op.RESET_WATCHES: self._reset_watches,
            Op.TRANSACTION_START: self._transaction_start, Op.TRANSACTION_END: self._transaction_end,
            Op.GET_DOMAIN_PATH: self._get_domain_path, Op.IS_DOMAIN_INTRODUCED: self._is_introduced,
            Op.INTRODUCE: self._introduce, Op.RELEASE: self._release, Op.RESUME: self._resume,
            Op.SET_TARGET: self._set_target, Op.CONTROL: self._control,
        }

    # -- sessions and domains --------------------------------------------------------
    def connect(self, domid: int, privileged: bool = False, name: str = "") -> Session:
        session = Session(self, domid, privileged, name)
        self.sessions.append(session)
        return session

    def disconnect(self, session: Session) -> None:
        if session.closed is None:
            session.closed = "disconnected"
        if session in self.sessions:
            self.sessions.remove(session)
        session.transactions.clear()
        session.watches.clear()

    def add_domain(self, domid: int) -> None:
        """Give a domain its home /local/domain/<id> (its own, invisible to others) and
        fire @introduceDomain: what Xen's toolstack and INTRODUCE do together."""
        home = paths.domain_path(domid)
        dom0 = Caller(0, True)
        self.revision += 1
        self.meta_revision += 1
        self.tree.mkdir(dom0, home)
        self.tree.set_perms(dom0, home, Acl(((domid, Access.NONE),)))
        self.introduced.add(domid)
        self._fire([*self.tree.events, Change("@introduceDomain", None)])
        self.tree.events.clear()

    def release_domain(self, domid: int) -> None:
        self.revision += 1
        self.meta_revision += 1
        self.introduced.discard(domid)
        self.targets.pop(domid, None)
        self._fire([Change("@releaseDomain", None)])

    def pairings(self) -> list[Pairing]:
        """Every frontend/backend pairing in the tree that is not torn down."""
        found = pairings_in((path, node.value) for path, node in self.tree.nodes.items())
        return [p for p in found if (p.frontend_dir, p.backend_dir) not in self.revoked]

    def tear_down(self, pairing: Pairing) -> None:
        """A pairing the policy no longer allows: both ends Closing, then Closed (watchers
        see both), and both directories taken from their domains (domain 0's, readable by
        both ends), so neither can write itself Connected again."""
        dom0 = Caller(0, True)
        self.revision += 1
        self.meta_revision += 1
        self.revoked.add((pairing.frontend_dir, pairing.backend_dir))
        dirs = [d for d in (pairing.frontend_dir, pairing.backend_dir) if d in self.tree.nodes]
        for state in (b"5", b"6"):
            for d in dirs:
                self.tree.write(dom0, f"{d}/state", state)
        locked = Acl(((0, Access.NONE), (pairing.frontend_domid, Access.READ),
                      (pairing.backend_domid, Access.READ)))
        for d in dirs:
            stack = [d]
            while stack:
                path = stack.pop()
                node = self.tree.nodes[path]
                self.tree.set_perms(dom0, path, locked)
                stack.extend(paths.join(path, c) for c in node.children)
        self.tree.changed.clear()
        events, self.tree.events = self.tree.events, []
        self._fire(events)

    def take_questions(self) -> list[PairQuestion]:
        out, self._questions = self._questions, []
        return out

    def answer(self, question: PairQuestion, allowed: bool) -> None:
        session = question.session
        session.waiting = None
        if session.closed:
            return
        if allowed:
            self._approved_write = question.message
            try:
                self.handle(session, question.message)
            finally:
                self._approved_write = None
        else:
            session.send(error_reply(question.message, "EACCES"))
        session.run()

    # -- dispatch --------------------------------------------------------------------
    def handle(self, session: Session, msg: Message) -> None:
        tree = self.tree
        if msg.op in _CHANGING_OPS:
            self.revision += 1
        try:
            handler = self._handlers.get(msg.op)
            if handler is None:
                raise XsError("ENOSYS", f"{op_name(msg.op)} is not a request")
            if msg.op in _PRIVILEGED_OPS and not session.privileged:
                raise XsError("EACCES", f"{op_name(msg.op)} is for domain 0 only")
            if msg.op in _TREE_OPS and msg.tx_id:
                tx = session.transactions.get(msg.tx_id)
                if tx is None:
                    raise XsError("ENOENT", f"no transaction {msg.tx_id}")
                tree = tx.tree
            payload = handler(session, msg, tree)
            if payload is not None:
                session.send(reply(msg, payload))
        except XsError as exc:
            log.debug("%s from domain %d: %s", op_name(msg.op), session.domid, exc)
            session.send(error_reply(msg, exc.code))
        finally:
            if tree is self.tree:
                tree.changed.clear()
        if tree is self.tree and tree.events:
            events, tree.events = tree.events, []
            self._fire(events)

    def _fire(self, changes: list[Change]) -> None:
        for change in changes:
            for s in list(self.sessions):
                if change.acl is None:
                    if not s.privileged:  # domain lifecycle events are for the toolstack
                        continue
                elif not s.caller.access(change.acl) & Access.READ:
                    continue
                for epath, token in s.watches.fired(change):
                    event = watch_event(epath, token)
                    if len(event.payload) <= PAYLOAD_MAX:
                        s.send(event)

    # -- argument helpers ------------------------------------------------------------
    @staticmethod
    def _args(msg: Message, count: int) -> list[bytes]:
        items = msg.strings()
        if len(items) < count:
            raise XsError("EINVAL", f"{op_name(msg.op)} needs {count} argument(s)")
        return items

    def _path(self, session: Session, msg: Message) -> str:
        return paths.canonical(self._args(msg, 1)[0], session.domid)

    @staticmethod
    def _domid(raw: bytes) -> int:
        if not raw.isdigit() or int(raw) > MAX_DOMID:
            raise XsError("EINVAL", f"{raw[:16]!r} is not a domain id")
        return int(raw)

    # -- tree operations -------------------------------------------------------------
    def _read(self, s: Session, msg: Message, tree: Tree) -> bytes:
        return tree.read(s.caller, self._path(s, msg))

    def _write(self, s: Session, msg: Message, tree: Tree) -> bytes | None:
        raw_path, sep, value = msg.payload.partition(b"\0")
        if not sep:
            raise XsError("EINVAL", "WRITE needs <path>\\0<value>")
        path = paths.canonical(raw_path, s.domid)
        pairing = pairing_of(path, value)
        if pairing is not None and self.ask_pairings and msg is not self._approved_write:
            tree.check_writable(s.caller, path)  # no question for a write that would fail anyway
            s.waiting = PairQuestion(s, msg, pairing)
            self._questions.append(s.waiting)
            return None
        tree.write(s.caller, path, value)
        return OK

    def _mkdir(self, s: Session, msg: Message, tree: Tree) -> bytes:
        tree.mkdir(s.caller, self._path(s, msg))
        return OK

    def _rm(self, s: Session, msg: Message, tree: Tree) -> bytes:
        tree.rm(s.caller, self._path(s, msg))
        return OK

    def _directory(self, s: Session, msg: Message, tree: Tree) -> bytes:
        listing = b"".join(c.encode() + b"\0" for c in tree.directory(s.caller, self._path(s, msg)))
        if len(listing) > PAYLOAD_MAX:
            raise XsError("E2BIG", "listing too long for one reply; use DIRECTORY_PART")
        return listing

    def _directory_part(self, s: Session, msg: Message, tree: Tree) -> bytes:
        raw_path, raw_offset = self._args(msg, 2)[:2]
        path = paths.canonical(raw_path, s.domid)
        node = tree.lookup(s.caller, path, Access.READ)
        listing = b"".join(c.encode() + b"\0" for c in node.children)
        if not raw_offset.isdigit() or int(raw_offset) > len(listing):
            raise XsError("EINVAL", f"offset {raw_offset[:16]!r} is not within the listing")
        head, rest = f"{node.gen}\0".encode(), listing[int(raw_offset):]
        room = PAYLOAD_MAX - len(head) - 1
        if len(rest) <= room:
            return head + rest + b"\0"  # the empty name marks the end of the listing
        return head + rest[:rest.rindex(b"\0", 0, room) + 1]

    def _get_perms(self, s: Session, msg: Message, tree: Tree) -> bytes:
        acl = tree.get_perms(s.caller, self._path(s, msg))
        return b"".join(p.encode() + b"\0" for p in acl.format())

    def _set_perms(self, s: Session, msg: Message, tree: Tree) -> bytes:
        items = self._args(msg, 2)
        while len(items) > 2 and not items[-1]:
            items.pop()
        tree.set_perms(s.caller, paths.canonical(items[0], s.domid), Acl.parse(items[1:]))
        return OK

    # -- watches ---------------------------------------------------------------------
    def _watch(self, s: Session, msg: Message, tree: Tree) -> None:
        raw_path, token = self._args(msg, 2)[:2]
        path, base = paths.canonical_watch(raw_path, s.domid)
        s.watches.add(s.caller, Watch(path, token, base))
        s.send(reply(msg, OK))
        s.send(watch_event(raw_path.decode("ascii"), token))  # fired once at once, as xenstored
        return None

    def _unwatch(self, s: Session, msg: Message, tree: Tree) -> bytes:
        raw_path, token = self._args(msg, 2)[:2]
        path, _ = paths.canonical_watch(raw_path, s.domid)
        s.watches.remove(path, token)
        return OK

    def _reset_watches(self, s: Session, msg: Message, tree: Tree) -> bytes:
        s.watches.clear()
        s.transactions.clear()
        return OK

    # -- transactions ----------------------------------------------------------------
    def _transaction_start(self, s: Session, msg: Message, tree: Tree) -> bytes:
        if msg.tx_id:
            raise XsError("EBUSY", "TRANSACTION_START inside a transaction")
        self.quotas.check_transactions(s.caller, len(s.transactions) + 1)
        tx_id = next(self._tx_ids) & 0xFFFFFFFF or next(self._tx_ids)
        s.transactions[tx_id] = Transaction.start(tx_id, self.tree)
        return f"{tx_id}\0".encode()

    def _transaction_end(self, s: Session, msg: Message, tree: Tree) -> bytes:
        arg = self._args(msg, 1)[0]
        if arg not in (b"T", b"F"):
            raise XsError("EINVAL", "TRANSACTION_END takes T (commit) or F (abort)")
        tx = s.transactions.pop(msg.tx_id, None)
        if tx is None:
            raise XsError("ENOENT", f"no transaction {msg.tx_id}")
        self._fire(tx.end(self.tree, arg == b"T"))
        return OK

    # -- domains ---------------------------------------------------------------------
    def _get_domain_path(self, s: Session, msg: Message, tree: Tree) -> bytes:
        return paths.domain_path(self._domid(self._args(msg, 1)[0])).encode() + b"\0"

    def _is_introduced(self, s: Session, msg: Message, tree: Tree) -> bytes:
        return b"T\0" if self._domid(self._args(msg, 1)[0]) in self.introduced else b"F\0"

    def _introduce(self, s: Session, msg: Message, tree: Tree) -> bytes:
        domid = self._domid(self._args(msg, 3)[0])
        if domid == 0:
            raise XsError("EINVAL", "domain 0 cannot be introduced")
        if domid not in self.introduced:
            self.introduced.add(domid)
            self.meta_revision += 1
            self._fire([Change("@introduceDomain", None)])
        return OK

    def _release(self, s: Session, msg: Message, tree: Tree) -> bytes:
        domid = self._domid(self._args(msg, 1)[0])
        if domid not in self.introduced or domid == 0:
            raise XsError("ENOENT", f"domain {domid} is not introduced")
        self.release_domain(domid)
        return OK

    def _resume(self, s: Session, msg: Message, tree: Tree) -> bytes:
        if self._domid(self._args(msg, 1)[0]) not in self.introduced:
            raise XsError("ENOENT", "domain not introduced")
        return OK

    def _set_target(self, s: Session, msg: Message, tree: Tree) -> bytes:
        domid, target = (self._domid(x) for x in self._args(msg, 2)[:2])
        self.targets[domid] = target
        self.meta_revision += 1
        return OK

    def _control(self, s: Session, msg: Message, tree: Tree) -> bytes:
        command = self._args(msg, 1)[0]
        if command == b"help":
            return b"check\nhelp\n\0"
        if command == b"check":
            return OK
        raise XsError("EINVAL", f"unknown control command {command[:32]!r}")
