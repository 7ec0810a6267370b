"""#9.1 in process: a decision cancelled or timed out at any await hands its answer to no other.

The client talks to a real access-control domain process through a relay in the
test's event loop that can hold the domain's replies back, so each request can
be cancelled at a chosen point: before it leaves, after it left and before its
reply, with its reply half delivered, while connecting, by timeout. After each,
requests for other guests must get their own answers (their reasons name them),
and no Chinese Wall attachment may be left counted for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acm.test_domain import Acm
from tests.acm.util import XM_TEST
from trustvbd.acm.client import AcmClient
from trustvbd.domains.messages import DiskSpec
from trustvbd.domains.policy_gate import PolicyGate
from trustvbd.nbd.server import PeerInfo


class Relay:
    """Client <-> domain byte relay; `hold` keeps the domain's replies back (`cut` mid-line)."""

    def __init__(self, target: Path, path: Path) -> None:
        self.target, self.path = target, path
        self.open = asyncio.Event()
        self.open.set()
        self.cut: int | None = None  # with `open` clear: let this many bytes through first
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._client, str(self.path))

    def hold(self, cut: int | None = None) -> None:
        self.open.clear()
        self.cut = cut

    async def _client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        dreader, dwriter = await asyncio.open_unix_connection(str(self.target))

        async def up() -> None:
            while data := await creader.read(65536):
                dwriter.write(data)
            dwriter.close()

        async def down() -> None:
            while line := await dreader.readline():
                if not self.open.is_set() and self.cut is not None:
                    cwriter.write(line[:self.cut])
                    line, self.cut = line[self.cut:], None
                await self.open.wait()
                cwriter.write(line)
            cwriter.close()

        for coro in (up(), down()):
            task = asyncio.get_running_loop().create_task(coro)
            self.tasks.add(task)
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def close(self) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()


@pytest.fixture
def xm() -> Iterator[Acm]:
    acm = Acm(XM_TEST)
    yield acm
    acm.stop()


async def settle() -> None:
    for _ in range(50):  # let the relay and the domain move bytes
        await asyncio.sleep(0.002)


async def its_own_answer(client: AcmClient, n: int, allowed: bool) -> None:
    """A decision for guest g<n> must be about g<n>, and right."""
    d = await client.guest_may_use_disk(f"g{n}", "red", "d", "red" if allowed else "blue")
    assert f"guest g{n} " in d.reason, (n, d)
    assert d.allowed is allowed, (n, d)


async def attachments(client: AcmClient) -> int:
    return int((await client.status())["attachments"])


POINTS = ["before-send", "after-send", "half-reply", "timeout", "while-connecting"]


@pytest.mark.parametrize("point", POINTS)
def test_a_cancelled_decision_goes_to_no_other(xm: Acm, short_tmp: Path, point: str) -> None:
    async def scenario() -> None:
        relay = Relay(xm.sock, short_tmp / "r.sock")
        await relay.start()
        client = AcmClient(str(relay.path), timeout=1.0 if point == "timeout" else 5.0)
        if point != "while-connecting":
            await its_own_answer(client, 0, True)  # connected
        for n in range(1, 4):  # allowed first, forbidden after: a slip would admit it
            relay.hold(cut=10 if point == "half-reply" else None)
            task = asyncio.create_task(client.guest_may_use_disk(f"x{n}", "red", "d", "red"))
            if point == "before-send":
                task.cancel()
            elif point == "while-connecting":
                await asyncio.sleep(0)  # inside open_unix_connection
                task.cancel()
            elif point == "timeout":
                d = await task
                assert not d.allowed and "timed out" in d.reason
            else:
                await settle()  # the request left, the reply is held (or half through)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            relay.open.set()
            await settle()
            await its_own_answer(client, 10 * n, False)
            await its_own_answer(client, 10 * n + 1, True)
        await client.close()
        await relay.close()

    asyncio.run(scenario())


def test_cancel_at_every_step_of_a_running_decision(xm: Acm, short_tmp: Path) -> None:
    """Cancel after 0, 1, 2, ... turns of the event loop: every await point is hit."""

    async def scenario() -> None:
        relay = Relay(xm.sock, short_tmp / "r.sock")
        await relay.start()
        client = AcmClient(str(relay.path), timeout=5)
        await its_own_answer(client, 0, True)
        for turns in range(40):
            task = asyncio.create_task(client.guest_may_use_disk("x", "red", "d", "red"))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await its_own_answer(client, turns + 1, False)
        await client.close()
        await relay.close()

    asyncio.run(scenario())


def test_a_cancelled_attach_leaves_no_attachment(xm: Acm, short_tmp: Path) -> None:
    """PolicyGate.attach (check, then Chinese Wall) cancelled anywhere counts nothing."""

    async def scenario() -> None:
        relay = Relay(xm.sock, short_tmp / "r.sock")
        await relay.start()
        client = AcmClient(str(relay.path), timeout=5)
        gate = PolicyGate(client, {"vm1": "red"}, [DiskSpec("d", "red", 4096, True, ["r"])])
        peer = PeerInfo("vm1", "test")
        assert await attachments(client) == 0
        for turns in range(40):
            task = asyncio.create_task(gate.attach(peer, "vm1", "red", "d", "red"))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            attached = not task.cancelled() and task.result().allowed
            await settle()
            if attached:  # it finished before the cancel: the gate knows it and detaches it
                await gate.detach(peer, "vm1", "d")
            assert await attachments(client) == 0, f"an attachment counted for nobody ({turns})"
            await its_own_answer(client, turns, False)
        await client.close()
        await relay.close()

    asyncio.run(scenario())


def test_a_late_attach_reply_is_undone(xm: Acm, short_tmp: Path) -> None:
    """The Chinese Wall counted an attachment whose asker is gone: the client takes it back."""

    async def scenario() -> None:
        relay = Relay(xm.sock, short_tmp / "r.sock")
        await relay.start()
        client = AcmClient(str(relay.path), timeout=5)
        await its_own_answer(client, 0, True)
        relay.hold()
        task = asyncio.create_task(client.chw_attach("c1", "red", "vm1"))
        await settle()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        relay.open.set()
        await settle()
        assert await attachments(client) == 0
        assert "c1" not in client.held
        # blue conflicts with red: it may attach only if no red attachment is left
        assert (await client.chw_attach("c2", "blue", "vm2")).allowed
        await client.close()
        await relay.close()

    asyncio.run(scenario())
