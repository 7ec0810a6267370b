"""The transmission flags a server advertises for an export (pure).

Requests are checked against them by the native framer (native/src/nbd_server/
checks.rs), with the same rules from the NBD protocol document.
"""

from __future__ import annotations

from trustvbd.blockdev import Capabilities
from trustvbd.nbd import protocol as p

F = p.TransmissionFlag


def export_flags(caps: Capabilities, structured: bool) -> int:
    """Transmission flags advertising exactly what the backend can do."""
    flags = F.HAS_FLAGS
    if caps.read_only:
        flags |= F.READ_ONLY
    else:
        if caps.trim:
            flags |= F.SEND_TRIM
        if caps.zero:
            flags |= F.SEND_WRITE_ZEROES
            if caps.fast_zero:
                flags |= F.SEND_FAST_ZERO
    if caps.flush:
        flags |= F.SEND_FLUSH
    if caps.fua:
        flags |= F.SEND_FUA
    if caps.cache:
        flags |= F.SEND_CACHE
    if caps.multi_conn:
        flags |= F.CAN_MULTI_CONN
    if structured:
        flags |= F.SEND_DF  # every read is answered in one data chunk anyway
    return flags
