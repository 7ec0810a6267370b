"""The access-control domain as a real process on a Unix socket, and its fail-closed client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acm.util import EXAMPLE_TOML, XM_TEST
from trustvbd.acm import load_policy
from trustvbd.acm.audit import AuditLog
from trustvbd.acm.audit_fields import HYPERVISOR, crypt_role
from trustvbd.acm.audit_read import verify
from trustvbd.acm.client import AcmClient
from trustvbd.acm.commands import write_compiled
from trustvbd.acm.compiled import encode
from trustvbd.crypt.tokens import new_secret, role_token


class Acm:
    """One `python -m trustvbd.domains.acm` process in a short temporary directory."""

    def __init__(self, source: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="acm", dir="/tmp"))  # short socket paths
        self.sock, self.audit = self.dir / "acm.sock", self.dir / "audit.jsonl"
        compiled = self.dir / "policy.tvbdpol"  # the domain loads only the compiled form
        write_compiled(load_policy(source), compiled)
        policy_args = ("--policy", str(compiled))
        read_end, write_end = os.pipe()
        roles_read, roles_write = os.pipe()
        self.roles_secret = new_secret()
        os.write(roles_write, self.roles_secret)
        os.close(roles_write)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trustvbd.domains.acm", *policy_args, "--audit",
             str(self.audit), "--socket", str(self.sock), "--ready-fd", str(write_end),
             "--roles-fd", str(roles_read)],
            pass_fds=(write_end, roles_read), stderr=subprocess.PIPE, text=True)
        os.close(write_end)
        os.close(roles_read)
        with os.fdopen(read_end, "rb") as r:
            if r.read() != b"ready\n":
                self.proc.wait(10)
                assert self.proc.stderr is not None
                raise AssertionError(f"acm domain did not start: {self.proc.stderr.read()}")
        self.conn = socket.socket(socket.AF_UNIX)
        self.conn.connect(str(self.sock))
        self.conn.settimeout(10)
        self.file = self.conn.makefile("rwb")
        self.rid = 0

    def raw(self, data: bytes) -> dict:
        self.file.write(data)
        self.file.flush()
        return json.loads(self.file.readline())

    def ask(self, **request: object) -> dict:
        """One request with a fresh request id; the reply must carry it back (then dropped)."""
        self.rid += 1
        reply = self.raw(json.dumps({**request, "rid": self.rid}).encode() + b"\n")
        assert reply.pop("rid") == self.rid, reply
        return reply

    def stop(self) -> None:
        self.file.close()
        self.conn.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def xm() -> Iterator[Acm]:
    acm = Acm(XM_TEST)
    yield acm
    acm.stop()


def decisions(acm: Acm) -> list[dict]:
    return [r["fields"] for r in AuditLog.read(acm.audit) if r["kind"] == "decision"]


def test_decisions_are_answered_and_every_one_audited(xm):
    r = xm.ask(op="guest_may_use_disk", guest="vm1", guest_label="red", disk="d1",
               disk_label="red")
    assert r == {"ok": True, "allowed": True, "rule": "ste-shared-type",
                 "reason": 'guest vm1 (label "red") and disk d1 (label "red") share STE type "red"'}
    r = xm.ask(op="guest_may_use_disk", guest="vm1", guest_label="red", disk="d2",
               disk_label="blue")
    assert r["allowed"] is False and r["rule"] == "ste-no-shared-type"
    assert xm.ask(op="driver_may_serve_disk", driver="drv", driver_label="SystemManagement",
                  disk="d2", disk_label="blue")["allowed"] is True
    assert xm.ask(op="channel", a="x", a_label="green", b="y", b_label="red")["allowed"] is False
    logged = decisions(xm)
    assert [(d["op"], d["allowed"]) for d in logged] == [
        ("guest_may_use_disk", True), ("guest_may_use_disk", False),
        ("driver_may_serve_disk", True), ("channel", False)]
    assert logged[1]["guest"] == "vm1" and logged[1]["disk_label"] == "blue"
    assert logged[1]["reason"] == r["reason"] and logged[1]["rule"] == "ste-no-shared-type"
    assert verify(xm.audit) == []


def test_chinese_wall_attachments(xm):
    assert xm.ask(op="chw_attach", id="c1", label="red", name="vm1")["allowed"] is True
    r = xm.ask(op="chw_attach", id="c2", label="blue", name="vm2")
    assert r["allowed"] is False and 'conflict set "RER"' in r["reason"]
    assert xm.ask(op="chw_attach", id="c1", label="green")["ok"] is False  # id in use
    assert xm.ask(op="status")["running_types"] == {"SystemManagement": 1, "red": 1}
    assert xm.ask(op="chw_detach", id="c1") == {"ok": True}
    assert xm.ask(op="chw_detach", id="c1")["ok"] is False  # cannot be detached twice
    assert xm.ask(op="chw_attach", id="c2", label="blue")["allowed"] is True
    # another connection cannot detach it, and its own attachments end when it closes
    other = socket.socket(socket.AF_UNIX)
    other.connect(str(xm.sock))
    f = other.makefile("rwb")
    f.write(b'{"op":"chw_detach","id":"c2","rid":1}\n'
            b'{"op":"chw_attach","id":"c9","label":"green","rid":2}\n')
    f.flush()
    assert json.loads(f.readline())["ok"] is False
    assert json.loads(f.readline())["allowed"] is True
    f.close()
    other.close()
    for _ in range(200):  # the domain notices the close asynchronously
        if xm.ask(op="status")["running_types"].get("green") is None:
            break
        time.sleep(0.01)
    assert xm.ask(op="status")["running_types"] == {"SystemManagement": 1, "blue": 1}
    kinds = [r["fields"]["event"] for r in AuditLog.read(xm.audit) if r["kind"] == "chinese-wall"]
    assert kinds == ["detached", "released: the connection that attached it closed"]


def test_bad_requests_get_errors_and_serving_goes_on(xm):
    assert xm.raw(b"this is not json\n")["error"].startswith("bad request")
    assert xm.raw(b"[1, 2]\n")["error"] == "bad request: a request is a JSON object"
    assert "unknown op 'fly'" in xm.ask(op="fly")["error"]
    assert '"guest_label" must be' in xm.ask(op="guest_may_use_disk", guest_label=7,
                                             disk_label="red")["error"]
    huge = xm.raw(b'{"op":"status","pad":"' + b"x" * 300_000 + b'"}\n')
    assert huge == {"ok": False, "error": "bad request: line over 65536 bytes", "rid": None}
    no_id = xm.raw(b'{"op":"status"}\n')  # a request without its id is refused, id null
    assert no_id["rid"] is None and '"rid" (the request id' in no_id["error"]
    assert xm.raw(b'{"op":"status","rid":true}\n')["ok"] is False
    assert xm.raw(b"\xff\xfe\n")["ok"] is False
    assert xm.ask(op="status")["ok"] is True  # still serving, same connection
    assert xm.ask(op="record", kind="decision", fields={})["ok"] is False  # cannot forge
    assert xm.ask(op="record", kind="integrity", fields={"disk": "d1", "kind": "x"})["ok"] is False
    assert xm.proc.poll() is None
    assert verify(xm.audit) == []


def test_each_domain_records_only_its_own_events(xm):
    """Only a connection that proved a role may record, and only what that role owns."""
    ask = xm.ask

    def hello(role: str, token: str | None = None) -> dict:
        return ask(op="hello", role=role, token=token or role_token(xm.roles_secret, role))

    integrity = {"what": "data", "disk": "d1", "blocks": list(range(5000)), "message": "bad"}
    crypt = crypt_role(["d1"], ["vm1"])
    assert crypt == "crypt:d1/vm1"
    assert "has not proven a role" in ask(op="record", kind="integrity", fields=integrity)["error"]
    assert "not proven" in hello(crypt, token="00" * 32)["error"]
    assert "not proven" in hello("crypt:d1,d2/vm1", token=role_token(xm.roles_secret, crypt))[
        "error"]  # a token proves exactly the role it was made for
    assert hello(crypt)["ok"] is True
    assert ask(op="record", kind="integrity", fields=integrity)["ok"] is True
    assert "may not record integrity events about disk 'd2'" in ask(
        op="record", kind="integrity", fields={**integrity, "disk": "d2"})["error"]
    refused = {"event": "guest-refused", "guest": "vm1", "reason": "uid 7"}
    assert ask(op="record", kind="event", fields=refused)["ok"] is True  # its own guest's socket
    assert "may not record event events about guest 'vm2'" in ask(
        op="record", kind="event", fields={**refused, "guest": "vm2"})["error"]
    assert hello(HYPERVISOR)["ok"] is True  # a connection can prove another role only with its token
    assert ask(op="record", kind="event", fields={"event": "started"})["ok"] is True
    assert ask(op="record", kind="integrity", fields=integrity)["ok"] is False
    records = AuditLog.read(xm.audit)
    [rec] = [r for r in records if r["kind"] == "integrity"]
    assert rec["fields"]["source"] == crypt and len(rec["fields"]["blocks"]) == 5000
    rejected = [r["fields"] for r in records if r["fields"].get("event") == "record-refused"]
    assert [r["disk"] for r in rejected] == ["d1", "d2", "None", "d1"]
    assert [r["fields"]["role"] for r in records if r["fields"].get("event") == "role-refused"] == [
        crypt, "crypt:d1,d2/vm1"]
    assert verify(xm.audit) == []


def test_policy_reload_is_atomic(xm, tmp_path):
    source = tmp_path / "example.toml"
    source.write_text(EXAMPLE_TOML)
    good = tmp_path / "example.tvbdpol"
    write_compiled(load_policy(source), good)
    # Checksummed and well-formed, but names an undeclared type: the domain's own check refuses it.
    example = load_policy(source)
    broken = example.__class__(**{**example.__dict__, "resource_labels": (
        *example.resource_labels[:1], example.resource_labels[1].__class__("BankData", "Cash"))})
    bad = tmp_path / "bad.tvbdpol"
    bad.write_bytes(encode(broken))
    r = xm.ask(op="load_policy", path=str(bad))
    assert r["ok"] is False and "BankData" in r["error"] and '"Cash"' in r["error"]
    r = xm.ask(op="load_policy", path=str(source))  # a source policy is never parsed here
    assert r["ok"] is False and "compile it first" in r["error"]
    assert xm.ask(op="status")["policy"]["name"] == "xm-test"  # old policy still in force
    assert xm.ask(op="guest_may_use_disk", guest_label="red", disk_label="red")["allowed"]
    # a policy that would not admit the running attachments is refused (Xen's rule)
    assert xm.ask(op="chw_attach", id="a", label="red")["allowed"]
    r = xm.ask(op="load_policy", path=str(good))
    assert r["ok"] is False and "running domains" in r["error"] and '"red"' in r["error"]
    assert xm.ask(op="chw_detach", id="a")["ok"]
    r = xm.ask(op="load_policy", path=str(good))
    assert r["ok"] is True and r["policy"]["name"] == "payroll-example"
    assert xm.ask(op="guest_may_use_disk", guest_label="Payroll",
                  disk_label="PayrollData")["allowed"] is True
    assert xm.ask(op="guest_may_use_disk", guest_label="red", disk_label="red")["rule"] == \
        "unknown-label"
    events = [r["fields"]["event"] for r in AuditLog.read(xm.audit) if r["kind"] == "policy"]
    assert events == ["load-refused", "load-refused", "load-refused", "loaded"]


def test_null_policy_domain_on_a_handed_over_socket():
    """--listen-fd: the launcher binds the socket and hands the listening fd over."""
    d = Path(tempfile.mkdtemp(prefix="acm", dir="/tmp"))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(d / "acm.sock"))
    listener.listen(8)
    proc = subprocess.Popen([sys.executable, "-m", "trustvbd.domains.acm", "--null", "--audit",
                             str(d / "audit.jsonl"), "--listen-fd", str(listener.fileno())],
                            pass_fds=(listener.fileno(),), stderr=subprocess.PIPE, text=True)
    listener.close()
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(d / "acm.sock"))  # queued in the backlog until the domain accepts
        c.sendall(b'{"op":"guest_may_use_disk","guest_label":"x","disk_label":"y","rid":7}\n')
        reply = json.loads(c.makefile("rb").readline())
        assert reply["allowed"] is True and reply["rule"] == "null-policy" and reply["rid"] == 7
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "NO POLICY" in proc.stderr.read()
        records = AuditLog.read(d / "audit.jsonl")
        assert [r["kind"] for r in records] == ["domain", "decision", "domain", "checkpoint"]
        assert records[0]["fields"]["null"] is True and verify(d / "audit.jsonl") == []
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(d, ignore_errors=True)


def test_bad_policy_refuses_to_start(tmp_path):
    good = tmp_path / "xm.tvbdpol"
    write_compiled(load_policy(XM_TEST), good)
    damaged = bytearray(good.read_bytes())
    damaged[60] ^= 1
    bad = tmp_path / "bad.tvbdpol"
    bad.write_bytes(bytes(damaged))
    for path, message in ((XM_TEST, "(an XML or TOML policy? compile it first)"),
                          (bad, "checksum mismatch: the file is damaged or was edited")):
        out = subprocess.run([sys.executable, "-m", "trustvbd.domains.acm", "--policy", str(path),
                              "--audit", str(tmp_path / "a.jsonl"), "--socket",
                              str(tmp_path / "s")], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and message in out.stderr
        assert f"{path}: not a valid compiled policy" in out.stderr


def test_the_domain_never_loads_a_policy_parser(tmp_path):
    """Xen's hypervisor never parsed XML: the domain, loading a policy, imports no loader."""
    compiled = tmp_path / "xm.tvbdpol"
    write_compiled(load_policy(XM_TEST), compiled)
    code = ("import sys\n"
            "from trustvbd.acm.audit import AuditLog\n"
            "from trustvbd.acm.compiled import read_compiled\n"
            "from trustvbd.domains.acm import AcmDomain\n"
            f"d = AcmDomain(read_compiled({str(compiled)!r}), AuditLog({str(tmp_path / 'a')!r}))\n"
            f"assert d.load({str(compiled)!r})['ok']\n"
            "print(sorted(m for m in sys.modules if m.startswith(('trustvbd.acm.xml_loader',"
            " 'trustvbd.acm.toml_loader', 'defusedxml', 'tomllib', 'xml.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_client_and_fail_closed(xm):
    async def scenario() -> None:
        client = AcmClient(str(xm.sock), timeout=2)
        d = await client.guest_may_use_disk("vm1", "green", "d1", "green")
        assert d.allowed and d.rule == "ste-shared-type"
        assert not (await client.channel("a", "red", "b", "blue")).allowed
        assert (await client.chw_attach("k1", "red", "vm1")).allowed
        assert not (await client.chw_attach("k2", "blue")).allowed
        assert (await client.status())["attachments"] == 1
        assert (await client.explain("red", "red"))["lines"][-1].startswith("ALLOWED")
        xm.proc.kill()
        xm.proc.wait(10)
        for d in (await client.guest_may_use_disk("vm1", "green", "d1", "green"),
                  await client.chw_attach("k3", "green"),
                  await client.driver_may_serve_disk("x", "SystemManagement", "d", "red")):
            assert not d.allowed and d.rule == "acm-unreachable"
            assert d.reason.startswith("access-control domain unreachable: ")
        assert (await client.load_policy("/x"))["ok"] is False
        await client.close()

    asyncio.run(scenario())


def test_client_fails_closed_on_garbage_and_silence():
    """Each lie ends the connection (or times out) and is a refusal; the next connection is fresh."""
    answers = [
        lambda rid: b'{"rid": %d, "ok": true, "allowed": "yes"}\n' % rid,  # not a boolean
        lambda rid: b"\x00\x01 nonsense\n",  # not JSON: the connection is dropped
        lambda rid: b'{"rid": %d, "ok": true, "allowed": true, "rule": "r", "reason": "r"}\n'
                    % (rid + 1000),  # an answer to a request never made
        lambda rid: b'{"ok": true, "allowed": true, "rule": "r", "reason": "r"}\n',  # no id
        None,  # silence
    ]

    async def scenario() -> None:
        async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                answer = answers.pop(0)
                if answer is None:
                    await asyncio.sleep(5)
                    return
                writer.write(answer(json.loads(line)["rid"]))

        path = Path(tempfile.mkdtemp(prefix="acm", dir="/tmp")) / "g.sock"
        server = await asyncio.start_unix_server(liar, path=str(path))
        client = AcmClient(str(path), timeout=0.5)
        for expected in ("garbled reply", "Expecting value", "which was never made",
                         "without a request id", "timed out"):
            d = await client.guest_may_use_disk("g", "a", "d", "b")
            assert not d.allowed and d.rule == "acm-unreachable", d
            assert d.reason.startswith("access-control domain unreachable: ")
            assert expected in d.reason, (expected, d)
        server.close()
        await client.close()
        shutil.rmtree(path.parent, ignore_errors=True)

    asyncio.run(scenario())


def test_any_request_gets_a_reply_in_process(tmp_path):
    """respond() never raises, whatever arrives (fuzzed JSON values and raw bytes)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from trustvbd.domains.acm import AcmDomain

    domain = AcmDomain(load_policy(XM_TEST), AuditLog(tmp_path / "audit.jsonl"))
    ops = st.sampled_from(["guest_may_use_disk", "driver_may_serve_disk", "channel",
                           "chw_attach", "chw_detach", "explain", "status", "record", "x"])
    values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(
                              st.text(max_size=5), c, max_size=3), max_leaves=6)
    keys = st.sampled_from(["rid", "guest", "guest_label", "disk", "disk_label", "id", "label", "a",
                            "a_label", "b", "b_label", "kind", "fields", "path"])

    @settings(max_examples=300, deadline=None)
    @given(ops, st.dictionaries(keys, values | st.sampled_from(["red", "blue", "integrity"])),
           st.binary(max_size=20))
    def check(op, body, raw):
        for line in (json.dumps({"op": op, "rid": 1, **body}).encode(), raw):
            reply = domain.respond(line, owner=1)
            assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
            assert "allowed" not in reply or isinstance(reply["allowed"], bool)

    check()
    domain.release(1)
    assert verify(tmp_path / "audit.jsonl") == []


def test_a_full_audit_disk_refuses_decisions_in_one_line_and_the_log_stays_whole(tmp_path, caplog):
    """The state directory fills up: a decision that cannot be audited is refused, with a
    reply and one log line naming the log and what to do (red team: a traceback, and
    "access-control domain error: [Errno 28] ..." to the guest); once space is back the
    decisions go on and the log verifies."""
    from tests.acm.test_audit import FullForHead
    from trustvbd.domains.acm import AcmDomain

    ops = FullForHead()
    path = tmp_path / "audit.jsonl"
    domain = AcmDomain(load_policy(XM_TEST), AuditLog(path, ops=ops))
    ask = json.dumps({"op": "status", "rid": 1}).encode()
    assert domain.respond(ask, owner=1)["ok"]
    decide = json.dumps({"op": "guest_may_use_disk", "rid": 2, "guest": "vm1",
                         "guest_label": "green", "disk": "d", "disk_label": "green"}).encode()
    first = domain.respond(decide, owner=1)
    assert first["ok"], first
    ops.full = True
    with caplog.at_level("ERROR", logger="trustvbd.acm"):
        refused = domain.respond(decide, owner=1)
    assert not refused["ok"] and "allowed" not in refused
    assert refused["error"].startswith(f"cannot write the audit log {path} (No space left")
    assert "free space there" in refused["error"]
    assert [r.exc_info for r in caplog.records] == [None]  # one line, no traceback
    ops.full = False
    assert domain.respond(decide, owner=1) == first | {"rid": 2}
    domain.audit.close()
    assert verify(path) == []


def test_a_detach_on_a_full_audit_disk_is_done_and_said_in_one_line(tmp_path, caplog):
    """Red team: with the state directory full, every guest connection that closed logged
    "request failed" and a traceback (the detach's record could not be written). The
    attachment ends all the same (its Chinese Wall count goes), said in one line; a
    connection that goes away with attachments does not raise either."""
    from tests.acm.test_audit import FullForHead
    from trustvbd.domains.acm import AcmDomain

    ops = FullForHead()
    path = tmp_path / "audit.jsonl"
    domain = AcmDomain(load_policy(XM_TEST), AuditLog(path, ops=ops))

    def ask(owner: int, **req: object) -> dict:
        return domain.respond(json.dumps({"rid": 1, **req}).encode(), owner=owner)

    assert ask(1, op="chw_attach", id="c1", label="red", name="vm1")["allowed"] is True
    assert ask(2, op="chw_attach", id="c2", label="red", name="vm2")["allowed"] is True
    ops.full = True
    with caplog.at_level("ERROR", logger="trustvbd.acm"):
        ask(1, op="chw_detach", id="c1")
        domain.release(2)
    assert [r.exc_info for r in caplog.records] == [None, None], caplog.text
    assert all("cannot write the audit log" in r.getMessage() and "was not recorded"
               in r.getMessage() for r in caplog.records), caplog.text
    ops.full = False
    assert "red" not in ask(1, op="status")["running_types"]
    assert ask(3, op="chw_attach", id="c3", label="blue", name="vm3")["allowed"] is True
    domain.audit.close()
    assert verify(path) == []


def test_attachments_of_connections_open_at_stop_are_released_before_the_log_closes():
    """At SIGTERM the log was closed while connections were still open; each then released
    its attachments into a closed log: "cannot write the audit log (Bad file descriptor):
    ... free space there" once per attachment, and no record of the release. Now the
    connections end first: their releases are audited, then the stop."""
    acm = Acm(XM_TEST)
    try:
        assert acm.ask(op="chw_attach", id="c1", label="red", name="vm1")["allowed"] is True
        acm.proc.send_signal(signal.SIGTERM)
        _, err = acm.proc.communicate(timeout=30)
        assert acm.proc.returncode == 0, err
        assert "cannot write the audit log" not in err, err
        records = list(AuditLog.read(acm.audit))
        walls = [r["fields"]["event"] for r in records if r["kind"] == "chinese-wall"]
        assert walls == ["released: the connection that attached it closed"], walls
        last = [r for r in records if r["kind"] != "checkpoint"][-1]
        assert last["kind"] == "domain" and last["fields"]["event"] == "stop", last
        assert verify(acm.audit) == []
    finally:
        acm.stop()
