"""The audit log: every kind of tampering is found by verify(); crashes are survived."""

from __future__ import annotations

import errno
import itertools
import json
import os
import threading
from pathlib import Path

import pytest

from trustvbd.acm.audit import AuditError, AuditLog
from trustvbd.acm.audit_fields import summarise_blocks
from trustvbd.acm.audit_format import head_path, key_path, public_key_path, record_hash, rotated_files
from trustvbd.acm.audit_read import follow, verify
from trustvbd.blockdev import Buffer
from trustvbd.fileops import OsFileOps


def make_log(tmp_path: Path, n: int = 6) -> Path:
    """n decisions, then the checkpoint close() writes: n + 1 records."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(n):
        log.append("decision", op="guest_may_use_disk", guest=f"vm{i}", allowed=i % 2 == 0)
    log.close()
    return path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_intact_log_verifies(tmp_path):
    path = make_log(tmp_path)
    assert verify(path) == []
    records = AuditLog.read(path)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert records[0]["prev"] == "0" * 64
    assert all(r["hash"] == record_hash(r) for r in records)
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(records))
    assert records[-1]["kind"] == "checkpoint" and records[-1]["fields"]["seq"] == 6
    head = json.loads(head_path(path).read_text())
    assert (head["seq"], head["hash"]) == (7, records[-1]["hash"]) and len(head["signature"]) == 128
    assert oct(key_path(path).stat().st_mode & 0o777) == "0o600"
    assert len(public_key_path(path).read_bytes()) == 32


def test_edited_field_detected(tmp_path):
    path = make_log(tmp_path)
    ls = lines(path)
    ls[2] = ls[2].replace('"allowed": true', '"allowed": false')
    path.write_text("".join(ls))
    problems = verify(path)
    assert len(problems) == 1 and ":3: seq 3 hash does not match its content" in problems[0]


def test_edited_and_rehashed_record_detected(tmp_path):
    path = make_log(tmp_path)
    ls = lines(path)
    rec = json.loads(ls[2])
    rec["fields"]["allowed"] = False
    rec["hash"] = record_hash(rec)  # a forger recomputes the hash: the next link breaks
    ls[2] = json.dumps(rec) + "\n"
    path.write_text("".join(ls))
    assert any(":4: seq 4 does not chain" in p for p in verify(path))


def rebuild_chain(records: list[dict]) -> list[dict]:
    """What a forger without the key can do: a fully consistent chain of edited records."""
    prev = "0" * 64
    for rec in records:
        rec["prev"] = prev
        if rec["kind"] == "checkpoint":
            rec["fields"]["hash"] = prev
        rec["hash"] = record_hash(rec)
        prev = rec["hash"]
    return records


def test_rewriting_log_and_head_together_is_detected(tmp_path):
    path = make_log(tmp_path)
    records = AuditLog.read(path)
    records[1]["fields"]["allowed"] = True  # the denied vm1 "was allowed"
    records = rebuild_chain(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    old = json.loads(head_path(path).read_text())
    head_path(path).write_text(json.dumps({"seq": 7, "hash": records[-1]["hash"],
                                           "signature": old["signature"]}))
    problems = verify(path)
    assert any("checkpoint at seq 7 is not signed by the log's key" in p for p in problems)
    assert any("head: its signature does not verify" in p for p in problems)
    # Dropping the checkpoint and the signature does not help either.
    records = rebuild_chain(records[:6])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    head_path(path).write_text(json.dumps({"seq": 6, "hash": records[-1]["hash"]}))
    problems = verify(path)
    assert any("head: its signature does not verify" in p for p in problems)
    assert any("records 1-6 are covered by no valid signature" in p for p in problems)


def test_a_replaced_key_is_caught_when_the_key_is_pinned(tmp_path):
    from trustvbd.crypt.sign import Signer

    path = make_log(tmp_path)
    original = public_key_path(path).read_bytes()
    # The forger re-signs an edited log under a key of their own and swaps PATH.pub/.key.
    key_path(path).write_bytes(bytes(range(32)))
    public_key_path(path).write_bytes(Signer(bytes(range(32))).public_key)
    records = AuditLog.read(path)[:6]
    records[1]["fields"]["allowed"] = True
    path.write_text("".join(json.dumps(r) + "\n" for r in rebuild_chain(records)))
    head_path(path).unlink()
    (tmp_path / "audit.jsonl.lock").unlink()
    log = AuditLog.__new__(AuditLog)  # resume without the head check: the forger's own writer
    head_path(path).write_text(json.dumps({"seq": 6, "hash": records[-1]["hash"]}))
    log = AuditLog(path)
    log.close()
    assert verify(path) == []  # self-consistent under the swapped key...
    problems = verify(path, original)  # ...but not under the pinned one
    assert any("not signed by the log's key" in p or "signature does not verify" in p
               for p in problems)


def test_deleted_record_detected(tmp_path):
    path = make_log(tmp_path)
    ls = lines(path)
    del ls[3]
    path.write_text("".join(ls))
    problems = verify(path)
    assert any("seq 5 where 4 was expected" in p for p in problems)
    assert any("does not chain" in p for p in problems)


def test_swapped_records_detected(tmp_path):
    path = make_log(tmp_path)
    ls = lines(path)
    ls[1], ls[2] = ls[2], ls[1]
    path.write_text("".join(ls))
    problems = verify(path)
    assert any("seq 3 where 2 was expected" in p for p in problems)
    assert any("seq 2 where 4 was expected" in p or "does not chain" in p for p in problems)


def test_truncated_tail_detected_by_head(tmp_path):
    path = make_log(tmp_path)
    path.write_text("".join(lines(path)[:4]))
    problems = verify(path)
    assert problems == [f"{head_path(path)}: says the log ends at seq 7, but it ends at seq 4"
                        " (records cut off the end, or the log edited)"]
    with pytest.raises(AuditError, match="cut off or edited"):
        AuditLog(path)  # refuses to extend a cut log (it would hide the cut)


def test_truncated_in_the_middle_of_a_record(tmp_path):
    path = make_log(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    problems = verify(path)
    assert any("last line is incomplete" in p for p in problems)
    assert any("not a valid audit record" in p for p in problems)
    assert any("head: says the log ends at seq 7" in p for p in problems)


def test_missing_head_reported(tmp_path):
    path = make_log(tmp_path)
    head_path(path).unlink()
    assert any("missing" in p for p in verify(path))


def test_missing_key_refuses_to_extend_a_signed_log(tmp_path):
    path = make_log(tmp_path)
    key_path(path).unlink()
    with pytest.raises(AuditError, match=r"audit\.jsonl\.key is missing"):
        AuditLog(path)


def test_crash_windows_are_survived(tmp_path):
    path = make_log(tmp_path, 3)
    # 1. crash after the record was written but before the head moved: accepted
    head = head_path(path).read_text()
    log = AuditLog(path)
    log.append("decision", n=5)
    log.close(checkpoint=False)  # a crash: no checkpoint at close
    head_path(path).write_text(head)
    assert verify(path) == []
    log = AuditLog(path)
    assert log.seq == 5
    # 2. crash in the middle of a write: the torn line is cut and the cut is recorded
    log.close(checkpoint=False)
    with open(path, "ab") as f:
        f.write(b'{"seq": 6, "time": "2')
    log = AuditLog(path)
    assert log.seq == 6 and AuditLog.read(path)[-1]["fields"]["event"] == "torn-record-removed"
    log.append("decision", n=7)
    log.close()
    assert verify(path) == []


def test_checkpoints_every_n_records_sign_the_chain_so_far(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, checkpoint_every=4)
    for i in range(10):
        log.append("event", n=i)
    log.close()
    records = AuditLog.read(path)
    cps = [r["seq"] for r in records if r["kind"] == "checkpoint"]
    assert cps == [5, 9, 13]  # after every 4th seq; the last one also serves close()
    assert verify(path) == []
    # An edit before a checkpoint is caught by it even if the chain is rebuilt after.
    records[1]["fields"]["n"] = 99
    path.write_text("".join(json.dumps(r) + "\n" for r in rebuild_chain(records)))
    assert sum("is not signed by the log's key" in p for p in verify(path)) == 3


def test_rotation_continues_the_chain_across_files(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, rotate_bytes=1000)
    for i in range(20):
        log.append("decision", guest=f"vm{i}", allowed=True)
    log.close()
    files = rotated_files(path)
    assert len(files) >= 3 and files[0].name == "audit.jsonl.1"
    per_file = [[json.loads(x) for x in f.read_text().splitlines()] for f in [*files, path]]
    per_file = [records for records in per_file if records]  # PATH is empty right after one
    for older, newer in itertools.pairwise(per_file):
        assert older[-1]["kind"] == "checkpoint"  # every rotated file is signed on its own
        assert newer[0]["prev"] == older[-1]["hash"] and newer[0]["seq"] == older[-1]["seq"] + 1
    assert verify(path) == []
    records = AuditLog.read(path)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    # Resuming after rotation goes on where the chain ends.
    log = AuditLog(path, rotate_bytes=1000)
    assert log.seq == len(records)
    log.close()
    assert verify(path) == []
    # A removed rotated file, or one cut short, is found.
    data = files[1].read_bytes()
    files[1].write_bytes(b"".join(data.splitlines(keepends=True)[:-1]))
    assert any("must end with a checkpoint" in p for p in verify(path))
    files[1].write_bytes(data)
    files[0].unlink()
    assert any("first records are missing" in p for p in verify(path))


def test_power_cut_inside_rotation_resumes_from_the_rotated_file(tmp_path):
    path = make_log(tmp_path, 3)
    path.rename(path.with_name("audit.jsonl.1"))  # renamed, new file not yet made
    log = AuditLog(path)
    assert log.seq == 4
    log.append("decision", n=5)
    log.close()
    assert verify(path) == []
    assert json.loads(path.read_text().splitlines()[0])["seq"] == 5


def test_an_integrity_event_of_any_size_is_recorded(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    blocks = [*range(0, 1_000_000, 2), *range(2_000_000, 2_100_000)]
    rec = log.append("integrity", disk="d1", blocks=blocks, message="x" * 200_000)
    big = log.append("event", **{f"k{i}": "v" * 100 for i in range(2000)})
    log.close()
    stored = AuditLog.read(path)[0]["fields"]
    assert stored == rec["fields"]
    assert stored["blocks"]["count"] == len(blocks)
    assert stored["blocks"]["ranges"][:2] == [[0, 0], [2, 2]]
    assert stored["blocks"]["ranges_not_listed"] == 500_001 - 64
    assert stored["message"].endswith("(195904 more characters)")
    assert big["fields"]["oversized"] is True and big["fields"]["keys"][0] == "k0"
    assert verify(path) == []


def test_summarise_blocks() -> None:
    assert summarise_blocks([9, 3, 4, 5, 9]) == {"count": 4, "ranges": [[3, 5], [9, 9]]}
    assert summarise_blocks(list(range(0, 10, 2)), limit=2) == {
        "count": 5, "ranges": [[0, 0], [2, 2]], "ranges_not_listed": 3}


@pytest.mark.parametrize("line", [
    b'{"seq": Infinity, "time": "t", "kind": "k", "fields": {}, "prev": "0", "hash": "0"}',
    b"[" * 100_000,
    b'{"seq": true, "time": "t", "kind": "k", "fields": {}, "prev": "0", "hash": "0"}',
    b'{"seq": 1e999}',
])
def test_hostile_lines_are_problems_not_crashes(tmp_path, line):
    """Found by the audit_log fuzz target: OverflowError and RecursionError escaped."""
    path = make_log(tmp_path, 2)
    with open(path, "ab") as f:
        f.write(line + b"\n")
    assert any("not a valid audit record" in p for p in verify(path))
    with pytest.raises(AuditError, match="last record is unreadable"):
        AuditLog(path)
    head_path(path).write_bytes(line)
    assert any("head: unreadable" in p for p in verify(path))


def test_one_writer_only(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    with pytest.raises(AuditError, match="another process"):
        AuditLog(path)
    log.close()


def test_follow_yields_new_records(tmp_path):
    path = make_log(tmp_path, 2)
    seen: list[int] = []
    done = threading.Event()

    def reader() -> None:
        for rec in follow(path, poll=0.01):
            seen.append(rec["seq"])
            if rec["seq"] == 4:
                done.set()
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    log = AuditLog(path)
    log.append("policy", event="loaded")
    log.append("decision", allowed=False)
    log.close()
    assert done.wait(5) and seen == [1, 2, 3, 4]


def test_follow_goes_on_across_rotation(tmp_path):
    path = make_log(tmp_path, 2)
    seen: list[int] = []
    done = threading.Event()

    def reader() -> None:
        for rec in follow(path, poll=0.01):
            seen.append(rec["seq"])
            if len(seen) == 30:
                done.set()
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    log = AuditLog(path, rotate_bytes=1000)
    for i in range(40):
        log.append("decision", n=i)
    log.close()
    assert rotated_files(path)
    assert done.wait(5) and seen == list(range(1, 31))


def test_follow_misses_nothing_rotated_while_it_catches_up(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A rotation that lands while the follower catches up through the rotated files (after
    it listed them): the records of the file rotated then are still yielded, once, in order."""
    from trustvbd.acm import audit_read

    path = make_log(tmp_path, 2)  # seq 1..3
    log = AuditLog(path, rotate_bytes=1 << 20)
    follower = audit_read.follow(path, poll=0.01)
    assert [next(follower)["seq"] for _ in range(3)] == [1, 2, 3]
    log.append("decision", n=0)
    log.rotate()  # the follower will see the rename and catch up
    log.append("decision", n=1)
    real, calls = audit_read.rotated_files, []

    def rotate_meanwhile(p: Path) -> list[Path]:
        listed = real(p)
        calls.append(len(listed))
        if len(calls) == 1:  # the writer goes on between the listing and what comes next
            log.append("decision", n=2)
            log.rotate()
            for i in range(3, 6):
                log.append("decision", n=i)
        return listed

    monkeypatch.setattr(audit_read, "rotated_files", rotate_meanwhile)
    seqs: list[int] = []
    while True:  # up to the last decision written
        rec = next(follower)
        seqs.append(rec["seq"])
        if rec["fields"].get("n") == 5:
            break
    log.close()
    written = [r["seq"] for r in AuditLog.read(path)]
    assert calls and seqs == written[3:written.index(seqs[-1]) + 1], (seqs, written)
    assert len(seqs) >= 6  # every decision after the first three, and checkpoints


class FullForHead(OsFileOps):
    """A file system that runs out of space for the head's new copy (the log's record
    itself fitted): as a state directory filling up between the two writes."""

    full = False

    def write(self, fd: int, data: Buffer) -> int:
        if self.full and os.readlink(f"/proc/self/fd/{fd}").endswith(".head.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(fd, data)


def test_a_head_the_full_disk_refused_leaves_the_log_whole(tmp_path):
    """The record is written, its head is not (ENOSPC): the append fails (a decision not
    audited is not taken), and once space is back the log goes on and verifies (red team:
    the next record reused the failed one's seq, and `audit --verify` said the log was
    tampered with), also after a reopen."""
    path = tmp_path / "audit.jsonl"
    ops = FullForHead()
    log = AuditLog(path, ops=ops)
    log.append("decision", op="guest_may_use_disk", guest="vm1", allowed=True)
    ops.full = True
    with pytest.raises(OSError):
        log.append("decision", op="guest_may_use_disk", guest="vm2", allowed=True)
    ops.full = False
    log.append("decision", op="guest_may_use_disk", guest="vm3", allowed=False)
    log.close()
    assert verify(path) == []
    assert [r["fields"].get("guest") for r in AuditLog.read(path)] == ["vm1", "vm3", None]
    log = AuditLog(path)
    log.append("decision", op="guest_may_use_disk", guest="vm4", allowed=True)
    log.close()
    assert verify(path) == []
