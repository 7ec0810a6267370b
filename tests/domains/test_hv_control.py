"""The launcher's control socket under many clients, over real Unix sockets: how many it
answers at once, what the one too many is told, a client that never takes its reply."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from trustvbd.domains import hv_control
from trustvbd.domains import messages as m
from trustvbd.domains.hv_control import MAX_ANSWERING, ControlServer


class Slow:
    """Answers `status` and `scrub` only once `go` is set (as a stopped domain would hold
    them); `scrubs` counts the scrubs asked."""

    def __init__(self, reply: m.Message) -> None:
        self.go = asyncio.Event()
        self.asked = 0
        self.scrubs = 0
        self.reply = reply

    async def status(self) -> m.Message:
        self.asked += 1
        await self.go.wait()
        return self.reply

    async def scrub(self, disk: str) -> m.Message:
        self.scrubs += 1
        await self.go.wait()
        return self.reply


def status_request(rid: int) -> bytes:
    return json.dumps({**m.StatusQuery().encode(), "id": rid}).encode() + b"\n"


def scrub_request(rid: int) -> bytes:
    return json.dumps({**m.ScrubQuery(disk="bank").encode(), "id": rid}).encode() + b"\n"


async def ask(path: Path, rid: int, scrub: bool = False) -> dict[str, object]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(scrub_request(rid) if scrub else status_request(rid))
    line = await reader.readline()
    writer.close()
    reply = json.loads(line)
    assert isinstance(reply, dict)
    return reply


async def until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(10):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within 10 s: {what}") from None


def test_requests_over_the_most_answered_at_once_are_refused_as_busy(short_tmp: Path) -> None:
    """Requests read were answered however many: each waits for domains, so a script asking
    in a loop while a domain was stopped held a descriptor and a task per request, without
    bound, until the launcher had no descriptor left for the channels it brokers. Now at most
    MAX_ANSWERING are answered at once; one more is refused at once, saying why and what to
    do, and is not asked of the hypervisor; once they are answered, a new one is again."""
    path = short_tmp / "control.sock"

    async def scenario() -> None:
        hv = Slow(m.Failed(m.ErrorCode.INTERNAL, "answered"))
        server = ControlServer(path, hv)  # type: ignore[arg-type]
        held = [asyncio.create_task(ask(path, rid, scrub=True))
                for rid in range(1, MAX_ANSWERING + 1)]
        await until(lambda: hv.scrubs == MAX_ANSWERING, "all being answered")
        refused = await asyncio.wait_for(ask(path, 99, scrub=True), 10)  # old: waited too
        assert refused["reply_to"] == 99
        failed = m.decode(refused, m.Failed)
        assert isinstance(failed, m.Failed) and failed.code is m.ErrorCode.BUSY
        assert failed.message == hv_control.BUSY_MESSAGE
        assert failed.message.startswith(f"the launcher is answering {MAX_ANSWERING} control"
                                         " requests already")
        assert hv.scrubs == MAX_ANSWERING
        # `status` is still asked (places of its own): what the admin needs to see why.
        status = asyncio.create_task(ask(path, 98))
        await until(lambda: hv.asked == 1, "a status asked beside them")
        hv.go.set()
        assert m.decode(await asyncio.wait_for(status, 10),
                        m.Failed).message == "answered"  # type: ignore[attr-defined]
        for task in held:
            reply = await asyncio.wait_for(task, 10)
            assert m.decode(reply, m.Failed).message == "answered"  # type: ignore[attr-defined]
        assert m.decode(await asyncio.wait_for(ask(path, 100), 10),
                        m.Failed).message == "answered"  # type: ignore[attr-defined]
        assert server.answering == 0
        server.close()

    asyncio.run(scenario())


def test_status_requests_have_places_of_their_own_and_a_bound(short_tmp: Path) -> None:
    """A flood of other requests held by a stopped domain refused `trustvbd status` as busy,
    the one request that shows the admin which domain is stopped. Status requests are
    answered beside the others, at most MAX_STATUS at once; one more is refused at once."""
    path = short_tmp / "control.sock"

    async def scenario() -> None:
        hv = Slow(m.Failed(m.ErrorCode.INTERNAL, "answered"))
        server = ControlServer(path, hv)  # type: ignore[arg-type]
        held = [asyncio.create_task(ask(path, rid)) for rid in range(1, hv_control.MAX_STATUS + 1)]
        await until(lambda: hv.asked == hv_control.MAX_STATUS, "all being answered")
        refused = m.decode(await asyncio.wait_for(ask(path, 99), 10), m.Failed)
        assert isinstance(refused, m.Failed) and refused.code is m.ErrorCode.BUSY
        assert refused.message == hv_control.STATUS_BUSY_MESSAGE
        assert hv.asked == hv_control.MAX_STATUS
        hv.go.set()
        for task in held:
            await asyncio.wait_for(task, 10)
        assert server.answering_status == 0
        server.close()

    asyncio.run(scenario())


def test_a_client_that_never_takes_its_reply_is_hung_up_on(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sent its request and then read nothing held its connection (and the
    launcher's task sending it a reply larger than the socket holds) for good. Now it has
    WRITE_TIMEOUT to take it, then it is hung up on."""
    monkeypatch.setattr(hv_control, "WRITE_TIMEOUT", 0.5)
    path = short_tmp / "control.sock"

    async def scenario() -> None:
        hv = Slow(m.Failed(m.ErrorCode.INTERNAL, "x" * (8 << 20)))  # more than a socket holds
        hv.go.set()
        server = ControlServer(path, hv)  # type: ignore[arg-type]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(str(path))
        client.sendall(status_request(1))
        await until(lambda: hv.asked == 1, "asked")
        await until(lambda: not server.tasks, "the client's task ended")  # old code: never
        client.setblocking(False)
        got = b""
        while True:  # what it holds, then the end: the launcher closed the connection
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            if not chunk:
                break
            got += chunk
        assert 0 < len(got) < 8 << 20
        client.close()
        server.close()

    asyncio.run(scenario())
