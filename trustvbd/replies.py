"""Replies paired with their requests by id, on every request/reply channel between domains.

A request gets an id never used before on its channel and a future in the table;
a reply names the id it answers and completes that future and no other. Answers
are never paired by order: a caller that is cancelled or times out abandons its
id, and the late reply is dropped (and logged), or handed to the `on_late` of its
request so that what the peer did for nobody is undone. It can never become the
answer to another request. A reply to an id never issued, or answered already, is
a protocol error: the peer is broken or lying, and the channel must be dropped
(`fail_all` then fails every request still waiting).

No I/O here: a channel's reader calls `resolve`, its callers `issue` and `wait`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

log = logging.getLogger("trustvbd.replies")

T = TypeVar("T")
REMEMBER_ABANDONED = 4096  # ids whose late reply is still expected; the oldest are forgotten


class ProtocolError(Exception):
    """The peer answered a request that was never made, or answered one twice."""


def peer_json(data: bytes | str) -> Any:
    """A peer's JSON message. Python's parser raises RecursionError, not ValueError, for
    arrays or objects nested a few thousand deep: said as the ValueError it is, so every
    channel's "bad message" path takes it (descriptors closed, one line, no traceback)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


class PendingReplies(Generic[T]):
    """The requests of one channel still waiting for their reply."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self._last_id = 0
        self._waiting: dict[int, tuple[asyncio.Future[T], Callable[[T], None] | None]] = {}
        self._abandoned: OrderedDict[int, Callable[[T], None] | None] = OrderedDict()
        self._quiet: set[int] = set()  # abandoned on purpose: their late reply is expected

    def __len__(self) -> int:
        return len(self._waiting)

    def issue(self, on_late: Callable[[T], None] | None = None) -> tuple[int, asyncio.Future[T]]:
        """A new request id and the future its reply completes.

        `on_late(reply)` runs if the reply comes after its caller gave up.
        """
        self._last_id += 1
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting[self._last_id] = (future, on_late)
        return self._last_id, future

    async def wait(self, ident: int, future: asyncio.Future[T]) -> T:
        """The reply to request `ident`; if the caller is cancelled, the request is abandoned."""
        try:
            return await future
        except BaseException:
            entry = self._waiting.get(ident)
            if future.done() and not future.cancelled() and future.exception() is None:
                # Answered at the very moment the caller gave up: the answer is late too.
                self._late(ident, future.result(), entry[1] if entry else None)
            else:
                self.abandon(ident)
            raise

    def abandon(self, ident: int, quiet: bool = False) -> None:
        """Nobody waits for `ident` any more; its reply, if it comes, goes to `on_late`."""
        entry = self._waiting.pop(ident, None)
        if entry is None:
            return
        future, on_late = entry
        if not future.done():
            future.cancel()
        self._abandoned[ident] = on_late
        if quiet:
            self._quiet.add(ident)
        while len(self._abandoned) > REMEMBER_ABANDONED:
            old, _ = self._abandoned.popitem(last=False)
            self._quiet.discard(old)

    def resolve(self, ident: object, reply: T) -> None:
        """Hand `reply` to the request `ident`; ProtocolError if no such request was made."""
        if type(ident) is not int:
            raise ProtocolError(f"{self.peer} sent a reply without a request id: {ident!r}")
        entry = self._waiting.pop(ident, None)
        if entry is not None:
            future, on_late = entry
            if future.cancelled():  # the caller is gone, its `wait` not yet run
                self._late(ident, reply, on_late)
            else:
                future.set_result(reply)
            return
        if ident in self._abandoned:
            self._late(ident, reply, self._abandoned.pop(ident))
            return
        raise ProtocolError(f"{self.peer} answered request {ident}, which was never made or"
                            " was answered already")

    def _late(self, ident: int, reply: T, on_late: Callable[[T], None] | None) -> None:
        if ident in self._quiet:
            self._quiet.discard(ident)
        else:
            log.info("late reply from %s to abandoned request %d dropped", self.peer, ident)
        if on_late is not None:
            try:
                on_late(reply)
            except Exception:  # undoing must not break the channel's reader
                log.exception("handling the late reply from %s to request %d failed", self.peer,
                              ident)

    def fail_all(self, exc: BaseException) -> None:
        """The channel is gone: every waiting request fails with `exc`; no reply can come late."""
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(exc)
        self._abandoned.clear()
        self._quiet.clear()
