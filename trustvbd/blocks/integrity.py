"""What the encryption layer reports when a replica fails verification.

`IntegrityError` is the error a request gets; `IntegrityEvents` counts each
detection and hands it to the domain, which audits and logs them coalesced per
replica and window (`EventWindows`): its log says what its audit log says, and a
liar cannot fill either. With no one to hand them to, each is logged.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from trustvbd.blockdev import BlockError

log = logging.getLogger("trustvbd.blocks.crypt")

EventSink = Callable[[dict], None]


class IntegrityError(BlockError):
    """Data or metadata from a replica failed verification (errno EIO)."""

    def __init__(self, message: str, *, disk: str, replica: str,
                 blocks: Iterable[int] = ()) -> None:
        super().__init__(errno.EIO, message)
        self.disk = disk
        self.replica = replica
        self.blocks = list(blocks)


class ReplicaRefusedError(Exception):
    """This replica cannot back this disk; nothing was written to it."""


class StaleReplicaError(ReplicaRefusedError):
    """The replica presents an epoch older than the trusted anchor."""


class ForeignReplicaError(ReplicaRefusedError):
    """The replica holds data that is not this disk's (another disk's, or not ours).
    `other_disk_id`: the id of the trustvbd disk it holds, if it holds one."""

    def __init__(self, message: str, other_disk_id: bytes | None = None) -> None:
        super().__init__(message)
        self.other_disk_id = other_disk_id


# Which disk of this system has this disk id, if the asker can tell (the encryption domain
# can, among its own disks): a refused replica's message names the disk it holds.
NameDisk = Callable[[bytes], "str | None"]


def refusal_text(exc: Exception, name_disk: NameDisk | None) -> str:
    """Why a replica was refused; for one holding another disk of this system, which."""
    text = str(exc)
    if isinstance(exc, ForeignReplicaError) and exc.other_disk_id is not None and name_disk:
        other = name_disk(exc.other_disk_id)
        if other is not None:
            text += f"; the disk it holds is {other!r} of this system"
    return text


class IntegrityEvents:
    """Counts and forwards integrity events of one disk (logs each if there is no sink)."""

    def __init__(self, disk: str, sink: EventSink | None) -> None:
        self.disk = disk
        self._sink = sink
        self.count = 0

    def report(self, what: str, replica: str, blocks: list[int], message: str) -> None:
        self.count += 1
        if self._sink is None:
            log.error("integrity: %s", message)
            return
        event = {"event": "integrity", "what": what, "disk": self.disk, "replica": replica,
                 "blocks": blocks, "message": message}
        try:
            self._sink(event)
        except Exception:  # a broken observer must not break the data path
            log.exception("integrity event callback failed")


WINDOW = 10.0  # seconds an integrity event stream of one replica is counted before it is said
MAX_BLOCKS = 1 << 16  # distinct blocks kept per summary; more are counted, not listed


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass
class _Window:
    opened: float  # monotonic time the window began
    events: int = 0  # held since, not yet said
    blocks: set[int] = field(default_factory=set)
    blocks_not_listed: int = 0
    first: str = ""
    last: str = ""
    message: str = ""


class EventWindows:
    """A replica's integrity events coalesced per window, so that a lying driver cannot make
    the domain send (and the access-control domain fsync and sign) one record per lie.

    Sans-I/O: `add` says whether an event goes out at once, `due` hands out the summaries
    of windows that ended and `next_due` says when the next one ends (the caller's timer).
    Per (replica, what): the first event goes out at once and opens a window; the ones
    within it are counted, and when it ends one summary says how many there were
    (`events`), which blocks (`blocks`), the first and the last time and the last message;
    a window that held any opens the next one at once, so a sustained flood is one record
    per window. Nothing is dropped: the events of the records add up to the events seen
    (an event without `events` counts one). Keys are bounded by the replicas and the kinds
    of event, both fixed by the trusted side.
    """

    def __init__(self, window: float = WINDOW, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.window, self.clock = window, clock
        self._open: dict[tuple[str, str], _Window] = {}

    def add(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """`event` (as IntegrityEvents hands it out) to send now, or None: it is counted."""
        key = (str(event.get("replica")), str(event.get("what")))
        now = self.clock()
        w = self._open.get(key)
        if w is None or (now - w.opened >= self.window and not w.events):
            self._open[key] = _Window(now)
            return event
        if not w.events:
            w.first = _now_text()
        w.events += 1
        w.last = _now_text()
        w.message = str(event.get("message", ""))
        for b in event.get("blocks") or ():
            if len(w.blocks) < MAX_BLOCKS or b in w.blocks:
                w.blocks.add(b)
            else:
                w.blocks_not_listed += 1
        return None

    def due(self, disk: str, everything: bool = False) -> list[dict[str, Any]]:
        """Summaries of the windows that ended (all held ones with `everything`, at stop)."""
        now, out = self.clock(), []
        for (replica, what), w in list(self._open.items()):
            if not (everything or now - w.opened >= self.window):
                continue
            if not w.events:
                del self._open[(replica, what)]
                continue
            summary: dict[str, Any] = {
                "event": "integrity", "what": what, "disk": disk, "replica": replica,
                "events": w.events, "blocks": sorted(w.blocks), "first": w.first,
                "last": w.last,
                "message": (f"{w.events} more integrity event(s) ({what}) from replica "
                            f"{replica!r} of disk {disk!r} from {w.first} to {w.last}; the "
                            f"last: {w.message}")}
            if w.blocks_not_listed:
                summary["blocks_not_listed"] = w.blocks_not_listed
            out.append(summary)
            if everything:
                del self._open[(replica, what)]
            else:  # the flood goes on: its next events are counted too
                self._open[(replica, what)] = _Window(now)
        return out

    def next_due(self) -> float | None:
        """When (on the clock) the next window with held events ends; None if none holds any."""
        ends = [w.opened + self.window for w in self._open.values() if w.events]
        return min(ends) if ends else None
