"""A domain that confined itself (domains/confine.py) opens no path and makes no denied call,
yet its descriptors work and it can fork workers. Checked in a real child process, with a
positive control before confining (so a probe that cannot run fails instead of passing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trustvbd.domains.confine import DENIED_X86_64, _filter, landlock_abi

PROBE = r"""
import ctypes, json, os, socket, sys
from trustvbd.domains import confine, sandbox
state = sys.argv[1]
kept = os.open(os.path.join(state, "backing.img"), os.O_RDWR)  # as the launcher hands one over
listener = socket.socket(socket.AF_UNIX)
listener.bind(os.path.join(state, "l.sock"))
listener.listen(1)

def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return f"{type(exc).__name__}:{exc.errno}"

checks = {
    "read /etc/passwd": lambda: open("/etc/passwd", "rb").read(1),
    "read state file": lambda: open(os.path.join(state, "kek.key"), "rb").read(1),
    "list /": lambda: os.listdir("/"),
    "create file": lambda: open(os.path.join(state, "new"), "wb").close(),
    "tcp bind": lambda: socket.socket().bind(("127.0.0.1", 0)),
}
before = {k: attempt(f) for k, f in checks.items() if k != "create file"}
sandbox.no_new_privs()  # every domain has it: what Landlock and seccomp ask for
done, missing = confine.confine()
after = {k: attempt(f) for k, f in checks.items()}
after["exec"] = attempt(lambda: os.execv("/bin/true", ["true"]))
libc = ctypes.CDLL(None, use_errno=True)

def unshare_user():
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare")

after["unshare"] = attempt(unshare_user)
os.pwrite(kept, b"kept", 4096)
after["handed-over file"] = os.pread(kept, 4, 4096).decode()
client = socket.socket(socket.AF_UNIX)
client.connect(os.path.join(state, "l.sock"))  # (a path socket: Landlock does not cover it)
conn, _ = listener.accept()
client.sendall(b"hi")
after["handed-over socket"] = conn.recv(2).decode()
pid = os.fork()
if pid == 0:  # a worker forked after confining is confined too
    os._exit(0 if attempt(checks["read /etc/passwd"]).startswith("PermissionError") else 3)
after["worker"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps({"before": before, "after": after, "done": done, "missing": missing}))
"""


def test_a_confined_process_reaches_no_path_but_keeps_its_descriptors(short_tmp: Path) -> None:
    if landlock_abi() < 4:
        pytest.fail(f"this kernel's Landlock ABI is {landlock_abi()}; drivers here would run"
                    " unconfined (the test machines have ABI 4 or later)")
    (short_tmp / "kek.key").write_bytes(b"k" * 32)
    (short_tmp / "backing.img").write_bytes(bytes(8192))
    out = subprocess.run([sys.executable, "-c", PROBE, str(short_tmp)], capture_output=True,
                         text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert set(result["before"].values()) == {"ok"}, result["before"]
    after = result["after"]
    assert after.pop("handed-over file") == "kept"
    assert after.pop("handed-over socket") == "hi"
    assert after.pop("worker") == 0
    assert after.pop("exec") == "PermissionError:1"  # seccomp: EPERM
    assert after.pop("unshare") == "PermissionError:1"
    assert set(after.values()) == {"PermissionError:13"}, after  # Landlock: EACCES
    assert not (short_tmp / "new").exists()
    assert result["missing"] == [] and len(result["done"]) == 2, result


def test_the_seccomp_filter_jumps_land_on_allow_or_deny() -> None:
    """Run the BPF program by hand: every denied number is denied, others allowed, x32 denied,
    a foreign architecture killed (an off-by-one jump would let a call through)."""
    import struct

    prog = _filter(sorted(DENIED_X86_64.values()))
    ops = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]

    def run(arch: int, nr: int) -> int:
        pc, acc = 0, 0
        while True:
            code, jt, jf, k = ops[pc]
            if code == 0x20:
                acc = arch if k == 4 else nr
            elif code == 0x06:
                return k
            elif code in (0x15, 0x35):
                hit = acc == k if code == 0x15 else acc >= k
                pc += jt if hit else jf
            pc += 1

    deny, allow, kill = 0x00050000 | 1, 0x7FFF0000, 0x80000000
    for nr in DENIED_X86_64.values():
        assert run(0xC000003E, nr) == deny
    for nr in (0, 1, 2, 3, 9, 56, 57, 60, 231, 257, 262, 434):  # read, write, open, clone, ...
        assert run(0xC000003E, nr) == allow, nr
    assert run(0xC000003E, 0x40000000 + 59) == deny
    assert run(0x40000003, 59) == kill  # i386
