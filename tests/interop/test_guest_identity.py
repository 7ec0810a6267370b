"""Guest identity end to end: TLS ports, a TLS remote driver, Unix sockets that belong to a
user, and a state directory that belongs to no one else. Real clients, real `trustvbd up`."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.hostile_net import LatencyLink, flooding
from tests.nbd.helpers import Activated, Peer
from tests.support import TRUSTVBD, System, config, disk, driver, guest, run
from trustvbd.acm.audit import AuditLog

pytestmark = pytest.mark.interop

NOBODY = 65534
STRANGER = 4242  # a uid with no account: a user who is not the guest's owner
MIB = 1 << 20


def nbd_env() -> dict[str, str]:
    return {**os.environ, "LIBNBD_DEBUG": "1"}


def as_uid(uid: int, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a real client as another user (the tests run as root)."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=60, env=nbd_env())


def refusals(state: Path) -> list[dict[str, object]]:
    records = AuditLog.read(state / "audit.jsonl")
    return [r["fields"] for r in records
            if r["kind"] == "event" and r["fields"].get("event") == "guest-refused"]


@pytest.fixture(scope="module")
def tls_system() -> Iterator[System]:
    root = Path(tempfile.mkdtemp(prefix="tvi", dir="/tmp"))
    os.chmod(root, 0o711)  # the guest user `nobody` must reach its socket below
    run([*TRUSTVBD, "tls", "init", str(root / "pki")])
    for name in ("vm1", "vm2"):
        run([*TRUSTVBD, "tls", "guest", str(root / "pki"), name])
    image = root / "remote.img"
    image.write_bytes(bytes(8 * MIB))
    remote = Activated(["nbdkit", "-f", "--tls=require", f"--tls-certificates={root / 'pki'}",
                        "--tls-verify-peer", "file", str(image)])
    (root / "q.img").write_bytes(bytes(8 * MIB))
    qemu = Peer.qemu_nbd(root / "q.img", root, "--object",
                         f"tls-creds-x509,id=t0,dir={root / 'pki'},endpoint=server,verify-peer=on",
                         "--tls-creds", "t0")
    text = config(
        driver("drv-a", "A", dir="backing/a"),
        driver("remote", "A", uri=f"nbds://127.0.0.1:{remote.port}/"),
        driver("qemu", "A", uri=f"nbds+unix:///?socket={qemu.sock}"),
        disk("d1", "A", ["drv-a"]), disk("far", "A", ["remote"]), disk("near", "A", ["qemu"]),
        guest("vm1", "A", listen="127.0.0.1:0"),
        guest("vm2", "A", listen="127.0.0.1:0", tls_name="vm2"),
        guest("vm3", "A", user="nobody"),
        guest("vm4", "A", listen="127.0.0.1:0", tls=False),
        head='[tls]\ndir = "pki"\n')
    system = System(root, text)
    try:
        system.start()
        yield system
    finally:
        system.kill()
        remote.stop()
        qemu.stop()
        shutil.rmtree(root, ignore_errors=True)


def tcp_uri(system: System, guest: str, disk: str) -> str:
    for line in system.lines:
        m = re.match(rf"guest {guest} disk {disk} (nbds?://\S+)$", line)
        if m:
            return m.group(1)
    raise AssertionError(f"no TCP line for {guest}/{disk} in {system.lines}")


def test_up_prints_nbds_for_tls_ports_and_nbd_for_the_opt_out(tls_system: System) -> None:
    assert tcp_uri(tls_system, "vm1", "d1").startswith("nbds://127.0.0.1:")
    assert tcp_uri(tls_system, "vm4", "d1").startswith("nbd://127.0.0.1:")


def test_a_guest_with_its_certificate_reads_and_writes(tls_system: System) -> None:
    certs = tls_system.root / "pki" / "guests" / "vm1"
    uri = tcp_uri(tls_system, "vm1", "d1") + f"?tls-certificates={certs}"
    out = run(["nbdinfo", "--size", uri])
    assert out.stdout.strip() == str(4 * MIB)
    src, back = tls_system.root / "src.img", tls_system.root / "back.img"
    src.write_bytes(os.urandom(4 * MIB))
    run(["nbdcopy", str(src), uri])
    run(["nbdcopy", uri, str(back)])
    assert back.read_bytes() == src.read_bytes()


def test_another_guests_certificate_is_refused_and_audited(tls_system: System) -> None:
    certs = tls_system.root / "pki" / "guests" / "vm2"
    uri = tcp_uri(tls_system, "vm1", "d1") + f"?tls-certificates={certs}"
    out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60,
                         env=nbd_env())
    assert out.returncode != 0
    assert "the client certificate is for 'vm2', but this port serves guest 'vm1'" in out.stderr
    deadline = time.monotonic() + 10
    while not any("'vm2'" in str(r.get("reason")) for r in refusals(tls_system.root / "state")):
        assert time.monotonic() < deadline, "the refusal never reached the audit log"
        time.sleep(0.1)


def test_plaintext_on_the_tls_port_is_refused(tls_system: System) -> None:
    uri = tcp_uri(tls_system, "vm1", "d1").replace("nbds://", "nbd://")
    out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60,
                         env=nbd_env())
    assert out.returncode != 0 and "this port requires TLS" in out.stderr


def test_a_disk_on_a_tls_remote_driver_nbdkit_verify_peer(tls_system: System) -> None:
    uri = tls_system.uri("vm1", "far")
    out = run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x3c 0 64k", "-c", "flush",
               "-c", "read -P 0x3c 0 64k"])
    assert "read 65536/65536" in out.stdout
    # The driver holds ciphertext only.
    assert b"\x3c" * 4096 not in (tls_system.root / "remote.img").read_bytes()


def test_a_disk_on_a_qemu_nbd_tls_creds_driver_over_nbds_unix(tls_system: System) -> None:
    out = run(["qemu-io", "-f", "raw", tls_system.uri("vm1", "near"), "-c",
               "write -P 0x4d 8192 64k", "-c", "flush", "-c", "read -P 0x4d 8192 64k"])
    assert "read 65536/65536" in out.stdout
    assert b"\x4d" * 4096 not in (tls_system.root / "q.img").read_bytes()


def test_qemu_io_with_a_tls_creds_object_on_a_guest_port(tls_system: System) -> None:
    certs = tls_system.root / "pki" / "guests" / "vm1"
    port = tcp_uri(tls_system, "vm1", "d1").rsplit(":", 1)[1].split("/")[0]
    out = run(["qemu-io", "--object", f"tls-creds-x509,id=t0,dir={certs},endpoint=client",
               "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=d1,tls-creds=t0",
               "-c", "write -P 0x61 0 64k", "-c", "read -P 0x61 0 64k"])
    assert "read 65536/65536" in out.stdout


def test_the_tls_opt_out_serves_plaintext(tls_system: System) -> None:
    uri = tcp_uri(tls_system, "vm4", "d1")
    assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(4 * MIB)


def small(**vm1: object) -> str:
    """One unencrypted disk and guest vm1 (with `vm1`'s fields)."""
    return config(driver("drv-a", "A", dir="backing/a"),
                  disk("d1", "A", ["drv-a"], encrypt=False), guest("vm1", "A", **vm1))


def test_the_tls_opt_out_warns_at_every_start(short_tmp: Path) -> None:
    system = System(short_tmp, small(listen="127.0.0.1:0", tls=False))
    for _ in range(2):
        system.start()
        err = system.stop()
        assert "guest vm1's TCP port 127.0.0.1:0 has NO TLS (tls = false)" in err, err


@pytest.mark.parametrize("where", ["state", "parent"])
def test_up_refuses_a_state_directory_others_can_write(short_tmp: Path, where: str) -> None:
    base = short_tmp / "shared"
    (base / "state").mkdir(parents=True)
    unsafe = base / "state" if where == "state" else base
    os.chmod(unsafe, 0o777)
    path = base / "trustvbd.toml"
    path.write_text(small())
    out = run([*TRUSTVBD, "up", "-c", str(path)], check=False, timeout=60)
    assert out.returncode == 1
    assert f"{unsafe} is writable by others (mode 777)" in out.stderr, out.stderr
    assert ("chmod 700" if where == "state" else "chmod go-w") in out.stderr
    assert not (base / "state" / "acm.sock").exists()  # nothing started


def test_unix_socket_of_a_user_guest(tls_system: System) -> None:
    sock = tls_system.root / "state" / "guests" / "vm3.sock"
    st = sock.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o600)
    uri = tls_system.uri("vm3", "d1")
    mine = as_uid(NOBODY, ["nbdinfo", "--size", uri])
    assert mine.returncode == 0 and mine.stdout.strip() == str(4 * MIB), mine.stderr[-1500:]
    assert run(["nbdinfo", "--size", uri]).returncode == 0  # root may, as the operator
    # Another user cannot even open the socket ...
    other = as_uid(STRANGER, ["nbdinfo", "--size", uri])
    assert other.returncode != 0 and "Permission denied" in other.stderr
    # ... and if an operator's mistake opened it up, its credentials still keep it out.
    os.chmod(sock, 0o666)
    try:
        other = as_uid(STRANGER, ["nbdinfo", "--size", uri])
    finally:
        os.chmod(sock, 0o600)
    assert other.returncode != 0
    assert f"uid {STRANGER} may not use guest 'vm3'" in other.stderr, other.stderr[-1500:]
    deadline = time.monotonic() + 10
    while not any(f"uid {STRANGER}" in str(r.get("reason"))
                  for r in refusals(tls_system.root / "state")):
        assert time.monotonic() < deadline, "the refusal never reached the audit log"
        time.sleep(0.1)


def test_state_directory_is_private(tls_system: System) -> None:
    state = tls_system.root / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o711  # vm3's user traverses, lists nothing
    assert stat.S_IMODE((state / "guests").stat().st_mode) == 0o711
    # As root, the encryption domains' shared group passes through disks/ and tls/ (g+x only).
    trusted = {state / "disks", state / "tls"} if os.geteuid() == 0 else set()
    for root, dirs, files in os.walk(state):
        for name in dirs:
            path = Path(root) / name
            if path != state / "guests":
                expected = 0o710 if path in trusted else 0o700
                assert stat.S_IMODE(path.stat().st_mode) == expected, path
        for name in files:
            path = Path(root) / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue  # the running system replaced it (a `.tmp` renamed over its file)
            if not stat.S_ISSOCK(st.st_mode):
                assert stat.S_IMODE(st.st_mode) & 0o077 == 0, path


def test_status_shows_what_each_guest_holds(tls_system: System) -> None:
    out = tls_system.cli("status", "-c", str(tls_system.config)).stdout
    line = next(x for x in out.splitlines() if x.strip().startswith("vm1 "))
    assert re.search(r"memory \d+\.\d MiB \(peak \d+\.\d\)$", line), out


def test_an_encryption_domain_gets_the_tls_files_it_needs_and_not_the_ca_key(
        tls_system: System) -> None:
    copies = [p.parent for p in (tls_system.root / "state").rglob("server-key.pem")]
    if os.geteuid() != 0:
        assert not copies  # unprivileged: the domains read the configured directory itself
        return
    assert copies, "no per-domain copy of the TLS files"
    for copy in copies:
        assert sorted(p.name for p in copy.iterdir()) == [
            "ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem",
            "server-key.pem"]


def test_status_names_the_certificate_of_a_tls_connection(tls_system: System) -> None:
    import json

    import nbd  # Debian's libnbd module (conftest adds its path)

    certs = tls_system.root / "pki" / "guests" / "vm1"
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(tcp_uri(tls_system, "vm1", "d1") + f"?tls-certificates={certs}")
    try:
        status = json.loads(tls_system.cli("status", "-c", str(tls_system.config), "--json").stdout)
    finally:
        h.shutdown()
    vm1 = next(g for g in status["guests"] if g["name"] == "vm1")
    assert [c["certificate"] for c in vm1["connections"]] == ["vm1"], vm1


def test_strangers_stalled_in_the_handshake_cannot_lock_a_guest_out(tls_system: System) -> None:
    """A guest's TCP port can be reached by anyone on the network, certificate or not. Each
    connection that says nothing held one of the guest's `connections` (64) for the whole
    `handshake_timeout` (30 s): 64 idle sockets, opened again every 30 s, kept the guest out
    for good. A connection that has not finished its handshake now gives way to a newer one
    when the limit is reached: the guest with its certificate gets in."""
    import socket as sock_mod

    uri = tcp_uri(tls_system, "vm1", "d1")
    port = int(uri.split(":")[2].split("/")[0])
    stalled = []
    try:
        for _ in range(80):
            s = sock_mod.create_connection(("127.0.0.1", port), timeout=10)
            stalled.append(s)
        time.sleep(0.5)
        certs = tls_system.root / "pki" / "guests" / "vm1"
        out = subprocess.run(["nbdinfo", "--size", uri + f"?tls-certificates={certs}"],
                             capture_output=True, text=True, timeout=60, env=nbd_env())
        assert out.returncode == 0, out.stderr[-1500:]
        assert out.stdout.strip() == str(4 * MIB)
    finally:
        for s in stalled:
            s.close()



def test_strangers_stalled_on_a_plaintext_port_cannot_lock_its_guest_out(
        tls_system: System) -> None:
    """The same on a port without TLS (the guest's own `tls = false`): its connections counted
    as proven from the start, so 64 silent ones from anywhere held every slot until their
    `handshake_timeout` (30 s) and the guest was refused ("already 64 connections"). Now one
    still in its NBD handshake gives way, from the address holding the most such."""
    import socket as sock_mod

    uri = tcp_uri(tls_system, "vm4", "d1")
    port = int(uri.split(":")[2].split("/")[0])
    stalled = []
    try:
        for _ in range(80):
            s = sock_mod.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", port))
            stalled.append(s)
        time.sleep(0.5)
        out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                             timeout=60, env=nbd_env())
        assert out.returncode == 0, out.stderr[-1500:]
        assert out.stdout.strip() == str(4 * MIB)
    finally:
        for s in stalled:
            s.close()


@pytest.mark.parametrize(("mode", "source", "delay"),
                         [("silent", "127.0.0.1", 0.005), ("starttls", "127.0.0.2", 0.1)])
def test_a_far_guest_gets_in_through_a_flood_of_new_connections(
        tls_system: System, mode: str, source: str, delay: float) -> None:
    """Strangers giving way to newer connections (above) let a flood of new connections push
    a guest out in the middle of its TLS handshake, once enough of them came in during it: a
    guest 100 ms away (its handshake ~1 s) was cut off at ~130 new connections a second
    ("The TLS connection was non-properly terminated"). It gets in now through a flood of
    connections that began TLS (and stall) from another address, or of silent connections
    from its own address once it began TLS. (Before that, one round trip after it connected,
    it is one of them: 64 silent connections from its own address within that round trip still
    push it out; with 100 ms round trips they did here, now and then. 10 ms here.)"""
    uri = tcp_uri(tls_system, "vm1", "d1")
    port = int(uri.split(":")[2].split("/")[0])
    certs = tls_system.root / "pki" / "guests" / "vm1"
    link = LatencyLink(port, delay)
    far = uri.replace(f":{port}/", f":{link.port}/") + f"?tls-certificates={certs}"
    try:
        with flooding(port, mode, source):
            time.sleep(0.5)
            for _ in range(4):
                out = subprocess.run(["nbdinfo", "--size", far], capture_output=True, text=True,
                                     timeout=60, env=nbd_env())
                assert out.returncode == 0, out.stderr[-1500:]
                assert out.stdout.strip() == str(4 * MIB)
    finally:
        link.close()
