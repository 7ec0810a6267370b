"""The channel broker: a driver asking for a channel to a domain it shares no STE type with
is refused, and the refusal is in the audit log. Real access-control domain, real control
channel as the hypervisor hands it to a driver."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from tests.interop.test_policy_e2e import POLICY
from tests.support import config, driver
from trustvbd.acm import Policy, load_policy
from trustvbd.acm.audit import AuditLog
from trustvbd.acm.commands import AUDIT_FILE, write_compiled
from trustvbd.config import Config
from trustvbd.config_file import load_config
from trustvbd.domains import messages as m
from trustvbd.domains.control import ControlChannel
from trustvbd.domains.hv import Launcher
from trustvbd.domains.hv_policy import bootstrap_label
from trustvbd.domains.supervisor import Domain, Launch

CONFIG = config(driver("drv-p", "Payroll", dir="backing/p"), driver("drv-b", "Bank", dir="backing/b"),
                policy="policy.toml")


def channel_decisions(state: Path) -> list[dict]:
    return [r["fields"] for r in AuditLog.read(state / AUDIT_FILE)
            if r["kind"] == "decision" and r["fields"]["op"] == "channel"]


def prepare(root: Path, policy_text: str, config_text: str, backing: list[str]) -> tuple[Config, Policy]:
    """The policy and config written into `root`, the drivers' directories made, both loaded."""
    (root / "policy.toml").write_text(policy_text)
    (root / "c.toml").write_text(config_text)
    for d in ("state/drivers", *backing):
        (root / d).mkdir(parents=True)
    return load_config(root / "c.toml"), load_policy(root / "policy.toml")


async def launcher(config: Config, policy: Policy) -> Launcher:
    """The hypervisor with its access-control domain running, as `up` starts them."""
    hv = Launcher(config, bootstrap_label(policy.bootstrap, null=False))
    write_compiled(policy, hv.compiled_policy())
    await hv.supervisor.start(hv.grants.acm_domain())
    return hv


def driver_channel(hv: Launcher, name: str) -> ControlChannel:
    """The hypervisor's end of the control channel driver `name` would inherit, as the
    driver itself holds it (the driver is not started: only its label matters here)."""
    launch = hv.driver_domain(name).launch()
    fd = int(launch.argv[launch.argv.index("--control-fd") + 1])
    channel = ControlChannel(socket.socket(fileno=os.dup(fd)), None, "hv")
    launch.started()
    channel.start()
    return channel


def test_a_driver_gets_no_channel_to_a_domain_it_shares_no_type_with(short_tmp: Path) -> None:
    config, policy = prepare(short_tmp, POLICY, CONFIG, ["backing/p", "backing/b"])

    async def scenario() -> None:
        hv = await launcher(config, policy)
        # drv-b as the supervisor knows it (not started: only its label matters here)
        hv.supervisor.domains["drv-b"] = Domain("drv-b", "driver", False, "Bank",
                                                lambda: Launch([]))
        driver = driver_channel(hv, "drv-p")
        try:
            reply, fds = await driver.ask(m.DomainChannelQuery("drv-b"), m.ChannelGranted)
            assert fds == [] and isinstance(reply, m.Failed), reply
            assert reply.code is m.ErrorCode.POLICY_DENIED
            assert "driver 'drv-p' (label Payroll)" in reply.message
            assert "domain 'drv-b' (label Bank)" in reply.message
            assert "share no STE type" in reply.message
            (refusal,) = channel_decisions(config.state_dir)
            assert refusal["a"] == "drv-p" and refusal["b"] == "drv-b"
            assert refusal["allowed"] is False and refusal["rule"] == "ste-no-shared-type"
            # A domain that is not there, and a malformed request, are refused too.
            reply, _ = await driver.ask(m.DomainChannelQuery("nobody"), m.ChannelGranted)
            assert isinstance(reply, m.Failed) and reply.code is m.ErrorCode.UNKNOWN
            raw, _ = await driver.request({"type": "channel?", "disk": 1})
            assert m.decode(raw) == m.Failed(m.ErrorCode.BAD_MESSAGE,
                                             "unexpected message type 'channel?'; expected"
                                             " domain-channel?")
            assert len(channel_decisions(config.state_dir)) == 1
        finally:
            driver.close()
            await hv.stop()
            await hv.acm.close()

    asyncio.run(scenario())


STORE_POLICY = """
name = "store-channels"
bootstrap = "SystemManagement"
[ste]
types = ["SystemManagement", "Payroll", "Quarantine"]
[labels.vm]
SystemManagement = { ste = ["SystemManagement", "Payroll"] }
Payroll = { ste = ["Payroll"] }
Isolated = { ste = ["Quarantine"] }
"""
STORE_CONFIG = config(driver("drv-p", "Payroll", dir="backing/p"),
                      driver("drv-q", "Isolated", dir="backing/q"), policy="policy.toml")


def test_a_driver_gets_its_own_store_connection_only_when_policy_allows(short_tmp: Path) -> None:
    """As blkback reaches xenstored: the hypervisor asks the access-control domain, then
    hands the driver a connection under its own domain id. The refusal is audited too."""
    from trustvbd.xenstore.client import XsClient
    from trustvbd.xenstore.wire import XsError

    config, policy = prepare(short_tmp, STORE_POLICY, STORE_CONFIG, ["backing/p", "backing/q"])

    async def scenario() -> None:
        hv = await launcher(config, policy)
        await hv.start_store()
        asking = []
        try:
            for name in ("drv-p", "drv-q"):
                asking.append(driver_channel(hv, name))
            granted, refused = asking
            reply, fds = await granted.ask(m.DomainChannelQuery("store"), m.ChannelGranted)
            assert isinstance(reply, m.ChannelGranted) and len(fds) == 1, reply
            xs = await XsClient.connect(sock=socket.socket(fileno=fds[0]))
            try:  # its own home, by a relative path: it is drv-p's connection
                assert await xs.read("name") == b"drv-p"
                other = hv.store.domid("driver", "drv-q")
                for attempt in (xs.write(f"/local/domain/{other}/name", "mine"),
                                xs.directory("/local/domain")):
                    with pytest.raises(XsError) as denied:  # and nobody else's
                        await attempt
                    assert denied.value.code == "EACCES"
            finally:
                await xs.close()
            reply, fds = await refused.ask(m.DomainChannelQuery("store"), m.ChannelGranted)
            assert fds == [] and isinstance(reply, m.Failed), reply
            assert reply.code is m.ErrorCode.POLICY_DENIED and "share no STE type" in reply.message
            decisions = [(d["a"], d["b"], d["allowed"]) for d in channel_decisions(config.state_dir)]
            assert decisions == [("drv-p", "store", True), ("drv-q", "store", False)], decisions
        finally:
            for channel in asking:
                channel.close()
            await hv.stop()
            await hv.acm.close()

    asyncio.run(scenario())
