"""`trustvbd unlock`: a restarted encryption domain's passphrase disks, unlocked while `up` runs.

Real processes throughout: `trustvbd up`, kill -9 of an encryption domain, the CLI with the
passphrase on standard input, a libnbd guest. The launcher keeps no passphrase, so the
restarted domain starts with the disk locked; only `unlock` opens it again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
from pathlib import Path

import pytest

from tests.interop import clients
from tests.interop.test_privsep import crypt_payroll, domains, start, wait_for
from tests.support import TRUSTVBD, System, pause, run
from trustvbd.acm.audit import AuditLog
from trustvbd.acm.commands import AUDIT_FILE
from trustvbd.cli import ask_running
from trustvbd.config_file import load_config
from trustvbd.domains import messages as m
from trustvbd.domains.unlock import Unlock, send_unlock

pytestmark = pytest.mark.interop

MIB = 1 << 20
RIGHT = "correct horse battery staple"


def disk_state(s: System, name: str) -> str:
    data = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    return str(next(d["state"] for d in data["disks"] if d["name"] == name))


def unlock(s: System, typed: str, *disks: str) -> tuple[int, str, str]:
    """`trustvbd unlock`, the passphrase typed into a pipe (not a terminal: no prompt)."""
    out = run([*TRUSTVBD, "unlock", "-c", str(s.config), *disks], check=False, input=typed)
    return out.returncode, out.stdout, out.stderr


def unlock_records(state: Path) -> list[dict]:
    return [r["fields"] for r in AuditLog.read(state / AUDIT_FILE)
            if r["kind"] == "event" and r["fields"].get("event") == "unlock"]


def test_a_restarted_encryption_domain_waits_locked_until_unlock(short_tmp: Path) -> None:
    s = start(short_tmp, TRUSTVBD_PASSPHRASE=RIGHT)
    state = short_tmp / "state"
    nbd = clients.libnbd()
    flushed = random.Random(7).randbytes(MIB)
    h = nbd.NBD()
    h.connect_uri(s.uri("vm1", "payroll"))
    h.pwrite(flushed, 0)
    h.flush()
    h.shutdown()

    old = domains(s)["crypt-Payroll"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: (d := crypt_payroll(s))["state"] == "running" and d["pid"] != old,
             "the encryption domain's restart")
    assert disk_state(s, "payroll") == "locked: run trustvbd unlock"
    assert disk_state(s, "bank") == "serving"  # another type's domain kept its disk
    assert "locked: run trustvbd unlock" in s.cli("status", "-c", str(s.config)).stdout

    # Locked: the guest gets a clear refusal, not data.
    h = nbd.NBD()
    with pytest.raises(nbd.Error, match="handshake"):  # NBD_REP_ERR_SHUTDOWN: unavailable
        h.connect_uri(s.uri("vm1", "payroll"))

    # A wrong passphrase: a clear error, the disk stays locked, the attempt is audited.
    code, out, err = unlock(s, "not the passphrase\n", "payroll")
    assert code == 1 and "wrong passphrase for disk 'payroll'" in err, (out, err)
    assert disk_state(s, "payroll") == "locked: run trustvbd unlock"
    assert unlock_records(state)[-1]["wrong_passphrase"] == ["payroll"]

    # A disk that is not there, or not locked, is refused by name.
    code, _, err = unlock(s, RIGHT + "\n", "nosuch")
    assert code == 1 and "no disk named 'nosuch'" in err, err
    code, _, err = unlock(s, RIGHT + "\n", "bank")
    assert code == 1 and "disk 'bank' is not locked" in err, err

    # The right one (every locked disk: none named): serving again, the flushed data intact.
    code, out, err = unlock(s, RIGHT + "\n")
    assert code == 0 and "disk 'payroll' unlocked" in out, (out, err)
    assert disk_state(s, "payroll") == "serving"
    assert unlock_records(state)[-1]["unlocked"] == ["payroll"]
    h = nbd.NBD()
    h.connect_uri(s.uri("vm1", "payroll"))
    assert h.pread(MIB, 0) == flushed
    h.shutdown()
    code, _, err = unlock(s, RIGHT + "\n")
    assert code == 1 and "no disk is locked" in err, err

    # The control socket takes the passphrase only as a closed pipe: none, or one still open
    # for writing, is refused at once (the hypervisor never waits on it).
    config = load_config(s.config)
    reply = ask_running(config, m.UnlockQuery([]))
    assert isinstance(reply, m.Failed) and "one pipe descriptor" in reply.message
    r, w = os.pipe()
    try:
        reply = ask_running(config, m.UnlockQuery([]), timeout=10, fds=[r])
    finally:
        os.close(r)
        os.close(w)
    assert isinstance(reply, m.Failed) and "still open for writing" in reply.message
    fd = send_unlock(Unlock(passphrase=bytearray(RIGHT.encode())))
    try:  # and a request that takes no descriptor gets its descriptors closed, not kept
        assert isinstance(ask_running(config, m.StatusQuery(), fds=[fd]), m.HvStatus)
    finally:
        os.close(fd)
    s.stop()


def test_a_stopped_encryption_domain_holds_up_no_other_unlock_and_is_named(
        short_tmp: Path) -> None:
    """`unlock` asked the encryption domains one after another, 300 s each: one stopped
    (SIGSTOP) held the others' disks locked for 5 minutes, then the command failed with an
    empty message and said nothing of the disks it did unlock. Now each is asked at once;
    the stopped one's disks are named with what to do, the others' are unlocked."""
    s = start(short_tmp, TRUSTVBD_PASSPHRASE=RIGHT)
    try:
        for name in ("crypt-Payroll", "crypt-Bank"):
            old = domains(s)[name]
            os.kill(old, signal.SIGKILL)
            wait_for(lambda name=name, old=old: domains(s)[name] not in (None, old),
                     f"{name}'s restart")
        wait_for(lambda: disk_state(s, "payroll") == disk_state(s, "bank")
                 == "locked: run trustvbd unlock", "both disks locked")
        stopped = domains(s)["crypt-Bank"]
        pause(stopped)
        try:
            out = run([*TRUSTVBD, "unlock", "-c", str(s.config)], check=False,
                      input=RIGHT + "\n", timeout=60)
            assert disk_state(s, "payroll") == "serving"
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert "disk 'payroll' unlocked" in out.stdout, (out.stdout, out.stderr)
        assert (f"trustvbd unlock: disk 'bank': its encryption domain crypt-Bank is paused by a"
                f" signal (SIGSTOP): answers nothing until `kill -CONT {stopped}`; then unlock"
                " again\n") in out.stderr, out.stderr
        assert disk_state(s, "bank") == "locked: run trustvbd unlock"  # never sent the passphrase
        assert unlock_records(short_tmp / "state")[-1]["unlocked"] == ["payroll"]
        code, out2, err = unlock(s, RIGHT + "\n")  # resumed: unlocked as asked
        assert code == 0 and "disk 'bank' unlocked" in out2, (out2, err)
        err = s.stop()
        assert "Traceback" not in err, err[-3000:]
    finally:
        s.kill()


def test_an_unlock_request_whose_descriptor_is_no_closed_pipe_is_refused_saying_so(
        short_tmp: Path) -> None:
    """Found by the attack campaign (h4): the control socket takes an unlock request from
    any process of the user running `up`. Its one descriptor must be the read end of a
    pipe whose write end is closed; a directory, a socket, /dev/zero or a pipe still open
    for writing was answered "internal" or "unreachable" with a bare errno text ("[Errno
    21] Is a directory"), and each logged a traceback in the launcher. Each is refused as
    invalid, saying what the descriptor is and what to send; the launcher logs no
    traceback and keeps answering."""
    from tests import support

    s = System(short_tmp, support.config(
        support.driver("drv-a", "A", dir="backing/a"), support.disk("d1", "A", ["drv-a"]),
        support.guest("vm1", "A"))).start()
    try:
        control = str(load_config(s.config).control_socket)
        r, w = os.pipe()
        os.write(w, b"\x01\x00\x03abc")  # a passphrase record; the write end stays open
        listening = socket.socket(socket.AF_UNIX)
        cases = {
            "a directory": (os.open("/", os.O_RDONLY), "is a directory, not a pipe"),
            "a socket": (listening.detach(), "is a socket, not a pipe"),
            "/dev/zero": (os.open("/dev/zero", os.O_RDONLY), "is a character device, not a pipe"),
            "an open pipe": (r, "still open for writing"),
        }
        for what, (fd, said) in cases.items():
            with socket.socket(socket.AF_UNIX) as c:
                c.settimeout(30)
                c.connect(control)
                socket.send_fds(c, [b'{"id": 1, "type": "unlock?", "disks": []}\n'], [fd])
                os.close(fd)
                reply = json.loads(c.makefile("rb").readline())
            assert reply["code"] == "invalid" and said in reply["message"], (what, reply)
            assert "trustvbd unlock" in reply["message"], (what, reply)
        os.close(w)
        assert disk_state(s, "d1") == "serving"
        log = s.stop()
        assert "Traceback" not in log, log[-3000:]
    finally:
        s.kill()
