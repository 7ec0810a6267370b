"""The XenStore wire format: message types, error names, limits, and the 16-byte header.

Everything here follows Xen's public header `io/xs_wire.h` and `docs/misc/xenstore.txt`.
Each message is a `struct xsd_sockmsg` (type, req_id, tx_id, len: four little-endian
u32s, as the socket transport sends the host's native order on x86) followed by `len`
bytes of payload, usually NUL-terminated strings. No I/O here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

HEADER = struct.Struct("<IIII")  # type, req_id, tx_id, len

PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX: longer is a protocol violation (disconnect)
ABS_PATH_MAX = 3072  # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048  # XENSTORE_REL_PATH_MAX


class Op(IntEnum):
    """enum xsd_sockmsg_type. 20 was XS_RESTRICT, since removed from Xen."""

    CONTROL = 0  # formerly XS_DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    INVALID = 0xFFFF


XS_DEBUG = Op.CONTROL

# The errno names xs_wire.h lists (struct xsd_errors); they travel as strings.
ERRORS = frozenset({"EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
                    "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG"})


class XsError(Exception):
    """A request failed: the reply is an ERROR message carrying `code` (an xs_wire.h name)."""

    def __init__(self, code: str, detail: str = "") -> None:
        assert code in ERRORS, code
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code, self.detail = code, detail


class ProtocolViolation(Exception):
    """The peer broke the framing (e.g. len > XENSTORE_PAYLOAD_MAX): xenstored drops it."""


@dataclass(frozen=True)
class Message:
    op: int  # an Op value, or anything a hostile peer sent
    req_id: int
    tx_id: int
    payload: bytes

    def strings(self) -> list[bytes]:
        """The NUL-terminated strings of the payload; EINVAL if the last one is unterminated."""
        if not self.payload.endswith(b"\0"):
            raise XsError("EINVAL", f"{op_name(self.op)} payload must end in a NUL byte")
        return self.payload[:-1].split(b"\0")


def op_name(op: int) -> str:
    try:
        return f"XS_{Op(op).name}"
    except ValueError:
        return f"type {op}"


def encode(msg: Message) -> bytes:
    if len(msg.payload) > PAYLOAD_MAX:
        raise ValueError(f"payload of {len(msg.payload)} bytes exceeds XENSTORE_PAYLOAD_MAX")
    return HEADER.pack(msg.op, msg.req_id, msg.tx_id, len(msg.payload)) + msg.payload


def reply(request: Message, payload: bytes) -> Message:
    return Message(request.op, request.req_id, request.tx_id, payload)


def error_reply(request: Message, code: str) -> Message:
    return Message(Op.ERROR, request.req_id, request.tx_id, code.encode() + b"\0")


def watch_event(path: str, token: bytes) -> Message:
    return Message(Op.WATCH_EVENT, 0, 0, path.encode() + b"\0" + token + b"\0")


class Decoder:
    """Bytes in, whole messages out. A header announcing more than PAYLOAD_MAX is fatal."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_message(self) -> Message | None:
        if len(self._buffer) < HEADER.size:
            return None
        op, req_id, tx_id, length = HEADER.unpack_from(self._buffer)
        if length > PAYLOAD_MAX:
            raise ProtocolViolation(f"message announces {length} payload bytes;"
                                    f" XENSTORE_PAYLOAD_MAX is {PAYLOAD_MAX}")
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size:end])
        del self._buffer[:end]
        return Message(op, req_id, tx_id, payload)

    @property
    def pending(self) -> int:
        return len(self._buffer)
