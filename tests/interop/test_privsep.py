"""Privilege separation, checked as root against a real `trustvbd up`.

A probe process takes a domain's exact credentials (uid, gid, groups) and enters its
namespaces (nsenter + setpriv, with no_new_privs), then tries to read files and connect
to sockets: what the probe cannot do, the domain cannot do either. Every probe also has
a positive control, so a probe that cannot run at all fails the test instead of passing it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.interop import clients
from tests.support import TRUSTVBD, System, config, disk, driver, guest, read_lines_until, run, up_with_policy
from trustvbd.domains import sandbox

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(os.geteuid() != 0, reason="privilege separation needs root to set up"),
]

MIB = 1 << 20
POLICY = """\
name = "privsep"
bootstrap = "SystemManagement"
[ste]
types = ["SystemManagement", "Payroll", "Bank"]
[labels.vm]
SystemManagement = { ste = ["SystemManagement", "Payroll", "Bank"] }
Payroll = { ste = ["Payroll"] }
Bank = { ste = ["Bank"] }
StorageA = { ste = ["Payroll", "Bank"] }
[labels.resource]
PayrollData = "Payroll"
BankData = "Bank"
"""
CONFIG = config(driver("drv-a", "StorageA", dir="backing/a"),
                disk("payroll", "PayrollData", ["drv-a"], size="8MiB"),
                disk("bank", "BankData", ["drv-a"], size="8MiB"),
                guest("vm1", "Payroll"), guest("vm2", "Bank"), policy="policy.toml")

PROBE = """
import json, os, socket, sys
plan = json.loads(sys.argv[1])
out = {"uid": os.getuid(), "read": {}, "connect": {}}
for path in plan["read"]:
    try:
        with open(path, "rb") as f:
            f.read(1)
        out["read"][path] = "ok"
    except OSError as exc:
        out["read"][path] = type(exc).__name__
for path in plan["connect"]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        out["connect"][path] = "ok"
    except OSError as exc:
        out["connect"][path] = type(exc).__name__
    finally:
        s.close()
print(json.dumps(out))
"""


def start(root: Path, **env: str) -> System:
    root.chmod(0o755)  # the walls must be the state directory's, not a closed parent's
    (root / "backing" / "a").mkdir(parents=True, mode=0o700)  # closed to the driver's user
    return up_with_policy(root, POLICY, CONFIG, **env)


def domains(s: System) -> dict[str, int]:
    data = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    return {d["name"]: d["pid"] for d in data["domains"]}


def credentials(pid: int) -> tuple[int, int, list[int], bool]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    groups = [int(g) for g in fields["Groups"].split()]
    return (int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0]), groups,
            fields["NoNewPrivs"].strip() == "1")


def probe(pid: int, read: list[Path], connect: list[Path]) -> dict:
    """Try `read` and `connect` with the credentials and namespaces of process `pid`."""
    uid, gid, groups, _ = credentials(pid)
    group_arg = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    plan = json.dumps({"read": [str(p) for p in read], "connect": [str(p) for p in connect]})
    out = run(["nsenter", "-t", str(pid), "-m", "-n", "--", "setpriv", f"--reuid={uid}",
               f"--regid={gid}", group_arg, "--no-new-privs", sys.executable, "-c", PROBE, plan],
              cwd="/")
    result = json.loads(out.stdout)
    assert result["uid"] == uid
    return result


def environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    found = [int(p) for p in out.stdout.split()]
    return found + [g for c in found for g in children(c)]


def test_driver_and_encryption_domains_are_walled_off(short_tmp: Path) -> None:
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    (state / "kek.key").write_bytes(os.urandom(32))  # new disks take the passphrase; kept anyway
    (state / "kek.key").chmod(0o600)
    s = start(short_tmp, TRUSTVBD_PASSPHRASE="correct horse battery staple")
    pids = domains(s)
    driver, payroll, bank = pids["drv-a"], pids["crypt-Payroll"], pids["crypt-Bank"]
    d_uid, _, d_groups, d_nnp = credentials(driver)
    p_uid, _, _, p_nnp = credentials(payroll)
    b_uid, _, _, _ = credentials(bank)
    assert 0 not in (d_uid, p_uid, b_uid) and len({d_uid, p_uid, b_uid}) == 3
    assert d_groups == [] and d_nnp and p_nnp
    assert os.readlink(f"/proc/{driver}/ns/net") != os.readlink("/proc/self/ns/net")

    secrets = [state / "kek.key", state / "disks" / "payroll" / "keys",
               state / "disks" / "bank" / "keys", state / "disks" / "payroll" / "anchor",
               state / "disks" / "bank" / "anchor", state / "audit.jsonl",
               short_tmp / "backing" / "a" / "payroll.img"]
    sockets = [state / "guests" / "vm1.sock", state / "guests" / "vm2.sock", state / "acm.sock",
               state / "control.sock"]
    seen = probe(driver, [*secrets, Path("/proc/self/status")], sockets)
    assert seen["read"].pop("/proc/self/status") == "ok"  # the probe itself works
    assert set(seen["read"].values()) == {"PermissionError"}, seen
    assert set(seen["connect"].values()) == {"PermissionError"}, seen

    # An encryption domain reads its own type's keys and no other's.
    seen = probe(payroll, [state / "disks" / "payroll" / "keys", state / "disks" / "bank" / "keys",
                           state / "disks" / "bank" / "anchor", state / "kek.key",
                           state / "audit.jsonl"], [state / "acm.sock", state / "control.sock"])
    assert seen["read"] == {
        str(state / "disks" / "payroll" / "keys"): "ok",
        str(state / "disks" / "bank" / "keys"): "PermissionError",
        str(state / "disks" / "bank" / "anchor"): "PermissionError",
        str(state / "kek.key"): "PermissionError",
        str(state / "audit.jsonl"): "PermissionError"}
    # Not even the access-control socket: its channel to it is handed over by the hypervisor.
    assert seen["connect"] == {str(state / "acm.sock"): "PermissionError",
                               str(state / "control.sock"): "PermissionError"}

    # No passphrase in any domain's environment, no TRUSTVBD_* in a driver's.
    assert s.proc is not None
    for pid in children(s.proc.pid):
        with_env = environment(pid)
        assert not any("PASSPHRASE" in k for k in with_env), (pid, sorted(with_env))
        assert "correct horse" not in Path(f"/proc/{pid}/cmdline").read_text()
    assert not [k for k in environment(driver) if k.startswith("TRUSTVBD_")]
    # Nor in the launcher's own start-up environment (/proc/PID/environ), once it has started.
    assert b"correct horse" not in Path(f"/proc/{s.proc.pid}/environ").read_bytes()

    # The driver and its workers confined themselves too (tests/test_confine.py shows what
    # that walls off): their seccomp filter is in place.
    for pid in [driver, *children(driver)]:
        assert "Seccomp:\t2" in Path(f"/proc/{pid}/status").read_text(), pid

    # And the data path works through all of it (the backing directory is closed to the driver).
    clients.qemu_io_patterns(s.uri("vm1", "payroll"))
    clients.qemu_io_patterns(s.uri("vm2", "bank"))
    clients.libnbd_requests(s.uri("vm1", "payroll"))  # flush, trim, zero reach the driver too
    err = s.stop()
    assert "confined: Landlock ABI" in err and "not confined" not in err, err


def wait_for(condition, what: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def crypt_payroll(s: System) -> dict:
    data = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    return next(d for d in data["domains"] if d["name"] == "crypt-Payroll")


def test_killed_encryption_domain_restarts_and_other_types_keep_serving(short_tmp: Path) -> None:
    s = start(short_tmp)
    nbd = clients.libnbd()
    flushed = random.Random(1).randbytes(MIB)
    h = nbd.NBD()
    h.connect_uri(s.uri("vm1", "payroll"))
    h.pwrite(flushed, 0)
    h.flush()

    stop, ops, errors = threading.Event(), [0], []

    def bank_io() -> None:  # another type's disk, busy the whole time
        b = nbd.NBD()
        b.connect_uri(s.uri("vm2", "bank"))
        rng = random.Random(2)
        try:
            while not stop.is_set():
                block, offset = rng.randbytes(4096), rng.randrange(2048) * 4096
                b.pwrite(block, offset)
                if b.pread(4096, offset) != block:
                    errors.append(f"bank: wrong data at {offset}")
                ops[0] += 1
        except Exception as exc:  # any failure of the other type's disk fails the test
            errors.append(f"bank: {exc}")
        finally:
            b.shutdown()

    t = threading.Thread(target=bank_io)
    t.start()
    try:
        wait_for(lambda: ops[0] > 20, "I/O on bank")
        old = domains(s)["crypt-Payroll"]
        os.kill(old, signal.SIGKILL)
        at_kill = ops[0]
        crypt = wait_for(lambda: (d := crypt_payroll(s))["state"] == "running" and d["pid"] != old
                         and d, "the encryption domain's restart")
        assert crypt["restarts"] == 1
        wait_for(lambda: ops[0] > at_kill + 20, "more I/O on bank after the restart")
        again = nbd.NBD()  # the guest reconnects to the same socket
        again.connect_uri(s.uri("vm1", "payroll"))
        assert again.pread(MIB, 0) == flushed
        again.shutdown()
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    s.stop()


def test_non_root_run_works_with_one_warning(short_tmp: Path) -> None:
    uid = sandbox.dynamic_uid(str(short_tmp), "test", "non-root")
    short_tmp.chmod(0o755)
    (short_tmp / "policy.toml").write_text(POLICY)
    (short_tmp / "trustvbd.toml").write_text(CONFIG)
    os.chown(short_tmp, uid, uid)
    for path in short_tmp.iterdir():
        os.chown(path, uid, uid)
    who = sandbox.Identity(uid, uid, expose=sandbox.closed_on_the_way(sandbox.python_paths()))
    proc = subprocess.Popen([*TRUSTVBD, "up", "-c", str(short_tmp / "trustvbd.toml")], cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=sandbox.clean_environment(), preexec_fn=sandbox.preexec(who))
    try:
        lines = read_lines_until(proc, "ready", 60)
        uris = {line.split()[1] + "/" + line.split()[3]: line.split()[4] for line in lines[:-1]}
        clients.qemu_io_patterns(uris["vm1/payroll"])
        clients.qemu_io_patterns(uris["vm2/bank"])
        everyone = [proc.pid, *children(proc.pid)]
        assert len(everyone) >= 5  # launcher, acm, driver (+ workers), two encryption domains
        assert {credentials(pid)[0] for pid in everyone} == {uid}
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert err.count("isolation is weaker") == 1, err


def test_a_driver_runs_as_the_account_its_config_names(short_tmp: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    as_nobody = CONFIG.replace('dir = "backing/a"', 'dir = "backing/a"\nuser = "nobody"')
    short_tmp.chmod(0o755)
    s = up_with_policy(short_tmp, POLICY, as_nobody)
    uid, gid, groups, no_new_privs = credentials(domains(s)["drv-a"])
    assert (uid, gid, groups, no_new_privs) == (nobody.pw_uid, nobody.pw_gid, [], True)
    clients.qemu_io_patterns(s.uri("vm1", "payroll"))
    s.stop()
