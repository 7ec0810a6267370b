"""The store inside `trustvbd up`: the device layout, XenBus states, status, check (a)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import System, config, disk, driver, guest, kill_driver, read_lines_until, run, up_with_policy
from trustvbd.acm.audit import AuditLog
from trustvbd.acm.commands import AUDIT_FILE

sys.path.append("/usr/lib/python3/dist-packages")

CONFIG = config(driver("drv-a", "StorageA", dir="backing"),
                disk("payroll", "PayrollData", ["drv-a"]), disk("rogue-disk", "RogueData", ["drv-a"]),
                guest("vm1", "Payroll"), guest("rogue", "Rogue"), policy="policy.toml")

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


def xs_env(system: System) -> dict[str, str]:
    socket_path = system.cli("store", "path", "-c", str(system.config)).stdout.strip()
    return {**os.environ, "XENSTORED_PATH": socket_path}


def xs(system: System, *cmd: str, check: bool = True) -> str:
    return run(list(cmd), env=xs_env(system), check=check, timeout=20).stdout


def wait_for_value(system: System, path: str, want: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (got := xs(system, "xenstore-read", path).strip()) != want:
        assert time.monotonic() < deadline, f"{path} is {got!r}, not {want!r}, after {timeout}s"
        time.sleep(0.05)


def test_attached_guest_shows_state_4_and_pairing_refusal_is_audited(short_tmp: Path) -> None:
    import nbd

    (short_tmp / "backing").mkdir()
    system = up_with_policy(short_tmp, POLICY, CONFIG)
    try:
        homes = {xs(system, "xenstore-read", f"/local/domain/{d}/name").strip(): d
                 for d in xs(system, "xenstore-list", "/local/domain").split()}
        vm1, crypt, drv = homes["vm1"], homes["crypt-Payroll"], homes["drv-a"]  # one per workload type
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
            # The driver itself joined the store over its own brokered channel and advertised
            # what it offers, as blkback does: the node is its own (first permission entry).
            wait_for_value(system, f"{be}/feature-flush-cache", "1")
            (line,) = [x for x in xs(system, "xenstore-ls", "-p", be).splitlines()
                       if x.startswith("feature-flush-cache")]
            assert f"(n{drv}" in line, line

        watcher = subprocess.Popen(["xenstore-watch", "-n", "3", frontend], env=xs_env(system),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        read_lines_until(watcher, frontend, 10)  # registered: the first event is the path itself
        handle = nbd.NBD()
        handle.connect_uri(system.uri("vm1", "payroll"))
        try:
            # Initialised, then Connected: two writes to the state key fire the watch.
            assert read_lines_until(watcher, f"{frontend}/state", 10) == [f"{frontend}/state"]
            assert read_lines_until(watcher, f"{frontend}/state", 10) == [f"{frontend}/state"]
            assert watcher.wait(10) == 0
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

        # A driver that dies: its end goes Closed, InitWait once restarted, Connected again
        # when the encryption domain reconnects (on the next request).
        status = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
        (driver_pid,) = [d["pid"] for d in status["domains"] if d["name"] == "drv-a"]
        channel = xs(system, "xenstore-read", f"/local/domain/{crypt}/device/vbd/0/backend").strip()
        kill_driver(driver_pid)
        wait_for_value(system, f"{channel}/state", "2", timeout=20)
        handle = nbd.NBD()
        handle.connect_uri(system.uri("vm1", "payroll"))
        try:
            handle.pwrite(b"x" * 4096, 0)  # reaches the driver (a read of unwritten blocks need not)
            wait_for_value(system, f"{channel}/state", "4")
        finally:
            handle.shutdown()

        # Check (a): the rogue guest's directories were refused their pairing, and removed.
        rogue = homes["rogue"]
        rogue_crypt = homes["crypt-Rogue"]
        for gone in (f"/local/domain/{rogue}/device/vbd/1", f"/local/domain/{rogue_crypt}/backend/vbd/{rogue}/1"):
            assert run(["xenstore-exists", gone], check=False, env=xs_env(system)).returncode == 1
    finally:
        err = system.stop()
    assert "policy forbids pairing rogue's frontend" in err
    records = [json.loads(line) for line in (short_tmp / "state" / AUDIT_FILE).read_text().splitlines()]
    decisions = [r["fields"] for r in records if r["kind"] == "decision"]
    refusals = [d for d in decisions if d["op"] == "channel" and d["allowed"] is False]
    assert [(d["a"], d["a_label"], d["b"], d["b_label"]) for d in refusals] == [
        ("rogue", "Rogue", "crypt-Rogue", "SystemManagement")]


def store_pid(system: System) -> tuple[int, dict]:
    status = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
    (store,) = [d for d in status["domains"] if d["kind"] == "store"]
    return store["pid"], store


def pair(system: System, fe: int, be: int, devid: int) -> subprocess.CompletedProcess[str]:
    """Domain 0 (the administrator) pairs a new frontend with a new backend directory."""
    return run(["xenstore-write", f"/local/domain/{fe}/device/vbd/{devid}/backend",
                f"/local/domain/{be}/backend/vbd/{fe}/{devid}"], env=xs_env(system), check=False)


def test_the_store_reaches_the_acm_domain_only_by_a_brokered_channel(short_tmp: Path) -> None:
    from tests.interop.test_privsep import probe

    (short_tmp / "backing").mkdir()
    system = up_with_policy(short_tmp, POLICY, CONFIG)
    state = short_tmp / "state"
    try:
        pid, _ = store_pid(system)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert not [a for a in argv if b"acm" in a], argv  # no path, no descriptor named
        if os.getuid() == 0:  # under its own uid: the path is closed to it
            seen = probe(pid, [], [state / "acm.sock"])
            assert seen["connect"] == {str(state / "acm.sock"): "PermissionError"}, seen
        homes = {xs(system, "xenstore-read", f"/local/domain/{d}/name").strip(): int(d)
                 for d in xs(system, "xenstore-list", "/local/domain").split()}
        vm1, rogue = homes["vm1"], homes["rogue"]
        crypt_p, crypt_r = homes["crypt-Payroll"], homes["crypt-Rogue"]

        # The access-control domain dies: the store's channel is gone; it asks for another.
        status = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
        (acm,) = [d for d in status["domains"] if d["kind"] == "acm"]
        os.kill(acm["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            status = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
            (acm,) = [d for d in status["domains"] if d["kind"] == "acm"]
            if acm["restarts"] == 1 and acm["state"] == "running":
                break
            assert time.monotonic() < deadline, acm
            time.sleep(0.1)
        # Pairing checks work through the new channel: allowed, and refused.
        assert pair(system, vm1, crypt_p, 7).returncode == 0
        refused = pair(system, rogue, crypt_r, 7)
        assert refused.returncode != 0 and "could not write" in refused.stderr, refused
    finally:
        system.stop()
    decisions = [r["fields"] for r in AuditLog.read(state / AUDIT_FILE) if r["kind"] == "decision"
                 and r["fields"]["op"] == "channel"]
    # The hypervisor asked before each channel it made for the store: one per start of acm.
    grants = [d for d in decisions if d["a"] == "store" and d["b"] == "acm"]
    assert len(grants) == 2 and all(d["allowed"] for d in grants), grants
    late = [(d["a"], d["b"], d["allowed"]) for d in decisions
            if d["a"] in ("vm1", "rogue") and d["b"].startswith("crypt-")]
    assert late[-2:] == [("vm1", "crypt-Payroll", True), ("rogue", "crypt-Rogue", False)]


def test_a_stopped_store_does_not_hold_up_a_replica_channel(short_tmp: Path) -> None:
    """The launcher answered an encryption domain's channel request only once the store had
    taken the driver end's new state: a stopped store (SIGSTOP; a stalled loop alike) held
    the channel, and with it the guest's I/O after a driver restart, until the store's
    request timed out 10 s later. Now the state goes to the store in the background."""
    import nbd

    from tests.support import pause

    (short_tmp / "backing").mkdir()
    system = up_with_policy(short_tmp, POLICY, CONFIG)
    try:
        homes = {xs(system, "xenstore-read", f"/local/domain/{d}/name").strip(): d
                 for d in xs(system, "xenstore-list", "/local/domain").split()}
        channel = xs(system, "xenstore-read",
                     f"/local/domain/{homes['crypt-Payroll']}/device/vbd/0/backend").strip()
        status = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
        (driver_pid,) = [d["pid"] for d in status["domains"] if d["name"] == "drv-a"]
        spid, _ = store_pid(system)
        handle = nbd.NBD()
        handle.connect_uri(system.uri("vm1", "payroll"))
        try:
            handle.pwrite(b"a" * 4096, 0)
            handle.flush()
            pause(spid)
            try:
                start = time.monotonic()
                kill_driver(driver_pid)
                handle.pwrite(b"b" * 4096, 0)  # a new channel to the restarted driver
                handle.flush()
                took = time.monotonic() - start
            finally:
                os.kill(spid, signal.SIGCONT)
            assert took < 8, f"{took:.1f} s: the channel waited for the stopped store"
            assert handle.pread(4096, 0) == b"b" * 4096
        finally:
            handle.shutdown()
        # The driver end's states reached the resumed store in order: Connected (4) last.
        wait_for_value(system, f"{channel}/state", "4", timeout=30)
    finally:
        system.stop()


def test_an_encryption_domain_restarts_and_serves_while_the_store_is_stopped(
        short_tmp: Path) -> None:
    """The launcher sent a restarted encryption domain its spec only with a connection to
    the store: a stopped store (SIGSTOP) failed that after 10 s, the domain died for want
    of a spec and was restarted, again and again, its guests served by nobody until the
    store ran again. Now it starts without one and asks for it until the store answers;
    the states it walked meanwhile reach the store then."""
    import nbd

    from tests.support import pause
    from trustvbd.domains.supervisor import signal_stopped

    (short_tmp / "backing").mkdir()
    system = up_with_policy(short_tmp, POLICY, CONFIG)

    def crypt() -> dict:
        status = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
        (domain,) = [d for d in status["domains"] if d["name"] == "crypt-Payroll"]
        return domain  # type: ignore[no-any-return]

    try:
        homes = {xs(system, "xenstore-read", f"/local/domain/{d}/name").strip(): d
                 for d in xs(system, "xenstore-list", "/local/domain").split()}
        backend = f"/local/domain/{homes['crypt-Payroll']}/backend/vbd/{homes['vm1']}/0"
        wait_for_value(system, f"{backend}/state", "2")  # served, no guest yet
        spid, _ = store_pid(system)
        before = crypt()
        pause(spid)
        try:
            os.kill(before["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 45
            while not ((now := crypt())["state"] == "running"
                       and now["restarts"] == before["restarts"] + 1):
                assert time.monotonic() < deadline, now
                time.sleep(0.2)
            handle = nbd.NBD()
            handle.connect_uri(system.uri("vm1", "payroll"))
            handle.pwrite(b"c" * 4096, 0)
            assert handle.pread(4096, 0) == b"c" * 4096
            assert signal_stopped(spid)  # all of it while the store was stopped
        finally:
            os.kill(spid, signal.SIGCONT)
        try:
            # Connected (4) for vm1's connection, written once the store answered.
            wait_for_value(system, f"{backend}/state", "4", timeout=30)
        finally:
            handle.shutdown()
    finally:
        system.stop()


def test_restarted_domains_are_ready_at_once_while_the_store_is_stopped(short_tmp: Path) -> None:
    """A stopped store (SIGSTOP) held a restarted encryption domain's spec, and a restarted
    driver's ready, until the launcher's request to it timed out 10 s later (the driver
    advertised itself in the store before it said it was ready). Now neither waits for a
    stopped store: both are running within a few seconds (restart back-off included), and
    what they write to the store lands once it runs again."""
    from tests.support import pause

    (short_tmp / "backing").mkdir()
    system = up_with_policy(short_tmp, POLICY, CONFIG)

    def domains() -> dict[str, dict]:
        status = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
        return {d["name"]: d for d in status["domains"]}

    try:
        homes = {xs(system, "xenstore-read", f"/local/domain/{d}/name").strip(): d
                 for d in xs(system, "xenstore-list", "/local/domain").split()}
        backend = f"/local/domain/{homes['crypt-Payroll']}/backend/vbd/{homes['vm1']}/0"
        wait_for_value(system, f"{backend}/state", "2")
        flush = (f"/local/domain/{homes['drv-a']}/backend/vbd/{homes['crypt-Payroll']}/0"
                 "/feature-flush-cache")
        xs(system, "xenstore-rm", flush)  # the restarted driver writes it again
        spid, _ = store_pid(system)
        before = domains()
        pause(spid)
        took = {}
        try:
            for name in ("crypt-Payroll", "drv-a"):
                start = time.monotonic()
                if name == "drv-a":
                    kill_driver(before[name]["pid"])
                else:
                    os.kill(before[name]["pid"], signal.SIGKILL)
                while not ((now := domains()[name])["state"] == "running"
                           and now["restarts"] == before[name]["restarts"] + 1):
                    assert time.monotonic() - start < 45, now
                    time.sleep(0.1)
                took[name] = time.monotonic() - start
        finally:
            os.kill(spid, signal.SIGCONT)
        assert all(t < 6 for t in took.values()), took
        deadline = time.monotonic() + 30  # the driver's advertisement, written later
        while xs(system, "xenstore-read", flush, check=False).strip() != "1":
            assert time.monotonic() < deadline, f"{flush} was not written again"
            time.sleep(0.1)
        wait_for_value(system, f"{backend}/state", "2", timeout=30)
    finally:
        system.stop()
