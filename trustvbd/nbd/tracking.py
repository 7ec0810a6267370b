"""Client-side bookkeeping of requests in flight, and structured-read coverage checks.

A hostile server may send read data in any number of chunks, in any order.
`InFlight.claim()` accepts a chunk only if it lies inside the request and
overlaps nothing received before, so a reply can never write outside the
buffer the client allocated for it, nor describe a byte twice. Claimed ranges
are kept merged; a reply fragmented into more than MAX_FRAGMENTS separate
pieces is refused, which bounds the bookkeeping memory too.
"""

from __future__ import annotations

import bisect

from trustvbd.nbd import protocol as p

MAX_FRAGMENTS = 4096
_READ = int(p.Cmd.READ)  # plain int: an enum lookup per request costs ~60 ns


class InFlight:
    """One request awaiting its reply."""

    __slots__ = (
        "buffer", "cookie", "covered_bytes", "ends", "error", "length", "message", "offset",
        "starts", "type", "view", "zeroed",
    )

    def __init__(self, cookie: int, type: int, offset: int, length: int,
                 into: memoryview | None = None) -> None:
        self.cookie = cookie
        self.type = type
        self.offset = offset
        self.length = length
        # Reads get their buffer up front: replies are received straight into it.
        self.buffer: bytearray | memoryview | None = None
        self.view: memoryview | None = None
        self.zeroed = into is None
        if into is not None:
            self.buffer = self.view = into.cast("B")
        elif type == _READ:
            self.buffer = bytearray(length)
            self.view = memoryview(self.buffer)
        self.starts: list[int] = []  # merged, sorted claimed ranges [start, end)
        self.ends: list[int] = []
        self.covered_bytes = 0
        self.error = 0
        self.message = ""

    def claim(self, offset: int, length: int) -> int:
        """Record that a chunk describes [offset, offset+length); return its buffer position."""
        at = offset - self.offset
        end = at + length
        if at < 0 or length <= 0 or end > self.length:
            raise p.ProtocolError(
                f"chunk [{offset}, {offset + length}) lies outside the request "
                f"[{self.offset}, {self.offset + self.length})"
            )
        starts, ends = self.starts, self.ends
        i = bisect.bisect_right(starts, at)
        if (i > 0 and ends[i - 1] > at) or (i < len(starts) and starts[i] < end):
            raise p.ProtocolError(f"chunk [{offset}, {offset + length}) overlaps an earlier chunk")
        join_left = i > 0 and ends[i - 1] == at
        join_right = i < len(starts) and starts[i] == end
        if join_left and join_right:
            ends[i - 1] = ends[i]
            del starts[i], ends[i]
        elif join_left:
            ends[i - 1] = end
        elif join_right:
            starts[i] = at
        else:
            starts.insert(i, at)
            ends.insert(i, end)
            if len(starts) > MAX_FRAGMENTS:
                raise p.ProtocolError(
                    f"read reply fragmented into more than {MAX_FRAGMENTS} pieces"
                )
        self.covered_bytes += length
        return at

    def fail(self, error: int, message: str) -> None:
        """Note an error chunk; the first error is the one reported."""
        if not self.error:
            self.error = error
            self.message = message


class InFlightTable:
    """Cookie -> InFlight, in the order requests were sent (oldest first)."""

    def __init__(self) -> None:
        self._by_cookie: dict[int, InFlight] = {}

    def add(self, cookie: int, type: int, offset: int, length: int,
            into: memoryview | None = None) -> InFlight:
        req = InFlight(cookie, type, offset, length, into)
        self._by_cookie[cookie] = req
        return req

    def get(self, cookie: int) -> InFlight | None:
        return self._by_cookie.get(cookie)

    def remove(self, cookie: int) -> None:
        del self._by_cookie[cookie]

    def __contains__(self, cookie: int) -> bool:
        return cookie in self._by_cookie

    def __len__(self) -> int:
        return len(self._by_cookie)

    def cookies(self) -> list[int]:
        return list(self._by_cookie)
