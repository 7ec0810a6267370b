"""#9.8 Policy changes stick: a restarted access-control domain keeps the policy last loaded and
rebuilds the Chinese Wall from the live connections; a handshake in flight when a policy is
loaded is decided by the new one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.acm.test_client_cancel import Relay, settle
from tests.acm.test_domain import Acm
from tests.acm.util import EXAMPLE_TOML
from tests.interop import clients
from tests.interop.test_policy_e2e import POLICY, qemu_io, start, uri
from tests.support import System
from trustvbd.acm import load_policy
from trustvbd.acm.client import AcmClient
from trustvbd.acm.commands import write_compiled
from trustvbd.domains.messages import DiskSpec
from trustvbd.domains.policy_gate import PolicyGate
from trustvbd.nbd.server import PeerInfo

# The same policy, but Payroll guests lose the payroll disk (its type moves to Bank).
NO_PAYROLL = POLICY.replace('PayrollData = "Payroll"', 'PayrollData = "Bank"')


def acm_domain(s: System) -> dict:
    status = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    return next(d for d in status["domains"] if d["name"] == "acm")


def kill_acm_and_wait(s: System) -> None:
    before = acm_domain(s)
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while not ((now := acm_domain(s))["state"] == "running" and now["restarts"] == before["restarts"] + 1):
        assert time.monotonic() < deadline, now
        time.sleep(0.1)


def payroll_running_acm_restarted(root: Path) -> tuple[System, Any]:
    """`up` started, vm1 connected to the payroll disk (so Payroll runs), then the
    access-control domain killed and restarted; the system and the open connection."""
    s = start(root)
    payroll = clients.libnbd().NBD()
    payroll.connect_uri(uri(s, "vm1", "payroll"))
    kill_acm_and_wait(s)
    return s, payroll


def bank_gets_in(s: System) -> None:
    """Once vm1's Payroll connection is gone, its attachment is released: Bank gets in."""
    deadline = time.monotonic() + 10
    while qemu_io(uri(s, "vm2", "bank"))[0] != 0:
        assert time.monotonic() < deadline, "the Payroll attachment was not released"
        time.sleep(0.2)


@pytest.mark.interop
def test_a_restarted_acm_keeps_the_policy_last_loaded(short_tmp: Path) -> None:
    s = start(short_tmp)
    assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0
    (short_tmp / "new.toml").write_text(NO_PAYROLL)
    out = s.cli("policy", "load", "-c", str(s.config), str(short_tmp / "new.toml"))
    assert "loaded" in out.stdout
    assert qemu_io(uri(s, "vm1", "payroll"))[0] != 0
    kill_acm_and_wait(s)
    code, text = qemu_io(uri(s, "vm1", "payroll"))
    assert code != 0 and "share no STE type" in text, text  # still the loaded one
    status = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    assert status["policy"].endswith("new.toml")
    s.stop()


@pytest.mark.interop
def test_a_restarted_acm_rebuilds_the_chinese_wall_from_live_connections(short_tmp: Path) -> None:
    s, payroll = payroll_running_acm_restarted(short_tmp)
    code, text = qemu_io(uri(s, "vm2", "bank"))  # Bank conflicts with the running Payroll
    assert code != 0 and "RER" in text, text
    payroll.shutdown()
    del payroll
    bank_gets_in(s)
    s.stop()


def test_a_handshake_in_flight_is_decided_by_the_policy_loaded_meanwhile(short_tmp: Path) -> None:
    new = short_tmp / "new.tvbdpol"
    (short_tmp / "p.toml").write_text(EXAMPLE_TOML)
    (short_tmp / "n.toml").write_text(EXAMPLE_TOML.replace('PayrollData = "Payroll"',
                                                           'PayrollData = "Bank"'))
    write_compiled(load_policy(short_tmp / "n.toml"), new)
    acm = Acm(short_tmp / "p.toml")

    async def scenario() -> None:
        relay = Relay(acm.sock, short_tmp / "r.sock")
        await relay.start()
        client, admin = AcmClient(str(relay.path), timeout=5), AcmClient(str(acm.sock), timeout=5)
        gate = PolicyGate(client, {"vm1": "Payroll"}, [DiskSpec("payroll", "PayrollData", 4096,
                                                                 True, ["r"])])
        await gate.refresh()
        assert ("vm1", "payroll") in gate.visible
        relay.hold()  # the old policy's "allowed" is on its way back, held
        attach = asyncio.create_task(gate.attach(PeerInfo("vm1", "t"), "vm1", "Payroll",
                                                 "payroll", "PayrollData"))
        await settle()
        assert (await admin.load_policy(str(new)))["ok"]
        gate.policy_changed()  # what the hypervisor's PolicyChanged does first
        relay.open.set()
        decision = await attach
        assert not decision.allowed and "share no STE type" in decision.reason, decision
        assert (await admin.status())["attachments"] == 0
        for c in (client, admin):
            await c.close()
        await relay.close()

    try:
        asyncio.run(scenario())
    finally:
        acm.stop()


@pytest.mark.interop
def test_the_encryption_domain_rebuilds_the_wall_at_once_after_an_acm_restart(short_tmp: Path) -> None:
    """Told by the hypervisor, it re-attaches its live connections before any guest asks."""
    from trustvbd.acm.audit import AuditLog

    s, payroll = payroll_running_acm_restarted(short_tmp)
    audit = short_tmp / "state" / "audit.jsonl"
    deadline = time.monotonic() + 10
    while True:
        records = AuditLog.read(audit)
        starts = [i for i, r in enumerate(records) if r["kind"] == "domain"
                  and r["fields"].get("event") == "start"]
        after = records[starts[-1]:]
        if any(r["kind"] == "decision" and r["fields"]["op"] == "chw_attach"
               and r["fields"]["allowed"] and r["fields"]["label"] == "Payroll" for r in after):
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.1)
    payroll.shutdown()
    del payroll
    s.stop()


def crypt_pid(s: System, wtype: str) -> int:
    status = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    return int(next(d for d in status["domains"] if d["name"] == f"crypt-{wtype}")["pid"])


@pytest.mark.interop
def test_a_restarted_acm_decides_no_attachment_before_every_crypt_domain_restored(
        short_tmp: Path) -> None:
    """Two encryption domains, one per workload type of a conflict set (Payroll, Bank). The
    access-control domain restarts while the Payroll one is too slow to restore its live
    Payroll connection: a Bank guest must not get in meanwhile (the Wall would be broken),
    and once Payroll's count is back the Wall refuses Bank as before the restart."""
    s = start(short_tmp, env={"TRUSTVBD_ACM_RESTORE_WAIT": "60"})  # slow machines: no timeout
    nbd = clients.libnbd()
    payroll = nbd.NBD()
    payroll.connect_uri(uri(s, "vm1", "payroll"))  # Payroll runs
    slow = crypt_pid(s, "Payroll")
    os.kill(slow, signal.SIGSTOP)  # it cannot restore its count until it goes on
    try:
        kill_acm_and_wait(s)
        code, text = qemu_io(uri(s, "vm2", "bank"))
        assert code != 0, "a Bank guest got in while Payroll's count was not restored"
        assert "acm-restoring" in text and "try again" in text, text
    finally:
        os.kill(slow, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while True:  # Payroll's count comes back: the Wall itself refuses Bank now
        code, text = qemu_io(uri(s, "vm2", "bank"))
        assert code != 0, "a Bank guest got in while Payroll runs"
        if "acm-restoring" not in text:
            break
        assert time.monotonic() < deadline, text
    assert "RER" in text, text
    payroll.shutdown()
    del payroll
    bank_gets_in(s)
    s.stop()


@pytest.mark.interop
def test_after_the_wait_a_late_crypt_domain_closes_what_it_cannot_restore(short_tmp: Path) -> None:
    """The wait is bounded: a hung Payroll domain does not block Bank for ever. When it comes
    back, its Payroll attachment cannot be restored across the running Bank, so it closes
    that connection rather than leave both sides of the conflict set running."""
    s = start(short_tmp, env={"TRUSTVBD_ACM_RESTORE_WAIT": "1"})
    nbd = clients.libnbd()
    payroll = nbd.NBD()
    payroll.connect_uri(uri(s, "vm1", "payroll"))
    slow = crypt_pid(s, "Payroll")
    os.kill(slow, signal.SIGSTOP)
    try:
        kill_acm_and_wait(s)
        deadline = time.monotonic() + 30
        while (result := qemu_io(uri(s, "vm2", "bank")))[0] != 0:  # in, once the wait is over
            assert "acm-restoring" in result[1] and time.monotonic() < deadline, result[1]
        bank = nbd.NBD()
        bank.connect_uri(uri(s, "vm2", "bank"))  # Bank runs now
    finally:
        os.kill(slow, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while True:  # the Payroll domain restores, is refused, and closes its Payroll connection
        try:
            payroll.pread(4096, 0)
        except nbd.Error:
            break
        assert time.monotonic() < deadline, "Payroll and Bank both run after the restore"
        time.sleep(0.2)
    assert bank.pread(4096, 0) == bytes(4096)
    bank.shutdown()
    s.stop()
