"""Read hedging: a read one replica leaves unanswered is asked of the next ones.

The replica set's watch (replica_lag.watch, every quarter of `lag`) starts each hedge
once its read has waited `lag`; the hedge that wins drops the silent replica's
connection, and the replica set degrades it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from trustvbd.blockdev import Backend, BlockError, Watched
from trustvbd.blocks.replica import BadBlocks, Replica, State

if TYPE_CHECKING:
    from trustvbd.blocks.replica_set import ReplicaSet

log = logging.getLogger("trustvbd.blocks.replica_set")

T = TypeVar("T")


class ReadHedge(Generic[T]):
    """A read from `slow` that the `others` may serve instead: once it has gone `lag`
    seconds without a reply (seen by replica_lag.watch, every quarter of `lag`), the same
    read is sent to the first of them; each further `lag` without an answer, to the next
    one as well, so two silent replicas out of three cost `2 * lag`, not the request timeout.

    If one of those passes, `slow` lagged on a read another replica served: its connection
    is dropped (`abandon`), which fails the first read at once (the guest waits about `lag`
    per silent replica, not the request timeout) and discards any late reply with the
    socket. If they all fail, the first read decides, as without a hedge. Until then a read
    costs this object and a set entry, not a timer of its own.
    """

    __slots__ = ("asked", "attempt", "by", "others", "result", "rs", "sent", "slow", "tasks",
                 "won")

    def __init__(self, rs: ReplicaSet, slow: Replica, others: list[Replica],
                 attempt: Callable[[Backend], Awaitable[T]], sent: float) -> None:
        self.rs, self.slow, self.others, self.attempt = rs, slow, others, attempt
        self.won = False
        self.by: Replica | None = None  # the one that served it
        self.result: T | None = None
        self.asked = 0  # how many of `others` were asked (or passed over)
        self.tasks: list[asyncio.Task[None]] = []
        self.sent = sent  # the loop's time

    def start(self, now: float) -> None:
        """Ask the next replica, if the read has waited another `lag` since the last one."""
        while (not self.won and not self.rs.closed and self.asked < len(self.others)
               and now - self.sent >= self.rs.lag * (self.asked + 1)):
            by = self.others[self.asked]
            self.asked += 1
            if by.state is State.CURRENT:
                self.tasks.append(asyncio.get_running_loop().create_task(self._run(by)))
                return

    async def _run(self, by: Replica) -> None:
        slow = self.slow
        by.reading += 1
        try:
            result = await self.attempt(by.link)
        except (BadBlocks, BlockError):
            return
        finally:
            by.reading -= 1
        if self.won:
            return
        self.result, self.won, self.by = result, True, by
        slow.cut_off_for_lag()
        waited = asyncio.get_running_loop().time() - self.sent
        log.warning("disk %s: replica %s lags (%.1f s without answering a read that %s "
                    "served): dropping it", self.rs.disk, slow.name, waited, by.name)
        assert isinstance(slow.link, Watched)
        slow.link.abandon(f"no reply to a read for {waited:.1f} s while replica {by.name!r} "
                          f"served it (replica_lag {self.rs.lag:g} s)")

    def stop(self) -> None:
        """The first read is over: hedges still running are not needed."""
        for task in self.tasks:
            if not task.done():
                task.cancel()
