"""The sandbox, unlock and placement modules on their own (the walls themselves: interop/test_privsep.py)."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.acm.util import example
from trustvbd.config_file import load_config
from trustvbd.domains import sandbox
from trustvbd.domains.placement import guest_sockets, types_of, workload_type
from trustvbd.domains.unlock import Unlock, UnlockError, decode, receive_unlock, send_unlock


def test_dynamic_uid_is_fixed_unused_and_in_range(tmp_path):
    a = sandbox.dynamic_uid(str(tmp_path), "driver", "drv-a")
    assert a == sandbox.dynamic_uid(str(tmp_path), "driver", "drv-a")  # the same on every start
    assert sandbox.DYNAMIC_FIRST <= a <= sandbox.DYNAMIC_LAST
    assert a != sandbox.dynamic_uid(str(tmp_path), "driver", "drv-b")
    assert a != sandbox.dynamic_uid(str(tmp_path / "other"), "driver", "drv-a")
    assert sandbox.dynamic_uid(str(tmp_path), "driver", "drv-a", taken={a}) != a
    with pytest.raises(KeyError):
        pwd.getpwuid(a)  # no account has it


def test_named_user_refuses_root_and_unknown_names():
    with pytest.raises(sandbox.SandboxError, match="is root or in group root"):
        sandbox.named_user("root", "c.toml: driver 'x'")
    with pytest.raises(sandbox.SandboxError, match="user 'no-such-user-here' does not exist"):
        sandbox.named_user("no-such-user-here", "c.toml: driver 'x'")
    nobody = pwd.getpwnam("nobody")
    assert sandbox.named_user("nobody", "x") == (nobody.pw_uid, nobody.pw_gid)


def test_clean_environment_keeps_no_secret(monkeypatch):
    monkeypatch.setenv("TRUSTVBD_PASSPHRASE", "secret")
    monkeypatch.setenv("TRUSTVBD_NEW_PASSPHRASE", "secret2")
    monkeypatch.setenv("TRUSTVBD_LOG_LEVEL", "DEBUG")
    assert sandbox.clean_environment() == {"PATH": sandbox.CLEAN_PATH, "LC_ALL": "C.UTF-8"}
    kept = sandbox.without_secrets()
    assert "TRUSTVBD_PASSPHRASE" not in kept and "TRUSTVBD_NEW_PASSPHRASE" not in kept
    assert kept["TRUSTVBD_LOG_LEVEL"] == "DEBUG"


def test_closed_on_the_way(tmp_path):
    closed = tmp_path / "closed"
    (closed / "inner" / "deep").mkdir(parents=True)
    (closed / "other").mkdir()
    closed.chmod(0o700)
    tmp_path.chmod(0o755)
    found = dict(sandbox.closed_on_the_way([str(closed / "inner" / "deep")]))
    assert found[str(closed)] == ("inner",)  # only the entry on the way, not "other"
    assert str(closed / "inner") not in found
    closed.chmod(0o711)
    assert str(closed) not in dict(sandbox.closed_on_the_way([str(closed / "inner" / "deep")]))


def _mounted_at(pid: int | str, path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path(f"/proc/{pid}/mounts").read_text().splitlines())


@pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces and mounts need root")
def test_a_domain_namespace_lets_the_host_unmount_its_filesystems(tmp_path):
    """A domain with its own mount namespace (_expose) took a copy of every mount of the
    host. Private, that copy held each filesystem for as long as the domain ran: a FUSE
    daemon (fuse2fs, nbdfuse over a trustvbd disk) never exited after `fusermount -u`.
    Now the host's unmount reaches the domain's copy; the domain's own mounts still stay
    out of the host's view."""
    closed = tmp_path / "closed"
    (closed / "inner").mkdir(parents=True)
    closed.chmod(0o700)
    # A shared mount, as systemd makes every mount of a host (this test's machine may not).
    shared = tmp_path / "shared"
    held = shared / "held"
    held.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True)
    subprocess.run(["mount", "--make-shared", str(shared)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(held)], check=True)
    identity = sandbox.Identity(None, None, expose=((str(closed), ("inner",)),))
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE, preexec_fn=sandbox.preexec(identity))
    try:
        assert os.readlink(f"/proc/{child.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert _mounted_at(child.pid, held) and _mounted_at(child.pid, closed)
        assert not _mounted_at("self", closed)  # the domain's tmpfs stays its own
        subprocess.run(["umount", str(held)], check=True)
        # Propagated within umount itself: nothing to wait for.
        assert not _mounted_at(child.pid, held), "the domain still holds the host's unmounted filesystem"
        assert _mounted_at(child.pid, closed)
    finally:
        child.communicate(b"")
        for path in (held, shared):
            subprocess.run(["umount", str(path)], check=False, capture_output=True)


def test_no_new_privs_in_a_child():
    code = ("from trustvbd.domains import sandbox; sandbox.no_new_privs();"
            "print(open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_own_tree_gives_a_directory_to_one_user_and_refuses_links(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    (d / "keys").write_bytes(b"k")
    (d / "keys").chmod(0o644)
    sandbox.own_tree(str(d), 2080000000, 2080000000)
    for path in (d, d / "keys"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (2080000000, 2080000000)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "keys").stat().st_mode) == 0o600
    (d / "evil").symlink_to("/etc/shadow")
    with pytest.raises(sandbox.SandboxError, match="is a symbolic link"):
        sandbox.own_tree(str(d), 2080000000, 2080000000)
    assert Path("/etc/shadow").stat().st_uid == 0  # the link was not followed


def test_unlock_round_trip_and_zeroing():
    u = Unlock(bytearray(b"pass phrase"), bytearray(range(32)))
    fd = send_unlock(u)
    got = receive_unlock(fd)
    assert got.passphrase == b"pass phrase" and got.key_file == bytes(range(32))
    held = got.passphrase
    got.forget()
    assert held == bytes(11) and got.passphrase is None and got.key_file is None
    assert "pass phrase" not in repr(u)
    assert decode(b"").passphrase is None


@pytest.mark.parametrize("data, message", [
    (b"\x01\x00", "inside a record header"),
    (b"\x01\x00\x05abc", "inside a record"),
    (b"\x09\x00\x01a", "unknown or repeated tag 9"),
    (b"\x01\x00\x01a\x01\x00\x01b", "unknown or repeated tag 1"),
])
def test_unlock_refuses_malformed_input(data, message):
    with pytest.raises(UnlockError, match=message):
        decode(data)


CONFIG = """\
state_dir = "s"
[[driver]]
name = "d"
label = "StorageA"
dir = "b"
[[disk]]
name = "payroll"
size = "1MiB"
label = "PayrollData"
replicas = ["d"]
[[disk]]
name = "payroll2"
size = "1MiB"
label = "PayrollData"
replicas = ["d"]
[[disk]]
name = "bank"
size = "1MiB"
label = "BankData"
replicas = ["d"]
[[guest]]
name = "vm1"
label = "Payroll"
"""


def test_one_encryption_domain_per_workload_type(tmp_path):
    (tmp_path / "c.toml").write_text(CONFIG)
    config = load_config(tmp_path / "c.toml")
    policy = example()
    assert workload_type(policy, "PayrollData") == "Payroll"
    assert types_of(config, policy) == {"Payroll": ["payroll", "payroll2"], "Bank": ["bank"]}
    assert types_of(config, None) == {"PayrollData": ["payroll", "payroll2"], "BankData": ["bank"]}
    one, two = guest_sockets(config, "vm1", ["Payroll", "Bank"], ["Payroll", "Bank"])
    assert (one.path, one.wtype, one.primary) == (config.guest_socket("vm1"), "Payroll", True)
    assert two.path.name == "vm1@Bank.sock" and two.wtype == "Bank" and not two.primary
    (lonely,) = guest_sockets(config, "vm1", [], ["Payroll", "Bank"])  # may use nothing
    assert lonely.path == config.guest_socket("vm1")


def test_an_encryption_domain_gets_channels_only_for_its_own_type(tmp_path):
    import asyncio

    from trustvbd.domains.hv import Launcher

    (tmp_path / "c.toml").write_text(CONFIG)
    launcher = Launcher(load_config(tmp_path / "c.toml"), "SystemManagement", example())

    async def ask() -> str:
        with pytest.raises(PermissionError) as info:
            await launcher.open_channel("bank", "d", "Payroll")  # refused before any check or connect
        return str(info.value)

    assert asyncio.run(ask()) == ("disk 'bank' is not of workload type 'Payroll': this encryption"
                                  " domain holds no keys for it")


def test_a_secret_erased_from_the_environment_is_gone_from_proc_environ() -> None:
    """/proc/PID/environ shows the environment a process started with; after the erase the
    secret is in neither it nor os.environ, and the other variables are untouched."""
    script = ("import os; from trustvbd.domains.unlock import erase_from_environment as e\n"
              "e('TRUSTVBD_PASSPHRASE'); e('NOT_SET_AT_ALL')\n"
              "raw = open('/proc/self/environ', 'rb').read()\n"
              "print(b'correct horse' in raw, 'TRUSTVBD_PASSPHRASE' in os.environ,"
              " b'KEEP_ME=yes' in raw, os.environ['KEEP_ME'])\n")
    env = {**os.environ, "TRUSTVBD_PASSPHRASE": "correct horse battery staple", "KEEP_ME": "yes"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False", "True", "yes"], out.stderr
