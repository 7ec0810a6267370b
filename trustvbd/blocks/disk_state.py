"""The encryption domain's trusted state directory: the freshness anchor and friends.

    STATE_DIR/kek.key              32 random bytes, mode 0600 (default KEK)
    STATE_DIR/disks/NAME/keys      wrapped data key and signing key (crypt.keys)
    STATE_DIR/disks/NAME/disk.pub  raw 32-byte Ed25519 public key (for offline verify)
    STATE_DIR/disks/NAME/anchor    last committed epoch, root, counter reservation
    STATE_DIR/disks/NAME/intent.log  leaf changes since the last commit
    STATE_DIR/disks/NAME/tree      the hash tree over the leaf pages (tree_file.py)
    STATE_DIR/disks/NAME/behind/R  blocks replica R missed while it was behind

Nothing here is sent to a driver. Byte layouts are in docs/format.md. The keys
are replaced atomically (temp file, fsync, rename, fsync dir), the anchor is
written in place into the older of its two slots (anchor_file.py); the
intent log is appended with one os.write per request, before the request's
ciphertext leaves this process, and fdatasync'ed before a commit writes leaf
pages (docs/dev/crypt-design.md, "Power loss"). Every write, sync and rename
goes through a FileOps (trustvbd/fileops.py), so tests can cut the power.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trustvbd.blocks import anchor_file, tree_file
from trustvbd.crypt.keys import (
    KEK_FILE,
    DiskSecrets,
    Kek,
    KeyFileError,
    WrongKeyError,
    open_keys,
    read_public,
    seal_keys,
)
from trustvbd.crypt.superblock import Layout
from trustvbd.crypt.tree import HASH_SIZE
from trustvbd.fileops import OS_FILES, FileOps, make_dirs, write_file_atomic

__all__ = ["write_file_atomic"]  # where callers have always found it

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class TrustedStateError(Exception):
    """The trusted state directory is missing, corrupt, or behind a replica."""


def _check_name(disk_name: str) -> None:
    if not _NAME.fullmatch(disk_name):
        raise ValueError(
            f"disk name {disk_name!r} must be 1-128 characters of A-Z a-z 0-9 . _ - "
            "and start with a letter or digit")


def _crc_at(raw: bytes, offset: int) -> int:
    """The CRC-32 stored big-endian at `offset` (checksums guard against torn or
    rotten files in trusted state, not against an adversary)."""
    return int(struct.unpack_from(">I", raw, offset)[0])


# ---------------------------------------------------------------- anchor

_ANCHOR = struct.Struct(">8sII16sQQQ32s")
_ANCHOR_MAGIC = b"TVBDANCR"
MAX_REPLICAS = 8


class Member(enum.IntEnum):
    """What the anchor says of one replica at its epoch."""

    CURRENT = 1   # took every commit up to this epoch: may serve reads
    BEHIND = 2    # missed writes: the blocks are in its dirty map (behind/NAME)
    REBUILD = 3   # refused or untracked: every written block must be copied to it


def replica_id(name: str) -> bytes:
    """How the anchor names a replica: 16 bytes of SHA-256 of its config name."""
    return hashlib.sha256(b"trustvbd-replica\x00" + name.encode()).digest()[:16]


@dataclass(frozen=True)
class Anchor:
    """The trusted record of the last commit; a replica is judged against it.

    `members` (anchor record version 3) says what each replica (by replica_id) is
    at `epoch`; None for older records (one replica, membership not recorded).
    """

    disk_id: bytes
    logical_size: int
    epoch: int
    counter_high: int  # every version below this may have been used: never reuse
    root: bytes
    members: tuple[tuple[bytes, Member], ...] | None = None

    def encode(self) -> bytes:
        """As a version-1 anchor file (one 92-byte record; no replica entries)."""
        if self.members is not None:
            raise ValueError("a version-1 anchor cannot record replicas")
        body = _ANCHOR.pack(_ANCHOR_MAGIC, 1, 0, self.disk_id, self.logical_size, self.epoch,
                            self.counter_high, self.root)
        return body + struct.pack(">I", zlib.crc32(body))

    @classmethod
    def decode(cls, raw: bytes, where: Path) -> Anchor:
        """A version-1 anchor file (one 92-byte record, before the two-slot form)."""
        if len(raw) != _ANCHOR.size + 4 or zlib.crc32(raw[:-4]) != _crc_at(raw, len(raw) - 4):
            raise TrustedStateError(f"{where} is corrupt (length or checksum); restore it")
        magic, version, _, disk_id, size, epoch, counter, root = _ANCHOR.unpack_from(raw)
        if magic != _ANCHOR_MAGIC or version != 1:
            raise TrustedStateError(f"{where} is not an anchor of a known version")
        return cls(disk_id, size, epoch, counter, root)

    def member(self, name: str) -> Member | None:
        """What the anchor says of replica `name` (None: not listed, or not recorded)."""
        rid = replica_id(name)
        return next((state for r, state in self.members or () if r == rid), None)

    def lists_current(self, name: str) -> bool | None:
        """Whether `name` may serve at this epoch (None: membership not recorded)."""
        if self.members is None:
            return None
        return self.member(name) is Member.CURRENT

    def with_counter(self, counter_high: int) -> Anchor:
        return dataclasses.replace(self, counter_high=counter_high)


# ---------------------------------------------------------------- dirty maps

_MAP_HEADER = struct.Struct(">8sIIQQ")
_MAP_MAGIC = b"TVBDBHND"


def encode_dirty_map(epoch: int, blocks: int, dirty: Iterable[int]) -> bytes:
    bits = bytearray(-(-blocks // 8))
    for b in dirty:
        bits[b >> 3] |= 1 << (b & 7)
    body = _MAP_HEADER.pack(_MAP_MAGIC, 1, 0, epoch, blocks) + bits
    return body + struct.pack(">I", zlib.crc32(body))


def decode_dirty_map(raw: bytes, blocks: int) -> tuple[int, set[int]] | None:
    """(epoch written for, dirty blocks), or None if it is not a whole map for `blocks` blocks."""
    size = _MAP_HEADER.size + -(-blocks // 8) + 4
    if len(raw) != size or zlib.crc32(raw[:-4]) != _crc_at(raw, size - 4):
        return None
    magic, version, _, epoch, count = _MAP_HEADER.unpack_from(raw)
    if magic != _MAP_MAGIC or version != 1 or count != blocks:
        return None
    bits = raw[_MAP_HEADER.size:-4]
    dirty = {i * 8 + j for i, byte in enumerate(bits) if byte for j in range(8) if byte >> j & 1}
    return epoch, dirty


# ---------------------------------------------------------------- intent log

_LOG_HEADER = struct.Struct(">8sIIQI")
_LOG_MAGIC = b"TVBDINTL"
_LOG_VERSION = 2
_REC_HEAD = struct.Struct(">4sIQ")
_CRC = struct.Struct(">I")
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

    A leaf record may be held back (`append(..., held=True)`) until the next `write_held`
    or any other write of the log: a write answered before its replicas (write_behind.py)
    then costs no system call of its own, and one pwrite carries the records of every
    write of a run, before its ciphertext leaves (crypt_write.send)."""

    def __init__(self, path: Path, ops: FileOps = OS_FILES) -> None:
        self.path = path
        self._ops = ops
        self._fd = ops.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._end: int | None = None  # where the next record goes (None: not read yet)
        self._room = 0  # the file's size: records, then zeros
        # A FLUSH syncs on a thread (crypt_commit.py): a reset must not run inside that
        # sync, or the sync could make a log durable that is truncated and not rewritten.
        self._syncing = threading.Lock()
        self._held = bytearray()  # leaf records not written yet, in order
        # The held records and the write position: a sync on a thread writes them too.
        self._writing = threading.Lock()

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
            self._write(rec)
            held.clear()

    def _write(self, rec: bytes | bytearray) -> None:
        end = self.end
        if end + len(rec) > self._room:
            # Zeros written (not a hole, not fallocate's unwritten extents): the records
            # that go there later dirty data pages only. Synced with the next record.
            need, page = end + len(rec), min(4096, LOG_ROOM)
            room = -(-max(LOG_ROOM, need + min(need, LOG_ROOM_STEP_MAX)) // page) * page
            self._pwrite(bytes(room - self._room), self._room)
            self._room = room
        self._pwrite(rec, end)
        self._end = end + len(rec)

    def _pwrite(self, data: bytes | bytearray, at: int) -> None:
        if self._ops.pwrite(self._fd, data, at) != len(data):
            raise OSError(f"short write to {self.path}")

    def write_held(self) -> None:
        """Write the records held back (before the ciphertext they describe leaves)."""
        if self._held:
            self._put(b"")

    def close(self) -> None:
        if self._fd >= 0:
            self._ops.close(self._fd)
            self._fd = -1

    def reset(self, base_epoch: int, carry: dict[int, bytes] | None = None,
              room: bool = True) -> None:
        """Empty the log; what follows changes the state committed as `base_epoch`.
        `carry`: page hashes the tree file may still lack (one tree record). `room`:
        zeroed room for the records to come (not at a close: the log is then a header).

        Not synced: until the next sync() the old records stay durable, and those
        are obsolete once the anchor of `base_epoch` is (it was synced first); the
        old log's tree records hold at least what `carry` holds. Truncated first, so
        no record of an older log can lie in the new room."""
        with self._syncing:
            self._reset(base_epoch, carry, room)

    def _reset(self, base_epoch: int, carry: dict[int, bytes] | None, room: bool) -> None:
        with self._writing:
            if self._held:  # none at a commit (its writes were sent); they belong to this log
                self._write(self._held)
                self._held.clear()
            self._reset_unlocked(base_epoch, carry, room)

    def _reset_unlocked(self, base_epoch: int, carry: dict[int, bytes] | None,
                        room: bool) -> None:
        self._ops.ftruncate(self._fd, 0)
        self._end = self._room = 0
        head = _LOG_HEADER.pack(_LOG_MAGIC, _LOG_VERSION, 0, base_epoch, 0)
        out = head + struct.pack(">I", zlib.crc32(head))
        if carry:
            out += encode_tree_record(base_epoch, carry)
        if room:
            self._write(out)
        else:
            self._pwrite(out, 0)
            self._end = self._room = len(out)

    def append_tree(self, epoch: int, hashes: dict[int, bytes]) -> None:
        """The page hashes the commit of `epoch` is about to make (before its anchor)."""
        self._put(encode_tree_record(epoch, hashes))

    def sync(self) -> None:
        """Make every record appended so far survive a power cut (once per commit)."""
        self.write_held()
        with self._syncing:
            self._ops.fdatasync(self._fd)

    def mark_flushed(self) -> None:
        """A flush mark (a leaf record of no blocks), appended by a FLUSH that the log
        stands for, before it syncs: the records before it are durable and no version
        older than theirs may be recovered (docs/format.md 2.4)."""
        self.append(0, b"", b"")

    def append(self, first_block: int, old: bytes | bytearray | memoryview,
               new: bytes | bytearray | memoryview, held: bool = False) -> None:
        """One leaf record (_put); with `held`, kept back until `write_held` or the next
        write of the log, which write it first."""
        head = _REC_HEAD.pack(_REC_MAGIC, len(new) // 32, first_block)
        crc = _CRC.pack(zlib.crc32(new, zlib.crc32(old, zlib.crc32(head))))
        with self._writing:
            rec = self._held
            rec += head
            rec += old
            rec += new
            rec += crc
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
        if len(raw) < hsize or zlib.crc32(raw[:_LOG_HEADER.size]) != _crc_at(raw, hsize - 4):
            self._end = len(raw)  # no log to add to: what comes goes after it (reset first)
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
            if zlib.crc32(raw[off:end - 4]) != _crc_at(raw, end - 4):
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
        return out


def encode_tree_record(epoch: int, hashes: dict[int, bytes]) -> bytes:
    rec = bytearray(_REC_HEAD.pack(_TREE_MAGIC, len(hashes), epoch))
    for p in sorted(hashes):
        rec += p.to_bytes(8, "big") + hashes[p]
    return bytes(rec + struct.pack(">I", zlib.crc32(rec)))


# ---------------------------------------------------------------- one disk's state


class DiskState:
    """Files of one disk in the trusted state directory."""

    def __init__(self, state_dir: Path, disk_name: str, ops: FileOps = OS_FILES) -> None:
        _check_name(disk_name)
        self.name = disk_name
        self.ops = ops
        self.dir = Path(state_dir) / "disks" / disk_name
        self.keys_path = self.dir / "keys"
        self.pub_path = self.dir / "disk.pub"
        self.anchor_path = self.dir / "anchor"
        self.intent_path = self.dir / "intent.log"
        self.tree_path = self.dir / "tree"
        self.old_pages_path = self.dir / "pages"  # format 1
        self._behind_durable = False
        self._anchor_slots: anchor_file.AnchorSlots | None = None
        self.intent: IntentLog | None = None

    def _require(self) -> None:
        if not self.keys_path.exists():
            raise TrustedStateError(
                f"no disk {self.name!r} in trusted state {self.dir.parent.parent}; "
                "create it first")

    def unlock(self, kek: Kek) -> DiskSecrets:
        self._require()
        return open_keys(self.keys_path.read_bytes(), kek, f"disk {self.name!r}")

    def public_key(self) -> bytes:
        self._require()
        return read_public(self.keys_path.read_bytes(), f"disk {self.name!r}")[1]

    def _read_anchor_file(self) -> tuple[Anchor, int | None]:
        """The anchor and, for the two-slot form, the newest slot's sequence number."""
        try:
            raw = self.anchor_path.read_bytes()
        except FileNotFoundError:
            raise TrustedStateError(f"{self.anchor_path} is missing; restore it") from None
        if len(raw) == anchor_file.SLOTS * anchor_file.SLOT:
            got = anchor_file.newest(raw)
            if got is None:
                raise TrustedStateError(f"{self.anchor_path} is corrupt (no complete slot); "
                                        "restore it")
            disk_id, size, epoch, counter, root, members = got[1]
            listed = None if members is None else tuple((r, Member(m)) for r, m in members)
            return Anchor(disk_id, size, epoch, counter, root, listed), got[0]
        return Anchor.decode(raw, self.anchor_path), None  # version 1: one record

    def read_anchor(self) -> Anchor:
        return self._read_anchor_file()[0]

    def write_anchor(self, anchor: Anchor) -> None:
        members = (None if anchor.members is None else
                   tuple((rid, int(state)) for rid, state in anchor.members))
        fields = (anchor.disk_id, anchor.logical_size, anchor.epoch, anchor.counter_high,
                  anchor.root, members)
        if self._anchor_slots is None:
            seq = self._read_anchor_file()[1] if self.anchor_path.exists() else None
            if seq is None:  # new, or version 1: replace it whole with the two-slot form
                write_file_atomic(self.anchor_path, anchor_file.new_file(fields), self.ops)
                self._anchor_slots = anchor_file.AnchorSlots(self.anchor_path, 1, self.ops)
                return
            self._anchor_slots = anchor_file.AnchorSlots(self.anchor_path, seq, self.ops)
        self._anchor_slots.write(fields)

    def dirty_map_path(self, replica: str) -> Path:
        return self.dir / "behind" / replica

    def read_dirty_map(self, replica: str, blocks: int) -> tuple[int, set[int]] | None:
        """The stored dirty map of `replica` (epoch, blocks), or None if absent or unreadable."""
        try:
            raw = self.dirty_map_path(replica).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return decode_dirty_map(raw, blocks)

    def write_dirty_map(self, replica: str, epoch: int, blocks: int, dirty: Iterable[int]) -> None:
        path = self.dirty_map_path(replica)
        if not self._behind_durable:
            # behind/'s own entry must survive a power cut before a map in it counts. Synced
            # once per open, not only when made here: a process that died between its mkdir
            # and this sync left a directory that looks made but may not survive.
            if not path.parent.is_dir():
                self.ops.mkdir(path.parent, 0o700)
            self.ops.fsync_dir(self.dir)
            self._behind_durable = True
        write_file_atomic(path, encode_dirty_map(epoch, blocks, dirty), self.ops)

    def drop_dirty_map(self, replica: str) -> None:
        try:
            self.ops.unlink(self.dirty_map_path(replica))
        except FileNotFoundError:
            pass

    def open_intent(self) -> IntentLog:
        if self.intent is None:
            self.intent = IntentLog(self.intent_path, self.ops)
        return self.intent

    def check_format(self) -> None:
        """Refuse a disk made by format 1 (a `pages` file, no `tree`): no migration."""
        if not self.tree_path.exists() and self.old_pages_path.exists():
            raise TrustedStateError(
                f"disk {self.name!r} is in trustvbd format 1 ({self.old_pages_path} and no "
                f"{self.tree_path.name}); this trustvbd reads format 2 only and does not migrate: "
                "copy the disk's data to a new disk with the trustvbd that made it")

    def close(self) -> None:
        if self._anchor_slots is not None:
            self._anchor_slots.close()
            self._anchor_slots = None
        if self.intent is not None:
            self.intent.close()
            self.intent = None


def create_disk_state(state_dir: Path, disk_name: str, logical_size: int, kek: Kek,
                      ops: FileOps = OS_FILES) -> None:
    """First run for a disk: new random keys wrapped by `kek`, anchor at epoch 0.

    The first CryptDisk.open on an all-zero replica formats it.
    """
    layout = Layout(logical_size)
    state = DiskState(state_dir, disk_name, ops)
    if state.keys_path.exists():
        raise TrustedStateError(
            f"disk {disk_name!r} already exists in {state.dir}; refusing to replace its keys")
    make_dirs(state.dir, ops)  # its entry (and disks/'s) must outlive a power cut, as its files
    secrets = DiskSecrets.generate()
    write_file_atomic(state.pub_path, secrets.public_key, ops)
    root = tree_file.create(state.tree_path, layout.leaf_pages, ops)  # a hole: no O(disk) work
    state.write_anchor(Anchor(secrets.disk_id, logical_size, 0, 1, root))
    state.open_intent().reset(0)
    state.close()
    # The keys file last: a crash before this leaves a directory `create` can retry.
    write_file_atomic(state.keys_path, seal_keys(secrets, kek), ops)


def load_kek(state_dir: Path, *, passphrase: str | None = None,
             key_file: Path | None = None) -> Kek:
    """The KEK: a passphrase if given, else a key file (default STATE_DIR/kek.key).

    The default key file is generated (32 random bytes, mode 0600) on first use,
    but never while a disk wrapped by a key file exists: a lost key file must be
    restored, not silently replaced.
    """
    if passphrase is not None:
        return Kek.from_passphrase(passphrase)
    state_dir = Path(state_dir)
    if key_file is not None:
        return Kek.from_key_file(Path(key_file), create=True)
    path = state_dir / "kek.key"
    if not path.exists():
        users = []
        for keys in sorted((state_dir / "disks").glob("*/keys")):
            try:
                if read_public(keys.read_bytes(), str(keys))[2] == KEK_FILE:
                    users.append(keys.parent.name)
            except KeyFileError:
                users.append(keys.parent.name)
        if users:
            raise WrongKeyError(
                f"key file {path} is missing but disks {', '.join(users)} are wrapped by it; "
                "restore it from your backup (a new key would not unlock them)")
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Kek.from_key_file(path, create=True)


def rekey(state_dir: Path, disk_name: str, old_kek: Kek, new_kek: Kek) -> None:
    """Rewrap a disk's keys under `new_kek`; data on replicas is untouched."""
    state = DiskState(Path(state_dir), disk_name)
    secrets = state.unlock(old_kek)
    write_file_atomic(state.keys_path, seal_keys(secrets, new_kek))
