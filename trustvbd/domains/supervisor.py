"""The hypervisor's supervisor: starts domain processes, restarts them with back-off, stops them.

A domain is started from a `Launch` made afresh for every start (its argv and the
descriptors it inherits, e.g. the child's end of a new control channel), and is
running once it writes "ready" on its readiness pipe. When a domain exits on its
own, the supervisor restarts it after a back-off that doubles with each quick
failure (BACKOFF_FIRST .. BACKOFF_MAX; a domain that ran STABLE seconds starts
over) — or, for a domain marked fatal, reports that everything must stop.
`status()` shows for each: state, restart count, last exit, seconds to the next try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from trustvbd.domains import sandbox

log = logging.getLogger("trustvbd.hv")
T = TypeVar("T")

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE = 60.0  # seconds up after which a domain's back-off starts over


def child_processes() -> dict[int, list[int]]:
    """Each process's children, from /proc now: a domain may fork (a driver serves from
    several worker processes, driver.serve_in_workers), and one killed or watched by its
    pid alone is only part of it."""
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # after the name: state, ppid
        out.setdefault(ppid, []).append(int(entry.name))
    return {ppid: sorted(pids) for ppid, pids in out.items()}


def signal_stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (SIGSTOP, SIGTSTP; state T in /proc): alive
    but answering nothing. A debugger's tracing stop (t) is not: py-spy takes it briefly."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # gone
        return False
    return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] == b"T"


def paused(pid: int) -> str:
    """What status says of a domain stopped by a signal."""
    return f"paused by a signal (SIGSTOP): answers nothing until `kill -CONT {pid}`"


class StartError(Exception):
    """A domain (or `up`) cannot start; the message says why and what to do."""


@dataclass
class Launch:
    """How to start a domain once: argv, inherited descriptors, what to close after."""

    argv: list[str]
    pass_fds: tuple[int, ...] = ()
    started: Callable[[], None] = lambda: None  # closes the child's ends in the launcher


@dataclass(eq=False)
class Domain:
    name: str
    kind: str  # "acm" | "crypt" | "driver" | "store"
    trusted: bool
    label: str
    launch: Callable[[], Launch]
    identity: sandbox.Identity = sandbox.AS_LAUNCHER  # its user, namespaces (as root)
    env: dict[str, str] | None = None  # None: the launcher's environment minus secrets
    wtype: str | None = None  # an encryption domain's workload type
    cpus: frozenset[int] | None = None  # the CPUs it runs on (config `cpus`); None: any
    fatal: bool = False  # an exit stops everything instead of a restart
    on_start: Callable[[Domain], None] = lambda d: None  # after every (re)start
    on_exit: Callable[[Domain], None] = lambda d: None  # when it exits on its own
    process: asyncio.subprocess.Process | None = None
    state: str = "starting"
    restarts: int = 0
    quick_failures: int = 0
    last_exit: str | None = None
    next_retry: float | None = None  # time.monotonic() of the next start
    started_at: float = 0.0


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def backoff(quick_failures: int) -> float:
    return float(min(BACKOFF_FIRST * 2 ** max(0, quick_failures - 1), BACKOFF_MAX))


@dataclass(eq=False)
class Supervisor:
    on_fatal: Callable[[str], None]
    start_timeout: float = START_TIMEOUT  # seconds a domain may take to say "ready"
    domains: dict[str, Domain] = field(default_factory=dict)
    stopping: bool = False
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self, domain: Domain) -> None:
        """Start `domain` and wait until it is ready; StartError if it is not."""
        self.domains[domain.name] = domain
        if domain.cpus and not domain.cpus <= (allowed := os.sched_getaffinity(0)):
            domain.state = "failed"
            raise StartError(f"{domain.kind} domain {domain.name!r} is placed on CPUs"
                             f" {sorted(domain.cpus)} (config `cpus`), but trustvbd may now run"
                             f" only on {sorted(allowed)}: bring the CPUs back online, or change"
                             " `cpus` and restart trustvbd")
        try:
            launch = domain.launch()
        except (OSError, ValueError, sandbox.SandboxError) as exc:
            domain.state = "failed"
            raise StartError(f"cannot prepare {domain.kind} domain {domain.name!r}: {exc}") from None
        read_end, write_end = os.pipe()
        env = domain.env if domain.env is not None else sandbox.without_secrets()
        try:
            domain.process = await asyncio.create_subprocess_exec(
                *launch.argv, "--ready-fd", str(write_end), pass_fds=(write_end, *launch.pass_fds),
                stdin=asyncio.subprocess.DEVNULL, env=env, preexec_fn=sandbox.preexec(domain.identity, domain.cpus),
                # A session of its own: a signal to the launcher's process group (Ctrl-C,
                # `timeout`, kill -TERM -PGID) reaches the launcher alone, which stops the
                # domains in order: the encryption domains' final commit before the drivers,
                # the store and the access-control domain it may need. (A domain still dies
                # with the launcher: PR_SET_PDEATHSIG.)
                start_new_session=True,
                cwd="/" if domain.identity.uid is not None else None)  # ours may be closed to it
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
            launch.started()  # the domain holds its own copies now
        try:
            line = await asyncio.wait_for(self._first_line(read_end), self.start_timeout)
        except TimeoutError:
            line = b""
        finally:
            os.close(read_end)
        if line != b"ready\n":
            with contextlib.suppress(ProcessLookupError):
                domain.process.kill()
            code = await domain.process.wait()
            domain.state, domain.last_exit = "failed", describe_exit(code)
            raise StartError(f"{domain.kind} domain {domain.name!r} failed to start"
                             f" ({describe_exit(code)}); see its messages above")
        domain.state, domain.started_at, domain.next_retry = "running", time.monotonic(), None
        domain.on_start(domain)
        self.spawn_task(self._watch(domain, domain.process))

    @staticmethod
    async def _first_line(fd: int) -> bytes:
        loop = asyncio.get_running_loop()
        line: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            with contextlib.suppress(BlockingIOError):
                data = os.read(fd, 64)
                if not line.done():
                    line.set_result(data)

        os.set_blocking(fd, False)
        loop.add_reader(fd, readable)
        try:
            return await line
        finally:
            loop.remove_reader(fd)

    def spawn_task(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `coro` in the background; cancelled when the supervisor stops."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _watch(self, domain: Domain, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self.stopping or domain.process is not process:
            return
        domain.last_exit = describe_exit(code)
        domain.on_exit(domain)
        if domain.fatal:
            domain.state = f"exited ({domain.last_exit})"
            self.on_fatal(f"{domain.kind} domain {domain.name!r} died ({domain.last_exit});"
                          " stopping everything")
            return
        if time.monotonic() - domain.started_at >= STABLE:
            domain.quick_failures = 0
        while not self.stopping:
            domain.quick_failures += 1
            delay = backoff(domain.quick_failures)
            domain.state, domain.next_retry = "restarting", time.monotonic() + delay
            log.warning("%s domain %s: %s; restarting it in %.1f s", domain.kind, domain.name,
                        domain.last_exit, delay)
            await asyncio.sleep(delay)
            if self.stopping:
                return
            domain.restarts += 1
            domain.state, domain.next_retry = "starting", None
            try:
                await self.start(domain)
                return
            except (StartError, OSError) as exc:
                log.error("%s", exc)

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        children = child_processes()
        return [{
            "name": d.name, "kind": d.kind, "trusted": d.trusted, "label": d.label,
            "pid": d.process.pid if d.process else None,
            "pids": [d.process.pid, *children.get(d.process.pid, [])] if d.process else [],
            "state": (paused(d.process.pid) if d.process and d.state == "running"
                      and signal_stopped(d.process.pid) else d.state),
            "restarts": d.restarts, "last_exit": d.last_exit,
            "cpus": sorted(d.cpus) if d.cpus else None,
            "next_retry": None if d.next_retry is None else round(max(0.0, d.next_retry - now), 1),
        } for d in self.domains.values()]

    async def stop(self, order: list[str]) -> None:
        """Stop every domain, those named in `order` first, in that order."""
        self.stopping = True
        for task in list(self.tasks):
            task.cancel()
        rank = {kind: i for i, kind in enumerate(order)}
        for domain in sorted(self.domains.values(), key=lambda d: rank.get(d.kind, len(rank))):
            await self.terminate(domain)

    def pid(self, name: str) -> int | None:
        """The pid of the domain's process (of its last start), if it has one."""
        domain = self.domains.get(name)
        return domain.process.pid if domain is not None and domain.process is not None else None

    def continue_paused(self, name: str) -> None:
        """A domain paused by a signal (SIGSTOP), continued so that it can stop as asked, as
        a shell's `kill` continues a stopped job: paused, it heeds no SIGTERM and no Stop,
        and held up the stop of every domain after it (up to 70 s, then SIGKILL)."""
        domain = self.domains.get(name)
        proc = domain.process if domain is not None else None
        if proc is not None and proc.returncode is None and signal_stopped(proc.pid):
            log.warning("%s is paused by a signal (SIGSTOP): continued (SIGCONT) so that it"
                        " can stop", name)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)

    async def terminate(self, domain: Domain) -> None:
        proc = domain.process
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            self.continue_paused(domain.name)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.error("%s did not stop in %.0f s; killing it", domain.name, STOP_TIMEOUT)
                proc.kill()
                await proc.wait()
        domain.state = "stopped"
