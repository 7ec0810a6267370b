"""The encryption domain's trusted state directory: the freshness anchor and friends.

    STATE_DIR/kek.key              32 random bytes, mode 0600 (default KEK)
    STATE_DIR/disks/NAME/keys      wrapped data key and signing key (crypt.keys)
    STATE_DIR/disks/NAME/disk.pub  raw 32-byte Ed25519 public key (for offline verify)
    STATE_DIR/disks/NAME/anchor    last committed epoch, root, counter reservation
    STATE_DIR/disks/NAME/intent.log  leaf changes since the last commit
    STATE_DIR/disks/NAME/tree      the hash tree over the leaf pages (tree_file.py)
    STATE_DIR/disks/NAME/behind/R  blocks replica R missed while it was behind (dirty_map.py)

Nothing here is sent to a driver. Byte layouts are in docs/format.md. The keys
are replaced atomically (temp file, fsync, rename, fsync dir), the anchor is
written in place into the older of its two slots (anchor_file.py); the
intent log is intent_log.py's. Every write, sync and rename
goes through a FileOps (trustvbd/fileops.py), so tests can cut the power.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trustvbd.blocks import anchor_file, dirty_map, tree_file
from trustvbd.blocks.block_runs import BlockRuns
from trustvbd.blocks.intent_log import IntentLog
from trustvbd.blocks.state_checks import TrustedStateError, crc_at
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
from trustvbd.fileops import OS_FILES, FileOps, make_dirs, write_file_atomic

# Where callers have always found them.
__all__ = ["TrustedStateError", "write_file_atomic"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _check_name(disk_name: str) -> None:
    if not _NAME.fullmatch(disk_name):
        raise ValueError(
            f"disk name {disk_name!r} must be 1-128 characters of A-Z a-z 0-9 . _ - "
            "and start with a letter or digit")


# ---------------------------------------------------------------- anchor

_ANCHOR = struct.Struct(">8sII16sQQQ32s")
_ANCHOR_MAGIC = b"TVBDANCR"
MAX_REPLICAS = 8


class Member(enum.IntEnum):
    """What the anchor says of one replica at its epoch."""

    CURRENT = 1   # took every commit up to this epoch: may serve reads
    BEHIND = 2    # missed writes: the blocks are in its dirty map (behind/NAME)
    REBUILD = 3   # refused or untracked: every written block must be copied to it


@functools.lru_cache(maxsize=64)
def replica_id(name: str) -> bytes:
    """How the anchor names a replica: 16 bytes of SHA-256 of its config name (remembered:
    every FLUSH compares the membership with the anchor's, twice)."""
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
        if len(raw) != _ANCHOR.size + 4 or zlib.crc32(raw[:-4]) != crc_at(raw, len(raw) - 4):
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


# ---------------------------------------------------------------- one disk's state


class DiskState:
    """Files of one disk in the trusted state directory."""

    def __init__(self, state_dir: Path, disk_name: str, ops: FileOps = OS_FILES) -> None:
        _check_name(disk_name)
        self.name = disk_name
        self.ops = ops
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "disks" / disk_name
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
                f"no disk {self.name!r} in trusted state {self.state_dir}; "
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

    def read_dirty_map(self, replica: str, blocks: int) -> dirty_map.StoredMap | None:
        """The stored dirty map of `replica` (epoch, blocks, rebuilding), or None if absent or
        unreadable."""
        try:
            raw = self.dirty_map_path(replica).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return dirty_map.decode(raw, blocks)

    def write_dirty_map(self, replica: str, epoch: int, blocks: int,
                        dirty: BlockRuns | Iterable[int], rebuilding: bool = False) -> None:
        """Stored atomically (version 3: its runs, so O(the map), not O(disk), and whether
        the replica is being rebuilt whole)."""
        path = self.dirty_map_path(replica)
        if not self._behind_durable:
            # behind/'s own entry must survive a power cut before a map in it counts. Synced
            # once per open, not only when made here: a process that died between its mkdir
            # and this sync left a directory that looks made but may not survive.
            if not path.parent.is_dir():
                self.ops.mkdir(path.parent, 0o700)
            self.ops.fsync_dir(self.dir)
            self._behind_durable = True
        runs = dirty if isinstance(dirty, BlockRuns) else BlockRuns(dirty)
        write_file_atomic(path, dirty_map.encode(epoch, blocks, runs, rebuilding), self.ops)

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


def disk_with_id(state_dir: Path, names: Iterable[str], disk_id: bytes) -> str | None:
    """Which of these disks of this state directory has this id (its anchor says), if any
    (an encryption domain asks among its own disks: it may read no other's anchor, nor
    list the directory)."""
    for name in names:
        try:
            if DiskState(state_dir, name).read_anchor().disk_id == disk_id:
                return name
        except (OSError, ValueError, TrustedStateError):
            continue
    return None
