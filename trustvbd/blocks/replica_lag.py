"""Lagging writers cut off, lagging reads hedged: a replica set's watch (ReplicaSet._watch).

A writer that leaves a request unanswered for `lag` seconds while another writer answers
is dropped from the write set (degraded, resynced later) rather than holding the guest's
writes until its request timeout ([limits] replica_lag); reads that waited as long are
hedged (read_hedge.py). Functions of the set, bound in its class body (replica_set.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from trustvbd.blockdev import ReadsNatively, Watched
from trustvbd.blocks.replica import State

if TYPE_CHECKING:
    from trustvbd.blocks.replica_set import ReplicaSet

log = logging.getLogger("trustvbd.blocks.replica_set")


def watch_soon(rs: ReplicaSet) -> None:
    """`watch` in a quarter of `lag` (a fan-out or read started it: ReplicaSet._watch_timer)."""
    if not rs.closed:
        loop = asyncio.get_running_loop()
        rs._watch_timer = loop.call_later(rs.lag / 4, rs._watch)


def watch(rs: ReplicaSet) -> None:
    """Cut off writers that lag: a request unanswered for `lag` s while another writer
    answered since it was sent, at two looks in a row (`lag`/4 apart).

    Their requests then fail, so the fan-out degrades them (with the blocks, as for
    any failed write) and acknowledges the guest; they come back by resync. While every
    writer is slow nobody is cut off, nor a current one while only resyncing ones
    answer: the request timeout decides then. Reads waiting
    `lag` are hedged (read_hedge.py). Runs every quarter of `lag` while requests wait; the
    next fan-out or read starts it again.
    """
    rs._watch_timer = None
    writers = rs._writers
    if rs.closed or len(writers) < 2:
        return
    now = asyncio.get_running_loop().time()
    for hedge in rs._hedges:
        hedge.start(now)
    if len(rs._readers) > 1:
        for r in rs._readers:
            # Native reads (crypt_read.read_route) that waited `lag`: hedged in Python.
            client = r.link.native_client() if isinstance(r.link, ReadsNatively) else None
            if client is not None:
                client.take_lagging(now - rs.lag)
    since = {r: r.link.pending_since() if isinstance(r.link, Watched) else None
             for r in writers}
    lagging = {r for r, t in since.items() if t is not None and now - t >= rs.lag}
    for r in writers:
        t = since[r]
        ahead = None
        if r in lagging:
            assert t is not None
            # A current writer only for another current one: a resyncing one cannot
            # serve in its place, and a write no current replica took fails.
            ahead = next((o for o in writers if o not in lagging and isinstance(o.link, Watched)
                          and o.link.answered_at > t
                          and (o.state is State.CURRENT or r.state is not State.CURRENT)),
                         None)
        if ahead is None:
            r.lag_seen = None
        elif r.lag_seen != t:
            # Seen once: cut off only if it is still behind at the next look, so a
            # replica merely a moment slower than its peers is never dropped.
            r.lag_seen = t
        else:
            assert t is not None and isinstance(r.link, Watched)
            r.lag_seen = None
            r.cut_off_for_lag()
            log.warning("disk %s: replica %s lags (%.1f s without a reply while %s answers):"
                        " dropping it from the write set", rs.disk, r.name, now - t,
                        ahead.name)
            r.link.abandon(f"no reply for {now - t:.1f} s while replica {ahead.name!r} "
                           f"answered (replica_lag {rs.lag:g} s)")
    if rs._hedges or any(t is not None for t in since.values()):
        rs._watch_soon()
