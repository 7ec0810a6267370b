"""Helpers to run real processes in tests: `trustvbd up`, `trustvbd driver`, peers, clients."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRUSTVBD = [sys.executable, "-m", "trustvbd.cli"]
STARTED: list[System] = []  # every System started, so tests can clean up after failures


def run(cmd: list[str], timeout: float = 120, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, fail the test with the output if it fails."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


# ---------------------------------------------------------------- configs for `up`


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str | list):
        return json.dumps(value)  # for these values, JSON is a TOML basic string/integer/array
    raise TypeError(f"no TOML form for {value!r}")


def table(kind: str, **fields: object) -> str:
    """One [[kind]] table of a trustvbd config, fields in the order given."""
    return f"[[{kind}]]\n" + "".join(f"{key} = {_toml(v)}\n" for key, v in fields.items())


def driver(name: str, label: str, **more: object) -> str:
    return table("driver", name=name, label=label, **more)


def disk(name: str, label: str, replicas: list[str], size: int | str = "4MiB", **more: object) -> str:
    return table("disk", name=name, size=size, label=label, replicas=replicas, **more)


def guest(name: str, label: str, **more: object) -> str:
    return table("guest", name=name, label=label, **more)


def config(*tables: str, policy: str | None = None, head: str = "") -> str:
    """A config: state_dir "state", the policy file if named, `head` (more top-level keys,
    single tables such as [tls]), then the [[driver]], [[disk]] and [[guest]] tables."""
    top = 'state_dir = "state"\n' + (f'policy = "{policy}"\n' if policy else "")
    return top + head + "".join(tables)


def payroll_config(size: int | str, *more: str, **driver_at: str) -> str:
    """The system most end-to-end tests start: driver drv-a (StorageA; `driver_at` says where
    it keeps its data, dir= or uri=, by default dir backing/a) holding disk payroll
    (PayrollData, `size`) for guest vm1 (Payroll), then the `more` tables."""
    return config(driver("drv-a", "StorageA", **(driver_at or {"dir": "backing/a"})),
                  disk("payroll", "PayrollData", ["drv-a"], size=size), guest("vm1", "Payroll"),
                  *more)


def up_with_policy(root: Path, policy: str, config_text: str, **env: str) -> System:
    """`trustvbd up` in `root`, with `policy` written as root/policy.toml."""
    (root / "policy.toml").write_text(policy)
    return System(root, config_text, env=dict(env)).start()


def _line_queue(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """A thread per process turns stdout into a queue of lines (None at EOF).

    select() on a buffered text stream misses lines already in the buffer; a thread doesn't.
    """
    q: queue.Queue[str | None] | None = getattr(proc, "_line_queue", None)
    if q is None:
        q = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                q.put(line.rstrip("\n"))
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        proc._line_queue = q  # type: ignore[attr-defined]
    return q


def read_lines_until(proc: subprocess.Popen[str], last: str, timeout: float) -> list[str]:
    """Read stdout lines until the line `last`; fail with stderr if the process exits first."""
    q = _line_queue(proc)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            raise AssertionError(f"no {last!r} line within {timeout}s; got {lines}") from None
        if line is None:
            proc.wait(10)
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"process exited {proc.returncode} before {last!r}: {lines}\n{err}")
        lines.append(line)
        if line == last:
            return lines


def wait_for_path(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


@dataclass
class System:
    """A running `trustvbd up` started from a config written into `root`."""

    root: Path
    config_text: str
    proc: subprocess.Popen[str] | None = None
    uris: dict[tuple[str, str], str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    own_group: bool = False  # a process group of its own, as a terminal's foreground job

    @property
    def config(self) -> Path:
        return self.root / "trustvbd.toml"

    def start(self, timeout: float = 60) -> System:
        STARTED.append(self)
        self.config.write_text(self.config_text)
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [*TRUSTVBD, "up", "-c", str(self.config)], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env, start_new_session=self.own_group,
        )
        self.lines = read_lines_until(self.proc, "ready", timeout)
        self.uris = {}
        for line in self.lines:
            m = re.match(r"guest (\S+) disk (\S+) (nbd\+unix://\S+)$", line)
            if m:
                self.uris[(m.group(1), m.group(2))] = m.group(3)
        return self

    def uri(self, guest: str, disk: str) -> str:
        return self.uris[(guest, disk)]

    def stop(self, timeout: float = 60) -> str:
        """SIGTERM, expect a clean exit 0; return what it logged."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=timeout)
        code = self.proc.returncode
        self.proc = None
        assert code == 0, f"trustvbd up exited {code} on SIGTERM:\n{err}"
        return err

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)
        self.proc = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([*TRUSTVBD, *args], check=check, env={**os.environ, **self.env})


def pids_of_children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def kill_driver(pid: int) -> None:
    """SIGKILL a driver domain and its worker processes (driver.serve_in_workers) at once.
    Killing only the domain's own pid leaves its workers to die of PDEATHSIG once the
    kernel has run the parent's exit: under load, a worker that accepted a connection
    still answered a FLUSH in between (a real flush: nothing was lost to report)."""
    for worker in pids_of_children(pid):
        os.kill(worker, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False



def kill_started_since(count: int) -> None:
    """After each test: a System a failed test never stopped must not outlive it."""
    while len(STARTED) > count:
        STARTED.pop().kill()


def pause(pid: int, timeout: float = 10) -> None:
    """SIGSTOP a process and wait until it is stopped (state T): the signal takes effect when
    the process is next scheduled, and the launcher tells a paused domain by its state."""
    from trustvbd.domains.supervisor import signal_stopped

    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not signal_stopped(pid):
        assert time.monotonic() < deadline, f"pid {pid} did not stop within {timeout}s"
        time.sleep(0.01)
