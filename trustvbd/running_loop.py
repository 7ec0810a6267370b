"""The running event loop, looked up once per loop rather than once per request."""

from __future__ import annotations

import asyncio


class RunningLoop:
    """Call it for the running loop. asyncio.get_running_loop is a getpid system call in
    Python 3.11: per request on the data path it was more than all its other system calls
    together. A loop that no longer runs (a test's asyncio.run ended) is looked up again."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop
