"""Lines that anyone reaching a guest's port can cause once per connection (a handshake
given up, refused, timed out), said once per window: the first of each kind at once, the
rest counted and said in one line per kind when the window ends. A flood of connections
then costs the trusted domain's log a few lines per 10 s, not one per connection.
"""

from __future__ import annotations

import asyncio
import logging

WINDOW = 10.0
MAX_KINDS = 32  # kinds said at once per window; more are counted together as "other"


class LogWindow:
    def __init__(self, log: logging.Logger, where: str, window: float = WINDOW) -> None:
        self.log, self.where, self.window = log, where, window
        self.counts: dict[str, list[int]] = {}  # kind -> [level, repeats this window]
        self._timer: asyncio.TimerHandle | None = None

    def say(self, level: int, kind: str, text: str) -> None:
        """Log `text` if it is the first of `kind` in this window; else count it."""
        if kind not in self.counts and len(self.counts) >= MAX_KINDS:
            kind = "other"
        if kind in self.counts:
            self.counts[kind][1] += 1
            return
        self.log.log(level, "%s", text)
        self.counts[kind] = [level, 0]
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window, self.flush)

    def flush(self, again: bool = True) -> None:
        """The window's counts, one line per kind that repeated; such kinds are counted, not
        said at once, in the next window too (a flood that goes on costs one line each)."""
        self._timer = None
        repeated = {kind: c for kind, c in self.counts.items() if c[1]}
        for kind, (level, n) in repeated.items():
            self.log.log(level, "%s: %d more in the last %.0f s: %s", self.where, n,
                         self.window, kind)
        self.counts = {kind: [c[0], 0] for kind, c in repeated.items()}
        if repeated and again:
            self._timer = asyncio.get_running_loop().call_later(self.window, self.flush)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush(again=False)
