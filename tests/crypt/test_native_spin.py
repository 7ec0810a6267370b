"""The bounded busy-wait before the event loop sleeps (trustvbd/nbd/spin.py, the native
Spinner): QD1 guest reads through the native read plane stay right with it on, it waits
(and each wait ends within its budget), and it never spins under CPU pressure, without
the pressure file, past its maximum budget, or right after a wait in vain.

The guest is an NbdClient on a thread of its own (its own event loop), as a real guest is
another process: a guest on the disk's own loop could never send while the loop spins.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.crypt.helpers import BS, pattern, run
from tests.crypt.test_native_reads import drivers, opened, served, write_blocks
from trustvbd import _native
from trustvbd.domains.crypt import spin_setting
from trustvbd.nbd import spin
from trustvbd.nbd.client import NbdClient

BLOCKS = range(64, 96)


@pytest.fixture
def spinning() -> Iterator[None]:
    yield
    spin.disable()


def guest_reads(uri: str, count: int) -> list[tuple[int, bytes]]:
    """`count` QD1 reads of single blocks, from a guest on its own thread and loop."""
    async def go() -> list[tuple[int, bytes]]:
        client = await NbdClient.open_uri(uri)
        try:
            out = []
            for i in range(count):
                block = BLOCKS[(i * 7) % len(BLOCKS)]
                out.append((block, bytes(await client.pread(block * BS, BS))))
            return out
        finally:
            await client.close()
    return asyncio.run(go())


def reads_through_the_plane(tmp: Path, copies: int, count: int) -> None:
    """`count` QD1 guest reads of the disk over `copies` replicas: all native, all right."""
    with drivers(tmp, copies) as (_, uris):
        async def go() -> None:
            async with opened(tmp, uris) as disk, served(tmp, disk) as guest:
                await write_blocks(disk, BLOCKS)
                before = disk._plane.started
                got = await asyncio.get_running_loop().run_in_executor(
                    None, guest_reads, guest.uri, count)
                assert [data for _, data in got] == [pattern(b) for b, _ in got]
                assert disk._plane.started - before == count, "reads left the native plane"
        run(go())


@pytest.mark.parametrize("copies", [1, 2])
def test_qd1_reads_with_the_busy_wait_on_are_right_and_it_waits(
        short_tmp: Path, spinning: None, copies: int) -> None:
    """With no pressure gate (a limit of 100 %: this machine is shared) the loop waits for
    the driver's replies and the guest's next requests: the reads are right and native,
    and waits happened, each ending one of the counted ways."""
    spinner = spin.enable(spin.BUDGET_US, psi_max=100.0)
    assert spinner is not None
    reads_through_the_plane(short_tmp, copies, 200)
    paid, vain, _yielded, _off = spinner.counts
    assert paid + vain > 0, "the loop never waited"
    assert not spin._queued, "a wait was queued and never ran"


def test_under_cpu_pressure_it_never_spins(short_tmp: Path, spinning: None) -> None:
    """A pressure file over the limit: not one wait spins; the reads are served as before."""
    pressure = short_tmp / "cpu"
    pressure.write_text("some avg10=55.00 avg60=40.00 avg300=20.00 total=123456\n"
                        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    spinner = spin.enable(spin.BUDGET_US, psi_path=str(pressure))
    assert spinner is not None
    reads_through_the_plane(short_tmp, 2, 100)
    paid, vain, yielded, off = spinner.counts
    assert (paid, vain, yielded) == (0, 0, 0)
    assert off >= 100, "the gate was not even asked"


def test_without_the_pressure_file_it_stays_off(tmp_path: Path, spinning: None) -> None:
    assert spin.enable(spin.BUDGET_US, psi_path=str(tmp_path / "no-psi")) is None
    assert not spin.enabled()
    assert spin.enable(0) is None  # 0: off


def test_a_budget_over_the_maximum_is_refused() -> None:
    with pytest.raises(ValueError, match="spins only briefly"):
        _native.Spinner(_native.SPIN_BUDGET_MAX_US + 1, -1)
    with pytest.raises(ValueError, match="not a share"):
        _native.Spinner(10, -1, 150.0)


def test_a_wait_in_vain_ends_within_its_budget_and_turns_waiting_off() -> None:
    """No bytes come: the wait gives up (bounded), and the next one does not spin even
    with bytes there (it is off for a while after a wait in vain)."""
    a, b = socket.socketpair()
    try:
        spinner = _native.Spinner(_native.SPIN_BUDGET_MAX_US, -1)
        start = time.monotonic()
        assert not spinner.wait(b.fileno())
        assert time.monotonic() - start < 1.0, "an unbounded spin"
        paid, vain, _yielded, off = spinner.counts
        assert (paid, vain, off) == (0, 1, 0)
        a.send(b"x")
        assert not spinner.armed()
        assert not spinner.wait(b.fileno())
        assert spinner.counts[3] == 2
    finally:
        a.close()
        b.close()


def test_bytes_there_end_a_wait_at_once() -> None:
    a, b = socket.socketpair()
    try:
        a.send(b"x")
        spinner = _native.Spinner(_native.SPIN_BUDGET_MAX_US, -1)
        assert spinner.wait(b.fileno())
        assert spinner.counts[0] == 1  # paid
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("text", ["-1", "abc", str(_native.SPIN_BUDGET_MAX_US + 1), "1.5"])
def test_the_crypt_domain_refuses_a_budget_it_cannot_keep(text: str) -> None:
    with pytest.raises(SystemExit, match=f"TRUSTVBD_SPIN_US='{text}' is not a busy-wait budget"):
        spin_setting("TRUSTVBD_SPIN_US", text)


def test_the_crypt_domain_budget_is_off_unless_set() -> None:
    assert spin_setting("TRUSTVBD_SPIN_US", None) == 0
    assert spin_setting("TRUSTVBD_SPIN_US", str(spin.BUDGET_US)) == spin.BUDGET_US
    assert spin_setting("TRUSTVBD_SPIN_US", "0") == 0
    assert spin_setting("TRUSTVBD_SPIN_US", str(_native.SPIN_BUDGET_MAX_US)) == _native.SPIN_BUDGET_MAX_US


@pytest.mark.parametrize("text", ["-0.5", "x", "100.1", "nan"])
def test_the_crypt_domain_refuses_a_pressure_limit_that_is_no_share(text: str) -> None:
    with pytest.raises(SystemExit, match=f"TRUSTVBD_SPIN_PSI_MAX='{text}' is not a share of time"):
        spin_setting("TRUSTVBD_SPIN_PSI_MAX", text)
    assert spin_setting("TRUSTVBD_SPIN_PSI_MAX", None) == _native.SPIN_PSI_MAX
    assert spin_setting("TRUSTVBD_SPIN_PSI_MAX", "100") == 100.0


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_a_wait_ends_at_anything_the_loop_watches(spinning: None, kind: str) -> None:
    """Bytes come on another socket the loop watches (a write's background work: the log's
    sync, a replica's reply), not on the one named: the wait ends for them, paid, rather
    than holding them up for its whole budget (a wait on the named socket alone did)."""
    import uvloop

    spinner = spin.enable(_native.SPIN_BUDGET_MAX_US, psi_max=100.0)
    assert spinner is not None
    named, named_peer = socket.socketpair()
    other, other_peer = socket.socketpair()

    async def go() -> None:
        loop = asyncio.get_running_loop()
        seen = asyncio.Event()

        def readable() -> None:
            other.recv(1)
            seen.set()

        loop.add_reader(other.fileno(), readable)
        await asyncio.sleep(0.001)  # libuv registers a reader in its next poll phase
        # Sent in the loop turn the wait runs in, just before it (after that turn's poll):
        loop.call_soon(other_peer.send, b"x")
        spin.wait_soon(loop, named.fileno())
        await seen.wait()
        loop.remove_reader(other.fileno())

    try:
        if kind == "uvloop":
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(go())
        else:
            asyncio.run(go())
    finally:
        for s in (named, named_peer, other, other_peer):
            s.close()
    paid, vain, _yielded, _off = spinner.counts
    assert (paid, vain) == (1, 0), f"paid {paid}, in vain {vain}"


def test_a_wait_left_queued_on_a_stopped_loop_does_not_stop_later_ones(spinning: None) -> None:
    """A loop that stopped before its queued wait ran (a test's, a closed connection's)
    leaves the next loop free to wait once the busy-wait is enabled again."""
    assert spin.enable(spin.BUDGET_US, psi_max=100.0) is not None
    a, b = socket.socketpair()
    try:
        loop = asyncio.new_event_loop()
        spin.wait_soon(loop, a.fileno())
        loop.close()  # the wait never ran
        assert spin._queued
        spinner = spin.enable(spin.BUDGET_US, psi_max=100.0)
        assert spinner is not None

        async def go() -> None:
            spin.wait_soon(asyncio.get_running_loop(), a.fileno())
            await asyncio.sleep(0.001)

        asyncio.run(go())
        paid, vain, _yielded, _off = spinner.counts
        assert paid + vain == 1, "no wait ran"
    finally:
        a.close()
        b.close()
