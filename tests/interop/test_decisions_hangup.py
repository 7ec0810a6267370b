"""#9.1 end to end: guests hanging up while their NBD_OPT_GO is decided make no decision slip.

Guests of an allowed label send NBD_OPT_GO and hang up at once, in a loop, while
the encryption domain is still asking the access-control domain; a real libnbd
client of a guest whose label shares no STE type with the disk keeps trying to
open it and must be refused every time. The hanging-up guest leaves the server's
greeting unread, so its close is a reset the server sees at once and the
decision is cancelled mid-flight (libnbd itself reads everything before closing,
so the server would finish the decision first). Afterwards the hung-up attempts
have left no Chinese Wall count behind: a guest of a conflicting type may attach
its own disk.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from tests.interop import clients
from tests.interop.test_policy_e2e import start, uri

pytestmark = pytest.mark.interop

ROUNDS = 60
IHAVEOPT, OPT_GO, FIXED_NEWSTYLE_NO_ZEROES = 0x49484156454F5054, 7, 3


def go_and_hang_up(sock_path: Path, export: bytes) -> None:
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(10)
    c.connect(str(sock_path))
    c.recv(18, socket.MSG_PEEK)  # the greeting is there; left unread, so close() resets
    data = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
    c.sendall(struct.pack(">IQII", FIXED_NEWSTYLE_NO_ZEROES, IHAVEOPT, OPT_GO, len(data)) + data)
    c.close()


def test_hangups_mid_go_never_let_a_forbidden_guest_in(short_tmp: Path) -> None:
    s = start(short_tmp)
    nbd = clients.libnbd()
    vm1_sock = short_tmp / "state" / "guests" / "vm1.sock"
    admitted: list[str] = []
    for i in range(ROUNDS):
        for _ in range(1 + i % 3):  # one to three answers left in flight each round
            go_and_hang_up(vm1_sock, b"payroll")
        h = nbd.NBD()
        try:
            h.connect_uri(uri(s, "vm2", "payroll"))
            admitted.append(f"round {i}: size {h.get_size()}, read {len(h.pread(4096, 0))} bytes")
            h.shutdown()
        except nbd.Error as exc:
            assert "policy" in str(exc), exc
        finally:
            del h
    assert admitted == [], f"a guest sharing no type with the disk got it: {admitted}"
    # Bank conflicts with Payroll: vm2 may open its own disk only once no Payroll
    # attachment is left over from the hung-up attempts.
    deadline = time.monotonic() + 10
    while True:
        h = nbd.NBD()
        try:
            h.connect_uri(uri(s, "vm2", "bank"))
            h.shutdown()
            break
        except nbd.Error as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"a Payroll attachment was left behind: {exc}") from None
            time.sleep(0.1)
        finally:
            del h
    h = nbd.NBD()  # and the allowed guest still gets its disk
    h.connect_uri(uri(s, "vm1", "payroll"))
    assert h.get_size() == 4 << 20
    h.shutdown()
    del h
    s.stop()
