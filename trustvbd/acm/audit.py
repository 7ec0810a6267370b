"""The tamper-evident audit log: append-only JSON lines, each hash-chained to the last.

Each line is {"seq", "time", "kind", "fields", "prev", "hash"}, where hash is the
SHA-256 of the canonical JSON of the other five keys and prev is the previous
record's hash (64 zeros for the first). Editing, removing or reordering a record
breaks the chain. Cutting records off the *end* leaves a valid shorter chain, so
the last (seq, hash) is also written to a side file, PATH.head, after each
append: verify() compares the two. Both files are fsync'ed on every append, so a
record acknowledged to a caller survives a crash.

What this does not stop: someone who can write both files can rebuild a whole
consistent chain (SHA-256 has no key). Anchor the head elsewhere (copy it off
the host, or sign it) to catch that.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
MAX_RECORD = 64 * 1024
_KEYS = {"seq", "time", "kind", "fields", "prev", "hash"}


class AuditError(Exception):
    """The audit log cannot be appended to safely; the message says why and what to do."""


def record_hash(record: dict[str, Any]) -> str:
    body = {k: record[k] for k in ("seq", "time", "kind", "fields", "prev")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_head(path: Path) -> tuple[int, str] | None:
    try:
        head = json.loads(head_path(path).read_text())
        return int(head["seq"]), str(head["hash"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        return (-1, "unreadable")


class AuditLog:
    """The one writer of an audit log (an flock keeps out a second one)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise AuditError(f"{self.path}: another process is writing this audit log") from None
        self.torn = False
        try:
            self.seq, self.last = self._resume()
        except Exception:
            os.close(self.fd)
            raise
        if self.torn:
            self.append("audit", event="torn-record-removed",
                        note="an append interrupted by a crash left a partial line; it was cut")

    def _resume(self) -> tuple[int, str]:
        """Find where the chain ends and check it against the head; refuse to extend a cut log."""
        size = os.fstat(self.fd).st_size
        tail = os.pread(self.fd, min(size, 2 * MAX_RECORD), max(0, size - 2 * MAX_RECORD))
        if tail and not tail.endswith(b"\n"):
            # A crash in the middle of an append: the torn line was never acknowledged
            # (the head was not moved to it), so cut it off.
            cut = size - (len(tail) - tail.rfind(b"\n") - 1)
            os.ftruncate(self.fd, cut)
            tail, self.torn = tail[: tail.rfind(b"\n") + 1], True
        lines = tail.splitlines()
        last_seq, last_hash, last_prev = 0, GENESIS, GENESIS
        if lines:
            try:
                rec = json.loads(lines[-1])
                last_seq, last_hash, last_prev = int(rec["seq"]), str(rec["hash"]), rec["prev"]
            except (ValueError, KeyError, TypeError):
                raise AuditError(f"{self.path}: the last record is unreadable; run `trustvbd"
                                 " audit verify`, then move the log aside to start a new one"
                                 ) from None
        head = _read_head(self.path)
        # The last clause: a crash between the log's fsync and the head's update.
        ok = (head is None and last_seq == 0) or head in ((last_seq, last_hash),
                                                          (last_seq - 1, last_prev))
        if not ok:
            said = f"seq {head[0]}" if head else "no head file"
            raise AuditError(f"{self.path}: the log ends at seq {last_seq} but its head says"
                             f" {said}: records were cut off or edited. Run `trustvbd audit"
                             " verify`, keep the log as evidence and move it aside to start"
                             " a new one")
        return last_seq, last_hash

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Write one record durably (log fsync, then head) and return it."""
        record: dict[str, Any] = {"seq": self.seq + 1,
                                  "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                                  "kind": kind, "fields": fields, "prev": self.last}
        record["hash"] = record_hash(record)
        line = json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n"
        if len(line) > MAX_RECORD:
            raise ValueError(f"audit record of {len(line)} bytes is over {MAX_RECORD}")
        size = os.fstat(self.fd).st_size
        try:
            if os.write(self.fd, line) != len(line):
                raise OSError("short write (disk full?)")
            os.fsync(self.fd)
        except OSError:
            os.ftruncate(self.fd, size)  # never leave a torn record for the next one to follow
            raise
        head = head_path(self.path)
        tmp = head.with_name(head.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"seq": record["seq"], "hash": record["hash"]}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, head)
        _fsync_dir(head)
        self.seq, self.last = record["seq"], record["hash"]
        return record

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    # Readers need no instance (and take no lock): they only read.
    @staticmethod
    def read(path: str | Path) -> list[dict[str, Any]]:
        with open(path, "rb") as f:
            return [json.loads(line) for line in f if line.strip()]

    @staticmethod
    def verify(path: str | Path) -> list[str]:
        return verify(path)

    @staticmethod
    def follow(path: str | Path, poll: float = 0.2) -> Iterator[dict[str, Any]]:
        return follow(path, poll)


def verify(path: str | Path) -> list[str]:
    """Every problem found in the log and its head: [] means the chain is intact."""
    path = Path(path)
    problems: list[str] = []
    prev, expect, last_hash, last_prev = GENESIS, 1, GENESIS, GENESIS
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [f"{path}: cannot read: {exc.strerror}"]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        problems.append(f"{path}:{len(lines)}: last line is incomplete (torn write or cut)")
    for n, raw in enumerate(lines, start=1):
        where = f"{path}:{n}"
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or set(rec) != _KEYS:
                raise ValueError("not a record")
        except ValueError:
            problems.append(f"{where}: not a valid audit record (edited or cut)")
            expect += 1
            continue
        if rec["seq"] != expect:
            problems.append(f"{where}: seq {rec['seq']} where {expect} was expected"
                            " (records removed, inserted or reordered)")
        if rec["prev"] != prev:
            problems.append(f"{where}: seq {rec['seq']} does not chain to the record before it"
                            " (records removed, inserted or reordered)")
        if record_hash(rec) != rec["hash"]:
            problems.append(f"{where}: seq {rec['seq']} hash does not match its content"
                            " (record edited)")
        last_prev, prev, last_hash = rec["prev"], rec["hash"], rec["hash"]
        expect = (rec["seq"] if isinstance(rec["seq"], int) else expect) + 1
    last_seq = expect - 1
    head = _read_head(path)
    if head is None:
        if last_seq:
            problems.append(f"{head_path(path)}: missing, so records cut off the end cannot be"
                            " detected")
    elif head == (last_seq - 1, last_prev) and last_seq:
        pass  # crash between the log fsync and the head update: the last record is extra
    elif head != (last_seq, last_hash):
        problems.append(f"{head_path(path)}: says the log ends at seq {head[0]}, but it ends at"
                        f" seq {last_seq} (records cut off the end, or the log edited)")
    return problems


def follow(path: str | Path, poll: float = 0.2) -> Iterator[dict[str, Any]]:
    """Yield every record, then each new one as it is appended (for `audit show --follow`)."""
    with open(path, "rb") as f:
        buf = b""
        while True:
            chunk = f.read(65536)
            if not chunk:
                time.sleep(poll)
                continue
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for line in complete:
                if line.strip():
                    yield json.loads(line)
