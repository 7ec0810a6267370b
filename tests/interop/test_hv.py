"""The hypervisor end to end: a dead access-control domain is restarted with back-off shown in
`status`, and the encryption domain gets a new channel to it from the hypervisor (no path)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.interop.test_policy_e2e import qemu_io, start, uri
from tests.support import System, kill_driver, pids_of_children

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
