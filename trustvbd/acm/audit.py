"""The tamper-evident audit log: append-only JSON lines, hash-chained and signed.

Each line is {"seq", "time", "kind", "fields", "prev", "hash"}, where hash is the
SHA-256 of the canonical JSON of the other five keys and prev is the previous
record's hash (64 zeros for the first). Editing, removing or reordering a record
breaks the chain.

A chain alone can be rebuilt by anyone who can write the files, so the writer
(the access-control domain) also signs with an Ed25519 key only it holds
(PATH.key, mode 0600; the public key is PATH.pub):

- PATH.head names the last record (seq, hash) with a signature over both,
  rewritten after every append: records cut off the end, or a tail rewritten
  with a new head, are found.
- every CHECKPOINT_EVERY records, at close and before rotation, a "checkpoint"
  record signs the chain up to the record before it, so every rotated file is
  signed on its own too.

When PATH grows past rotate_bytes it is renamed PATH.1, PATH.2, ... (oldest
first) and the chain goes on in a new PATH: seq and prev continue across files.
Group commit: `add` writes a record, `commit` makes every record added since the
last one durable with one fsync of the log and one signed head (`append` is both);
a caller answers for a record only after its commit, so a record acknowledged to a
caller survives a power cut. At most MAX_BATCH records wait for a commit, so a
power cut leaves the head at most that many records behind the log. Files,
formats and guarantees: docs/policy.md.

What this does not stop: someone who can write the files can cut the log back
to an earlier signed state (keep copies of PATH.head elsewhere to catch that),
and someone who can also replace PATH.pub can re-sign everything under a key of
their own: pin the key (`trustvbd audit --verify --key ...` with the fingerprint
the domain logged at its first start).

This module is the writer (AuditLog); audit_format.py holds the records and files as
writer and readers both see them, audit_read.py the readers (verify, follow),
audit_fields.py who may record what and how fields are made to fit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trustvbd.acm import audit_read
from trustvbd.acm.audit_fields import compact_fields
from trustvbd.acm.audit_format import (
    GENESIS,
    MAX_RECORD,
    SIGNING_CONTEXT,
    head_path,
    key_path,
    parse_record,
    public_key_path,
    read_head,
    record_hash,
    rotated_files,
    signed_message,
)
from trustvbd.crypt.sign import Signer, fingerprint
from trustvbd.fileops import OS_FILES, FileOps, write_all, write_file_atomic

CHECKPOINT_EVERY = 64
ROTATE_BYTES = 64 << 20
MAX_BATCH = audit_read.MAX_BATCH  # records written and not yet committed, at most


class AuditError(Exception):
    """The audit log cannot be appended to safely; the message says why and what to do."""


class AuditLog:
    """The one writer of an audit log (an flock on PATH.lock keeps out a second one)."""

    def __init__(self, path: str | Path, *, ops: FileOps = OS_FILES,
                 checkpoint_every: int = CHECKPOINT_EVERY,
                 rotate_bytes: int = ROTATE_BYTES) -> None:
        self.path = Path(path)
        self.ops = ops
        self.checkpoint_every, self.rotate_bytes = checkpoint_every, rotate_bytes
        self._lock = os.open(self.path.with_name(self.path.name + ".lock"),
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise AuditError(f"{self.path}: another process is writing this audit log") from None
        self.fd = -1
        self.torn = False
        self.pending = 0  # records added since the last commit
        try:
            self.fd = ops.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            self.seq, self.last, last_kind = self._resume()
            self._signer = self._load_key()
        except Exception:
            self.close(checkpoint=False)
            raise
        self._last_is_checkpoint = last_kind == "checkpoint"
        # Group commit: what the last commit made durable, and the records added since.
        self._synced_size = os.fstat(self.fd).st_size
        self._durable = (self.seq, self.last, self._last_is_checkpoint)
        # Every record added gets the next number (never reused): a caller asks
        # `durable(before, after)` whether the records it added were committed.
        self.puts = self.committed_puts = 0
        self._dropped: list[tuple[int, int]] = []  # (lo, hi]: added, then lost with a commit
        if self.torn:
            self.append("audit", event="torn-record-removed",
                        note="an append interrupted by a crash left a partial line; it was cut")

    @property
    def public_key(self) -> bytes:
        return self._signer.public_key

    def _load_key(self) -> Signer:
        key, pub = key_path(self.path), public_key_path(self.path)
        try:
            seed = key.read_bytes()
        except FileNotFoundError:
            if self.seq:
                raise AuditError(
                    f"{key} is missing but {self.path} holds signed records: restore the key"
                    " from your backup, or keep the log as evidence and move it (and its"
                    " .head, .pub and rotated files) aside to start a new one") from None
            seed = os.urandom(32)
            write_file_atomic(key, seed, self.ops)
        if len(seed) != 32:
            raise AuditError(f"{key} must hold 32 bytes, it holds {len(seed)}; restore it")
        signer = Signer(seed)
        try:
            stored = pub.read_bytes()
        except FileNotFoundError:
            stored = b""
        if stored != signer.public_key:
            if stored and self.seq:
                raise AuditError(f"{pub} is not the public key of {key}: one of them was"
                                 " replaced; restore both from your backup")
            write_file_atomic(pub, signer.public_key, self.ops)
        return signer

    def _last_records(self) -> tuple[list[dict[str, Any]], Path]:
        """The last records (up to a batch and one), looking into rotated files if PATH is
        empty (crash at rotation); the last one is the log's end."""
        size = os.fstat(self.fd).st_size
        want = (MAX_BATCH + 2) * MAX_RECORD
        tail = os.pread(self.fd, min(size, want), max(0, size - want))
        if tail and not tail.endswith(b"\n"):
            # A crash in the middle of an append: the torn line was never acknowledged
            # (the head was not moved to it), so cut it off.
            keep = tail.rfind(b"\n") + 1
            self.ops.ftruncate(self.fd, size - (len(tail) - keep))
            self.ops.fsync(self.fd)
            tail, self.torn = tail[:keep], True
        where = self.path
        if not tail:
            older = rotated_files(self.path)
            if not older:
                return [], where
            where = older[-1]
            with open(where, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 2 * MAX_RECORD))
                tail = f.read()
        lines = tail.splitlines()
        if not lines:
            return [], where
        rec = parse_record(lines[-1])
        if rec is None:
            raise AuditError(f"{where}: the last record is unreadable; run `trustvbd audit"
                             " --verify`, then move the log aside to start a new one")
        earlier = [r for line in lines[-MAX_BATCH - 1:-1] if (r := parse_record(line))]
        return [*earlier, rec], where

    def _resume(self) -> tuple[int, str, str]:
        """Where the chain ends, checked against the head; refuse to extend a cut log."""
        recs, where = self._last_records()
        last_seq, last_hash, kind = 0, GENESIS, ""
        if recs:
            last_seq, last_hash, kind = recs[-1]["seq"], recs[-1]["hash"], recs[-1]["kind"]
        head = read_head(self.path)
        if head is None:  # a power cut before the first head (the first record commits alone)
            ok = last_seq <= 1
        else:  # the head may be a batch behind: a power cut between the log's fsync and it
            ok = audit_read.head_within_batch(head[:2], last_seq, last_hash, recs)
        if not ok:
            said = f"seq {head[0]}" if head else "no head file"
            raise AuditError(f"{where}: the log ends at seq {last_seq} but its head says"
                             f" {said}: records were cut off or edited. Run `trustvbd audit"
                             " --verify`, keep the log as evidence and move it aside to start"
                             " a new one")
        return last_seq, last_hash, kind

    def append(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Write one record durably (with every record added before it) and return it.

        A record is never refused for its size: block lists become counts and
        ranges, long strings are cut, and as a last resort the fields are
        replaced by a note of what was too large.
        """
        record = self.add(kind, **fields)
        self.commit()
        return record

    def add(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Write one record, durable only once `commit` returns (OSError: not written)."""
        if self.pending >= MAX_BATCH - 1:  # room for this record and a checkpoint
            self.commit()
        record = self._put(kind, fields)
        if kind != "checkpoint":
            self._last_is_checkpoint = False
            if record["seq"] % self.checkpoint_every == 0:
                self.checkpoint()
            if self._durable[0] == 0:  # the first record has its head at once
                self.commit()
            if os.fstat(self.fd).st_size >= self.rotate_bytes:
                self.rotate()  # commits first
        return record

    def _put(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {"seq": self.seq + 1,
                                  "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                                  "kind": kind, "fields": fields, "prev": self.last}
        line = self._line(record)
        if len(line) > MAX_RECORD:
            record["fields"] = compact_fields(fields)
            line = self._line(record)
        if len(line) > MAX_RECORD:
            record["fields"] = {"oversized": True, "bytes": len(line),
                                "keys": sorted(str(k)[:64] for k in fields)[:32]}
            line = self._line(record)
        size = os.fstat(self.fd).st_size
        try:
            write_all(self.ops, self.fd, line)
        except OSError:
            self.ops.ftruncate(self.fd, size)  # never leave a torn record for the next one
            raise
        self.seq, self.last = record["seq"], record["hash"]
        self.pending += 1
        self.puts += 1
        return record

    def commit(self) -> None:
        """Make every record added since the last commit durable: one fsync of the log, then
        the signed head naming the last of them. On OSError none of them is (they are cut
        from the log again) and `durable` says so for each."""
        if not self.pending:
            return
        try:
            self.ops.fsync(self.fd)
            sig = self._signer.sign(SIGNING_CONTEXT, signed_message(self.seq, self.last)).hex()
            head = json.dumps({"seq": self.seq, "hash": self.last, "signature": sig})
            write_file_atomic(head_path(self.path), head.encode(), self.ops)
        except OSError:
            self._drop_pending()
            raise
        self._synced_size = os.fstat(self.fd).st_size
        self._durable = (self.seq, self.last, self._last_is_checkpoint)
        self.pending, self.committed_puts = 0, self.puts

    def _drop_pending(self) -> None:
        """A commit failed: its records are not taken (their callers get errors). Take them
        out of the log again, or the next record would repeat a seq and the chain would read
        as tampered with. Truncating needs no space on a full disk; if even that fails, the
        log keeps them and the next record follows them (a head a batch behind is what a
        power cut leaves, and reopening accepts it)."""
        self._dropped = [*self._dropped[-15:], (self.committed_puts, self.puts)]
        self.pending, self.committed_puts = 0, self.puts
        with contextlib.suppress(OSError):
            self.ops.ftruncate(self.fd, self._synced_size)
            self.ops.fsync(self.fd)
        if os.fstat(self.fd).st_size != self._synced_size:
            # Still there: they stay in the chain, and a later failure must not cut them.
            self._synced_size = os.fstat(self.fd).st_size
            self._durable = (self.seq, self.last, self._last_is_checkpoint)
            return
        self.seq, self.last, self._last_is_checkpoint = self._durable

    def durable(self, before: int, after: int) -> bool:
        """Whether the records added while `puts` went from `before` to `after` are durable
        (committed, and not lost with a failed commit)."""
        return after <= self.committed_puts and not any(
            lo < after and before < hi for lo, hi in self._dropped)

    @staticmethod
    def _line(record: dict[str, Any]) -> bytes:
        record["hash"] = record_hash(record)
        return json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n"

    def checkpoint(self) -> None:
        """Sign the chain so far into the log itself (not only into the head)."""
        if self._last_is_checkpoint or not self.seq:
            return
        sig = self._signer.sign(SIGNING_CONTEXT, signed_message(self.seq, self.last)).hex()
        self._put("checkpoint", {"seq": self.seq, "hash": self.last, "signature": sig,
                                 "key": fingerprint(self.public_key).hex()[:16]})
        self._last_is_checkpoint = True

    def rotate(self) -> None:
        """Close this file with a checkpoint and go on in a new one; the chain continues."""
        self.checkpoint()
        self.commit()
        older = rotated_files(self.path)
        number = int(older[-1].name.rsplit(".", 1)[1]) + 1 if older else 1
        self.ops.replace(self.path, self.path.with_name(f"{self.path.name}.{number}"))
        self.ops.close(self.fd)
        self.fd = self.ops.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.ops.fsync_dir(self.path.parent)
        self._synced_size = 0

    def close(self, checkpoint: bool = True) -> None:
        if self.fd >= 0:
            if checkpoint:
                with contextlib.suppress(OSError):
                    self.checkpoint()
            with contextlib.suppress(OSError):
                self.commit()
            with contextlib.suppress(OSError):
                self.ops.close(self.fd)
            self.fd = -1
        if self._lock >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock)
            self._lock = -1

    # Readers need no instance (and take no lock): they only read (audit_read.py).
    @staticmethod
    def read(path: str | Path) -> list[dict[str, Any]]:
        """Every readable record, across rotated files, oldest first."""
        return audit_read.read(path)

    @staticmethod
    def verify(path: str | Path, public_key: bytes | None = None) -> list[str]:
        return audit_read.verify(path, public_key)

    @staticmethod
    def follow(path: str | Path, poll: float = 0.2) -> Iterator[dict[str, Any]]:
        return audit_read.follow(path, poll)
