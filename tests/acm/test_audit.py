"""The audit log: every kind of tampering is found by verify(); crashes are survived."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import pytest

from trustvbd.acm.audit import AuditError, AuditLog, follow, head_path, record_hash, verify


def make_log(tmp_path: Path, n: int = 6) -> Path:
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
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["prev"] == "0" * 64
    assert all(r["hash"] == record_hash(r) for r in records)
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(records))
    assert json.loads(head_path(path).read_text()) == {"seq": 6, "hash": records[-1]["hash"]}


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
    assert problems == [f"{head_path(path)}: says the log ends at seq 6, but it ends at seq 4"
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
    assert any("head: says the log ends at seq 6" in p for p in problems)


def test_missing_head_reported(tmp_path):
    path = make_log(tmp_path)
    head_path(path).unlink()
    assert any("missing" in p for p in verify(path))


def test_crash_windows_are_survived(tmp_path):
    path = make_log(tmp_path, 3)
    # 1. crash after the record was written but before the head moved: accepted
    head = head_path(path).read_text()
    log = AuditLog(path)
    log.append("decision", n=4)
    log.close()
    head_path(path).write_text(head)
    assert verify(path) == []
    log = AuditLog(path)
    assert log.seq == 4
    # 2. crash in the middle of a write: the torn line is cut and the cut is recorded
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"seq": 5, "time": "2')
    log = AuditLog(path)
    assert log.seq == 5 and AuditLog.read(path)[-1]["fields"]["event"] == "torn-record-removed"
    log.append("decision", n=6)
    log.close()
    assert verify(path) == []


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
