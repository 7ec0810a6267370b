"""A restarted access-control domain waits for the encryption domains' Chinese Wall counts.

In process (AcmDomain.respond, a clock the test moves); the same with real processes and
two encryption domains is in tests/interop/test_policy_sticks.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.acm.util import example
from trustvbd.acm.audit import AuditLog
from trustvbd.acm.decisions import RESTORING
from trustvbd.crypt.tokens import role_token
from trustvbd.domains.acm import AcmDomain

SECRET = bytes(range(32))
PAYROLL, BANK = "crypt:payroll/vm1", "crypt:bank/vm2"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ask(domain: AcmDomain, owner: int, op: str, **fields: Any) -> dict[str, Any]:
    return domain.respond(json.dumps({"op": op, "rid": 1, **fields}).encode(), owner)


def restarted(tmp_path: Path, clock: Clock) -> AcmDomain:
    domain = AcmDomain(example(), AuditLog(tmp_path / "audit.jsonl"), SECRET, [PAYROLL, BANK],
                       restore_wait=10, clock=clock)
    for owner, role in ((1, PAYROLL), (2, BANK)):
        assert ask(domain, owner, "hello", role=role, token=role_token(SECRET, role))["ok"]
    return domain


def events(tmp_path: Path) -> list[str]:
    return [r["fields"].get("event") for r in AuditLog.read(tmp_path / "audit.jsonl")
            if r["kind"] == "chinese-wall"]


def test_no_new_attachment_until_every_encryption_domain_restored(tmp_path: Path) -> None:
    clock = Clock()
    domain = restarted(tmp_path, clock)
    assert ask(domain, 2, "restored")["ok"]  # Bank held nothing; Payroll is slow
    early = ask(domain, 2, "chw_attach", id="b1", label="Bank", name="vm2")
    assert early["allowed"] is False and early["rule"] == RESTORING, early
    assert "'payroll'" in early["reason"] and "try again" in early["reason"]
    assert ask(domain, 3, "chw_attach", id="x", label="Bank")["rule"] == RESTORING  # no role
    assert not ask(domain, 3, "load_policy", path="/nonexistent")["ok"]
    assert ask(domain, 3, "status")["restoring"] == [PAYROLL]
    # Payroll's own re-attachment is what the wait is for: it goes through.
    assert ask(domain, 1, "chw_attach", id="p1", label="Payroll", name="vm1")["allowed"]
    assert ask(domain, 1, "restored")["ok"]
    late = ask(domain, 2, "chw_attach", id="b2", label="Bank", name="vm2")
    assert late["allowed"] is False and "RER" in late["reason"], late  # the Wall, as before
    assert events(tmp_path) == ["restoring", "restored"]


def test_a_domain_that_never_restores_blocks_decisions_only_for_the_wait(tmp_path: Path) -> None:
    clock = Clock()
    domain = restarted(tmp_path, clock)
    assert ask(domain, 2, "restored")["ok"]
    clock.now += 9.9
    assert ask(domain, 2, "chw_attach", id="b1", label="Bank")["rule"] == RESTORING
    clock.now += 0.2  # Payroll hangs: after the wait, decisions go on without it
    assert ask(domain, 2, "chw_attach", id="b2", label="Bank")["allowed"]
    assert events(tmp_path) == ["restoring", "restore-timeout"]
    assert ask(domain, 3, "status")["restoring"] == []


def test_a_first_start_waits_for_nobody(tmp_path: Path) -> None:
    domain = AcmDomain(example(), AuditLog(tmp_path / "audit.jsonl"), SECRET)
    assert ask(domain, 1, "chw_attach", id="p1", label="Payroll")["allowed"]
    assert events(tmp_path) == []
