"""CryptDisk: the trusted encryption domain's view of one disk over one replica.

The replica is any Backend (normally the untrusted driver's NBD export); it
only ever sees ciphertext, leaf pages and signed superblocks. The logical disk
(4 KiB blocks) is presented as a Backend. Design: docs/dev/crypt-design.md;
bytes: docs/format.md.

Write: versions from a reserved counter -> AES-GCM (one call per request) ->
one intent record (old and new leaves) appended to trusted state -> in-memory
leaf table -> ciphertext to the replica. No data journal.

Commit (FLUSH, FUA, and on our own every AUTO_COMMIT_BLOCKS): dirty leaf pages
-> replica flush -> signed superblock -> replica flush -> trusted anchor (the
commit point) -> intent log reset.

Open: check the replica against the anchor (stale, foreign, tampered), undo
uncommitted leaf changes with the intent log, pick each intent block's newest
version whose ciphertext verifies, and commit a new epoch.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import overload

from trustvbd.blocks.aead_pool import AeadPool, BulkCipher, Sealed
from trustvbd.blocks.backend import Backend, BlockError, Buffer, Capabilities, check_range, pread_into
from trustvbd.blocks.crypt_verify import VerifyReport, verify_replica
from trustvbd.blocks.disk_state import (
    Anchor,
    DiskState,
    IntentLog,
    TrustedStateError,
    create_disk_state,
    load_kek,
    rekey,
)
from trustvbd.blocks.ranges import RangeLock, describe_blocks, runs
from trustvbd.crypt import superblock as sbfmt
from trustvbd.crypt.aead import (
    BLOCK_SIZE,
    LEAF_SIZE,
    POISON_LEAF,
    POISON_VERSION,
    BlockCipher,
    leaf_version,
)
from trustvbd.crypt.keys import DiskSecrets, Kek, KeyFileError, WrongKeyError
from trustvbd.crypt.sign import fingerprint
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, SLOT_SIZE, Layout, SlotKind
from trustvbd.crypt.tree import HASH_SIZE, HashTree, page_hash, root_from_level
from trustvbd.nbd.zero_copy import Lent

__all__ = [
    "CryptDisk",
    "ForeignReplicaError",
    "IntegrityError",
    "Kek",
    "KeyFileError",
    "Layout",
    "ReplicaRefusedError",
    "StaleReplicaError",
    "TrustedStateError",
    "VerifyReport",
    "WrongKeyError",
    "create_disk_state",
    "load_kek",
    "physical_size",
    "rekey",
    "verify_replica",
]

log = logging.getLogger(__name__)

BS = BLOCK_SIZE
# Versions reserved per anchor write: one fsync per 4 GiB written; a restart
# burns what is left of the range.
RESERVE = 1 << 20
# Commit on our own once this many blocks have intents (4 GiB of writes no guest
# flushed; the intent log is then up to 64 MiB): a backstop that bounds the intent
# log and the work recovery does after a crash. Guests flush far more often. It is
# not free: its replica FLUSH forces the writeback of everything written since, and
# new writes wait meanwhile (measured at 1 GiB: a 1 GiB copy without FLUSH ran at
# ~550 MB/s instead of ~700).
AUTO_COMMIT_BLOCKS = 1 << 20
# Largest run of blocks one discard intent record covers.
_DISCARD_CHUNK = 1 << 16
# Largest replica read during recovery.
_RECOVERY_READ_BLOCKS = 256


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


def physical_size(logical_size: int) -> int:
    """Bytes a replica needs for a disk of `logical_size` bytes (about +0.8 %)."""
    return Layout(logical_size).physical_size


class CryptDisk:
    """The logical disk (a Backend) over one replica Backend. Use `await CryptDisk.open(...)`."""

    def __init__(self, state: DiskState, name: str, replica: Backend, replica_name: str,
                 anchor: Anchor, secrets: DiskSecrets,
                 on_integrity_event: Callable[[dict], None] | None, aead: AeadPool | None) -> None:
        self._state = state
        self.name = name
        self._replica = replica
        self.replica_name = replica_name
        self._anchor = anchor
        self._cipher = BlockCipher(secrets.data_key, secrets.disk_id)
        # Whole requests go through _bulk: with a pool, big ones run in its workers.
        self._bulk: BulkCipher | None = aead.cipher(secrets.data_key, secrets.disk_id) if aead else None
        self._signer = secrets.signer()
        self.public_key = secrets.public_key
        self._fingerprint = fingerprint(secrets.public_key)
        self._lay = Layout(anchor.logical_size)
        self._on_event = on_integrity_event
        self.integrity_events = 0
        self._epoch = anchor.epoch
        self._next_version = anchor.counter_high
        self._counter_high = anchor.counter_high
        self._leaves = bytearray(self._lay.leaf_pages * BS)
        self._tree: HashTree | None = None
        self._dirty: set[int] = set()
        self._intent: IntentLog = state.open_intent()
        self._intent_blocks = 0
        # Blocks whose replica write failed: the replica may hold the ciphertext
        # of any of these older leaves instead of the current one.
        self._unsure: dict[int, list[bytes]] = {}
        self._pages_stale = False
        self._failed: str | None = None
        self._closed = False
        self._locks = RangeLock()
        self._writers = 0
        self._writers_idle = asyncio.Event()
        self._writers_idle.set()
        self._no_commit = asyncio.Event()
        self._no_commit.set()
        self._commit_lock = asyncio.Lock()
        rc = replica.capabilities
        self._caps = Capabilities(read_only=False, flush=True, fua=True, trim=True, zero=True,
                                  fast_zero=True, cache=True, multi_conn=True)
        self._forward_trim = rc.trim
        self._forward_cache = rc.cache

    # ------------------------------------------------------------ opening

    @classmethod
    async def open(cls, state_dir: Path, disk_name: str, replica: Backend, replica_name: str,
                   kek: Kek,
                   on_integrity_event: Callable[[dict], None] | None = None,
                   aead: AeadPool | None = None) -> CryptDisk:
        """Unlock the disk and bring `replica` to a verified, committed state.

        Formats an all-zero replica on first use (trusted epoch 0 only). Raises
        WrongKeyError, TrustedStateError, StaleReplicaError, ForeignReplicaError,
        ReplicaRefusedError, or IntegrityError (metadata damage that cannot be
        confined to some blocks).
        """
        state = DiskState(Path(state_dir), disk_name)
        secrets = state.unlock(kek)
        anchor = state.read_anchor()
        if anchor.disk_id != secrets.disk_id:
            raise TrustedStateError(
                f"{state.anchor_path} belongs to disk id {anchor.disk_id.hex()}, but the keys "
                f"are for disk id {secrets.disk_id.hex()}; the state directory is mixed up")
        lay = Layout(anchor.logical_size)
        if replica.capabilities.read_only:
            raise ReplicaRefusedError(
                f"replica {replica_name!r} of disk {disk_name!r} is read-only; "
                "an encrypted disk needs a writable replica")
        if replica.size < lay.physical_size:
            raise ReplicaRefusedError(
                f"replica {replica_name!r} is {replica.size} bytes, but disk {disk_name!r} "
                f"({lay.logical_size} bytes) needs {lay.physical_size}; grow the backing file")
        self = cls(state, disk_name, replica, replica_name, anchor, secrets, on_integrity_event, aead)
        try:
            await self._recover()
        except BaseException:
            state.close()
            if self._bulk is not None:
                self._bulk.forget()
            raise
        return self

    async def _read_exact(self, offset: int, length: int) -> bytes:
        data = await self._replica.pread(offset, length)
        if len(data) != length:
            raise BlockError(
                errno.EIO, f"replica {self.replica_name!r} returned {len(data)} bytes "
                f"for a {length}-byte read at {offset}")
        return bytes(data)

    async def _recover(self) -> None:
        g, a = self._lay, self._anchor
        raw = await self._read_exact(0, 2 * SLOT_SIZE)
        slots = [sbfmt.parse(raw[i * SLOT_SIZE:(i + 1) * SLOT_SIZE], i, self.public_key,
                             a.disk_id) for i in range(2)]
        table = bytearray(await self._read_exact(g.leaf_start, g.leaf_pages * BS))
        fresh, presented = await self._judge_slots(slots, table)
        committed, candidates = self._read_intents()
        for b, leaf in committed.items():  # undo what was not committed
            table[b * LEAF_SIZE:(b + 1) * LEAF_SIZE] = leaf

        hashes = b"".join(page_hash(p, table[p * BS:(p + 1) * BS]) for p in range(g.leaf_pages))
        stored = self._state.read_pages(g.leaf_pages)
        stored_ok = stored is not None and root_from_level(stored, 0) == a.root
        self._pages_stale = not stored_ok
        dirty = {b // LEAVES_PER_PAGE for b in committed}
        if root_from_level(hashes, 0) == a.root:
            damaged = [(i, s) for i, s in enumerate(slots)
                       if s.kind not in (SlotKind.VALID, SlotKind.BLANK)]
            if not fresh and (damaged or presented is None or presented < a.epoch):
                why = "; ".join(f"slot {i}: {s.reason}" for i, s in damaged)
                self._event("superblock", [], f"superblock damaged or outdated on {self._who} "
                            f"(presents epoch {presented}, trusted {a.epoch}; {why}); "
                            "the leaf table is intact and the superblock is rewritten")
        elif presented is None or presented < a.epoch:
            shown = "no valid superblock" if presented is None else f"epoch {presented}"
            raise StaleReplicaError(
                f"{self._who} is stale: it presents {shown} but the trusted epoch is "
                f"{a.epoch}; it will not be served (resync it from a current replica)")
        elif not stored_ok:
            raise IntegrityError(
                f"the leaf table of {self._who} does not match the trusted root, and the "
                "trusted page hashes needed to confine the damage are missing; refusing to "
                "serve this replica", disk=self.name, replica=self.replica_name)
        else:
            assert stored is not None
            dirty.update(self._confine_damage(table, hashes, stored, committed))
            hashes = stored  # the tree holds the committed pages until the commit below

        self._leaves = table
        self._tree = HashTree(hashes)
        await self._choose_versions(candidates, committed)
        self._dirty = dirty
        # Versions below the anchor's bound may have been used before the crash.
        self._next_version = a.counter_high
        self._counter_high = a.counter_high + RESERVE
        await self._commit(force=True)

    @property
    def _who(self) -> str:
        return f"replica {self.replica_name!r} of disk {self.name!r}"

    async def _judge_slots(self, slots: list[sbfmt.Slot],
                           table: bytearray) -> tuple[bool, int | None]:
        """Refuse replicas that are blank-but-stale, foreign, or ahead of the anchor.

        Returns (fresh: format it, newest valid epoch presented or None).
        """
        a = self._anchor
        kinds = [s.kind for s in slots]
        fresh = all(k is SlotKind.BLANK for k in kinds)
        if fresh:
            if a.epoch > 0:
                raise StaleReplicaError(
                    f"{self._who} is blank (presents epoch 0) but the trusted epoch is "
                    f"{a.epoch}: it was wiped or replaced; resync it from a current replica")
            if table.count(0) != len(table) or not await self._data_sample_blank():
                raise ForeignReplicaError(
                    f"{self._who} holds data but no trustvbd superblock; refusing to format "
                    "over data that is not ours (give the disk an empty backing file)")
        elif not any(k in (SlotKind.VALID, SlotKind.DAMAGED) for k in kinds):
            other = next((s for s in slots if s.kind is SlotKind.OTHER_DISK), None)
            if other is not None:
                raise ForeignReplicaError(
                    f"{self._who} holds another trustvbd disk (disk id {other.disk_id.hex()}, "
                    f"this disk is {a.disk_id.hex()}); refusing to use or overwrite it")
            raise ForeignReplicaError(
                f"{self._who} holds data that is not a trustvbd disk; refusing to use or "
                "overwrite it")
        presented = max((s.superblock.epoch for s in slots if s.superblock is not None),
                        default=None)
        if presented is not None and presented > a.epoch + 1:
            raise TrustedStateError(
                f"{self._who} presents epoch {presented}, signed by this disk's key, but the "
                f"trusted anchor is at epoch {a.epoch}: the trusted state is older than the "
                "replica (restored from a backup?); restore the current state directory")
        return fresh, presented

    def _read_intents(self) -> tuple[dict[int, bytes], dict[int, list[bytes]]]:
        """From intent.log: each named block's committed leaf (the old leaf of its first
        record) and its uncommitted candidate leaves, oldest first."""
        a = self._anchor
        base, records = self._intent.read()
        if base is not None and base > a.epoch:
            raise TrustedStateError(
                f"{self._intent.path} continues epoch {base}, beyond the anchor's {a.epoch}")
        if base != a.epoch:
            records = []  # already committed (a crash after the anchor) or empty
        committed: dict[int, bytes] = {}
        candidates: dict[int, list[bytes]] = {}
        for r in records:
            for i in range(len(r.new) // LEAF_SIZE):
                b = r.first_block + i
                if b >= self._lay.blocks:
                    raise TrustedStateError(f"{self._intent.path} names block {b}, past the end")
                if b not in committed:
                    committed[b] = r.old[i * LEAF_SIZE:(i + 1) * LEAF_SIZE]
                candidates.setdefault(b, []).append(r.new[i * LEAF_SIZE:(i + 1) * LEAF_SIZE])
        return committed, candidates

    def _confine_damage(self, table: bytearray, hashes: bytes, stored: bytes,
                        committed: dict[int, bytes]) -> list[int]:
        """Leaf pages the replica altered (per the trusted page hashes): their blocks are
        marked lost, except those whose committed leaf the intent log still holds."""
        g = self._lay
        bad_pages = [p for p in range(g.leaf_pages)
                     if hashes[p * HASH_SIZE:(p + 1) * HASH_SIZE]
                     != stored[p * HASH_SIZE:(p + 1) * HASH_SIZE]]
        lost = []
        for p in bad_pages:
            table[p * BS:(p + 1) * BS] = bytes(BS)
            for b in range(p * LEAVES_PER_PAGE, min((p + 1) * LEAVES_PER_PAGE, g.blocks)):
                if b in committed:
                    table[b * LEAF_SIZE:(b + 1) * LEAF_SIZE] = committed[b]
                else:
                    table[b * LEAF_SIZE:(b + 1) * LEAF_SIZE] = POISON_LEAF
                    lost.append(b)
        self._event("leaf table", lost,
                    f"leaf pages {describe_blocks(bad_pages)} of {self._who} were altered; blocks "
                    f"{describe_blocks(lost)} can no longer be verified and will fail reads until "
                    "rewritten (resync from another replica to restore them)")
        return bad_pages

    async def _data_sample_blank(self) -> bool:
        """Spot-check that a blank-looking replica has no data where blocks go."""
        g = self._lay
        picks = sorted({0, g.blocks - 1, *(i * g.blocks // 16 for i in range(16))})
        for b in picks:
            data = await self._read_exact(g.data_start + b * BS, BS)
            if data.count(0) != BS:
                return False
        return True

    async def _choose_versions(self, candidates: dict[int, list[bytes]],
                               committed: dict[int, bytes]) -> None:
        """For blocks written since the last commit, take the newest version the
        intent log recorded whose ciphertext verifies, else the committed one.
        Only versions the trusted log recorded are ever accepted."""
        scratch = memoryview(bytearray(BS))
        need_read = []
        for b, news in candidates.items():
            if leaf_version(news[-1], 0) == 0:
                self._leaves[b * LEAF_SIZE:(b + 1) * LEAF_SIZE] = news[-1]
            else:
                need_read.append(b)
        g = self._lay
        for b0, b1 in runs(need_read, _RECOVERY_READ_BLOCKS):
            data = memoryview(await self._read_exact(g.data_start + b0 * BS, (b1 - b0) * BS))
            for b in range(b0, b1):
                ct = data[(b - b0) * BS:(b - b0 + 1) * BS]
                for leaf in [*reversed(candidates[b]), committed[b]]:
                    v = leaf_version(leaf, 0)
                    if v == POISON_VERSION:
                        continue
                    if v == 0 or not self._cipher.decrypt(b, ct, memoryview(leaf), scratch):
                        self._leaves[b * LEAF_SIZE:(b + 1) * LEAF_SIZE] = leaf
                        break
                # none verified: the committed leaf stays; reads will report it

    # ------------------------------------------------------------ Backend

    @property
    def size(self) -> int:
        return self._lay.logical_size

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def epoch(self) -> int:
        """The last committed epoch."""
        return self._epoch

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise BlockError(errno.EIO, self._failed)
        if self._closed:
            raise BlockError(errno.EIO, f"disk {self.name!r} is closed")

    async def pread(self, offset: int, length: int) -> Buffer:
        data = await self.pread_lent(offset, length)
        return data.copy() if isinstance(data, Lent) else data

    async def pread_lent(self, offset: int, length: int) -> Buffer | Lent:
        """As pread, but the plaintext may be left in an AEAD slot and lent: the NBD
        server sends it from there and then releases it (nbd/zero_copy.py)."""
        check_range(self.size, offset, length)
        self._check_usable()
        if length == 0:
            return b""
        b0, b1 = offset // BS, -(-(offset + length) // BS)
        hold = await self._locks.acquire(b0, b1, False)
        try:
            out = await self._read_verified(b0, b1, lend=True)
        finally:
            self._locks.release(hold)
        start = offset - b0 * BS
        if start == 0 and length == len(out):
            return out
        if isinstance(out, Lent):
            return Lent(out.view[start:start + length], out.release)
        return memoryview(out)[start:start + length]

    @overload
    async def _read_verified(self, b0: int, b1: int) -> Buffer: ...
    @overload
    async def _read_verified(self, b0: int, b1: int, lend: bool) -> Buffer | Lent: ...

    async def _read_verified(self, b0: int, b1: int, lend: bool = False) -> Buffer | Lent:
        """Plaintext of blocks [b0, b1), every block checked against its leaf.

        The one place data is read from a replica, so mirroring can retry on
        the next replica and repair here. Only with `lend` may it return a Lent.
        """
        n = b1 - b0
        lo, hi = b0 * LEAF_SIZE, b1 * LEAF_SIZE
        if self._leaves.count(0, lo, hi) == hi - lo:
            return bytearray(n * BS)  # never written or zeroed: no driver involved
        leaves = memoryview(self._leaves)[lo:hi]
        if self._bulk is not None and not self._unsure:
            # The range lock keeps these blocks' leaves as they are while we wait.
            start = self._lay.data_start + b0 * BS
            got = await self._bulk.read(b0, leaves, lambda into: pread_into(self._replica, start, into),
                                        lend)
            if got is not None:
                plain, bad = got
                if bad:  # never lent then: nothing to give back
                    self._refuse_read(b0, bad)
                return plain
        ct = await self._replica.pread(self._lay.data_start + b0 * BS, n * BS)
        if len(ct) != n * BS:
            raise BlockError(errno.EIO, f"replica {self.replica_name!r} returned {len(ct)} "
                             f"bytes for a {n * BS}-byte read")
        cv = memoryview(ct)
        # Decrypt in place when the replica handed us a buffer of our own (the NBD
        # client's receive buffer): zero-filling a fresh output buffer cost ~5 % of
        # a sequential read. decrypt() reads each block before writing it. Not
        # while blocks are unsure: _adopt_unsure needs the ciphertext of failures.
        out = ct if type(ct) is bytearray and not self._unsure else bytearray(n * BS)
        if self._bulk is None:
            bad = self._cipher.decrypt(b0, cv, leaves, memoryview(out))
        else:
            bad = await self._bulk.decrypt(b0, cv, leaves, memoryview(out))
        if bad and self._unsure:
            bad = [i for i in bad
                   if not self._adopt_unsure(b0 + i, cv[i * BS:(i + 1) * BS],
                                             memoryview(out)[i * BS:(i + 1) * BS])]
        if bad:
            self._refuse_read(b0, bad)
        return out

    def _refuse_read(self, b0: int, bad: list[int]) -> None:
        blocks = [b0 + i for i in bad]
        msg = (f"disk {self.name!r}: block(s) {describe_blocks(blocks)} read from replica "
               f"{self.replica_name!r} failed verification (altered, moved, replayed "
               "or lost by the driver); the read is refused")
        self._event("data", blocks, msg)
        raise IntegrityError(msg, disk=self.name, replica=self.replica_name, blocks=blocks)

    def _adopt_unsure(self, b: int, ct: memoryview, out: memoryview) -> bool:
        """After a failed replica write the block may still hold an older version."""
        for leaf in self._unsure.get(b, ()):
            if leaf_version(leaf, 0) != POISON_VERSION and not self._cipher.decrypt(
                    b, ct, memoryview(leaf), out):
                self._leaves[b * LEAF_SIZE:(b + 1) * LEAF_SIZE] = leaf
                self._dirty.add(b // LEAVES_PER_PAGE)
                del self._unsure[b]
                return True
        return False

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        check_range(self.size, offset, len(data))
        self._check_usable()
        length = len(data)
        if length:
            b0, b1 = offset // BS, -(-(offset + length) // BS)
            await self._enter_write()
            try:
                hold = await self._locks.acquire(b0, b1, True)
                try:
                    if offset % BS == 0 and length % BS == 0:
                        plain = memoryview(data).cast("B")
                    else:
                        plain = memoryview(await self._merge(b0, b1, offset, data))
                    await self._write_blocks(b0, plain)
                finally:
                    self._locks.release(hold)
            finally:
                self._leave_write()
        await self._maybe_commit(fua)

    async def _merge(self, b0: int, b1: int, offset: int, data: Buffer) -> bytearray:
        """Read-modify-write for a request that covers blocks partially."""
        buf = bytearray((b1 - b0) * BS)
        end = offset + len(data)
        if offset % BS:
            buf[:BS] = await self._read_verified(b0, b0 + 1)
        if end % BS and (b1 - 1 > b0 or offset % BS == 0):
            buf[-BS:] = await self._read_verified(b1 - 1, b1)
        buf[offset - b0 * BS:end - b0 * BS] = data
        return buf

    def _take_versions(self, n: int) -> int:
        """n fresh versions; reserve a new range in the anchor (fsync) before use."""
        v = self._next_version
        if v + n > self._counter_high:
            high = v + n + RESERVE
            anchor = Anchor(self._anchor.disk_id, self._anchor.logical_size,
                            self._anchor.epoch, high, self._anchor.root)
            self._write_anchor(anchor, "reserve nonces")
            self._anchor, self._counter_high = anchor, high
        self._next_version = v + n
        return v

    def _note_leaves(self, b0: int, old: bytes | bytearray, new: bytes | bytearray,
                     settled: bool) -> None:
        """Record a leaf change durably-first (intent log), then in memory.

        `settled`: the new leaves alone define the blocks (zeroed), so earlier doubt
        about what the replica holds no longer matters. A write is settled only once
        the replica acknowledged it: until then every older candidate leaf stays.
        """
        lo, hi = b0 * LEAF_SIZE, b0 * LEAF_SIZE + len(new)
        try:
            self._intent.append(b0, old, new)
        except OSError as exc:
            raise BlockError(errno.EIO, f"disk {self.name!r}: cannot append to "
                             f"{self._intent.path}: {exc}") from exc
        self._leaves[lo:hi] = new
        n = len(new) // LEAF_SIZE
        self._intent_blocks += n
        self._dirty.update(range(b0 // LEAVES_PER_PAGE, (b0 + n - 1) // LEAVES_PER_PAGE + 1))
        if settled and self._unsure:
            for b in range(b0, b0 + n):
                self._unsure.pop(b, None)

    async def _write_blocks(self, b0: int, plain: memoryview) -> None:
        n = len(plain) // BS
        version = self._take_versions(n)
        sealed = await self._bulk.seal(b0, version, plain) if self._bulk is not None else None
        if sealed is not None:  # sent from the worker's slot, no copy
            try:
                await self._write_out(b0, sealed.leaves, sealed.ciphertext, sealed)
            finally:
                sealed.close()
            return
        out = bytearray(n * BS + 16)
        new = bytearray(n * LEAF_SIZE)
        if self._bulk is None:
            self._cipher.encrypt(b0, version, plain, memoryview(out), memoryview(new))
        else:
            await self._bulk.encrypt(b0, version, plain, memoryview(out), memoryview(new))
        await self._write_out(b0, new, memoryview(out)[:n * BS], None)

    async def _write_out(self, b0: int, new: bytes | bytearray, ct: memoryview, sealed: Sealed | None) -> None:
        """Intent first, then the ciphertext to the replica."""
        n = len(new) // LEAF_SIZE
        old = self._leaves[b0 * LEAF_SIZE:(b0 + n) * LEAF_SIZE]
        self._note_leaves(b0, old, new, settled=False)
        start = self._lay.data_start + b0 * BS
        try:
            if sealed is None:
                await self._replica.pwrite(start, ct)
            else:
                await sealed.send(lambda c: self._replica.pwrite(start, c))
        except BaseException:
            # The replica may now hold old or new ciphertext for each block. Earlier
            # failed writes' candidates stay too: the replica may still hold any of them.
            for i in range(n):
                self._unsure.setdefault(b0 + i, []).append(
                    bytes(old[i * LEAF_SIZE:(i + 1) * LEAF_SIZE]))
            raise
        if self._unsure:
            for b in range(b0, b0 + n):
                self._unsure.pop(b, None)

    async def flush(self) -> None:
        self._check_usable()
        await self._commit()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._discard(offset, length, fua, self._forward_trim)

    async def zero(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
        fast: bool = False,
    ) -> None:
        # Always fast: zeroing whole blocks only changes leaves (version 0).
        await self._discard(offset, length, fua, may_trim and self._forward_trim)

    async def _discard(self, offset: int, length: int, fua: bool, forward: bool) -> None:
        """Whole blocks become version 0 (read as zeros); partial ones are rewritten."""
        check_range(self.size, offset, length)
        self._check_usable()
        end = offset + length
        w0, w1 = -(-offset // BS), end // BS
        if w0 >= w1:
            if length:
                await self.pwrite(offset, bytes(length))
        else:
            if offset < w0 * BS:
                await self.pwrite(offset, bytes(w0 * BS - offset))
            if w1 * BS < end:
                await self.pwrite(w1 * BS, bytes(end - w1 * BS))
            for c0 in range(w0, w1, _DISCARD_CHUNK):
                c1 = min(c0 + _DISCARD_CHUNK, w1)
                await self._enter_write()
                try:
                    hold = await self._locks.acquire(c0, c1, True)
                    try:
                        old = self._leaves[c0 * LEAF_SIZE:c1 * LEAF_SIZE]
                        if old.count(0) != len(old):
                            self._note_leaves(c0, old, bytes(len(old)), settled=True)
                        if forward:  # space reclaim only; leaves already say "zeros"
                            try:
                                await self._replica.trim(self._lay.data_start + c0 * BS,
                                                         (c1 - c0) * BS)
                            except BlockError:
                                pass
                    finally:
                        self._locks.release(hold)
                finally:
                    self._leave_write()
                await self._maybe_commit(False)
        await self._maybe_commit(fua)

    async def cache(self, offset: int, length: int) -> None:
        check_range(self.size, offset, length)
        if self._forward_cache and length:
            b0, b1 = offset // BS, -(-(offset + length) // BS)
            try:
                await self._replica.cache(self._lay.data_start + b0 * BS, (b1 - b0) * BS)
            except BlockError:
                pass

    async def close(self) -> None:
        if self._closed:
            return
        try:
            if self._failed is None and (self._dirty or self._unsure):
                await self._commit()
        finally:
            self._closed = True
            self._state.close()
            if self._bulk is not None:
                self._bulk.forget()
            await self._replica.close()

    # ------------------------------------------------------------ commit

    async def _enter_write(self) -> None:
        while not self._no_commit.is_set():
            await self._no_commit.wait()
        self._writers += 1
        self._writers_idle.clear()

    def _leave_write(self) -> None:
        self._writers -= 1
        if self._writers == 0:
            self._writers_idle.set()

    async def _maybe_commit(self, fua: bool) -> None:
        if fua or self._intent_blocks >= AUTO_COMMIT_BLOCKS:
            await self._commit()

    async def _commit(self, force: bool = False) -> None:
        """Make every write completed so far durable and authenticated."""
        async with self._commit_lock:
            self._no_commit.clear()  # new writes wait; writes in flight finish first
            try:
                await self._writers_idle.wait()
                self._check_usable()
                await self._resolve_unsure()
                if self._dirty or force:
                    await self._commit_now()
            finally:
                self._no_commit.set()

    async def _resolve_unsure(self) -> None:
        """Before committing leaves, settle blocks whose replica write failed."""
        for b in sorted(self._unsure):
            if b not in self._unsure:
                continue
            ct = memoryview(await self._read_exact(self._lay.data_start + b * BS, BS))
            out = memoryview(bytearray(BS))
            lo = b * LEAF_SIZE
            if self._cipher.decrypt(b, ct, memoryview(self._leaves)[lo:lo + LEAF_SIZE], out):
                self._adopt_unsure(b, ct, out)
            self._unsure.pop(b, None)

    async def _commit_now(self) -> None:
        g, tree = self._lay, self._tree
        assert tree is not None
        pages = sorted(self._dirty)
        leaves = memoryview(self._leaves)
        for p0, p1 in runs(pages, 1 << 30):
            await self._replica.pwrite(g.leaf_start + p0 * BS, leaves[p0 * BS:p1 * BS])
        await self._replica.flush()  # data and leaf pages durable before the superblock
        changes = {p: page_hash(p, leaves[p * BS:(p + 1) * BS]) for p in pages}
        tree.update(changes)
        epoch = self._epoch + 1
        depth, top = tree.top()
        sb = sbfmt.Superblock(self._anchor.disk_id, g.logical_size, epoch, self._counter_high,
                              tree.root, self._fingerprint, depth, top)
        slot_offset = (epoch % sbfmt.SLOTS) * SLOT_SIZE
        await self._replica.pwrite(slot_offset, sbfmt.encode(sb, self._signer))
        await self._replica.flush()
        anchor = Anchor(self._anchor.disk_id, g.logical_size, epoch, self._counter_high,
                        tree.root)
        try:
            self._write_anchor(anchor, f"commit epoch {epoch}")  # the commit point
        except BlockError as exc:
            # The new anchor may or may not have landed, so the intent log's epoch is
            # in doubt: take no more writes until a reopen sorts it out.
            self._failed = f"{exc.message}; reopen the disk"
            raise
        self._anchor, self._epoch = anchor, epoch
        self._dirty.clear()
        self._intent_blocks = 0
        try:
            self._intent.reset(epoch)
            if self._pages_stale:
                self._state.write_pages(tree.levels[0])
                self._pages_stale = False
            else:
                self._state.update_pages(changes)
        except OSError as exc:
            # Later intents would land in a log recovery ignores: stop taking writes.
            self._failed = (f"disk {self.name!r}: trusted state write failed after commit "
                            f"{epoch} ({exc}); reopen the disk")
            raise BlockError(errno.EIO, self._failed) from exc

    def _write_anchor(self, anchor: Anchor, why: str) -> None:
        try:
            self._state.write_anchor(anchor)
        except OSError as exc:  # nothing changed: the old anchor still stands
            raise BlockError(errno.EIO, f"disk {self.name!r}: cannot {why}: writing "
                             f"{self._state.anchor_path} failed: {exc}") from exc

    # ------------------------------------------------------------ events

    def _event(self, what: str, blocks: list[int], message: str) -> None:
        self.integrity_events += 1
        log.error("integrity: %s", message)
        if self._on_event is not None:
            event = {"event": "integrity", "what": what, "disk": self.name,
                     "replica": self.replica_name, "blocks": blocks, "message": message}
            try:
                self._on_event(event)
            except Exception:  # a broken observer must not break the data path
                log.exception("integrity event callback failed")

