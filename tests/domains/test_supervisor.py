"""The supervisor restarts a domain that dies, with a growing back-off shown in its status."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from trustvbd.domains import supervisor as sv

# A domain that says it is ready, then exits with status 3 after `delay` seconds.
FLAKY = ("import os, sys, time; os.write(int(sys.argv[-1]), b'ready\\n'); "
         "time.sleep(float(sys.argv[1])); sys.exit(3)")


def flaky(name: str, delay: float, fatal: bool = False) -> sv.Domain:
    return sv.Domain(name, "driver", False, "L",
                     lambda: sv.Launch([sys.executable, "-c", FLAKY, str(delay)]), fatal=fatal)


def test_restarts_with_back_off_visible_in_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sv, "BACKOFF_FIRST", 0.2)

    async def scenario() -> None:
        supervisor = sv.Supervisor(on_fatal=lambda why: pytest.fail(why))
        domain = flaky("d1", 0.05)
        await supervisor.start(domain)
        seen: list[dict] = []
        for _ in range(400):
            (entry,) = supervisor.status()
            if entry["state"] == "restarting" and (not seen or seen[-1]["restarts"] != entry["restarts"]):
                seen.append(entry)
            if len(seen) == 3:
                break
            await asyncio.sleep(0.01)
        await supervisor.stop([])
        assert [e["restarts"] for e in seen] == [0, 1, 2]
        assert all(e["last_exit"] == "exit status 3" for e in seen)
        # the wait before each try doubles: 0.2, 0.4, 0.8 s
        assert [e["next_retry"] for e in seen] == pytest.approx([0.2, 0.4, 0.8], abs=0.06)
        assert supervisor.status()[0]["state"] == "stopped"

    asyncio.run(scenario())


def test_a_fatal_domain_stops_everything_instead() -> None:
    async def scenario() -> None:
        why: list[str] = []
        supervisor = sv.Supervisor(on_fatal=why.append)
        await supervisor.start(flaky("crypt", 0.0, fatal=True))
        for _ in range(300):
            if why:
                break
            await asyncio.sleep(0.01)
        assert why == ["driver domain 'crypt' died (exit status 3); stopping everything"]
        assert supervisor.status()[0]["restarts"] == 0
        await supervisor.stop([])

    asyncio.run(scenario())


def test_a_domain_that_never_gets_ready_fails_to_start() -> None:
    async def scenario() -> None:
        supervisor = sv.Supervisor(on_fatal=lambda why: None)
        broken = sv.Domain("x", "driver", False, "L",
                           lambda: sv.Launch([sys.executable, "-c", "raise SystemExit(7)"]))
        # (the status is 7; under xdist another test's waitpid(-1) may reap it first: 255)
        with pytest.raises(sv.StartError, match=r"driver domain 'x' failed to start \(exit status"):
            await supervisor.start(broken)
        assert supervisor.status()[0]["state"] == "failed"

    asyncio.run(scenario())


# A domain that writes the CPUs it may run on to argv[1], says it is ready and waits.
AFFINE = ("import os, sys, time; open(sys.argv[1], 'w').write(repr(sorted(os.sched_getaffinity(0))));"
          " os.write(int(sys.argv[-1]), b'ready\\n'); time.sleep(60)")


def test_a_domain_runs_on_its_cpus_and_is_not_started_on_cpus_taken_away(tmp_path: Path) -> None:
    """A domain's `cpus` are its own before it runs; once the launcher may no longer use one
    (a cpuset narrowed, a CPU offlined), the domain is refused with what to do, not run
    elsewhere."""
    mine = os.sched_getaffinity(0)
    if len(mine) < 2:
        pytest.skip("needs two CPUs")
    a, b = sorted(mine)[:2]
    out = tmp_path / "cpus"

    def domain(cpus: set[int]) -> sv.Domain:
        return sv.Domain("drv", "driver", False, "L", lambda: sv.Launch(
            [sys.executable, "-c", AFFINE, str(out)]), cpus=frozenset(cpus))

    async def scenario() -> None:
        supervisor = sv.Supervisor(on_fatal=lambda why: pytest.fail(why))
        await supervisor.start(domain({b}))
        assert out.read_text() == f"[{b}]"
        assert supervisor.status()[0]["cpus"] == [b]
        await supervisor.stop([])
        out.unlink()
        os.sched_setaffinity(0, {a})  # the launcher's own CPUs narrowed
        try:
            with pytest.raises(sv.StartError) as info:
                await supervisor.start(domain({b}))
        finally:
            os.sched_setaffinity(0, mine)
        assert str(info.value) == (f"driver domain 'drv' is placed on CPUs [{b}] (config `cpus`),"
                                   f" but trustvbd may now run only on [{a}]: bring the CPUs back"
                                   " online, or change `cpus` and restart trustvbd")
        assert not out.exists() and supervisor.domains["drv"].state == "failed"

    asyncio.run(scenario())
