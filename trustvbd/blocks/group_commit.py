"""The intent log's group commit: the gate ciphertext waits at before it leaves.

Every intent record is durable before the ciphertext it explains leaves this domain
(`when_durable`, the gate of write_behind.py and crypt_write.send): a group commit,
one fdatasync on a thread for every record appended meanwhile, started when ciphertext
waits for it (so a gathered run of writes behind costs one), and the event loop never
waits for it, but where a FLUSH waits for that sync and nothing else: then the loop
syncs itself (`_sync_next`). The commit protocol around it (a FLUSH, a full commit) is
crypt_commit.py's.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path

from trustvbd.blockdev import StateWriteFailed
from trustvbd.blocks.intent_log import IntentLog


class GroupCommit:
    """When the records appended to one disk's intent log so far are durable.

    `failed` words a failed sync as a trusted state write that failed (Commits._state_failed);
    `room` is called after each sync that succeeded (the state directory has room again)."""

    def __init__(self, intent: IntentLog,
                 failed: Callable[[str, Path, OSError], StateWriteFailed],
                 room: Callable[[], None]) -> None:
        self.intent = intent
        self._failed, self._room = failed, room
        # The sync running on a thread, and what waits for records up to a count
        # (IntentLog.appended) to be durable.
        self._syncing = False
        self._waiting: list[tuple[int, Callable[[OSError | None], None]]] = []
        # A sync that failed, until a FLUSH or commit reported it: no ciphertext leaves
        # meanwhile. Not retried into a promise: after a failed fdatasync the kernel may
        # have dropped the pages it could not write, and a later one succeeds regardless.
        self._sync_failed: OSError | None = None

    def when_durable(self, then: Callable[[OSError | None], None], here: bool = False) -> bool:
        """True if every intent record appended so far is durable. Else False, and `then`
        is called once they are (with None), or with the error if the sync failed. With
        `here` (ciphertext a FLUSH waits for), a sync started now runs on the event loop,
        at once (`_sync_next`): `then` may be called before this returns.

        The gate before any ciphertext leaves this domain: a driver may persist what it
        receives at once (O_DIRECT, a remote server, page-cache writeback), and a power
        cut of this host must not leave ciphertext that no durable record explains (the
        block would read as an integrity error, its flushed content lost with it)."""
        intent = self.intent
        if self._sync_failed is not None:
            then(self._sync_failed)
            return False
        if intent.durable >= intent.appended:  # (all_durable, spelled out: per departure)
            return True
        self._waiting.append((intent.appended, then))
        if not self._syncing:
            self._sync_next(here)
        return False

    async def durable(self, report: bool = False) -> None:
        """Until every intent record appended so far is durable (`when_durable`). With
        `report` (a FLUSH or commit), a failed sync is said here, and syncs start anew."""
        if self._sync_failed is None and self.intent.all_durable:
            return
        await self.durable_future(report)

    def _sync_next(self, here: bool = False) -> None:
        """One fdatasync on the log's thread for every record appended until it starts (a
        group commit: records appended while it runs wait for the next). Started when
        something waits for it (a run of writes behind leaving, a large or FUA write, a
        FLUSH or commit), not per record: a run of writes gathered meanwhile then costs one
        sync, not one each. The event loop never waits for it, but `here`: ciphertext a
        FLUSH waits for (write_behind.py), where the loop has nothing else of this disk's
        to do before the sync ends, and handing it to the thread cost a wake-up there and
        one back here. Then at once, in the caller's step: for the write a FLUSH is
        expected to follow, before its reply, so its FUA write is on its way to the driver
        while the guest is answered and sends the FLUSH, and the FLUSH waits for the
        driver's sync and the mark's, not for this one too (bench/README.md)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test's direct call): the next gate starts it
            return
        self._syncing = True
        if here:
            self._sync_now()
        else:
            self.intent.sync_soon(loop, self._synced)

    def _sync_now(self) -> None:
        """The group commit's sync on the event loop (`_sync_next`)."""
        try:
            self.intent.sync()
        except Exception as exc:
            self._synced(exc)
        else:
            self._synced(None)

    def _synced(self, exc: BaseException | None) -> None:
        self._syncing = False
        if exc is not None and not isinstance(exc, OSError):
            exc = OSError(errno.EIO, repr(exc))
        if exc is not None:
            self._sync_failed = exc
        else:
            self._room()  # what was held was written and synced: room again
        durable, waiting = self.intent.durable, self._waiting
        if exc is not None or not waiting or waiting[-1][0] <= durable:
            # Everyone waiting is told (the usual case: nothing was appended meanwhile);
            # the counts only grow along the list, so the last one's says it.
            self._waiting = []  # (those told below may wait again: a new list)
            for _, then in waiting:
                then(exc)  # type: ignore[arg-type]
            return
        ready = [then for upto, then in waiting if upto <= durable]
        self._waiting = [w for w in waiting if w[0] > durable]
        self._sync_next()
        for then in ready:
            then(None)

    def durable_future(self, report: bool) -> asyncio.Future[None]:
        """`durable` as a future the log's sync completes: a FLUSH holds it (`report`) while
        the writes it sent on with FUA and the replica flush are in flight (usually the sync
        ended already, started with the records); a plain future, not a task: it only waits."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def then(exc: OSError | None) -> None:
            if done.done():  # cancelled: whoever waited for it was
                return
            if exc is None:
                done.set_result(None)
                return
            if report:
                self._sync_failed = None  # said by the waiter; syncs start anew
            failed = self._failed("sync", self.intent.path, exc)
            failed.__cause__ = exc
            done.set_exception(failed)

        if self.when_durable(then):  # (the log's thread may have ended a sync meanwhile)
            done.set_result(None)
        return done

    def sync_here(self) -> None:
        """A sync on the event loop at once (as `_sync_next` with `here`), unless one runs or
        a failed one waits to be said: a FLUSH's mark, whose answer waits for it alone."""
        if not self._syncing and self._sync_failed is None:
            self._syncing = True
            self._sync_now()
