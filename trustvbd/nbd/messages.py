"""NBD messages as plain objects (the events of the sans-I/O core) and their encoding.

Each class is one message on the wire; `encode_parts(msg)` turns it into a list
of buffers (the payload is never copied). The handshake sends its messages with
it; the transmission replies are framed natively (NbdServerSession), and their
classes here are the tests' independent reference for those bytes. Decoding
lives in `core.py`, because how many bytes a message has depends on the
connection's state. The helpers at the end build and parse option payloads
(GO/INFO requests, INFO and SERVER replies) for both sides.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from trustvbd.blockdev import Buffer
from trustvbd.nbd import protocol as p


# --- handshake -------------------------------------------------------------
@dataclass(slots=True)
class Greeting:
    """S: NBDMAGIC IHAVEOPT handshake-flags."""

    flags: int


@dataclass(slots=True)
class ClientFlags:
    """C: client flags, the answer to the greeting."""

    flags: int


@dataclass(slots=True)
class Option:
    """C: one option request during haggling."""

    option: int
    data: bytes = b""


@dataclass(slots=True)
class OptionReply:
    """S: one reply to the current option (ACK and errors are final, others are not)."""

    option: int
    reply: int
    data: bytes = b""

    @property
    def final(self) -> bool:
        return self.reply == p.Rep.ACK or bool(self.reply & p.REP_ERROR_BIT)


@dataclass(slots=True)
class ExportNameReply:
    """S: the answer to NBD_OPT_EXPORT_NAME: size and transmission flags."""

    size: int
    flags: int


# --- transmission ------------------------------------------------------------
@dataclass(slots=True)
class Request:
    """C: one command; `data` is the payload of a WRITE. (The server core parses these;
    our client packs its own natively, native/src/nbd_client.)"""

    type: int
    cookie: int
    offset: int = 0
    length: int = 0
    flags: int = 0
    data: Buffer | None = None


@dataclass(slots=True)
class SimpleReply:
    """S: a simple reply; `data` only for a successful READ."""

    cookie: int
    error: int = 0
    data: Buffer | None = None


@dataclass(slots=True)
class OffsetData:
    """S: structured chunk with read data at an absolute offset."""

    cookie: int
    offset: int
    data: Buffer
    done: bool = True


@dataclass(slots=True)
class OffsetHole:
    """S: structured chunk saying `length` bytes at `offset` read as zeros."""

    cookie: int
    offset: int
    length: int
    done: bool = True


@dataclass(slots=True)
class ErrorChunk:
    """S: structured error chunk (ERROR, or ERROR_OFFSET when `offset` is set)."""

    cookie: int
    error: int
    message: str = ""
    offset: int | None = None
    done: bool = True


@dataclass(slots=True)
class NoneChunk:
    """S: the empty final chunk of a structured reply."""

    cookie: int


@dataclass(slots=True)
class ConnectionClosed:
    """The peer closed its side of the connection (end of file).

    `truncated` counts bytes of an incomplete message that were left over.
    """

    truncated: int = 0


def cut_short(truncated: int) -> str:
    """What a server logs of a peer that closed with a message unfinished: not an attack
    or a fault of ours. Clients do it when they give up on a request (the encryption
    domain's request timeout, or a mirror cutting a lagging driver off: its connection is
    dropped whatever it was sending), or when they die."""
    return (f"closed the connection {truncated} bytes into a message (a request, or a "
            "write's payload) it never finished; that request is not served. A client does "
            "this when it gives up on a request (its timeout, or a mirror cutting a lagging "
            "replica off) or when it dies")


Event = (
    Greeting | ClientFlags | Option | OptionReply | ExportNameReply | Request | SimpleReply
    | OffsetData | OffsetHole | ErrorChunk | NoneChunk | ConnectionClosed
)
# The transmission-phase replies. trustvbd frames them natively (native/src/nbd_server);
# these classes and their encoding are the tests' independent reference for those bytes
# and what they feed the native client.
Reply = SimpleReply | OffsetData | OffsetHole | ErrorChunk | NoneChunk

# A request as the server's native framer hands it out (native/src/nbd_server/):
# (type, flags, cookie, offset, length, data, refusal, piece). `data` is a WRITE's
# payload; `refusal` the (NBD error, message) to answer with instead of serving it;
# `piece`, for a WRITE longer than protocol.REQUEST_PART, which arrives piece by piece
# (never held whole), whether this is the last piece: `offset` and `length` are then
# the piece's, and every piece carries the whole request's refusal.
RequestItem = tuple[int, int, int, int, int, Buffer | None, tuple[int, str] | None, bool | None]


# --- encoding ----------------------------------------------------------------
_DONE = int(p.ReplyFlag.DONE)  # plain int: enum lookups cost ~60 ns per request
_OFFSET_DATA = int(p.ChunkType.OFFSET_DATA)


def _done(flag: bool) -> int:
    return _DONE if flag else 0


def encode_message_text(message: str) -> bytes:
    """UTF-8 text cut to the protocol's 4096-byte string limit."""
    raw = message.encode("utf-8", "replace")
    if len(raw) > p.MAX_STRING:
        raw = raw[: p.MAX_STRING].decode("utf-8", "ignore").encode()
    return raw


def encode_parts(msg: Event, *, no_zeroes: bool = False) -> list[Buffer]:
    """The wire form of `msg` as a list of buffers (header first, payload uncopied)."""
    if isinstance(msg, SimpleReply):
        head = p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, msg.error, msg.cookie)
        return [head, msg.data] if msg.data is not None and len(msg.data) else [head]
    if isinstance(msg, Request):
        head = p.REQUEST.pack(
            p.REQUEST_MAGIC, msg.flags, msg.type, msg.cookie, msg.offset, msg.length
        )
        return [head, msg.data] if msg.data is not None and len(msg.data) else [head]
    if isinstance(msg, OffsetData):
        head = p.CHUNK_HEADER.pack(
            p.STRUCTURED_REPLY_MAGIC, _done(msg.done), _OFFSET_DATA, msg.cookie,
            8 + len(msg.data),
        ) + p.U64.pack(msg.offset)
        return [head, msg.data]
    if isinstance(msg, OffsetHole):
        return [
            p.CHUNK_HEADER.pack(
                p.STRUCTURED_REPLY_MAGIC, _done(msg.done), p.ChunkType.OFFSET_HOLE, msg.cookie,
                p.OFFSET_HOLE.size,
            ) + p.OFFSET_HOLE.pack(msg.offset, msg.length)
        ]
    if isinstance(msg, ErrorChunk):
        text = encode_message_text(msg.message)
        body = p.ERROR_CHUNK.pack(msg.error, len(text)) + text
        chunk_type = p.ChunkType.ERROR
        if msg.offset is not None:
            body += p.U64.pack(msg.offset)
            chunk_type = p.ChunkType.ERROR_OFFSET
        head = p.CHUNK_HEADER.pack(
            p.STRUCTURED_REPLY_MAGIC, _done(msg.done), chunk_type, msg.cookie, len(body)
        )
        return [head + body]
    if isinstance(msg, NoneChunk):
        return [
            p.CHUNK_HEADER.pack(
                p.STRUCTURED_REPLY_MAGIC, p.ReplyFlag.DONE, p.ChunkType.NONE, msg.cookie, 0
            )
        ]
    if isinstance(msg, Option):
        return [p.OPTION_HEADER.pack(p.IHAVEOPT, msg.option, len(msg.data)) + msg.data]
    if isinstance(msg, OptionReply):
        head = p.OPTION_REPLY_HEADER.pack(
            p.OPTION_REPLY_MAGIC, msg.option, msg.reply, len(msg.data)
        )
        return [head + msg.data]
    if isinstance(msg, Greeting):
        return [p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, msg.flags)]
    if isinstance(msg, ClientFlags):
        return [p.CLIENT_FLAGS.pack(msg.flags)]
    if isinstance(msg, ExportNameReply):
        tail = b"" if no_zeroes else bytes(p.EXPORT_NAME_ZEROES)
        return [p.EXPORT_NAME_REPLY.pack(msg.size, msg.flags) + tail]
    raise TypeError(f"{type(msg).__name__} is not an NBD wire message")


# --- option payloads -----------------------------------------------------------
def encode_go(name: str, infos: list[int] | tuple[int, ...] = ()) -> bytes:
    """The payload of NBD_OPT_GO / NBD_OPT_INFO."""
    raw = name.encode()
    return (
        p.U32.pack(len(raw)) + raw + p.U16.pack(len(infos))
        + b"".join(p.U16.pack(i) for i in infos)
    )


def parse_go(data: bytes) -> tuple[str, list[int]]:
    """Parse a GO/INFO payload; ValueError says what is wrong (-> NBD_REP_ERR_INVALID)."""
    name, count, at = _name_and_count(data, "GO/INFO", p.U16)
    rest = data[at:]
    if len(rest) != 2 * count:
        raise ValueError(f"{count} information requests need {2 * count} bytes, got {len(rest)}")
    return name, [p.U16.unpack_from(rest, 2 * i)[0] for i in range(count)]


def _name_and_count(data: bytes, what: str, count: struct.Struct) -> tuple[str, int, int]:
    """An option payload that starts with an export name (32-bit length) and a count:
    (name, count, where what follows begins); ValueError says what is wrong."""
    head = 4 + count.size
    if len(data) < head:
        raise ValueError(f"{what} payload of {len(data)} bytes is shorter than {head}")
    (name_len,) = p.U32.unpack_from(data, 0)
    if name_len > len(data) - head:
        raise ValueError(f"export name length {name_len} overruns the option payload")
    name = decode_name(data[4 : 4 + name_len])
    (n,) = count.unpack_from(data, 4 + name_len)
    return name, n, head + name_len


def decode_name(raw: bytes) -> str:
    """An export name or message from the peer: UTF-8, bounded, no NUL."""
    if len(raw) > p.MAX_STRING:
        raise ValueError(f"string of {len(raw)} bytes exceeds the 4096-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("string is not valid UTF-8") from exc
    if "\x00" in text:
        raise ValueError("string contains a NUL byte")
    return text


def info_export(size: int, flags: int) -> bytes:
    return p.INFO_EXPORT.pack(p.Info.EXPORT, size, flags)


def info_name(name: str) -> bytes:
    return p.U16.pack(p.Info.NAME) + encode_message_text(name)


def info_description(text: str) -> bytes:
    return p.U16.pack(p.Info.DESCRIPTION) + encode_message_text(text)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return p.INFO_BLOCK_SIZE.pack(p.Info.BLOCK_SIZE, minimum, preferred, maximum)


def parse_info(data: bytes) -> tuple[int, object]:
    """Parse an NBD_REP_INFO payload into (info type, value); unknown types give raw bytes.

    EXPORT -> (size, flags); NAME/DESCRIPTION -> str; BLOCK_SIZE -> (min, preferred, max).
    """
    if len(data) < 2:
        raise ValueError("NBD_REP_INFO payload shorter than 2 bytes")
    (kind,) = p.U16.unpack_from(data, 0)
    if kind == p.Info.EXPORT:
        if len(data) != p.INFO_EXPORT.size:
            raise ValueError(f"NBD_INFO_EXPORT of {len(data)} bytes, expected 12")
        _, size, flags = p.INFO_EXPORT.unpack(data)
        return kind, (size, flags)
    if kind == p.Info.BLOCK_SIZE:
        if len(data) != p.INFO_BLOCK_SIZE.size:
            raise ValueError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes, expected 14")
        _, minimum, preferred, maximum = p.INFO_BLOCK_SIZE.unpack(data)
        return kind, (minimum, preferred, maximum)
    if kind in (p.Info.NAME, p.Info.DESCRIPTION):
        return kind, decode_name(data[2:])
    return kind, data[2:]


def encode_server(name: str, description: str = "") -> bytes:
    """The payload of an NBD_REP_SERVER reply (one export of NBD_OPT_LIST)."""
    raw = name.encode()
    return p.U32.pack(len(raw)) + raw + encode_message_text(description)


def parse_server(data: bytes) -> tuple[str, str]:
    if len(data) < 4:
        raise ValueError("NBD_REP_SERVER payload shorter than 4 bytes")
    (name_len,) = p.U32.unpack_from(data, 0)
    if name_len > len(data) - 4:
        raise ValueError(f"export name length {name_len} overruns the reply")
    return decode_name(data[4 : 4 + name_len]), decode_name(data[4 + name_len :])


def parse_meta_context(data: bytes) -> tuple[str, list[str]]:
    """Parse a LIST/SET_META_CONTEXT payload: (export name, queries); ValueError says
    what is wrong (-> NBD_REP_ERR_INVALID)."""
    name, count, at = _name_and_count(data, "META_CONTEXT", p.U32)
    queries: list[str] = []
    for i in range(count):
        if len(data) - at < 4:
            raise ValueError(f"query {i + 1} of {count} is missing from the option payload")
        (n,) = p.U32.unpack_from(data, at)
        if n > len(data) - at - 4:
            raise ValueError(f"query {i + 1} length {n} overruns the option payload")
        queries.append(decode_name(data[at + 4 : at + 4 + n]))
        at += 4 + n
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes follow the last of {count} queries")
    return name, queries


def encode_meta_context(context_id: int, name: str) -> bytes:
    """The payload of an NBD_REP_META_CONTEXT reply."""
    return p.U32.pack(context_id) + name.encode()
