"""`trustvbd verify`, `disk pubkey`, `disk rekey` and passphrases at `up`, with real processes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.test_crypt_e2e import flip, read_ok, write_pattern
from tests.support import TRUSTVBD, System, disk, payroll_config, read_lines_until, run, wait_for_path
from trustvbd.blocks.crypt_layer import Layout
from trustvbd.crypt.keys import KEK_FILE, KEK_PASSPHRASE, read_public

pytestmark = pytest.mark.interop
MIB = 1 << 20
SIZE = 8 * MIB
WRONG_PASSPHRASE_LINE = ("trustvbd up: wrong passphrase for disk 'payroll': nothing was changed;"
                         " start again with the right one")


def only_up_line(stderr: str) -> str:
    """`up`'s own message (domains' log lines aside): exactly one line."""
    lines = [line for line in stderr.splitlines() if line.startswith("trustvbd up:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "integrity" not in stderr.lower(), stderr
    return lines[0]


@pytest.fixture(autouse=True)
def _no_passphrase_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRUSTVBD_PASSPHRASE", raising=False)
    monkeypatch.delenv("TRUSTVBD_NEW_PASSPHRASE", raising=False)


def config(*more: str) -> str:
    return payroll_config(SIZE, *more)


OTHER_DISK = disk("other", "O", ["drv-a"], size=SIZE)


def backing(root: Path, disk: str = "payroll") -> Path:
    return root / "backing" / "a" / f"{disk}.img"


def keys_file(root: Path, disk: str = "payroll") -> Path:
    return root / "state" / "disks" / disk / "keys"


def kek_kind(root: Path) -> int:
    return read_public(keys_file(root).read_bytes(), "test")[2]


def tv(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    return run([*TRUSTVBD, *args], check=False, env={**os.environ, **(env or {})}, **kw)  # type: ignore[arg-type]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def up_once(s: System, env: dict[str, str] | None = None,
            stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """`up` expected to fail at start: its exit status and output."""
    s.config.write_text(s.config_text)
    return tv("up", "-c", str(s.config), env=env, stdin=stdin, timeout=60)


@pytest.fixture
def written(short_tmp: Path) -> System:
    """payroll (key file) with MiB 0..1 written, and `other` never written; up stopped."""
    s = System(short_tmp, config(OTHER_DISK)).start()
    write_pattern(s.uri("vm1", "payroll"), 0, MIB, 0x11)
    write_pattern(s.uri("vm1", "payroll"), MIB, MIB, 0x12)
    s.stop()
    return s


# -- verify ----------------------------------------------------------------------------
def test_verify_ok_on_a_replica_written_through_up(written: System) -> None:
    root = written.root
    pub = root / "payroll.pub"
    assert tv("disk", "pubkey", "-c", str(written.config), "payroll", "-o", str(pub)).returncode == 0
    before = digest(backing(root))
    out = tv("verify", "--public-key", str(pub), "--replica", str(backing(root)))
    assert out.returncode == 0, out.stderr
    assert "replica verification: OK" in out.stdout
    assert "NOT checked: AEAD tags" in out.stdout and "NOT checked: freshness" in out.stdout
    assert "512 written blocks" in out.stdout
    # The raw disk.pub from the state directory works too, and --json says the same.
    raw = root / "state" / "disks" / "payroll" / "disk.pub"
    out = tv("verify", "--public-key", str(raw), "--replica", str(backing(root)), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True and report["problems"] == [] and report["bad_blocks"] == []
    assert report["written_blocks"] == 512 and report["logical_size"] == SIZE
    assert report["epoch"] >= 1 and report["replica"] == str(backing(root))
    assert any("signature valid" in c for c in report["checked"])
    assert len(report["not_checked"]) == 2
    assert digest(backing(root)) == before  # verification never writes


def test_verify_over_nbd_uri_from_qemu_nbd(written: System) -> None:
    root = written.root
    sock, pidfile = root / "q.sock", root / "q.pid"
    run(["qemu-nbd", "-r", "-f", "raw", "-k", str(sock), "-e", "8", "-t", "--fork",
         "--pid-file", str(pidfile), str(backing(root))])
    wait_for_path(pidfile)
    pid = int(pidfile.read_text())
    try:
        pub = tv("disk", "pubkey", "-c", str(written.config), "payroll").stdout
        (root / "p.pub").write_text(pub)
        out = tv("verify", "--public-key", str(root / "p.pub"), "--replica",
                 f"nbd+unix:///?socket={sock}", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["written_blocks"] == 512
        flip(backing(root), Layout.for_size(SIZE).leaf_offset(300) + 9)  # a tag byte
        out = tv("verify", "--public-key", str(root / "p.pub"), "--replica",
                 f"nbd+unix:///?socket={sock}")
        assert out.returncode == 1
        assert "bad leaf pages: 2" in out.stdout
    finally:
        os.kill(pid, signal.SIGTERM)
    # Nobody listening: an I/O error (2) with a message, not a traceback.
    deadline = time.monotonic() + 10
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    out = tv("verify", "--public-key", str(root / "p.pub"), "--replica", f"nbd+unix:///?socket={sock}")
    assert out.returncode == 2
    assert "cannot open replica" in out.stderr and "Traceback" not in out.stderr


def test_verify_names_the_bad_page_after_a_leaf_table_byte_flips(written: System) -> None:
    root = written.root
    lay = Layout.for_size(SIZE)
    block = MIB // 4096 + 7  # written, in leaf page 2
    flip(backing(root), lay.leaf_offset(block) + 3)
    pub = root / "state" / "disks" / "payroll" / "disk.pub"
    out = tv("verify", "--public-key", str(pub), "--replica", str(backing(root)), "--json")
    assert out.returncode == 1
    report = json.loads(out.stdout)
    page = block // 128
    assert report["ok"] is False and report["bad_pages"] == [page]
    covered = set(lay.leaf_page_blocks(block))
    assert block in report["bad_blocks"] and set(report["bad_blocks"]) <= covered
    assert set(report["bad_blocks"]) >= covered  # the whole page is suspect, nothing else
    out = tv("verify", "--public-key", str(pub), "--replica", str(backing(root)))
    assert out.returncode == 1
    assert "replica verification: FAILED" in out.stdout
    assert f"bad leaf pages: {page}" in out.stdout
    assert f"bad blocks (128): {page * 128}-{page * 128 + 127}" in out.stdout


def test_verify_with_another_disks_key_fails(written: System) -> None:
    root = written.root
    other = tv("disk", "pubkey", "-c", str(written.config), "other").stdout
    mine = tv("disk", "pubkey", "-c", str(written.config), "payroll").stdout
    assert other.split()[1] != mine.split()[1]
    (root / "other.pub").write_text(other)
    out = tv("verify", "--public-key", str(root / "other.pub"), "--replica", str(backing(root)))
    assert out.returncode == 1
    assert "no superblock signed by this key" in out.stdout
    # Not a key at all, or no such replica: usage/IO errors, exit 2.
    (root / "junk.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO1 me@host\n")
    out = tv("verify", "--public-key", str(root / "junk.pub"), "--replica", str(backing(root)))
    assert out.returncode == 2 and "is not a trustvbd public key" in out.stderr
    out = tv("verify", "--public-key", str(root / "other.pub"), "--replica", str(root / "missing.img"))
    assert out.returncode == 2 and "missing.img" in out.stderr and "Traceback" not in out.stderr


def test_pubkey_round_trips_into_verify_and_works_while_up_runs(written: System) -> None:
    root = written.root
    written.start()
    try:
        out = tv("disk", "pubkey", "-c", str(written.config), "payroll")
        assert out.returncode == 0, out.stderr
    finally:
        written.stop()
    line = out.stdout.strip()
    word, b64, comment = line.split()
    assert (word, comment) == ("trustvbd-ed25519", "payroll")
    import base64

    assert base64.b64decode(b64) == (root / "state" / "disks" / "payroll" / "disk.pub").read_bytes()
    # Straight from `disk pubkey` into `verify` on standard input.
    out = tv("verify", "--public-key", "-", "--replica", str(backing(root)), input=out.stdout)
    assert out.returncode == 0, out.stderr + out.stdout
    # Unknown disk (2), a configured disk never started (1), a plain disk (1): clear messages.
    out = tv("disk", "pubkey", "-c", str(written.config), "nope")
    assert out.returncode == 2 and "no disk 'nope'" in out.stderr and "payroll" in out.stderr
    text = config(OTHER_DISK, disk("fresh", "O", ["drv-a"], size=4096),
                  disk("plain", "O", ["drv-a"], size=4096, encrypt=False))
    written.config.write_text(text)
    out = tv("disk", "pubkey", "-c", str(written.config), "fresh")
    assert out.returncode == 1 and "never started" in out.stderr and "trustvbd up -c" in out.stderr
    out = tv("disk", "pubkey", "-c", str(written.config), "plain")
    assert out.returncode == 1 and "not encrypted" in out.stderr


# -- rekey and passphrases -------------------------------------------------------------
def test_rekey_key_file_to_passphrase_then_up_reads_the_data(written: System) -> None:
    root = written.root
    cfg = str(written.config)
    pub_before = tv("disk", "pubkey", "-c", cfg, "payroll").stdout
    replica_before = digest(backing(root))
    assert kek_kind(root) == KEK_FILE
    out = tv("disk", "rekey", "-c", cfg, "payroll", "--to-passphrase", stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and "TRUSTVBD_NEW_PASSPHRASE" in out.stderr
    out = tv("disk", "rekey", "-c", cfg, "payroll", "--to-passphrase",
             env={"TRUSTVBD_NEW_PASSPHRASE": "correct horse"})
    assert out.returncode == 0, out.stderr
    assert "rewrapped under the new passphrase" in out.stdout
    assert kek_kind(root) == KEK_PASSPHRASE
    assert digest(backing(root)) == replica_before  # no data rewritten
    assert tv("disk", "pubkey", "-c", cfg, "payroll").stdout == pub_before

    # No passphrase and no terminal: one clear line, nothing started.
    out = up_once(written)
    assert out.returncode == 1
    assert only_up_line(out.stderr) == (
        "trustvbd up: disk 'payroll' is protected by a passphrase: set TRUSTVBD_PASSPHRASE,"
        " or start `trustvbd up` from a terminal to be asked for it")
    assert "[crypt]" not in out.stderr and "[driver]" not in out.stderr  # nothing was started

    written.env = {"TRUSTVBD_PASSPHRASE": "correct horse"}
    written.start()  # the lock of the refused start was released
    uri = written.uri("vm1", "payroll")
    assert read_ok(uri, 0, MIB, 0x11) and read_ok(uri, MIB, MIB, 0x12)
    written.stop()

    # And back to the key file: `up` needs no passphrase again.
    out = tv("disk", "rekey", "-c", cfg, "payroll", "--to-key-file",
             env={"TRUSTVBD_PASSPHRASE": "correct horse"})
    assert out.returncode == 0, out.stderr
    assert kek_kind(root) == KEK_FILE
    written.env = {}
    written.start()
    assert read_ok(written.uri("vm1", "payroll"), 0, MIB, 0x11)
    written.stop()


def test_wrong_passphrase_is_one_clear_error_at_up_and_rekey(short_tmp: Path) -> None:
    s = System(short_tmp, config())
    s.env = {"TRUSTVBD_PASSPHRASE": "right one"}
    s.start()  # first start with a passphrase: the new disk is protected by it
    write_pattern(s.uri("vm1", "payroll"), 0, MIB, 0x21)
    s.stop()
    assert kek_kind(short_tmp) == KEK_PASSPHRASE
    replica_before, keys_before = digest(backing(short_tmp)), keys_file(short_tmp).read_bytes()

    out = up_once(s, env={"TRUSTVBD_PASSPHRASE": "wrong one"})
    assert out.returncode == 1
    assert only_up_line(out.stderr) == WRONG_PASSPHRASE_LINE
    assert digest(backing(short_tmp)) == replica_before  # no replica was touched

    out = tv("disk", "rekey", "-c", str(s.config), "payroll", "--to-passphrase",
             env={"TRUSTVBD_PASSPHRASE": "wrong one", "TRUSTVBD_NEW_PASSPHRASE": "new"})
    assert out.returncode == 1
    assert out.stderr.strip() == "trustvbd disk rekey: wrong passphrase for disk 'payroll'; nothing was changed"
    out = tv("disk", "rekey", "-c", str(s.config), "payroll", "--to-key-file", stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and "TRUSTVBD_PASSPHRASE" in out.stderr
    assert keys_file(short_tmp).read_bytes() == keys_before

    s.start()
    assert read_ok(s.uri("vm1", "payroll"), 0, MIB, 0x21)
    s.stop()


def test_rekey_is_refused_while_up_runs(written: System) -> None:
    keys_before = keys_file(written.root).read_bytes()
    written.start()
    try:
        out = tv("disk", "rekey", "-c", str(written.config), "payroll", "--to-passphrase",
                 env={"TRUSTVBD_NEW_PASSPHRASE": "x"})
        assert out.returncode == 1
        assert "trustvbd up is running on state directory" in out.stderr and "stop it first" in out.stderr
        assert keys_file(written.root).read_bytes() == keys_before
        assert read_ok(written.uri("vm1", "payroll"), 0, MIB, 0x11)  # undisturbed
    finally:
        written.stop()
    out = tv("disk", "rekey", "-c", str(written.config), "payroll", "--to-passphrase",
             env={"TRUSTVBD_NEW_PASSPHRASE": "x"})
    assert out.returncode == 0, out.stderr


# -- prompts on a real terminal ----------------------------------------------------------
class Terminal:
    """A process whose controlling terminal is a pty we type into (getpass reads /dev/tty)."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()

        def become_session_leader_on_tty() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, preexec_fn=become_session_leader_on_tty)
        os.close(slave)
        self.screen = b""

    def expect(self, text: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} on the terminal; saw {self.screen!r}")
            if select.select([self.master], [], [], min(left, 0.2))[0]:
                try:
                    self.screen += os.read(self.master, 4096)
                except OSError:  # EIO: the terminal's last user is gone
                    raise AssertionError(f"no {text!r} on the terminal before the process"
                                         f" ended; saw {self.screen!r}") from None

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        with contextlib.suppress(OSError):
            while select.select([self.master], [], [], 0.1)[0]:
                self.screen += os.read(self.master, 4096)
        return self.proc.returncode, out, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)
        os.close(self.master)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    made: list[Terminal] = []
    yield made
    for t in made:
        t.close()


def test_passphrases_are_asked_on_a_terminal(written: System, terminals: list[Terminal]) -> None:
    cfg = str(written.config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTVBD_")}
    keys_before = keys_file(written.root).read_bytes()

    t = Terminal([*TRUSTVBD, "disk", "rekey", "-c", cfg, "payroll", "--to-passphrase"], env)
    terminals.append(t)
    t.expect(b"New passphrase for disk payroll: ")
    t.type("tty secret")
    t.expect(b"(again): ")
    t.type("tty secrte")
    code, _, err = t.finish()
    assert code == 1 and "the two passphrases differ; nothing was changed" in err
    assert keys_file(written.root).read_bytes() == keys_before

    t = Terminal([*TRUSTVBD, "disk", "rekey", "-c", cfg, "payroll", "--to-passphrase"], env)
    terminals.append(t)
    t.expect(b"New passphrase for disk payroll: ")
    t.type("tty secret")
    t.expect(b"(again): ")
    t.type("tty secret")
    code, _, err = t.finish()
    assert code == 0, err
    assert b"tty secret" not in t.screen  # not echoed
    assert kek_kind(written.root) == KEK_PASSPHRASE

    # `up` from a terminal asks once, then serves the disk.
    t = Terminal([*TRUSTVBD, "up", "-c", cfg], env)
    terminals.append(t)
    t.expect(b"Passphrase for disk payroll: ")
    t.type("tty secret")
    lines = read_lines_until(t.proc, "ready", 60)
    uri = next(line.split()[-1] for line in lines if line.startswith("guest vm1 disk payroll nbd+unix"))
    assert read_ok(uri, MIB, MIB, 0x12)
    assert b"tty secret" not in t.screen
    t.proc.send_signal(signal.SIGTERM)
    code, _, _ = t.finish()
    assert code == 0

    # A wrong answer at the prompt: the same one clear line.
    t = Terminal([*TRUSTVBD, "up", "-c", cfg], env)
    terminals.append(t)
    t.expect(b"Passphrase for disk payroll: ")
    t.type("not it")
    code, _, err = t.finish()
    assert code == 1 and only_up_line(err) == WRONG_PASSPHRASE_LINE
