"""The access-control domain: holds the policy, answers decisions, writes the audit log.

    python -m trustvbd.domains.acm (--policy COMPILED | --null) --audit PATH
                                   (--socket PATH | --listen-fd N) [--ready-fd N]

It loads only compiled policies (trustvbd/acm/compiled.py): the XML and TOML
loaders run in the CLI and the launcher, never here, as Xen's hypervisor loaded
what xensec_xml2bin compiled and never parsed XML itself.
Protocol: one JSON object per line in, one per line out (docs/policy.md lists
the ops); each request carries a request id "rid" that its reply echoes, so the
client pairs replies by id and a cancelled request's answer goes to no other.
Every decision, allow or deny, is in the audit log before it is answered; if
the log cannot be written the answer is an error, which clients treat as a
refusal. A bad request gets an error reply and the domain keeps
serving. Requests are handled synchronously (no await between checking and
counting), so Chinese Wall decisions cannot race.

Group commit: the requests that arrived together on a connection are answered
together after one commit of the audit log (one fsync, one signed head), and
records other domains add ("record": integrity events, refused guests) wait
behind decisions, in groups of at most MAX_BATCH, with the event loop free between
groups: a flood of records holds up another connection's decision by one group
commit at most, never by one fsync per record.

A restarted domain starts with no Chinese Wall counts: the encryption domains
hold them (their live connections) and re-attach them when they reconnect, each
ending with "restored". The launcher names the encryption domains running at the
restart (after the roles secret, in the same pipe); until each has said
"restored", or RESTORE_WAIT has passed (a hung one must not block decisions
forever), a new attachment is refused with the retryable rule "acm-restoring"
and a policy load is refused too: decided on half the counts, either could break
the wall.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from trustvbd.acm import (
    ChineseWall,
    Decision,
    Policy,
    PolicyError,
    domain_may_run,
    domains_may_communicate,
    driver_may_serve_disk,
    guest_may_use_disk,
)
from trustvbd.acm.audit import MAX_BATCH, AuditError, AuditLog
from trustvbd.acm.audit_fields import may_record
from trustvbd.acm.compiled import read_compiled
from trustvbd.acm.decisions import RESTORING, explain
from trustvbd.acm.repeats import RepeatCounter
from trustvbd.crypt.sign import fingerprint
from trustvbd.crypt.tokens import SECRET_SIZE, token_ok
from trustvbd.domains import stack_dump
from trustvbd.domains.common import die_with_parent, ready, setup_logging
from trustvbd.replies import peer_json

log = logging.getLogger("trustvbd.acm")
MAX_LINE = 64 * 1024
RECORD_KINDS = ("integrity", "event")  # what other trusted domains may add to the log
YIELD_TURNS = 4  # event loop turns between groups of records (_let_others_in)
# How long a restarted domain waits for the encryption domains to restore their counts.
RESTORE_WAIT = 10.0


class BadRequest(Exception):
    pass


class AuditUnwritable(Exception):
    """The audit log cannot be written (its disk is full): the request fails closed."""


def _field(req: dict[str, Any], key: str, required: bool = True) -> Any:
    value = req.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > 256:
        raise BadRequest(f'"{key}" must be a non-empty string of at most 256 characters')
    return value


class AcmDomain:
    def __init__(self, policy: Policy, audit: AuditLog, roles_secret: bytes | None = None,
                 restoring: Iterable[str] = (), restore_wait: float = RESTORE_WAIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy, self.audit = policy, audit
        # Roles of the encryption domains whose counts are not restored yet, and until when
        # new attachments wait for them.
        self.restoring = set(restoring)
        self.clock = clock
        self.restore_until = clock() + restore_wait
        self.restored: set[int] = set()  # connections that re-attached everything they hold
        if self.restoring:
            audit.append("chinese-wall", event="restoring", waiting_for=sorted(self.restoring),
                         seconds=restore_wait)
        self.roles_secret = roles_secret  # proves callers' roles (None: nobody may record)
        self.roles: dict[int, str] = {}  # connection -> the role it proved
        self.wall = ChineseWall(policy)
        self.attached: dict[str, tuple[str, str | None, int]] = {}  # id -> label, name, owner
        self.connections = 0  # numbers the client connections that own attachments
        self.serving: set[asyncio.Task[None]] = set()  # one per client connection
        self.repeats = RepeatCounter()  # identical refusals: written once per window, counted
        self.unwritable = ""  # why the audit log could not be written, the last time it failed

    def _append(self, kind: str, refusal: bool, /, **fields: Any) -> None:
        if not (refusal and self.repeats.repeat(kind, fields)):
            self._audit(kind, **fields)

    def _audit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Add a record; it is durable once the batch it is answered with is committed."""
        try:
            return self.audit.add(kind, **fields)
        except OSError as exc:
            raise self._unwritable(exc) from exc

    def _commit(self) -> None:
        """Everything added so far durable now (before a state change that follows it)."""
        try:
            self.audit.commit()
        except OSError as exc:
            raise self._unwritable(exc) from exc

    def _unwritable(self, exc: OSError) -> AuditUnwritable:
        self.unwritable = (
            f"cannot write the audit log {self.audit.path} ({exc.strerror or exc}): every"
            " request that must be audited is refused until it can be; free space there")
        return AuditUnwritable(self.unwritable)

    def write_repeats(self, everything: bool = False) -> None:
        """One "repeated" record per refusal whose counting window ended."""
        for summary in self.repeats.due(everything):
            self.audit.append("repeated", **summary)

    def _decided(self, op: str, d: Decision, **fields: Any) -> dict[str, Any]:
        self._append("decision", not d.allowed, op=op, policy=self.policy.name,
                     allowed=d.allowed, rule=d.rule, reason=d.reason, **fields)
        return {"ok": True, **d.to_json()}

    def handle(self, req: dict[str, Any], owner: int) -> dict[str, Any]:
        op, f = req.get("op"), lambda k, r=True: _field(req, k, r)
        if op == "guest_may_use_disk":
            g, gl, d, dl = f("guest", False), f("guest_label"), f("disk", False), f("disk_label")
            return self._decided(op, guest_may_use_disk(self.policy, gl, dl, g, d),
                                 guest=g, guest_label=gl, disk=d, disk_label=dl)
        if op == "driver_may_serve_disk":
            v, vl, d, dl = f("driver", False), f("driver_label"), f("disk", False), f("disk_label")
            return self._decided(op, driver_may_serve_disk(self.policy, vl, dl, v, d),
                                 driver=v, driver_label=vl, disk=d, disk_label=dl)
        if op == "channel":
            a, al, b, bl = f("a", False), f("a_label"), f("b", False), f("b_label")
            return self._decided(op, domains_may_communicate(self.policy, al, bl, a, b),
                                 a=a, a_label=al, b=b, b_label=bl)
        if op == "chw_attach":
            cid, label, name = f("id"), f("label"), f("name", False)
            if cid in self.attached:
                raise BadRequest(f'attachment id "{cid}" is already in use')
            waiting = self._still_restoring(owner)
            if waiting:
                return self._decided(op, Decision(False, RESTORING, (
                    "the access-control domain was restarted and is waiting for encryption "
                    f"domain(s) {waiting} to restore the Chinese Wall counts of their live "
                    "connections; try again in a moment")), id=cid, label=label, name=name)
            d = domain_may_run(self.policy, label, name)
            d = self.wall.may_start(label, name) if d.allowed else d
            reply = self._decided(op, d, id=cid, label=label, name=name)
            if d.allowed:  # counted only once the decision is in the log
                self._commit()
                self.wall.started(label)
                self.attached[cid] = (label, name, owner)
            return reply
        if op == "chw_detach":
            cid = f("id")
            if self.attached.get(cid, ("", None, -1))[2] != owner:
                raise BadRequest(f'no attachment "{cid}" made on this connection')
            self._detach(cid, "detached")
            return {"ok": True}
        if op == "load_policy":
            waiting = self._still_restoring(owner)
            if waiting:
                return {"ok": False, "error": "the access-control domain was restarted and is "
                        f"waiting for encryption domain(s) {waiting} to restore their Chinese "
                        "Wall counts; load the policy again in a moment"}
            return self.load(f("path"))
        if op == "restored":  # this connection re-attached everything it holds
            self.restored.add(owner)
            role = self.roles.get(owner)
            if role in self.restoring:
                self.restoring.discard(role)
                if not self.restoring:
                    self.audit.append("chinese-wall", event="restored")
            return {"ok": True}
        if op == "explain":
            return {"ok": True, "lines": explain(self.policy, f("guest_label"), f("disk_label"),
                                                 f("guest", False), f("disk", False))}
        if op == "status":
            return {"ok": True, "policy": self.policy.summary(), "null": self.policy.is_null,
                    "attachments": len(self.attached), "running_types": dict(self.wall.running),
                    "restoring": sorted(self.restoring),
                    "audit": {"path": str(self.audit.path), "seq": self.audit.seq}}
        if op == "hello":
            role, token = f("role"), req.get("token")
            if self.roles_secret is None or not token_ok(self.roles_secret, role, token):
                self._append("audit", True, event="role-refused", role=role, connection=owner)
                raise BadRequest(f"role {role!r} not proven: wrong token")
            self.roles[owner] = role
            return {"ok": True}
        if op == "record":
            kind, fields = req.get("kind"), req.get("fields")
            if kind not in RECORD_KINDS or not isinstance(fields, dict):
                raise BadRequest(f'"record" needs kind in {list(RECORD_KINDS)} and a fields object')
            role = self.roles.get(owner)
            refusal = may_record(role, kind, fields)
            if refusal is not None:  # a flood of these is counted like any refusal
                self._append("audit", True, event="record-refused", kind=kind, role=role,
                             disk=str(fields.get("disk"))[:256], connection=owner)
                raise BadRequest(refusal)
            fields = {**fields, "source": role}
            if kind == "event" and fields.get("event") == "guest-refused":
                self._append(kind, True, **fields)  # someone knocking in a loop: counted
                return {"ok": True}
            return {"ok": True, "seq": self._audit(kind, **fields)["seq"]}
        raise BadRequest(f"unknown op {op!r}")

    def _still_restoring(self, owner: int) -> str:
        """Who a new attachment must wait for ("" if nobody). An encryption domain's own
        re-attachments, before its "restored", are what the wait is for: they go through."""
        if not self.restoring:
            return ""
        if self.clock() >= self.restore_until:
            missing = sorted(self.restoring)
            self.restoring.clear()
            log.error("encryption domain(s) %s did not restore their Chinese Wall counts in "
                      "time; deciding without them", missing)
            self.audit.append("chinese-wall", event="restore-timeout", missing=missing)
            return ""
        if owner not in self.restored and self.roles.get(owner) in self.restoring:
            return ""
        return ", ".join(repr(r.split("/")[0].removeprefix("crypt:")) for r in sorted(self.restoring))

    def _detach(self, cid: str, event: str) -> None:
        label, name, _ = self.attached.pop(cid)
        self.wall.stopped(label)
        try:
            self.audit.append("chinese-wall", event=event, id=cid, label=label, name=name)
        except OSError as exc:
            # The attachment ended all the same (its guest connection is gone): refusing
            # the detach would only keep a stale count. Said in one line, not a traceback.
            log.error("%s (the end of attachment %s, %s, was not recorded)",
                      self._unwritable(exc), cid, label)

    def release(self, owner: int) -> None:
        """A client went away: its attachments end with it (Xen: its domains were destroyed)."""
        self.roles.pop(owner, None)
        for cid in [c for c, (_, _, o) in self.attached.items() if o == owner]:
            self._detach(cid, "released: the connection that attached it closed")

    def load(self, path: str) -> dict[str, Any]:
        """Validate fully, replay running attachments (Xen's chwall_init_state), then swap."""
        try:
            new = read_compiled(path)
            wall = ChineseWall(new)
            for label, name, _ in self.attached.values():
                d = wall.start(label, name)
                if not d.allowed:
                    raise PolicyError(path, None, f"conflicts with running domains: {d.reason}")
        except PolicyError as exc:
            self.audit.append("policy", event="load-refused", path=path, error=str(exc),
                              kept=self.policy.name)
            return {"ok": False, "error": str(exc)}
        self.audit.append("policy", event="loaded", path=path, old=self.policy.name,
                          **new.summary())
        self.policy, self.wall = new, wall
        log.info("policy %s loaded from %s", new.name, path)
        return {"ok": True, "policy": new.summary()}

    def respond(self, line: bytes, owner: int) -> dict[str, Any]:
        """The reply to one request line, carrying the request's id ("rid") back."""
        return self.answer([line], owner)[0]

    def answer(self, lines: list[bytes], owner: int) -> list[dict[str, Any]]:
        """The replies to request lines that arrived together, in their order, once one
        commit made their records durable; a request whose records the commit lost is
        answered with the error instead (fail closed)."""
        done = []
        for line in lines:
            before = self.audit.puts
            done.append((self._respond(line, owner), before, self.audit.puts))
        try:
            self.audit.commit()
        except OSError as exc:
            log.error("%s", self._unwritable(exc))
        replies = []
        for reply, before, after in done:
            if after > before and reply.get("ok") and not self.audit.durable(before, after):
                reply = {"ok": False, "error": self.unwritable, "rid": reply.get("rid")}
            replies.append(reply)
        return replies

    def _respond(self, line: bytes, owner: int) -> dict[str, Any]:
        rid = None
        try:
            req = peer_json(line)
            if not isinstance(req, dict):
                raise BadRequest("a request is a JSON object")
            rid = req.get("rid")
            if type(rid) is not int or not 0 < rid < 1 << 63:
                rid = None
                raise BadRequest('"rid" (the request id, echoed in the reply) must be a'
                                 " positive integer")
            return {**self.handle(req, owner), "rid": rid}
        except (ValueError, BadRequest) as exc:  # JSONDecodeError is a ValueError
            return {"ok": False, "error": f"bad request: {exc}", "rid": rid}
        except AuditUnwritable as exc:  # said in one line: the cause is not a bug here
            log.error("%s", exc)
            return {"ok": False, "error": str(exc), "rid": rid}
        except Exception as exc:  # never die on a request; the client fails closed
            log.exception("request failed")
            return {"ok": False, "error": f"access-control domain error: {exc}", "rid": rid}

    async def serve_connection(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        owner, buf, skipping = self.connections, b"", False
        me = asyncio.current_task()
        if me is not None:
            self.serving.add(me)
        decisions: list[bytes] = []
        records: list[bytes] = []
        try:
            while chunk := await reader.read(65536):
                buf += chunk
                while (nl := buf.find(b"\n")) >= 0 or len(buf) > MAX_LINE:
                    line, buf = (buf[:nl], buf[nl + 1:]) if nl >= 0 else (buf, b"")
                    if len(line) > MAX_LINE or skipping:
                        if not skipping:  # answer an over-long line once, then skip the rest
                            writer.write(json.dumps({"ok": False, "rid": None, "error": "bad"
                                                     f" request: line over {MAX_LINE} bytes"}
                                                    ).encode() + b"\n")
                        skipping = nl < 0
                        continue
                    if line.strip():
                        (records if _is_record(line) else decisions).append(line)
                # Decisions first, in their order; then records in groups, letting other
                # connections' decisions in between (the module's doc).
                for reply in self.answer(decisions, owner):
                    writer.write(json.dumps(reply).encode() + b"\n")
                decisions.clear()
                while records:
                    group, records[:] = records[:MAX_BATCH], records[MAX_BATCH:]
                    for reply in self.answer(group, owner):
                        writer.write(json.dumps(reply).encode() + b"\n")
                    await _let_others_in()
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # a client went away, or the domain is stopping: end this connection quietly
        finally:
            if me is not None:
                self.serving.discard(me)
            self.release(owner)
            writer.close()


async def _let_others_in() -> None:
    """A few turns of the event loop: a request that arrived on another connection while a
    group of records was committed is read (one turn), its handler woken (the next) and
    answered before this connection's next group, rather than after several."""
    for _ in range(YIELD_TURNS):
        await asyncio.sleep(0)


def _is_record(line: bytes) -> bool:
    """A "record" request (another domain's event), which may wait behind decisions."""
    try:
        req = peer_json(line)
    except ValueError:
        return False
    return isinstance(req, dict) and req.get("op") == "record"


async def serve(domain: AcmDomain, sock: socket.socket, ready_fd: int | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack_dump.install("acm")
    server = await asyncio.start_unix_server(domain.serve_connection, sock=sock, limit=MAX_LINE)
    ready(ready_fd)

    async def summarise() -> None:
        while True:
            await asyncio.sleep(domain.repeats.window / 4)
            try:
                domain.write_repeats()
            except (OSError, AuditError) as exc:
                log.error("cannot write repeated-refusal counts to the audit log: %s", exc)

    counting = asyncio.create_task(summarise())
    await stop.wait()
    counting.cancel()
    server.close()
    # Connections still open end before the log closes: a request read after it would be
    # refused as "cannot write the audit log (Bad file descriptor) ... free space there".
    for task in list(domain.serving):
        task.cancel()
    await asyncio.gather(*domain.serving, return_exceptions=True)
    domain.write_repeats(everything=True)
    domain.audit.append("domain", event="stop", policy=domain.policy.name)
    domain.audit.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trustvbd.domains.acm")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--policy", help="compiled policy (`trustvbd policy compile`)")
    which.add_argument("--null", action="store_true", help="no policy: allow everything")
    parser.add_argument("--audit", required=True, help="audit log file (JSON lines)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="Unix socket path to listen on")
    where.add_argument("--listen-fd", type=int, help="an already listening Unix socket")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--roles-fd", type=int, help="a pipe holding the secret that proves"
                        " callers' roles (the launcher's); without it nobody may record")
    parser.add_argument("--supervised", action="store_true", help="die with the launcher")
    parser.add_argument("--restore-wait", type=float, default=RESTORE_WAIT, help="after a restart,"
                        " how long new attachments wait for the encryption domains' counts")
    args = parser.parse_args(argv)
    setup_logging("acm")
    if args.supervised:
        die_with_parent()
    roles_secret: bytes | None = None
    restoring: list[str] = []
    if args.roles_fd is not None:
        with os.fdopen(args.roles_fd, "rb") as pipe:
            roles_secret = pipe.read(SECRET_SIZE)
            rest = pipe.read()  # after a restart: the encryption domains that hold counts
        try:
            restoring = json.loads(rest) if rest else []
            if not (isinstance(restoring, list) and all(isinstance(r, str) for r in restoring)):
                raise ValueError("not a list of roles")
        except ValueError as exc:
            print(f"trustvbd acm: the roles pipe's list of encryption domains: {exc}",
                  file=sys.stderr)
            return 2
    try:
        policy = Policy.null() if args.null else read_compiled(args.policy)
        audit = AuditLog(args.audit)
        audit.append("domain", event="start", pid=os.getpid(), **policy.summary())
    except (PolicyError, AuditError) as exc:
        print(f"trustvbd acm: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full or read-only state directory: said, not a traceback
        print(f"trustvbd acm: cannot write the audit log {args.audit}: {exc.strerror or exc};"
              " every decision is recorded there, so nothing is served without it: free space"
              " there (or make it writable) and start again", file=sys.stderr)
        return 1
    if policy.is_null:
        log.warning("NO POLICY (Xen's NULL policy): every decision is ALLOW")
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(args.socket):
            os.unlink(args.socket)
        sock.bind(args.socket)
        os.chmod(args.socket, 0o600)  # only the trusted domains' user may ask
        sock.listen(64)
    # Plain asyncio: the decisions are not a hot path, and fewer moving parts here is better.
    log.info("audit log %s signed by key %s", args.audit, fingerprint(audit.public_key).hex()[:16])
    return asyncio.run(serve(AcmDomain(policy, audit, roles_secret, restoring, args.restore_wait),
                             sock, args.ready_fd))


if __name__ == "__main__":
    sys.exit(main())
