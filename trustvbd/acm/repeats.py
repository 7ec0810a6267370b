"""Repeated identical refusals are counted, not written one by one.

A guest asking the same forbidden thing in a loop must not fill the disk or make
every other guest's decision wait behind an fsync per attempt. The first refusal
of a kind is written as usual; the same refusal again within WINDOW seconds is
only counted; when its window ends, one "repeated" record says how many there
were, the first and the last time. What counts as the same: every field but the
time and the fields named in IGNORED (a refused attachment's id names nothing that
exists; the written record keeps the first one's).

Bounded: at most MAX_KEYS different refusals are tracked at once; past that, a
new one is written as usual (never lost, only not summarised).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

WINDOW = 60.0
MAX_KEYS = 4096
IGNORED = frozenset({"id"})


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass
class _Run:
    kind: str
    fields: dict[str, Any]
    opened: float  # monotonic time of the written record that opened the window
    count: int = 0  # repeats since, not written
    first: str = ""
    last: str = ""


class RepeatCounter:
    def __init__(self, window: float = WINDOW, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.window, self.clock = window, clock
        self._runs: dict[str, _Run] = {}

    def repeat(self, kind: str, fields: dict[str, Any]) -> bool:
        """True: an identical refusal was written less than WINDOW ago; it is counted here
        and must not be written. False: write it (a new window opens)."""
        same = {k: v for k, v in fields.items() if k not in IGNORED}
        key = json.dumps([kind, same], sort_keys=True, default=str)
        now = self.clock()
        run = self._runs.get(key)
        if run is not None and now - run.opened < self.window:
            if run.count == 0:
                run.first = _now_text()
            run.count += 1
            run.last = _now_text()
            return True
        if len(self._runs) < MAX_KEYS or run is not None:
            self._runs[key] = _Run(kind, same, now)
        return False

    def due(self, everything: bool = False) -> list[dict[str, Any]]:
        """Summaries of the windows that have ended (all of them with `everything`, at stop):
        each {"of": kind, "count", "first", "last", **fields}, for a "repeated" record."""
        now, out = self.clock(), []
        for key, run in list(self._runs.items()):
            if everything or now - run.opened >= self.window:
                del self._runs[key]
                if run.count:
                    out.append({"of": run.kind, "count": run.count, "first": run.first,
                                "last": run.last, **run.fields})
        return out
