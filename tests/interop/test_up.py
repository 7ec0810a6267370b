"""`trustvbd up` end to end, with real NBD clients, processes and sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support
from tests.interop import clients
from tests.support import TRUSTVBD, System, kill_driver, pids_of_children, process_alive, run

MIB = 1 << 20
SIZE = 64 * MIB

pytestmark = pytest.mark.interop


def config_text(encrypt: bool = True, size: int = SIZE) -> str:
    return support.config(
        support.driver("drv-a", "StorageA", dir="backing/a"),
        support.disk("payroll", "PayrollData", ["drv-a"], size=size, encrypt=encrypt),
        support.disk("scratch", "Scratch", ["drv-a"], encrypt=encrypt),
        support.guest("vm1", "Payroll"), support.guest("vm2", "Other"))


MODES = ["plain", "encrypted"]


@pytest.fixture(scope="module", params=MODES)
def system(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="tvu", dir="/tmp"))
    s = System(root, config_text(encrypt=request.param == "encrypted"))
    s.start()
    yield s
    s.kill()
    shutil.rmtree(root, ignore_errors=True)


def test_up_prints_one_line_per_guest_and_disk(system: System) -> None:
    sock1 = system.root / "state" / "guests" / "vm1.sock"
    assert f"guest vm1 disk payroll nbd+unix:///payroll?socket={sock1}" in system.lines
    assert any(line.startswith("guest vm2 disk scratch ") for line in system.lines)
    assert system.lines[-1] == "ready"
    assert all(Path(line.split("socket=")[1]).is_absolute() for line in system.lines[:-1])


def test_byte_sized_and_long_requests(system: System) -> None:
    clients.byte_sized_and_long_requests(system.uri("vm1", "payroll"))


def test_qemu_io(system: System) -> None:
    clients.qemu_io_patterns(system.uri("vm1", "payroll"))


def test_qemu_img_convert_and_compare(system: System, short_tmp: Path) -> None:
    clients.qemu_img_roundtrip(system.uri("vm1", "payroll"), short_tmp, SIZE)


def test_nbdcopy_both_ways(system: System, short_tmp: Path) -> None:
    clients.nbdcopy_both_ways(system.uri("vm2", "payroll"), short_tmp, 16 * MIB)


def test_nbdinfo(system: System) -> None:
    export = clients.nbdinfo_facts(system.uri("vm1", "payroll"), SIZE)
    assert export["can_multi_conn"]  # one backend object shared by every connection
    # One encryption domain per workload type: each of the guest's sockets lists its own type's disks.
    for disk in ("payroll", "scratch"):
        listed = run(["nbdinfo", "--list", "--json", system.uri("vm1", disk)]).stdout
        exports = json.loads(listed)["exports"]
        assert [e["export-name"] for e in exports] == [disk]
        # The listing and the opened export describe the disk in the same words.
        opened = json.loads(run(["nbdinfo", "--json", system.uri("vm1", disk)]).stdout)["exports"][0]
        described = f"trustvbd disk {disk}, {opened['export-size']} bytes"
        assert exports[0]["description"] == opened["description"] == described
    assert system.uri("vm1", "scratch").endswith("/vm1@Scratch.sock")


def test_fio(system: System) -> None:
    clients.fio_short(system.uri("vm1", "scratch"))


def test_libnbd_requests(system: System) -> None:
    clients.libnbd_requests(system.uri("vm1", "payroll"))


def test_unknown_export_is_refused_with_message(system: System) -> None:
    uri = system.uri("vm1", "payroll").replace("/payroll?", "/nosuchdisk?")
    out = run(["nbdinfo", uri], check=False)
    assert out.returncode != 0
    assert "nosuchdisk" in out.stderr


def test_status_text_and_json(system: System) -> None:
    nbd = clients.libnbd()
    h = nbd.NBD()
    h.connect_uri(system.uri("vm1", "payroll"))
    try:
        text = system.cli("status", "-c", str(system.config)).stdout
        assert "drv-a" in text and "untrusted" in text and "payroll" in text
        data = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
        kinds = {d["name"]: d["kind"] for d in data["domains"]}
        # one encryption domain per workload type (the NULL policy: per disk label)
        assert kinds == {"hv": "hv", "acm": "acm", "store": "store", "drv-a": "driver",
                         "crypt-PayrollData": "crypt", "crypt-Scratch": "crypt"}
        assert {d["name"]: d["domain"] for d in data["disks"]} == {
            "payroll": "crypt-PayrollData", "scratch": "crypt-Scratch"}
        disks = {d["name"]: d for d in data["disks"]}
        assert disks["payroll"]["size"] == SIZE
        assert disks["payroll"]["replicas"][0]["name"] == "drv-a"
        # An encrypted disk's replicas are judged (current, ...); a plain disk has a link.
        want = "current" if disks["payroll"]["encrypt"] else "connected"
        assert disks["payroll"]["replicas"][0]["state"] == want
        vm1 = next(g for g in data["guests"] if g["name"] == "vm1")
        assert [c["export"] for c in vm1["connections"]] == ["payroll"]
    finally:
        h.shutdown()


@pytest.mark.parametrize("system", ["encrypted"], indirect=True)  # one mode: same domain
def test_status_of_a_stopped_encryption_domain_lists_its_disks_and_says_why(
        system: System) -> None:
    """An encryption domain that does not answer (SIGSTOPped here; hung or overloaded in
    life): its disks were left out of `status` as if the config had none, after 10 s per
    such domain. They are listed, saying which domain does not answer; the other domain's
    disks as ever; and once it runs again, its disks are back. The domains list called it
    "running": it says it is paused and how to resume it, and it is not asked (so
    `status` does not wait 10 s for it)."""
    data = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
    assert next(d for d in data["disks"] if d["name"] == "payroll")["encrypt"]
    pid = next(d["pid"] for d in data["domains"] if d["name"] == "crypt-PayrollData")
    os.kill(pid, signal.SIGSTOP)
    try:
        data = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
        text = system.cli("status", "-c", str(system.config)).stdout
    finally:
        os.kill(pid, signal.SIGCONT)
    paused = f"paused by a signal (SIGSTOP): answers nothing until `kill -CONT {pid}`"
    disks = {d["name"]: d for d in data["disks"]}
    assert set(disks) == {"payroll", "scratch"}, data["disks"]
    assert disks["payroll"]["state"] == (
        f"unknown: its encryption domain crypt-PayrollData is {paused}"), disks
    assert disks["payroll"]["domain"] == "crypt-PayrollData" and disks["payroll"]["size"] == SIZE
    assert disks["scratch"]["state"] == "serving", disks
    domains = {d["name"]: d["state"] for d in data["domains"]}
    assert domains["crypt-PayrollData"] == paused, domains
    assert all(state == "running" for name, state in domains.items()
               if name != "crypt-PayrollData"), domains
    line = next(x for x in text.splitlines() if x.strip().startswith("payroll"))
    assert f"unknown: its encryption domain crypt-PayrollData is {paused}" in line, text
    line = next(x for x in text.splitlines() if x.strip().startswith("crypt-PayrollData"))
    assert line.endswith(paused), text
    data = json.loads(system.cli("status", "-c", str(system.config), "--json").stdout)
    assert {d["name"]: d["state"] for d in data["disks"]} == {
        "payroll": "serving", "scratch": "serving"}, data["disks"]


def test_second_up_on_same_state_dir_is_refused(system: System) -> None:
    out = run([*TRUSTVBD, "up", "-c", str(system.config)], check=False, timeout=30)
    assert out.returncode == 1
    assert "already running" in out.stderr and str(system.root / "state") in out.stderr


# -- lifecycle: each test starts its own system -------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_data_survives_restart_and_stop_is_clean(short_tmp: Path, mode: str) -> None:
    s = System(short_tmp, config_text(encrypt=mode == "encrypted", size=8 * MIB)).start()
    assert s.proc is not None
    children = pids_of_children(s.proc.pid)
    assert len(children) >= 2
    uri = s.uri("vm1", "payroll")
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x42 4k 128k"])  # no explicit flush
    s.stop()
    for pid in children:
        assert not process_alive(pid), f"domain {pid} left behind"
    assert not (short_tmp / "state" / "guests" / "vm1.sock").exists()
    s.start()
    run(["qemu-io", "-f", "raw", s.uri("vm1", "payroll"), "-c", "read -P 0x42 4k 128k",
         "-c", "read -P 0 0 4k"])
    s.stop()


def test_a_driver_no_disk_uses_is_idle_not_fatal(short_tmp: Path) -> None:
    text = config_text(encrypt=False, size=4 * MIB) + (
        '[[driver]]\nname = "spare"\nlabel = "StorageA"\ndir = "backing/spare"\n')
    s = System(short_tmp, text).start()
    status = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    spare = next(d for d in status["domains"] if d["name"] == "spare")
    assert spare["state"] == "idle (no disk uses it)" and spare["pid"] is None
    assert "spare" in s.cli("status", "-c", str(s.config)).stdout
    err = s.stop()
    assert "driver spare is idle: no [[disk]] lists it in replicas" in err
    assert "usage:" not in err


def test_sigint_stops_cleanly(short_tmp: Path) -> None:
    s = System(short_tmp, config_text(encrypt=False, size=4 * MIB)).start()
    assert s.proc is not None
    s.proc.send_signal(signal.SIGINT)
    _, err = s.proc.communicate(timeout=60)
    assert s.proc.returncode == 0, err


def test_ctrl_c_to_the_whole_group_stops_quietly(short_tmp: Path) -> None:
    """A terminal's Ctrl-C reaches every process of the job, an encryption domain with AEAD threads too."""
    s = System(short_tmp, config_text(size=4 * MIB), env={"TRUSTVBD_AEAD_THREADS": "1"},
               own_group=True).start()
    assert s.proc is not None
    os.killpg(s.proc.pid, signal.SIGINT)
    _, err = s.proc.communicate(timeout=60)
    assert s.proc.returncode == 0, err
    assert "ERROR" not in err and "Traceback" not in err, err


def test_sigterm_to_the_whole_group_stops_in_order(short_tmp: Path) -> None:
    """`timeout`, `kill -TERM -PGID` and shells signal every process of the job. Each domain
    used to stop on its own, so the encryption domain's final commit found its driver gone
    and the access-control domain that would let it reconnect gone too ("final flush
    failed"); the launcher alone must get it, and stop them in order."""
    s = System(short_tmp, config_text(size=4 * MIB), own_group=True).start()
    assert s.proc is not None
    uri = s.uri("vm1", "payroll")
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 0 1M"])  # acknowledged, not flushed
    os.killpg(s.proc.pid, signal.SIGTERM)
    _, err = s.proc.communicate(timeout=60)
    assert s.proc.returncode == 0, err
    assert "ERROR" not in err and "closed the connection" not in err, err
    s.proc = None
    s.start()
    run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0x5a 0 1M"])
    s.stop()


def test_killed_launcher_leaves_no_domain_behind(short_tmp: Path) -> None:
    s = System(short_tmp, config_text(encrypt=False, size=4 * MIB)).start()
    assert s.proc is not None
    children = pids_of_children(s.proc.pid)
    s.proc.kill()
    s.proc.wait()
    deadline = time.monotonic() + 10
    while any(process_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(process_alive(p) for p in children)
    s.proc = None
    # And the state directory is usable again at once (the lock died with the launcher).
    s.start()
    s.stop()


def test_driver_crash_is_survived(short_tmp: Path) -> None:
    """The untrusted driver is restarted; the guest's next requests go through."""
    s = System(short_tmp, config_text(encrypt=False, size=4 * MIB)).start()
    uri = s.uri("vm1", "payroll")
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x33 0 64k", "-c", "flush"])
    status = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    driver_pid = next(d["pid"] for d in status["domains"] if d["name"] == "drv-a")
    kill_driver(driver_pid)
    time.sleep(0.5)
    run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0x33 0 64k", "-c", "write -P 0x34 64k 4k"])
    status = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    drv = next(d for d in status["domains"] if d["name"] == "drv-a")
    assert drv["restarts"] == 1 and drv["pid"] != driver_pid and drv["state"] == "running"
    s.stop()


def test_config_error_stops_up_before_anything_starts(short_tmp: Path) -> None:
    (short_tmp / "c.toml").write_text(config_text().replace('replicas = ["drv-a"]', 'replicas = ["nope"]', 1))
    out = run([*TRUSTVBD, "up", "-c", str(short_tmp / "c.toml")], check=False, timeout=30)
    assert out.returncode == 2
    assert "c.toml: disk[0].replicas: unknown driver 'nope'" in out.stderr
    assert not (short_tmp / "state").exists()
    assert not (short_tmp / "backing").exists()


def test_too_small_uri_driver_is_refused_at_start(short_tmp: Path) -> None:
    sock = short_tmp / "peer.sock"
    pid = short_tmp / "peer.pid"
    img = short_tmp / "small.img"
    img.write_bytes(bytes(1 * MIB))
    run(["nbdkit", "-U", str(sock), "-P", str(pid), "file", str(img)])
    try:
        text = config_text(encrypt=False, size=8 * MIB).replace(
            'dir = "backing/a"', f'uri = "nbd+unix:///?socket={sock}"')
        text = text.replace('replicas = ["drv-a"]', 'replicas = ["drv-b"]', 2).replace(
            'replicas = ["drv-b"]', 'replicas = ["drv-a"]', 1)
        text += '[[driver]]\nname = "drv-b"\nlabel = "S"\ndir = "b"\n'
        (short_tmp / "c.toml").write_text(text)
        out = run([*TRUSTVBD, "up", "-c", str(short_tmp / "c.toml")], check=False, timeout=60)
        assert out.returncode == 1
        assert "drv-a" in out.stderr and "smaller than disk 'payroll'" in out.stderr
    finally:
        os.kill(int(pid.read_text()), signal.SIGTERM)


def test_peer_nbd_server_as_driver(short_tmp: Path) -> None:
    """Any NBD server can be a driver: qemu-nbd here."""
    sock, pid, img = short_tmp / "q.sock", short_tmp / "q.pid", short_tmp / "q.img"
    img.write_bytes(b"")
    os.truncate(img, 16 * MIB)
    run(["qemu-nbd", "-f", "raw", "-k", str(sock), "-e", "8", "-t", "--fork", "--pid-file", str(pid), str(img)])
    try:
        text = f"""
state_dir = "state"
[[driver]]
name = "q"
label = "S"
uri = "nbd+unix:///?socket={sock}"
[[disk]]
name = "d"
size = "8MiB"
label = "L"
replicas = ["q"]
encrypt = false
[[guest]]
name = "g"
label = "G"
"""
        s = System(short_tmp, text).start()
        run(["qemu-io", "-f", "raw", s.uri("g", "d"), "-c", "write -P 0x77 0 1M", "-c", "flush"])
        s.stop()
        with open(img, "rb") as f:
            assert f.read(1 << 20) == b"\x77" * (1 << 20)
    finally:
        os.kill(int(pid.read_text()), signal.SIGTERM)


def test_tcp_listener(short_tmp: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = config_text(encrypt=False, size=4 * MIB).replace(
        'label = "Payroll"', f'label = "Payroll"\nlisten = "127.0.0.1:{port}"\ntls = false')
    s = System(short_tmp, text).start()
    assert f"guest vm1 disk payroll nbd://127.0.0.1:{port}/payroll" in s.lines
    run(["qemu-io", "-f", "raw", f"nbd://127.0.0.1:{port}/payroll", "-c", "write -P 1 0 4k",
         "-c", "read -P 1 0 4k"])
    s.stop()


def test_status_when_not_running(short_tmp: Path) -> None:
    (short_tmp / "c.toml").write_text(config_text())
    out = run([*TRUSTVBD, "status", "-c", str(short_tmp / "c.toml")], check=False)
    assert out.returncode == 3
    assert "not running" in out.stderr


def test_status_and_scrub_of_a_launcher_that_does_not_answer_say_so_in_one_line(
        short_tmp: Path) -> None:
    """A launcher that runs but does not answer (stopped here; stuck or overloaded in life):
    `status` and `scrub` printed a Python traceback (TimeoutError) after 30 s, and
    `status --json` no JSON. Now one line says `up` did not answer and what to do, and
    --json says so as JSON."""
    s = System(short_tmp, config_text()).start()
    assert s.proc is not None
    os.kill(s.proc.pid, signal.SIGSTOP)
    try:
        asks = {"status": ["status"], "json": ["status", "--json"],
                "scrub": ["scrub", "payroll", "--json"]}
        procs = {k: subprocess.Popen([*TRUSTVBD, *argv, "-c", str(s.config)], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for k, argv in asks.items()}
        outs = {k: p.communicate(timeout=120) for k, p in procs.items()}
    finally:
        os.kill(s.proc.pid, signal.SIGCONT)
    for k, (out, err) in outs.items():
        assert procs[k].returncode == 1, (k, out, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (k, err)
        # (stopped by a signal, it is said to be paused, at once: the test of that is
        # test_abuse_e2e.py's test_commands_say_at_once_that_the_launcher_is_paused)
        assert "is paused by a signal (SIGSTOP)" in err, (k, err)
    status = json.loads(outs["json"][0])
    assert status["running"] is True and status["answering"] is False, status
    assert "is paused by a signal" in json.loads(outs["scrub"][0])["error"]
    assert json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)["running"]
    s.stop()


def test_a_stalled_driver_times_out_without_stalling_other_disks(short_tmp: Path) -> None:
    """A driver is an adversary for liveness too: it may simply stop answering."""
    text = config_text(encrypt=True, size=4 * MIB).replace(
        'name = "scratch"\nsize = "4MiB"\nlabel = "Scratch"\nreplicas = ["drv-a"]',
        'name = "scratch"\nsize = "4MiB"\nlabel = "Scratch"\nreplicas = ["drv-b"]')
    text += '[[driver]]\nname = "drv-b"\nlabel = "StorageB"\ndir = "backing/b"\n'
    s = System(short_tmp, text)
    s.env = {"TRUSTVBD_REQUEST_TIMEOUT": "2"}
    s.start()
    run(["qemu-io", "-f", "raw", s.uri("vm1", "payroll"), "-c", "write -P 0x71 0 64k", "-c", "flush"])
    status = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    drv_a = next(d["pid"] for d in status["domains"] if d["name"] == "drv-a")
    stalled = [drv_a, *pids_of_children(drv_a)]
    for pid in stalled:
        os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        slow = run(["qemu-io", "-f", "raw", s.uri("vm1", "payroll"), "-c", "read -P 0x71 0 64k"],
                   check=False, timeout=60)
        waited = time.monotonic() - t0
        assert "Input/output error" in slow.stdout + slow.stderr
        assert waited < 15, f"a stalled driver held the guest for {waited:.1f} s"
        # The other driver's disk is served all along.
        run(["qemu-io", "-f", "raw", s.uri("vm1", "scratch"), "-c", "write -P 0x72 0 64k",
             "-c", "read -P 0x72 0 64k"], timeout=30)
    finally:
        for pid in stalled:
            os.kill(pid, signal.SIGCONT)
    # Once it answers again the trusted side reconnects, and the data is intact.
    run(["qemu-io", "-f", "raw", s.uri("vm1", "payroll"), "-c", "read -P 0x71 0 64k"], timeout=60)
    s.stop()


def test_status_with_the_store_stopped_answers_and_says_so(short_tmp: Path) -> None:
    """The store stopped (SIGSTOP; a stalled loop alike): `status` read each attachment's
    XenBus states from it, each read waiting 10 s, one after another, and the CLI gave up
    after 30 s with "did not answer" about the whole launcher. Now the store is not asked
    when it is paused, and never for more than 5 s in all: `status` answers, the store's
    line says why, the attachments are listed with unknown states."""
    s = System(short_tmp, config_text()).start()
    try:
        pids = {d["name"]: d["pid"]
                for d in json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)["domains"]}
        run(["qemu-io", "-f", "raw", s.uri("vm1", "payroll"), "-c", "read 0 4k"])
        os.kill(pids["store"], signal.SIGSTOP)
        try:
            started = time.monotonic()
            out = s.cli("status", "-c", str(s.config), "--json", check=False)
            took = time.monotonic() - started
            text = s.cli("status", "-c", str(s.config), check=False)
        finally:
            os.kill(pids["store"], signal.SIGCONT)
        assert out.returncode == 0, out.stderr
        assert took < 15, took
        st = json.loads(out.stdout)
        store = next(d for d in st["domains"] if d["name"] == "store")
        assert store["state"].startswith("paused"), store
        assert st["attachments"] and all(
            a["frontend_state"] == 0 and a["backend_state"] == 0 for a in st["attachments"])
        assert text.returncode == 0 and "0 Unknown" in text.stdout, text.stdout
        # Running again, it is asked again.
        st = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
        assert any(a["backend_state"] != 0 for a in st["attachments"]), st["attachments"]
        err = s.stop()
        assert "Traceback" not in err, err[-3000:]
    finally:
        s.kill()
