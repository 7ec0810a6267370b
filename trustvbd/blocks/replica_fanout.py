"""A write fanned out to a replica set's writers at once, and each writer's outcome told.

ReplicaSet (replica_set.py) decides who writes and what an outcome means (degraded,
revived, failed); this is how the writes reach every writer together: a write a link
queues at once (Submits) costs a future, whose outcome the link is then told
(`write_ended`), as its own pwrite would have recorded it; any other goes by pwrite in a
task (`each`, for ReplicaSet.pwrite; `FanOut`, by callbacks, for ReplicaSet.submit_runs).
"""

from __future__ import annotations

import asyncio
import errno
import functools
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from trustvbd.blockdev import Backend, BlockError, Buffer, Submits
from trustvbd.blocks.replica import Replica
from trustvbd.running_loop import RunningLoop

# Queues a replica's write without a coroutine (Submits); None: it takes the coroutine.
Submit = Callable[[Replica], "asyncio.Future[list[BlockError | None]] | None"]
# ReplicaSet._outcome: a fan-out that failed on some targets, settled; None if it stands.
Outcome = Callable[[list[Replica], list[tuple[Replica, Exception]], Callable[[], Iterable[int]], str],
                   Exception | None]


async def pwrites(link: Backend, writes: list[tuple[int, Buffer]], fua: bool
                  ) -> list[Exception | None]:
    """A writer's part of submitted writes that its link could not queue: each by pwrite,
    all at once, their outcomes in order."""
    got = await asyncio.gather(*(link.pwrite(offset, data, fua) for offset, data in writes),
                               return_exceptions=True)
    for outcome in got:
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome  # cancelled: the domain is stopping
    return [outcome if isinstance(outcome, Exception) else None for outcome in got]


def outcomes_of(future: asyncio.Future[Any], count: int) -> list[Exception | None] | None:
    """Each submitted write's outcome (None: it went through), or None if cancelled."""
    if future.cancelled():
        return None
    exc = future.exception()
    if exc is None:
        return list(future.result())
    error = exc if isinstance(exc, Exception) else BlockError(errno.EIO, repr(exc))
    return [error] * count


def tell_link(link: Submits, outcomes: list[Exception | None]) -> None:
    """What the link would have recorded of each pwrite, once per batch: a success if any
    went through, then the first failure (so a full driver stays said full)."""
    failed = next((error for error in outcomes if error is not None), None)
    if failed is None or None in outcomes:
        link.write_ended(None)
    if failed is not None:
        link.write_ended(failed)


def single_ended(link: Submits, ended: Callable[[list[bool]], None], count: int,
                  future: asyncio.Future[list[BlockError | None]]) -> None:
    """A single replica's writes submitted with `retried`: only a success is the link's
    to hear of (the caller sends a failed one again through pwrite)."""
    outcomes = outcomes_of(future, count)
    if outcomes is None:
        ended([False] * count)
        return
    took = outcomes.count(None)
    if took:
        link.write_ended(None)
    ended([True] * count if took == count else [error is None for error in outcomes])


class FanOut:
    """Mirrored writes submitted to every writer (ReplicaSet.submit_runs): what `each` and
    ReplicaSet._all do for pwrite, by callbacks, once the last writer answered, for each
    write."""

    __slots__ = ("blocks", "cancelled", "ended", "failed", "left", "outcome", "targets")

    def __init__(self, outcome: Outcome, targets: list[Replica], blocks: list[range],
                 ended: Callable[[list[bool]], None]) -> None:
        self.outcome, self.targets, self.blocks, self.ended = outcome, targets, blocks, ended
        self.left = len(targets)
        self.failed: list[list[tuple[Replica, Exception]]] | None = None
        self.cancelled = False

    def answered(self, r: Replica, submitted: bool, future: asyncio.Future[Any]) -> None:
        count = len(self.blocks)
        outcomes = (future.result() if not future.cancelled() and future.exception() is None
                    else outcomes_of(future, count))  # (each write's, read only: not copied)
        went = False  # every write went through
        if outcomes is None:  # the domain is stopping: nobody is degraded for it
            self.cancelled = True
        elif not (went := outcomes.count(None) == count):
            failed = self.failed
            if failed is None:
                failed = self.failed = [[] for _ in range(count)]
            for i, error in enumerate(outcomes):
                if error is not None:
                    failed[i].append((r, error))
        link = r.submits
        if submitted and link is not None and outcomes is not None and not self.cancelled:
            if went:  # (what tell_link says of it)
                link.write_ended(None)
            else:
                tell_link(link, outcomes)
        self.left -= 1
        if self.left:
            return
        if self.cancelled:
            self.ended([False] * count)
        elif self.failed is None:
            self.ended([True] * count)
        else:  # (one that failed is sent once more the general way, ReplicaSet._all)
            self.ended([not lost or self.outcome(
                self.targets, lost, functools.partial(_listed, blocks), "write") is None
                for lost, blocks in zip(self.failed, self.blocks, strict=True)])


def _listed(blocks: range) -> range:
    return blocks


async def each(op: Callable[[Replica], Coroutine[Any, Any, None]], targets: list[Replica],
                loop: RunningLoop, submit: Submit | None = None) -> list[tuple[Replica, Exception]]:
    """`op` on every target at once; the targets whose op failed, with what it raised.

    As asyncio.gather with return_exceptions, for less: it runs once per mirrored write.
    A write that a target's link queues at once (`submit`, Submits) costs a future, whose
    outcome the link is then told (`write_ended`); otherwise the first target's op runs in
    the caller's own task and each other one in a task. All their requests are queued in
    this turn of the loop or the next, and each replica's leave in one send per turn. A
    cancelled caller (or op) cancels every op, waits for those in tasks to stop and raises
    CancelledError (a submitted request is on the wire already: its answer is dropped)."""
    inline: Replica | None = None
    started: list[tuple[Replica, asyncio.Future[Any], bool]] = []  # (target, op, submitted)
    for r in targets:
        future = submit(r) if submit is not None else None
        if future is not None:
            started.append((r, future, True))
        elif inline is None and not started:
            inline = r
        else:  # (the loop looked up once: asyncio.get_running_loop is a getpid in 3.11)
            started.append((r, loop().create_task(op(r)), False))
    failed: list[tuple[Replica, Exception]] = []
    try:
        if inline is not None:
            try:
                await op(inline)
            except Exception as exc:
                failed.append((inline, exc))
        for r, future, submitted in started:
            error: Exception | None = None
            try:
                got = await future
            except Exception as exc:
                error = exc
            else:
                if submitted:  # a one-write submit_writes: its outcome
                    error = got[0]
            if error is not None:
                failed.append((r, error))
            if submitted and (submits := r.submits) is not None:  # (submitted: it is)
                submits.write_ended(error)
    except asyncio.CancelledError:
        for _, future, _ in started:
            future.cancel()
        if started:
            await asyncio.wait([future for _, future, _ in started])
        raise
    return failed
