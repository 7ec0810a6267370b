"""#9.1 on the hypervisor's control channel: replies paired by id, late ones dropped with their fds."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest

from trustvbd.domains import messages as m
from trustvbd.domains.control import ControlChannel, ControlClosed, handed_socket, socket_pair
from trustvbd.replies import PendingReplies, ProtocolError


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_a_timed_out_request_never_gets_another_ones_reply() -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def slow(message: dict, fds: list[int]) -> tuple[dict, list[int]]:
            if message["op"] == "slow":
                await release.wait()
                a, b = socket.socketpair()  # a late reply carrying a descriptor
                b.close()
                return {"answer": "slow"}, [a.detach()]
            return {"answer": message["op"]}, []

        ours, theirs = socket_pair()
        a, b = ControlChannel(ours, None, "b"), ControlChannel(theirs, slow, "a")
        a.start()
        b.start()
        with pytest.raises(TimeoutError):
            await a.request({"op": "slow"}, timeout=0.05)
        cancelled = asyncio.create_task(a.request({"op": "slow"}))
        await asyncio.sleep(0.02)
        cancelled.cancel()
        before = open_fds()
        release.set()
        for n in range(5):
            reply, fds = await a.request({"op": f"fast{n}"})
            assert reply["answer"] == f"fast{n}" and fds == []
        await asyncio.sleep(0.05)
        assert open_fds() <= before  # the late replies' descriptors were closed, not leaked
        assert not a.closed.is_set()
        a.close()
        b.close()

    asyncio.run(scenario())


def test_a_reply_to_a_request_never_made_closes_the_channel() -> None:
    async def scenario() -> None:
        ours, theirs = socket_pair()
        a = ControlChannel(ours, None, "liar")
        a.start()
        waiting = asyncio.create_task(a.request({"op": "status"}))
        await asyncio.sleep(0.01)
        theirs.send(b'{"reply_to": 999, "ok": true}')
        with pytest.raises(ControlClosed):
            await waiting
        assert a.closed.is_set()
        a.close()
        theirs.close()

    asyncio.run(scenario())


def test_pending_replies_table() -> None:
    async def scenario() -> None:
        table: PendingReplies[str] = PendingReplies("peer")
        undone: list[str] = []
        one, f1 = table.issue(on_late=undone.append)
        two, f2 = table.issue()
        assert one != two and len(table) == 2
        waiter = asyncio.create_task(table.wait(one, f1))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        table.resolve(one, "late")  # dropped, handed to on_late only
        assert undone == ["late"] and not f2.done()
        table.resolve(two, "mine")
        assert await table.wait(two, f2) == "mine"
        for bad in (two, 77, None, "1", True):  # answered already, never made, not an id
            with pytest.raises(ProtocolError):
                table.resolve(bad, "x")
        three, f3 = table.issue()
        table.fail_all(ControlClosed("gone"))
        with pytest.raises(ControlClosed):
            await f3
        with pytest.raises(ProtocolError):  # no late reply after the channel is gone
            table.resolve(three, "x")

    asyncio.run(scenario())


def test_a_handed_socket_comes_alone_and_a_refusal_says_why() -> None:
    """A peer that refuses, answers something else, or sends the wrong number of fds gets
    ConnectionError with its reason, and none of the fds it sent stays open."""
    def fds(n: int) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            a, b = socket.socketpair()
            out.append(a.detach())
            b.close()
        return out

    def closed(fd: int) -> bool:
        try:
            os.fstat(fd)
        except OSError:
            return True
        return False

    sent = fds(1)
    sock = handed_socket(m.ChannelGranted(""), sent, m.ChannelGranted, "channel")
    assert sock.fileno() == sent[0]
    sock.close()
    cases: list[tuple[m.Message, int, str]] = [
        (m.Failed(m.ErrorCode.POLICY_DENIED, "policy forbids guest g on disk d"), 1,
         "policy forbids guest g on disk d"),
        (m.Done(), 2, "no channel was handed over (the reply was 'done')"),
        (m.ChannelGranted(""), 2, "channel: the reply came with 2 file descriptors, not 1"),
        (m.ChannelGranted(""), 0, "channel: the reply came with 0 file descriptors, not 1"),
    ]
    for reply, count, why in cases:
        sent = fds(count)
        with pytest.raises(ConnectionError) as err:
            handed_socket(reply, sent, m.ChannelGranted, "channel")
        assert str(err.value) == why
        assert all(closed(fd) for fd in sent)


def test_json_nested_too_deeply_is_a_bad_message_not_a_recursion_error() -> None:
    """Python's parser raises RecursionError for a few thousand nested arrays: it escaped
    every channel's "bad message" path (a ValueError), with a traceback."""
    from trustvbd.replies import peer_json

    for deep in (b"[" * 50_000, b'{"a":' * 50_000):
        with pytest.raises(ValueError, match="JSON nested too deeply"):
            peer_json(deep)
    assert peer_json(b'{"a": [[1]]}') == {"a": [[1]]}


def test_sends_never_wait_and_keep_their_order_and_descriptors() -> None:
    """A peer that reads nothing: what its socket does not take is queued (descriptors with
    their message, in order) and sent as it reads; past MAX_QUEUED a trusted peer's channel
    stays open and the send fails with ControlFull, an untrusted one is hung up on; what was
    queued and never sent has its descriptor copies closed."""
    from trustvbd.domains.control import MAX_QUEUED, ControlFull

    async def scenario() -> None:
        for untrusted in (False, True):
            ours, theirs = socket_pair()
            a = ControlChannel(ours, None, "stopped", untrusted=untrusted)
            a.start()
            before = open_fds()
            sent = 0
            with pytest.raises(ControlClosed) as full:
                while True:
                    r, w = os.pipe()
                    os.write(w, str(sent).encode())
                    os.close(w)
                    try:
                        a.send({"n": sent}, [r])  # the caller keeps owning r
                    finally:
                        os.close(r)
                    sent += 1
            assert len(a._queue) == (0 if untrusted else MAX_QUEUED)
            if untrusted:
                assert a.closed.is_set() and not isinstance(full.value, ControlFull)
                assert open_fds() <= before  # the queued copies were closed with it
                theirs.close()
                continue
            assert isinstance(full.value, ControlFull) and "reads nothing" in str(full.value)
            assert not a.closed.is_set()
            theirs.setblocking(False)
            got = 0
            while got < sent:  # the peer reads again: everything comes, in order, each fd with its message
                await asyncio.sleep(0)
                try:
                    data, fds, _, _ = socket.recv_fds(theirs, 1024, 4)
                except BlockingIOError:
                    continue
                assert json.loads(data) == {"n": got} and len(fds) == 1
                assert os.read(fds[0], 16) == str(got).encode()
                os.close(fds[0])
                got += 1
            for _ in range(10):
                await asyncio.sleep(0)
            assert not a._queue and open_fds() <= before
            a.send({"n": "after"})  # and the channel works on
            assert json.loads(theirs.recv(1024)) == {"n": "after"}
            a.close()
            theirs.close()

    asyncio.run(scenario())


def test_an_integrity_event_to_a_launcher_that_reads_nothing_never_fails_the_request() -> None:
    """`send_event` runs inside a guest's read or write (the integrity callback): a launcher
    that reads nothing (stopped, its channel full: ControlFull) or is gone (ControlClosed)
    must cost the launcher's copy of the event, never the request; the audit record is still
    asked for."""
    from types import SimpleNamespace

    from trustvbd.domains.control import MAX_QUEUED
    from trustvbd.domains.crypt_stack import send_event

    async def scenario() -> None:
        ours, theirs = socket_pair()
        control = ControlChannel(ours, None, "launcher")
        control.start()
        recorded: list[str] = []

        async def record(kind: str, **fields: object) -> dict[str, object]:
            recorded.append(kind)
            return {"ok": True}

        domain = SimpleNamespace(control=control, records=set(),
                                 gate=SimpleNamespace(client=SimpleNamespace(record=record)))
        disk = SimpleNamespace(name="payroll")
        event = {"event": "integrity", "what": "bad block", "replica": "drv-a", "blocks": [7]}
        sent = 0
        while len(control._queue) < MAX_QUEUED:  # the socket's buffer full, then the queue
            send_event(domain, disk, event)  # type: ignore[arg-type]
            sent += 1
            assert sent < 100_000
        for _ in range(10):  # each would raise ControlFull into the request
            send_event(domain, disk, event)  # type: ignore[arg-type]
        control.close()
        send_event(domain, disk, event)  # type: ignore[arg-type]  # closed: said, not raised
        await asyncio.gather(*domain.records)
        assert recorded == ["integrity"] * (sent + 11)
        theirs.close()

    asyncio.run(scenario())


def test_an_encryption_domain_that_reads_nothing_is_told_of_a_new_policy_once_it_reads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`policy load` tells each encryption domain until it confirms: one stopped so long that
    its channel is full (ControlFull: the message was not even sent) is told again once it
    reads, and its answer, however late, is what the launcher gets."""
    from trustvbd.domains import hv_policy
    from trustvbd.domains.control import MAX_QUEUED

    monkeypatch.setattr(hv_policy, "RETELL_INTERVAL", 0.01)

    async def scenario() -> None:
        ours, theirs = socket_pair()
        launcher = ControlChannel(ours, None, "crypt-Payroll")
        launcher.start()
        filler = 0
        while len(launcher._queue) < MAX_QUEUED:  # stopped: it reads nothing
            launcher.send({"n": filler})
            filler += 1
        told = asyncio.create_task(hv_policy.enforce("crypt-Payroll", launcher))
        await asyncio.sleep(0.2)
        assert not told.done()  # no confirmation: it was not told, it keeps being told
        checked: list[str] = []

        async def domain(message: dict, fds: list[int]) -> tuple[dict, list[int]] | None:
            if "id" not in message:
                return None  # what filled the channel
            checked.append(message["type"])
            return m.Rechecked(2).encode(), []

        crypt = ControlChannel(theirs, domain, "hv")  # it runs again: reads everything
        crypt.start()
        assert await asyncio.wait_for(told, 10) == 2
        assert checked == [m.PolicyChanged.TYPE]  # told once it read, once only
        launcher.close()
        crypt.close()

    asyncio.run(scenario())


def test_a_request_to_a_stalled_domain_fails_naming_it_and_what_to_do() -> None:
    """A launcher request (here a scrub) whose domain does not answer: the control socket's
    answer was `failed` with an empty message (a bare TimeoutError). Now the channel says
    which domain did not answer what, and the launcher's answer what to do."""
    from trustvbd.domains.hv_control import answer

    async def scenario() -> None:
        ours, theirs = socket_pair()  # the domain's end is never read: it is stopped
        channel = ControlChannel(ours, None, "crypt-Payroll")
        channel.start()

        class Stalled:
            async def scrub(self, disk: str) -> m.Message:
                reply, _ = await channel.ask(m.ScrubQuery(disk), m.ScrubStarted, timeout=0.1)
                return reply

        line = json.dumps({**m.ScrubQuery("payroll").encode(), "id": 5}).encode() + b"\n"
        reply = await answer(line, [], Stalled())  # type: ignore[arg-type]
        assert reply["reply_to"] == 5
        failed = m.decode(reply, m.Failed)
        assert isinstance(failed, m.Failed) and failed.code is m.ErrorCode.UNREACHABLE
        assert failed.message.startswith(
            "crypt-Payroll did not answer a 'scrub?' request within 0.1 s (stopped or"
            " overloaded?);"
            " `trustvbd status` shows each domain's state (one paused by a signal:"
            " `kill -CONT PID`"), failed.message
        channel.close()
        theirs.close()

    asyncio.run(scenario())
