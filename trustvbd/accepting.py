"""Accept a connection on a listening socket, riding out what a peer or a full process causes.

`loop.sock_accept` raises whatever accept(2) says, and an accept loop that lets it through
ends: out of descriptors for a moment (EMFILE, ENFILE; many clients at once), a socket a
peer reset before it was taken (ECONNABORTED), the listener was never reopened and every
later client of that socket (a guest's, the control socket's) found nobody. These are
waited out (resources: a second, logged once per episode) or skipped (a single peer's);
anything else (the listener closed) is raised.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

log = logging.getLogger("trustvbd.accept")

# Out of something the process or the system holds: they come back as connections close.
SHORT_OF = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# One connection went wrong between its arrival and accept(2): skip it.
ONE_PEER = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ETIMEDOUT, errno.ENETDOWN,
            errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
RETRY_DELAY = 1.0


async def accept(listening: socket.socket, where: str) -> socket.socket:
    """The next connection on non-blocking `listening` (`where` names it in the log)."""
    loop = asyncio.get_running_loop()
    short = False
    while True:
        try:
            sock, _ = await loop.sock_accept(listening)
        except OSError as exc:
            if exc.errno in ONE_PEER:
                continue
            if exc.errno not in SHORT_OF:
                raise
            if not short:
                log.warning("%s: cannot accept connections: %s; trying again every %g s until"
                            " some close", where, exc.strerror, RETRY_DELAY)
                short = True
            await asyncio.sleep(RETRY_DELAY)
            continue
        if short:
            log.warning("%s: accepting connections again", where)
        return sock
