"""Reading an audit log without writing it: verify (every problem found in the log,
its rotated files and its head) and follow (`audit --follow`, across rotations).

Readers need no AuditLog instance and take no lock: they only read.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from trustvbd.acm.audit_format import (
    GENESIS,
    MAX_RECORD,
    head_path,
    parse_record,
    public_key_path,
    read_head,
    record_hash,
    rotated_files,
    signature_ok,
    stored_public_key,
)
from trustvbd.regular_file import open_regular

# The writer commits records in groups of at most this many (one fsync and one signed head
# per group): a power cut between the log's fsync and the head's update leaves the head that
# many records behind at most, never acknowledged to anyone.
MAX_BATCH = 64


def head_within_batch(at: tuple[int, str], last_seq: int, last_hash: str,
                      recs: list[dict[str, Any]]) -> bool:
    """Whether a head naming `at` (seq, hash) fits a log ending at (last_seq, last_hash) whose
    last records are `recs`: it names the last one, or one at most a batch before it."""
    known = {(last_seq, last_hash)}
    for r in recs:
        known.update({(r["seq"], r["hash"]), (r["seq"] - 1, r["prev"])})
    return at in known and 0 <= last_seq - at[0] <= MAX_BATCH


def read(path: str | Path) -> list[dict[str, Any]]:
    """Every readable record, across rotated files, oldest first."""
    return scan(path)[0]


def open_log(f: Path) -> BinaryIO:
    """A log file opened for reading; OSError (EINVAL) for anything but a regular file: a
    device or a pipe (`--log /dev/zero`) would be read forever."""
    return open(open_regular(f, "an audit log"), "rb")


def _lines(fh: BinaryIO) -> Iterator[tuple[bytes | None, bool]]:
    """Each line of `fh` without its newline, and whether it had one (only the file's last
    can lack it); a line longer than any record is read past in bounded pieces and comes as
    None: a file is never in memory whole, however large or full of garbage."""
    while line := fh.readline(MAX_RECORD + 2):
        if line.endswith(b"\n"):
            yield line[:-1], True
        elif len(line) <= MAX_RECORD + 1:  # the end of the file
            yield line, False
        else:
            while line and not line.endswith(b"\n"):
                line = fh.readline(1 << 20)
            yield None, line.endswith(b"\n")


def each_record(path: str | Path) -> Iterator[dict[str, Any] | None]:
    """Every non-blank line across rotated files, oldest first, as a record, or None for one
    that is none (damaged, cut or edited: `verify` says where)."""
    path = Path(path)
    for f in [*rotated_files(path), path]:
        with open_log(f) as fh:
            for line, _ in _lines(fh):
                if line is not None and not line.strip():
                    continue
                yield None if line is None else parse_record(line)


def scan(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """(every readable record across rotated files, oldest first; how many non-blank lines
    are no record: damaged, cut or edited, `verify` says where)."""
    out: list[dict[str, Any]] = []
    bad = 0
    for rec in each_record(path):
        if rec is None:
            bad += 1
        else:
            out.append(rec)
    return out, bad


class _Chain:
    """What verify knows after each record: the chain so far, and every problem found."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self.problems: list[str] = []
        self.prev, self.expect, self.last_hash = GENESIS, 1, GENESIS
        self.recent: deque[dict[str, Any]] = deque(maxlen=MAX_BATCH + 1)  # a head may name one
        self.signed_upto = 0
        self.last_kind = ""

    def file(self, f: Path, fh: BinaryIO) -> None:
        """Check each line of one file, read a line at a time."""
        first = len(self.problems)  # a torn last line is said first, though found last
        self.last_kind = ""
        for n, (raw, whole) in enumerate(_lines(fh), start=1):
            if not whole:
                self.problems.insert(first, f"{f}:{n}: last line is incomplete (torn write or"
                                     " cut)")
            self.record(f"{f}:{n}", None if raw is None else parse_record(raw))

    def record(self, where: str, rec: dict[str, Any] | None) -> None:
        problems = self.problems
        if rec is None:
            problems.append(f"{where}: not a valid audit record (edited or cut)")
            self.expect += 1
            self.last_kind = ""
            return
        seq, expect = rec["seq"], self.expect
        if seq != expect:
            what = "the log's first records are missing (rotated files removed?)" \
                if expect == 1 else "records removed, inserted or reordered"
            problems.append(f"{where}: seq {seq} where {expect} was expected ({what})")
        if rec["prev"] != self.prev and not (expect == 1 and seq != 1):
            problems.append(f"{where}: seq {seq} does not chain to the record before it"
                            " (records removed, inserted or reordered)")
        if record_hash(rec) != rec["hash"]:
            problems.append(f"{where}: seq {seq} hash does not match its content"
                            " (record edited)")
        if rec["kind"] == "checkpoint":
            cp = rec["fields"]
            if cp.get("seq") != seq - 1 or cp.get("hash") != rec["prev"] or not \
                    signature_ok(self.key, seq - 1, rec["prev"], cp.get("signature")):
                problems.append(f"{where}: checkpoint at seq {seq} is not signed by the log's"
                                " key (records before it rewritten, or the key replaced)")
            else:
                self.signed_upto = seq - 1
        self.last_kind = rec["kind"]
        self.prev = self.last_hash = rec["hash"]
        self.recent.append(rec)
        self.expect = seq + 1


def verify(path: str | Path, public_key: bytes | None = None) -> list[str]:
    """Every problem found in the log, its rotated files and its head: [] means intact.

    Every record must chain to the one before it and be covered by a valid
    signature: a checkpoint after it, or the signed head. `public_key` pins the
    key; by default PATH.pub is used. Files are read a line at a time: memory stays
    bounded whatever their size.
    """
    path = Path(path)
    key = public_key if public_key is not None else stored_public_key(path)
    chain = _Chain(key)
    problems = chain.problems
    files = [*rotated_files(path), path]
    for index, f in enumerate(files):
        try:
            with open_log(f) as fh:
                chain.file(f, fh)
        except OSError as exc:
            problems.append(f"{f}: cannot read: {exc.strerror}")
            continue
        if index < len(files) - 1 and chain.last_kind != "checkpoint":
            problems.append(f"{f}: a rotated file must end with a checkpoint; it was cut or"
                            " edited")
    expect, last_hash, recent, signed_upto = (chain.expect, chain.last_hash, chain.recent,
                                              chain.signed_upto)
    last_seq = expect - 1
    if key is None and last_seq:
        problems.append(f"{public_key_path(path)}: missing or not a 32-byte key, so no"
                        " signature can be checked")
    head = read_head(path)
    if head is None:
        if last_seq > 1:  # with one record: a power cut before the first head was written
            problems.append(f"{head_path(path)}: missing, so records cut off the end cannot be"
                            " detected")
    elif head[0] == -1:
        problems.append(f"{head_path(path)}: unreadable (edited or damaged)")
    else:
        seq, digest, sig = head
        # A power cut between a group commit's fsync and its head leaves the head behind by
        # at most a batch of records never acknowledged.
        within = head_within_batch((seq, digest), last_seq, last_hash, list(recent))
        if not within:
            problems.append(f"{head_path(path)}: says the log ends at seq {seq}, but it ends at"
                            f" seq {last_seq} (records cut off the end, or the log edited)")
        if not signature_ok(key, seq, digest, sig):
            problems.append(f"{head_path(path)}: its signature does not verify under the log's"
                            " key (the head was rewritten, or the key replaced)")
        else:  # and the records of a group commit after it were never acknowledged
            signed_upto = max(signed_upto, last_seq if within else seq)
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

    f: BinaryIO = open_log(path)
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
                        with open_log(older) as g:
                            for line, _ in _lines(g):
                                if line is not None and (rec := fresh(line)) is not None:
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
            if len(buf) > MAX_RECORD:  # no record is this long: garbage, not kept
                buf = b""
            for line in complete:
                if (rec := fresh(line)) is not None:
                    last = rec["seq"]
                    yield rec
    finally:
        f.close()
