"""A lying driver must not deny service to connect decisions.

Found with fio: one of 3 replicas dropping 30 % of its writes made the encryption domain
send an integrity event per failed read (hundreds a second) to the access-control domain,
which wrote each with two fsyncs and a signature; guests' connect decisions queued behind
them past the client's timeout (refused "acm-unreachable: timed out") and the audit log grew
by megabytes a minute. Now a replica's events go out coalesced (blocks/integrity.py,
EventWindows): the first at once, then one summary per window whose counts add up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.interop.clients import libnbd
from tests.interop.test_mirror_nbd import SIZE, Mirror, qemu_io
from tests.support import run
from trustvbd.blocks.integrity import WINDOW

pytestmark = pytest.mark.interop

FLOOD = 15  # seconds of fio


def test_a_flood_of_integrity_events_is_coalesced_and_guests_still_connect(
        short_tmp: Path) -> None:
    m = Mirror(short_tmp, 3)
    try:
        m.system.start()
        m.drivers[2].set("drop_writes", rate=0.3)
        part = SIZE // 4
        fio = subprocess.Popen(
            ["fio", "--name=t", "--ioengine=nbd", f"--uri={m.uri}", "--rw=randrw", "--bs=4k",
             "--iodepth=16", "--numjobs=3", f"--size={part}", f"--offset_increment={part}",
             "--serialize_overlap=1", f"--runtime={FLOOD}", "--time_based", "--verify=crc32c",
             "--verify_state_save=0", "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        connects: list[subprocess.CompletedProcess[str]] = []
        stop = threading.Event()

        def connect_now_and_then() -> None:  # guests arriving during the flood
            while not stop.wait(1.0):
                connects.append(run(["nbdinfo", "--size", m.uri], check=False, timeout=60))

        guests = threading.Thread(target=connect_now_and_then, daemon=True)
        guests.start()
        out, err = fio.communicate(timeout=FLOOD + 120)
        stop.set()
        guests.join(70)
        assert fio.returncode == 0, err[-3000:]
        job = json.loads(out[out.index("{"):])["jobs"]
        assert all(j["error"] == 0 for j in job)
        assert connects and all(c.returncode == 0 for c in connects), [
            c.stderr for c in connects if c.returncode]
        status = json.loads(m.system.cli("status", "-c", str(m.system.config), "--json").stdout)
        seen = next(d for d in status["disks"] if d["name"] == "payroll")["integrity_events"]
        assert seen > 100, f"only {seen} integrity events: the driver did not lie enough"
        m.system.stop()  # the windows still counting are written as summaries
        out = m.system.cli("audit", "-c", str(m.system.config), "--json").stdout
        records = [json.loads(line)["fields"] for line in out.splitlines()
                   if json.loads(line)["kind"] == "integrity"]
        # Every event is in the trail, counted: the first of each stream alone, the rest in
        # summaries with their blocks.
        assert sum(r.get("events", 1) for r in records) == seen
        streams = {(r["replica"], r["what"]) for r in records}
        assert all(r["replica"] == "h2" for r in records), streams
        windows = FLOOD // WINDOW + 3  # the first, one per window, the last at stop
        assert len(records) <= windows * len(streams), (len(records), streams)
        summaries = [r for r in records if "events" in r]
        assert summaries and all(r["blocks"] for r in summaries)
        assert m.system.cli("audit", "-c", str(m.system.config), "--verify").returncode == 0
    finally:
        m.close()


def test_an_integrity_record_the_access_control_domain_does_not_take_is_said_in_the_log(
        short_tmp: Path) -> None:
    """The access-control domain does not answer (stopped) while a driver lies: the guest is
    served from the other replica, and the record that timed out is not dropped silently
    (before: no word anywhere that the audit log may lack it)."""
    m = Mirror(short_tmp, 2)
    m.system.env["TRUSTVBD_ACM_TIMEOUT"] = "1"
    nbd = libnbd()
    try:
        m.system.start()
        qemu_io(m.uri, "write -P 0x5a 0 1M", "flush")
        guest = nbd.NBD()
        guest.connect_uri(m.uri)  # decided now, while the access-control domain answers
        status = json.loads(m.system.cli("status", "-c", str(m.system.config), "--json").stdout)
        acm = next(d["pid"] for d in status["domains"] if d["kind"] == "acm")
        m.drivers[0].set("flip", rate=1.0)
        os.kill(acm, signal.SIGSTOP)
        try:
            for i in range(64):
                assert guest.pread(4096, i * 4096) == b"\x5a" * 4096
            time.sleep(2)  # the record's request times out (1 s)
        finally:
            os.kill(acm, signal.SIGCONT)
        guest.shutdown()
        err = m.system.stop()
        assert "may be missing from the audit log: access-control domain unreachable" in err, \
            err[-3000:]
    finally:
        m.close()


def test_integrity_log_lines_are_coalesced_as_the_audit_records_are(short_tmp: Path) -> None:
    """A liar's integrity events went to the audit log coalesced (one record at once, then one
    summary per window) but to the domain's log one line each, and again in the summary:
    64 lies made 65 lines. Now the log says what the audit log says, line for record."""
    m = Mirror(short_tmp, 2)
    nbd = libnbd()
    try:
        m.system.start()
        qemu_io(m.uri, "write -P 0x5a 0 1M", "flush")
        m.drivers[0].set("flip", rate=1.0)
        guest = nbd.NBD()
        guest.connect_uri(m.uri)
        for i in range(64):  # reads in turn: about half reach the liar, each an event
            assert guest.pread(4096, i * 4096) == b"\x5a" * 4096
        guest.shutdown()
        status = json.loads(m.system.cli("status", "-c", str(m.system.config), "--json").stdout)
        seen = status["disks"][0]["integrity_events"]
        assert seen >= 16, f"only {seen} integrity events: the driver did not lie enough"
        err = m.system.stop()  # the window still counting is said at stop
        lines = [line for line in err.splitlines() if line.startswith("[crypt] ERROR integrity: ")]
        out = m.system.cli("audit", "-c", str(m.system.config), "--json").stdout
        records = [json.loads(line)["fields"] for line in out.splitlines()
                   if json.loads(line)["kind"] == "integrity"]
        assert sum(r.get("events", 1) for r in records) == seen
        assert len(lines) == len(records) < seen, (len(lines), len(records), seen)
        assert [r["message"] for r in records] == [
            line.removeprefix("[crypt] ERROR integrity: ") for line in lines]
    finally:
        m.close()
