"""CryptDisk's write path: a guest write from plaintext to the replicas' ciphertext.

Write: versions from a reserved counter -> AES-GCM (one call per request) ->
one intent record (old and new leaves) appended to trusted state -> in-memory
leaf table -> ciphertext to the replica. No data journal. A small write without
FUA is answered before the replica takes it (write_behind.py). Partial blocks are
read, modified and written (the plaintext of the last few one-block writes is kept
for that). A replica write that fails leaves its blocks unsure: the replica may hold
any of their older leaves' ciphertext until a write, zero or commit settles them.

The functions taking the disk are CryptDisk's methods (bound in its class body,
crypt_layer.py): no call layer between a guest's request and its work.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

from trustvbd.blockdev import BlockError, Buffer, check_range
from trustvbd.blocks.ranges import Hold
from trustvbd.blocks.write_behind import WRITE_BEHIND_BLOCKS
from trustvbd.crypt.aead import BLOCK_SIZE, LEAF_SIZE

if TYPE_CHECKING:
    from trustvbd._native import WritePlane
    from trustvbd.blocks.crypt_layer import CryptDisk

log = logging.getLogger("trustvbd.blocks.crypt_layer")

BS = BLOCK_SIZE
# Single blocks whose plaintext a write remembers (per disk), for the read-modify-write
# of a block rewritten a few bytes at a time (e2fsprogs updates superblock fields so).
_RECENT_BLOCKS = 8
# Blocks written partly whose next one-block writes keep their plaintext (_want_recent).
_WANTED_BLOCKS = 32


async def wait_for_space(disk: CryptDisk) -> None:
    """After an open on a full driver: commit first, or refuse the write with ENOSPC."""
    if disk._out_of_space is None:
        return
    try:
        await disk._commit(force=True)
    except BlockError as exc:
        if exc.errno == errno.ENOSPC:
            raise BlockError(errno.ENOSPC, disk._out_of_space) from None
        raise
    disk._out_of_space = None
    log.warning("disk %r: its replicas take writes again", disk.name)


async def pwrite(disk: CryptDisk, offset: int, data: Buffer, fua: bool = False) -> None:
    # The common write (lock free, no commit running, sealed inline) awaits nothing:
    # each step that may wait is tried without a coroutine first.
    length = len(data)
    check_range(disk._lay.logical_size, offset, length)
    disk._check_usable()
    if disk._out_of_space is not None:
        await wait_for_space(disk)
    commits = disk._commits
    if length:
        b0, b1 = offset // BS, -(-(offset + length) // BS)
        if not commits.try_enter_write():
            await commits.enter_write()
        behind = False  # the lock and the writer count went on with the write behind
        try:
            hold = disk._locks.try_acquire(b0, b1, True)
            if hold is None and not fua and _rewrite_held(disk, b0, b1, offset, data):
                behind = True  # its writer count ends with the held write it replaced
                if commits.due(False):
                    await disk._commit()
                return
            hold = hold or await acquire(disk, b0, b1, True)
            try:
                if offset % BS == 0 and length % BS == 0:
                    plain = memoryview(data).cast("B")
                else:
                    data = await _merge(disk, b0, b1, offset, data)
                    plain = memoryview(data)
                n = b1 - b0
                version = commits.take_versions(n)
                if disk._aead.inline(n):
                    ct, new = disk._cipher.seal(b0, version, plain)
                else:
                    ct, new = await disk._aead.seal(disk._cipher, b0, version, plain)
                old = _note_write(disk, b0, new, data)
                if not fua and disk._behind.takes(n):
                    # No await between recording the write and handing it over. While a
                    # FLUSH waits for the writers, joining a run would only delay it.
                    disk._behind.add_all(((b0, n, old, ct, hold),), gather=not commits.committing)
                    behind = True
                else:
                    # With FUA: durable by itself, so the FLUSH that follows (commit)
                    # often has nothing left to send the replicas (reconnect.py).
                    await send(disk, b0, old, ct, fua)
            finally:
                if not behind:
                    disk._locks.release(hold)
        finally:
            if not behind:
                commits.leave_write()
    if commits.due(fua):
        await disk._commit(durable=fua)


def write_inline(disk: CryptDisk, offset: int, data: Buffer, fua: bool = False) -> bool:
    """The common write without a coroutine (WritesInline), for one the NBD server did not
    hand to the native write plane with its batch (its payload came later): the plane
    takes it, as `write_route` says (whole blocks, no FUA, fewer than
    WRITE_BEHIND_BLOCKS, the range free, no commit running or due), recorded and handed
    to the writes behind in this call, as `pwrite` does it. False, with nothing done, for
    any other write (the NBD server then awaits `pwrite`)."""
    if fua:
        return False
    length = len(data)
    if offset + length > disk._lay.logical_size or offset < 0:
        check_range(disk._lay.logical_size, offset, length)  # it says what is wrong
    if disk._closed or disk._commits.failed is not None:
        disk._check_usable()
    plane = write_route(disk)
    if plane is None or not plane.write(offset, data):
        return False
    writes_taken(disk)
    return True


def write_route(disk: CryptDisk) -> WritePlane | None:
    """The disk's WritePlane armed for a batch of guest requests (WritesNatively), or None
    when no write may go natively now: the disk closed, failed or full, a commit running,
    no room behind (WRITE_BEHIND_MAX, or a write behind lost that no FLUSH reported yet:
    later writes wait for their replicas until then). What each write needs on its own
    (versions left in the reservation, fewer blocks than a commit becomes due at, dirty
    leaf pages under the limit, the range free and resident) the plane checks."""
    commits, behind = disk._commits, disk._behind
    # Once per batch (per write at QD1): the write-behind's own fields, no call layer.
    room = behind.limit - behind._writes
    if (room <= 0 or commits.committing or disk._closed or commits.failed is not None
            or disk._out_of_space is not None or behind._failure is not None):
        return None
    plane = disk._wplane
    plane.arm(room, *commits.write_window())
    return plane


def write_room(disk: CryptDisk, offset: int, length: int) -> Coroutine[Any, Any, None] | None:
    """For a write without FUA that `write_inline` declined: when the writes behind being
    full was what stopped it (and the plane would take its size), an awaitable that ends
    once they have room, so the NBD server holds the write until then and it goes behind
    natively, instead of to the replicas alone (the general way, several times the work
    of the plane's). None otherwise."""
    commits = disk._commits
    if (offset % BS or length % BS or not 0 < length < WRITE_BEHIND_BLOCKS * BS
            or not disk._behind.full() or commits.committing or disk._closed
            or commits.failed is not None or disk._out_of_space is not None):
        return None
    return disk._behind.room()


def writes_taken(disk: CryptDisk) -> None:
    """What the plane took since it was armed, before the guest's replies leave: the
    intent records (held until the ciphertext leaves), versions and writers to the
    commits, and each write to the writes behind, its hold released when it ended."""
    records, writes, blocks, next_version = disk._wplane.take()
    if not writes:
        return
    disk._commits.writes_recorded(records, blocks, len(writes), next_version)
    disk._behind.add_all(writes)


def _rewrite_held(disk: CryptDisk, b0: int, b1: int, offset: int, data: Buffer) -> bool:
    """A write of exactly the blocks of a run of writes behind that has not left yet
    (e2fsprogs rewrites its superblock a few bytes at a time, one request after another):
    sealed and recorded now, its ciphertext replaces the run's, under the run's range lock,
    and it ends with the run. Without this it sent the run and waited for an intent-log
    sync and the replicas' answer before it could even start. The replicas never get the
    older ciphertext, so the run's old leaves stay what they may hold (as if that write
    had been lost in a crash: it came after the last FLUSH, which would have sent it).
    False, with nothing done, where that does not apply or anything would have to wait
    (a partial block whose plaintext is not at hand, a commit running, no room behind)."""
    behind = disk._behind
    run = behind.held_run(b0, b1)
    n = b1 - b0
    if (run is None or not behind.takes(n) or not disk._aead.inline(n)
            or disk._commits.committing):
        return False
    if offset % BS or len(data) % BS:
        if n != 1:
            return False
        _want_recent(disk, b0)
        base = _recent_plain(disk, b0)
        if base is None:
            return False
        merged = bytearray(base)
        merged[offset - b0 * BS:offset - b0 * BS + len(data)] = data
        data, plain = merged, memoryview(merged)
    else:
        plain = memoryview(data).cast("B")
    # The caller is a writer already (its count ends with the run).
    commits = disk._commits
    ct, new = disk._cipher.seal(b0, commits.take_versions(n), plain)
    _note_write(disk, b0, new, data)
    behind.rewrite(run, ct)
    return True


async def acquire(disk: CryptDisk, b0: int, b1: int, exclusive: bool) -> Hold:
    """The range lock the slow way: if an unsent run of writes behind holds these
    blocks (or the leaf pages they need), it goes to the replicas now."""
    disk._behind.send_now()
    return await disk._locks.acquire(b0, b1, exclusive)


def writes_ended(disk: CryptDisk, holds: list[Hold], writes: int) -> None:
    """Writes behind got their replicas' answer (or failed): as after waited writes, in one
    call for all that ended together (write_behind.Ended)."""
    disk._locks.release_all(holds)
    disk._commits.leave_writes(writes)


async def _merge(disk: CryptDisk, b0: int, b1: int, offset: int, data: Buffer) -> bytearray:
    """Read-modify-write for a request that covers blocks partially."""
    buf = bytearray((b1 - b0) * BS)
    end = offset + len(data)
    _want_recent(disk, b0)
    _want_recent(disk, b1 - 1)
    if offset % BS:
        buf[:BS] = _recent_plain(disk, b0) or await disk._read_verified(b0, b0 + 1)
    if end % BS and (b1 - 1 > b0 or offset % BS == 0):
        buf[-BS:] = _recent_plain(disk, b1 - 1) or await disk._read_verified(b1 - 1, b1)
    buf[offset - b0 * BS:end - b0 * BS] = data
    return buf


def _want_recent(disk: CryptDisk, b: int) -> None:
    """Block b was written partly: keep its plaintext from its next one-block writes (the
    newest _WANTED_BLOCKS such blocks; other writes keep nothing, which costs them a dict
    update and often a copy each)."""
    wanted = disk._recent_wanted
    wanted.pop(b, None)
    if len(wanted) >= _WANTED_BLOCKS:
        del wanted[next(iter(wanted))]
    wanted[b] = None
    disk._wplane.set_wanted(list(wanted))


def _remember(disk: CryptDisk, b: int, leaf: bytes, plain: Buffer) -> None:
    """Keep a one-block write's plaintext (a few blocks per disk, the newest); a
    `bytes` one (the guest's payload, immutable) is kept as it is, not copied."""
    recent = disk._recent
    recent.pop(b, None)
    if len(recent) >= _RECENT_BLOCKS:
        del recent[next(iter(recent))]
    recent[b] = (leaf if type(leaf) is bytes else bytes(leaf),
                 plain if type(plain) is bytes else bytes(plain))


def _recent_plain(disk: CryptDisk, b: int) -> bytes | None:
    """Block b's plaintext as this domain last wrote it, if its leaf is still that
    write's (the leaf names the version: any later write, zero or recovery changes
    it), and no replica write of it failed (those blocks read as the replicas left
    them): the read-modify-write of a small write then needs no replica read."""
    got = disk._recent.get(b)
    if got is None or disk._behind.lost or b in disk._unsure:
        return None
    leaf, plain = got
    return plain if disk._leaves.get(b, b + 1) == leaf else None


def note_settled(disk: CryptDisk, b0: int, old: Buffer, new: Buffer) -> None:
    """Record a leaf change that alone defines its blocks (zeroed: intent log first,
    then in memory), so earlier doubt about what the replica holds no longer matters.
    A write is settled only once the replica acknowledged it (_send): until then
    every older candidate leaf stays."""
    disk._commits.note_leaves(b0, old, new)
    if disk._behind.lost:
        disk._behind.rewritten(b0, len(new) // LEAF_SIZE)
    if disk._unsure:
        for b in range(b0, b0 + len(new) // LEAF_SIZE):
            disk._unsure.pop(b, None)


def _note_write(disk: CryptDisk, b0: int, new: bytes, plain: Buffer) -> bytes:
    """Record a write's new leaves (its intent record held back until _send), and keep a
    one-block write's plaintext if its block is wanted (_want_recent); return the old
    leaves. Not settled (_note_settled): the replicas have not taken it yet."""
    n = len(new) // LEAF_SIZE
    old = disk._leaves.get(b0, b0 + n)
    disk._commits.note_leaves(b0, old, new, held=True)
    if n == 1 and b0 in disk._recent_wanted:
        _remember(disk, b0, new, plain)
    return old


def submit(disk: CryptDisk, runs: list[tuple[int, int, Buffer, Buffer]], fua: bool,
           ended: Callable[[list[bool]], None]) -> bool:
    """As `send` without a coroutine for runs of writes behind, (first block, blocks, old
    leaves, ciphertext) each, where the replica set can queue them all: True if it did, and
    `ended` is then told whether the replicas took each. A run that failed goes through
    `send` again (write_behind.py), which records what they may hold."""
    disk._commits.write_held()  # the records first (durable already: WriteBehind's gate)
    return disk._replica.submit_runs([(b0, n, ct) for b0, n, _, ct in runs], fua,
                                     partial(_submitted, disk, runs, ended))


def _submitted(disk: CryptDisk, runs: list[tuple[int, int, Buffer, Buffer]],
               ended: Callable[[list[bool]], None], took: list[bool]) -> None:
    """Submitted runs' end: those the replicas took are settled (as in send)."""
    if disk._unsure or disk._behind.lost:
        for (b0, n, _, _), stands in zip(runs, took, strict=True):
            if stands:
                _replica_took(disk, b0, n)
    ended(took)


async def send(disk: CryptDisk, b0: int, old: Buffer, ct: Buffer, fua: bool = False) -> None:
    """The ciphertext of recorded blocks to the replicas; on failure keep what they may hold."""
    n = len(old) // LEAF_SIZE
    start = disk._replica.data_offset(b0)
    try:
        # The intent records of these blocks (and of every write before them) durable
        # first (held back since their writes, _note_write; one group sync for all).
        if not disk._commits.intent.all_durable:
            await disk._commits.durable()
        await disk._replica.pwrite(start, ct, fua)
    except BaseException:
        # The replica may now hold old or new ciphertext for each block. Earlier
        # failed writes' candidates stay too: the replica may still hold any of them.
        for i in range(n):
            disk._unsure.setdefault(b0 + i, []).append(
                bytes(old[i * LEAF_SIZE:(i + 1) * LEAF_SIZE]))
        raise
    _replica_took(disk, b0, n)


def _replica_took(disk: CryptDisk, b0: int, n: int) -> None:
    """The replicas took blocks b0..b0+n: no doubt about what they hold stays, and a write
    behind lost there earlier is rewritten."""
    if disk._unsure:
        for b in range(b0, b0 + n):
            disk._unsure.pop(b, None)
    if disk._behind.lost:
        disk._behind.rewritten(b0, n)
