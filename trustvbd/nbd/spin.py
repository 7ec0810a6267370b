"""A bounded busy-wait before the event loop sleeps, for the one socket the next bytes
come on (issue #13: QD1 latency). Off unless a domain turns it on (`enable`: the
encryption domain does).

A QD1 guest READ wakes the encryption domain twice, for the driver's reply and for the
guest's next request; a QD1 WRITE once. On a VM whose idle vCPUs halt at once, each
wake-up of a sleeping process costs tens of µs. After a native read leaves for a driver
(client_transmission) and after a reply left whole for an idle guest (reply_output),
the loop is asked to `wait_soon` on that socket: once this loop turn's callbacks have run,
it polls the socket for at most the budget and then returns to the loop, which finds
the bytes there without sleeping, or sleeps as before. The native `Spinner` bounds it
(budget at most SPIN_BUDGET_MAX_US) and turns it off while another task waits for the
CPU (CPU pressure, the thread preempted) or after a wait in vain: native/src/python/spin.rs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from trustvbd import _native

log = logging.getLogger("trustvbd.nbd.spin")

BUDGET_US = 100  # the encryption domain's (bench/README.md: QD1 reads, session 17)
PSI_PATH = "/proc/pressure/cpu"

_spinner: _native.Spinner | None = None
_pending: set[int] = set()  # sockets with a wait queued this loop turn


def enable(budget_us: int = BUDGET_US, psi_max: float = _native.SPIN_PSI_MAX,
           psi_path: str = PSI_PATH) -> _native.Spinner | None:
    """Turn the busy-wait on for this process (0: off). Without the CPU pressure file
    (a kernel without PSI) it stays off: the back-offs alone do not see a busy machine
    soon enough."""
    global _spinner
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
    global _spinner
    _spinner = None


def enabled() -> bool:
    return _spinner is not None


def wait_soon(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Have the loop wait (bounded) for `fd`'s next bytes before it sleeps: a callback
    after those queued so far, once per socket per loop turn."""
    if _spinner is None or fd < 0 or fd in _pending or not _spinner.armed():
        return
    _pending.add(fd)
    loop.call_soon(_wait, fd)


def _wait(fd: int) -> None:
    _pending.discard(fd)
    spinner = _spinner
    if spinner is not None:
        with contextlib.suppress(OSError):
            spinner.wait(fd)
