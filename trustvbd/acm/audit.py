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
Both files are fsync'ed on every append, so a record acknowledged to a caller
survives a power cut. Files, formats and guarantees: docs/policy.md.

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
        try:
            self.fd = ops.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            self.seq, self.last, last_kind = self._resume()
            self._signer = self._load_key()
        except Exception:
            self.close(checkpoint=False)
            raise
        self._last_is_checkpoint = last_kind == "checkpoint"
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

    def _last_record(self) -> tuple[dict[str, Any] | None, Path]:
        """The last record, looking into rotated files if PATH is empty (crash at rotation)."""
        size = os.fstat(self.fd).st_size
        tail = os.pread(self.fd, min(size, 2 * MAX_RECORD), max(0, size - 2 * MAX_RECORD))
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
                return None, where
            where = older[-1]
            with open(where, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 2 * MAX_RECORD))
                tail = f.read()
        lines = tail.splitlines()
        if not lines:
            return None, where
        rec = parse_record(lines[-1])
        if rec is None:
            raise AuditError(f"{where}: the last record is unreadable; run `trustvbd audit"
                             " --verify`, then move the log aside to start a new one")
        return rec, where

    def _resume(self) -> tuple[int, str, str]:
        """Where the chain ends, checked against the head; refuse to extend a cut log."""
        rec, where = self._last_record()
        last_seq, last_hash, last_prev, kind = 0, GENESIS, GENESIS, ""
        if rec is not None:
            last_seq, last_hash, last_prev, kind = rec["seq"], rec["hash"], rec["prev"], rec["kind"]
        head = read_head(self.path)
        # The second pair: a power cut between the log's fsync and the head's update.
        # No head at all is seq 0: a power cut before the first head was written.
        at = (0, GENESIS) if head is None else head[:2]
        ok = at in ((last_seq, last_hash), (last_seq - 1, last_prev))
        if not ok:
            said = f"seq {head[0]}" if head else "no head file"
            raise AuditError(f"{where}: the log ends at seq {last_seq} but its head says"
                             f" {said}: records were cut off or edited. Run `trustvbd audit"
                             " --verify`, keep the log as evidence and move it aside to start"
                             " a new one")
        return last_seq, last_hash, kind

    def append(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Write one record durably (log fsync, then signed head) and return it.

        A record is never refused for its size: block lists become counts and
        ranges, long strings are cut, and as a last resort the fields are
        replaced by a note of what was too large.
        """
        record = self._write(kind, fields)
        if kind != "checkpoint":
            self._last_is_checkpoint = False
            if record["seq"] % self.checkpoint_every == 0:
                self.checkpoint()
            if os.fstat(self.fd).st_size >= self.rotate_bytes:
                self.rotate()
        return record

    def _write(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
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
            self.ops.fsync(self.fd)
        except OSError:
            self.ops.ftruncate(self.fd, size)  # never leave a torn record for the next one
            raise
        sig = self._signer.sign(SIGNING_CONTEXT, signed_message(record["seq"], record["hash"])).hex()
        head = json.dumps({"seq": record["seq"], "hash": record["hash"], "signature": sig})
        try:
            write_file_atomic(head_path(self.path), head.encode(), self.ops)
        except OSError:
            # The record is in the log but the append fails (its decision is not taken):
            # take it out again, or the next record would repeat its seq and the chain
            # would read as tampered with. Truncating needs no space on a full disk; if
            # even that fails, the log keeps it and the next record follows it (a head
            # one behind is what a power cut leaves, and reopening accepts it).
            try:
                self.ops.ftruncate(self.fd, size)
                self.ops.fsync(self.fd)
            except OSError:
                self.seq, self.last = record["seq"], record["hash"]
            raise
        self.seq, self.last = record["seq"], record["hash"]
        return record

    @staticmethod
    def _line(record: dict[str, Any]) -> bytes:
        record["hash"] = record_hash(record)
        return json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n"

    def checkpoint(self) -> None:
        """Sign the chain so far into the log itself (not only into the head)."""
        if self._last_is_checkpoint or not self.seq:
            return
        sig = self._signer.sign(SIGNING_CONTEXT, signed_message(self.seq, self.last)).hex()
        self._write("checkpoint", {"seq": self.seq, "hash": self.last, "signature": sig,
                                   "key": fingerprint(self.public_key).hex()[:16]})
        self._last_is_checkpoint = True

    def rotate(self) -> None:
        """Close this file with a checkpoint and go on in a new one; the chain continues."""
        self.checkpoint()
        older = rotated_files(self.path)
        number = int(older[-1].name.rsplit(".", 1)[1]) + 1 if older else 1
        self.ops.replace(self.path, self.path.with_name(f"{self.path.name}.{number}"))
        self.ops.close(self.fd)
        self.fd = self.ops.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.ops.fsync_dir(self.path.parent)

    def close(self, checkpoint: bool = True) -> None:
        if self.fd >= 0:
            if checkpoint:
                with contextlib.suppress(OSError):
                    self.checkpoint()
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
