"""NBD wire constants, struct layouts, limits and error-number mapping.

Everything here is data: no state, no I/O. Names follow the NBD protocol
document (doc/proto.md of NetworkBlockDevice/nbd) without the NBD_ prefix.
All integers on the wire are big-endian.
"""

from __future__ import annotations

import errno
import struct
from enum import IntEnum, IntFlag

# --- magic numbers -------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- struct layouts (big-endian) -----------------------------------------
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zero bytes)
EXPORT_NAME_ZEROES = 124
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")  # info type, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # info type, minimum, preferred, maximum
ERROR_CHUNK = struct.Struct(">IH")  # error, message length
OFFSET_HOLE = struct.Struct(">QI")  # offset, hole size

# --- limits --------------------------------------------------------------
# Block sizes we advertise (NBD_INFO_BLOCK_SIZE). Any byte range is served (the
# encryption domain reads, modifies and writes partial blocks), so the minimum is 1;
# 4 KiB costs least. The maximum payload advertised is 64 MiB, what nbdkit accepts
# and what libnbd sends when a server names none; longer requests, up to the 32-bit
# length field (nbd-server serves those), are still served, in parts of REQUEST_PART.
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
ADVERTISED_MAX_PAYLOAD = 64 * 1024 * 1024
MAX_PAYLOAD = 32 * 1024 * 1024  # the spec's portable maximum payload (2^25): what our client sends
REQUEST_PART = MAX_PAYLOAD  # the most one server-side backend call handles (bounds memory)
# Longest option payload (server side) or option reply payload (client side)
# we accept; longer means a hostile or broken peer and the connection is dropped.
MAX_OPTION_LENGTH = 64 * 1024
MAX_STRING = 4096  # the spec's hard limit for names and messages
MAX_EXPORT_SIZE = 2**63 - 1  # offsets are used as signed 64-bit by most peers


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11
    TRUSTVBD_RING = 0x74760001  # trustvbd's own: docs/driver-ring.md


REP_ERROR_BIT = 1 << 31


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    TRUSTVBD_RING_SEND = 0x74760001  # trustvbd's own: "send the ring's descriptor now"
    ERR_UNSUP = REP_ERROR_BIT + 1
    ERR_POLICY = REP_ERROR_BIT + 2
    ERR_INVALID = REP_ERROR_BIT + 3
    ERR_PLATFORM = REP_ERROR_BIT + 4
    ERR_TLS_REQD = REP_ERROR_BIT + 5
    ERR_UNKNOWN = REP_ERROR_BIT + 6
    ERR_SHUTDOWN = REP_ERROR_BIT + 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT + 8
    ERR_TOO_BIG = REP_ERROR_BIT + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8
    TRUSTVBD_RING_WRITE = 0x7476  # trustvbd's own: a WRITE from the agreed ring


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(IntFlag):
    DONE = 1 << 0


class ChunkType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


CHUNK_ERROR_BIT = 1 << 15


class NbdErr(IntEnum):
    """The only error values the protocol allows on the wire."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# Host errno -> NBD error. Anything not listed is reported as EIO.
_TO_NBD = {
    errno.EPERM: NbdErr.EPERM,
    errno.EACCES: NbdErr.EPERM,
    errno.EROFS: NbdErr.EPERM,
    errno.EIO: NbdErr.EIO,
    errno.ENOMEM: NbdErr.ENOMEM,
    errno.EINVAL: NbdErr.EINVAL,
    errno.ENOSPC: NbdErr.ENOSPC,
    errno.EDQUOT: NbdErr.ENOSPC,  # the spec asks for EDQUOT and EFBIG -> ENOSPC
    errno.EFBIG: NbdErr.ENOSPC,
    errno.EOVERFLOW: NbdErr.EOVERFLOW,
    errno.ENOTSUP: NbdErr.ENOTSUP,
    errno.EOPNOTSUPP: NbdErr.ENOTSUP,
    errno.ESHUTDOWN: NbdErr.ESHUTDOWN,
}

# NBD error -> host errno, for the client. NBD values were chosen to equal
# Linux errno values, but we map explicitly so a hostile server cannot make us
# raise an arbitrary errno: unknown values become EIO.
_FROM_NBD = {
    NbdErr.EPERM: errno.EPERM,
    NbdErr.EIO: errno.EIO,
    NbdErr.ENOMEM: errno.ENOMEM,
    NbdErr.EINVAL: errno.EINVAL,
    NbdErr.ENOSPC: errno.ENOSPC,
    NbdErr.EOVERFLOW: errno.EOVERFLOW,
    NbdErr.ENOTSUP: errno.ENOTSUP,
    NbdErr.ESHUTDOWN: errno.ESHUTDOWN,
}


def errno_to_nbd(err: int, *, fast_zero: bool = False) -> NbdErr:
    """Map a backend's errno to the NBD error sent to the client.

    The spec allows ENOTSUP only as the answer to a WRITE_ZEROES with
    FAST_ZERO ("not fast, do it another way"); anywhere else it becomes EINVAL.
    """
    nbd = _TO_NBD.get(err, NbdErr.EIO)
    if nbd is NbdErr.ENOTSUP and not fast_zero:
        return NbdErr.EINVAL
    return nbd


def nbd_to_errno(value: int) -> int:
    """Map an NBD error from a server to a host errno (unknown values: EIO)."""
    try:
        return _FROM_NBD[NbdErr(value)]
    except ValueError:
        return errno.EIO


def name_of(enum: type[IntEnum], value: int) -> str:
    """A printable name for a protocol number, also for values we do not know."""
    try:
        return enum(value).name
    except ValueError:
        return f"{enum.__name__.upper()}_{value:#x}"


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be dropped.

    Raised by the sans-I/O core for anything received that cannot be answered
    with an error reply (bad magic, impossible lengths, unknown cookies, ...).
    """


class LocalProtocolError(Exception):
    """We tried to send something the protocol does not allow in this state (a bug)."""
