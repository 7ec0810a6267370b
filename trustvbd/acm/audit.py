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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from trustvbd.crypt.sign import PUBLIC_KEY_SIZE, Signer, fingerprint
from trustvbd.crypt.sign import verify as verify_signature
from trustvbd.fileops import OS_FILES, FileOps, write_all, write_file_atomic

GENESIS = "0" * 64
MAX_RECORD = 64 * 1024
CHECKPOINT_EVERY = 64
ROTATE_BYTES = 64 << 20
MAX_STRING = 4096  # longer field strings are cut (the record says by how much)
MAX_RANGES = 64  # block ranges kept when a block list is summarised
_KEYS = {"seq", "time", "kind", "fields", "prev", "hash"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTEXT = b"trustvbd-audit-v1\x00"


class AuditError(Exception):
    """The audit log cannot be appended to safely; the message says why and what to do."""


def record_hash(record: dict[str, Any]) -> str:
    body = {k: record[k] for k in ("seq", "time", "kind", "fields", "prev")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def key_path(path: Path) -> Path:
    return path.with_name(path.name + ".key")


def public_key_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def rotated_files(path: Path) -> list[Path]:
    """PATH.1, PATH.2, ... in order (oldest first)."""
    found = []
    for f in path.parent.glob(path.name + ".*"):
        suffix = f.name[len(path.name) + 1:]
        if suffix.isdigit() and not suffix.startswith("0"):
            found.append((int(suffix), f))
    return [f for _, f in sorted(found)]


def _signed_message(seq: int, digest: str) -> bytes:
    return seq.to_bytes(8, "big") + bytes.fromhex(digest)


def parse_record(line: bytes) -> dict[str, Any] | None:
    """One line as a well-typed record, or None: never an exception, whatever the bytes."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError and bad UTF-8 are ValueErrors
        return None
    if not isinstance(rec, dict) or set(rec) != _KEYS:
        return None
    seq = rec["seq"]
    if type(seq) is not int or not 0 < seq < 1 << 63 or not isinstance(rec["kind"], str):
        return None
    if not isinstance(rec["fields"], dict) or not isinstance(rec["time"], str):
        return None
    if not all(isinstance(rec[k], str) and _HEX64.fullmatch(rec[k]) for k in ("prev", "hash")):
        return None
    return rec


def _read_head(path: Path) -> tuple[int, str, str] | None:
    """(seq, hash, signature hex) of PATH.head; None if absent; seq -1 if unreadable."""
    try:
        raw = head_path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return (-1, "unreadable", "")
    try:
        head = json.loads(raw)
        seq, digest, sig = head["seq"], head["hash"], head.get("signature", "")
        if type(seq) is not int or not 0 <= seq < 1 << 63 or not isinstance(sig, str):
            raise ValueError
        if not (isinstance(digest, str) and (_HEX64.fullmatch(digest))):
            raise ValueError
        return seq, digest, sig
    except (ValueError, KeyError, TypeError, RecursionError, AttributeError):
        return (-1, "unreadable", "")


def _signature_ok(public_key: bytes | None, seq: int, digest: str, sig: object) -> bool:
    if public_key is None or not isinstance(sig, str) or not re.fullmatch(r"[0-9a-f]{128}", sig):
        return False
    return verify_signature(public_key, _CONTEXT, _signed_message(seq, digest), bytes.fromhex(sig))


# ---------------------------------------------------------------- who records what

HYPERVISOR = "hypervisor"
CRYPT = "crypt:"  # crypt:DISK,DISK.../GUEST,GUEST...: an encryption domain's disks and guests


def crypt_role(disks: list[str], guests: list[str]) -> str:
    return f"{CRYPT}{','.join(sorted(disks))}/{','.join(sorted(guests))}"


def _role_names(role: str, part: int) -> set[str]:
    if not role.startswith(CRYPT):
        return set()
    parts = role[len(CRYPT):].split("/")
    return set(filter(None, parts[part].split(","))) if part < len(parts) else set()


def may_record(role: str | None, kind: str, fields: dict[str, Any]) -> str | None:
    """Why `role` may not add this record (None: it may). Each domain records only its own:
    the hypervisor its events; an encryption domain the integrity events of its disks and
    the events about its guests' sockets (guest-refused)."""
    if role is None:
        return ('this connection has not proven a role (send "hello" with the token the'
                " launcher gave)")
    if kind == "event" and role == HYPERVISOR:
        return None
    if kind == "integrity" and fields.get("disk") in _role_names(role, 0):
        return None
    if kind == "event" and fields.get("guest") in _role_names(role, 1):
        return None
    about = (f"disk {fields.get('disk')!r}" if kind == "integrity"
             else f"guest {fields.get('guest')!r}")
    return f"{role!r} may not record {kind} events about {about}"


# ---------------------------------------------------------------- summaries

def summarise_blocks(blocks: list[int], limit: int = MAX_RANGES) -> dict[str, Any]:
    """A block list of any length as a count and at most `limit` ranges [first, last]."""
    ranges: list[list[int]] = []
    for b in sorted(set(blocks)):
        if ranges and ranges[-1][1] == b - 1:
            ranges[-1][1] = b
        else:
            ranges.append([b, b])
    out: dict[str, Any] = {"count": len(set(blocks)), "ranges": ranges[:limit]}
    if len(ranges) > limit:
        out["ranges_not_listed"] = len(ranges) - limit
    return out


def _is_block_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(x) is int for x in value)


def compact_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields that fit a record: block lists summarised, long strings cut (and said so)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if _is_block_list(value) and len(value) > 16:
            out[key] = summarise_blocks(value)
        elif isinstance(value, str) and len(value) > MAX_STRING:
            out[key] = value[:MAX_STRING] + f"... ({len(value) - MAX_STRING} more characters)"
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- the writer

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
        head = _read_head(self.path)
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
        sig = self._signer.sign(_CONTEXT, _signed_message(record["seq"], record["hash"])).hex()
        head = json.dumps({"seq": record["seq"], "hash": record["hash"], "signature": sig})
        write_file_atomic(head_path(self.path), head.encode(), self.ops)
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
        sig = self._signer.sign(_CONTEXT, _signed_message(self.seq, self.last)).hex()
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

    # Readers need no instance (and take no lock): they only read.
    @staticmethod
    def read(path: str | Path) -> list[dict[str, Any]]:
        """Every readable record, across rotated files, oldest first."""
        path = Path(path)
        out: list[dict[str, Any]] = []
        for f in [*rotated_files(path), path]:
            with open(f, "rb") as fh:
                out.extend(r for line in fh if line.strip() and (r := parse_record(line)))
        return out

    @staticmethod
    def verify(path: str | Path, public_key: bytes | None = None) -> list[str]:
        return verify(path, public_key)

    @staticmethod
    def follow(path: str | Path, poll: float = 0.2) -> Iterator[dict[str, Any]]:
        return follow(path, poll)


# ---------------------------------------------------------------- the reader

def stored_public_key(path: Path) -> bytes | None:
    try:
        key = public_key_path(path).read_bytes()
    except OSError:
        return None
    return key if len(key) == PUBLIC_KEY_SIZE else None


def verify(path: str | Path, public_key: bytes | None = None) -> list[str]:
    """Every problem found in the log, its rotated files and its head: [] means intact.

    Every record must chain to the one before it and be covered by a valid
    signature: a checkpoint after it, or the signed head. `public_key` pins the
    key; by default PATH.pub is used.
    """
    path = Path(path)
    problems: list[str] = []
    key = public_key if public_key is not None else stored_public_key(path)
    prev, expect, last_hash, last_prev = GENESIS, 1, GENESIS, GENESIS
    signed_upto = 0
    files = [*rotated_files(path), path]
    for index, f in enumerate(files):
        try:
            data = f.read_bytes()
        except OSError as exc:
            problems.append(f"{f}: cannot read: {exc.strerror}")
            continue
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            problems.append(f"{f}:{len(lines)}: last line is incomplete (torn write or cut)")
        last_kind = ""
        for n, raw in enumerate(lines, start=1):
            where = f"{f}:{n}"
            rec = parse_record(raw)
            if rec is None:
                problems.append(f"{where}: not a valid audit record (edited or cut)")
                expect += 1
                last_kind = ""
                continue
            seq = rec["seq"]
            if seq != expect:
                what = "the log's first records are missing (rotated files removed?)" \
                    if expect == 1 else "records removed, inserted or reordered"
                problems.append(f"{where}: seq {seq} where {expect} was expected ({what})")
            if rec["prev"] != prev and not (expect == 1 and seq != 1):
                problems.append(f"{where}: seq {seq} does not chain to the record before it"
                                " (records removed, inserted or reordered)")
            if record_hash(rec) != rec["hash"]:
                problems.append(f"{where}: seq {seq} hash does not match its content"
                                " (record edited)")
            if rec["kind"] == "checkpoint":
                cp = rec["fields"]
                if cp.get("seq") != seq - 1 or cp.get("hash") != rec["prev"] or not \
                        _signature_ok(key, seq - 1, rec["prev"], cp.get("signature")):
                    problems.append(f"{where}: checkpoint at seq {seq} is not signed by the log's"
                                    " key (records before it rewritten, or the key replaced)")
                else:
                    signed_upto = seq - 1
            last_kind = rec["kind"]
            last_prev, prev, last_hash = rec["prev"], rec["hash"], rec["hash"]
            expect = seq + 1
        if index < len(files) - 1 and last_kind != "checkpoint":
            problems.append(f"{f}: a rotated file must end with a checkpoint; it was cut or"
                            " edited")
    last_seq = expect - 1
    if key is None and last_seq:
        problems.append(f"{public_key_path(path)}: missing or not a 32-byte key, so no"
                        " signature can be checked")
    head = _read_head(path)
    if head is None:
        if last_seq > 1:  # with one record: a power cut before the first head was written
            problems.append(f"{head_path(path)}: missing, so records cut off the end cannot be"
                            " detected")
    elif head[0] == -1:
        problems.append(f"{head_path(path)}: unreadable (edited or damaged)")
    else:
        seq, digest, sig = head
        if (seq, digest) == (last_seq - 1, last_prev) and last_seq:
            pass  # crash between the log fsync and the head update: the last record is extra
        elif (seq, digest) != (last_seq, last_hash):
            problems.append(f"{head_path(path)}: says the log ends at seq {seq}, but it ends at"
                            f" seq {last_seq} (records cut off the end, or the log edited)")
        if not _signature_ok(key, seq, digest, sig):
            problems.append(f"{head_path(path)}: its signature does not verify under the log's"
                            " key (the head was rewritten, or the key replaced)")
        else:
            signed_upto = max(signed_upto, seq)
    if key is not None and signed_upto < last_seq - 1:
        problems.append(f"{path}: records {signed_upto + 1}-{last_seq} are covered by no valid"
                        " signature")
    return problems


def _reopen(path: Path, poll: float) -> BinaryIO:
    """PATH opened again after a rotation (which renames it, then creates it anew)."""
    while True:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            time.sleep(poll)


def follow(path: str | Path, poll: float = 0.2) -> Iterator[dict[str, Any]]:
    """Yield every record of PATH, then each new one as it is appended (`audit --follow`),
    going on across rotations (records are yielded once each, in seq order)."""
    path = Path(path)
    last = 0

    def fresh(line: bytes) -> dict[str, Any] | None:
        rec = parse_record(line) if line.strip() else None
        return rec if rec is not None and rec["seq"] > last else None

    f: BinaryIO = open(path, "rb")
    try:
        buf, rotated = b"", False
        while True:
            chunk = f.read(65536)
            if not chunk:
                if rotated:  # read to its end: catch up through the files rotated since
                    f.close()
                    # The new file is opened before the rotated ones are listed: a file
                    # rotated in between is then in the list, not skipped, and whatever
                    # rotates later is read through `f` itself.
                    f, buf, rotated = _reopen(path, poll), b"", False
                    for older in rotated_files(path):
                        with open(older, "rb") as g:
                            for line in g:
                                if (rec := fresh(line)) is not None:
                                    last = rec["seq"]
                                    yield rec
                    continue
                with contextlib.suppress(FileNotFoundError):
                    rotated = os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
                if not rotated:
                    time.sleep(poll)
                continue
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for line in complete:
                if (rec := fresh(line)) is not None:
                    last = rec["seq"]
                    yield rec
    finally:
        f.close()
