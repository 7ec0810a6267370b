"""A domain's writes to its XenBus `state` keys in the store, off the data path.

The store is where domains publish how their connections stand; it is never in the
way of the data. So writes are queued and sent in order by one task, a caller never
waits for them, and a store that is gone or refuses is logged once, not raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from trustvbd.xenstore.client import XsClient, XsClosed
from trustvbd.xenstore.wire import XsError
from trustvbd.xenstore.xenbus import State

log = logging.getLogger("trustvbd.bus")
MAX_QUEUED = 10_000


class StateWriter:
    def __init__(self, client: XsClient | None) -> None:
        self.client = client
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(MAX_QUEUED)
        self.task = asyncio.get_running_loop().create_task(self._drain()) if client else None
        self.failed = False

    @classmethod
    async def from_fd(cls, fd: int | None) -> StateWriter:
        """Over the connection the launcher handed over; a writer that drops everything without one."""
        client = await XsClient.connect(sock=socket.socket(fileno=fd)) if fd is not None else None
        return cls(client)

    def set_state(self, directory: str, state: State) -> None:
        self.write(f"{directory}/state", str(int(state)))

    def write(self, path: str, value: str) -> None:
        if self.task is None or self.failed:
            return
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
                self._give_up(str(exc) or type(exc).__name__)
            finally:
                self.queue.task_done()

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until what is queued has been written."""
        if self.task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)

    async def close(self) -> None:
        if self.task is None or self.client is None:
            return
        await self.flush()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.client.close()
