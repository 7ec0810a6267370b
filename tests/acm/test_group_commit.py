"""The access-control domain's group commit: a flood of audit records (another domain's
integrity events) must not hold up decisions by an fsync and a signature per record.

Found: a lying driver made an encryption domain send ~300 integrity records a second;
each was written with its own fsyncs and signed head, and guests' connect decisions queued
behind them past the client's 5 s timeout. The domain (its real serve_connection, on real
Unix sockets and real files) now answers the requests that arrived together after one
commit, decisions before records, and yields between groups of records.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.acm.util import EXAMPLE_TOML
from trustvbd.acm import load_policy
from trustvbd.acm.audit import AuditLog
from trustvbd.acm.audit_fields import crypt_role
from trustvbd.acm.audit_read import verify
from trustvbd.crypt.tokens import new_secret, role_token
from trustvbd.domains.acm import AcmDomain
from trustvbd.fileops import OsFileOps

FLOOD = 600
ROLE = crypt_role(["d1"], ["vm1"])


class Syncs(OsFileOps):
    """Real files; counts fsyncs, and can run out of space for the head."""

    def __init__(self) -> None:
        self.fsyncs = 0
        self.full = False
        self.stuck = False  # ftruncate fails too

    def ftruncate(self, fd: int, size: int) -> None:
        if self.stuck:
            raise OSError(errno.EIO, "Input/output error")
        super().ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        self.fsyncs += 1
        super().fsync(fd)

    def write(self, fd: int, data: Any) -> int:
        if self.full and os.readlink(f"/proc/self/fd/{fd}").endswith(".head.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(fd, data)


def domain_at(tmp_path: Path, ops: Syncs) -> tuple[AcmDomain, bytes]:
    source = tmp_path / "example.toml"
    source.write_text(EXAMPLE_TOML)
    secret = new_secret()
    return AcmDomain(load_policy(source), AuditLog(tmp_path / "audit.jsonl", ops=ops),
                     secret), secret


def line(**request: Any) -> bytes:
    return json.dumps(request).encode() + b"\n"


def record(rid: int) -> bytes:
    return line(op="record", kind="integrity", rid=rid, fields={
        "what": "data", "disk": "d1", "replica": "h2", "blocks": [rid],
        "message": f"block {rid} of replica 'h2' failed verification"})


def decision(rid: int, guest: str = "vm1") -> bytes:
    return line(op="guest_may_use_disk", rid=rid, guest=guest, guest_label="Payroll",
                disk="d1", disk_label="PayrollData")


async def serving(domain: AcmDomain, path: Path) -> asyncio.Server:
    return await asyncio.start_unix_server(domain.serve_connection, str(path))


async def replies(reader: asyncio.StreamReader, n: int) -> dict[int, dict[str, Any]]:
    out = {}
    for _ in range(n):
        reply = json.loads(await reader.readline())
        out[reply["rid"]] = reply
    return out


def test_a_flood_of_records_is_written_in_group_commits(
        tmp_path: Path) -> None:
    ops = Syncs()
    domain, secret = domain_at(tmp_path, ops)

    async def go() -> dict[int, dict[str, Any]]:
        server = await serving(domain, tmp_path / "acm.sock")
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "acm.sock"))
        writer.write(line(op="hello", rid=1, role=ROLE, token=role_token(secret, ROLE)))
        assert (await replies(reader, 1))[1]["ok"] is True
        before = ops.fsyncs
        # The flood and a guest's decision behind it, sent together.
        writer.write(b"".join(record(rid) for rid in range(2, FLOOD + 2)) + decision(FLOOD + 2))
        got = await replies(reader, FLOOD + 1)
        syncs = ops.fsyncs - before
        writer.close()
        server.close()
        await server.wait_closed()
        got[0] = {"fsyncs": syncs}
        return got

    got = asyncio.run(go())
    assert all(got[rid]["ok"] is True and "seq" in got[rid] for rid in range(2, FLOOD + 2))
    assert got[FLOOD + 2]["allowed"] is True
    # One commit per group (the log's fsync and the head's), groups cut at MAX_BATCH and
    # wherever a read ended: tens in all, not two per record (old: 1200).
    assert got[0]["fsyncs"] <= FLOOD // 8, got[0]
    domain.audit.close()
    records = AuditLog.read(tmp_path / "audit.jsonl")
    assert len([r for r in records if r["kind"] == "integrity"]) == FLOOD
    assert verify(tmp_path / "audit.jsonl") == []


def test_another_connections_flood_holds_a_decision_up_by_a_few_group_commits_at_most(
        tmp_path: Path) -> None:
    """Connection A floods records; B's decision, sent once A's first records are answered,
    waits for a few of A's group commits, not for an fsync per record of A's (old: every
    record of A's 64 KiB read, two fsyncs each, ~800)."""
    ops = Syncs()
    domain, secret = domain_at(tmp_path, ops)

    async def go() -> int:
        server = await serving(domain, tmp_path / "acm.sock")
        ra, wa = await asyncio.open_unix_connection(str(tmp_path / "acm.sock"))
        rb, wb = await asyncio.open_unix_connection(str(tmp_path / "acm.sock"))
        wa.write(line(op="hello", rid=1, role=ROLE, token=role_token(secret, ROLE)))
        assert (await replies(ra, 1))[1]["ok"] is True
        wa.write(b"".join(record(rid) for rid in range(2, 3 * FLOOD + 2)))
        await replies(ra, 1)  # A's flood is being written
        asked = ops.fsyncs
        wb.write(decision(1))
        assert (await replies(rb, 1))[1]["allowed"] is True
        waited = ops.fsyncs - asked
        await replies(ra, 3 * FLOOD - 1)
        for w in (wa, wb):
            w.close()
        server.close()
        await server.wait_closed()
        return waited

    waited = asyncio.run(go())
    # Its own commit (the log's fsync and the head's) and a group or two of A's.
    assert waited <= 2 * 5, f"the decision waited for {waited} fsyncs"
    domain.audit.close()
    records = AuditLog.read(tmp_path / "audit.jsonl")
    assert len([r for r in records if r["kind"] == "integrity"]) == 3 * FLOOD
    assert verify(tmp_path / "audit.jsonl") == []


def test_a_group_whose_commit_fails_is_refused_whole_and_counts_nothing(tmp_path: Path) -> None:
    """The head of a group cannot be written (the disk filled up): every request of the
    group is answered with the error (a decision not audited is not taken), an attachment
    in it is not counted, and once there is space the log goes on and verifies."""
    ops = Syncs()
    domain, _ = domain_at(tmp_path, ops)
    ops.full = True
    out = domain.answer([decision(1), line(op="chw_attach", rid=2, id="a1", label="Payroll",
                                           name="vm1"), decision(3, "vm2")], owner=1)
    assert [r["ok"] for r in out] == [False, False, False], out
    assert all("cannot write the audit log" in r["error"] for r in out)
    assert domain.attached == {} and not domain.wall.running.get("Payroll")
    ops.full = False
    out = domain.answer([decision(4), line(op="chw_attach", rid=5, id="a1", label="Payroll",
                                           name="vm1")], owner=1)
    assert [r["ok"] for r in out] == [True, True] and out[1]["allowed"] is True
    assert "a1" in domain.attached
    domain.audit.close()
    path = tmp_path / "audit.jsonl"
    assert verify(path) == []
    # Only the second group's: the refused group left nothing behind.
    assert [(r["fields"]["op"], r["seq"]) for r in AuditLog.read(path)
            if r["kind"] == "decision"] == [("guest_may_use_disk", 1), ("chw_attach", 2)]


def test_records_a_failed_commit_could_not_cut_stay_in_the_chain(tmp_path: Path) -> None:
    """A group's head cannot be written and its records cannot be cut either: they stay in
    the log (unacknowledged), and a later failed group is cut behind them, not before, so
    the chain never repeats a seq."""
    ops = Syncs()
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, ops=ops)
    log.append("decision", n=0)
    ops.full = ops.stuck = True
    log.add("decision", n=1)
    with pytest.raises(OSError):
        log.commit()
    ops.stuck = False
    log.add("decision", n=2)
    with pytest.raises(OSError):
        log.commit()
    ops.full = False
    log.append("decision", n=3)
    log.close()
    assert verify(path) == []
    assert [r["fields"]["n"] for r in AuditLog.read(path) if r["kind"] == "decision"] == [0, 1, 3]
