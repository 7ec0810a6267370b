"""The control channel between the launcher (hv) and a trusted domain.

One SOCK_SEQPACKET socket pair per domain: every message is one packet of JSON,
optionally carrying file descriptors (SCM_RIGHTS) — this is how the launcher
hands a domain the channels it brokers, like Xen's grant/event-channel setup.
Packets keep message boundaries, so there is no framing code to get wrong.

Either side may send requests ({"id": N, "op": ...}) and must answer each with
{"reply_to": N, ...}. Messages without an id are one-way events. Replies are
paired by id (trustvbd/replies.py): a request cancelled or timed out is
abandoned, its late reply dropped and its descriptors closed; a reply to an id
never issued is a protocol error, and the channel is closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import typing
from collections.abc import Awaitable, Callable
from typing import Any

from trustvbd.domains.messages import (
    ErrorCode,
    Failed,
    M,
    Message,
    MessageError,
    decode,
    error_code,
    refusal,
)
from trustvbd.replies import PendingReplies, ProtocolError, peer_json

MAX_MESSAGE = 256 * 1024
MAX_FDS = 16
MAX_QUEUED = 64  # messages a peer may leave unread (beyond what its socket holds)

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], list[int]], Awaitable[tuple[dict[str, Any], list[int]] | None]]


class ControlClosed(Exception):
    """The other side of the control channel went away."""


def _close_fds(reply: tuple[dict[str, Any], list[int]]) -> None:
    for fd in reply[1]:
        os.close(fd)


def handed_socket(reply: Message, fds: list[int], expected: type[Message], what: str) -> socket.socket:
    """The one socket a reply of type `expected` hands over; otherwise every fd that came is
    closed and ConnectionError says why (the peer's refusal, or what was missing)."""
    if isinstance(reply, expected) and len(fds) == 1:
        return socket.socket(fileno=fds[0])
    for fd in fds:
        os.close(fd)
    if isinstance(reply, expected):
        raise ConnectionError(f"{what}: the reply came with {len(fds)} file descriptors, not 1")
    raise ConnectionError(refusal(reply, f"no {what} was handed over"))


def socket_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class ControlFull(ControlClosed):
    """A trusted peer has not read the last MAX_QUEUED messages sent to it; its channel stays
    open (it may be stopped for a while), this message was not sent."""


class ControlChannel:
    """No send waits, whoever the peer: one event loop serves every domain, so a peer that
    stops reading must not stop it. `untrusted` (a driver domain): a peer that lets its
    messages pile up is hung up on."""

    def __init__(self, sock: socket.socket, handler: Handler | None = None, name: str = "peer",
                 untrusted: bool = False) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self.untrusted = untrusted
        self._handler = handler
        self._replies: PendingReplies[tuple[dict[str, Any], list[int]]] = PendingReplies(name)
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self._queue: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._full_said = False

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
        except BlockingIOError:
            return
        except OSError:
            data, fds, flags = b"", [], 0
        if not data:
            self._shutdown()
            return
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            log.error("control message from %s too large; dropped", self.name)
            return
        try:
            message = peer_json(data)
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            for fd in fds:
                os.close(fd)
            log.error("bad control message from %s: %s", self.name, exc)
            return
        if "reply_to" in message:
            try:
                self._replies.resolve(message["reply_to"], (message, fds))
            except ProtocolError as exc:
                for fd in fds:
                    os.close(fd)
                log.error("control channel: %s; closing it", exc)
                self._shutdown()
            return
        task = asyncio.get_running_loop().create_task(self._dispatch(message, fds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        reply: tuple[dict[str, Any], list[int]] | None
        try:
            if self._handler is None:
                raise ValueError("this side takes no requests")
            reply = await self._handler(message, fds)
        except Exception as exc:  # a bad request must not kill a trusted domain
            log.exception("control request %r from %s failed", message.get("op"), self.name)
            reply = ({"ok": False, "error": str(exc)}, [])
        body, out_fds = reply or ({"ok": True}, [])
        try:
            if "id" in message:  # else nobody waits for it: what it would carry is closed
                self.send({**body, "reply_to": message["id"]}, out_fds)
        except ControlClosed:
            pass
        finally:
            for fd in out_fds:
                os.close(fd)

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        """Send without ever waiting: what the socket does not take now is queued, with a copy
        of its descriptors (the caller still owns `fds`), and sent in order as the peer reads.
        A peer that lets MAX_QUEUED messages pile up reads nothing: an untrusted one is hung
        up on; a trusted one (stopped or overloaded, maybe for a while) keeps its channel and
        this message fails with ControlFull."""
        data = json.dumps(message, separators=(",", ":")).encode()
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"control message of {len(data)} bytes is too large")
        if self.closed.is_set():
            raise ControlClosed(f"control channel to {self.name} is closed")
        fds = fds or []
        if not self._queue:
            try:
                socket.send_fds(self.sock, [data], fds)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                raise ControlClosed(f"control channel to {self.name} closed: {exc}") from exc
        if len(self._queue) >= MAX_QUEUED:
            if self.untrusted:
                log.error("%s does not read its control channel (%d messages unsent):"
                          " closing the channel", self.name, len(self._queue))
                self.close()
                raise ControlClosed(f"control channel to {self.name} closed: it reads nothing")
            if not self._full_said:
                self._full_said = True
                log.error("%s reads nothing from its control channel (%d messages unsent):"
                          " stopped or overloaded? messages to it fail until it reads",
                          self.name, len(self._queue))
            raise ControlFull(f"{self.name} reads nothing from its control channel"
                              f" ({len(self._queue)} messages unsent): is it stopped or overloaded?")
        copies: list[int] = []
        try:
            for fd in fds:
                copies.append(os.dup(fd))
        except OSError as exc:
            for fd in copies:
                os.close(fd)
            raise ControlClosed(f"control channel to {self.name}: cannot keep a descriptor"
                                f" to send later: {exc}") from exc
        self._queue.append((data, copies))
        if len(self._queue) == 1:
            asyncio.get_running_loop().add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        while self._queue:
            data, fds = self._queue[0]
            try:
                socket.send_fds(self.sock, [data], fds)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("control channel to %s: %s; closing it", self.name, exc)
                self.close()
                return
            self._queue.popleft()
            for fd in fds:
                os.close(fd)
        self._full_said = False
        asyncio.get_running_loop().remove_writer(self.sock.fileno())

    async def request(
        self, message: dict[str, Any], fds: list[int] | None = None,
        timeout: float | None = 60.0) -> tuple[dict[str, Any], list[int]]:
        """Send a request, wait for its reply (`timeout` s; None: as long as the channel lives)."""
        if self.closed.is_set():
            raise ControlClosed(f"control channel to {self.name} is closed")
        ident, future = self._replies.issue(on_late=_close_fds)
        try:
            self.send({**message, "id": ident}, fds)
        except BaseException:
            self._replies.abandon(ident, quiet=True)
            raise
        try:
            async with asyncio.timeout(timeout):
                return await self._replies.wait(ident, future)
        except TimeoutError:  # said for whoever reports it: which peer, what, how long
            what = message.get("type") or message.get("op")
            raise TimeoutError(f"{self.name} did not answer a {what!r} request within"
                               f" {timeout:g} s (stopped or overloaded?)") from None

    def _shutdown(self) -> None:
        if self.closed.is_set():
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_writer(self.sock.fileno())
        while self._queue:  # never to be sent: their descriptor copies are ours to close
            for fd in self._queue.popleft()[1]:
                os.close(fd)
        self._replies.fail_all(ControlClosed(f"control channel to {self.name} closed"))
        self.closed.set()

    def close(self) -> None:
        self._shutdown()
        self.sock.close()

    # -- typed messages (domains/messages.py) ------------------------------------------
    async def ask(self, request: Message, *expected: type[M], fds: list[int] | None = None,
                  timeout: float | None = 60.0) -> tuple[M | Failed, list[int]]:
        """Send a typed request; its reply is one of `expected` or Failed (else MessageError)."""
        reply, got = await self.request(request.encode(), fds, timeout)
        try:
            return typing.cast(M | Failed, decode(reply, *expected, Failed)), got
        except MessageError:
            _close_fds((reply, got))
            raise

    def tell(self, event: Message) -> None:
        """A one-way typed message."""
        self.send(event.encode())


TypedHandler = Callable[[Message, list[int]], Awaitable[tuple[Message, list[int]] | None]]


def typed(handler: TypedHandler, *accepted: type[Message]) -> Handler:
    """A channel handler for typed messages: a bad or unknown message, or a failure, is
    answered with Failed (a code and what went wrong); the channel goes on."""

    async def handle(raw: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]] | None:
        try:
            request = decode(raw, *accepted)
        except MessageError as exc:
            _close_fds((raw, fds))
            return Failed(ErrorCode.BAD_MESSAGE, str(exc)).encode(), []
        try:
            reply = await handler(request, fds)  # the handler owns the fds from here
        except Exception as exc:
            code = error_code(exc)
            if code is ErrorCode.INTERNAL:
                log.exception("control message %r failed", raw.get("type"))
            reply = (Failed(code, str(exc) or type(exc).__name__), [])
        if reply is None:
            return None
        return reply[0].encode(), reply[1]

    return handle
