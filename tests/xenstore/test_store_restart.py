"""The store under `up`: restarted after a kill with its tree, guests served meanwhile; its
pairings checked again after `policy load`. Real processes, real NBD client, xenstore-utils."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, NamedTuple

from tests.support import System, pause, read_lines_until
from tests.xenstore.test_up_store import CONFIG, POLICY, wait_for_value, xs, xs_env
from trustvbd.acm.audit import AuditLog
from trustvbd.acm.commands import AUDIT_FILE


def status(system: System) -> dict:
    return json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)


def domain(system: System, kind: str) -> dict:
    (found,) = [d for d in status(system)["domains"] if d["kind"] == kind]
    return found


def homes(system: System) -> dict[str, str]:
    return {xs(system, "xenstore-read", f"/local/domain/{d}/name").strip(): d
            for d in xs(system, "xenstore-list", "/local/domain").split()}


def start_system(root: Path) -> System:
    """`up` with the store tests' config and policy."""
    (root / "backing").mkdir()
    (root / "policy.toml").write_text(POLICY)
    return System(root, CONFIG).start()


class Pairing(NamedTuple):
    crypt: str  # the encryption domain's id
    frontend: str  # vm1's device directory
    backend: str  # the encryption domain's backend directory for it


def vm1_pairing(system: System) -> Pairing:
    ids = homes(system)
    vm1, crypt = ids["vm1"], ids["crypt-Payroll"]
    return Pairing(crypt, f"/local/domain/{vm1}/device/vbd/0",
                   f"/local/domain/{crypt}/backend/vbd/{vm1}/0")


def store_restarted_once(system: System) -> dict:
    """The store's status once it runs again after its first restart (within 30 s)."""
    deadline = time.monotonic() + 30
    while (now := domain(system, "store"))["state"] != "running" or now["restarts"] != 1:
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    return now


def vm1_connected(system: System, frontend: str) -> Any:
    """vm1's connection to its Payroll disk (an nbd.NBD), its device Connected in the store."""
    import nbd

    held = nbd.NBD()
    held.connect_uri(system.uri("vm1", "payroll"))
    wait_for_value(system, f"{frontend}/state", "4")
    return held


def payroll_made_rogue(root: Path) -> Path:
    """The tests' policy with label Payroll moved to type Rogue, written as root/new.toml."""
    new = POLICY.replace('Payroll = { ste = ["Payroll"] }', 'Payroll = { ste = ["Rogue"] }')
    assert new != POLICY
    path = root / "new.toml"
    path.write_text(new)
    return path


def assert_closed(held: Any) -> None:
    """The connection `vm1_connected` made was closed: a read on it fails."""
    import nbd

    try:
        held.pread(4096, 0)
    except nbd.Error:
        return
    raise AssertionError("the connection the new policy forbids was not closed")


def test_a_killed_store_comes_back_with_its_tree_and_guests_are_served_meanwhile(
        short_tmp: Path) -> None:
    import nbd

    system = start_system(short_tmp)
    try:
        _, frontend, backend = vm1_pairing(system)
        xs(system, "xenstore-write", "/tool/note", "kept")  # the administrator's own node
        first = nbd.NBD()
        first.connect_uri(system.uri("vm1", "payroll"))
        before = os.urandom(65536)
        first.pwrite(before, 0)
        first.flush()
        wait_for_value(system, f"{frontend}/state", "4")
        store = domain(system, "store")

        # Stopped first (it answers nobody), then killed: the guest is served all along, and
        # its disconnection while the store is down is not lost.
        os.kill(store["pid"], signal.SIGSTOP)
        during = os.urandom(65536)
        first.pwrite(during, 65536)
        first.flush()
        assert first.pread(131072, 0) == before + during
        first.shutdown()
        time.sleep(0.5)  # the encryption domain sees it go, and writes Closed to a stopped store
        os.kill(store["pid"], signal.SIGKILL)

        now = store_restarted_once(system)
        assert now["last_exit"] == "killed by SIGKILL" and now["pid"] != store["pid"]
        assert xs(system, "xenstore-read", "/tool/note") == "kept\n"  # the tree came back
        assert xs(system, "xenstore-read", f"{frontend}/backend").strip() == backend
        # Written by the encryption domain while the store was away, written again since.
        wait_for_value(system, f"{frontend}/state", "6", timeout=20)
        wait_for_value(system, f"{backend}/state", "2")

        second = nbd.NBD()
        second.connect_uri(system.uri("vm1", "payroll"))
        try:
            assert second.pread(131072, 0) == before + during
            wait_for_value(system, f"{frontend}/state", "4")
            assert xs(system, "xenstore-read", f"{backend}/state") == "4\n"
            (entry,) = [a for a in status(system)["attachments"] if a["frontend"] == "vm1"]
            assert (entry["frontend_state"], entry["backend_state"]) == (4, 4)
            assert "restarts 1 (last: killed by SIGKILL)" in system.cli(
                "status", "-c", str(system.config)).stdout
        finally:
            second.shutdown()
    finally:
        err = system.stop()
    assert "restarted: " in err and "nodes and" in err  # the store said what it restored


# The new policy moves label Payroll to type Rogue: guest vm1 may no longer use the Payroll
# disk (check (b): its connection is closed) nor be paired with the encryption domain,
# whose bootstrap label keeps SystemManagement and Payroll (check (a): torn down). The
# encryption domain's channels to the driver (StorageA has Payroll) stay paired.
def test_policy_load_tears_down_pairings_the_new_policy_forbids(short_tmp: Path) -> None:
    system = start_system(short_tmp)
    try:
        crypt, frontend, backend = vm1_pairing(system)
        held = vm1_connected(system, frontend)
        watcher = subprocess.Popen(["xenstore-watch", "-n", "3", f"{frontend}/state"],
                                   env=xs_env(system), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        read_lines_until(watcher, f"{frontend}/state", 10)  # registered

        new = payroll_made_rogue(short_tmp)
        out = system.cli("policy", "load", "-c", str(system.config), str(new))
        assert "1 pairing(s) in the store torn down" in out.stdout, out.stdout
        # Closing, then Closed: the watch fires for both.
        assert read_lines_until(watcher, f"{frontend}/state", 10) == [f"{frontend}/state"]
        assert read_lines_until(watcher, f"{frontend}/state", 10) == [f"{frontend}/state"]
        assert watcher.wait(10) == 0
        assert xs(system, "xenstore-read", f"{frontend}/state") == "6\n"
        assert xs(system, "xenstore-read", f"{backend}/state") == "6\n"
        # The directories are domain 0's now: neither end may write itself Connected again.
        assert xs(system, "xenstore-ls", "-p", frontend).count("(n0,r") >= 1
        (entry,) = [a for a in status(system)["attachments"] if a["frontend"] == "vm1"]
        assert (entry["frontend_state"], entry["backend_state"]) == (6, 6)
        # The replica channels the new policy still allows are untouched.
        for devid in xs(system, "xenstore-list", f"/local/domain/{crypt}/device/vbd").split():
            assert xs(system, "xenstore-read",
                      f"/local/domain/{crypt}/device/vbd/{devid}/state") == "4\n"
        assert_closed(held)
        # A second load changes nothing more.
        again = system.cli("policy", "load", "-c", str(system.config), str(new))
        assert "0 pairing(s) in the store torn down" in again.stdout
    finally:
        err = system.stop()
    assert f"forbids pairing {frontend} with {backend}: torn down" in err
    refusals = [r["fields"] for r in AuditLog.read(short_tmp / "state" / AUDIT_FILE)
                if r["kind"] == "decision" and r["fields"]["op"] == "channel"
                and r["fields"]["allowed"] is False and r["fields"]["a"] == "vm1"]
    assert [(d["a"], d["b"]) for d in refusals] == [("vm1", "crypt-Payroll")]


def test_a_store_stopped_then_killed_during_a_policy_load_tears_down_at_its_restart(
        short_tmp: Path) -> None:
    """A policy load while the store is stopped: the encryption domain closes the connection
    at once, the answer says the store did not confirm. The store, killed before it ever
    read the load, comes back with its saved tree, pairings decided under the old policy:
    they were kept for good. Now its restart rechecks them against the policy loaded."""
    system = start_system(short_tmp)
    try:
        _, frontend, backend = vm1_pairing(system)
        held = vm1_connected(system, frontend)
        store = domain(system, "store")
        new = payroll_made_rogue(short_tmp)
        pause(store["pid"])
        try:
            out = system.cli("policy", "load", "-c", str(system.config), str(new))
        finally:
            os.kill(store["pid"], signal.SIGKILL)
        assert "1 connection(s)" in out.stdout and "0 pairing(s)" in out.stdout, out.stdout
        assert ("note: the store did not confirm within 10 s that it rechecked its pairings"
                " against the new policy") in out.stdout, out.stdout
        store_restarted_once(system)
        # Torn down at its restart: both ends Closed, the directories domain 0's.
        wait_for_value(system, f"{backend}/state", "6", timeout=20)
        wait_for_value(system, f"{frontend}/state", "6")
        assert xs(system, "xenstore-ls", "-p", frontend).count("(n0,r") >= 1
        assert_closed(held)
    finally:
        err = system.stop()
    assert f"the policy loaded forbids pairing {frontend} with {backend}: torn down" in err, err
    assert "Traceback" not in err, err[-3000:]
