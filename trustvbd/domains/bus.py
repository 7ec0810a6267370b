"""A domain's writes to its XenBus `state` keys in the store, off the data path.

The store is where domains publish how their connections stand; it is never in the
way of the data. So writes are queued and sent in order by one task, a caller never
waits for them, and a store that refuses is logged, not raised. When the connection
is lost (the store died) the writer asks for a new one (`reconnect`: the launcher
hands it over once the restarted store serves), with back-off, and then writes
every key's latest value again: what changed while the store was down is not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

from trustvbd.xenstore.client import XsClient, XsClosed
from trustvbd.xenstore.wire import XsError
from trustvbd.xenstore.xenbus import State

log = logging.getLogger("trustvbd.bus")
MAX_QUEUED = 10_000
RECONNECT_FIRST, RECONNECT_MAX = 0.2, 5.0  # seconds between asks for a new connection


class NoStore(Exception):
    """Nobody can hand over a connection to the store any more (the launcher is gone)."""


class StateWriter:
    def __init__(self, client: XsClient | None,
                 reconnect: Callable[[], Awaitable[socket.socket]] | None = None,
                 later: bool = False) -> None:
        self.client = client
        self.reconnect = reconnect
        self.latest: dict[str, str] = {}  # every key written, its newest value
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(MAX_QUEUED)
        self.failed = False
        self.closing = False
        self.reconnects = 0
        self.tasks: list[asyncio.Task[None]] = []
        if client is not None:
            loop = asyncio.get_running_loop()
            self.tasks = [loop.create_task(self._drain())]
            self._keep(client)
        elif later and reconnect is not None:  # no connection yet: asked for at once
            loop = asyncio.get_running_loop()
            self.tasks = [loop.create_task(self._drain()), loop.create_task(self._reconnect())]

    @classmethod
    async def from_fd(cls, fd: int | None,
                      reconnect: Callable[[], Awaitable[socket.socket]] | None = None,
                      later: bool = False) -> StateWriter:
        """Over the connection the launcher handed over; without one, a writer that asks for
        one (`later`: the store did not answer in time) or drops everything."""
        client = await XsClient.connect(sock=socket.socket(fileno=fd)) if fd is not None else None
        return cls(client, reconnect, later)

    def set_state(self, directory: str, state: State) -> None:
        self.write(f"{directory}/state", str(int(state)))

    def write(self, path: str, value: str) -> None:
        if not self.tasks or self.failed:
            return
        self.latest[path] = value
        if self.client is None:
            return  # reconnecting: written with the rest once connected
        try:
            self.queue.put_nowait((path, value))
        except asyncio.QueueFull:
            self._give_up(f"more than {MAX_QUEUED} writes queued")

    def _give_up(self, why: str) -> None:
        if not self.failed:
            log.error("store: state keys are no longer updated: %s", why)
        self.failed = True

    async def _drain(self) -> None:
        while True:
            path, value = await self.queue.get()
            try:
                if self.client is not None and not self.failed:
                    await self.client.write(path, value)
            except XsError as exc:
                log.warning("store refused %s = %s: %s", path, value, exc.code)
            except (XsClosed, OSError, TimeoutError) as exc:
                self._lost(str(exc) or type(exc).__name__)
            finally:
                self.queue.task_done()

    def _keep(self, client: XsClient) -> None:
        """Notice at once when the store goes (not only at the next write)."""
        client.on_close(lambda: self._lost("the store closed the connection")
                        if self.client is client else None)

    def _lost(self, why: str) -> None:
        if self.client is None or self.failed or self.closing:
            return
        old, self.client = self.client, None
        self.tasks.append(asyncio.get_running_loop().create_task(old.close()))
        while not self.queue.empty():  # the latest values go again once connected
            self.queue.get_nowait()
            self.queue.task_done()
        if self.reconnect is None:
            self._give_up(why)
            return
        log.warning("store: %s; asking for a new connection", why)
        self.tasks.append(asyncio.get_running_loop().create_task(self._reconnect()))

    async def _reconnect(self) -> None:
        assert self.reconnect is not None
        delay = RECONNECT_FIRST
        while True:
            try:
                client = await XsClient.connect(sock=await self.reconnect())
                break
            except NoStore as exc:
                self._give_up(str(exc))
                return
            except (ConnectionError, OSError, TimeoutError) as exc:
                log.info("store: no connection yet (%s); again in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)
        self.client, self.reconnects = client, self.reconnects + 1
        self._keep(client)
        for path, value in self.latest.items():
            self.queue.put_nowait((path, value))
        log.warning("store: connected again; %d state keys written again", len(self.latest))

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until what is queued has been written."""
        if not self.tasks:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)

    async def close(self) -> None:
        self.closing = True
        if not self.tasks:
            return
        if self.client is not None:
            await self.flush()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.client is not None:
            await self.client.close()
