"""Coroutines stepped by hand until they first suspend, then finished by a task.

asyncio (before 3.12's eager tasks) runs a new task's first step one loop turn later.
Where that first step is what matters (a request handed to a socket at once, a reply
queued without waiting for the loop), stepping it inline saves the turn; only a
coroutine that really suspends costs a task.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any


@types.coroutine
def resume(coro: Coroutine[Any, Any, None], yielded: Any) -> Generator[Any, Any, None]:
    """Continue, inside a task, a coroutine that was stepped by hand until it suspended."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration:
                return


def start(loop: asyncio.AbstractEventLoop,
          coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coro` now until it suspends, then on in a task (returned); None if it finished.
    An exception of its first step propagates to the caller, as a plain call's would."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(resume(coro, yielded))
