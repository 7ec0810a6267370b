"""CryptDisk: the trusted encryption domain's view of one disk.

The replica is any Backend (normally the untrusted driver's NBD export); it
only ever sees ciphertext, leaf pages and signed superblocks. The logical disk
(4 KiB blocks) is presented as a Backend. Design: docs/dev/crypt-design.md;
bytes: docs/format.md. One module per concern:

- crypt_unlock.py: opening a disk (unlock, check, recover, first commit);
- crypt_survey.py: judging a replica (stale, foreign, tampered), at open or
  when it comes back;
- crypt_open.py: recovery of the replicas from the intent log at open;
- crypt_read.py: the read path (a guest read as one call and one callback);
- crypt_write.py: the write path (seal, intent record, write behind or wait);
- crypt_discard.py: TRIM, WRITE_ZEROES and BLOCK_STATUS (blocks of version 0);
- crypt_commit.py: the commit protocol (leaf pages, superblock, anchor) and the
  trusted records kept between commits (intent log, version counter);
- group_commit.py: the intent log's group commit, the gate ciphertext leaves by;
- this module: the disk's state and how the rest is composed: FLUSH and commit,
  what the replica set asks of the disk, closing.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from trustvbd._native import ReadPlane, WritePlane
from trustvbd.blockdev import (
    Backend,
    BlockError,
    Capabilities,
    NativeClient,
    WritesMayBeLost,
    check_range,
)
from trustvbd.blocks import crypt_discard, crypt_read, crypt_write
from trustvbd.blocks.aead_pool import BULK_MIN, INLINE, AeadPool
from trustvbd.blocks.crypt_commit import Commits
from trustvbd.blocks.crypt_open import first_written, written_ranges
from trustvbd.blocks.crypt_survey import altered_in, survey_replica
from trustvbd.blocks.crypt_unlock import open_disk
from trustvbd.blocks.crypt_verify import VerifyReport, verify_replica
from trustvbd.blocks.disk_state import (
    DiskState,
    TrustedStateError,
    create_disk_state,
    load_kek,
    rekey,
)
from trustvbd.blocks.integrity import (
    ForeignReplicaError,
    IntegrityError,
    IntegrityEvents,
    NameDisk,
    ReplicaRefusedError,
    StaleReplicaError,
)
from trustvbd.blocks.leaf_pages import DEFAULT_CAPACITY, LeafLocks
from trustvbd.blocks.read_buffers import ReadBuffers
from trustvbd.blocks.replica import Replica
from trustvbd.blocks.replica_set import REPLICA_LAG, ReplicaSet
from trustvbd.blocks.write_behind import WRITE_BEHIND_BLOCKS, Seen, WriteBehind
from trustvbd.crypt.aead import BLOCK_SIZE, BlockCipher, new_key_id
from trustvbd.crypt.keys import DiskSecrets, Kek, KeyFileError, WrongKeyError
from trustvbd.crypt.superblock import Layout
from trustvbd.fileops import OS_FILES, FileOps

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
# At most this many bytes of big reads' buffers are pooled (crypt_read.py).
_REUSE_KEPT = 32 * 1024 * 1024
# The longest guest READ the native plane serves (blocks): the most one NBD request holds.
NATIVE_MAX_BLOCKS = 32 * 1024 * 1024 // BLOCK_SIZE
# The plane queues no read on a replica connection with more than this waiting to be
# sent (as NbdClient's HIGH_WATER for its own requests).
HIGH_WATER = 4 << 20


def physical_size(logical_size: int) -> int:
    """Bytes a replica needs for a disk of `logical_size` bytes (about +0.8 %)."""
    return Layout(logical_size).physical_size


class CryptDisk:
    """The logical disk (a Backend) over a ReplicaSet. Use `await CryptDisk.open(...)`."""

    def __init__(self, state: DiskState, name: str, replicas: ReplicaSet,
                 secrets: DiskSecrets, commits: Commits, events: IntegrityEvents,
                 aead: AeadPool | None) -> None:
        self._state = state
        self.name = name
        self._replica = replicas
        self.replicas = replicas
        self._commits = commits
        self._leaves = commits.leaves
        self._lay = commits.lay
        # A fresh key id per open: even if the trusted state and the replicas were restored
        # from a backup (the version counter replayed), no (key, nonce) pair ever repeats.
        key_id = new_key_id()
        self._cipher = BlockCipher(secrets.data_key, secrets.disk_id, key_id)
        # Whole requests go through the pool: big ones run on its threads.
        self._aead = aead or INLINE
        self.public_key = secrets.public_key
        self._events = events
        # Blocks whose replica write failed: the replica may hold the ciphertext
        # of any of these older leaves instead of the current one.
        self._unsure: dict[int, list[bytes]] = {}
        # block -> (its leaf, its plaintext) as this domain last wrote it (_recent_plain)
        self._recent: dict[int, tuple[bytes, bytes]] = {}
        self._recent_wanted: dict[int, None] = {}  # blocks written partly (crypt_write)
        self._closed = False
        # Set when the commit at open failed with ENOSPC: writes wait for a commit then.
        self._out_of_space: str | None = None
        self._locks = LeafLocks(commits.leaves)  # holding blocks keeps their leaf pages in
        self._ct_buffers = ReadBuffers(_REUSE_KEPT)  # big reads: received, opened and sent from them
        # Guest READs served natively (crypt_read.read_route): big ones only where AES-GCM
        # runs inline (a pool's threads take those in the general path).
        self._plane = ReadPlane(commits.leaves.table, self._cipher.codec, self._locks.wake,
                                replicas._data_start, self._lay.logical_size,
                                NATIVE_MAX_BLOCKS if self._aead.inline(BULK_MIN) else BULK_MIN - 1,
                                HIGH_WATER)
        self._route: tuple[list[Replica], list[NativeClient]] | None = None
        # The common guest WRITE, done natively (crypt_write.write_route): answered before
        # its replicas, so below WRITE_BEHIND_BLOCKS; a commit is near at half the cache dirty.
        self._wplane = WritePlane(commits.leaves.table, self._cipher.codec, self._lay.logical_size,
                                  WRITE_BEHIND_BLOCKS, commits.leaves.capacity // 2)
        self._behind = WriteBehind(name, self._send, early=True, submit=self._submit,
                                   gate=self._commits.when_durable, ended=self._writes_ended)
        self._seen = self._behind.seen()  # flush() and commit() called without a connection
        replicas.verifier = self
        replicas.locks = self._locks
        replicas.admit = self._admit
        replicas.report = self._events.report
        replicas.request_commit = self._commit_soon
        replicas.save_map = commits.save_dirty_map
        self._background: set[asyncio.Task[None]] = set()
        rc = replicas.capabilities
        self._caps = Capabilities(read_only=False, flush=True, fua=True, trim=True, zero=True,
                                  fast_zero=True, cache=True, multi_conn=True)
        self._forward_trim = rc.trim
        self._forward_cache = rc.cache

    # ------------------------------------------------------------ opening

    @classmethod
    async def open(cls, state_dir: Path, disk_name: str, replica: Backend, replica_name: str,
                   kek: Kek,
                   on_integrity_event: Callable[[dict], None] | None = None,
                   aead: AeadPool | None = None, files: FileOps = OS_FILES,
                   leaf_cache_pages: int = DEFAULT_CAPACITY) -> CryptDisk:
        """Open a disk over one replica (see open_mirrored)."""
        return await cls.open_mirrored(state_dir, disk_name, [(replica_name, replica)], kek,
                                       on_integrity_event, aead, files, leaf_cache_pages)

    @classmethod
    async def open_mirrored(cls, state_dir: Path, disk_name: str,
                            replicas: list[tuple[str, Backend]], kek: Kek,
                            on_integrity_event: Callable[[dict], None] | None = None,
                            aead: AeadPool | None = None, files: FileOps = OS_FILES,
                            leaf_cache_pages: int = DEFAULT_CAPACITY,
                            lag: float = REPLICA_LAG, shown_dir: Path | None = None,
                            name_disk: NameDisk | None = None) -> CryptDisk:
        """Unlock the disk and bring its replicas to a verified, committed state.

        Reads each replica's superblocks and the leaf pages the intent log names;
        other leaf pages are read when first needed, at most `leaf_cache_pages` (4 KiB
        each) kept, so memory and open time do not grow with the disk.

        Formats all-zero replicas on first use (trusted epoch 0 only). With one
        replica, raises WrongKeyError, TrustedStateError, StaleReplicaError,
        ForeignReplicaError, ReplicaRefusedError, or IntegrityError (metadata damage
        that cannot be confined to some blocks). With several, a replica that cannot
        serve is degraded (resynced in the background) or failed (refused), and the
        disk opens while one replica the anchor lists as current can serve; one that
        leaves a read unanswered for `lag` s ([limits] replica_lag) while another
        answered is degraded too, not waited for. `shown_dir`: the state directory as
        messages name it, when `state_dir` is another way to it (a directory fd's /proc path);
        `name_disk`: which disk of this system a disk id is, to name the disk a refused
        replica holds.
        """
        return await open_disk(cls, state_dir, disk_name, replicas, kek, on_integrity_event, aead,
                               files, leaf_cache_pages, lag, shown_dir, name_disk)

    @property
    def integrity_events(self) -> int:
        return self._events.count

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
        return self._commits.epoch

    def _check_usable(self) -> None:
        if self._commits.failed is not None:
            raise BlockError(errno.EIO, self._commits.failed)
        if self._closed:
            raise BlockError(errno.EIO, f"disk {self.name!r} is closed")

    # ------------------------------------------------------------ the data path
    # Each concern in its own module, its functions bound here as methods: a guest's
    # request reaches its work with no call layer in between.

    pread = crypt_read.pread
    read_route = crypt_read.read_route
    resume_read = crypt_read.resume_read
    _read_verified = crypt_read.read_verified
    _adopt_unsure = crypt_read.adopt_unsure

    pwrite = crypt_write.pwrite
    write_inline = crypt_write.write_inline
    write_route = crypt_write.write_route
    write_room = crypt_write.write_room
    writes_taken = crypt_write.writes_taken
    _wait_for_space = crypt_write.wait_for_space
    _acquire = crypt_write.acquire
    _note_settled = crypt_write.note_settled
    _send = crypt_write.send
    _submit = crypt_write.submit
    _writes_ended = crypt_write.writes_ended

    trim = crypt_discard.trim
    zero = crypt_discard.zero
    block_status = crypt_discard.block_status

    # ------------------------------------------------------------ for the replica set

    def bad_blocks(self, first_block: int, ciphertext: memoryview) -> list[int]:
        """Verifier: blocks of `ciphertext` that do not verify against their leaves now."""
        n = len(ciphertext) // BS
        leaves = b"".join(self._leaves.leaf(first_block + i) for i in range(n))
        return self._cipher.bad_blocks(first_block, ciphertext[:n * BS], leaves)

    def written(self, block: int) -> bool:
        """Verifier: whether the block has ciphertext that a replica must hold."""
        return self._leaves.written(block)

    def written_ranges(self) -> list[tuple[int, int]]:
        """Verifier: the block ranges of the leaf pages that may hold a written leaf."""
        return written_ranges(self._leaves)

    def first_written(self, b0: int, b1: int) -> tuple[int, int] | None:
        """Verifier: the first range in [b0, b1) that may hold a written block, or None."""
        return first_written(self._leaves, b0, b1)

    def written_since_commit(self) -> list[int]:
        """Verifier: blocks written since the last full commit."""
        return self._commits.written_since_commit()

    async def altered_pages(self, link: Backend, p0: int, p1: int) -> list[int]:
        """Verifier: leaf pages in [p0, p1) on `link` that do not hash to the trusted tree.
        No commit runs meanwhile (it writes leaf pages before the tree takes them)."""
        await self._commits.enter_write()
        try:
            return await altered_in(link, self._lay, self._commits.tree, p0, p1)
        finally:
            self._commits.leave_write()

    async def _admit(self, r: Replica) -> bool:
        """A replica came back: is it this disk's? True if it must be rebuilt whole."""
        a = self._commits.anchor
        sv = await survey_replica(r.link, self.name, r.name, a, self.public_key, allow_blank=True,
                                  rebuilding=r.whole_table)
        if sv.fresh:
            return True
        return sv.presented is None or sv.presented < r.behind_since

    async def scrub(self, progress: Callable[[int, int], None] | None = None) -> dict:
        """Read every written block of every current replica, verify and repair."""
        self._check_usable()
        return await self.replicas.scrub(progress)

    async def settle(self) -> None:
        """Wait until every write answered before its replicas has reached them (or failed)."""
        await self._behind.drain()

    async def flush(self) -> None:
        await self._flush(self._seen)

    def flusher(self) -> Callable[[], Awaitable[None]]:
        """One connection's FLUSH (FlushesPerConnection): a write answered before its
        replicas that they then failed, or writes a restarted driver may have lost
        (WritesMayBeLost), fail the next FLUSH of each connection open then."""
        seen = self._behind.seen()
        return lambda: self._flush(seen)

    async def _flush(self, seen: Seen, durable: bool = True) -> None:
        self._check_usable()
        await self._wait_for_space()
        try:
            await self._commit(durable=durable)
        except WritesMayBeLost:
            pass  # recorded by _commit: report() says it, here and to every other connection
        self._behind.report(seen)  # writes answered that failed or may be lost since its last FLUSH

    async def commit(self) -> None:
        """A full commit now (leaf pages, superblock, anchor), where a FLUSH may let the
        intent log stand for one (crypt_commit.py): for tools and tests of the protocol."""
        await self._flush(self._seen, durable=False)

    async def cache(self, offset: int, length: int) -> None:
        check_range(self.size, offset, length)
        if self._forward_cache and length:
            b0, b1 = offset // BS, -(-(offset + length) // BS)
            try:
                await self._replica.cache(self._lay.data_offset(b0), (b1 - b0) * BS)
            except BlockError:
                pass

    async def close(self) -> None:
        if self._closed:
            return
        for task in list(self._background):
            task.cancel()
        try:
            await self._behind.drain()
            if (lost := self._behind.unreported()) is not None:
                log.error("disk %r: closing with a write answered before its replicas that they "
                          "failed, never reported by a FLUSH: %s", self.name, lost)
            if self._commits.failed is None and (self._commits.dirty or self._unsure):
                await self._commit()
        finally:
            self._closed = True
            try:
                self._commits.close()
            finally:
                self._state.close()
            await self._replica.close()

    # ------------------------------------------------------------ commit

    async def _commit(self, force: bool = False, durable: bool = False) -> None:
        """Make every write completed so far durable and authenticated; with `durable`
        (a FLUSH or FUA), durable may be enough: the intent log can stand for the commit
        unless a write failed since the last one (crypt_commit.py)."""
        try:
            await self._commits.commit(self._replica, self._before_commit, force,
                                       (lambda: not self._unsure) if durable else None,
                                       self._behind.send_now)
        except WritesMayBeLost as exc:
            # A driver restarted with writes no FLUSH covered: raised once by its link, but
            # every connection (two guests may share the disk) must hear it at its next
            # FLUSH, as a write behind that failed; not only the one whose commit met it.
            self._behind.doubt(exc)
            raise

    def _commit_soon(self) -> None:
        """A replica finished its resync: commit now so it joins without waiting for a flush."""
        async def commit() -> None:
            try:
                if not self._closed:
                    await self._commit()
            except WritesMayBeLost as exc:  # recorded: each guest's next FLUSH says it
                log.warning("disk %s: commit for a joining replica: %s", self.name, exc)
            except Exception as exc:  # the guest's next flush will meet it again
                log.warning("disk %s: commit for a joining replica failed: %s", self.name, exc)

        task = asyncio.get_running_loop().create_task(commit())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _maybe_commit(self, fua: bool) -> None:
        if self._commits.due(fua):
            await self._commit(durable=fua)

    async def _before_commit(self) -> None:
        """Before committing leaves, settle blocks whose replica write failed."""
        self._check_usable()
        for b in sorted(self._unsure):
            if b not in self._unsure:
                continue
            ct = memoryview(await self._read_exact(self._lay.data_offset(b), BS))
            if self._cipher.bad_blocks(b, ct, self._leaves.leaf(b)):
                self._adopt_unsure(b, ct, memoryview(bytearray(BS)))
            self._unsure.pop(b, None)

    async def _read_exact(self, offset: int, length: int) -> bytes:
        data = await self._replica.pread(offset, length)
        if len(data) != length:
            raise BlockError(errno.EIO, f"disk {self.name!r}: a replica returned {len(data)} "
                             f"bytes for a {length}-byte read at {offset}")
        return bytes(data)
