"""The intent log of one disk (STATE_DIR/disks/NAME/intent.log): leaf changes since the
last commit, and page hashes the tree file may not hold yet.

Appended per request, and fdatasync'ed (a group commit on the log's own native thread,
`sync_soon`: group_commit.py)
before the request's ciphertext leaves this process, and before a commit writes leaf
pages (docs/dev/crypt-design.md, "Power loss"). Byte layout: docs/format.md. Every write and sync goes through a FileOps
(trustvbd/fileops.py), so tests can cut the power: a FileOps' own fdatasync is called by
that thread in place of the native one.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import threading
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from trustvbd._native import LogSync, intent_record
from trustvbd.blocks.state_checks import TrustedStateError, crc_at
from trustvbd.crypt.tree import HASH_SIZE
from trustvbd.fileops import OS_FILES, FileOps, OsFileOps

_LOG_HEADER = struct.Struct(">8sIIQI")
_LOG_MAGIC = b"TVBDINTL"
_LOG_VERSION = 2
_REC_HEAD = struct.Struct(">4sIQ")
_REC_MAGIC = b"IREC"
_TREE_MAGIC = b"TREC"
_TREE_ENTRY = 8 + HASH_SIZE
# Zeroed room the intent log keeps ahead of its records: a record written into it and
# fdatasync'ed changes no file size and allocates nothing, so a FLUSH's syncs write data
# only (no journal commit). When full it doubles, by at most LOG_ROOM_STEP_MAX at a time.
LOG_ROOM = 64 * 1024
LOG_ROOM_STEP_MAX = 4 << 20


@dataclass(frozen=True)
class IntentRecord:
    """Leaves of blocks first_block.. before (old) and after (new) one request; with no
    leaves, a flush mark (IntentLog.mark_flushed)."""

    first_block: int
    old: bytes
    new: bytes


@dataclass(frozen=True)
class TreeRecord:
    """Page hashes as of the commit of `epoch`, which the tree file may not hold yet."""

    epoch: int
    hashes: dict[int, bytes]


@dataclass
class LogContents:
    base_epoch: int | None
    records: list[IntentRecord]
    trees: list[TreeRecord]


class IntentLog:
    """Record of leaf changes since the commit of `base_epoch`, and of page hashes the tree
    file may not hold yet (written after the anchor, without fsync). Records are written one
    after another into zeroed room kept ahead of them (LOG_ROOM), not appended.

    A leaf record may be held back (`append(..., held=True)`) until the next `sync`,
    `write_held` or any other write of the log: a write answered before its replicas
    (write_behind.py) then costs no system call of its own; the group commit's sync
    (group_commit.py) writes every record held meanwhile in one pwrite.

    What was written since the last sync that succeeded is kept in memory too: after a
    failed fdatasync the kernel may have dropped those pages (marked clean, never written)
    and a later fdatasync succeeds without them, leaving zeros or older bytes where the log
    reader stops, so records after them would count as durable yet be unreadable. The next
    sync therefore writes that window again, with the zeroed room after it, first."""

    def __init__(self, path: Path, ops: FileOps = OS_FILES) -> None:
        self.path = path
        self._ops = ops
        self._fd = ops.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._end: int | None = None  # where the next record goes (None: not read yet)
        self._room = 0  # the file's size: records, then zeros
        # A FLUSH syncs on a thread (crypt_commit.py): a reset must not run inside that
        # sync, or the sync could make a log durable that is truncated and not rewritten;
        # nor may two syncs (one could call records durable that a failed one dropped).
        self._syncing = threading.Lock()
        self._held = bytearray()  # leaf records not written yet, in order
        # The held records and the write position: a sync on a thread writes them too.
        self._writing = threading.Lock()
        # Written since the last sync that succeeded: the records from offset _unsynced_at
        # (up to _end), and whether a sync failed since (the next one writes them again).
        self._unsynced_at = 0
        self._unsynced = bytearray()
        self._sync_failed = False
        self._resets = 0  # a sync's window is that of the log it began on
        # Records appended since open (never reset), and how many of them a completed
        # sync made durable: ciphertext leaves only once its records are (group_commit.py).
        self.appended = 0
        self.durable = 0
        # The log's own native sync thread (sync_soon), started by the first; the sync
        # under way: what it began (_begin_sync), and what to tell on which loop when done.
        self._sync_thread: LogSync | None = None
        self._began: tuple[int, int, int] = (0, 0, 0)
        self._then: tuple[asyncio.AbstractEventLoop, Callable[[BaseException | None], None]] | None = None
        # The loop watching the thread's pipe, from the first sync on it until the log
        # closes: not added and removed per sync (each pair cost the loop a poll handle,
        # an ioctl and several epoll_ctl calls, and a sync goes per departure of writes
        # behind, per write at QD1). The reader holds the log weakly; a log dropped unclosed
        # stops it on its loop (_unwatch_dropped), which holds the thread, and so its pipe,
        # until then.
        self._watching: tuple[asyncio.AbstractEventLoop, weakref.finalize] | None = None
        self._closed = False

    @property
    def end(self) -> int:
        """Where the next record goes: after the last whole record."""
        if self._end is None:
            self.read()
        assert self._end is not None
        return self._end

    def _put(self, rec: bytes | bytearray) -> None:
        """The held records, then `rec`, in one pwrite: a crash leaves each whole or
        detectably torn (and then none after it)."""
        with self._writing:
            held = self._held
            if held:
                rec = held + rec
            if rec:  # a sync on a thread may have written the held records already
                self._write(rec)
            held.clear()

    def _write(self, rec: bytes | bytearray) -> None:
        end = self._end
        if end is None:
            end = self.end
        if end + len(rec) > self._room:
            # Zeros written (not a hole, not fallocate's unwritten extents): the records
            # that go there later dirty data pages only. Synced with the next record.
            need, page = end + len(rec), min(4096, LOG_ROOM)
            room = -(-max(LOG_ROOM, need + min(need, LOG_ROOM_STEP_MAX)) // page) * page
            self._pwrite(bytes(room - self._room), self._room)
            self._room = room
        self._pwrite(rec, end)
        self._unsynced += rec
        self._end = end + len(rec)

    def _pwrite(self, data: bytes | bytearray, at: int) -> None:
        if self._ops.pwrite(self._fd, data, at) != len(data):
            raise OSError(f"short write to {self.path}")

    def write_held(self) -> None:
        """Write the records held back (before the ciphertext they describe leaves)."""
        if self._held:
            self._put(b"")

    def close(self) -> None:
        thread, self._sync_thread = self._sync_thread, None
        self._closed = True
        if thread is not None:
            thread.close()  # a sync under way ends before the file is closed under it
            if self._then is not None:  # told as ever, on its loop
                self._synced(thread, later=True)
            self._unwatch(thread)
        if self._fd >= 0:
            self._ops.close(self._fd)
            self._fd = -1

    def sync_soon(self, loop: asyncio.AbstractEventLoop,
                  done: Callable[[BaseException | None], None]) -> None:
        """`sync` with its fdatasync on the log's own native thread; `done` is then called
        on `loop` with what it raised (None: durable). One at a time: ask again only after
        `done` was called.

        The held records are written here, on the loop (one pwrite); the thread only
        fdatasyncs, never taking the GIL, and wakes the loop by a pipe the loop watches
        from the first sync until the log closes. Not the loop's default executor nor a
        Python thread: a sync is asked for per run of writes leaving (per write at queue
        depth 1), and each GIL hand-over to a thread costs both threads (bench/README.md)."""
        if self._closed:
            loop.call_soon(done, OSError(errno.EBADF, f"{self.path} is closed"))
            return
        thread = self._sync_thread
        if thread is not None and not thread.alive:
            # Its pipe broke (the outcome of its last sync was taken, as a failure): an
            # ask would wait for a thread that ended. A new thread, a new pipe.
            self._unwatch(thread)
            thread.close()
            thread = self._sync_thread = None
        if thread is None:
            ops = self._ops
            sync = None if type(ops).fdatasync is OsFileOps.fdatasync else partial(
                ops.fdatasync, self._fd)
            thread = self._sync_thread = LogSync(self._fd, self.path.parent.name, sync)
        if not self._syncing.acquire(blocking=False):  # a sync of the log's own (tests)
            loop.call_soon(self.sync_soon, loop, done)
            return
        try:
            self._began = self._begin_sync()
        except BaseException as exc:
            self._syncing.release()
            self._sync_failed = True
            loop.call_soon(done, exc)
            return
        self._then = (loop, done)
        thread.ask()
        if self._watching is None or self._watching[0] is not loop:
            self._unwatch(thread)
            loop.add_reader(thread.fileno(), _readable, weakref.ref(self))
            self._watching = (loop, weakref.finalize(self, _unwatch_dropped, loop, thread))

    def _unwatch(self, thread: LogSync) -> None:
        watching, self._watching = self._watching, None
        if watching is not None:
            watching[1].detach()
            _remove_reader(watching[0], thread)

    def _synced(self, thread: LogSync, later: bool = False) -> None:
        """The native thread's sync ended (after `wait`): the watermark advances.
        `later`: its caller is told on the next loop turn, not inside whoever ended it."""
        self._ended(thread.take(), later)

    def _ended(self, error: BaseException | None, later: bool = False) -> None:
        then, self._then = self._then, None
        assert then is not None
        loop, done = then
        self._end_sync(*self._began, error)
        self._syncing.release()
        if loop.is_closed():
            return  # nothing waits for this sync any more
        if later:
            loop.call_soon(done, error)
        else:
            done(error)

    def reset(self, base_epoch: int, carry: dict[int, bytes] | None = None,
              room: bool = True) -> None:
        """Empty the log; what follows changes the state committed as `base_epoch`.
        `carry`: page hashes the tree file may still lack (one tree record). `room`:
        zeroed room for the records to come (not at a close: the log is then a header).

        Not synced: until the next sync() the old records stay durable, and those
        are obsolete once the anchor of `base_epoch` is (it was synced first); the
        old log's tree records hold at least what `carry` holds. Truncated first, so
        no record of an older log can lie in the new room. Not inside a sync: one under
        way on the log's thread ends first (its caller told on the next loop turn)."""
        if (thread := self._sync_thread) is not None and self._then is not None:
            thread.wait()
            self._synced(thread, later=True)
        with self._syncing, self._writing:
            self._resets += 1
            self._reset(base_epoch, carry, room)

    def _reset(self, base_epoch: int, carry: dict[int, bytes] | None, room: bool) -> None:
        if self._held:  # none at a commit (its writes were sent); they belong to this log
            self._write(self._held)
            self._held.clear()
        self._reset_unlocked(base_epoch, carry, room)

    def _reset_unlocked(self, base_epoch: int, carry: dict[int, bytes] | None,
                        room: bool) -> None:
        self._ops.ftruncate(self._fd, 0)
        self._end = self._room = self._unsynced_at = 0
        self._unsynced.clear()
        head = _LOG_HEADER.pack(_LOG_MAGIC, _LOG_VERSION, 0, base_epoch, 0)
        out = head + struct.pack(">I", zlib.crc32(head))
        if carry:
            out += encode_tree_record(base_epoch, carry)
        if room:
            self._write(out)
        else:
            self._pwrite(out, 0)
            self._unsynced += out
            self._end = self._room = len(out)

    def append_tree(self, epoch: int, hashes: dict[int, bytes]) -> None:
        """The page hashes the commit of `epoch` is about to make (before its anchor)."""
        rec = encode_tree_record(epoch, hashes)
        # Counted and held in one lock hold, as append_encoded does: a sync on a thread
        # that counts it also writes it (else it could call an unwritten record durable).
        with self._writing:
            self.appended += 1
            self._held += rec
        self._put(b"")

    @property
    def all_durable(self) -> bool:
        """Every record appended so far survives a power cut."""
        return self.durable >= self.appended

    def sync(self) -> None:
        """Make every record appended so far survive a power cut (the held ones written
        first), on this thread. Thread-safe: records appended meanwhile wait for the next
        sync; one under way on the log's own thread (sync_soon) ends first."""
        with self._syncing:
            began = self._begin_sync()
            try:
                self._ops.fdatasync(self._fd)
            except BaseException as exc:
                self._end_sync(*began, exc)
                raise
            self._end_sync(*began, None)

    def _begin_sync(self) -> tuple[int, int, int]:
        """A sync's first half (`_syncing` held): the held records written, and after a
        failed sync the window again (class doc). What the fdatasync will make durable:
        (records appended, the log's end, which log: resets so far)."""
        with self._writing:
            upto = self.appended
            if self._held:
                self._write(self._held)
                self._held.clear()
            if self._sync_failed:  # the window again, and the room's zeros (class doc)
                end = self.end
                self._pwrite(self._unsynced + bytes(self._room - end), self._unsynced_at)
            return upto, self._unsynced_at + len(self._unsynced), self._resets

    def _end_sync(self, upto: int, synced_to: int, resets: int,
                  error: BaseException | None) -> None:
        """A sync's second half, once its fdatasync returned (`_syncing` held)."""
        if error is not None:
            self._sync_failed = True
            return
        with self._writing:  # records written meanwhile wait for the next sync
            if resets == self._resets:  # (else a reset replaced the window since)
                self._sync_failed = False
                del self._unsynced[:synced_to - self._unsynced_at]
                self._unsynced_at = synced_to
        if upto > self.durable:
            self.durable = upto

    def mark_flushed(self) -> None:
        """A flush mark (a leaf record of no blocks), appended by a FLUSH that the log
        stands for, before it syncs: the records before it are durable and no version
        older than theirs may be recovered (docs/format.md 2.4)."""
        self.append(0, b"", b"")

    def append(self, first_block: int, old: bytes | bytearray | memoryview,
               new: bytes | bytearray | memoryview, held: bool = False) -> None:
        """One leaf record (_put); with `held`, kept back until `write_held` or the next
        write of the log, which write it first. Encoded natively (`intent_record`, the
        encoder the native write plane uses for its batches: one encoder, `read` decodes)."""
        self.append_encoded(intent_record(first_block, old, new), held)

    def append_encoded(self, records: bytes | bytearray, held: bool = False) -> None:
        """Whole leaf records, in order, as `append` (which encodes one and calls this; the
        native write plane encodes a batch's with the same encoder,
        native/src/intent_record.rs). Every leaf record goes through here."""
        with self._writing:
            self.appended += 1
            self._held += records
        if not held:
            self._put(b"")

    def read(self) -> LogContents:
        """The base epoch (None if the log is empty/unreadable) and the whole records.

        A torn tail (a crash inside the last append) is dropped: that request's
        ciphertext was never sent, since the record is written first. Reading stops at
        the zeroed room too (no magic).
        """
        raw = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        self._room = len(raw)
        hsize = _LOG_HEADER.size + 4
        if len(raw) < hsize or zlib.crc32(raw[:_LOG_HEADER.size]) != crc_at(raw, hsize - 4):
            self._end = len(raw)  # no log to add to: what comes goes after it (reset first)
            if not self._unsynced:
                self._unsynced_at = len(raw)
            return LogContents(None, [], [])
        magic, version, _, base_epoch, _ = _LOG_HEADER.unpack_from(raw)
        if magic != _LOG_MAGIC or version != _LOG_VERSION:
            if magic == _LOG_MAGIC and version == 1:
                raise TrustedStateError(
                    f"{self.path} is a version-1 intent log (trustvbd format 1); this trustvbd "
                    "reads format 2 only: copy the disk's data to a new disk with the trustvbd "
                    "that made it")
            raise TrustedStateError(f"{self.path} is not a version-{_LOG_VERSION} intent log")
        out = LogContents(base_epoch, [], [])
        off = hsize
        while off + _REC_HEAD.size <= len(raw):
            magic, count, first = _REC_HEAD.unpack_from(raw, off)
            size = 64 * count if magic == _REC_MAGIC else _TREE_ENTRY * count
            end = off + _REC_HEAD.size + size + 4
            if magic not in (_REC_MAGIC, _TREE_MAGIC) or end > len(raw):
                break
            if zlib.crc32(raw[off:end - 4]) != crc_at(raw, end - 4):
                break
            body = off + _REC_HEAD.size
            if magic == _REC_MAGIC:
                out.records.append(IntentRecord(first, raw[body:body + 32 * count],
                                                raw[body + 32 * count:end - 4]))
            else:
                hashes = {}
                for i in range(count):
                    at = body + i * _TREE_ENTRY
                    hashes[int.from_bytes(raw[at:at + 8], "big")] = raw[at + 8:at + _TREE_ENTRY]
                out.trees.append(TreeRecord(first, hashes))
            off = end
        self._end = off
        if not self._unsynced:  # what was there before counts as synced
            self._unsynced_at = off
        return out



def encode_tree_record(epoch: int, hashes: dict[int, bytes]) -> bytes:
    rec = bytearray(_REC_HEAD.pack(_TREE_MAGIC, len(hashes), epoch))
    for p in sorted(hashes):
        rec += p.to_bytes(8, "big") + hashes[p]
    return bytes(rec + struct.pack(">I", zlib.crc32(rec)))


def _readable(ref: weakref.ref[IntentLog]) -> None:
    """The sync thread's pipe is readable: the log's sync under way ended. Nothing to do if
    none did (the one that made it readable was taken meanwhile, by a reset or a close
    earlier in the same loop iteration, and another may be under way), or the log is gone."""
    log = ref()
    if log is None or log._then is None or (thread := log._sync_thread) is None:
        return
    try:
        error = thread.take()
    except ValueError:  # no sync has ended: the readiness was the earlier one's
        return
    log._ended(error)


def _remove_reader(loop: asyncio.AbstractEventLoop, thread: LogSync) -> None:
    try:
        loop.remove_reader(thread.fileno())
    except (RuntimeError, ValueError):
        pass  # the loop is closed: nothing watches the pipe any more


def _unwatch_dropped(loop: asyncio.AbstractEventLoop, thread: LogSync) -> None:
    """A log dropped unclosed (from whatever thread collects it): its pipe's reader is
    removed on its loop, and the thread (holding the pipe open until then) dropped after."""
    try:
        loop.call_soon_threadsafe(_remove_reader, loop, thread)
    except RuntimeError:
        pass  # the loop is closed: nothing watches the pipe any more
