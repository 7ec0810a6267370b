"""Floods of connections to a guest's TLS port from one address (#20, h6): full TLS handshakes
without a certificate, in a loop. Real `trustvbd up`, real clients."""

from __future__ import annotations

import re
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.support import TRUSTVBD, System, config, disk, driver, guest, run
from trustvbd.nbd.server import TLS_BURST, TLS_PER_SECOND

pytestmark = pytest.mark.interop

STARTTLS = struct.pack(">IQII", 1, 0x49484156454F5054, 5, 0)  # flags, IHAVEOPT, STARTTLS, len 0
MIB = 1 << 20


def tls_handshakes(port: int, source: str, seconds: float) -> tuple[int, int]:
    """Connect from `source`, STARTTLS, and run a TLS handshake with no certificate, again and
    again: (connections, handshakes the server took part in)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    connections = handshakes = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s = socket.socket()
        try:
            s.bind((source, 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            connections += 1
            s.recv(18)
            s.sendall(STARTTLS)
            reply = b""
            while len(reply) < 20:
                if not (chunk := s.recv(20 - len(reply))):
                    raise OSError("closed")
                reply += chunk
            context.wrap_socket(s, server_hostname="x")  # TLS 1.3: done before the server
            handshakes += 1                                # refuses the missing certificate
        except (OSError, ssl.SSLError):
            pass
        finally:
            s.close()
    return connections, handshakes


def test_a_tls_handshake_flood_from_one_address_is_rate_limited_and_logged_once(
        short_tmp: Path) -> None:
    """A loop of TLS handshakes without a certificate from one address cost the encryption
    domain ~2 ms of CPU each (here 280 a second from one process: 44% of a core, from every
    guest it serves) and one warning line each in its log. Now an address may begin 10 a
    second (a burst of 20) per port; more are closed at accept, and the refusals are said
    once per 10 s with their count. Guests, from that address's neighbours, still get in."""
    root = Path(tempfile.mkdtemp(prefix="tvf", dir=short_tmp))
    run([*TRUSTVBD, "tls", "init", str(root / "pki")])
    for name in ("vm1", "vm2"):
        run([*TRUSTVBD, "tls", "guest", str(root / "pki"), name])
    s = System(root, config(driver("drv-a", "A", dir="backing/a"), disk("d1", "A", ["drv-a"]),
                            guest("vm1", "A", listen="127.0.0.1:0"),
                            guest("vm2", "A", listen="127.0.0.1:0"),
                            head='[tls]\ndir = "pki"\n')).start()
    try:
        uris = dict(re.findall(r"guest (vm\d) disk d1 (nbds://\S+)$", "\n".join(s.lines), re.M))
        port = int(uris["vm1"].split(":")[2].split("/")[0])
        seconds = 4.0
        results: list[tuple[int, int]] = []
        flooders = [threading.Thread(target=lambda: results.append(
            tls_handshakes(port, "127.0.0.2", seconds))) for _ in range(2)]
        for t in flooders:
            t.start()
        try:
            time.sleep(0.5)
            for name in ("vm1", "vm2"):  # from 127.0.0.1, to the flooded port and beside it
                certs = root / "pki" / "guests" / name
                out = subprocess.run(["nbdinfo", "--size", f"{uris[name]}?tls-certificates={certs}"],
                                     capture_output=True, text=True, timeout=60)
                assert out.returncode == 0, out.stderr[-1500:]
                assert out.stdout.strip() == str(4 * MIB)
        finally:
            for t in flooders:
                t.join()
        connections = sum(c for c, _ in results)
        handshakes = sum(h for _, h in results)
        assert connections > 3 * (TLS_BURST + TLS_PER_SECOND * seconds), results  # a flood
        assert handshakes <= TLS_BURST + TLS_PER_SECOND * (seconds + 1), results
        err = s.stop()
        flood_lines = [line for line in err.splitlines() if "vm1" in line and "refus" in line]
        assert len(flood_lines) <= 8, flood_lines[:20]
        assert "more than 10 TLS handshakes a second from 127.0.0.2" in err, err[-3000:]
        assert "more in the last 10 s" in err, err[-3000:]
    finally:
        s.kill()
