"""Papercuts of the `trustvbd` command (issue #12, section 4), each as a user meets it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.support import TRUSTVBD
from trustvbd.acm.audit import AuditLog
from trustvbd.cli import build_parser

CONFIG = """
state_dir = "state"
[[driver]]
name = "d"
label = "S"
dir = "{dir}"
[[disk]]
name = "disk"
size = "16MiB"
label = "L"
replicas = ["d"]
[[guest]]
name = "g"
label = "G"
"""


def tvbd(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRUSTVBD, *args], capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload,no-any-return]


def test_every_option_of_every_subcommand_has_help_text() -> None:
    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction | argparse._VersionAction) and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "trustvbd")
    assert not missing


def test_driver_size_not_a_multiple_of_512_is_refused_at_once(short_tmp: Path) -> None:
    result = tvbd("driver", "--file", str(short_tmp / "x.img"), "--size", "1000",
                  "--socket", str(short_tmp / "x.sock"))
    assert result.returncode == 2
    assert "multiple of 512" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (short_tmp / "x.img").exists()


@pytest.mark.parametrize(("listen", "says"), [
    ("nonsense", "no :PORT"), ("127.0.0.1", "no :PORT"),
    ("127.0.0.1:99999", "above 65535"), ("127.0.0.1:http", "not a number"),
])
def test_driver_listen_address_that_cannot_be_bound_is_one_line(short_tmp: Path, listen: str,
                                                               says: str) -> None:
    result = tvbd("driver", "--file", str(short_tmp / "x.img"), "--size", "1MiB",
                  "--listen", listen)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "HOST:PORT" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr  # no traceback
    assert not (short_tmp / "x.img").exists()


def test_audit_with_a_broken_config_is_one_line(short_tmp: Path) -> None:
    (short_tmp / "bad.toml").write_text("[tls]\n")
    result = tvbd("audit", "-c", str(short_tmp / "bad.toml"))
    assert result.returncode == 2
    assert "state_dir" in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr


def test_status_json_when_up_is_stopped_prints_json_saying_so(short_tmp: Path) -> None:
    config = short_tmp / "c.toml"
    config.write_text(CONFIG.format(dir="backing"))
    result = tvbd("status", "-c", str(config), "--json")
    assert result.returncode == 3
    reply = json.loads(result.stdout)
    assert reply["running"] is False and "not running" in reply["error"]


def test_scrub_json_when_up_is_stopped_prints_json_saying_so(short_tmp: Path) -> None:
    """As status --json: a script reading stdout learns why (red team: stdout was empty)."""
    config = short_tmp / "c.toml"
    config.write_text(CONFIG.format(dir="backing"))
    result = tvbd("scrub", "-c", str(config), "disk", "--json")
    assert result.returncode == 3
    reply = json.loads(result.stdout)
    assert reply["disk"] == "disk" and "not running" in reply["error"]
    assert result.stderr.startswith("trustvbd scrub: not running") and len(result.stderr.splitlines()) == 1


def test_scrub_of_a_disk_the_config_does_not_have_says_so(short_tmp: Path) -> None:
    """Was "not running" with `up` stopped, and "no running encryption domain serves disk
    'nosuch'" with it running: now which disks the config has, at once, either way."""
    config = short_tmp / "c.toml"
    config.write_text(CONFIG.format(dir="backing"))
    for json_flag in ([], ["--json"]):
        result = tvbd("scrub", "-c", str(config), "nosuch", *json_flag)
        assert result.returncode == 1, result.stderr  # (2 says bad blocks were found)
        assert result.stderr == f"trustvbd scrub: no disk 'nosuch' in {config} (its disks: disk)\n"
        if json_flag:
            assert json.loads(result.stdout)["error"].startswith("no disk 'nosuch' in ")


def test_output_into_a_closed_pipe_ends_quietly(short_tmp: Path) -> None:
    log = AuditLog(short_tmp / "audit.jsonl")
    for i in range(50):
        log.append("decision", n=i)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line, as `| head` after its lines
    try:
        result = subprocess.run([*TRUSTVBD, "audit", "--log", str(short_tmp / "audit.jsonl")],
                                stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert result.stderr == "" and result.returncode == 141


def test_verify_a_file_that_is_not_a_replica_says_so(short_tmp: Path) -> None:
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    (short_tmp / "disk.pub").write_bytes(key)
    (short_tmp / "junk.img").write_bytes(os.urandom(64 * 1024))
    result = tvbd("verify", "--public-key", str(short_tmp / "disk.pub"),
                  "--replica", str(short_tmp / "junk.img"))
    assert result.returncode == 1
    assert "not a trustvbd replica" in result.stdout and "None" not in result.stdout


def test_verify_a_directory_says_it_is_one(short_tmp: Path) -> None:
    """Was "is not a regular file; for a block device, serve it read-only (qemu-nbd ...)"."""
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    (short_tmp / "disk.pub").write_bytes(key)
    result = tvbd("verify", "--public-key", str(short_tmp / "disk.pub"), "--replica", str(short_tmp))
    assert result.returncode == 2
    assert result.stderr == (f"trustvbd verify: replica {short_tmp} is a directory; give the"
                             " backing file in it (a driver's dir holds one DISK.img per disk)\n")


def test_state_dir_that_is_a_file_says_what_it_holds(short_tmp: Path) -> None:
    (short_tmp / "state").write_text("")
    config = short_tmp / "c.toml"
    config.write_text(CONFIG.format(dir="backing"))
    result = tvbd("up", "-c", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"trustvbd: config error: {config}: state_dir: {short_tmp / 'state'} is a file, not a"
        " directory; name a directory (it holds the trusted state: keys, anchors, sockets)"]


def test_missing_tls_dir_is_one_line_before_anything_starts(short_tmp: Path) -> None:
    # Unused by any guest or driver, it used to reach the encryption domain, which died with
    # a traceback ("the hypervisor sent no usable spec").
    config = short_tmp / "c.toml"
    config.write_text(CONFIG.format(dir="backing").replace(
        'state_dir = "state"\n', 'state_dir = "state"\n[tls]\ndir = "pki"\n'))
    result = tvbd("up", "-c", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"trustvbd: config error: {config}: tls.dir: {short_tmp / 'pki'} is not a directory; make"
        f" it with `trustvbd tls init {short_tmp / 'pki'}`, or remove [tls]"]
    assert not (short_tmp / "state").exists()


def test_backing_file_the_file_system_refuses_is_one_line(short_tmp: Path) -> None:
    # A file larger than the file system allows (ext4: 16 TiB, so a 16 TiB disk) made the
    # driver die with a traceback; here the file size limit (ulimit -f) refuses it the same way.
    import resource

    config = short_tmp / "c.toml"
    config.write_text(CONFIG.format(dir="backing"))

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    result = tvbd("up", "-c", str(config), preexec_fn=small_files)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    image = short_tmp / "backing" / "disk.img"
    assert (f"trustvbd up: cannot prepare driver domain 'd': disk disk: cannot make its backing"
            f" file {image} 16916480 bytes: File too large") in result.stderr.splitlines()[-1]


def test_an_empty_passphrase_variable_is_said_to_be_empty(short_tmp: Path) -> None:
    # It used to reach the encryption domain, which logged "an empty passphrase cannot
    # protect a disk", and `up` then said "wrong passphrase for disk 'disk'".
    config = short_tmp / "c.toml"
    config.write_text(CONFIG.format(dir="backing"))
    result = tvbd("up", "-c", str(config), env={**os.environ, "TRUSTVBD_PASSPHRASE": ""})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "trustvbd up: TRUSTVBD_PASSPHRASE is set but empty: set it to the disks' passphrase, or"
        " unset it (new disks then get the key file, and a disk that needs a passphrase is"
        " asked for on a terminal)")
    assert "[acm]" not in result.stderr and "[crypt]" not in result.stderr  # none started


def test_backing_dir_that_is_a_file_gets_one_clear_line(short_tmp: Path) -> None:
    (short_tmp / "backing").write_text("")
    config = short_tmp / "c.toml"
    config.write_text(CONFIG.format(dir="backing"))
    result = tvbd("up", "-c", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"trustvbd: config error: {config}: driver 'd'.dir: {short_tmp / 'backing'} is a file, not a"
        " directory; name a directory (it holds one sparse file per disk)"]


def test_unlock_reads_the_passphrase_from_the_environment_as_up_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`up` and `rekey` take TRUSTVBD_PASSPHRASE; `unlock` said "no passphrase given" with
    it set (red team). A --passphrase-file still comes first; an empty variable is none."""
    from trustvbd.cli import MAX_PASSPHRASE, read_passphrase

    monkeypatch.setenv("TRUSTVBD_PASSPHRASE", "from the environment")
    assert read_passphrase(None) == b"from the environment"
    (tmp_path / "p").write_bytes(b"from the file\nsecond line\n")
    assert read_passphrase(str(tmp_path / "p")) == b"from the file"
    monkeypatch.setenv("TRUSTVBD_PASSPHRASE", "x" * (MAX_PASSPHRASE + 1))
    with pytest.raises(ValueError, match="TRUSTVBD_PASSPHRASE is longer than"):
        read_passphrase(None)
    monkeypatch.setenv("TRUSTVBD_PASSPHRASE", "")
    with open(tmp_path / "p") as stdin:
        monkeypatch.setattr("sys.stdin", stdin)
        assert read_passphrase(None) == b"from the file"


@pytest.mark.parametrize("name", ["", "a b", "a/b", "host\nname", "host\n"])
def test_tls_init_refuses_a_server_name_that_is_no_host_name(short_tmp: Path, name: str) -> None:
    """An empty or malformed --name went into the server certificate's subjectAltName."""
    result = tvbd("tls", "init", str(short_tmp / "pki"), "--name", name)
    assert result.returncode == 2, result.stdout
    assert "neither a host name" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (short_tmp / "pki").exists()



@pytest.mark.parametrize("where", ["/proc/x", "/proc/self/status/pki", "/dev/null/pki"])
def test_tls_init_into_a_path_it_cannot_make_is_one_clear_line(where: str) -> None:
    """`tls init /proc/x` printed Python's raw "[Errno 2] No such file or directory:
    '/proc/x'": now one line naming the path, the reason and what to do."""
    result = tvbd("tls", "init", where)
    assert result.returncode == 1, result.stdout
    assert len(result.stderr.splitlines()) == 1, result.stderr
    line = result.stderr
    assert line.startswith(f"trustvbd tls init: cannot write certificates to {where}: ")
    assert "[Errno" not in line and "give a directory you may create or write" in line


def test_tls_guest_into_a_path_it_cannot_make_is_one_clear_line(short_tmp: Path) -> None:
    assert tvbd("tls", "init", str(short_tmp / "pki")).returncode == 0
    result = tvbd("tls", "guest", str(short_tmp / "pki"), "vm1", "--out", "/proc/x")
    assert result.returncode == 1, result.stdout
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("trustvbd tls guest: cannot write certificates to /proc/x")
    assert "[Errno" not in result.stderr


def test_tls_guest_with_a_fifo_for_the_ca_key_is_refused_at_once(short_tmp: Path) -> None:
    """`tls guest` read ca-key.pem with read_bytes(): a FIFO there held it in open() for good."""
    pki = short_tmp / "pki"
    assert tvbd("tls", "init", str(pki)).returncode == 0
    (pki / "ca-key.pem").unlink()
    os.mkfifo(pki / "ca-key.pem", 0o600)
    result = tvbd("tls", "guest", str(pki), "vm1")
    assert result.returncode == 1, result.stdout
    assert result.stderr.splitlines() == [
        f"trustvbd tls guest: {pki / 'ca-key.pem'} is not a regular file, so not the CA's PEM"
        " file; put it back (or make a new CA with `trustvbd tls init`)"]


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_up_with_a_fifo_or_directory_for_a_certificate_is_one_line(short_tmp: Path,
                                                                   kind: str) -> None:
    """OpenSSL opened a FIFO given as server-cert.pem and waited for a writer for good (`up`
    never started nor said why); a directory gave "[Errno 21] Is a directory"."""
    pki = short_tmp / "pki"
    assert tvbd("tls", "init", str(pki)).returncode == 0
    cert = pki / "server-cert.pem"
    cert.unlink()
    os.mkfifo(cert, 0o600) if kind == "fifo" else cert.mkdir()
    config = short_tmp / "c.toml"
    config.write_text(CONFIG.format(dir="backing").replace(
        'state_dir = "state"\n', 'state_dir = "state"\n[tls]\ndir = "pki"\n')
        + 'listen = "127.0.0.1:0"\n')
    result = tvbd("up", "-c", str(config))
    assert result.returncode == 1, result.stdout
    what = "not a regular file" if kind == "fifo" else "a directory"
    assert result.stderr.splitlines() == [
        f"trustvbd up: {cert} is {what}, not a PEM certificate or key; put the file there"
        " (`trustvbd tls init DIR` makes them)"]


def test_audit_of_a_device_or_pipe_is_refused_at_once(short_tmp: Path) -> None:
    """`audit --log /dev/zero` read one endless line into memory until killed (with --verify
    too, all of it at once; --follow as well): a log is a regular file, anything else is
    refused in one line."""
    fifo = short_tmp / "fifo"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        for extra in ([], ["--verify"], ["--follow"], ["--json"]):
            result = tvbd("audit", "--log", path, *extra)
            assert result.returncode == 2, (path, extra, result.stderr)
            assert result.stdout == ""
            assert result.stderr.startswith(f"trustvbd audit: {path}: not a regular file")
            assert len(result.stderr.splitlines()) == 1


def test_audit_says_when_lines_are_not_records(short_tmp: Path) -> None:
    """Records were printed and the exit status was 0 whatever followed them: a damaged
    line, or megabytes of garbage with no newline (which was read whole into memory)."""
    path = short_tmp / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        log.append("decision", n=i)
    log.close()
    clean = tvbd("audit", "--log", str(path), "--json")
    assert clean.returncode == 0 and clean.stderr == ""
    shown = clean.stdout.splitlines()
    assert [json.loads(r)["kind"] for r in shown] == ["decision"] * 3 + ["checkpoint"]
    with open(path, "ab") as f:
        f.write(b'{"seq": 5, "edited\n' + b"\0" * (8 << 20))  # a torn record, then no newline
    result = tvbd("audit", "--log", str(path), "--json")
    assert result.stdout.splitlines() == shown
    assert result.returncode == 1
    assert result.stderr == (f"trustvbd audit: {path}: 2 line(s) are not audit records (damaged,"
                             " cut or edited) and were not shown: `trustvbd audit --verify` says"
                             " where\n")


def test_audit_verify_reads_a_huge_log_in_bounded_memory(short_tmp: Path) -> None:
    """`audit --verify` read each log file whole into memory: a log grown to gigabytes (here
    1.25 GiB of zeros after a torn record, as a damaged disk or a filler leaves it) ended in a
    MemoryError traceback under a 1 GiB address-space limit. It reads a line at a time now,
    and says exactly what it says of the same damage in a small file."""
    import resource

    from trustvbd.acm.audit_read import verify

    path = short_tmp / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        log.append("decision", n=i)
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"seq": 5, "edited\n' + bytes(1 << 20))  # a torn record, then zeros
    small = verify(path)
    assert small[0] == f"{path}:6: last line is incomplete (torn write or cut)"
    assert f"{path}:5: not a valid audit record (edited or cut)" in small
    shown = tvbd("audit", "--log", str(path)).stdout
    os.truncate(path, path.stat().st_size + (5 << 28))  # 1.25 GiB, sparse: more than the limit

    def one_gib() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    result = tvbd("audit", "--verify", "--log", str(path), preexec_fn=one_gib)
    assert result.stderr == ""
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        *small, f"{path}: {len(small)} problem(s): the audit log was tampered with or damaged"]
    result = tvbd("audit", "--log", str(path), preexec_fn=one_gib)
    assert result.returncode == 1, result.stderr
    assert result.stdout == shown


def test_status_says_when_the_control_socket_takes_no_more_connections(short_tmp: Path) -> None:
    """A launcher whose control socket's backlog is full (stuck, or flooded by another local
    process) made `status` end in a BlockingIOError traceback; it says so in one line now."""
    import socket

    config = short_tmp / "c.toml"
    config.write_text(CONFIG.format(dir="backing"))
    (short_tmp / "state").mkdir()
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(short_tmp / "state" / "control.sock"))
    listening.listen(0)
    queued = []
    try:
        while True:  # fill its backlog: nobody accepts
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            queued.append(c)
            c.connect(str(short_tmp / "state" / "control.sock"))
    except BlockingIOError:
        pass
    try:
        result = tvbd("status", "-c", str(config))
    finally:
        for c in queued:
            c.close()
        listening.close()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "takes no more connections on" in result.stderr


def test_verify_refuses_a_public_key_that_is_a_fifo_or_a_device_at_once(short_tmp: Path) -> None:
    """`verify --public-key FIFO` waited in open() for good, `--public-key /dev/zero` read on
    until memory ran out: only a regular file is read, at most 64 KiB of it."""
    fifo = short_tmp / "fifo"
    os.mkfifo(fifo)
    big = short_tmp / "big.pub"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    replica = short_tmp / "r.img"
    replica.write_bytes(bytes(4096))
    for path, said in ((fifo, f"public key {fifo} is not a regular file; give the file `trustvbd"
                        " disk pubkey` wrote"),
                       ("/dev/zero", "public key /dev/zero is not a regular file; give the file"
                        " `trustvbd disk pubkey` wrote"),
                       (big, f"public key {big} is longer than 65536 bytes: no key file")):
        result = tvbd("verify", "--public-key", str(path), "--replica", str(replica))
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"trustvbd verify: {said}\n"
