"""The hypervisor end to end: a dead access-control domain is restarted with back-off shown in
`status`, and the encryption domain gets a new channel to it from the hypervisor (no path)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.interop.test_policy_e2e import qemu_io, start, uri
from tests.support import (
    TRUSTVBD,
    System,
    config,
    disk,
    driver,
    guest,
    kill_driver,
    pause,
    pids_of_children,
    run,
)

pytestmark = pytest.mark.interop


def domains(s: System) -> dict[str, dict]:
    status = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    return {d["name"]: d for d in status["domains"]}


def test_killed_acm_domain_is_restarted_and_decisions_resume(short_tmp: Path) -> None:
    s = start(short_tmp)
    assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0
    before = domains(s)["acm"]
    assert before["restarts"] == 0 and before["last_exit"] is None
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        acm = domains(s)["acm"]
        if acm["state"] == "running" and acm["restarts"] == 1:
            break
        assert time.monotonic() < deadline, acm
        time.sleep(0.1)
    assert acm["last_exit"] == "killed by SIGKILL" and acm["pid"] != before["pid"]
    assert acm["next_retry"] is None
    # The encryption domain asked the hypervisor for a new channel and decides again.
    assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0
    code, text = qemu_io(uri(s, "vm2", "payroll"))
    assert code != 0 and "share no STE type" in text
    s.stop()


def test_driver_restart_back_off_is_shown_in_status(short_tmp: Path) -> None:
    s = start(short_tmp)
    first = domains(s)["drv-a"]
    kill_driver(first["pid"])
    deadline = time.monotonic() + 20
    seen_waiting = False
    while True:
        drv = domains(s)["drv-a"]
        seen_waiting |= drv["state"] == "restarting" and drv["next_retry"] is not None
        if drv["state"] == "running" and drv["restarts"] == 1:
            break
        assert time.monotonic() < deadline, drv
        time.sleep(0.05)
    assert drv["last_exit"] == "killed by SIGKILL"
    assert seen_waiting or drv["restarts"] == 1  # the wait is short; it may pass unseen
    text = s.cli("status", "-c", str(s.config)).stdout
    assert "restarts 1" in text and "killed by SIGKILL" in text
    assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0
    s.stop()


def test_status_shows_every_process_of_a_driver(short_tmp: Path) -> None:
    """A driver serves from several worker processes (driver.serve_in_workers): status
    lists them all, so that one can watch or kill the whole domain, not its first pid
    (killed alone, its workers live on until the kernel has run its exit)."""
    s = start(short_tmp)
    drv = domains(s)["drv-a"]
    workers = pids_of_children(drv["pid"])
    assert workers or (os.cpu_count() or 1) == 1, "no worker processes to list"
    assert drv["pids"] == [drv["pid"], *sorted(workers)]
    assert domains(s)["hv"]["pids"] == [domains(s)["hv"]["pid"]]
    line = next(line for line in s.cli("status", "-c", str(s.config)).stdout.splitlines()
                if line.split()[:1] == ["drv-a"])
    if workers:
        assert line.endswith(f"running, child pids {' '.join(map(str, sorted(workers)))}"), line
    for pid in drv["pids"]:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (now := domains(s)["drv-a"])["state"] != "running" or now["restarts"] != 1:
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    assert not set(now["pids"]) & set(drv["pids"]), (now, drv)
    assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0
    s.stop()


def ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5", as /proc writes Cpus_allowed_list."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and runs[-1][-1] == cpu - 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def cpus_allowed(pid: int) -> dict[int, str]:
    """Each thread of `pid`: the CPUs it may run on, as the kernel says (Cpus_allowed_list)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        out[int(tid)] = next(line.split()[1] for line in status.splitlines()
                             if line.startswith("Cpus_allowed_list:"))
    return out


def test_placement_puts_each_encryption_domain_and_its_drivers_on_their_cpus(short_tmp: Path) -> None:
    """[placement] cpus and a disk's own `cpus` are applied when each domain starts (and at a
    restart): every thread and worker of an encryption domain and of its drivers runs only
    there; the access-control domain and the store stay free; status says where each runs."""
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        pytest.skip("needs two CPUs")
    a, b = mine[:2]
    s = System(short_tmp, config(
        driver("drv-a", "StorageA", dir="backing/a"), driver("drv-b", "StorageB", dir="backing/b"),
        disk("payroll", "PayrollData", ["drv-a"], cpus=[b]),
        disk("bank", "BankData", ["drv-a", "drv-b"]), guest("vm1", "Payroll"),
        head=f"[placement]\ncpus = [{a}]\n")).start()
    want = {"crypt-PayrollData": [b], "crypt-BankData": [a], "drv-a": [a, b], "drv-b": [a],
            "acm": None, "store": None}
    ds = domains(s)
    for name, cpus in want.items():
        for pid in ds[name]["pids"]:
            for tid, allowed in cpus_allowed(pid).items():
                assert allowed == ranges(cpus or mine), (name, pid, tid, allowed)
        assert ds[name]["cpus"] == cpus, ds[name]
    assert len(cpus_allowed(ds["crypt-BankData"]["pid"])) > 1  # threads made after the start too
    text = s.cli("status", "-c", str(s.config)).stdout
    assert f"running, on CPUs {b}" in next(li for li in text.splitlines() if "crypt-Payroll" in li)
    for name in ("payroll", "bank"):
        code, out = qemu_io(s.uri("vm1", name))
        assert code == 0, out
    kill_driver(ds["drv-b"]["pid"])
    deadline = time.monotonic() + 20
    while (now := domains(s)["drv-b"])["state"] != "running" or now["restarts"] != 1:
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    for pid in now["pids"]:
        assert set(cpus_allowed(pid).values()) == {str(a)}, (pid, cpus_allowed(pid))
    s.stop()


def test_up_refuses_a_cpu_this_machine_does_not_have_before_starting_anything(
        short_tmp: Path) -> None:
    (short_tmp / "trustvbd.toml").write_text(config(
        driver("drv-a", "StorageA", dir="backing/a"), disk("payroll", "PayrollData", ["drv-a"]),
        head="[placement]\ncpus = [4096]\n"))
    out = run([*TRUSTVBD, "up", "-c", str(short_tmp / "trustvbd.toml")], check=False)
    assert out.returncode != 0 and "ready" not in out.stdout
    assert (f"{short_tmp / 'trustvbd.toml'}: placement.cpus: CPU 4096 does not exist on this"
            " machine") in out.stderr, out.stderr
    assert "remove `cpus` to let the scheduler place the domains" in out.stderr
    assert not (short_tmp / "state").exists()


def test_a_paused_encryption_domain_is_continued_to_stop_and_holds_up_no_other(
        short_tmp: Path) -> None:
    """Stopping `up` with an encryption domain paused by a signal: it read no Stop (60 s),
    then heeded no SIGTERM (10 s, then SIGKILL: no clean stop of its disks), and the
    drivers, the store and the access-control domain waited for it. Now a paused domain is
    continued (as a shell's `kill` does a stopped job) and stops cleanly."""
    s = start(short_tmp)
    paused = 0
    try:
        assert qemu_io(uri(s, "vm1", "payroll"))[0] == 0
        paused = domains(s)["crypt-Payroll"]["pid"]
        pause(paused)
        err = s.stop(timeout=40)  # exit 0, within the old code's 60 s wait alone
        assert "crypt-Payroll is paused by a signal (SIGSTOP): continued (SIGCONT)" in err, err
        assert "did not stop in" not in err and "Traceback" not in err, err[-3000:]
    finally:
        s.kill()
        if paused:  # never left paused by a failed test
            with contextlib.suppress(ProcessLookupError):
                os.kill(paused, signal.SIGCONT)
