"""What every domain process shares: logging, dying with the launcher, the event loop."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any, TextIO

from trustvbd.domains import stack_dump

_PR_SET_PDEATHSIG = 1
_domain = "domain"  # this process's domain name, for log lines and profiles


# Log lines a domain keeps while its stderr is not taken; beyond, they are dropped (counted).
LOG_BACKLOG = 1000
# At exit, how long lines still queued may take to be written.
LOG_DRAIN_SECONDS = 5.0


class WrittenBehind(logging.Handler):
    """Log lines written to a stream by a thread of their own, never by the caller.

    A stderr that nobody reads (a terminal paused with Ctrl-S, a full pipe) would block the
    event loop in a log write, and every guest with it; a driver that lies on every read
    makes a line per read. So lines wait in a bounded queue: what does not fit is dropped,
    and the next line written says how many. Not for a process that forks (the driver).
    """

    def __init__(self, stream: TextIO, domain: str, backlog: int = LOG_BACKLOG) -> None:
        super().__init__()
        self._stream, self._domain = stream, domain
        self._lines: queue.Queue[str] = queue.Queue(backlog)
        self._dropped = 0
        threading.Thread(target=self._write, name="log", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            self._dropped += 1

    def _write(self) -> None:
        while True:
            line = self._lines.get()
            dropped, self._dropped = self._dropped, 0
            if dropped:
                line = (f"[{self._domain}] WARNING {dropped} log line(s) dropped: stderr was not"
                        " read fast enough\n") + line
            try:
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError):
                pass
            finally:
                self._lines.task_done()

    def flush(self) -> None:
        """Wait a little for queued lines (logging.shutdown calls this at exit)."""
        deadline = time.monotonic() + LOG_DRAIN_SECONDS
        while self._lines.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)


def setup_logging(domain: str, level: int = logging.INFO, forks: bool = False) -> None:
    """Log lines go to stderr, prefixed by the domain, so `up`'s terminal shows who said what;
    written behind (WrittenBehind) unless the process forks."""
    global _domain
    _domain = domain
    handler: logging.Handler = (logging.StreamHandler(sys.stderr) if forks
                                else WrittenBehind(sys.stderr, domain))
    handler.setFormatter(logging.Formatter(f"[{domain}] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("TRUSTVBD_LOG_LEVEL", logging.getLevelName(level)))


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this domain when the launcher dies, so none is left behind."""
    # libc is already loaded: no library search (a confined driver's forked workers call this
    # too, and may neither run ldconfig nor open a file).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the launcher is already gone
        os._exit(1)


def quiet_garbage_collector() -> None:
    """Keep Python's cycle collector from walking the same objects over and over.

    Per request the data path makes a few dozen short-lived objects (tasks, futures,
    views); with the default threshold of 700 the collector ran every ~20 requests
    and its full passes walked every module and class loaded at startup, a visible share
    of the encryption domain's time (bench/README.md). Startup objects are frozen out of
    its view and young objects collected less often.
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED = 32 << 20  # bytes of freed heap a process keeps before giving memory back
BIG_BUFFER = 4 << 20   # buffers up to this size come from the heap, not from mmap


def keep_freed_memory() -> None:
    """Keep freed request buffers for the next request instead of handing them back.

    A big request's ciphertext (256 KiB to 4 MiB) is freed once every replica has it;
    if glibc trimmed the heap then, the next request would fault the same pages back
    in, zeroed (on a VM that reports free pages to its host, each can be a host fault).
    Up to KEEP_FREED bytes stay in each heap instead, at the cost of that much resident
    memory held after a burst (docs/limits.md; the fault counts are in bench/README.md).
    """
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, BIG_BUFFER)
    libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED)


async def _dumping_stacks(main: Coroutine[Any, Any, int]) -> int:
    stack_dump.install(_domain)
    return await main


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run a domain's main coroutine on uvloop (much faster than asyncio's own loop).

    SIGUSR1 writes every task's and thread's stack to stderr (stack_dump.py).
    TRUSTVBD_PROFILE_DIR=DIR writes a cProfile of each domain to DIR/NAME-PID.prof
    (for benchmarks; see bench/README.md).
    """
    import uvloop

    quiet_garbage_collector()
    main = _dumping_stacks(main)
    profile_dir = os.environ.get("TRUSTVBD_PROFILE_DIR")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if not profile_dir:
            return runner.run(main)
        import cProfile

        profiler = cProfile.Profile()
        try:
            return profiler.runcall(runner.run, main)
        finally:
            profiler.dump_stats(os.path.join(profile_dir, f"{_domain}-{os.getpid()}.prof"))


def ready(fd: int | None) -> None:
    """Tell the launcher this domain is serving: one line on the readiness pipe."""
    if fd is not None:
        os.write(fd, b"ready\n")
        os.close(fd)
