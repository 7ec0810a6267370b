"""A bounded busy-wait before the event loop sleeps, for the one socket the next bytes
come on (issue #13: QD1 latency). Off unless a domain turns it on (`enable`: the
encryption domain does when TRUSTVBD_SPIN_US is set, for a quiet machine's A/B).

A QD1 guest READ wakes the encryption domain twice, for the driver's reply and for the
guest's next request; a QD1 WRITE once. On a VM whose idle vCPUs halt at once, each
wake-up of a sleeping process costs tens of µs. After a native read leaves for a driver
(client_transmission) and after a reply left whole for an idle guest (reply_output),
the loop is asked to `wait_soon` on that socket: once this loop turn's callbacks have run,
it polls the socket for at most the budget and then returns to the loop, which finds
the bytes there without sleeping, or sleeps as before. The native `Spinner` bounds it
(budget at most SPIN_BUDGET_MAX_US), yields the CPU between looks at the socket (a task
put beside it runs at once), and turns it off under CPU pressure or after a wait in vain:
native/src/python/spin.rs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from trustvbd import _native

log = logging.getLogger("trustvbd.nbd.spin")

BUDGET_US = 100  # what TRUSTVBD_SPIN_US was measured with (bench/README.md)
PSI_PATH = "/proc/pressure/cpu"

_spinner: _native.Spinner | None = None
_queued = False  # a wait is queued this loop turn


def enable(budget_us: int = BUDGET_US, psi_max: float = _native.SPIN_PSI_MAX,
           psi_path: str = PSI_PATH) -> _native.Spinner | None:
    """Turn the busy-wait on for this process (0: off). Without the CPU pressure file
    (a kernel without PSI) it stays off: the back-offs alone do not see a busy machine
    soon enough."""
    global _spinner, _queued
    _queued = False  # a wait queued on a loop that stopped before it ran is gone with it
    if budget_us <= 0:
        _spinner = None
        return None
    try:
        fd = os.open(psi_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.info("no busy-wait for QD1 requests: %s unreadable (%s)", psi_path, exc.strerror)
        _spinner = None
        return None
    try:
        _spinner = _native.Spinner(budget_us, fd, psi_max)
    finally:
        os.close(fd)  # the Spinner holds a duplicate
    return _spinner


def disable() -> None:
    global _spinner, _queued
    _spinner = None
    _queued = False


def enabled() -> bool:
    return _spinner is not None


def wait_soon(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Have the loop wait (bounded) for what wakes it next before it sleeps: a callback
    after those queued so far, once per loop turn. `fd` is the socket the next bytes are
    expected on; the wait ends at the first of anything the loop watches (its own epoll
    descriptor polled), so a write's background work (the log's sync, a replica's reply)
    is not held up behind a wait for the guest's next request."""
    global _queued
    if _spinner is None or fd < 0 or _queued or not _spinner.armed():
        return
    _queued = True
    loop.call_soon(_wait, loop_fd(loop, fd))


def loop_fd(loop: asyncio.AbstractEventLoop, fd: int) -> int:
    """The descriptor that is readable once `loop` has anything to do: uvloop's libuv
    backend (epoll), asyncio's selector; else `fd` alone."""
    backend = getattr(loop, "_get_backend_id", None)  # uvloop
    if backend is not None:
        return int(backend())
    selector = getattr(loop, "_selector", None)  # asyncio's selector loops
    if selector is not None:
        return int(selector.fileno())
    return fd


def _wait(fd: int) -> None:
    global _queued
    _queued = False
    spinner = _spinner
    if spinner is not None:
        with contextlib.suppress(OSError):
            spinner.wait(fd)
