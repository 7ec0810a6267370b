"""CryptDisk's read path: a guest read from the leaves and a replica's ciphertext.

Read: range lock (shared) -> leaves -> ciphertext from a replica -> opened and
verified against the leaves. A guest read usually runs as one call (start_read)
and one callback on the driver's reply (_QuickRead); what goes wrong continues in
the general path (ReplicaSet.read_on), which fails over, repairs and reports.
Blocks whose replica write failed may hold an older leaf's ciphertext: adopt_unsure.

The functions taking the disk are CryptDisk's methods (bound in its class body,
crypt_layer.py): no call layer between a guest's request and its work.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, cast

from trustvbd.blockdev import (
    Backend,
    BlockError,
    Buffer,
    Cancellable,
    ReadEnded,
    ReadsInto,
    check_range,
    provides,
)
from trustvbd.blocks.aead_pool import BULK_MIN
from trustvbd.blocks.integrity import IntegrityError
from trustvbd.blocks.ranges import Hold, describe_blocks
from trustvbd.blocks.replica import BadBlocks
from trustvbd.blocks.replica_reads import SubmittedRead
from trustvbd.crypt.aead import BLOCK_SIZE, POISON_VERSION, leaf_version

if TYPE_CHECKING:
    from trustvbd.blocks.crypt_layer import CryptDisk

log = logging.getLogger("trustvbd.blocks.crypt_layer")

BS = BLOCK_SIZE
# Reads of this many bytes or more receive their ciphertext into pooled buffers and
# are opened there (at most crypt_layer._REUSE_KEPT bytes of them are pooled).
_REUSE_MIN = 64 * 1024


class _QuickRead(SubmittedRead[Buffer]):
    """One guest read served by callbacks (CryptDisk.start_read): the replica set's
    SubmittedRead, so one object per read.

    Holds the range lock until it ends; `ended` gets the plaintext (the received buffer,
    opened in place) or the BlockError to answer with. After `cancel` it gets nothing.
    """

    __slots__ = ("_ended", "ct", "disk", "hold", "leaves", "length", "skip", "task")

    def __init__(self, disk: CryptDisk, b0: int, n: int, skip: int, length: int, hold: Hold,
                 leaves: bytes, ct: bytearray, ended: ReadEnded) -> None:
        # skip: the bytes of the first block before the guest's offset
        self.disk, self.b0, self.n, self.skip, self.length = disk, b0, n, skip, length
        self.hold: Hold | None = hold
        self.leaves, self.ct = leaves, ct
        self._ended: ReadEnded | None = ended  # None once cancelled
        self.task: asyncio.Task[None] | None = None

    @property
    def into(self) -> memoryview:
        return memoryview(self.ct)

    def attempt(self, link: Backend) -> Awaitable[Buffer]:
        return _read_from(self.disk, link, self.b0, self.n, self.leaves)

    def verify(self) -> Buffer:
        # The range lock keeps these blocks' leaves as they are while we wait.
        bad = self.disk._cipher.open_in_place(self.b0, self.ct, self.leaves)
        if bad:
            raise BadBlocks(bad)
        return self.ct

    def _release(self) -> None:
        hold = self.hold
        if hold is not None:
            self.hold = None
            self.disk._locks.release(hold)

    def ended(self, result: Buffer | BaseException) -> None:
        hold = self.hold  # as _release, inline: once per read
        if hold is not None:
            self.hold = None
            self.disk._locks.release(hold)
        # No cycle left (task -> this -> task): the buffer goes back to its pool at once,
        # not at the next garbage collection.
        self.task = None
        ended = self._ended
        if ended is None:
            return  # cancelled
        self._ended = None
        if isinstance(result, BaseException):
            if not isinstance(result, BlockError):
                log.error("disk %r: a read failed unexpectedly", self.disk.name, exc_info=result)
                result = BlockError(errno.EIO, f"internal error: {result}")
            ended(result)
        elif self.skip == 0 and self.length == len(result):
            ended(result)
        else:
            ended(memoryview(result)[self.skip:self.skip + self.length])

    def go_on(self, rest: Coroutine[Any, Any, Buffer]) -> None:
        self.task = asyncio.get_running_loop().create_task(self._go_on(rest))

    async def _go_on(self, rest: Coroutine[Any, Any, Buffer]) -> None:
        result: Buffer | BaseException
        try:
            result = await rest
        except BadBlocks as exc:  # every current replica failed verification (reported)
            try:
                _refuse_read(self.disk, self.b0, exc.indices)
            except IntegrityError as refused:
                result = refused
        except asyncio.CancelledError:
            self._ended = None
            self._release()
            raise
        except Exception as exc:
            result = exc
        self.ended(result)

    def cancel(self) -> None:
        """The guest went away: `ended` is not called. A read in the general path stops at
        its next await (its task releases the lock); one waiting for its first replica's
        reply lets go of the lock now (the reply is dropped when it comes)."""
        if self._ended is None:
            return
        self._ended = None
        if self.task is not None:
            self.task.cancel()
        else:
            self.withdraw()
            self._release()


async def pread(disk: CryptDisk, offset: int, length: int) -> Buffer:
    check_range(disk.size, offset, length)
    disk._check_usable()
    if length == 0:
        return b""
    b0, b1 = offset // BS, -(-(offset + length) // BS)
    hold = disk._locks.try_acquire(b0, b1, False) or await disk._acquire(b0, b1, False)
    try:
        out = await read_verified(disk, b0, b1)
    finally:
        disk._locks.release(hold)
    start = offset - b0 * BS
    if start == 0 and length == len(out):
        return out
    return memoryview(out)[start:start + length]


def start_read(disk: CryptDisk, offset: int, length: int, ended: ReadEnded) -> Cancellable | None:
    """A read as one call down and one callback up (StartsReads): the range lock and the
    leaves taken at once, the ciphertext submitted to the first replica (its reply opened
    in place, in the buffer the guest's reply carries), with no coroutine. Anything
    unusual goes on in the general path (_QuickRead.go_on); None when it must take it
    from the start: a lock or leaf page not at hand, blocks never written (pread answers
    them inline), a read too big to open inline, doubt about what a replica holds."""
    b0, b1 = offset // BS, -(-(offset + length) // BS)
    n = b1 - b0
    if (length <= 0 or offset < 0 or offset + length > disk._lay.logical_size
            or (n >= BULK_MIN and not disk._aead.inline(n)) or disk._closed
            or disk._commits.failed is not None or disk._behind.lost):
        return None
    unsure = disk._unsure
    if unsure and any(b in unsure for b in range(b0, b1)):
        return None  # the ciphertext may be an older leaf's (adopt_unsure)
    # The shared hold and the leaves in one native call; None also when every leaf is
    # zero (never written or zeroed: pread answers those without a replica).
    got = disk._locks.try_read(b0, b1)
    if got is None:
        return None
    hold, leaves = got
    size = n * BS
    ct = disk._ct_buffers.get(size) if size >= _REUSE_MIN else bytearray(size)
    read = _QuickRead(disk, b0, n, offset - b0 * BS, length, hold, leaves, ct, ended)
    if not disk.replicas.submit_read(read):
        disk._locks.release(hold)
        return None
    return read


async def read_verified(disk: CryptDisk, b0: int, b1: int) -> Buffer:
    """Plaintext of blocks [b0, b1), every block checked against its leaf.

    The one place data is read from a replica, so mirroring can retry on
    the next replica and repair here.
    """
    n = b1 - b0
    if disk._behind.lost:
        disk._behind.check_read(b0, b1)
    if disk._leaves.all_zero(b0, b1):
        return bytearray(n * BS)  # never written or zeroed: no driver involved
    leaves = memoryview(disk._leaves.get(b0, b1))  # the range lock holds their pages

    async def attempt(link: Backend) -> Buffer:
        return await _read_from(disk, link, b0, n, leaves)

    try:
        return await disk.replicas.read(b0, n, attempt)
    except BadBlocks as exc:
        _refuse_read(disk, b0, exc.indices)
        raise  # not reached


async def _read_from(disk: CryptDisk, link: Backend, b0: int, n: int, leaves: Buffer) -> Buffer:
    """Blocks [b0, b0+n) from one replica, decrypted; raises BadBlocks if some fail."""
    size = n * BS
    ct: Buffer
    if size >= _REUSE_MIN and provides(link, ReadsInto):
        # A big read lands in a pooled buffer (a fresh one would be zeroed first) and,
        # inline, is opened where it lies: the plaintext handed on is that buffer. Not
        # when some blocks' replica writes failed: their ciphertext may be an older
        # version's (adopt_unsure), which opening in place would zero.
        ct = disk._ct_buffers.get(size)
        await cast(ReadsInto, link).pread_into(disk._lay.data_offset(b0), memoryview(ct))
        if disk._aead.inline(n) and not disk._unsure:
            # The range lock keeps these blocks' leaves as they are while we wait.
            bad = disk._cipher.open_in_place(b0, ct, leaves)
            if bad:
                raise BadBlocks(bad)  # the buffer, good blocks' plaintext and zeros, stays here
            return ct
    else:
        ct = await link.pread(disk._lay.data_offset(b0), size)
        if len(ct) != size:
            raise BlockError(errno.EIO, f"replica returned {len(ct)} bytes for a {size}-byte read")
    if disk._aead.inline(n):
        plain, bad = disk._cipher.open(b0, ct, leaves)
    else:
        plain, bad = await disk._aead.open(disk._cipher, b0, ct, leaves)
    if bad and disk._unsure:
        cv, out = memoryview(ct), bytearray(plain)
        bad = [i for i in bad
               if not adopt_unsure(disk, b0 + i, cv[i * BS:(i + 1) * BS],
                                   memoryview(out)[i * BS:(i + 1) * BS])]
        plain = bytes(out)
    if bad:
        raise BadBlocks(bad)
    return plain


def _refuse_read(disk: CryptDisk, b0: int, bad: list[int]) -> NoReturn:
    """Every current replica failed verification (each was reported): EIO."""
    blocks = [b0 + i for i in bad]
    names = ", ".join(repr(r.name) for r in disk.replicas.current) or "none"
    msg = (f"disk {disk.name!r}: block(s) {describe_blocks(blocks)} failed verification on "
           f"every current replica ({names}); the read is refused")
    raise IntegrityError(msg, disk=disk.name, replica=names, blocks=blocks)


def adopt_unsure(disk: CryptDisk, b: int, ct: memoryview, out: memoryview) -> bool:
    """After a failed replica write the block may still hold an older version."""
    for leaf in disk._unsure.get(b, ()):
        if leaf_version(leaf, 0) == POISON_VERSION:
            continue
        plain, bad = disk._cipher.open(b, ct, leaf)
        if not bad:
            out[:] = plain
            disk._commits.set_leaf(b, leaf)
            del disk._unsure[b]
            return True
    return False
