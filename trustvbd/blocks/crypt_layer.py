"""CryptDisk: the trusted encryption domain's view of one disk: the data path.

The replica is any Backend (normally the untrusted driver's NBD export); it
only ever sees ciphertext, leaf pages and signed superblocks. The logical disk
(4 KiB blocks) is presented as a Backend. Design: docs/dev/crypt-design.md;
bytes: docs/format.md. One module per concern:

- crypt_open.py: judging a replica at open (stale, foreign, tampered) and
  recovery from the intent log;
- crypt_commit.py: the commit protocol (leaf pages, superblock, anchor) and the
  trusted records kept between commits (intent log, version counter);
- this module: reads and writes.

Write: versions from a reserved counter -> AES-GCM (one call per request) ->
one intent record (old and new leaves) appended to trusted state -> in-memory
leaf table -> ciphertext to the replica. No data journal. A small write without
FUA is answered before the replica takes it (write_behind.py).

Read: range lock (shared) -> leaves -> ciphertext from a replica -> opened and
verified against the leaves. A guest read usually runs as one call (start_read)
and one callback on the driver's reply; what goes wrong continues in the general
path (ReplicaSet.read_on), which fails over, repairs and reports.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, cast

from trustvbd.blockdev import (
    Backend,
    BlockError,
    Buffer,
    Cancellable,
    Capabilities,
    ReadEnded,
    ReadsInto,
    check_range,
    provides,
)
from trustvbd.blocks.aead_pool import INLINE, AeadPool
from trustvbd.blocks.allocation import allocation
from trustvbd.blocks.crypt_commit import Commits
from trustvbd.blocks.crypt_open import describe, recover, survey_replica
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
    ReplicaRefusedError,
    StaleReplicaError,
)
from trustvbd.blocks.leaf_pages import DEFAULT_CAPACITY, LeafLocks, LeafPages
from trustvbd.blocks.ranges import Hold, describe_blocks
from trustvbd.blocks.read_buffers import ReadBuffers
from trustvbd.blocks.replica import BadBlocks, Replica
from trustvbd.blocks.replica_set import REPLICA_LAG, ReplicaSet, SubmittedRead
from trustvbd.blocks.tree_file import TreeFile, TreeFileError
from trustvbd.blocks.write_behind import Seen, WriteBehind
from trustvbd.crypt.aead import (
    BLOCK_SIZE,
    LEAF_SIZE,
    POISON_VERSION,
    BlockCipher,
    leaf_version,
    new_key_id,
)
from trustvbd.crypt.keys import DiskSecrets, Kek, KeyFileError, WrongKeyError
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, Layout
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
# Largest run of blocks one discard intent record covers.
_DISCARD_CHUNK = 1 << 16
# Reads of this many bytes or more receive their ciphertext into pooled buffers and
# are opened there; at most _REUSE_KEPT bytes of them are pooled.
_REUSE_MIN = 64 * 1024
_REUSE_KEPT = 32 * 1024 * 1024
# Single blocks whose plaintext a write remembers (per disk), for the read-modify-write
# of a block rewritten a few bytes at a time (e2fsprogs updates superblock fields so).
_RECENT_BLOCKS = 8


class _QuickRead:
    """One guest read served by callbacks (CryptDisk.start_read; ReadCall of the replica set).

    Holds the range lock until it ends; `ended` gets the plaintext (the received buffer,
    opened in place) or the BlockError to answer with. After `cancel` it gets nothing.
    """

    __slots__ = ("_ended", "b0", "ct", "disk", "hold", "leaves", "length", "n", "start", "sub",
                 "task")

    def __init__(self, disk: CryptDisk, b0: int, n: int, start: int, length: int, hold: Hold,
                 leaves: memoryview, ct: bytearray, ended: ReadEnded) -> None:
        self.disk, self.b0, self.n, self.start, self.length = disk, b0, n, start, length
        self.hold: Hold | None = hold
        self.leaves, self.ct = leaves, ct
        self._ended: ReadEnded | None = ended  # None once cancelled
        self.sub: SubmittedRead[Buffer] | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def into(self) -> memoryview:
        return memoryview(self.ct)

    def attempt(self, link: Backend) -> Awaitable[Buffer]:
        return self.disk._read_from(link, self.b0, self.n, self.leaves)

    def replied(self) -> Buffer:
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
        self._release()
        # No cycles left (sub -> this -> sub): the buffer goes back to its pool at once,
        # not at the next garbage collection.
        self.sub = self.task = None
        ended = self._ended
        if ended is None:
            return  # cancelled
        self._ended = None
        if isinstance(result, BaseException):
            if not isinstance(result, BlockError):
                log.error("disk %r: a read failed unexpectedly", self.disk.name, exc_info=result)
                result = BlockError(errno.EIO, f"internal error: {result}")
            ended(result)
        elif self.start == 0 and self.length == len(result):
            ended(result)
        else:
            ended(memoryview(result)[self.start:self.start + self.length])

    def go_on(self, rest: Coroutine[Any, Any, Buffer]) -> None:
        self.task = asyncio.get_running_loop().create_task(self._go_on(rest))

    async def _go_on(self, rest: Coroutine[Any, Any, Buffer]) -> None:
        result: Buffer | BaseException
        try:
            result = await rest
        except BadBlocks as exc:  # every current replica failed verification (reported)
            try:
                self.disk._refuse_read(self.b0, exc.indices)
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
            if self.sub is not None:
                self.sub.cancel()
                self.sub = None
            self._release()


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
        self._closed = False
        # Set when the commit at open failed with ENOSPC: writes wait for a commit then.
        self._out_of_space: str | None = None
        self._locks = LeafLocks(commits.leaves)  # holding blocks keeps their leaf pages in
        self._ct_buffers = ReadBuffers(_REUSE_KEPT)  # big reads: received, opened and sent from them
        self._behind = WriteBehind(name, self._send, expect_flush=self._commits.sync_early)
        self._seen = self._behind.seen()  # flush() and commit() called without a connection
        replicas.verifier = self
        replicas.locks = self._locks
        replicas.admit = self._admit
        replicas.report = self._events.report
        replicas.request_commit = self._commit_soon
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
                            lag: float = REPLICA_LAG) -> CryptDisk:
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
        answered is degraded too, not waited for.
        """
        state = DiskState(Path(state_dir), disk_name, files)  # files: tests cut the power there
        rs: ReplicaSet | None = None
        tree: TreeFile | None = None
        try:
            state.check_format()
            secrets = state.unlock(kek)
            anchor = state.read_anchor()
            if anchor.disk_id != secrets.disk_id:
                raise TrustedStateError(
                    f"{state.anchor_path} belongs to disk id {anchor.disk_id.hex()}, but the keys "
                    f"are for disk id {secrets.disk_id.hex()}; the state directory is mixed up")
            lay = Layout(anchor.logical_size)
            for replica_name, replica in replicas:
                who = describe(disk_name, replica_name)
                if replica.capabilities.read_only:
                    raise ReplicaRefusedError(
                        f"{who} is read-only; an encrypted disk needs a writable replica")
                if replica.size < lay.physical_size:
                    raise ReplicaRefusedError(
                        f"{who} is {replica.size} bytes, but disk {disk_name!r} ({lay.logical_size} "
                        f"bytes) needs {lay.physical_size}; grow the backing file")
            events = IntegrityEvents(disk_name, on_integrity_event)
            tree = _open_tree(state, disk_name, lay, anchor.root, files)
            leaves = LeafPages(disk_name, lay, tree, leaf_cache_pages, events.report)
            cipher = BlockCipher(secrets.data_key, secrets.disk_id)
            opened = await recover(replicas, disk_name, state, anchor, secrets.public_key, cipher,
                                   leaves, lag)
            for replica_name, e in opened.events:
                events.report(e.what, replica_name, e.blocks, e.message)
            rs = ReplicaSet(disk_name, lay, opened.replicas)
            rs.epoch, rs.lag = anchor.epoch, lag
            leaves.replicas = rs
            commits = Commits(state, disk_name, anchor, secrets, leaves, tree, {})
            self = cls(state, disk_name, rs, secrets, commits, events, aead)
            try:
                await self._commit(force=True)
            except BlockError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                # The driver is out of space: serve reads (they need nothing written) and
                # answer writes ENOSPC until this commit goes through (_wait_for_space).
                who = (describe(disk_name, replicas[0][0]) + " is" if len(replicas) == 1 else
                       f"every replica of disk {disk_name!r} is")
                self._out_of_space = (f"disk {disk_name!r}: {who} out of space, so nothing can "
                                      "be written until space is freed under it")
                log.error("%s; reads are served", self._out_of_space)
        except BaseException:
            state.close()
            if tree is not None:
                tree.close()
            raise
        rs.recovery.start()
        return self

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

    async def pread(self, offset: int, length: int) -> Buffer:
        check_range(self.size, offset, length)
        self._check_usable()
        if length == 0:
            return b""
        b0, b1 = offset // BS, -(-(offset + length) // BS)
        hold = self._locks.try_acquire(b0, b1, False) or await self._acquire(b0, b1, False)
        try:
            out = await self._read_verified(b0, b1)
        finally:
            self._locks.release(hold)
        start = offset - b0 * BS
        if start == 0 and length == len(out):
            return out
        return memoryview(out)[start:start + length]

    def start_read(self, offset: int, length: int, ended: ReadEnded) -> Cancellable | None:
        """A read as one call down and one callback up (StartsReads): the range lock and the
        leaves taken at once, the ciphertext submitted to the first replica (its reply opened
        in place, in the buffer the guest's reply carries), with no coroutine. Anything
        unusual goes on in the general path (_QuickRead.go_on); None when it must take it
        from the start: a lock or leaf page not at hand, blocks never written (pread answers
        them inline), a read too big to open inline, doubt about what a replica holds."""
        b0, b1 = offset // BS, -(-(offset + length) // BS)
        n = b1 - b0
        if (length <= 0 or offset < 0 or offset + length > self._lay.logical_size
                or not self._aead.inline(n) or self._closed or self._commits.failed is not None
                or self._behind.lost):
            return None
        unsure = self._unsure
        if unsure and any(b in unsure for b in range(b0, b1)):
            return None  # the ciphertext may be an older leaf's (_adopt_unsure)
        hold = self._locks.try_acquire(b0, b1, False)
        if hold is None:
            return None
        leaves = self._leaves.get(b0, b1)
        if leaves.count(0) == len(leaves):  # never written or zeroed (as all_zero)
            self._locks.release(hold)
            return None
        size = n * BS
        ct = self._ct_buffers.get(size) if size >= _REUSE_MIN else bytearray(size)
        read = _QuickRead(self, b0, n, offset - b0 * BS, length, hold, memoryview(leaves), ct,
                          ended)
        sub = self.replicas.submit_read(b0, n, read)
        if sub is None:
            self._locks.release(hold)
            return None
        read.sub = sub
        return read

    async def _read_verified(self, b0: int, b1: int) -> Buffer:
        """Plaintext of blocks [b0, b1), every block checked against its leaf.

        The one place data is read from a replica, so mirroring can retry on
        the next replica and repair here.
        """
        n = b1 - b0
        if self._behind.lost:
            self._behind.check_read(b0, b1)
        if self._leaves.all_zero(b0, b1):
            return bytearray(n * BS)  # never written or zeroed: no driver involved
        leaves = memoryview(self._leaves.get(b0, b1))  # the range lock holds their pages

        async def attempt(link: Backend) -> Buffer:
            return await self._read_from(link, b0, n, leaves)

        try:
            return await self.replicas.read(b0, n, attempt)
        except BadBlocks as exc:
            self._refuse_read(b0, exc.indices)
            raise  # not reached

    async def _read_from(self, link: Backend, b0: int, n: int, leaves: memoryview) -> Buffer:
        """Blocks [b0, b0+n) from one replica, decrypted; raises BadBlocks if some fail."""
        size = n * BS
        ct: Buffer
        if size >= _REUSE_MIN and provides(link, ReadsInto):
            # A big read lands in a pooled buffer (a fresh one would be zeroed first) and,
            # inline, is opened where it lies: the plaintext handed on is that buffer. Not
            # when some blocks' replica writes failed: their ciphertext may be an older
            # version's (_adopt_unsure), which opening in place would zero.
            ct = self._ct_buffers.get(size)
            await cast(ReadsInto, link).pread_into(self._lay.data_offset(b0), memoryview(ct))
            if self._aead.inline(n) and not self._unsure:
                # The range lock keeps these blocks' leaves as they are while we wait.
                bad = self._cipher.open_in_place(b0, ct, leaves)
                if bad:
                    raise BadBlocks(bad)  # the buffer, good blocks' plaintext and zeros, stays here
                return ct
        else:
            ct = await link.pread(self._lay.data_offset(b0), size)
            if len(ct) != size:
                raise BlockError(errno.EIO, f"replica returned {len(ct)} bytes for a {size}-byte read")
        if self._aead.inline(n):
            plain, bad = self._cipher.open(b0, ct, leaves)
        else:
            plain, bad = await self._aead.open(self._cipher, b0, ct, leaves)
        if bad and self._unsure:
            cv, out = memoryview(ct), bytearray(plain)
            bad = [i for i in bad
                   if not self._adopt_unsure(b0 + i, cv[i * BS:(i + 1) * BS],
                                             memoryview(out)[i * BS:(i + 1) * BS])]
            plain = bytes(out)
        if bad:
            raise BadBlocks(bad)
        return plain

    def _refuse_read(self, b0: int, bad: list[int]) -> NoReturn:
        """Every current replica failed verification (each was reported): EIO."""
        blocks = [b0 + i for i in bad]
        names = ", ".join(repr(r.name) for r in self.replicas.current) or "none"
        msg = (f"disk {self.name!r}: block(s) {describe_blocks(blocks)} failed verification on "
               f"every current replica ({names}); the read is refused")
        raise IntegrityError(msg, disk=self.name, replica=names, blocks=blocks)

    # ------------------------------------------------------------ for the replica set

    def bad_blocks(self, first_block: int, ciphertext: memoryview) -> list[int]:
        """Verifier: blocks of `ciphertext` that do not verify against their leaves now."""
        n = len(ciphertext) // BS
        leaves = b"".join(self._leaves.leaf(first_block + i) for i in range(n))
        return self._cipher.bad_blocks(first_block, ciphertext[:n * BS], leaves)

    def written(self, block: int) -> bool:
        """Verifier: whether the block has ciphertext that a replica must hold."""
        return self._leaves.written(block)

    async def _admit(self, r: Replica) -> bool:
        """A replica came back: is it this disk's? True if it must be rebuilt whole."""
        a = self._commits.anchor
        sv = await survey_replica(r.link, self.name, r.name, a, self.public_key, allow_blank=True)
        if sv.fresh:
            return True
        return sv.presented is None or sv.presented < r.behind_since

    async def scrub(self, progress: Callable[[int, int], None] | None = None) -> dict:
        """Read every written block of every current replica, verify and repair."""
        self._check_usable()
        return await self.replicas.scrub(progress)

    def _adopt_unsure(self, b: int, ct: memoryview, out: memoryview) -> bool:
        """After a failed replica write the block may still hold an older version."""
        for leaf in self._unsure.get(b, ()):
            if leaf_version(leaf, 0) == POISON_VERSION:
                continue
            plain, bad = self._cipher.open(b, ct, leaf)
            if not bad:
                out[:] = plain
                self._commits.set_leaf(b, leaf)
                del self._unsure[b]
                return True
        return False

    async def _wait_for_space(self) -> None:
        """After an open on a full driver: commit first, or refuse the write with ENOSPC."""
        if self._out_of_space is None:
            return
        try:
            await self._commit(force=True)
        except BlockError as exc:
            if exc.errno == errno.ENOSPC:
                raise BlockError(errno.ENOSPC, self._out_of_space) from None
            raise
        self._out_of_space = None
        log.warning("disk %r: its replicas take writes again", self.name)

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        # The common write (lock free, no commit running, sealed inline) awaits nothing:
        # each step that may wait is tried without a coroutine first.
        length = len(data)
        check_range(self._lay.logical_size, offset, length)
        self._check_usable()
        if self._out_of_space is not None:
            await self._wait_for_space()
        commits = self._commits
        if length:
            b0, b1 = offset // BS, -(-(offset + length) // BS)
            if not commits.try_enter_write():
                await commits.enter_write()
            behind = False  # the lock and the writer count went on with the write behind
            try:
                hold = self._locks.try_acquire(b0, b1, True) or await self._acquire(b0, b1, True)
                try:
                    if offset % BS == 0 and length % BS == 0:
                        plain = memoryview(data).cast("B")
                    else:
                        data = await self._merge(b0, b1, offset, data)
                        plain = memoryview(data)
                    n = b1 - b0
                    version = commits.take_versions(n)
                    if self._aead.inline(n):
                        ct, new = self._cipher.seal(b0, version, plain)
                    else:
                        ct, new = await self._aead.seal(self._cipher, b0, version, plain)
                    old = self._note_write(b0, new)
                    if n == 1:
                        self._remember(b0, new, data)
                    if not fua and self._behind.takes(n):
                        # No await between recording the write and handing it over. While a
                        # FLUSH waits for the writers, joining a run would only delay it.
                        self._behind.add(b0, old, ct, partial(self._write_ended, hold),
                                         gather=not commits.committing)
                        behind = True
                    else:
                        # With FUA: durable by itself, so the FLUSH that follows (commit)
                        # often has nothing left to send the replicas (reconnect.py).
                        await self._send(b0, old, ct, fua)
                finally:
                    if not behind:
                        self._locks.release(hold)
            finally:
                if not behind:
                    commits.leave_write()
        if commits.due(fua):
            await self._commit(durable=fua)

    async def _acquire(self, b0: int, b1: int, exclusive: bool) -> Hold:
        """The range lock the slow way: if an unsent run of writes behind holds these
        blocks (or the leaf pages they need), it goes to the replicas now."""
        self._behind.send_now()
        return await self._locks.acquire(b0, b1, exclusive)

    def _write_ended(self, hold: Hold) -> None:
        """A write behind got its replicas' answer (or failed): as after a waited write."""
        self._locks.release(hold)
        self._commits.leave_write()

    async def _merge(self, b0: int, b1: int, offset: int, data: Buffer) -> bytearray:
        """Read-modify-write for a request that covers blocks partially."""
        buf = bytearray((b1 - b0) * BS)
        end = offset + len(data)
        if offset % BS:
            buf[:BS] = self._recent_plain(b0) or await self._read_verified(b0, b0 + 1)
        if end % BS and (b1 - 1 > b0 or offset % BS == 0):
            buf[-BS:] = self._recent_plain(b1 - 1) or await self._read_verified(b1 - 1, b1)
        buf[offset - b0 * BS:end - b0 * BS] = data
        return buf

    def _remember(self, b: int, leaf: bytes, plain: Buffer) -> None:
        """Keep a one-block write's plaintext (a few blocks per disk, the newest); a
        `bytes` one (the guest's payload, immutable) is kept as it is, not copied."""
        recent = self._recent
        recent.pop(b, None)
        if len(recent) >= _RECENT_BLOCKS:
            del recent[next(iter(recent))]
        recent[b] = (leaf if type(leaf) is bytes else bytes(leaf),
                     plain if type(plain) is bytes else bytes(plain))

    def _recent_plain(self, b: int) -> bytes | None:
        """Block b's plaintext as this domain last wrote it, if its leaf is still that
        write's (the leaf names the version: any later write, zero or recovery changes
        it), and no replica write of it failed (those blocks read as the replicas left
        them): the read-modify-write of a small write then needs no replica read."""
        got = self._recent.get(b)
        if got is None or self._behind.lost or b in self._unsure:
            return None
        leaf, plain = got
        return plain if self._leaves.get(b, b + 1) == leaf else None

    def _note_settled(self, b0: int, old: Buffer, new: Buffer) -> None:
        """Record a leaf change that alone defines its blocks (zeroed: intent log first,
        then in memory), so earlier doubt about what the replica holds no longer matters.
        A write is settled only once the replica acknowledged it (_send): until then
        every older candidate leaf stays."""
        self._commits.note_leaves(b0, old, new)
        if self._behind.lost:
            self._behind.rewritten(b0, len(new) // LEAF_SIZE)
        if self._unsure:
            for b in range(b0, b0 + len(new) // LEAF_SIZE):
                self._unsure.pop(b, None)

    def _note_write(self, b0: int, new: bytes) -> bytearray:
        """Record a write's new leaves (its intent record held back until _send); return
        the old ones. Not settled (_note_settled): the replicas have not taken it yet."""
        old = self._leaves.get(b0, b0 + len(new) // LEAF_SIZE)
        self._commits.note_leaves(b0, old, new, held=True)
        return old

    async def _send(self, b0: int, old: Buffer, ct: Buffer, fua: bool = False) -> None:
        """The ciphertext of recorded blocks to the replicas; on failure keep what they may hold."""
        n = len(old) // LEAF_SIZE
        start = self._lay.data_offset(b0)
        try:
            # The intent records of these blocks (and of every write before them) first:
            # held back since their writes (_note_write), one pwrite for a whole run.
            self._commits.write_held()
            await self._replica.pwrite(start, ct, fua)
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
        if self._behind.lost:
            self._behind.rewritten(b0, n)

    async def settle(self) -> None:
        """Wait until every write answered before its replicas has reached them (or failed)."""
        await self._behind.drain()

    async def flush(self) -> None:
        await self._flush(self._seen)

    def flusher(self) -> Callable[[], Awaitable[None]]:
        """One connection's FLUSH (FlushesPerConnection): a write answered before its
        replicas that they then failed fails the next FLUSH of each connection open then."""
        seen = self._behind.seen()
        return lambda: self._flush(seen)

    async def _flush(self, seen: Seen, durable: bool = True) -> None:
        self._check_usable()
        await self._wait_for_space()
        await self._commit(durable=durable)
        self._behind.report(seen)  # writes answered early that failed since its last FLUSH

    async def commit(self) -> None:
        """A full commit now (leaf pages, superblock, anchor), where a FLUSH may let the
        intent log stand for one (crypt_commit.py): for tools and tests of the protocol."""
        await self._flush(self._seen, durable=False)

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
        await self._wait_for_space()
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
            # A chunk's leaf pages are held at once: at most half the leaf cache.
            chunk = min(_DISCARD_CHUNK, max(1, self._leaves.capacity // 2) * LEAVES_PER_PAGE)
            for c0 in range(w0, w1, chunk):
                c1 = min(c0 + chunk, w1)
                if self._leaves.known_empty(c0, c1):
                    continue  # zeros already, known from the tree: nothing to load or log
                await self._commits.enter_write()
                try:
                    hold = await self._acquire(c0, c1, True)
                    try:
                        old = self._leaves.get(c0, c1)
                        if old.count(0) != len(old):
                            self._note_settled(c0, old, bytes(len(old)))
                        if forward:  # space reclaim only; leaves already say "zeros"
                            try:
                                await self._replica.trim(self._lay.data_offset(c0),
                                                         (c1 - c0) * BS)
                            except BlockError:
                                pass
                    finally:
                        self._locks.release(hold)
                finally:
                    self._commits.leave_write()
                await self._maybe_commit(False)
        await self._maybe_commit(fua)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Holes and data of [offset, offset+length), from the leaves (allocation.py)."""
        check_range(self.size, offset, length)
        self._check_usable()
        return await allocation(self._leaves, self._lay, self._hold_for_status, self._locks.release,
                                offset, length)

    async def _hold_for_status(self, b0: int, b1: int) -> Hold:
        return self._locks.try_acquire(b0, b1, False) or await self._acquire(b0, b1, False)

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
        await self._commits.commit(self._replica, self._before_commit, force,
                                   (lambda: not self._unsure) if durable else None,
                                   self._behind.send_now)

    def _commit_soon(self) -> None:
        """A replica finished its resync: commit now so it joins without waiting for a flush."""
        async def commit() -> None:
            try:
                if not self._closed:
                    await self._commit()
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


def _open_tree(state: DiskState, disk: str, lay: Layout, root: bytes, files: FileOps) -> TreeFile:
    try:
        return TreeFile(state.tree_path, disk, lay.leaf_pages, root, files)
    except TreeFileError as exc:
        raise TrustedStateError(str(exc)) from exc
