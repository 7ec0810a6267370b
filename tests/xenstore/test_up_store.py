"""The store inside `trustvbd up`: the device layout, XenBus states, status, check (a)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tests.support import System, run
from trustvbd.acm.commands import AUDIT_FILE

sys.path.append("/usr/lib/python3/dist-packages")

CONFIG = """
state_dir = "state"
policy = "policy.toml"
[[driver]]
name = "drv-a"
label = "StorageA"
dir = "backing"
[[disk]]
name = "payroll"
size = "4MiB"
label = "PayrollData"
replicas = ["drv-a"]
[[disk]]
name = "rogue-disk"
size = "4MiB"
label = "RogueData"
replicas = ["drv-a"]
[[guest]]
name = "vm1"
label = "Payroll"
[[guest]]
name = "rogue"
label = "Rogue"
"""

# The launcher and encryption domain run under the bootstrap label, which shares no STE
# type with "Rogue": the rogue guest may use its disk (check (b) allows it), but its
# frontend directory may not be paired with the encryption domain's backend (check (a)).
POLICY = """
name = "store-test"
bootstrap = "SystemManagement"
[ste]
types = ["SystemManagement", "Payroll", "Rogue"]
[labels.vm]
SystemManagement = { ste = ["SystemManagement", "Payroll"] }
Payroll = { ste = ["Payroll"] }
Rogue = { ste = ["Rogue"] }
StorageA = { ste = ["Payroll", "Rogue"] }
[labels.resource]
PayrollData = "Payroll"
RogueData = "Rogue"
"""


def xs(system: System, *cmd: str, check: bool = True) -> str:
    socket_path = system.cli("store", "path", "-c", str(system.config)).stdout.strip()
    env = {**os.environ, "XENSTORED_PATH": socket_path}
    return run(list(cmd), env=env, check=check, timeout=20).stdout


def wait_for_value(system: System, path: str, want: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (got := xs(system, "xenstore-read", path).strip()) != want:
        assert time.monotonic() < deadline, f"{path} is {got!r}, not {want!r}, after {timeout}s"
        time.sleep(0.05)


def test_attached_guest_shows_state_4_and_pairing_refusal_is_audited(short_tmp: Path) -> None:
    import nbd

    (short_tmp / "backing").mkdir()
    (short_tmp / "policy.toml").write_text(POLICY)
    system = System(short_tmp, CONFIG).start()
    try:
        homes = {xs(system, "xenstore-read", f"/local/domain/{d}/name").strip(): d
                 for d in xs(system, "xenstore-list", "/local/domain").split()}
        vm1, crypt, drv = homes["vm1"], homes["crypt"], homes["drv-a"]
        frontend = f"/local/domain/{vm1}/device/vbd/0"
        backend = f"/local/domain/{crypt}/backend/vbd/{vm1}/0"
        assert xs(system, "xenstore-read", f"{frontend}/backend").strip() == backend
        assert xs(system, "xenstore-read", f"{backend}/frontend").strip() == frontend
        assert xs(system, "xenstore-read", f"{frontend}/state") == "1\n"  # no guest yet
        wait_for_value(system, f"{backend}/state", "2")  # the encryption domain waits for one
        # Its channels to the driver are connected, on both sides.
        for devid in xs(system, "xenstore-list", f"/local/domain/{crypt}/device/vbd").split():
            fe = f"/local/domain/{crypt}/device/vbd/{devid}"
            assert xs(system, "xenstore-read", f"{fe}/state") == "4\n"
            be = xs(system, "xenstore-read", f"{fe}/backend").strip()
            assert be.startswith(f"/local/domain/{drv}/backend/vbd/{crypt}/")
            assert xs(system, "xenstore-read", f"{be}/state") == "4\n"
            # The driver's directory does not name the disk (drivers see opaque exports).
            assert "disk" not in xs(system, "xenstore-list", be).split()

        handle = nbd.NBD()
        handle.connect_uri(system.uri("vm1", "payroll"))
        try:
            wait_for_value(system, f"{frontend}/state", "4")
            assert xs(system, "xenstore-read", f"{backend}/state") == "4\n"
            status = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
            (entry,) = [a for a in status["attachments"] if a["frontend"] == "vm1"]
            assert (entry["frontend_state"], entry["backend_state"]) == (4, 4)
            assert "4 Connected / 4 Connected" in system.cli("status", "-c", str(system.config)).stdout
        finally:
            handle.shutdown()
        wait_for_value(system, f"{frontend}/state", "6")
        wait_for_value(system, f"{backend}/state", "2")

        # Check (a): the rogue guest's directories were refused their pairing, and removed.
        rogue = homes["rogue"]
        for gone in (f"/local/domain/{rogue}/device/vbd/1", f"/local/domain/{crypt}/backend/vbd/{rogue}/1"):
            assert run(["xenstore-exists", gone], check=False, env={
                **os.environ, "XENSTORED_PATH": str(short_tmp / "state" / "store.sock")}).returncode == 1
    finally:
        err = system.stop()
    assert "policy forbids pairing rogue's frontend" in err
    records = [json.loads(line) for line in (short_tmp / "state" / AUDIT_FILE).read_text().splitlines()]
    decisions = [r["fields"] for r in records if r["kind"] == "decision"]
    refusals = [d for d in decisions if d["op"] == "channel" and d["allowed"] is False]
    assert [(d["a"], d["a_label"], d["b"], d["b_label"]) for d in refusals] == [
        ("rogue", "Rogue", "crypt", "SystemManagement")]
