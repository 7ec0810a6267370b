"""What the encryption layer reports when a replica fails verification.

`IntegrityError` is the error a request gets; `IntegrityEvents` counts each
detection, logs it and hands it to the domain (which audits it).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable

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
    """The replica holds data that is not this disk's (another disk's, or not ours)."""


class IntegrityEvents:
    """Counts, logs and forwards integrity events of one disk."""

    def __init__(self, disk: str, sink: EventSink | None) -> None:
        self.disk = disk
        self._sink = sink
        self.count = 0

    def report(self, what: str, replica: str, blocks: list[int], message: str) -> None:
        self.count += 1
        log.error("integrity: %s", message)
        if self._sink is None:
            return
        event = {"event": "integrity", "what": what, "disk": self.disk, "replica": replica,
                 "blocks": blocks, "message": message}
        try:
            self._sink(event)
        except Exception:  # a broken observer must not break the data path
            log.exception("integrity event callback failed")
