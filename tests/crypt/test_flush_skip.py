"""A replica link sends a FLUSH only when there is something to flush (reconnect.py).

NBD's FUA makes a write durable before it is answered, so a FLUSH after nothing but FUA
writes need not reach the driver. Each test drives a real NBD server over a Unix socket
through NbdClient and ReplicaLink, and counts the FLUSH requests that arrive; the crash
and power-cut tests (test_crash.py, tests/durability) run their replicas behind the same
link and show that what a skipped FLUSH acknowledged survives.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from tests.crypt.helpers import BS, run
from tests.nbd.helpers import ServerThread
from tests.nbd.test_server_clients import ScriptedBackend
from trustvbd.blockdev import Backend, BlockError
from trustvbd.blocks.reconnect import ReplicaLink
from trustvbd.nbd.client import NbdClient
from trustvbd.nbd.exports import Export, StaticExports

MiB = 1 << 20


class Driver(ScriptedBackend):
    """Counts FLUSH requests; fails the next one when told to."""

    def __init__(self) -> None:
        super().__init__(MiB)
        self.fail_flush = False

    @property
    def flushes(self) -> int:
        return sum(1 for entry in self.log if entry == ("flush",))

    async def flush(self) -> None:
        if self.fail_flush:
            self.fail_flush = False
            raise BlockError(errno.EIO, "injected flush failure")
        await super().flush()


def serve(short_tmp: Path) -> tuple[Driver, ServerThread]:
    driver = Driver()
    return driver, ServerThread(StaticExports([Export("", driver)]), short_tmp / "d.sock")


async def link_to(uri: str) -> ReplicaLink:
    async def connect() -> Backend:
        return await NbdClient.open_uri(uri)
    return ReplicaLink(await connect(), "r0", connect)


def test_a_flush_after_only_fua_writes_does_not_reach_the_driver(short_tmp: Path) -> None:
    driver, server = serve(short_tmp)
    with server:
        async def go() -> None:
            link = await link_to(server.uri())
            await link.flush()
            assert driver.flushes == 1  # a new connection: the driver may hold anyone's writes
            await link.pwrite(0, b"a" * BS, fua=True)
            await link.flush()
            await link.flush()
            assert driver.flushes == 1 and link.flushes_skipped == 2
            assert driver.log[-1] == ("write", "0", "True")  # durable by itself
            await link.pwrite(BS, b"b" * BS)  # without FUA: the next flush must go
            await link.flush()
            assert driver.flushes == 2
            await link.zero(2 * BS, BS)  # so must one after a zero or a trim
            await link.flush()
            await link.trim(3 * BS, BS)
            await link.flush()
            await link.zero(4 * BS, BS, fua=True)
            await link.flush()
            assert driver.flushes == 4 and link.flushes_skipped == 3
            await link.close()
        run(go())


def test_a_write_still_running_when_a_flush_is_sent_is_flushed_by_the_next(
        short_tmp: Path) -> None:
    """The FLUSH sent while a write runs may not cover it (this server's does, as its FLUSH
    waits for writes received before it; not every driver's): the one after must go too."""
    driver, server = serve(short_tmp)
    with server:
        async def go() -> None:
            link = await link_to(server.uri())
            await link.flush()
            driver.write_delay = 0.2
            write = asyncio.ensure_future(link.pwrite(0, b"a" * BS))
            await asyncio.sleep(0.05)
            await link.flush()  # sent: a write without FUA is running
            assert driver.flushes == 2
            await write
            await link.flush()
            assert driver.flushes == 3
            await link.flush()  # and now nothing is left to flush
            assert driver.flushes == 3
            await link.close()
        run(go())


def test_after_a_failed_flush_or_a_reconnect_the_next_flush_goes(short_tmp: Path) -> None:
    driver, server = serve(short_tmp)
    with server:
        async def go() -> None:
            link = await link_to(server.uri())
            await link.flush()
            await link.pwrite(0, b"a" * BS)
            driver.fail_flush = True
            with pytest.raises(BlockError, match="injected flush failure"):
                await link.flush()
            await link.flush()  # the write is still not known durable
            assert driver.flushes == 2
            await link.flush()
            assert driver.flushes == 2
            await link.reconnect_once()  # a new connection, perhaps to a restarted driver
            await link.flush()
            assert driver.flushes == 3
            await link.close()
        run(go())
