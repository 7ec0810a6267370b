"""One replica of a mirrored disk: its link, its state, and what the set knows of it.

The vocabulary the replica set (replica_set.py), its recovery (replica_recovery.py),
read hedging (read_hedge.py) and scrub (replica_scrub.py) share. The states:

- current:   took every write and commit; may serve reads.
- degraded:  missed writes (the blocks are in its dirty set) or is unreachable;
             receives nothing, serves nothing; reconnected in the background.
- resyncing: receives every new write while its dirty blocks are copied to it
             from a current replica (verified first); at the next commit it
             gets the leaf pages of the blocks it missed (the whole leaf table if
             it was rebuilt) and the superblock, and becomes current.
- failed:    refused (it holds another disk or foreign data): never written; looked
             at again now and then, and rebuilt whole once it is blank.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from trustvbd.blockdev import Backend, Breakable, Submits
from trustvbd.blocks.block_runs import BlockRuns

# Blocks copied per step of a resync, scrub or read-repair (one range lock, one read,
# one write).
COPY_BLOCKS = 256
# A replica cut off for lagging again within LAG_FORGET s of being taken back is slow,
# not broken (replica_recovery.py holds it back longer each time).
LAG_FORGET = 300.0


class State(enum.Enum):
    CURRENT = "current"
    DEGRADED = "degraded"
    RESYNCING = "resyncing"
    FAILED = "failed"


class Verifier(Protocol):
    """What the encryption layer knows about blocks (it holds the leaves and the key)."""

    def bad_blocks(self, first_block: int, ciphertext: memoryview) -> list[int]:
        """Indices of blocks in `ciphertext` that do not verify against their current leaf."""
        ...

    def written(self, block: int) -> bool:
        """Whether the block has ciphertext to copy (a zero leaf needs none)."""
        ...

    def written_ranges(self) -> list[tuple[int, int]]:
        """Block ranges [b0, b1), in order, outside which no block is written (those of the
        leaf pages the tree does not know as empty): what a scrub reads and a rebuild
        copies (never a walk over every block: a 16 TiB disk has 4 billion)."""
        ...

    def first_written(self, b0: int, b1: int) -> tuple[int, int] | None:
        """The first range within [b0, b1) that may hold a written block (of those of
        written_ranges), or None: what a resync skips to over a coarsened run."""
        ...

    def written_since_commit(self) -> list[int]:
        """Blocks written since the last full commit, which a replica that presents the
        current epoch may still lack (FLUSHes between commits sync only trusted state)."""
        ...

    async def altered_pages(self, link: Backend, p0: int, p1: int) -> list[int]:
        """The leaf pages in [p0, p1) that `link` holds otherwise than the trusted tree
        says (read while no commit runs, which could be writing them): what a scrub finds."""
        ...


# Judges a replica that comes back before it may take writes (CryptDisk.admit): returns
# True if it must be rebuilt whole (blank, or older than when it left), False if its
# dirty blocks suffice; raises ReplicaRefusedError if it holds something else.
Admit = Callable[["Replica"], Awaitable[bool]]


class BadBlocks(Exception):
    """An attempt read the range but some blocks failed verification."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__(f"{len(indices)} block(s) failed verification")
        self.indices = indices


@dataclass(eq=False)
class Replica:
    """One replica of the set: its link and what the set knows about it."""

    name: str
    link: Backend
    state: State = State.CURRENT
    dirty: BlockRuns = field(default_factory=BlockRuns)  # data blocks it lacks
    # Blocks written since the last full commit when it was degraded: a new connection to
    # its driver may have lost them (a copy put back), so a reconnect makes them dirty,
    # and its stored map holds them too (after a restart every connection is new).
    since_commit: BlockRuns = field(default_factory=BlockRuns)
    joining: bool = False       # copied up: needs its leaf pages at the next commit
    # How many times it was copied up: a commit lets join only the replicas whose round
    # is the one they had when it began (one degraded and copied up again meanwhile
    # missed some of its writes).
    join_round: int = 0
    # Blocks whose leaves it may hold old (written, discarded or copied while it was not
    # taking commits): their leaf pages go to it in its joining commit, and they stay in
    # its stored map until then. With `whole_table` (rebuilt: stale anywhere) all go.
    leaves_behind: BlockRuns = field(default_factory=BlockRuns)
    whole_table: bool = False
    last_error: str | None = None
    repaired: int = 0           # blocks rewritten by read-repair and scrub
    repairs_unsaid: int = 0     # read-repairs not yet in the log (said once per window)
    repairs_said_at: float | None = None  # monotonic time of the last line saying them
    errors: int = 0
    resync_total: int = 0
    resync_done: int = 0
    resync_started: float = 0.0
    resync_rate: float = 0.0    # blocks per second over the last resync
    # Why its resync waits (no current replica could be read to copy from), or None.
    resync_waiting: str | None = None
    behind_since: int = 0       # the last epoch it took whole (while not current)
    map_saved: bool = False     # its dirty set is in trusted state as it is now
    bringing_back: bool = False
    reading: int = 0            # reads in flight (reads go to the least busy)
    lag_seen: float | None = None  # send time of a request seen lagging by the last watch
    lagged: bool = False        # cut off for lagging; not yet counted in lag_strikes
    lag_strikes: int = 0        # cut-offs for lagging, each soon after it was taken back
    lag_cutoffs: int = 0        # times it was cut off for lagging behind its peers, in all
    taken_back_at: float = -LAG_FORGET  # monotonic time it last joined the write set
    # Its link as Submits (None: it cannot queue a write without a coroutine), checked once
    # here rather than per batch of writes.
    submits: Submits | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.submits = self.link if isinstance(self.link, Submits) else None

    def cut_off_for_lag(self) -> None:
        """Its connection is dropped for lagging behind a peer (a guest request paid
        replica_lag for it); taken back later, held back if it happens again soon."""
        self.lagged = True
        self.lag_cutoffs += 1

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "state": self.state.value, "last_error": self.last_error,
            "repaired_blocks": self.repaired, "errors": self.errors,
            "dirty_blocks": len(self.dirty), "lag_cutoffs": self.lag_cutoffs,
        }
        if self.state is State.RESYNCING or self.resync_total:
            out["resync"] = {"done": self.resync_done, "total": self.resync_total,
                             "blocks_per_s": round(self.resync_rate, 1)}
            if self.resync_waiting is not None:
                out["resync"]["waiting_for_source"] = self.resync_waiting
        return out


def reads_in_flight(r: Replica) -> int:
    """Sort key: the least busy replica first."""
    return r.reading


def broken_link(link: Backend) -> bool:
    """Whether `link` is a connection that says it broke."""
    return isinstance(link, Breakable) and bool(link.broken)
