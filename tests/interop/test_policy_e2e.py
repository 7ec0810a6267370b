"""The access-control domain enforced end to end: real qemu-io, nbdinfo and libnbd clients."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.acm.util import XM_TEST
from tests.interop import clients
from tests.support import (
    TRUSTVBD,
    System,
    config,
    disk,
    driver,
    guest,
    pause,
    run,
    up_with_policy,
)
from trustvbd.domains.supervisor import signal_stopped

pytestmark = pytest.mark.interop

POLICY = """
name = "payroll-example"
bootstrap = "SystemManagement"
[ste]
types = ["SystemManagement", "Payroll", "Bank", "Storage"]
[chinese_wall]
types = ["SystemManagement", "Payroll", "Bank"]
conflict_sets = { RER = ["Payroll", "Bank"] }
[labels.vm]
SystemManagement = { ste = ["SystemManagement", "Payroll", "Bank", "Storage"], chwall = ["SystemManagement"] }
Payroll = { ste = ["Payroll"], chwall = ["Payroll"] }
Bank = { ste = ["Bank"], chwall = ["Bank"] }
Auditor = { ste = ["Payroll"] }
StorageA = { ste = ["Storage", "Payroll", "Bank"] }
StorageB = { ste = ["Storage", "Bank"] }
[labels.resource]
PayrollData = "Payroll"
BankData = "Bank"
"""

DRIVER = driver("drv-a", "StorageA", dir="backing/a")
PAYROLL, BANK = (disk("payroll", "PayrollData", ["drv-a"], encrypt=False),
                 disk("bank", "BankData", ["drv-a"], encrypt=False))
GUESTS = guest("vm1", "Payroll") + guest("vm2", "Bank") + guest("aud", "Auditor")
CONFIG = config(DRIVER, PAYROLL, BANK, GUESTS, policy="policy.toml")


def start(root: Path, policy: str = POLICY, config: str = CONFIG, env: dict[str, str] | None = None) -> System:
    return up_with_policy(root, policy, config, **(env or {}))


def uri(s: System, guest: str, disk: str) -> str:
    return f"nbd+unix:///{disk}?socket={s.root / 'state' / 'guests' / (guest + '.sock')}"


def qemu_io(u: str) -> tuple[int, str]:
    out = run(["qemu-io", "-f", "raw", u, "-c", "read 0 4k"], check=False)
    return out.returncode, out.stdout + out.stderr


def test_only_allowed_pairs_are_listed_and_served(short_tmp: Path) -> None:
    s = start(short_tmp)
    assert set(s.uris) == {("vm1", "payroll"), ("vm2", "bank"), ("aud", "payroll")}
    code, _ = qemu_io(uri(s, "vm1", "payroll"))
    assert code == 0
    code, text = qemu_io(uri(s, "vm1", "bank"))
    assert code != 0
    assert "Payroll" in text and "BankData" in text  # the one-line reason names both labels
    listed = json.loads(run(["nbdinfo", "--list", "--json", uri(s, "vm2", "bank")]).stdout)
    assert [e["export-name"] for e in listed["exports"]] == ["bank"]
    s.stop()


def test_refusal_shows_in_nbdinfo(short_tmp: Path) -> None:
    s = start(short_tmp)
    out = run(["nbdinfo", uri(s, "vm2", "payroll")], check=False, env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert out.returncode != 0
    assert "policy" in out.stderr.lower() and "BankData" not in out.stdout
    s.stop()


def test_driver_that_may_not_serve_disk_stops_up(short_tmp: Path) -> None:
    (short_tmp / "policy.toml").write_text(POLICY)
    (short_tmp / "c.toml").write_text(CONFIG.replace('label = "StorageA"', 'label = "StorageB"'))
    out = run([*TRUSTVBD, "up", "-c", str(short_tmp / "c.toml")], check=False, timeout=60)
    assert out.returncode == 1
    assert "drv-a" in out.stderr and "StorageB" in out.stderr and "PayrollData" in out.stderr
    assert not (short_tmp / "backing" / "a" / "payroll.img").exists()


def test_bad_policy_stops_up_with_file_and_line(short_tmp: Path) -> None:
    bad = POLICY.replace('Bank = { ste = ["Bank"], chwall = ["Bank"] }',
                         'Bank = { ste = ["Bank"], chwall = ["Bank", "Payroll"] }')
    (short_tmp / "policy.toml").write_text(bad)
    (short_tmp / "c.toml").write_text(CONFIG)
    out = run([*TRUSTVBD, "up", "-c", str(short_tmp / "c.toml")], check=False, timeout=60)
    assert out.returncode == 2
    assert "policy.toml:" in out.stderr and "conflict set" in out.stderr


def test_chinese_wall_refuses_until_the_other_leaves(short_tmp: Path) -> None:
    s = start(short_tmp)
    nbd = clients.libnbd()
    payroll = nbd.NBD()
    payroll.connect_uri(uri(s, "vm1", "payroll"))
    code, text = qemu_io(uri(s, "vm2", "bank"))
    assert code != 0 and "RER" in text  # the conflict set that decided
    # Same type again is no conflict; a label without Chinese Wall types never conflicts.
    assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0
    assert qemu_io(uri(s, "aud", "payroll"))[0] == 0
    payroll.shutdown()
    time.sleep(0.3)
    assert qemu_io(uri(s, "vm2", "bank"))[0] == 0
    s.stop()


def test_policy_load_closes_forbidden_connections_and_applies_at_once(short_tmp: Path) -> None:
    s = start(short_tmp)
    nbd = clients.libnbd()
    held = nbd.NBD()
    held.connect_uri(uri(s, "aud", "payroll"))
    assert held.pread(4096, 0) == bytes(4096)
    stricter = POLICY.replace('Auditor = { ste = ["Payroll"] }', 'Auditor = { ste = ["Bank"] }')
    (short_tmp / "stricter.toml").write_text(stricter)
    out = s.cli("policy", "load", "-c", str(s.config), str(short_tmp / "stricter.toml"))
    assert "1 connection(s)" in out.stdout
    with pytest.raises(nbd.Error):
        held.pread(4096, 0)
    assert qemu_io(uri(s, "aud", "payroll"))[0] != 0
    assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0  # untouched by the change
    # A broken policy is refused and the running one stays.
    (short_tmp / "broken.toml").write_text("name = \n")
    bad = s.cli("policy", "load", "-c", str(s.config), str(short_tmp / "broken.toml"), check=False)
    assert bad.returncode == 1 and "broken.toml" in bad.stderr
    assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0
    s.stop()


def test_fail_closed_when_access_control_domain_is_unreachable(short_tmp: Path) -> None:
    s = start(short_tmp, env={"TRUSTVBD_ACM_TIMEOUT": "1"})
    status = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    acm_pid = next(d["pid"] for d in status["domains"] if d["kind"] == "acm")
    os.kill(acm_pid, signal.SIGSTOP)
    try:
        code, text = qemu_io(uri(s, "vm1", "payroll"))
        assert code != 0 and "unreachable" in text
    finally:
        os.kill(acm_pid, signal.SIGCONT)
    assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0
    s.stop()


def test_every_decision_is_audited_and_tampering_is_detected(short_tmp: Path) -> None:
    s = start(short_tmp)
    qemu_io(uri(s, "vm1", "payroll"))
    qemu_io(uri(s, "vm1", "bank"))
    s.stop()
    out = run([*TRUSTVBD, "audit", "-c", str(s.config), "--json"]).stdout
    records = [json.loads(line) for line in out.splitlines()]
    decisions = [r for r in records if r["kind"] == "decision"]
    assert any(r["fields"].get("allowed") is True for r in decisions) or any(
        r.get("allowed") is True for r in decisions)
    text = json.dumps(decisions)
    assert '"bank"' in text and "false" in text
    assert run([*TRUSTVBD, "audit", "-c", str(s.config), "--verify"]).returncode == 0
    log = short_tmp / "state" / "audit.jsonl"
    lines = log.read_text().splitlines()
    del lines[2]
    log.write_text("\n".join(lines) + "\n")
    bad = run([*TRUSTVBD, "audit", "-c", str(s.config), "--verify"], check=False)
    assert bad.returncode == 1


def test_policy_show_reads_a_real_xen_policy(short_tmp: Path) -> None:
    """xm-test's policy: types green/red/blue, conflict set RER = {blue, red}."""
    policy = XM_TEST
    text = run([*TRUSTVBD, "policy", "show", str(policy)]).stdout
    assert "RER" in text
    assert "green" in text


def test_channel_to_driver_needs_a_type_shared_with_the_trusted_side(short_tmp: Path) -> None:
    """(a) may allow the driver, but the channel itself is STE between the encryption domain
    (bootstrap label) and the driver, as Xen checks event channels."""
    policy = POLICY.replace('ste = ["SystemManagement", "Payroll", "Bank", "Storage"]',
                            'ste = ["SystemManagement", "Bank"]')
    policy = policy.replace('StorageA = { ste = ["Storage", "Payroll", "Bank"] }', 'StorageA = { ste = ["Payroll"] }')
    (short_tmp / "policy.toml").write_text(policy)
    (short_tmp / "c.toml").write_text(config(DRIVER, PAYROLL, GUESTS, policy="policy.toml"))
    out = run([*TRUSTVBD, "up", "-c", str(short_tmp / "c.toml")], check=False, timeout=60)
    assert out.returncode == 1
    assert "channel between the encryption domain" in out.stderr and "SystemManagement" in out.stderr


def test_a_policy_load_of_a_fifo_or_device_is_refused_and_the_launcher_goes_on(
        short_tmp: Path) -> None:
    """The launcher loads a policy on its event loop: asked (on its control socket) to load
    a FIFO, it waited in open() for a writer for good, and `status`, brokering and every
    guest's start waited with it; /dev/zero was read (up to the limit) and called bad XML.
    Only a regular file is a policy now; anything else is refused in one line."""
    import json
    import socket

    s = start(short_tmp)
    fifo = short_tmp / "policy.fifo"
    os.mkfifo(fifo)
    try:
        for path in (str(fifo), "/dev/zero"):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(20)
            c.connect(str(s.root / "state" / "control.sock"))
            c.sendall(json.dumps({"type": "policy-load", "path": path, "id": 7}).encode() + b"\n")
            reply = json.loads(c.makefile("rb").readline())
            c.close()
            assert reply["type"] == "failed", reply
            assert reply["message"] == f"{path}: not a regular file (a policy is one); refused"
        out = run([*TRUSTVBD, "policy", "load", "-c", str(s.config), str(fifo)], check=False,
                  timeout=20)
        assert out.returncode == 1
        assert out.stderr == (f"trustvbd policy load: {fifo}: not a regular file (a policy is"
                              " one); refused\n")
        code, _ = qemu_io(uri(s, "vm1", "payroll"))
        assert code == 0
        s.stop()
    finally:
        s.kill()


def closed_within(h: Any, seconds: float) -> bool:
    """Whether the server closes this idle libnbd connection within `seconds`. Nothing is
    sent: a request to a stopped server would wait in libnbd for good."""
    nbd = clients.libnbd()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            h.poll(100)
        except nbd.Error:
            return True
        if h.aio_is_dead() or h.aio_is_closed():
            return True
    return False


def test_a_stopped_encryption_domain_does_not_hold_up_a_policy_load_elsewhere(
        short_tmp: Path) -> None:
    """`policy load` told the encryption domains one after another, each with 60 s to answer:
    one stopped (SIGSTOP; a stalled loop alike) held the load past the CLI's 30 s, and the
    domains after it never closed the connections the new policy forbids: vm2 kept the bank
    disk it may no longer use. Now all are told at once; the CLI's answer names the one that
    did not confirm and what to do; resumed, it closes its forbidden connection too."""
    s = start(short_tmp)
    try:
        st = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
        stopped = next(d["pid"] for d in st["domains"] if d["name"] == "crypt-Payroll")
        nbd = clients.libnbd()
        bank, payroll = nbd.NBD(), nbd.NBD()
        bank.connect_uri(uri(s, "vm2", "bank"))  # crypt-Bank
        payroll.connect_uri(uri(s, "aud", "payroll"))  # crypt-Payroll
        assert bank.pread(4096, 0) == payroll.pread(4096, 0) == bytes(4096)
        stricter = (POLICY.replace('Bank = { ste = ["Bank"], chwall = ["Bank"] }',
                                   'Bank = { ste = ["Storage"], chwall = ["Bank"] }')
                    .replace('Auditor = { ste = ["Payroll"] }', 'Auditor = { ste = ["Storage"] }'))
        (short_tmp / "stricter.toml").write_text(stricter)
        pause(stopped)
        try:
            cli = subprocess.Popen([*TRUSTVBD, "policy", "load", "-c", str(s.config),
                                    str(short_tmp / "stricter.toml")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                # The running domain closes its forbidden connection while the other is stopped.
                assert closed_within(bank, 20)
                assert signal_stopped(stopped)
                out, err = cli.communicate(timeout=60)
            finally:
                if cli.poll() is None:
                    cli.kill()
                    cli.communicate()
            assert signal_stopped(stopped)
        finally:
            os.kill(stopped, signal.SIGCONT)
        # Within the CLI's own 30 s (else it says "did not answer" and exits 1).
        assert cli.returncode == 0, err
        assert "policy payroll-example loaded; 1 connection(s)" in out, out
        assert (f"encryption domain crypt-Payroll did not confirm the new policy within 10 s"
                f" (paused by a signal (SIGSTOP): answers nothing until `kill -CONT {stopped}`):"
                " the connections to its disks (payroll) that the policy now forbids stay open"
                " until it runs again") in out, out
        # Resumed, it reads what it was told and closes its forbidden connection as well.
        assert closed_within(payroll, 20)
        assert qemu_io(uri(s, "aud", "payroll"))[0] != 0
        assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0  # it runs again, untouched
        err = s.stop()
        assert ("encryption domain crypt-Payroll confirmed the new policy late: 1 connection(s)"
                " it forbids closed") in err, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    finally:
        s.kill()


def test_a_stopped_store_does_not_hold_up_the_encryption_domains_on_a_policy_load(
        short_tmp: Path) -> None:
    """The store was relabelled before any encryption domain was told: a stopped store made
    that time out, the load ended there with an empty error (the access-control domain had
    the new policy already), and no forbidden connection was closed. Now the encryption
    domains are told beside it, the answer says the store did not confirm, and resumed, the
    store rechecks its pairings all the same."""
    s = start(short_tmp)
    try:
        st = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
        store = next(d["pid"] for d in st["domains"] if d["kind"] == "store")
        nbd = clients.libnbd()
        bank = nbd.NBD()
        bank.connect_uri(uri(s, "vm2", "bank"))
        assert bank.pread(4096, 0) == bytes(4096)
        stricter = POLICY.replace('Bank = { ste = ["Bank"], chwall = ["Bank"] }',
                                  'Bank = { ste = ["Storage"], chwall = ["Bank"] }')
        (short_tmp / "stricter.toml").write_text(stricter)
        pause(store)
        try:
            out = s.cli("policy", "load", "-c", str(s.config), str(short_tmp / "stricter.toml"),
                        check=False)
            assert closed_within(bank, 1)  # closed before the answer came
        finally:
            os.kill(store, signal.SIGCONT)
        assert out.returncode == 0, out.stderr
        assert "policy payroll-example loaded; 1 connection(s)" in out.stdout, out.stdout
        assert ("note: the store did not confirm within 10 s that it rechecked its pairings"
                " against the new policy (stopped or overloaded?") in out.stdout, out.stdout
        assert qemu_io(uri(s, "vm2", "bank"))[0] != 0
        assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0
        time.sleep(1)  # resumed, the store reads what it was told
        err = s.stop()
        assert "the store rechecked its pairings against the new policy late" in err, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    finally:
        s.kill()


def test_a_second_policy_load_while_one_is_in_progress_is_refused(short_tmp: Path) -> None:
    """Two loads at once shared policy.next: with the first's request at the (here paused)
    access-control domain, the second overwrote the file, so the first swapped in the
    second's policy while `status` named the first's file, and the second failed on the file
    the first had renamed: the enforced policy was neither one asked for. Now the second is
    refused at once, and the first loads what it was given."""
    s = start(short_tmp, env={"TRUSTVBD_ACM_TIMEOUT": "60"})  # paused below: no timeout
    try:
        def status() -> dict[str, Any]:
            return json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)  # type: ignore[no-any-return]

        acm_pid = next(d["pid"] for d in status()["domains"] if d["kind"] == "acm")
        first, second = short_tmp / "a.toml", short_tmp / "b.toml"
        # a: the auditor loses the payroll disk; b: vm1 (Payroll) loses it instead.
        first.write_text(POLICY.replace('"payroll-example"', '"policy-a"').replace(
            'Auditor = { ste = ["Payroll"] }', 'Auditor = { ste = ["Bank"] }'))
        second.write_text(POLICY.replace('"payroll-example"', '"policy-b"').replace(
            'Payroll = { ste = ["Payroll"]', 'Payroll = { ste = ["Storage"]'))
        staged = short_tmp / "state" / "policy.next.tvbdpol"

        def load(path: Path) -> subprocess.Popen[str]:
            return subprocess.Popen([*TRUSTVBD, "policy", "load", "-c", str(s.config), str(path)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        pause(acm_pid)
        try:
            a = load(first)
            deadline = time.monotonic() + 30
            while not staged.exists():  # a's request is in the launcher, waiting on the acm
                assert time.monotonic() < deadline and a.poll() is None, a.communicate()
                time.sleep(0.05)
            b = load(second)
            with contextlib.suppress(subprocess.TimeoutExpired):
                b.wait(timeout=20)  # refused at once (the old code waited on the acm too)
        finally:
            os.kill(acm_pid, signal.SIGCONT)
        out_a, err_a = a.communicate(timeout=60)
        out_b, err_b = b.communicate(timeout=60)
        assert b.returncode == 1, (out_b, err_b)
        assert err_b.startswith(f"trustvbd policy load: a policy load is already in progress"
                                f" ({first}, asked "), err_b
        assert err_b.rstrip().endswith(f"wait for its answer, then load {second} again if it is"
                                       " still wanted"), err_b
        assert a.returncode == 0, err_a
        assert "policy policy-a loaded" in out_a, out_a
        assert status()["policy"] == str(first)
        assert qemu_io(uri(s, "aud", "payroll"))[0] != 0  # a's policy, not b's
        assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0
        # Once the first is answered, the second may load.
        again = s.cli("policy", "load", "-c", str(s.config), str(second))
        assert "policy policy-b loaded" in again.stdout, again.stdout
        assert qemu_io(uri(s, "vm1", "payroll"))[0] != 0
        s.stop()
    finally:
        s.kill()


def test_a_load_past_the_clis_timeout_goes_on_and_status_shows_it(short_tmp: Path) -> None:
    """A load that outlived the CLI's wait went on in the launcher, a new one refused as busy
    until it ended, yet the CLI said only that `up` was "stuck or overloaded" and that
    restarting it was safe, and `status` showed no load at all. Now the CLI says the load goes
    on, where to see it and that a new one is refused meanwhile; `status` shows it (which
    file, since when) until it ends, then the policy it put in force."""
    s = start(short_tmp, env={"TRUSTVBD_ACM_TIMEOUT": "60"})  # paused below: no timeout
    try:
        def status() -> dict[str, Any]:
            return json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)  # type: ignore[no-any-return]

        acm_pid = next(d["pid"] for d in status()["domains"] if d["kind"] == "acm")
        assert status()["policy_loading"] is None
        new = short_tmp / "new.toml"
        new.write_text(POLICY.replace('"payroll-example"', '"policy-new"').replace(
            'Auditor = { ste = ["Payroll"] }', 'Auditor = { ste = ["Bank"] }'))
        pause(acm_pid)
        try:
            asked = time.time()
            out = run([*TRUSTVBD, "policy", "load", "-c", str(s.config), "--timeout", "2",
                       str(new)], check=False, timeout=60)
            assert out.returncode == 1, out
            assert out.stderr.splitlines() == [
                f"trustvbd policy load: no answer within 2 s, but the load of {new} goes on in"
                " the launcher (it, or a domain it asks, is paused or overloaded); `trustvbd"
                f" status -c {s.config}` shows the policy in force, and this load while it is in"
                " progress; a new load is refused until it ends"], out.stderr
            now = status()
            loading = now["policy_loading"]
            assert loading["path"] == str(new) and loading["seconds"] >= 2, loading
            since = datetime.datetime.fromisoformat(loading["since"].replace("Z", "+00:00"))
            assert abs(since.timestamp() - asked) < 5, (loading, asked)
            assert now["policy"] != str(new)  # not yet in force
            text = s.cli("status", "-c", str(s.config)).stdout
            assert f"policy load in progress: {new} (asked {loading['since']}," in text, text
            busy = run([*TRUSTVBD, "policy", "load", "-c", str(s.config), str(new)],
                       check=False, timeout=60)
            assert "a policy load is already in progress" in busy.stderr, busy
        finally:
            os.kill(acm_pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while (now := status())["policy_loading"] is not None:  # it ends in the launcher
            assert time.monotonic() < deadline, now["policy_loading"]
            time.sleep(0.2)
        assert now["policy"] == str(new)
        assert "policy load in progress" not in s.cli("status", "-c", str(s.config)).stdout
        assert qemu_io(uri(s, "aud", "payroll"))[0] != 0  # the new policy, in force
        s.stop()
    finally:
        s.kill()
