"""A backend that reports failures to each connection (FlushesPerConnection) gets one
FLUSH per connection: every connection's FLUSH goes to the flusher it took at attach."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import nbd

from tests.nbd.helpers import ServerThread
from trustvbd.blockdev import FlushesPerConnection
from trustvbd.blocks.file import MemoryBackend
from trustvbd.nbd.exports import Export, StaticExports


class PerConnection(MemoryBackend):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.taken = 0
        self.flushed: list[int] = []  # which flusher each FLUSH went to

    def flusher(self) -> Callable[[], Awaitable[None]]:
        self.taken += 1
        me = self.taken

        async def flush() -> None:
            self.flushed.append(me)
        return flush

    async def flush(self) -> None:
        raise AssertionError("a connection must flush through its own flusher")


def test_each_connection_flushes_through_its_own_flusher(short_tmp: Path) -> None:
    backend = PerConnection(1 << 20)
    assert isinstance(backend, FlushesPerConnection)
    with ServerThread(StaticExports([Export("", backend)]), short_tmp / "s.sock") as srv:
        first, second = nbd.NBD(), nbd.NBD()
        first.connect_uri(srv.uri())
        second.connect_uri(srv.uri())
        first.flush()
        second.flush()
        first.flush()
        first.shutdown()
        second.shutdown()
    assert backend.taken == 2
    a, b, c = backend.flushed
    assert a == c != b, backend.flushed
