"""Guest sockets follow `policy load`: a guest that may now use another workload type's disks
gets its socket for them at once, loses it when it may no longer, also when a policy moves a
disk to another workload type (the disk stays where its keys are). Real `trustvbd up`, real
libnbd guests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.interop import clients
from tests.support import System

pytestmark = pytest.mark.interop

CONFIG = """
state_dir = "state"
policy = "policy.toml"
[[driver]]
name = "drv-a"
label = "StorageA"
dir = "backing"
[[disk]]
name = "payroll"
size = "4MiB"
label = "PayrollData"
replicas = ["drv-a"]
[[disk]]
name = "bank"
size = "4MiB"
label = "BankData"
replicas = ["drv-a"]
[[guest]]
name = "vm1"
label = "Payroll"
"""


def policy(vm1_types: str, bank_type: str = "Bank") -> str:
    return f"""
name = "sockets"
bootstrap = "SystemManagement"
[ste]
types = ["SystemManagement", "Payroll", "Bank"]
[labels.vm]
SystemManagement = {{ ste = ["SystemManagement", "Payroll", "Bank"] }}
Payroll = {{ ste = [{vm1_types}] }}
StorageA = {{ ste = ["Payroll", "Bank"] }}
[labels.resource]
PayrollData = "Payroll"
BankData = "{bank_type}"
"""


def sockets(s: System) -> dict[str, str]:
    data = json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)
    (vm1,) = [g for g in data["guests"] if g["name"] == "vm1"]
    return dict(vm1["sockets"])


def load(s: System, text: str, name: str) -> tuple[int, str]:
    path = s.root / name
    path.write_text(text)
    out = s.cli("policy", "load", "-c", str(s.config), str(path), check=False)
    return out.returncode, out.stdout + out.stderr


def test_guest_sockets_follow_a_policy_load(short_tmp: Path) -> None:
    (short_tmp / "backing").mkdir()
    (short_tmp / "policy.toml").write_text(policy('"Payroll"'))
    s = System(short_tmp, CONFIG).start()
    nbd = clients.libnbd()
    further = short_tmp / "state" / "guests" / "vm1@Bank.sock"
    assert sockets(s) == {"Payroll": str(short_tmp / "state" / "guests" / "vm1.sock")}
    assert not further.exists()

    # vm1 may now use Bank's disks too: its socket for them is there at once, and serves.
    code, out = load(s, policy('"Payroll", "Bank"'), "wider.toml")
    assert code == 0, out
    assert sockets(s)["Bank"] == str(further) and further.exists()
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///bank?socket={further}")
    h.pwrite(b"b" * 4096, 0)
    h.flush()
    assert h.pread(4096, 0) == b"b" * 4096

    # And no longer: the connection is closed, the socket gone.
    code, out = load(s, policy('"Payroll"'), "narrow.toml")
    assert code == 0 and "1 connection(s)" in out, out
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    assert not further.exists() and "Bank" not in sockets(s)

    # A policy moving bank to workload type Payroll (so vm1 may use it again): the disk stays
    # in the encryption domain holding its keys, the administrator is told so, and vm1's
    # socket to that domain comes back with the data.
    code, out = load(s, policy('"Payroll"', bank_type="Payroll"), "moves.toml")
    assert code == 0, out
    assert "note: disk 'bank' is now of workload type 'Payroll' (was 'Bank')" in out, out
    assert "stays in crypt-Bank" in out, out
    assert sockets(s)["Bank"] == str(further) and further.exists()
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///bank?socket={further}")
    assert h.pread(4096, 0) == b"b" * 4096
    h.shutdown()
    clients.qemu_io_patterns(s.uri("vm1", "payroll"))
    s.stop()
