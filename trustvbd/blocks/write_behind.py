"""Write-behind: a small write is answered once it is sealed and its intent recorded.

A guest that writes one 4 KiB block at a time (a filesystem through FUSE) waited
for a round trip to the driver per write. The NBD contract does not ask for that:
a write is durable only after a FLUSH (or with FUA), so the encryption domain may
answer it as soon as everything *it* must do first is done: versions taken, the
block sealed, the intent record appended, the leaf table changed. The ciphertext
then goes to the replica set in the background, while the guest prepares its
next request. Not for FUA writes, nor for writes of WRITE_BEHIND_BLOCKS or more.

What stays as it was:
- the range lock on the blocks is held until the replicas answered, so a read or
  an overlapping write of those blocks waits for them, and sees the new data;
- the disk's writer count is held too, so a commit (FLUSH) waits for every write
  behind and makes it durable, or fails;
- the NBD client's request ids, bounds and timeouts apply to the background write.

What changes: a replica write that fails (every replica, with mirroring) after
the guest was answered cannot fail that request any more. It is said instead:
logged once; the blocks read as EIO until a FLUSH settles them; the next FLUSH of
*every* connection open when it failed, or opened before any FLUSH said it, fails
once, with its errno (ENOSPC stays ENOSPC) and a message naming the blocks (as
Linux reports a lost write-back to each open file, and to the next one opened if no
one heard of it: two guests sharing a disk cannot take each other's error, and a
FLUSH vouches for writes answered on any connection, as multi-conn promises); and
until the first such FLUSH, every write waits for its replicas again, so later
ones fail themselves.

Bounded: at most `limit` writes per disk are behind at once (then a write waits
for its own replica write), each under WRITE_BEHIND_BLOCKS blocks of ciphertext.

Gathered: a filesystem through FUSE writes a file's blocks one 4 KiB request at
a time, in order. Each replica write costs a request and a reply in this domain
and in every driver, more than the write's own work. So a write behind waits to
be joined, and the next one that starts where an unsent run ends joins it. Up to
HELD_RUNS runs wait so (a file's data between its metadata writes; random
writes): they all go to the replicas in one loop turn, so in one send and one
driver wake-up per replica, once a run is GATHER_BLOCKS long, once one more run
would be held or HELD_WRITES writes are, GATHER_S after the newest write, and at
once when anything waits for blocks behind (`send_now`: a FLUSH or commit, a read or write that meets
their range lock, a close). A FLUSH that finds a single run (unsent, or sent on
but still waiting for its loop turn, `_run_send`) sends it with FUA, so it can
flush the replicas for the writes before it meanwhile, and often need not flush
them at all (reconnect.ReplicaLink.flush): a guest's write then FLUSH costs the
driver one write and one sync. Several runs go as plain writes and the FLUSH
flushes after them (one sync on the replica rather than one per run). A replica
that fails a run loses all of its writes, each as it would alone.

Sent without a task: a run leaves, whatever sends it (the reply before it, the gather
timer, a FLUSH or anything else that waits for it, an expected FLUSH), by `submit`
where the replica set can queue it at once (ReplicaSet.submit_runs): a callback ends
it, not a task and a chain of coroutines; the runs leaving in one loop turn go together,
one future per replica for all of them. A run it cannot queue, or that fails so, goes
the general way (`send`, in a task), where a single replica's link reconnects a broken
connection and a failure is recorded as always. A run after a reply goes one loop turn
later, so the reply leaves first.

Records first: a run leaves only once the intent records of its writes (and of every
write before them) are durable (`gate`, group_commit.GroupCommit.when_durable): a driver may
persist ciphertext at once, and a power cut of this host must not leave ciphertext no
durable record explains. Their sync starts as the records are made, so by the time a
run leaves (after the reply, the gather timer or a FLUSH) it is usually done. When it is
not, the runs sent on meanwhile wait for the next sync, and all that one sync lets go
leave together, as one departure (`_gated`).

Expected FLUSHes: a guest that FLUSHes after every write (a database's log, fsync
per write) would have each write wait for its FLUSH to send it. Once FLUSH_STREAK
FLUSHes in a row each came right after one write behind, the next such write has its
record synced in its own step and is sent with FUA before it is answered, without
waiting for the FLUSH: the driver syncs while the guest is answered and sends its
FLUSH, which then waits for the driver's sync and writes the mark, not for the
record's sync too. A second write before the FLUSH ends the streak; it cost one
driver sync.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from trustvbd import eager
from trustvbd.blockdev import BlockError, Buffer, StateWriteFailed, WritesMayBeLost
from trustvbd.blocks.ranges import describe_blocks
from trustvbd.running_loop import RunningLoop

log = logging.getLogger("trustvbd.crypt.write_behind")

# Writes per disk whose replica write is still running. A guest that writes faster than its
# replicas take it keeps this many behind, and each sync of the intent log covers the
# writes made while the one before it ran: the limit sets how many writes share a sync, a
# driver send and its reply. Below the NBD client's 128 request slots per connection, so
# reads keep at least 32.
WRITE_BEHIND_MAX = 96
WRITE_BEHIND_BLOCKS = 16  # writes of this many 4 KiB blocks or more wait for their replicas
GATHER_BLOCKS = 32  # a run of adjacent writes behind goes out at this many blocks (128 KiB)
# Unsent runs wait this long for the next write: FUSE's pauses between writes (cp reading
# the next file, fuse2fs allocating) often pass a millisecond, and each departure costs an
# intent-log sync, a replica write and its reply; the counts below bound what waits.
GATHER_S = 0.02
# Unsent runs held at most: one more sends them all together. Random writes are a run
# each, and each such departure asks for an intent-log sync if none runs, so more held
# runs mean fewer syncs per write (measured: bench/README.md). Held runs are found by
# their end block: holding more costs no scan per write.
HELD_RUNS = 32
# Writes held unsent at most: one more sends them all together. Below WRITE_BEHIND_MAX,
# so the next writes are answered behind while these are in flight.
HELD_WRITES = WRITE_BEHIND_MAX // 2
# FLUSHes in a row, each right after one write behind, before the next such write is taken
# for one a FLUSH follows: sent at once with FUA, the records synced meanwhile.
FLUSH_STREAK = 2

# Sends the ciphertext of blocks [first, first + len(old) // 32) whose old leaves are `old`.
# With FUA when the bool says so (durable once answered).
Send = Callable[[int, Buffer, Buffer, bool], Coroutine[Any, Any, None]]
# The same without a coroutine for runs leaving together, (first block, blocks, old
# leaves, ciphertext) each, where the replicas can queue them: True if queued, and then the
# callable is called once, when all ended, with whether the replicas took each.
Submit = Callable[[list[tuple[int, int, Buffer, Buffer]], bool, Callable[[list[bool]], None]],
                  bool]
# True if every intent record appended so far is durable; else False, and the callable is
# called once they are (None) or their sync failed (the error): group_commit.GroupCommit.when_durable.
Gate = Callable[[Callable[[OSError | None], None], bool], bool]
# Writes behind ended (their replicas answered, or they are lost): the range-lock holds
# they kept, and how many writes they were (a rewrite of a held run keeps no hold of its
# own). Called once for all the runs that end together, not once per write.
Ended = Callable[[list[int], int], None]


def _no_holds(holds: list[int], writes: int) -> None:
    pass


class _Run:
    """Adjacent writes behind: their leaves, ciphertext, range-lock holds and count. `old`
    and `ct` are one buffer each: the first write's until the run grows (`olds`, `cts`: the
    pieces, None while there is one; a random write never grows), joined once sent on
    (_join_all)."""

    __slots__ = ("blocks", "ct", "cts", "early", "ended", "first", "fua", "holds", "old",
                 "olds", "task", "writes")

    def __init__(self, first: int, blocks: int, old: Buffer, ct: Buffer, hold: int) -> None:
        self.first, self.blocks = first, blocks
        self.old, self.ct, self.holds = old, ct, [hold]
        self.olds: list[Buffer] | None = None
        self.cts: list[Buffer] | None = None
        self.writes = 1
        self.fua = False  # sent with FUA (a FLUSH asked for it before it left)
        self.early = False  # sent at once with FUA: a FLUSH is expected next (WriteBehind.add)
        self.ended = False  # its replicas answered, or it is lost
        self.task: asyncio.Task[None] | None = None  # sent the general way (_start)

    def grow(self, blocks: int, old: Buffer, ct: Buffer, hold: int) -> None:
        """The next write joins the run (it starts where the run ends)."""
        olds, cts = self.olds, self.cts
        if olds is None:
            olds = self.olds = [self.old]
        if cts is None:
            cts = self.cts = [self.ct]
        olds.append(old)
        cts.append(ct)
        self.holds.append(hold)
        self.writes += 1
        self.blocks += blocks


class Ahead(NamedTuple):
    """The runs a FLUSH sent on with FUA, or found in flight with FUA, and how many writes
    they hold."""

    runs: tuple[_Run, ...]
    writes: int

    def any_ended(self) -> bool:
        for run in self.runs:  # (a loop, not any() over a generator: one call, not three)
            if run.ended:
                return True
        return False


@dataclass
class Seen:
    """How many failed writes behind one connection (or caller) has been told of."""

    failures: int


class WriteBehind:
    """The writes of one disk still going to its replicas, and those that failed.

    A run is held (`_runs`: it may still grow), then sent on to leave after the reply
    (`_starting`), then in flight (`_sending`) until its replicas answered."""

    def __init__(self, disk: str, send: Send, limit: int = WRITE_BEHIND_MAX,
                 early: bool = False, submit: Submit | None = None,
                 gate: Gate | None = None, ended: Ended = _no_holds) -> None:
        """`early`: a write a FLUSH is expected to follow leaves at once, with FUA.
        `submit`: sends a run without a task where the replicas can (a run that fails then
        goes by `send`). `gate`: a run leaves only once the intent records that explain
        it are durable (`send` waits for them itself). `ended`: the writes' holds and
        count once they ended, always (a batch's in one call)."""
        self.disk = disk
        self.limit = limit
        self._send = send
        self._ended = ended
        self._submit = submit
        self._early = early
        self._gate = gate
        self._since_flush = 0  # writes behind added since the last FLUSH
        self._streak = 0  # FLUSHes in a row that each came right after one write behind
        self._runs: list[_Run] = []  # the newest writes, not sent yet (at most HELD_RUNS)
        self._ends: dict[int, _Run] = {}  # each of _runs by its end block (runs don't overlap)
        self._held = 0  # writes in _runs (at most HELD_WRITES)
        self._starting: list[_Run] = []  # sent on, waiting for their loop turn (_send_started)
        self._sending: set[_Run] = set()  # left, not answered yet
        self._idle = asyncio.Event()  # set when nothing is in flight, while `drain` waits
        self._drains = 0  # `drain`s waiting for _idle
        self._freed = asyncio.Event()  # set when a run ends while `room` waits
        self._room_waits = 0
        self._start_queued = False
        self._opened: list[_Run] = []  # plain runs the gate let go in this loop turn
        self._open_queued = False
        self._timer: asyncio.TimerHandle | None = None
        self._armed = 0.0  # the newest write's time when the timer was last armed
        self._last = 0.0  # the newest write's time
        self._running_loop = RunningLoop()
        self._writes = 0  # writes behind: held, starting or in flight
        self.lost: set[int] = set()  # blocks of failed writes behind, until a FLUSH settles them
        self._failure: BlockError | None = None  # the first failure no FLUSH has settled yet
        self.failures = 0  # failed writes behind since open
        self._said = 0  # of those, how many a FLUSH has reported (on any connection)
        self._reported: BlockError | None = None  # what FLUSH says of the newest failures
        self.started = 0  # writes answered before their replicas, since open
        self.sends = 0  # replica writes those made (fewer when gathered)
        self.submitted = 0  # of those, sent without a task (`submit`)

    def takes(self, blocks: int) -> bool:
        """Whether a write of `blocks` blocks may be answered before its replicas."""
        return (blocks < WRITE_BEHIND_BLOCKS and self._writes < self.limit
                and self._failure is None)

    def full(self) -> bool:
        """At the limit with writes still running (their end makes room), none failed."""
        return 0 < self._writes >= self.limit and self._failure is None

    async def room(self) -> None:
        """Until the writes behind are not `full`. The runs held are sent now: their end
        makes the room."""
        while self.full():
            self.send_now()
            self._freed.clear()
            self._room_waits += 1
            try:
                await self._freed.wait()
            finally:
                self._room_waits -= 1

    @property
    def running(self) -> int:
        return self._writes

    def add_all(self, writes: Iterable[tuple[int, int, Buffer, Buffer, int]],
                gather: bool = True) -> None:
        """Writes recorded and answered, (first block, blocks, old leaves, ciphertext,
        range-lock hold) each, in order (the native write plane's batch, or one write): send each
        ciphertext to the replicas behind it, joined to an unsent run it continues (if
        `gather`); each hold goes to `ended` once they answered, always. One call for a
        batch: the loop's clock read once, no call per write but a new run's."""
        loop = self._running_loop()
        now = self._last = loop.time()
        for first_block, blocks, old, ct, hold in writes:
            self.started += 1
            self._writes += 1
            self._since_flush += 1
            if self._since_flush > 1:
                self._streak = 0  # writes come without a FLUSH after each
            elif gather and self._streak >= FLUSH_STREAK and self._early:
                # A FLUSH is expected next: its record synced now and the write sent with
                # FUA before the reply, so the driver syncs while the guest is answered
                # and sends its FLUSH.
                run = _Run(first_block, blocks, old, ct, hold)
                run.early = True
                self._join_all([run])
                self._go([run], fua=True, here=True)
                continue
            # (new ones once _send_after_reply took the held runs)
            runs, ends = self._runs, self._ends
            if gather and first_block in ends:  # it continues a held run
                run = ends[first_block]
                if run.blocks + blocks <= GATHER_BLOCKS:
                    run.grow(blocks, old, ct, hold)
                    del ends[first_block]
                    ends[first_block + blocks] = run
                    self._held += 1
                    if run.blocks >= GATHER_BLOCKS or self._held >= HELD_WRITES:
                        self._send_after_reply()
                    continue
            run = _Run(first_block, blocks, old, ct, hold)
            runs.append(run)
            ends[first_block + blocks] = run
            self._held += 1
            if not gather or len(runs) > HELD_RUNS or self._held >= HELD_WRITES:
                self._send_after_reply()
            elif self._timer is None:
                self._armed = now
                self._timer = loop.call_at(now + GATHER_S, self._waited)

    def held_run(self, first_block: int, end_block: int) -> _Run | None:
        """The unsent run of exactly blocks [first_block, end_block), if one is held."""
        run = self._ends.get(end_block)
        return run if run is not None and run.first == first_block else None

    def rewrite(self, run: _Run, ct: Buffer) -> None:
        """A later write of all of `run`'s blocks (held_run), recorded under the run's
        holds: its ciphertext replaces the run's, which never leaves; it ends with the run.
        The run's old leaves stay (the replicas hold those, or this, when it failed)."""
        run.ct, run.cts = ct, None
        run.writes += 1
        self.started += 1
        self._writes += 1
        self._since_flush += 1
        self._streak = 0
        self._last = self._running_loop().time()
        self._held += 1
        if self._held >= HELD_WRITES:
            self._send_after_reply()

    def send_now(self, fua: bool = False) -> Ahead | None:
        """Something waits for the writes behind (their blocks, or all of them): send the
        unsent runs. With `fua` (a FLUSH) and one run in all (unsent or still waiting for
        its loop turn), it goes with FUA, durable by itself: the FLUSH need not wait for it
        before it flushes the replicas (crypt_commit.Commits.commit), and often need not
        flush at all (reconnect.ReplicaLink.flush). Several go as plain writes, which the
        FLUSH waits for and then flushes: one sync on the replica, not one per run. Runs
        in flight with FUA count as the FLUSH's too (an expected FLUSH's write: add)."""
        flush = fua
        # Runs in flight with FUA: durable once answered (plain loops, not generators: a
        # FLUSH after each write comes here each time).
        sent = [run for run in self._sending if run.fua] if fua and self._sending else []
        if fua:
            self._streak = self._streak + 1 if self._since_flush == 1 else 0
            self._since_flush = 0
        starting, self._starting = self._starting, []
        held = self._take_held()
        fua = fua and len(starting) + len(held) == 1
        leaving = starting + held
        if leaving:  # something waits for them: they leave now
            self._join_all(held)
            self._go(leaving, fua, here=flush)
            if fua:
                sent += leaving
        ahead: list[_Run] = []
        writes = 0
        for run in sent:
            if not run.ended:  # not those that ended at once
                ahead.append(run)
                writes += run.writes
        if not ahead:
            return None
        return Ahead(tuple(ahead), writes)

    def _waited(self) -> None:
        """The timer: send the runs once GATHER_S passed since the newest write. Re-armed
        only if a write came since it was armed, never on the clock alone: the loop's clock
        counts milliseconds, `now - last >= GATHER_S` can miss by a rounding error, and
        the timer then fired again at once, turn after turn, until the next millisecond."""
        self._timer = None
        if not self._runs:
            return
        if self._last <= self._armed:
            held = self._take_held()
            self._join_all(held)
            self._go(held)
        else:
            self._armed = self._last
            self._timer = self._running_loop().call_at(self._last + GATHER_S, self._waited)

    def _take_held(self) -> list[_Run]:
        """The unsent runs, taken: none is held (nor found by its end block) from now on."""
        held, self._runs, self._ends, self._held = self._runs, [], {}, 0
        return held

    def _join_all(self, runs: list[_Run]) -> None:
        """Each run's pieces joined: they grow no more (one call for the runs that leave
        together, not one per run)."""
        for run in runs:  # (a random write's run has one piece: nothing to do)
            if run.olds is not None:  # the joined copies replace the pieces (memory bound)
                run.old, run.olds = b"".join(run.olds), None
            if run.cts is not None:
                run.ct, run.cts = b"".join(run.cts), None
        self.sends += len(runs)

    def _send_after_reply(self) -> None:
        """Every held run leaves on the next loop turn: the guest's reply, queued once this
        write returned, leaves first, and the guest prepares its next request while the
        driver works. (A callback queued now would run before the reply's; the one it
        queues, after it.) All in one turn: one send per driver."""
        held = self._take_held()
        self._join_all(held)
        self._starting += held
        if not self._start_queued:
            self._start_queued = True
            loop = self._running_loop()
            loop.call_soon(loop.call_soon, self._send_started)

    def _send_started(self) -> None:
        self._start_queued = False
        starting, self._starting = self._starting, []
        if starting:
            self._go(starting)

    def _go(self, runs: list[_Run], fua: bool = False, here: bool = False) -> None:
        """The runs' replica writes leave together as soon as the intent records are
        durable (the gate: their sync started with them, so it is often done; `here`, a
        FLUSH waits for them: synced on the loop, group_commit.GroupCommit._sync_next):
        submitted in one batch where the replicas can queue them (one future per replica,
        not one per run), else each in a task (`_start`)."""
        for run in runs:
            run.fua = fua
        self._sending.update(runs)
        gate = self._gate
        if gate is None:
            self._leave(runs)
        elif fua or here:
            if gate(partial(self._leave, runs), here):
                self._leave(runs)
        elif gate(partial(self._gated, runs), False):
            self._leave(runs)

    def _gated(self, runs: list[_Run], failed: OSError | None = None) -> None:
        """Plain runs whose records a sync made durable: they leave with every other run
        that sync let go, in one departure on the next loop turn (a sync covers the
        records of the departures made while the one before it ran: one submit, one
        request batch and one reply chain per replica for them all, not one each). Runs
        whose sync failed go the general way at once."""
        if failed is not None:
            self._leave(runs, failed)
            return
        self._opened += runs
        if not self._open_queued:
            self._open_queued = True
            self._running_loop().call_soon(self._leave_opened)

    def _leave_opened(self) -> None:
        self._open_queued = False
        runs, self._opened = self._opened, []
        if runs:
            self._leave(runs)

    def _leave(self, runs: list[_Run], failed: OSError | None = None) -> None:
        if failed is None and (submit := self._submit) is not None:
            try:
                if submit([(run.first, run.blocks, run.old, run.ct) for run in runs], runs[0].fua,
                          partial(self._submitted, runs)):
                    self.submitted += len(runs)
                    return
            except Exception:  # the general way fails them again, and records the loss
                pass
        # The records did not sync (the general way tries again, and a failure there loses
        # the runs' writes as any replica failure does, ciphertext unsent), or the replicas
        # cannot queue them now.
        for run in runs:
            self._start(run)

    def _submitted(self, runs: list[_Run], took: list[bool]) -> None:
        """The submitted runs' end, all in one call: those that stand end (`_end`), the
        others go again the general way (a single replica's link reconnects if its
        connection broke, and a failure is recorded and said as for any write behind)."""
        if False not in took:  # the usual case: all stand
            self._end(runs)
            return
        self._end([run for run, stands in zip(runs, took, strict=True) if stands])
        for run, stands in zip(runs, took, strict=True):
            if not stands:
                self._start(run)

    def _start(self, run: _Run) -> None:
        """The run's replica write in a task, its request handed over in this turn."""
        run.task = eager.start(self._running_loop(), self._run_send(run, run.old, run.ct))

    def _end(self, runs: list[_Run] | tuple[_Run, ...]) -> None:
        """These runs are answered (or lost, and said): their writes end, in one call for a
        batch (_submitted) as for one run (_run_send)."""
        sending = self._sending
        holds: list[int] = []
        writes = 0
        for run in runs:
            run.ended = True
            run.old = run.ct = b""  # (memory bound)
            run.task = None
            writes += run.writes
            holds += run.holds
        sending.difference_update(runs)
        if writes:
            self._writes -= writes
            self._ended(holds, writes)
        if not sending and self._drains:
            self._idle.set()
        if self._room_waits:
            self._freed.set()

    async def _run_send(self, run: _Run, old: Buffer, ct: Buffer) -> None:
        try:
            await self._send(run.first, old, ct, run.fua)
        except BaseException as exc:
            self._lose(run.first, run.blocks, exc)
            if not isinstance(exc, Exception):
                raise  # cancelled (the domain is stopping): recorded, and cancelled still
        finally:
            self._end((run,))

    def _lose(self, first_block: int, blocks: int, exc: BaseException) -> None:
        block_range = range(first_block, first_block + blocks)
        self.lost.update(block_range)
        if isinstance(exc, BlockError):
            why, code = exc.message, exc.errno
        elif isinstance(exc, asyncio.CancelledError):
            why, code = "the encryption domain stopped before the replicas answered", errno.EIO
        else:
            why, code = f"internal error: {exc!r}", errno.EIO
        if isinstance(exc, StateWriteFailed):  # not the replicas': it never reached them
            log.error("disk %r: a write to block(s) %s was answered before its intent record "
                      "was durable, and it never left for the replicas: %s; those blocks read "
                      "as errors and the next FLUSH fails", self.disk,
                      describe_blocks(block_range), why)
        else:
            log.error("disk %r: a write to block(s) %s was answered before its replicas, and "
                      "they failed it: %s; those blocks read as errors and the next FLUSH "
                      "fails", self.disk, describe_blocks(block_range), why)
        self.failures += 1
        if self._failure is None:
            self._failure = exc if isinstance(exc, StateWriteFailed) else BlockError(code, why)

    def doubt(self, exc: BlockError) -> None:
        """Writes the replicas acknowledged that a FLUSH can no longer vouch for (a driver
        restarted before they were flushed: WritesMayBeLost): said as a failed write
        behind is, once to each connection's next FLUSH. No block reads as an error: the
        replica holds whatever its driver kept, verified as ever."""
        log.error("disk %r: %s; the next FLUSH of each connection fails", self.disk, exc.message)
        self.failures += 1
        if self._failure is None:
            self._failure = exc

    def check_read(self, first_block: int, end_block: int) -> None:
        """EIO if a block in [first_block, end_block) lost an answered write not yet reported."""
        hit = [b for b in range(first_block, end_block) if b in self.lost]
        if hit:
            raise BlockError(errno.EIO, (
                f"disk {self.disk!r}: block(s) {describe_blocks(hit)} lost a write that was "
                "answered before the replicas failed it; FLUSH reports the failure, and the "
                "blocks read again after it (holding what the replicas kept)"))

    def rewritten(self, first_block: int, blocks: int) -> None:
        """These blocks now hold data the replicas took (a later write, or zeros)."""
        self.lost.difference_update(range(first_block, first_block + blocks))

    def seen(self) -> Seen:
        """For a new connection: failures a FLUSH already reported are not its to hear of;
        one no FLUSH has reported yet is (the disk offers multi-conn: a FLUSH on any
        connection vouches for writes answered on every one, closed ones included; as
        Linux reports a write-back error no one has seen to the next file opened)."""
        return Seen(self._said)

    def report(self, seen: Seen) -> None:
        """After a commit (a FLUSH): the failures it settled are settled for every
        connection; raise them to `seen`'s connection if it has not heard of them."""
        failure, self._failure = self._failure, None
        if failure is not None:
            lost, self.lost = self.lost, set()
            where = f"block(s) {describe_blocks(lost)}" if lost else "blocks written again since"
            if isinstance(failure, WritesMayBeLost):
                self._reported = BlockError(failure.errno, failure.message)
            elif isinstance(failure, StateWriteFailed):
                self._reported = BlockError(failure.errno, (
                    f"disk {self.disk!r}: writes to {where} were answered, then failed before "
                    f"they left for the replicas ({failure.message}); they hold the data from "
                    "before those writes"))
            else:
                self._reported = BlockError(failure.errno, (
                    f"disk {self.disk!r}: writes to {where} were answered, then failed on the "
                    f"replicas ({failure.message}); they hold what the replicas kept (the data "
                    "from before or after those writes)"))
            self._said = self.failures
        if seen.failures == self.failures:
            return
        seen.failures = self.failures
        assert self._reported is not None
        raise BlockError(self._reported.errno, self._reported.message)

    async def drain(self) -> None:
        """Send what is unsent, and wait until every write behind has finished."""
        self.send_now()
        while self._sending:
            self._idle.clear()
            self._drains += 1
            try:
                await self._idle.wait()
            finally:
                self._drains -= 1
            self.send_now()

    def unreported(self) -> str | None:
        """The failure no FLUSH has reported yet, if any."""
        return self._failure.message if self._failure is not None else None
