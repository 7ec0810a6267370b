"""CryptDisk's read path: a guest read from the leaves and a replica's ciphertext.

Read: range lock (shared) -> leaves -> ciphertext from a replica -> opened and
verified against the leaves. A guest READ usually runs in the native data plane from
request to reply (the disk's ReadPlane, native/src/python/read_plane.rs, routed by
read_route once per batch of requests); what goes wrong there comes back to
resume_read, in the general path (ReplicaSet.read_after, read_on), which fails over,
repairs and reports. This module is that general path: pread serves whatever the plane
does not take. Blocks whose replica write failed may hold an older leaf's ciphertext:
adopt_unsure.

The functions taking the disk are CryptDisk's methods (bound in its class body,
crypt_layer.py): no call layer between a guest's request and its work.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, NoReturn, cast

from trustvbd._native import ReadPlane
from trustvbd.blockdev import (
    Backend,
    BlockError,
    Buffer,
    NativeClient,
    ReadsInto,
    ReadsNatively,
    check_range,
    provides,
)
from trustvbd.blocks.integrity import IntegrityError
from trustvbd.blocks.ranges import describe_blocks
from trustvbd.blocks.replica import BadBlocks, Replica
from trustvbd.crypt.aead import BLOCK_SIZE, POISON_VERSION, leaf_version

if TYPE_CHECKING:
    from trustvbd._native import NbdClientEngine
    from trustvbd.blocks.crypt_layer import CryptDisk

log = logging.getLogger("trustvbd.blocks.crypt_layer")

BS = BLOCK_SIZE
# Reads of this many bytes or more receive their ciphertext into pooled buffers and
# are opened there (at most crypt_layer._REUSE_KEPT bytes of them are pooled).
_REUSE_MIN = 64 * 1024


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


def read_route(disk: CryptDisk) -> tuple[ReadPlane, list[NativeClient]] | None:
    """Where this batch of guest requests may start READs natively (ServesReadsNatively):
    the disk's ReadPlane and the current replicas' connections, or None when none may
    (the disk closed or failed, writes behind lost, blocks whose replica may hold an older
    version, a current replica without a native connection). Once per batch received."""
    if (disk._closed or disk._commits.failed is not None or disk._behind.lost
            or disk._unsure):
        return None
    rs = disk.replicas
    readers = rs._readers
    route = disk._route
    if route is not None and route[0] is readers:
        for c in route[1]:  # (a loop, not any() of a generator: once per batch received)
            if c.broken is not None:
                route = None
                break
    else:
        route = None
    if route is None:
        route = disk._route = _new_route(disk, readers)
        if route is None:
            return None
    if len(readers) > 1 and rs._watch_timer is None:
        rs._watch_soon()  # it hedges native reads that lag, as any other
    return disk._plane, route[1]


def _new_route(disk: CryptDisk, readers: list[Replica]
               ) -> tuple[list[Replica], list[NativeClient]] | None:
    clients: list[NativeClient] = []
    for r in readers:
        client = r.link.native_client() if isinstance(r.link, ReadsNatively) else None
        if client is None:
            return None
        clients.append(client)
    engines = [c.native_engine() for c in clients]
    if not clients or None in engines:
        return None
    disk._plane.set_links(cast("list[NbdClientEngine]", engines))
    return readers, clients


async def resume_read(disk: CryptDisk, client: NativeClient, offset: int, length: int,
                      failure: BlockError | list[int] | float) -> Buffer:
    """A READ the native plane sent to `client` that went up to Python (its hold released;
    see ServesReadsNatively), served as pread does from here: the range held again, the
    failure charged to that replica, then fail-over, repair and reports (ReplicaSet.
    read_after)."""
    check_range(disk.size, offset, length)
    disk._check_usable()
    b0, b1 = offset // BS, -(-(offset + length) // BS)
    hold = disk._locks.try_acquire(b0, b1, False) or await disk._acquire(b0, b1, False)
    try:
        if disk._behind.lost:
            disk._behind.check_read(b0, b1)
        n = b1 - b0
        if disk._leaves.all_zero(b0, b1):
            out: Buffer = bytearray(n * BS)  # zeroed meanwhile
        else:
            leaves = memoryview(disk._leaves.get(b0, b1))

            async def attempt(link: Backend) -> Buffer:
                return await _read_from(disk, link, b0, n, leaves)

            try:
                out = await disk.replicas.read_after(client, b0, n, failure, attempt)
            except BadBlocks as exc:
                _refuse_read(disk, b0, exc.indices)
    finally:
        disk._locks.release(hold)
    start = offset - b0 * BS
    if start == 0 and length == len(out):
        return out
    return memoryview(out)[start:start + length]


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
