"""Read replies the server sends without copying them first: FileRange (trustvbd/blockdev.py).

A backend that serves file ranges (the driver's FileBackend) answers a big READ with
bytes that sit in a file, sent with os.sendfile so they go from the page cache to
the socket without passing through Python (much less CPU than pread + send; figures
in bench/README.md).

They are written straight to the socket, and only while the transport holds nothing
unsent, so replies stay in order. The unsent end of the part the socket stopped in is
read and queued on the transport; later replies wait in the connection until the
transport has drained.
"""

from __future__ import annotations

import os

from trustvbd.blockdev import Buffer, FileRange

IOV_MAX = 1024  # Linux's limit on buffers per writev
# Smaller reads are copied and batched with other replies into one writev: for
# them sendfile's own system calls cost more than the copy (4 KiB random reads
# straight from the driver: ~120k IOPS copied, ~93k by sendfile).
SENDFILE_MIN = 64 * 1024


OutPart = Buffer | FileRange


def materialize(parts: list[OutPart]) -> list[Buffer]:
    """`parts` as plain buffers: file ranges read. Raises OSError on a read error."""
    return [part.read() if type(part) is FileRange else part for part in parts]  # type: ignore[misc]


def _sendfile(sock_fd: int, part: FileRange) -> int:
    """Send as much of `part` as the socket takes without blocking; return the count."""
    sent = 0
    while sent < part.length:
        try:
            n = os.sendfile(sock_fd, part.fd, part.offset + sent, part.length - sent)
        except BlockingIOError:
            break
        except OSError:
            break  # a broken socket shows in the transport; a bad file in part.read()
        if n == 0:
            break  # end of a shrunk file: part.read() pads with zeros
        sent += n
    return sent


def send_now(sock_fd: int, parts: list[OutPart]) -> tuple[list[Buffer], list[OutPart]]:
    """Write `parts` in order straight to the non-blocking socket until it would block.

    Returns (unsent, later): the unsent end of the part the socket stopped in, as
    plain bytes for the transport, and the parts after it, untouched. Both are empty
    when everything went. Raises OSError if the unsent end of a file range cannot be
    read: its header is on the wire, so the caller has to drop the connection.
    """
    i = 0
    while i < len(parts):
        part = parts[i]
        if type(part) is FileRange:
            sent = _sendfile(sock_fd, part)
            if sent < part.length:
                return [part.read(sent)], parts[i + 1:]
            i += 1
            continue
        j = i
        while j < len(parts) and type(parts[j]) is not FileRange and j - i < IOV_MAX:
            j += 1
        run: list[Buffer] = parts[i:j]  # type: ignore[assignment]
        try:
            written = os.writev(sock_fd, run)
        except BlockingIOError:
            written = 0
        except OSError:
            written = 0  # the transport reports the broken socket when it writes the rest
        for k, buf in enumerate(run):
            size = len(buf)
            if written < size:
                first = memoryview(buf)[written:] if written else buf
                return [first], parts[i + k + 1:]
            written -= size
        i = j
    return [], []
