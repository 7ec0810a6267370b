"""The sans-I/O cores wired together in memory: our server core against a client end made
of a client ProtocolCore (the handshake) and the native transmission engine, fed bytes."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustvbd._native import NbdClientEngine
from trustvbd.blockdev import Buffer
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.core import ProtocolCore, Role, State


@dataclass(slots=True)
class Reply:
    """A request answered, as the engine reports it (a READ's data: its own buffer)."""

    cookie: int
    error: int = 0
    message: str = ""
    data: Buffer | None = None


class ClientEnd:
    """A client: ProtocolCore until the handshake is done, then the native engine, fed
    the bytes (as for a TLS stream). Requests carry the cookies the engine assigns
    (1, 2, ...): a test's cookie that differs is a failure of the test itself."""

    def __init__(self) -> None:
        self.core = ProtocolCore(Role.CLIENT)
        self.engine: NbdClientEngine | None = None
        self.error: str | None = None
        self._targets: dict[int, bytearray] = {}
        self._replies: deque[m.Event] = deque()

    @property
    def state(self) -> State:
        return State.ERROR if self.error is not None else self.core.state

    def __getattr__(self, name: str) -> object:  # what was negotiated: the core's
        return getattr(self.core, name)

    def _attached(self) -> NbdClientEngine | None:
        if self.engine is None and self.core.state is State.TRANSMISSION:
            self.engine = NbdClientEngine(None, self.core.structured)
        return self.engine

    def send(self, msg: m.Event) -> bytes:
        engine = self._attached()
        if engine is None or not isinstance(msg, m.Request):
            return self.core.send(msg)
        try:
            if msg.type == p.Cmd.DISC:
                engine.disconnect()
            else:
                into = bytearray(msg.length) if msg.type == p.Cmd.READ else None
                cookie = engine.request(msg.type, msg.flags, msg.offset, msg.length, msg.data,
                                        into)
                assert cookie == msg.cookie, f"the engine's cookie is {cookie}, not {msg.cookie}"
                if into is not None:
                    self._targets[cookie] = into
        except ValueError as exc:
            raise p.LocalProtocolError(str(exc)) from None
        return b"".join(bytes(part) for part in engine.take_output())

    def receive_data(self, data: bytes) -> None:
        engine = self._attached()
        if engine is None:
            self.core.receive_data(data)
            return
        done, broken, *_ = engine.feed(data)
        for cookie, error, message in done:
            target = self._targets.pop(cookie, None)
            self._replies.append(Reply(cookie, error, message,  # type: ignore[arg-type]
                                       target if target is not None and not error else None))
        if broken is not None:
            self.error = broken
            raise p.ProtocolError(broken)

    def next_event(self) -> m.Event | Reply | None:
        if self._replies:
            return self._replies.popleft()
        return self.core.next_event()

    @property
    def pending(self) -> int:
        return self.engine.pending if self.engine is not None else 0


Core = ProtocolCore | ClientEnd


def drain(core: Core) -> list[m.Event | Reply]:
    out = []
    while (ev := core.next_event()) is not None:
        out.append(ev)
    return out


E = TypeVar("E")


def only(events: Sequence[object], kind: type[E]) -> list[E]:
    """`events`, checked to all be of `kind` (so the test may read their fields)."""
    typed = [event for event in events if isinstance(event, kind)]
    assert typed == events, f"expected only {kind.__name__} events, got {events}"
    return typed


def requests_of(core: ProtocolCore) -> list[m.Request]:
    """The requests the server core's native framer parsed, as the messages they were."""
    out = []
    while core.requests:
        typ, flags, cookie, offset, length, data, _refusal, _piece = core.requests.popleft()
        out.append(m.Request(typ, cookie, offset, length, flags,
                             None if data is None else bytes(data)))
    return out


def data_of(reply: Reply) -> bytes:
    assert reply.data is not None, f"reply {reply.cookie} carries no data"
    return bytes(reply.data)


def deliver(sender: Core, receiver: Core, msg: m.Event) -> list[m.Event | Reply]:
    receiver.receive_data(sender.send(msg))
    return drain(receiver)


def reply(client: ClientEnd, msg: m.Reply) -> list[m.Event | Reply]:
    """A server's reply, encoded by messages.py (the server frames its own natively)."""
    client.receive_data(reply_wire(msg))
    return drain(client)


def negotiated(structured: bool = True, size: int = 1 << 20, tflags: int = 0x1ff
               ) -> tuple[ClientEnd, ProtocolCore]:
    c, s = ClientEnd(), ProtocolCore(Role.SERVER)
    deliver(s, c, m.Greeting(3))
    deliver(c, s, m.ClientFlags(3))
    if structured:
        deliver(c, s, m.Option(p.Opt.STRUCTURED_REPLY))
        deliver(s, c, m.OptionReply(p.Opt.STRUCTURED_REPLY, p.Rep.ACK))
    deliver(c, s, m.Option(p.Opt.GO, m.encode_go("disk", [p.Info.BLOCK_SIZE])))
    deliver(s, c, m.OptionReply(p.Opt.GO, p.Rep.INFO, m.info_block_size(512, 4096, 1 << 25)))
    deliver(s, c, m.OptionReply(p.Opt.GO, p.Rep.INFO, m.info_export(size, tflags)))
    deliver(s, c, m.OptionReply(p.Opt.GO, p.Rep.ACK))
    assert c.state is s.state is State.TRANSMISSION
    return c, s


def test_handshake_records_what_was_negotiated() -> None:
    c, s = negotiated()
    assert c.structured and s.structured and c.no_zeroes and s.no_zeroes
    assert (c.export_size, c.export_flags) == (1 << 20, 0x1FF)
    assert c.block_sizes == (512, 4096, 1 << 25)


def test_export_name_path_without_no_zeroes() -> None:
    c, s = ProtocolCore(Role.CLIENT), ProtocolCore(Role.SERVER)
    deliver(s, c, m.Greeting(1))  # server does not offer NO_ZEROES
    deliver(c, s, m.ClientFlags(1))
    deliver(c, s, m.Option(p.Opt.EXPORT_NAME, b"x"))
    raw = s.send(m.ExportNameReply(4096, 3))
    assert len(raw) == 8 + 2 + 124  # the reserved zeroes are sent
    c.receive_data(raw)
    assert drain(c) == [m.ExportNameReply(4096, 3)]
    assert c.state is State.TRANSMISSION


def test_read_write_round_trip_simple_and_structured() -> None:
    for structured in (False, True):
        c, s = negotiated(structured)
        payload = bytes(range(256)) * 16
        s.receive_data(c.send(m.Request(p.Cmd.WRITE, 1, 4096, 4096, 0, payload)))
        assert requests_of(s) == [m.Request(p.Cmd.WRITE, 1, 4096, 4096, 0, payload)]
        assert reply(c, m.SimpleReply(1)) == [Reply(1)]
        deliver(c, s, m.Request(p.Cmd.READ, 2, 4096, 4096))
        msg = m.OffsetData(2, 4096, payload) if structured else m.SimpleReply(2, 0, payload)
        [answer] = only(reply(c, msg), Reply)
        assert answer.cookie == 2 and data_of(answer) == payload


def test_replies_out_of_order_and_errors_with_messages() -> None:
    c, s = negotiated()
    for cookie in (1, 2, 3):
        deliver(c, s, m.Request(p.Cmd.READ, cookie, 0, 512))
    assert reply(c, m.ErrorChunk(3, p.NbdErr.EIO, "disk on fire")) == [
        Reply(3, p.NbdErr.EIO, "disk on fire")
    ]
    [r1] = only(reply(c, m.OffsetHole(1, 0, 512)), Reply)
    assert data_of(r1) == bytes(512)
    [r2] = only(reply(c, m.OffsetData(2, 0, b"\x01" * 512)), Reply)
    assert data_of(r2) == b"\x01" * 512
    assert c.pending == 0


def test_state_table_rejects_messages_out_of_turn() -> None:
    c, s = ProtocolCore(Role.CLIENT), ProtocolCore(Role.SERVER)
    with pytest.raises(p.LocalProtocolError):
        c.send(m.Option(p.Opt.LIST))  # before the greeting
    with pytest.raises(p.LocalProtocolError):
        s.send(m.Request(p.Cmd.READ, 1))  # a server never sends requests
    _c2, s2 = negotiated(structured=False)
    with pytest.raises(p.LocalProtocolError, match=r"framed by server_session\(\)"):
        s2.send(m.SimpleReply(1))  # replies are framed natively only


def framed(s: ProtocolCore, *replies: tuple[int, int, str, int, bytes | int | None]) -> bytes:
    return b"".join(bytes(part) for part in s.server_session().frame(list(replies)))


def reply_wire(msg: m.Reply) -> bytes:
    return b"".join(bytes(part) for part in m.encode_parts(msg))


def read_reply(structured: bool, cookie: int, offset: int, data: bytes) -> m.Reply:
    if not structured:
        return m.SimpleReply(cookie, 0, data)
    return m.OffsetData(cookie, offset, data) if data else m.NoneChunk(cookie)


def test_native_replies_are_the_bytes_of_the_messages_they_stand_for() -> None:
    """The native framer against the Python encoder of the same messages (messages.py)."""
    small, big = bytes(range(256)) * 16, bytes(range(256)) * 256  # copied in, sent as is
    for structured in (False, True):
        _, s = negotiated(structured)
        assert framed(s, (7, 0, "", 0, None)) == reply_wire(m.SimpleReply(7))
        assert framed(s, (8, 0, "", 4096, small)) == reply_wire(
            read_reply(structured, 8, 4096, small))
        assert framed(s, (9, 0, "", 0, b"")) == reply_wire(read_reply(structured, 9, 0, b""))
        error = m.ErrorChunk(5, p.NbdErr.ENOSPC, "full \u00e9") if structured \
            else m.SimpleReply(5, p.NbdErr.ENOSPC)
        assert framed(s, (5, p.NbdErr.ENOSPC, "full \u00e9", 0, None)) == reply_wire(error)
        # A batch, in order; big data is not copied, only a header for file ranges.
        batch = s.server_session().frame([(1, 0, "", 0, None), (2, 0, "", 512, big),
                                          (3, 0, "", 0, small), (4, 0, "", 8192, 70000)])
        assert any(part is big for part in batch)
        file_range = reply_wire(read_reply(structured, 4, 8192, b"\0" * 70000))[:-70000]
        assert b"".join(bytes(x) for x in batch) == b"".join([
            reply_wire(m.SimpleReply(1)), reply_wire(read_reply(structured, 2, 512, big)),
            reply_wire(read_reply(structured, 3, 0, small)), file_range])
        # And a client reads them as the replies they are.
        c, s = negotiated(structured)
        deliver(c, s, m.Request(p.Cmd.READ, 1, 4096, 4096))
        c.receive_data(framed(s, (1, 0, "", 4096, small)))
        [reply] = only(drain(c), Reply)
        assert reply.cookie == 1 and reply.error == 0 and data_of(reply) == small


def test_native_read_parts_are_the_bytes_of_the_messages_they_stand_for() -> None:
    """A READ sent part by part (over 32 MiB), framed natively, against messages.py."""
    one, two = bytes(range(256)) * 64, b"\x07" * 5000
    for structured in (False, True):
        _, s = negotiated(structured)
        session = s.server_session()
        first = session.frame_read_part(3, 1 << 36, one, True, False)
        last = session.frame_read_part(3, (1 << 36) + len(one), two, False, True)
        assert first[-1] is one and last[-1] is two  # the data goes out uncopied
        if structured:
            want = [m.OffsetData(3, 1 << 36, one, done=False),
                    m.OffsetData(3, (1 << 36) + len(one), two, done=True)]
            wire = b"".join(reply_wire(msg) for msg in want)
        else:  # one simple reply whose data the second part continues
            wire = reply_wire(m.SimpleReply(3, 0, one + two))
            assert len(last) == 1
        assert b"".join(bytes(x) for x in first + last) == wire
        text = "part failed \u00e9" * 400  # cut at 4096 bytes, on a character boundary
        if structured:
            assert session.frame_read_error(3, p.NbdErr.EIO, text, 1 << 36, False) == reply_wire(
                m.ErrorChunk(3, p.NbdErr.EIO, text, 1 << 36))
        else:
            assert session.frame_read_error(3, p.NbdErr.EIO, text, 1 << 36, True) == reply_wire(
                m.SimpleReply(3, p.NbdErr.EIO))
            with pytest.raises(ValueError, match="drop the connection"):
                session.frame_read_error(3, p.NbdErr.EIO, text, 1 << 36, False)
        with pytest.raises(ValueError, match="longer than"):
            session.frame_read_part(3, 0, bytearray(p.REQUEST_PART + 1), True, True)


def test_native_session_only_for_a_server_in_transmission() -> None:
    c, _ = negotiated()
    with pytest.raises(p.LocalProtocolError):
        c.core.server_session()  # a client never replies
    s = ProtocolCore(Role.SERVER)
    with pytest.raises(p.LocalProtocolError):
        s.server_session()  # before the handshake
    _, s = negotiated()
    with pytest.raises(p.ProtocolError, match="bad request magic 0x787878ff"):
        s.receive_data(b"x" * 3 + b"\xff" * 29)  # bad request magic: the core fails
    assert s.state is State.ERROR
    with pytest.raises(p.ProtocolError):
        s.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.READ, 1, 0, 512))


def test_unknown_client_flags_are_a_protocol_error() -> None:
    s = ProtocolCore(Role.SERVER)
    s.send(m.Greeting(3))
    with pytest.raises(p.ProtocolError, match="unknown client flags"):
        s.receive_data(b"\0\0\0\x09")
    assert s.state is State.ERROR


def test_oversized_option_is_refused_before_reading_it() -> None:
    s = ProtocolCore(Role.SERVER)
    s.send(m.Greeting(3))
    s.receive_data(b"\0\0\0\3")
    with pytest.raises(p.ProtocolError, match="more than"):
        s.receive_data(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.GO, 1 << 30))


def test_long_write_arrives_in_parts_and_long_read_parses() -> None:
    # Writable and large enough: a refused WRITE this long is not read (the next test).
    _c, s = negotiated(size=1 << 30, tflags=0x1ff & ~p.TransmissionFlag.READ_ONLY)
    s.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.READ, 1, 0, 1 << 30))
    assert requests_of(s)[0].length == 1 << 30  # served in parts by the server
    part = p.REQUEST_PART
    length = 2 * part + 3
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
    s.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, p.CmdFlag.FUA, p.Cmd.WRITE, 2, 5, length))
    got: list[m.RequestItem] = []
    for at in range(0, length, 1 << 20):  # in 1 MiB slices, as a socket would hand them over
        s.receive_data(payload[at:at + (1 << 20)])
        assert s.receiving <= part + 64, "one piece at a time"
        got += s.requests
        s.requests.clear()
    assert [(offset, n, last) for _t, _f, _c, offset, n, _d, _r, last in got] == [
        (5, part, False), (5 + part, part, False), (5 + 2 * part, 3, True)]
    assert b"".join(bytes(data) for *_, data, _r, _l in got if data is not None) == payload
    assert all((t, f, c) == (p.Cmd.WRITE, p.CmdFlag.FUA, 2) for t, f, c, *_ in got)
    assert all(refusal is None for *_, refusal, _l in got)
    # The stream stays in sync: the next request parses.
    s.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.FLUSH, 3, 0, 0))
    assert [r.cookie for r in requests_of(s)] == [3]


def test_disc_moves_to_disconnecting_and_later_bytes_are_ignored() -> None:
    c, s = negotiated()
    deliver(c, s, m.Request(p.Cmd.DISC, 0))
    assert s.state is State.DISCONNECTING
    s.receive_data(b"garbage that a broken client sends after DISC")
    assert drain(s) == [] and requests_of(s) == [m.Request(p.Cmd.DISC, 0)]
    with pytest.raises(p.LocalProtocolError):
        c.send(m.Request(p.Cmd.READ, 5, 0, 512))


def test_eof_reports_truncated_bytes() -> None:
    _c, s = negotiated()
    s.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.READ, 1, 0, 512)[:10])
    s.receive_eof()
    assert drain(s) == [m.ConnectionClosed(truncated=10)]


# --- hostile server replies, judged by the client's engine (more: cargo test) ----------
HOSTILE_REPLIES: dict[str, m.Event] = {
    "unknown cookie": m.SimpleReply(99),
    "data chunk outside the request": m.OffsetData(1, 4096, b"x" * 512),
    "data chunk longer than the request": m.OffsetData(1, 0, b"x" * 1024),
    "hole of zero bytes": m.OffsetHole(1, 0, 0),
    "simple reply to a read after structured": m.SimpleReply(1, 0, b"x" * 512),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_REPLIES))
def test_client_core_rejects_hostile_replies(name: str) -> None:
    c, _s = negotiated()
    c.send(m.Request(p.Cmd.READ, 1, 0, 512))
    with pytest.raises(p.ProtocolError):
        c.receive_data(b"".join(m.encode_parts(HOSTILE_REPLIES[name])))
    assert c.state is State.ERROR


def test_client_core_rejects_overlap_and_short_coverage() -> None:
    c, _ = negotiated()
    c.send(m.Request(p.Cmd.READ, 1, 0, 1024))
    c.receive_data(b"".join(m.encode_parts(m.OffsetData(1, 0, b"a" * 512, done=False))))
    with pytest.raises(p.ProtocolError, match="overlaps"):
        c.receive_data(b"".join(m.encode_parts(m.OffsetHole(1, 256, 512, done=False))))
    c, _ = negotiated()
    c.send(m.Request(p.Cmd.READ, 1, 0, 1024))
    c.receive_data(b"".join(m.encode_parts(m.OffsetData(1, 0, b"a" * 512, done=False))))
    with pytest.raises(p.ProtocolError, match="covers 512 of 1024"):
        c.receive_data(b"".join(m.encode_parts(m.NoneChunk(1))))


def test_client_core_bad_magic_and_giant_option_reply() -> None:
    c, _ = negotiated()
    c.send(m.Request(p.Cmd.FLUSH, 1))
    with pytest.raises(p.ProtocolError, match="bad reply magic"):
        c.receive_data(b"\xde\xad\xbe\xef" + bytes(12))
    c = ClientEnd()
    c.receive_data(p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, 3))
    drain(c)
    c.send(m.ClientFlags(3))
    c.send(m.Option(p.Opt.LIST))
    with pytest.raises(p.ProtocolError, match="exceeds"):
        c.receive_data(p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, p.Opt.LIST, 2, 1 << 31))


# --- framing properties --------------------------------------------------------------
def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


requests = st.builds(
    lambda typ, cookie, offset, length, flags: m.Request(
        typ, cookie, offset, length, flags, bytes([cookie % 256]) * length if typ == 1 else None
    ),
    st.sampled_from([0, 1, 3, 4, 5, 6, 7, 42]),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**63),
    st.integers(0, 200_000),
    st.integers(0, 0xFFFF),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(requests, max_size=6), st.lists(st.integers(0, 10**7), max_size=12))
def test_requests_survive_any_chunking(reqs: list[m.Request], cuts: list[int]) -> None:
    wire = b"".join(b"".join(m.encode_parts(r)) for r in reqs)
    _, s = negotiated()
    for piece in split_at(wire, cuts):
        s.receive_data(piece)
    assert drain(s) == []
    assert requests_of(s) == reqs


options = st.builds(m.Option, st.integers(0, 2**32 - 1).filter(lambda o: o != 1),
                    st.binary(max_size=3000))


@settings(max_examples=60, deadline=None)
@given(options, st.lists(st.integers(0, 5000), max_size=8))
def test_options_round_trip_under_any_chunking(opt: m.Option, cuts: list[int]) -> None:
    s = ProtocolCore(Role.SERVER)
    s.send(m.Greeting(3))
    s.receive_data(b"\0\0\0\3")
    drain(s)
    for piece in split_at(b"".join(m.encode_parts(opt)), cuts):
        s.receive_data(piece)
    assert drain(s) == [opt]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 64).flatmap(
        lambda n: st.tuples(st.just(n), st.permutations(range(n)), st.lists(st.booleans(),
                            min_size=n, max_size=n))
    ),
    st.lists(st.integers(0, 10**6), max_size=10),
)
def test_structured_read_reassembles_any_chunk_order(
    layout: tuple[int, list[int], list[bool]], cuts: list[int]
) -> None:
    """A read split into data and hole chunks, sent in any order, reassembles exactly."""
    n, order, holes = layout
    size = n * 512
    expected = bytearray(size)
    c, _ = negotiated(size=size)
    c.send(m.Request(p.Cmd.READ, 1, 0, size))
    wire = b""
    for k, idx in enumerate(order):
        last = k == len(order) - 1
        if holes[idx]:
            chunk: m.Reply = m.OffsetHole(1, idx * 512, 512, done=last)
        else:
            block = bytes([idx + 1]) * 512
            expected[idx * 512 : idx * 512 + 512] = block
            chunk = m.OffsetData(1, idx * 512, block, done=last)
        wire += reply_wire(chunk)
    for piece in split_at(wire, cuts):
        c.receive_data(piece)
    [reply] = only(drain(c), Reply)
    assert reply.error == 0 and data_of(reply) == bytes(expected)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2**16), st.text(max_size=50), st.booleans(),
       st.lists(st.integers(0, 500), max_size=5))
def test_error_chunks_round_trip(error: int, text: str, with_offset: bool,
                                 cuts: list[int]) -> None:
    c, _ = negotiated()
    cookie = 1  # the engine's first
    c.send(m.Request(p.Cmd.WRITE, cookie, 0, 512, 0, bytes(512)))
    chunk = m.ErrorChunk(cookie, error, text, 256 if with_offset else None)
    for piece in split_at(reply_wire(chunk), cuts):
        c.receive_data(piece)
    assert drain(c) == [Reply(cookie, error, text)]


# --- server: WRITE payloads received in place ------------------------------------------
def test_requests_arriving_byte_by_byte_parse_exactly() -> None:
    """A payload long enough to be received in place, and small requests around it, one
    byte per read: the same requests come out, and DISC ends the stream."""
    big = bytes(range(256)) * 300  # 76,800 bytes: past the in-place threshold
    reqs = [m.Request(p.Cmd.WRITE, 1, 4096, len(big), p.CmdFlag.FUA, big),
            m.Request(p.Cmd.FLUSH, 2),
            m.Request(p.Cmd.WRITE, 3, 0, 4096, 0, b"\x5a" * 4096),
            m.Request(p.Cmd.READ, 4, 512, 1024),
            m.Request(p.Cmd.DISC, 5)]
    wire = b"".join(b"".join(m.encode_parts(r)) for r in reqs)
    _, s = negotiated()
    for i in range(len(wire)):
        s.receive_data(wire[i:i + 1])
    assert requests_of(s) == reqs
    assert s.state is State.DISCONNECTING and s.receiving == 0


def test_a_payload_received_in_place_ends_exactly_where_its_length_says() -> None:
    """The read that ends a payload may carry the next message's bytes: they are parsed as
    the next message (here a bad one), never added to the payload."""
    length = 100_000
    _, s = negotiated()
    s.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 7, 0, length))
    assert s.receiving >= length  # the payload goes straight to its own buffer
    target = s.get_buffer()
    tail = b"\xee" * 32  # no request magic
    assert len(target) > length, "the payload's buffer has room for the next header"
    target[:length + len(tail)] = b"\x11" * length + tail
    with pytest.raises(p.ProtocolError, match="bad request magic"):
        s.buffer_updated(length + len(tail))
    (req,) = requests_of(s)
    assert req.cookie == 7 and req.data is not None and bytes(req.data) == b"\x11" * length


def count_reads(core: ProtocolCore, wire: bytes) -> int:
    """Feed `wire` as a socket with everything queued would: each read fills the buffer
    get_buffer offers as far as the bytes go. Returns the number of reads."""
    view, reads = memoryview(wire), 0
    while view:
        target = core.get_buffer()
        n = min(len(target), len(view))
        target[:n] = view[:n]
        view = view[n:]
        core.buffer_updated(n)
        reads += 1
    return reads


def test_one_read_per_large_write_when_the_bytes_are_there() -> None:
    """The read that ends a WRITE's payload also takes the next request's header, so a
    stream of large writes costs one read each, not two (header, then payload)."""
    count, length = 20, 256 * 1024
    reqs = [m.Request(p.Cmd.WRITE, i, i * length, length, 0, bytes([i]) * length)
            for i in range(count)]
    _, s = negotiated()
    reads = count_reads(s, b"".join(b"".join(m.encode_parts(r)) for r in reqs))
    assert requests_of(s) == reqs
    assert reads <= count + 2, f"{reads} reads for {count} writes"


def test_a_hostile_write_length_holds_at_most_one_part() -> None:
    """A WRITE claiming 4 GiB - 1: the core holds one part (32 MiB) at a time, never the
    claimed length, and a peer that stops sending leaves a truncated message, not events."""
    _, s = negotiated(size=8 << 30, tflags=0x1ff & ~p.TransmissionFlag.READ_ONLY)
    s.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 9, 0, 2**32 - 1))
    assert p.REQUEST_PART <= s.receiving <= p.REQUEST_PART + 64
    s.receive_data(b"\x00" * 1000)
    s.receive_eof()
    assert drain(s) == [m.ConnectionClosed(truncated=1000)]


def test_a_refused_write_is_drained_up_to_the_maximum_payload_then_ends_the_stream() -> None:
    """Refused (read-only export): a WRITE of up to 64 MiB comes in pieces that each carry
    the whole request's check, and the stream stays in sync; a longer one comes out at
    once, without payload, and nothing after it is parsed (the server answers and closes)."""
    _, s = negotiated()
    part, read_only = p.REQUEST_PART, (p.NbdErr.EPERM, "WRITE on a read-only export")
    s.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 2, 5, part + 3))
    s.receive_data(bytes(part + 3))
    got = list(s.requests)
    s.requests.clear()
    assert [(c, off, n, r) for _t, _f, c, off, n, _d, r, _l in got] == [
        (2, 5, part, read_only), (2, 5 + part, 3, read_only)]
    s.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 3, 0, 2**32 - 1)
                   + bytes(4096) + p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.FLUSH, 4, 0, 0))
    assert [(c, d, r, piece) for _t, _f, c, _o, _n, d, r, piece in s.requests] == [
        (3, None, read_only, None)]
    assert s.state is State.DISCONNECTING and s.receiving < 1 << 20
