"""Asking the access-control domain: AcmClient, which fails closed.

If the domain is unreachable, times out or answers garbage, every decision is
a refusal whose reason starts with "access-control domain unreachable: ".
Chinese Wall attachments belong to the connection that made them (the domain
releases them when it closes), so after a reconnect the client re-attaches
what it holds; ids it could not restore are listed in `lost`.

Every request carries a request id ("rid") and the domain echoes it: replies are
paired by id, never by order (trustvbd/replies.py), so a decision whose asker
was cancelled or timed out can never become the answer to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from trustvbd.acm.decisions import RESTORING, Decision
from trustvbd.replies import PendingReplies, ProtocolError

log = logging.getLogger("trustvbd.acm.client")
MAX_REPLY = 1 << 20
RESTORING_RETRY = 0.1  # seconds between asks while a restarted domain restores its counts


class AcmUnavailable(Exception):
    pass


class AcmClient:
    def __init__(self, path: str | None = None, sock: socket.socket | None = None,
                 timeout: float = 5.0,
                 reconnect: Callable[[], Awaitable[socket.socket]] | None = None,
                 hello: dict[str, Any] | None = None) -> None:
        """Connect by `path`, or use a handed-over `sock`; `reconnect` gets a new one after
        a loss (the encryption domain asks the hypervisor, which reaches the domain), or the
        first one when neither is given (the store)."""
        if (path is not None and sock is not None) or (path is None and sock is None
                                                       and reconnect is None):
            raise ValueError("give one of path, sock or reconnect")
        self.path, self.sock, self.timeout, self.reconnect = path, sock, timeout, reconnect
        self.hello = hello  # {"role", "token"}: who we are, proven on every connection
        self.writer: asyncio.StreamWriter | None = None
        self.replies: PendingReplies[dict[str, Any]] = PendingReplies("access-control domain")
        self.reading: asyncio.Task[None] | None = None
        self.connecting = asyncio.Lock()
        self.held: dict[str, tuple[str, str | None]] = {}  # chw attachments: id -> label, name
        self.lost: list[str] = []

    async def _connect(self) -> None:
        if self.sock is not None:  # a handed-over fd is used once; it cannot be reopened
            sock, self.sock = self.sock, None
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_REPLY)
        elif self.path is not None:
            reader, writer = await asyncio.open_unix_connection(self.path, limit=MAX_REPLY)
        elif self.reconnect is not None:
            sock = await self.reconnect()
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_REPLY)
        else:
            raise AcmUnavailable("its connection was lost and cannot be reopened")
        self.writer, self.replies = writer, PendingReplies("access-control domain")
        self.reading = asyncio.get_running_loop().create_task(self._read(reader, writer))
        if self.hello is not None:
            reply = await self._exchange({"op": "hello", **self.hello})
            if reply.get("ok") is not True:
                log.warning("access-control domain did not accept our role: %s", reply)
        for cid, (label, name) in list(self.held.items()):  # restore our Chinese Wall counts
            reply = await self._exchange({"op": "chw_attach", "id": cid, "label": label,
                                          "name": name})
            if not reply.get("allowed"):
                log.warning("could not restore attachment %s: %s", cid, reply)
                self.held.pop(cid)
                self.lost.append(cid)
        if self.hello is not None:
            # Everything we hold is counted again: a restarted domain waits for this from
            # every encryption domain (by its role) before it decides new attachments.
            reply = await self._exchange({"op": "restored"})
            if reply.get("ok") is not True:
                log.warning("access-control domain did not take our restored counts: %s", reply)

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Hand each reply to the request it names; anything else ends the connection."""
        replies, why = self.replies, "connection closed"
        try:
            while (line := await reader.readline()).endswith(b"\n"):
                reply = json.loads(line)
                if not isinstance(reply, dict):
                    raise ValueError("reply is not a JSON object")
                replies.resolve(reply.get("rid"), reply)
        except (ValueError, ProtocolError, OSError, asyncio.LimitOverrunError) as exc:
            why = str(exc) or type(exc).__name__
            log.error("access-control domain: %s; dropping the connection", why)
        finally:
            replies.fail_all(AcmUnavailable(why))
            if self.writer is writer:
                self.writer = None
            writer.close()

    async def _exchange(self, request: dict[str, Any],
                        on_late: Callable[[dict[str, Any]], None] | None = None
                        ) -> dict[str, Any]:
        assert self.writer is not None
        rid, answer = self.replies.issue(on_late)
        self.writer.write(json.dumps({**request, "rid": rid}).encode() + b"\n")
        return await self.replies.wait(rid, answer)

    async def request(self, request: dict[str, Any],
                      on_late: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """One request and its reply; AcmUnavailable on any transport or format failure.

        Cancelled or timed out, the request is abandoned: its reply, whenever it
        comes, goes to `on_late` (if given) and to no other request.
        """
        try:
            async with asyncio.timeout(self.timeout):
                async with self.connecting:
                    if self.writer is None:
                        await self._connect()
                return await self._exchange(request, on_late)
        except TimeoutError:
            raise AcmUnavailable("timed out") from None
        except (OSError, ValueError, AcmUnavailable) as exc:
            await self._drop()
            raise AcmUnavailable(str(exc) or type(exc).__name__) from None

    async def restore(self) -> None:
        """Reconnect now and re-attach what we hold (the domain was restarted): AcmUnavailable
        if that fails."""
        try:
            async with asyncio.timeout(self.timeout):
                async with self.connecting:
                    await self._drop()
                    await self._connect()
        except TimeoutError:
            raise AcmUnavailable("timed out") from None
        except (OSError, ValueError) as exc:
            await self._drop()
            raise AcmUnavailable(str(exc) or type(exc).__name__) from None

    async def _drop(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.writer = None

    async def decide(self, request: dict[str, Any],
                     on_late: Callable[[dict[str, Any]], None] | None = None) -> Decision:
        try:
            reply = await self.request(request, on_late)
        except AcmUnavailable as exc:
            return Decision(False, "acm-unreachable", f"access-control domain unreachable: {exc}")
        if reply.get("ok") is not True:
            return Decision(False, "acm-error", f"access-control domain refused the request:"
                            f" {reply.get('error', 'no reason given')}")
        allowed, rule, reason = reply.get("allowed"), reply.get("rule"), reply.get("reason")
        if not isinstance(allowed, bool) or not isinstance(rule, str) or not isinstance(reason,
                                                                                        str):
            return Decision(False, "acm-unreachable", "access-control domain unreachable:"
                            f" garbled reply {str(reply)[:200]}")
        return Decision(allowed, rule, reason)

    async def guest_may_use_disk(self, guest: str | None, guest_label: str, disk: str | None,
                                 disk_label: str) -> Decision:
        return await self.decide({"op": "guest_may_use_disk", "guest": guest,
                                  "guest_label": guest_label, "disk": disk,
                                  "disk_label": disk_label})

    async def driver_may_serve_disk(self, driver: str | None, driver_label: str,
                                    disk: str | None, disk_label: str) -> Decision:
        return await self.decide({"op": "driver_may_serve_disk", "driver": driver,
                                  "driver_label": driver_label, "disk": disk,
                                  "disk_label": disk_label})

    async def channel(self, a: str | None, a_label: str, b: str | None, b_label: str) -> Decision:
        return await self.decide({"op": "channel", "a": a, "a_label": a_label, "b": b,
                                  "b_label": b_label})

    async def chw_attach(self, cid: str, label: str, name: str | None = None) -> Decision:
        def undo(reply: dict[str, Any]) -> None:
            # Our caller gave up, yet the domain may have counted the attachment:
            # take it back (requests on one connection are handled in order).
            if reply.get("allowed") is True and self.writer is not None:
                rid, _ = self.replies.issue()
                self.replies.abandon(rid, quiet=True)
                self.writer.write(json.dumps({"op": "chw_detach", "id": cid, "rid": rid}
                                             ).encode() + b"\n")

        request = {"op": "chw_attach", "id": cid, "label": label, "name": name}
        give_up = asyncio.get_running_loop().time() + self.timeout
        d = await self.decide(request, undo)
        # A restarted domain still waiting for other encryption domains' counts: ask again.
        while d.rule == RESTORING and asyncio.get_running_loop().time() < give_up:
            await asyncio.sleep(RESTORING_RETRY)
            d = await self.decide(request, undo)
        if d.allowed:
            self.held[cid] = (label, name)
        return d

    async def chw_detach(self, cid: str) -> bool:
        self.held.pop(cid, None)
        try:
            return (await self.request({"op": "chw_detach", "id": cid})).get("ok") is True
        except AcmUnavailable:
            return False

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.request(request)
        except AcmUnavailable as exc:
            return {"ok": False, "error": f"access-control domain unreachable: {exc}"}

    async def load_policy(self, path: str) -> dict[str, Any]:
        return await self._call({"op": "load_policy", "path": path})

    async def explain(self, guest_label: str, disk_label: str, guest: str | None = None,
                      disk: str | None = None) -> dict[str, Any]:
        return await self._call({"op": "explain", "guest_label": guest_label,
                                 "disk_label": disk_label, "guest": guest, "disk": disk})

    async def status(self) -> dict[str, Any]:
        return await self._call({"op": "status"})

    async def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        return await self._call({"op": "record", "kind": kind, "fields": fields})

    async def close(self) -> None:
        await self._drop()
        if self.reading is not None:
            await asyncio.wait([self.reading])
