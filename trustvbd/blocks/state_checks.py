"""What every file of the trusted state directory shares: the error for one that is
missing, corrupt or behind, and the CRC-32 that detects a torn or rotten one."""

from __future__ import annotations

import struct


class TrustedStateError(Exception):
    """The trusted state directory is missing, corrupt, or behind a replica."""


def crc_at(raw: bytes | bytearray | memoryview, offset: int) -> int:
    """The CRC-32 stored big-endian at `offset` (checksums guard against torn or
    rotten files in trusted state, not against an adversary)."""
    return int(struct.unpack_from(">I", raw, offset)[0])
