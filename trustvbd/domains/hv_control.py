"""The hypervisor's control socket: `trustvbd status`, `policy load`, `scrub` and `unlock` ask here.

One typed request per connection, one JSON line each way (domains/messages.py);
the reply carries the request's id back ("reply_to"). Mode 0600: only the user
that runs `up` (and root) may ask. Every client costs the launcher a descriptor and a
task, so each stage is bounded: at most MAX_READING clients still sending their request
(READ_TIMEOUT each), at most MAX_ANSWERING requests being answered (one more is refused
with ErrorCode.BUSY, saying so), WRITE_TIMEOUT to take a reply. A request may come with file descriptors
(SCM_RIGHTS): `unlock` sends its passphrase as the read end of a pipe, so the
secret is never in a message; any other request's descriptors are closed unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Protocol

from trustvbd.accepting import accept
from trustvbd.domains.listeners import listen_unix
from trustvbd.domains.messages import (
    ErrorCode,
    Failed,
    HvStatus,
    Message,
    MessageError,
    PolicyLoad,
    ScrubQuery,
    StatusQuery,
    UnlockQuery,
    decode,
    error_code,
)
from trustvbd.replies import peer_json

log = logging.getLogger("trustvbd.hv")
MAX_REQUEST = 64 * 1024
MAX_FDS = 4
READ_TIMEOUT = 10.0
MAX_READING = 32
# Requests being answered at once: each waits for domains (a stopped one costs a status its
# timeout, an unlock much longer), so a script asking in a loop could otherwise hold every
# descriptor the launcher has (and the channels it brokers need some).
MAX_ANSWERING = 16
WRITE_TIMEOUT = 10.0  # for a client to take its reply (one that reads nothing is hung up on)
# `status` has places of its own: a flood of other requests (held by a stopped domain) must
# never hide what `trustvbd status` would show about it.
MAX_STATUS = 4

BUSY_MESSAGE = (
    f"the launcher is answering {MAX_ANSWERING} control requests already (the most it takes"
    " at once; something asks in a loop, or a stopped domain holds them: `trustvbd status`"
    " shows one as paused, `kill -CONT PID` resumes it); nothing was done: ask again once"
    " they are answered")
STATUS_BUSY_MESSAGE = (
    f"the launcher is answering {MAX_STATUS} status requests already (the most it takes at"
    " once); ask again once they are answered")


def _is_status(line: bytes) -> bool:
    """Whether a request line asks for `status` (anything unreadable is not: answer() says
    what is wrong with it)."""
    try:
        raw = peer_json(line)
    except ValueError:
        return False
    return isinstance(raw, dict) and raw.get("type") == StatusQuery.TYPE


class Answers(Protocol):
    """What the control socket asks of the hypervisor."""

    async def status(self) -> HvStatus: ...
    async def policy_load(self, path: str) -> Message: ...
    async def scrub(self, disk: str) -> Message: ...
    async def unlock(self, disks: list[str], fds: list[int]) -> Message: ...


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def answer(line: bytes, fds: list[int], hv: Answers) -> dict[str, Any]:
    """The reply to one request line (never raises); every descriptor in `fds` is consumed."""
    rid = None
    try:
        raw = peer_json(line)
        rid = raw.get("id") if isinstance(raw, dict) else None
        if type(rid) is not int:
            rid = None
            raise MessageError('a control request carries its request id, "id" (an integer)')
        request = decode(raw, StatusQuery, PolicyLoad, ScrubQuery, UnlockQuery)
        reply: Message
        if isinstance(request, UnlockQuery):
            given, fds = fds, []
            reply = await hv.unlock(request.disks, given)  # it owns (and closes) them
        elif isinstance(request, StatusQuery):
            reply = await hv.status()
        elif isinstance(request, ScrubQuery):
            reply = await hv.scrub(request.disk)
        else:
            assert isinstance(request, PolicyLoad)
            reply = await hv.policy_load(request.path)
    except ValueError as exc:  # MessageError and JSONDecodeError are ValueErrors
        reply = Failed(ErrorCode.BAD_MESSAGE, str(exc))
    except TimeoutError as exc:  # a domain asked on the way did not answer: no traceback
        why = str(exc) or "a domain it asked did not answer in time (stopped or overloaded?)"
        log.error("control request: %s", why)
        reply = Failed(ErrorCode.UNREACHABLE, f"{why}; `trustvbd status` shows each domain's"
                       " state (one paused by a signal: `kill -CONT PID`; one that seems stuck:"
                       " `kill -USR1 PID` shows where it waits)")
    except Exception as exc:
        log.exception("control request failed")
        reply = Failed(error_code(exc), str(exc) or type(exc).__name__)
    finally:
        _close(fds)
    return {**reply.encode(), "reply_to": rid}


def busy(line: bytes, fds: list[int], message: str = BUSY_MESSAGE) -> dict[str, Any]:
    """The refusal of a request over MAX_ANSWERING (its descriptors closed unread)."""
    _close(fds)
    rid = None
    with contextlib.suppress(ValueError):
        raw = peer_json(line)
        rid = raw.get("id") if isinstance(raw, dict) else None
    return {**Failed(ErrorCode.BUSY, message).encode(),
            "reply_to": rid if type(rid) is int else None}


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def read_request(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One request line and the descriptors that came with it (ValueError: too much)."""
    data, fds = bytearray(), []
    try:
        while not data.endswith(b"\n"):
            await _readable(sock)
            try:
                chunk, got, flags, _ = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
            except BlockingIOError:
                continue
            fds += got
            if flags & socket.MSG_CTRUNC:
                raise ValueError(f"more than {MAX_FDS} descriptors with a control request")
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                raise ValueError(f"a control request is longer than {MAX_REQUEST} bytes")
    except BaseException:
        _close(fds)
        raise
    return bytes(data), fds


class ControlServer:
    """Accepts the CLI's connections on the control socket; `close()` stops and unlinks it.

    At most MAX_READING clients still to send their request at once, so a local process
    opening connections in a loop cannot take the launcher's descriptors (every channel it
    brokers needs some): over it, the oldest of them is hung up on for the new one (the CLI
    sends its request as it connects)."""

    def __init__(self, path: Path, hv: Answers) -> None:
        self.path, self.hv = path, hv
        self.sock = listen_unix(path)  # 0600: the user running `up` (and root) only
        self.sock.setblocking(False)
        self.tasks: set[asyncio.Task[None]] = set()
        self.reading: dict[asyncio.Task[None], None] = {}  # still reading a request, oldest first
        self.answering = 0  # requests being answered (at most MAX_ANSWERING)
        self.answering_status = 0  # and status requests, beside them (at most MAX_STATUS)
        self.refusing = False
        self.accepting = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn = await accept(self.sock, "control socket")
            if len(self.reading) >= MAX_READING:
                oldest = next(iter(self.reading))
                del self.reading[oldest]
                oldest.cancel()
            task = loop.create_task(self._client(conn))
            self.tasks.add(task)
            self.reading[task] = None
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.reading.pop(task, None)

    async def _client(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                line, fds = await read_request(conn)
            me = asyncio.current_task()
            if me is not None:
                self.reading.pop(me, None)  # being answered: no newcomer closes it now
            if _is_status(line):
                reply = await self._status(line, fds)
            elif self.answering >= MAX_ANSWERING:
                if not self.refusing:  # once while it lasts: a loop would flood the log
                    log.warning("control socket: %d requests are being answered, the most it"
                                " takes at once: refusing more until some are", MAX_ANSWERING)
                    self.refusing = True
                reply = busy(line, fds)
            else:
                self.answering += 1
                self.refusing = False
                try:
                    reply = await answer(line, fds, self.hv)
                finally:
                    self.answering -= 1
            async with asyncio.timeout(WRITE_TIMEOUT):
                await asyncio.get_running_loop().sock_sendall(
                    conn, json.dumps(reply).encode() + b"\n")
        except (TimeoutError, OSError, ValueError):
            pass  # a client that says nothing in time, or too much, is hung up on
        finally:
            conn.close()

    async def _status(self, line: bytes, fds: list[int]) -> dict[str, Any]:
        if self.answering_status >= MAX_STATUS:
            return busy(line, fds, STATUS_BUSY_MESSAGE)
        self.answering_status += 1
        try:
            return await answer(line, fds, self.hv)
        finally:
            self.answering_status -= 1

    def close(self) -> None:
        self.accepting.cancel()
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.sock.close()


async def serve_control(path: Path, hv: Answers) -> ControlServer:
    return ControlServer(path, hv)
