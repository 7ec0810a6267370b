"""A refusal asked in a loop: written once per window, the rest counted (#9.6)."""

from __future__ import annotations

import signal

from tests.acm.test_domain import Acm
from tests.acm.util import XM_TEST
from trustvbd.acm.audit import AuditLog
from trustvbd.acm.audit_fields import crypt_role
from trustvbd.acm.audit_read import verify
from trustvbd.acm.repeats import MAX_KEYS, RepeatCounter
from trustvbd.crypt.tokens import role_token


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_counted_within_the_window_and_summarised_after() -> None:
    clock = Clock()
    rc = RepeatCounter(window=60, clock=clock)
    f = {"guest": "vm2", "disk": "d1"}
    assert rc.repeat("decision", f) is False  # written
    assert all(rc.repeat("decision", dict(f)) for _ in range(500))  # counted
    assert rc.repeat("decision", {"guest": "vm3", "disk": "d1"}) is False  # another one: written
    assert rc.due() == []  # windows still open
    clock.t = 61
    summaries = rc.due()
    assert len(summaries) == 1 and summaries[0]["count"] == 500
    assert summaries[0]["of"] == "decision" and summaries[0]["guest"] == "vm2"
    assert rc.repeat("decision", f) is False  # a new window: written again


def test_a_refused_attachments_id_does_not_make_it_new() -> None:
    rc = RepeatCounter(window=60, clock=Clock())
    assert rc.repeat("decision", {"op": "chw_attach", "id": "vm2/d1/1"}) is False
    assert rc.repeat("decision", {"op": "chw_attach", "id": "vm2/d1/2"}) is True


def test_the_table_is_bounded_and_a_new_refusal_is_never_lost() -> None:
    rc = RepeatCounter(window=60, clock=Clock())
    for i in range(MAX_KEYS + 10):
        assert rc.repeat("decision", {"n": i}) is False
    assert rc.repeat("decision", {"n": MAX_KEYS + 5}) is False  # untracked: written again


def test_a_flood_of_refusals_costs_one_record_each() -> None:
    acm = Acm(XM_TEST)
    try:
        ask = {"op": "guest_may_use_disk", "guest": "vm1", "guest_label": "red",
               "disk": "d2", "disk_label": "blue"}
        for _ in range(300):
            assert acm.ask(**ask)["allowed"] is False
        allowed = {**ask, "disk_label": "red"}
        for _ in range(3):
            assert acm.ask(**allowed)["allowed"] is True  # allowed ones: every one written
        role = crypt_role([], ["vm1"])  # only vm1's encryption domain may record its refusals
        assert acm.ask(op="hello", role=role, token=role_token(acm.roles_secret, role))["ok"]
        assert acm.ask(op="record", kind="event",
                       fields={"event": "guest-refused", "guest": "vm1", "reason": "uid 7"})["ok"]
        assert acm.ask(op="record", kind="event",
                       fields={"event": "guest-refused", "guest": "vm1", "reason": "uid 7"})["ok"]
        acm.proc.send_signal(signal.SIGTERM)  # open windows are summarised before it stops
        assert acm.proc.wait(10) == 0
        records = AuditLog.read(acm.audit)
        kinds = [r["kind"] for r in records]
        assert kinds.count("decision") == 1 + 3
        repeated = [r["fields"] for r in records if r["kind"] == "repeated"]
        assert sorted((r["of"], r["count"]) for r in repeated) == [("decision", 299), ("event", 1)]
        assert verify(acm.audit) == []
    finally:
        acm.stop()
