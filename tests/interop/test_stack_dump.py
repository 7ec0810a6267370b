"""SIGUSR1 to a domain writes its tasks' and threads' stacks, and the domain serves on."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.interop import clients
from tests.support import System, payroll_config, pids_of_children


def _domain_pid(up_pid: int, module: str) -> int:
    for pid in pids_of_children(up_pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if f"trustvbd.domains.{module}" in cmdline:
            return pid
    raise AssertionError(f"no {module} domain among the children of up ({up_pid})")


def test_sigusr1_dumps_each_domains_stacks_and_it_serves_on(tmp_path: Path) -> None:
    s = System(tmp_path, payroll_config("4MiB")).start()
    try:
        assert s.proc is not None
        for module in ("crypt", "acm", "store", "driver"):
            os.kill(_domain_pid(s.proc.pid, module), signal.SIGUSR1)
        os.kill(s.proc.pid, signal.SIGUSR1)  # up itself
        time.sleep(0.5)
        clients.qemu_io_patterns(s.uri("vm1", "payroll"))  # still serving, data intact
    finally:
        err = s.stop()
    for domain in ("crypt", "acm", "store", "driver", "hv"):
        start = err.index(f"[{domain}] stack dump (SIGUSR1)")
        dump = err[start:err.index(f"[{domain}] end of stack dump", start)]
        assert "task " in dump and "thread MainThread:" in dump, dump
        assert 'File "' in dump, dump  # frames, not only names
