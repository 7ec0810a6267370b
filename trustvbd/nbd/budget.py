"""How much memory one guest's connections may hold together, and the rate of its decisions.

`MemoryBudget`: every connection of a guest charges what it holds (payload being
received, requests in flight, replies queued or in the transport). While the sum is
at `limit`, every one of the guest's connections stops reading new requests; those
in the middle of receiving a payload finish it (its memory is already counted),
so nothing deadlocks. Reading resumes below three quarters of the limit. A guest
that never reads its replies thus holds at most its own budget (docs/limits.md).

`DecisionRate`: a token bucket per guest for the handshake options that ask the
access-control domain (GO, INFO, EXPORT_NAME): past it, that guest's own
handshakes wait; other guests' decisions do not queue behind them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class BudgetMember(Protocol):
    def budget_changed(self) -> None:
        """The budget went over its limit or came back under: re-check reading."""
        ...


class MemoryBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.low = limit * 3 // 4
        self.used = 0
        self.peak = 0
        self.over = False
        self._members: set[BudgetMember] = set()

    def join(self, member: BudgetMember) -> None:
        self._members.add(member)

    def leave(self, member: BudgetMember) -> None:
        self._members.discard(member)

    def adjust(self, delta: int) -> None:
        self.used += delta
        if self.used > self.peak:
            self.peak = self.used
        over = self.used >= self.limit if not self.over else self.used >= self.low
        if over != self.over:
            self.over = over
            loop = asyncio.get_running_loop()
            for member in list(self._members):
                loop.call_soon(member.budget_changed)


class DecisionRate:
    def __init__(self, per_second: float, burst: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_second
        self.burst = float(burst if burst is not None else max(1, int(per_second * 2)))
        self.tokens = self.burst
        self.clock = clock
        self._last = clock()
        self.waited = 0  # times a caller had to wait (for status and tests)

    async def take(self) -> None:
        """Wait until this guest may ask for one more decision."""
        first = True
        while True:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
            self._last = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            if first:
                self.waited += 1
                first = False
            await asyncio.sleep((1 - self.tokens) / self.rate)
