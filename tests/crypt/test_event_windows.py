"""EventWindows: a replica's integrity events, the first at once and the rest as one summary
per window, so that a lying driver cannot flood the audit log (tests/interop/
test_integrity_flood.py drives it with real processes)."""

from __future__ import annotations

import random
from typing import Any

from trustvbd.blocks.integrity import MAX_BLOCKS, EventWindows


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def event(replica: str, blocks: list[int], what: str = "data") -> dict[str, Any]:
    return {"event": "integrity", "what": what, "disk": "d", "replica": replica,
            "blocks": blocks, "message": f"blocks {blocks} of {replica} failed"}


def test_a_flood_is_one_record_per_window_and_the_counts_add_up() -> None:
    clock = Clock()
    w = EventWindows(window=10, clock=clock)
    rng = random.Random(5)
    sent: list[dict[str, Any]] = []
    seen = 0
    for _ in range(5000):  # 50 s of 100 events a second from two liars, two kinds
        clock.now += 0.01
        replica, what = rng.choice(["r1", "r2"]), rng.choice(["data", "leaf table"])
        first = w.add(event(replica, [rng.randrange(8192)], what))
        seen += 1
        if first is not None:
            sent.append(first)
        sent += w.due("d")
    sent += w.due("d", everything=True)
    assert sum(e.get("events", 1) for e in sent) == seen
    # 4 streams: each its first event, then one summary per window of 10 s (5 + the rest)
    assert len(sent) <= 4 * (1 + 5 + 1), len(sent)
    assert {(e["replica"], e["what"]) for e in sent} == {
        (r, k) for r in ("r1", "r2") for k in ("data", "leaf table")}
    summaries = [e for e in sent if "events" in e]
    assert all(e["disk"] == "d" and e["first"] <= e["last"] for e in summaries)
    assert all(str(e["events"]) in e["message"] for e in summaries)


def test_the_summary_lists_the_blocks_and_a_quiet_replica_is_said_at_once_again() -> None:
    clock = Clock()
    w = EventWindows(window=10, clock=clock)
    assert w.add(event("r1", [1])) is not None
    assert w.add(event("r1", [5, 6])) is None and w.add(event("r1", [6, 9])) is None
    assert w.add(event("r2", [3])) is not None  # another replica: its own window
    assert w.due("d") == [] and w.next_due() == 110.0
    clock.now = 110.0
    [summary] = w.due("d")
    assert (summary["replica"], summary["events"], summary["blocks"]) == ("r1", 2, [5, 6, 9])
    assert w.next_due() is None  # nothing held
    clock.now = 121.0  # a window with nothing in it ended: the next event goes at once
    assert w.due("d") == []
    assert w.add(event("r1", [2])) is not None


def test_blocks_beyond_the_bound_are_counted_not_kept() -> None:
    clock = Clock()
    w = EventWindows(window=10, clock=clock)
    w.add(event("r1", [0]))
    w.add(event("r1", list(range(MAX_BLOCKS + 10))))
    [summary] = w.due("d", everything=True)
    assert len(summary["blocks"]) == MAX_BLOCKS and summary["blocks_not_listed"] == 10
