"""The block-device vocabulary every layer speaks: below both `nbd/` and `blocks/`.

Modelled on nbdkit's plugin/filter split: a `Backend` is anything that stores
bytes at offsets (a file, an NBD server, another layer). Layers (`blocks/`) wrap
backends; the NBD server (`nbd/`) serves one and the NBD client is one.

All offsets and lengths are in bytes. Callers (the NBD server) have already
checked that a request lies inside `size`; a backend may still check again.
Errors are raised as `BlockError` carrying an errno value, which the NBD server
maps to an NBD error code for that one request.

Optional abilities are declared as Protocols below (`ReadsInto`, `ReadsNatively`,
`ServesReadsNatively`, `WritesNatively`, `ServedFromFile`, `HasEpoch`, `Breakable`,
`Reconnectable`, `ReportsAllocation`): a caller asks `isinstance(b, P)`
once, when it composes the stack, and keeps the bound method.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview


class BlockError(Exception):
    """A request failed; `errno` says how (EIO, EINVAL, ENOSPC, EPERM, ENOTSUP, ...)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message

    def __str__(self) -> str:
        return f"{errno.errorcode.get(self.errno, self.errno)}: {self.message}"


class StateWriteFailed(BlockError):
    """A write or sync of the trusted state directory failed (ENOSPC when it is full):
    nothing a replica did. A write behind that fails so never left for the replicas."""


class WritesMayBeLost(BlockError):
    """A FLUSH cannot vouch for writes acknowledged before a driver lost its connection
    (they were not flushed). Raised once; a guest's FLUSH must be the one to see it."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the NBD server advertises exactly these flags."""

    read_only: bool = False
    flush: bool = True
    fua: bool = True
    trim: bool = True
    zero: bool = True
    fast_zero: bool = False
    cache: bool = True
    # True only if a FLUSH on any connection persists writes completed on all
    # connections to the same backend object (true when they share one object).
    multi_conn: bool = True


@runtime_checkable
class Backend(Protocol):
    """An asynchronous block device."""

    @property
    def size(self) -> int: ...

    @property
    def capabilities(self) -> Capabilities: ...

    async def pread(self, offset: int, length: int) -> Buffer: ...

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int, fua: bool = False) -> None: ...

    async def zero(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
        fast: bool = False,
    ) -> None:
        """Write zeros. With `fast`, raise BlockError(ENOTSUP) unless it is cheap."""
        ...

    async def cache(self, offset: int, length: int) -> None: ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------- optional abilities

_PROVIDES: dict[tuple[type, type], bool] = {}


def provides(backend: object, ability: type) -> bool:
    """isinstance(backend, ability) for a runtime_checkable Protocol, remembered per type:
    the check itself walks the Protocol's members every time, too slow for a per-request
    path (bench/README.md has its cost)."""
    key = (type(backend), ability)
    known = _PROVIDES.get(key)
    if known is None:
        known = _PROVIDES[key] = isinstance(backend, ability)
    return known



@runtime_checkable
class FlushesPerConnection(Protocol):
    """A backend whose FLUSH reports some failures once to each connection (a write
    answered before the driver took it, that the driver then failed): `flusher()` is
    one connection's FLUSH, taken when the connection attaches."""

    def flusher(self) -> Callable[[], Awaitable[None]]: ...


@runtime_checkable
class ReadsInto(Protocol):
    """Reads straight into a caller's buffer (the NBD client: off the wire, no copy)."""

    async def pread_into(self, offset: int, into: memoryview) -> None:
        """Fill all of `into` with the bytes at `offset` (written until this returns)."""
        ...


@runtime_checkable
class ServedFromFile(Protocol):
    """One file, nothing between it and the peer (FileBackend): a server may serve a
    connection's transmission natively, on a thread of its own (nbd/file_serve.py), with
    its READs, WRITEs and FLUSHes done on `file_fd()`; the rare requests come to the sync
    methods below, called from that thread."""

    path: str

    def file_fd(self) -> int:
        """The file's open descriptor (the server works on a duplicate of it)."""
        ...

    def zero_now(self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
                 fast: bool = False) -> None:
        """As `zero`, done when it returns; BlockError if it fails."""
        ...

    def cache_now(self, offset: int, length: int) -> None: ...

    def block_status_now(self, offset: int, length: int) -> list[tuple[int, int]]:
        """As `block_status` (ReportsAllocation)."""
        ...


@runtime_checkable
class WritesInline(Protocol):
    """Does the common write inline where it can (CryptDisk: a small write answered before
    its replicas): a server then runs that WRITE as one call, with no coroutine."""

    def write_inline(self, offset: int, data: Buffer, fua: bool = False) -> bool:
        """True: the write was done in this call, as `pwrite` would have done it. False:
        nothing was done, and `pwrite` must serve it. BlockError if it fails."""
        ...


# Allocation flags of a `ReportsAllocation` extent: the NBD base:allocation values.
HOLE = 1  # no storage is allocated here
ZERO = 2  # reads as zeros


@runtime_checkable
class ReportsAllocation(Protocol):
    """Can say which parts of a range are holes (NBD_CMD_BLOCK_STATUS, base:allocation).
    A backend without it is all data."""

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) extents in order from `offset`, flags HOLE|ZERO or 0 (data);
        they may stop short of `length` (a bounded amount of work per call: the client asks
        again from where they end), but describe at least one byte."""
        ...


@runtime_checkable
class HasEpoch(Protocol):
    """Commits in numbered epochs (the encryption layer)."""

    @property
    def epoch(self) -> int: ...


@runtime_checkable
class Breakable(Protocol):
    """A connection that can break: `broken` is the reason once it has, else None."""

    @property
    def broken(self) -> str | None: ...


@runtime_checkable
class TellsBreak(Protocol):
    """A connection that says when it breaks with no request on it (NbdClient watches its
    socket, so a driver that restarts or hangs up is seen at once): `callback` is called
    soon after each break of the connection it is given for."""

    def when_broken(self, callback: Callable[[], None]) -> None: ...


@runtime_checkable
class Watched(Protocol):
    """A connection whose unanswered requests can be timed and given up on (NbdClient):
    a mirror drops a replica that lags while the others answer (ReplicaSet)."""

    def pending_since(self) -> float | None:
        """Event-loop time the oldest unanswered request was sent; None if none waits."""
        ...

    @property
    def answered_at(self) -> float:
        """Event-loop time of the last reply received (0.0 before any)."""
        ...

    def abandon(self, reason: str) -> None:
        """Break the connection: every unanswered request fails with ETIMEDOUT, saying `reason`."""
        ...


@runtime_checkable
class Submits(Protocol):
    """Can queue a write without a coroutine of its own (NbdClient, and the layers a mirror
    keeps above it): a mirrored write then costs each replica a future, not a task and a
    chain of coroutines. Whoever awaits the future reports its outcome with `write_ended`,
    so each layer records what its pwrite would have, without a callback of its own."""

    def submit_writes(self, writes: list[tuple[int, Buffer]], fua: bool = False,
                      retried: bool = False, ring: int | None = None
                      ) -> asyncio.Future[list[BlockError | None]] | None:
        """Queue the writes, (offset, data) each, now and return one future of their
        outcomes in order (None for each that went through, else the BlockError it failed
        with), done once all are answered; or None, with nothing queued, when they must go
        through `pwrite` instead (too few free request slots, a write too large for one
        request, a check that fails, an ability it lacks). The data must stay unchanged
        until the future is done. `retried`: the caller sends a write that fails again
        through `pwrite` (which may reconnect, reconnect.py) and reports only successes
        with `write_ended`. `ring`: each data is a 16-byte descriptor into the ring of this
        id (docs/driver-ring.md), sent only where the connection agreed that ring (else
        None: the caller sends the data itself through `pwrite`)."""
        ...

    def write_ended(self, error: Exception | None) -> None:
        """A submitted write is answered: None if it succeeded, else what it failed with.
        Not called for a write given up on (cancelled), as pwrite records nothing then."""
        ...


class NativeClient(Protocol):
    """An NbdClient as the native read plane sees it: its engine takes the plane's
    requests while the connection is not broken."""

    @property
    def broken(self) -> str | None: ...

    def native_engine(self) -> object | None: ...

    def take_lagging(self, before: float) -> None:
        """The plane's reads sent before loop time `before` go up to Python (hedged)."""
        ...


@runtime_checkable
class ReadsNatively(Protocol):
    """A replica link whose reads the native read plane may queue itself (NbdClient, and
    the layers a mirror keeps above it: SpaceWatch, ReplicaLink): `native_client` is the
    NbdClient below, whose engine takes the plane's requests, or None when reads must go
    through `pread_into` now (no native engine, a broken connection)."""

    def native_client(self) -> NativeClient | None: ...


@runtime_checkable
class ServesReadsNatively(Protocol):
    """Serves guest READs in the native data plane where it can (CryptDisk): the NBD
    server parses a batch of requests with `read_route()`'s plane, which starts the READs
    it can take natively (their replies are framed natively too); the rest come to Python
    as usual. A native READ that fails after it was sent goes on in `resume_read`."""

    def read_route(self) -> tuple[object, list[NativeClient]] | None:
        """(ReadPlane, the NbdClients it routes to, in the plane's order) for this batch
        of requests, or None when no READ may go natively now."""
        ...

    def resume_read(self, client: NativeClient, offset: int, length: int,
                    failure: BlockError | list[int] | float) -> Awaitable[Buffer]:
        """A native READ of [offset, offset+length) that `client` failed, served the
        general way (fail-over, repair, hedging, reports). `failure`: the BlockError its
        connection gave (an error reply, a broken connection), the indices of the blocks
        that failed verification, or, for a read left unanswered for the replica set's
        `lag`, the loop time it was sent."""
        ...


@runtime_checkable
class WritesNatively(Protocol):
    """Does the common guest WRITE in the native data plane (CryptDisk): the NBD server
    parses a batch of requests with `write_route()`'s plane, which takes the WRITEs it can
    (their replies are framed natively too), then hands them back in one call
    (`writes_taken`) before the replies leave; the rest come to Python as usual."""

    def write_route(self) -> object | None:
        """The WritePlane, armed for this batch of requests, or None when no WRITE may be
        taken natively now."""
        ...

    def writes_taken(self) -> None:
        """Collect what the plane took (intent records, versions, writes behind)."""
        ...

    def write_room(self, offset: int, length: int) -> Awaitable[None] | None:
        """For a WRITE without FUA the backend's `write_inline` declined: an awaitable
        ending when waiting for it lets the backend take the write inline (None: serve it
        the general way now)."""
        ...


@runtime_checkable
class Reconnectable(Protocol):
    """Can open a new connection to the same server (ReplicaLink)."""

    async def reconnect_once(self) -> None:
        """One attempt; raises if it fails."""
        ...


def check_range(size: int, offset: int, length: int) -> None:
    """Raise EINVAL unless [offset, offset+length) lies inside a device of `size`."""
    if offset < 0 or length < 0 or offset + length > size:
        raise BlockError(
            errno.EINVAL, f"request [{offset}, {offset + length}) is outside the device of {size} bytes"
        )
