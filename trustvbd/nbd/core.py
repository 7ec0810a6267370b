"""The sans-I/O NBD protocol core shared by server and client (h11 style).

One `ProtocolCore` per connection end. Bytes from the peer go in through
`receive_data()` (or, without copying, `get_buffer()`/`buffer_updated()`, the
asyncio.BufferedProtocol pair); complete messages come out of `next_event()`.
Messages we send go through `send()`/`send_parts()`, which return the bytes to
write. No sockets, no clocks, no tasks: the asyncio server and client are thin
shells around this, and tests wire two cores together in memory.

The connection state is one machine shared by both ends: each message moves
it along `TRANSITIONS` whoever sends it. A message the table does not allow is
a `ProtocolError` when the peer sent it (drop the connection) and a
`LocalProtocolError` when we tried to send it (our bug).

A client core ends with the handshake: the client's transmission phase (requests,
replies, their checks) is the native engine (`trustvbd._native.NbdClientEngine`,
native/src/nbd_client), which `trustvbd.nbd.client_connect` attaches once GO is answered.
A server core receives the bytes of transmission too, but parsing and checking the
requests and framing every reply is native (`trustvbd._native.NbdServerSession`,
native/src/nbd_server): the core hands the parsed requests out as `requests`, and
refuses to send a reply itself.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any

from trustvbd._native import NbdServerSession
from trustvbd.blockdev import Buffer
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.buffer_pool import BufferPool


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    GREETING = "greeting"  # the server owes the greeting
    CLIENT_FLAGS = "client-flags"  # the client owes its flags
    OPTIONS = "options"  # the client may send an option
    OPTION_REPLY = "option-reply"  # the server owes replies to `pending_option`
    EXPORT_NAME_REPLY = "export-name-reply"  # the server owes size+flags (or hangs up)
    TRANSMISSION = "transmission"
    DISCONNECTING = "disconnecting"  # client sent NBD_CMD_DISC; server finishes replies
    CLOSED = "closed"  # NBD_OPT_ABORT acknowledged
    ERROR = "error"


# Per-request code compares against these module-level aliases: looking up an
# enum member on its class costs ~60 ns on Python 3.11, and a request's trip
# through the core did a few dozen of them.
_ERROR, _TRANSMISSION, _DISCONNECTING = State.ERROR, State.TRANSMISSION, State.DISCONNECTING
_WRITE, _DISC = int(p.Cmd.WRITE), int(p.Cmd.DISC)


# Only the handshake's: every transmission-phase reply is framed natively, by the
# server_session() (NbdServerSession), so Python has no second framer for them.
SERVER_MESSAGES = (m.Greeting, m.OptionReply, m.ExportNameReply)
CLIENT_MESSAGES = (m.ClientFlags, m.Option)  # requests: the native engine

# Scratch receive buffer. Every message that is not routed straight into its
# own payload buffer fits in half of it (the native framer's WAIT_MAX), so
# compaction always makes room.
SCRATCH_SIZE = 256 * 1024
# What a connection starts with, grown to SCRATCH_SIZE the first time compaction is needed:
# a connection that never sends more than a handshake (a flood of them) holds 32 KiB, not
# 256 KiB; glibc took every 256 KiB one from its heap (its mmap threshold rises once such a
# buffer is freed), which fragmented: churn left the encryption domain at 5x its size.
FIRST_SIZE = 32 * 1024
RECEIVE_WINDOW = 64 * 1024  # most bytes read into the scratch buffer at once
SMALL_WINDOW = 32  # one request header, or a chunk header with its offset
# A WRITE payload received in place gets this much room after it: the same socket read
# that ends the payload also takes the next request's header (a second read per request
# otherwise). What lands there is moved to the scratch buffer and parsed as usual.
PAYLOAD_TAIL = SMALL_WINDOW
OUT_OF_TURN_LIMIT = p.MAX_OPTION_LENGTH + 64  # bytes a peer may send before its turn


def _after_option(core: ProtocolCore, msg: m.Option) -> State:
    core.pending_option = msg.option
    core.go_export = None
    return State.EXPORT_NAME_REPLY if msg.option == p.Opt.EXPORT_NAME else State.OPTION_REPLY


def _after_option_reply(core: ProtocolCore, msg: m.OptionReply) -> State:
    opt = core.pending_option
    if msg.option != opt:
        raise p.ProtocolError(
            f"option reply is for {p.name_of(p.Opt, msg.option)}, "
            f"but the pending option is {p.name_of(p.Opt, opt or 0)}"
        )
    if msg.reply == p.Rep.INFO and opt in (p.Opt.GO, p.Opt.INFO):
        try:
            kind, value = m.parse_info(msg.data)
        except ValueError as exc:
            raise p.ProtocolError(f"bad NBD_REP_INFO: {exc}") from exc
        if kind == p.Info.EXPORT:
            core.go_export = value  # type: ignore[assignment]
        elif kind == p.Info.BLOCK_SIZE:
            core.block_sizes = value  # type: ignore[assignment]
    if not msg.final:
        return State.OPTION_REPLY
    core.pending_option = None
    if msg.reply != p.Rep.ACK:
        return State.OPTIONS
    if opt == p.Opt.STRUCTURED_REPLY:
        core.structured = True
    elif opt == p.Opt.ABORT:
        return State.CLOSED
    elif opt == p.Opt.GO:
        if core.go_export is None:
            raise p.ProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
        core.export_size, core.export_flags = core.go_export
        return State.TRANSMISSION
    return State.OPTIONS


def _after_export_name_reply(core: ProtocolCore, msg: m.ExportNameReply) -> State:
    core.export_size, core.export_flags = msg.size, msg.flags
    return State.TRANSMISSION


def _after_greeting(core: ProtocolCore, msg: m.Greeting) -> State:
    core.handshake_flags = msg.flags
    return State.CLIENT_FLAGS


def _after_client_flags(core: ProtocolCore, msg: m.ClientFlags) -> State:
    # An int, because ~ of a flag enum silently drops the unknown bits we look for.
    known = int(p.ClientFlag.C_FIXED_NEWSTYLE | p.ClientFlag.C_NO_ZEROES)
    if msg.flags & ~known:
        raise p.ProtocolError(f"unknown client flags {msg.flags:#x}")
    offered = core.handshake_flags & p.HandshakeFlag.NO_ZEROES
    if msg.flags & p.ClientFlag.C_NO_ZEROES and not offered:
        raise p.ProtocolError("client asked for NO_ZEROES, which the server did not offer")
    core.no_zeroes = bool(msg.flags & p.ClientFlag.C_NO_ZEROES)
    return State.OPTIONS


def _after_request(core: ProtocolCore, msg: m.Request) -> State:
    # Requests the server receives take the same step in the native framer
    # (_parse_requests: DISC ends parsing).
    return _DISCONNECTING if msg.type == _DISC else _TRANSMISSION


_Next = State | Callable[["ProtocolCore", Any], State]

# (state, message type) -> next state, or a function computing it (and noting
# what was negotiated). Anything not in the table is a protocol violation.
TRANSITIONS: dict[tuple[State, type], _Next] = {
    (State.GREETING, m.Greeting): _after_greeting,
    (State.CLIENT_FLAGS, m.ClientFlags): _after_client_flags,
    (State.OPTIONS, m.Option): _after_option,
    (State.OPTION_REPLY, m.OptionReply): _after_option_reply,
    (State.EXPORT_NAME_REPLY, m.ExportNameReply): _after_export_name_reply,
    (State.TRANSMISSION, m.Request): _after_request,
}


class ProtocolCore:
    """One end of an NBD connection, without I/O."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.GREETING
        self.handshake_flags = 0
        self.no_zeroes = False
        self.structured = False
        self.pending_option: int | None = None
        self.go_export: tuple[int, int] | None = None
        self.block_sizes: tuple[int, int, int] | None = None
        self.export_size = 0
        self.export_flags = 0
        self.meta_context = 0  # server: the id of the base:allocation context given (0: none)
        self.error: str | None = None
        # Server only, in transmission: the native framer, and the requests it parsed.
        self.session: NbdServerSession | None = None
        self.requests: deque[m.RequestItem] = deque()
        # Server only: parses a batch of requests in place of session.parse (the
        # connection's, which starts READs in the native read plane); cleared when it ends.
        self.parse_batch: Callable[[NbdServerSession, bytearray, int, int],
                                   tuple[int, list[m.RequestItem], int]] | None = None
        self.events: deque[m.Event] = deque()  # received, not taken yet (next_event)
        self._buf = bytearray(FIRST_SIZE)
        self._start = 0  # first unparsed byte in _buf
        self._end = 0  # end of received bytes in _buf
        self._direct: memoryview | None = None  # payload being received in place
        # Its size (0 if none): memory a peer holds. An attribute, not a property: a
        # connection with a memory budget reads it after every receive.
        self.receiving = 0
        self._direct_filled = 0
        self._direct_need = 0  # bytes of _direct that complete it; any after are the next message's
        # The request's view of that payload, handed to the framer once it is all in. Held
        # as data, not as a callback bound to this core: a callback would make a reference
        # cycle, and a guest that hangs up mid-payload would leave its buffer (up to 32 MiB)
        # to the cycle collector, which the domains run rarely (quiet_garbage_collector).
        self._direct_payload: memoryview | None = None
        self._eof = False
        # Right after a large payload, read just one header: if the next message
        # is a large payload too, its bytes then go straight to their own buffer.
        self._window = RECEIVE_WINDOW
        self.pool = BufferPool()  # server: reusable WRITE payload buffers

    # --- sending -----------------------------------------------------------
    def send(self, msg: m.Event) -> bytes:
        """Account for sending `msg` and return its bytes."""
        return b"".join(self.send_parts(msg))

    def send_parts(self, msg: m.Event) -> list[Buffer]:
        """Like send(), but as a list of buffers so payloads are not copied."""
        ours = SERVER_MESSAGES if self.role is Role.SERVER else CLIENT_MESSAGES
        if not isinstance(msg, ours):
            native = " (transmission replies are framed by server_session())" if isinstance(
                msg, m.Reply) else ""
            raise p.LocalProtocolError(f"a {self.role.value} cannot send {type(msg).__name__}{native}")
        if self.state is _ERROR:
            raise p.LocalProtocolError(f"connection failed earlier: {self.error}")
        try:
            self._transition(msg)
        except p.ProtocolError as exc:
            raise p.LocalProtocolError(str(exc)) from exc
        parts = m.encode_parts(msg, no_zeroes=self.no_zeroes)
        if self.state is not _ERROR and self._end > self._start:
            self._parse()  # bytes that arrived early may be parseable now
        return parts

    def _transition(self, msg: m.Event) -> None:
        nxt = TRANSITIONS.get((self.state, type(msg)))
        if nxt is None:
            raise p.ProtocolError(
                f"{type(msg).__name__} is not allowed in state {self.state.value}"
            )
        self.state = nxt if isinstance(nxt, State) else nxt(self, msg)

    # --- receiving ---------------------------------------------------------
    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the peer (copying them; see get_buffer for zero-copy)."""
        view = memoryview(data).cast("B")
        while view:
            target = self.get_buffer(len(view))
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def receive_eof(self) -> None:
        """The peer closed its sending side."""
        if self.state is _ERROR or self._eof:
            return
        self._eof = True
        partial = (self._end - self._start) + (self._direct_filled if self._direct else 0)
        self.events.append(m.ConnectionClosed(truncated=partial))

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable buffer for the next received bytes (asyncio.BufferedProtocol)."""
        if self.state is _ERROR:  # as _check_alive, inline: once per receive
            raise p.ProtocolError(self.error or "connection failed")
        if self._direct is not None:
            return self._direct[self._direct_filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < 16 * 1024:
            pending = self._end - self._start
            if len(self._buf) < SCRATCH_SIZE:  # a new one: a view of the old may be held
                grown = bytearray(SCRATCH_SIZE)
                grown[0:pending] = self._buf[self._start : self._end]
                self._buf = grown
            else:
                self._buf[0:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending
        if self._end == len(self._buf):
            self._fail("peer sent more unparsed data than the receive buffer holds")
        # A bounded window: the start of a large payload that lands here must be
        # copied to its own buffer, so keep that part small.
        return memoryview(self._buf)[self._end : self._end + self._window]

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were written into the last buffer from get_buffer()."""
        if self.state is _ERROR:
            raise p.ProtocolError(self.error or "connection failed")
        direct = self._direct
        if direct is not None:
            self._direct_filled += nbytes
            need = self._direct_need
            if self._direct_filled < need:
                return
            extra = self._direct_filled - need
            if extra:  # the start of the next message, read together with the payload's end
                self._buf[:extra] = direct[need : need + extra]
                self._start, self._end = 0, extra
            payload = self._direct_payload
            self._direct = self._direct_payload = None
            self._direct_filled = self.receiving = 0
            self._window = SMALL_WINDOW
            try:
                self._payload_received(payload)  # type: ignore[arg-type]
            except p.ProtocolError as exc:
                self._fail(str(exc))
        else:
            self._end += nbytes
            self._window = RECEIVE_WINDOW
            if self.state is _TRANSMISSION and self.session is not None:
                # Requests, once transmission runs: straight to the native framer (what
                # _parse comes to then, without its two calls per receive).
                try:
                    self._parse_requests(self._start, self._end)
                except p.ProtocolError as exc:
                    self._fail(str(exc))
                return
        self._parse()

    def next_event(self) -> m.Event | None:
        """The next complete message from the peer, or None if more bytes are needed."""
        if self.events:
            return self.events.popleft()
        return None

    def pending_events(self) -> int:
        return len(self.events)

    def unparsed(self) -> int:
        """Bytes and events received but not yet taken (STARTTLS: none may be waiting)."""
        direct = self._direct_filled if self._direct is not None else 0
        return self._end - self._start + direct + len(self.events)

    def take_unparsed(self) -> bytes | None:
        """The bytes received and not parsed yet, taken out (the connection is handed to
        another server loop, nbd/file_serve.py); None while a payload is being received
        into a buffer of its own, and then nothing is taken."""
        if self._direct is not None or self.requests or self.events:
            return None
        data = bytes(self._buf[self._start:self._end])
        self._start = self._end = 0
        return data

    def _check_alive(self) -> None:
        if self.state is _ERROR:
            raise p.ProtocolError(self.error or "connection failed")

    def _fail(self, reason: str) -> None:
        self.state = _ERROR
        self.error = reason
        raise p.ProtocolError(reason)

    def _receive(self, msg: m.Event) -> None:
        try:
            self._transition(msg)
        except p.ProtocolError as exc:
            self._fail(str(exc))
        self.events.append(msg)

    def _parse(self) -> None:
        try:
            if self.role is Role.SERVER:
                self._parse_from_client()
            else:
                self._parse_from_server()
        except p.ProtocolError as exc:
            if self.state is not _ERROR:
                self._fail(str(exc))
            raise
        if (
            self._direct is None
            and self._end - self._start > OUT_OF_TURN_LIMIT
            and self.state not in (_TRANSMISSION, _DISCONNECTING)
        ):
            self._fail(f"peer sent {self._end - self._start} bytes out of turn")

    def _start_direct(self, target: memoryview, filled: int, payload: memoryview,
                      need: int) -> None:
        """Receive into `target` (`filled` bytes there already) until `need` bytes are in,
        then hand `payload` on. Bytes past `need` belong to the next message."""
        assert not self._end  # the scratch buffer is empty meanwhile (see buffer_updated)
        self._direct, self._direct_filled, self._direct_payload = target, filled, payload
        self.receiving = len(target)
        self._direct_need = need

    # --- server side: messages from the client -------------------------------
    def _parse_from_client(self) -> None:
        buf = self._buf
        while True:
            state = self.state
            start, end = self._start, self._end
            avail = end - start
            if state is _TRANSMISSION:
                self._parse_requests(start, end)
                return
            if state is State.OPTIONS:
                if avail < p.OPTION_HEADER.size:
                    return
                magic, option, length = p.OPTION_HEADER.unpack_from(buf, start)
                if magic != p.IHAVEOPT:
                    raise p.ProtocolError(f"bad option magic {magic:#018x}")
                if length > p.MAX_OPTION_LENGTH:
                    raise p.ProtocolError(
                        f"option {p.name_of(p.Opt, option)} has {length} bytes of data, "
                        f"more than the {p.MAX_OPTION_LENGTH} allowed"
                    )
                if avail < p.OPTION_HEADER.size + length:
                    return
                body = start + p.OPTION_HEADER.size
                self._start = body + length
                self._receive(m.Option(option, bytes(buf[body : body + length])))
                continue
            if state is State.CLIENT_FLAGS:
                if avail < 4:
                    return
                (flags,) = p.CLIENT_FLAGS.unpack_from(buf, start)
                self._start = start + 4
                self._receive(m.ClientFlags(flags))
                continue
            if state in (_DISCONNECTING, State.CLOSED):
                self._start = self._end  # nothing may follow DISC/ABORT: ignore it
            return  # not the client's turn: keep the bytes until it is

    def _parse_requests(self, start: int, end: int) -> None:
        """Requests in transmission: the native framer parses and checks every complete one.

        A WRITE payload it wants received in place (large ones; pieces of one longer than
        REQUEST_PART) goes straight into a pooled buffer, with room after it for the next
        header (PAYLOAD_TAIL), and is handed back to the framer once full.
        """
        session = self.session if self.session is not None else self.server_session()
        try:
            if self.parse_batch is not None:
                start, items, want = self.parse_batch(session, self._buf, start, end)
            else:
                start, items, want = session.parse(self._buf, start, end)
        except ValueError as exc:
            raise p.ProtocolError(str(exc)) from None
        self._start = start
        if items:
            self.requests.extend(items)
            if session.disconnected:
                self.state = _DISCONNECTING
        if want:
            have = end - start
            payload = self.pool.get(want + PAYLOAD_TAIL)
            if have:
                payload[:have] = memoryview(self._buf)[start:end]
            self._start = self._end = 0
            view = memoryview(payload)
            # The request carries a view of exactly its payload; BufferPool.give_back takes
            # the view back and recycles the buffer once nothing else refers to it.
            self._start_direct(view, have, view[:want], want)

    def server_session(self) -> NbdServerSession:
        """The native transmission phase of a server, for the export negotiated."""
        if self.session is None:
            if self.role is not Role.SERVER or self.state not in (_TRANSMISSION, _DISCONNECTING):
                raise p.LocalProtocolError("only a server in transmission has requests and replies")
            self.session = NbdServerSession(self.export_size, self.export_flags, self.structured,
                                           self.meta_context)
        return self.session

    def _payload_received(self, payload: memoryview) -> None:
        assert self.session is not None
        try:
            self.requests.append(self.session.payload_received(payload))
        except ValueError as exc:
            raise p.ProtocolError(str(exc)) from None

    # --- client side: messages from the server -------------------------------
    def _parse_from_server(self) -> None:
        buf = self._buf
        while True:
            state = self.state
            start, end = self._start, self._end
            avail = end - start
            if state is State.OPTION_REPLY:
                if avail < p.OPTION_REPLY_HEADER.size:
                    return
                magic, option, reply, length = p.OPTION_REPLY_HEADER.unpack_from(buf, start)
                if magic != p.OPTION_REPLY_MAGIC:
                    raise p.ProtocolError(f"bad option reply magic {magic:#x}")
                if length > p.MAX_OPTION_LENGTH:
                    raise p.ProtocolError(
                        f"option reply of {length} bytes exceeds the {p.MAX_OPTION_LENGTH} allowed"
                    )
                body = start + p.OPTION_REPLY_HEADER.size
                if end - body < length:
                    return
                self._start = body + length
                self._receive(m.OptionReply(option, reply, bytes(buf[body : body + length])))
                continue
            if state is State.GREETING:
                if avail < p.GREETING.size:
                    return
                magic, opt_magic, flags = p.GREETING.unpack_from(buf, start)
                if magic != p.NBDMAGIC:
                    raise p.ProtocolError(f"not an NBD server (magic {magic:#x})")
                if opt_magic != p.IHAVEOPT:
                    raise p.ProtocolError("server speaks the old-style handshake, not newstyle")
                if not flags & p.HandshakeFlag.FIXED_NEWSTYLE:
                    raise p.ProtocolError("server does not support fixed newstyle negotiation")
                self._start = start + p.GREETING.size
                self._receive(m.Greeting(flags))
                continue
            if state is State.EXPORT_NAME_REPLY:
                size = p.EXPORT_NAME_REPLY.size + (0 if self.no_zeroes else p.EXPORT_NAME_ZEROES)
                if avail < size:
                    return
                export_size, flags = p.EXPORT_NAME_REPLY.unpack_from(buf, start)
                self._start = start + size
                self._receive(m.ExportNameReply(export_size, flags))
                continue
            return  # our turn to speak; the server's early bytes wait
