"""NBD over TLS: STARTTLS as the spec says, real clients and peers, and every refusal.

Server side: nbdinfo, nbdcopy, qemu-io and libnbd against our server with a guest's
certificate; plaintext, another guest's certificate, another CA's and an expired one
refused. Client side: our NbdClient against nbdkit --tls=require --tls-verify-peer and
qemu-nbd --tls-creds.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nbd.helpers import Activated, Peer, RawClient, ServerThread, wait_for
from trustvbd.blockdev import BlockError
from trustvbd.blocks.file import FileBackend
from trustvbd.crypt import x509
from trustvbd.crypt.tls import client_context, server_context
from trustvbd.nbd import protocol as p
from trustvbd.nbd.client import NbdClient
from trustvbd.nbd.server import Export, PeerInfo, StaticExports

MiB = 1024 * 1024
GUEST = "test-guest"  # the identity ServerThread gives its server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our CA (with certificates for GUEST and 'vm2'), a foreign CA, an expired certificate."""
    root = tmp_path_factory.mktemp("pki")
    ours = root / "pki"
    x509.init_ca(ours)
    x509.issue_guest(ours, GUEST)
    x509.issue_guest(ours, "vm2")
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    x509.issue_guest(ours, GUEST, out=root / "expired", days=1, not_before=long_ago)
    foreign = root / "foreign"
    x509.init_ca(foreign)
    # A client that trusts our server but shows a certificate another CA signed.
    (root / "foreign-client").mkdir()
    shutil.copy(ours / "ca-cert.pem", root / "foreign-client" / "ca-cert.pem")
    x509.issue_guest(foreign, GUEST, out=root / "foreign-client")
    return root


class Refusals(list[tuple[str, str]]):
    def __call__(self, peer: PeerInfo, reason: str) -> None:
        self.append((peer.identity, reason))


@pytest.fixture(params=["asyncio", "uvloop"])
def tls_server(short_tmp: Path, pki: Path, request: pytest.FixtureRequest
               ) -> Iterator[tuple[ServerThread, Refusals, Path]]:
    disk = short_tmp / "disk.img"
    backend = FileBackend(str(disk), 8 * MiB)
    refusals = Refusals()
    exports = StaticExports([Export("disk", backend)])
    with ServerThread(exports, None, request.param, tls=server_context(pki / "pki"),
                      on_refused=refusals) as srv:
        yield srv, refusals, disk
    asyncio.run(backend.close())


def nbds(srv: ServerThread, certs: Path, export: str = "disk") -> str:
    return f"nbds://127.0.0.1:{srv.port}/{export}?tls-certificates={certs}"


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload, no-any-return]


def test_tls_init_layout_and_modes(pki: Path) -> None:
    ours = pki / "pki"
    for name in ("ca-key.pem", "server-key.pem", "client-key.pem", f"guests/{GUEST}/client-key.pem"):
        assert (ours / name).stat().st_mode & 0o777 == 0o600, name
    assert ours.stat().st_mode & 0o777 == 0o700
    text = run(["openssl", "x509", "-in", str(ours / "server-cert.pem"), "-noout", "-ext",
                "subjectAltName"]).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text, text
    subject = run(["openssl", "x509", "-in", str(ours / "guests" / GUEST / "client-cert.pem"),
                   "-noout", "-subject"]).stdout
    assert f"CN = {GUEST}" in subject
    verify = run(["openssl", "verify", "-CAfile", str(ours / "ca-cert.pem"),
                  str(ours / "guests" / GUEST / "client-cert.pem")])
    assert verify.returncode == 0, verify.stderr
    with pytest.raises(x509.CertificateError, match="already"):
        x509.init_ca(ours)


@pytest.mark.parametrize(("name", "kind"), [("ca-cert.pem", "fifo"), ("client-key.pem", "device"),
                                          ("client-cert.pem", "directory")])
def test_a_certificate_or_key_that_is_no_regular_file_is_refused_at_once(
        tmp_path: Path, name: str, kind: str) -> None:
    """OpenSSL opened a FIFO in a certificate's place and waited for a writer for good (in
    `up`, or in an encryption domain's event loop), and read /dev/zero without end; a
    directory gave "[Errno 21] Is a directory". In a child with a timeout: the old hang."""
    import sys

    x509.init_ca(tmp_path / "pki")
    path = tmp_path / "pki" / name
    path.unlink()
    {"fifo": lambda: os.mkfifo(path, 0o600), "device": lambda: path.symlink_to("/dev/zero"),
     "directory": path.mkdir}[kind]()
    probe = ("import sys; from pathlib import Path\n"
             "from trustvbd.crypt.tls import TlsSetupError, client_context\n"
             f"try: client_context(Path({str(tmp_path / 'pki')!r}))\n"
             "except TlsSetupError as e: print(e)")
    out = run([sys.executable, "-c", probe])
    what = "a directory" if kind == "directory" else "not a regular file"
    assert out.stdout.splitlines() == [f"{path} is {what}, not a PEM certificate or key; put"
                                       " the file there (`trustvbd tls init DIR` makes them)"], out



_SWAP_AFTER_CHECK = """\
import os, ssl, sys
from pathlib import Path
from trustvbd.crypt import tls

pki = Path(sys.argv[1])
read = tls.read_regular

def read_then_swap(path, what, limit):  # the file checked, then a FIFO in its place
    data = read(path, what, limit)
    if Path(path).name in ("server-cert.pem", "server-key.pem"):
        os.unlink(path)
        os.mkfifo(path, 0o600)
    return data

tls.read_regular = read_then_swap
server = tls.server_context(pki)
tls.read_regular = read
client = tls.client_context(pki / "guests" / sys.argv[2])
a, b = ssl.MemoryBIO(), ssl.MemoryBIO()
c, d = ssl.MemoryBIO(), ssl.MemoryBIO()
s_side = server.wrap_bio(a, b, server_side=True)
c_side = client.wrap_bio(c, d, server_hostname="localhost")
for _ in range(10):
    for side in (c_side, s_side):
        try:
            side.do_handshake()
        except ssl.SSLWantReadError:
            pass
    a.write(d.read())
    c.write(b.read())
fds = os.listdir("/proc/self/fd")  # (one of them was listdir's own, closed since)
left = [fd for fd in fds if os.path.exists(f"/proc/self/fd/{fd}")
        and "memfd:" in os.readlink(f"/proc/self/fd/{fd}")]
print(tls.peer_common_name(s_side), len(left))  # nothing left open holding the key
"""


def test_the_certificate_and_key_loaded_are_the_bytes_checked(tmp_path: Path) -> None:
    """OpenSSL took the certificate and key by path after read_tls_file had checked them:
    a FIFO swapped in between held its open() (a trusted domain's event loop) for good. Now
    the bytes checked go to OpenSSL, and the context they make serves a handshake."""
    import sys

    x509.init_ca(tmp_path / "pki")
    x509.issue_guest(tmp_path / "pki", GUEST)
    out = subprocess.run([sys.executable, "-c", _SWAP_AFTER_CHECK, str(tmp_path / "pki"), GUEST],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [GUEST, "0"], out
    assert stat.S_ISFIFO((tmp_path / "pki" / "server-key.pem").stat().st_mode)  # swapped indeed


def test_an_encrypted_key_is_refused_not_asked_for_on_the_terminal(tmp_path: Path) -> None:
    """OpenSSL, given no password callback, asked for an encrypted key's passphrase on the
    terminal and waited (`up`'s check before start, the CLI's TLS client). Now it is refused
    with one line naming the file and the fix. On a terminal (a pty), with a deadline."""
    import pty
    import select
    import signal
    import time

    from cryptography.hazmat.primitives import serialization

    x509.init_ca(tmp_path / "pki")
    key_path = tmp_path / "pki" / "server-key.pem"
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"secret")))
    pid, fd = pty.fork()
    if pid == 0:  # the child: on the pty as its controlling terminal
        try:
            server_context(tmp_path / "pki")
        except Exception as exc:  # the child says what came, and exits
            os.write(1, f"{type(exc).__name__}: {exc}\n".encode())
        os._exit(0)
    out, deadline = b"", time.monotonic() + 20
    try:
        while time.monotonic() < deadline and b"\n" not in out:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:  # the child exited
                    break
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    assert out.decode().strip().replace("\r\n", " ").replace("\n", " ") == (
        f"TlsSetupError: {key_path} is an encrypted private key, and trustvbd asks no passphrase"
        " for one: decrypt it (`openssl pkey -in FILE -out FILE`, then chmod 600 FILE) or make"
        " new files (`trustvbd tls init DIR`)"), out  # old code: "Enter PEM pass phrase:"

def test_nbdinfo_nbdcopy_and_libnbd_over_tls(tls_server: tuple[ServerThread, Refusals, Path],
                                             pki: Path, short_tmp: Path) -> None:
    srv, refusals, disk = tls_server
    certs = pki / "pki" / "guests" / GUEST
    size = run(["nbdinfo", "--size", nbds(srv, certs)])
    assert size.returncode == 0 and size.stdout.strip() == str(8 * MiB), size.stderr
    src, back = short_tmp / "src.img", short_tmp / "back.img"
    src.write_bytes(os.urandom(8 * MiB))
    assert run(["nbdcopy", str(src), nbds(srv, certs)]).returncode == 0
    assert run(["nbdcopy", nbds(srv, certs), str(back)]).returncode == 0
    assert disk.read_bytes() == src.read_bytes() == back.read_bytes()
    conns = srv.server.connections if srv.server else set()
    assert not refusals and not conns


def test_qemu_io_with_tls_creds_object(tls_server: tuple[ServerThread, Refusals, Path],
                                       pki: Path) -> None:
    srv, _, disk = tls_server
    certs = pki / "pki" / "guests" / GUEST
    out = run(["qemu-io", "--object",
               f"tls-creds-x509,id=t0,dir={certs},endpoint=client",
               "--image-opts",
               f"driver=nbd,host=127.0.0.1,port={srv.port},export=disk,tls-creds=t0",
               "-c", "write -P 0x5a 4096 64k", "-c", "read -P 0x5a 4096 64k"])
    assert out.returncode == 0 and "read 65536/65536" in out.stdout, out.stdout + out.stderr
    assert disk.read_bytes()[4096:4096 + 65536] == b"\x5a" * 65536


def test_plaintext_on_a_tls_port_is_refused(tls_server: tuple[ServerThread, Refusals, Path]
                                            ) -> None:
    srv, _, _ = tls_server
    out = run(["nbdinfo", f"nbd://127.0.0.1:{srv.port}/disk"],
              env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert out.returncode != 0 and "server error message: this port requires TLS" in out.stderr
    raw = RawClient(("127.0.0.1", srv.port))
    raw.start()
    for opt in (p.Opt.STRUCTURED_REPLY, p.Opt.LIST, p.Opt.INFO, p.Opt.GO):
        raw.option(opt, b"" if opt in (p.Opt.STRUCTURED_REPLY, p.Opt.LIST) else
                   struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
        assert raw.option_reply()[1] == p.Rep.ERR_TLS_REQD, p.name_of(p.Opt, opt)
    raw.option(p.Opt.STARTTLS, b"x")
    assert raw.option_reply()[1] == p.Rep.ERR_INVALID
    raw.option(p.Opt.EXPORT_NAME, b"disk")  # cannot carry an error: the spec says hang up
    assert raw.closed_by_peer()


def test_bytes_sent_after_starttls_before_tls_are_refused(
        tls_server: tuple[ServerThread, Refusals, Path]) -> None:
    """Plaintext injected behind STARTTLS must never count as said under TLS."""
    srv, _, _ = tls_server
    raw = RawClient(("127.0.0.1", srv.port))
    raw.start()
    raw.sock.sendall(struct.pack(">QII", p.IHAVEOPT, p.Opt.STARTTLS, 0)
                     + struct.pack(">QII", p.IHAVEOPT, p.Opt.LIST, 0))
    assert raw.option_reply()[1] == p.Rep.ACK
    assert raw.closed_by_peer()


@pytest.mark.parametrize("which, libnbd_says, reason", [
    ("vm2", "certificate is for 'vm2'", "certificate is for 'vm2'"),
    ("foreign", "", "TLS handshake failed"),
    ("expired", "", "TLS handshake failed"),
])
def test_wrong_certificates_are_refused(tls_server: tuple[ServerThread, Refusals, Path], pki: Path,
                                        which: str, libnbd_says: str, reason: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    srv, refusals, _ = tls_server
    caplog.set_level(logging.INFO, logger="trustvbd.nbd.server")
    certs = {"vm2": pki / "pki" / "guests" / "vm2", "foreign": pki / "foreign-client",
             "expired": pki / "expired"}[which]
    out = run(["nbdinfo", "--size", nbds(srv, certs)], env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert out.returncode != 0, out.stdout
    assert libnbd_says in out.stderr, out.stderr[-2000:]
    wait_for(lambda: bool(refusals), what="the refusal to be reported")
    assert refusals[0][0] == GUEST and reason in refusals[0][1], refusals
    if which == "expired":
        assert "expired" in refusals[0][1]
    if which == "foreign":
        assert "unable to get local issuer certificate" in refusals[0][1]
    wait_for(lambda: not srv.server or not srv.server.connections, what="the connection to end")
    # Logged once, as a warning: not again at INFO when the handshake ends.
    said = [r for r in caplog.records if reason in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"], [r.getMessage() for r in said]


def test_a_plain_port_does_not_offer_tls(short_tmp: Path) -> None:
    backend = FileBackend(str(short_tmp / "d.img"), MiB)
    with ServerThread(StaticExports([Export("d", backend)]), short_tmp / "s.sock") as srv:
        raw = RawClient(srv.sock_path or "")
        raw.start()
        raw.option(p.Opt.STARTTLS)
        _, rep, text = raw.option_reply()
        assert rep == p.Rep.ERR_UNSUP and b"does not offer TLS" in text
    asyncio.run(backend.close())


# --- our client against TLS peers (drivers reached by nbds:// and nbds+unix://) -----------
async def _roundtrip(uri: str, tls_dir: Path | None = None) -> bytes:
    client = await NbdClient.open_uri(uri, tls_dir=tls_dir)
    try:
        await client.pwrite(0, b"\xc3" * 8192)
        await client.flush()
        return bytes(await client.pread(0, 8192))
    finally:
        await client.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_client_against_nbdkit_tls_require_verify_peer(short_tmp: Path, pki: Path,
                                                       loop_kind: str) -> None:
    image = short_tmp / "k.img"
    image.write_bytes(bytes(MiB))
    peer = Peer.nbdkit(image, short_tmp, "--tls=require", f"--tls-certificates={pki / 'pki'}",
                       "--tls-verify-peer")
    try:
        from tests.nbd.helpers import new_loop

        loop = new_loop(loop_kind)
        try:
            uri = f"nbds+unix:///?socket={peer.sock}"
            assert loop.run_until_complete(_roundtrip(uri, pki / "pki")) == b"\xc3" * 8192
            # Plaintext to it is refused by nbdkit; a foreign CA's client is refused too.
            with pytest.raises(BlockError):
                loop.run_until_complete(_roundtrip(f"nbd+unix:///?socket={peer.sock}"))
            with pytest.raises(BlockError, match="TLS"):
                loop.run_until_complete(_roundtrip(uri, pki / "foreign"))
        finally:
            loop.close()
    finally:
        peer.stop()
    assert image.read_bytes()[:8192] == b"\xc3" * 8192


def test_client_against_qemu_nbd_tls_creds_over_tcp(short_tmp: Path, pki: Path) -> None:
    image = short_tmp / "q.img"
    image.write_bytes(bytes(MiB))
    peer = Activated(["qemu-nbd", "-f", "raw", "-x", "d", "--object",
                      f"tls-creds-x509,id=t0,dir={pki / 'pki'},endpoint=server,verify-peer=on",
                      "--tls-creds", "t0", "-e", "4", "-t", str(image)])
    try:
        uri = f"nbds://127.0.0.1:{peer.port}/d"
        try:
            assert asyncio.run(_roundtrip(uri, pki / "pki")) == b"\xc3" * 8192
        except BlockError as exc:
            raise AssertionError(peer.stop()) from exc
        with pytest.raises(BlockError, match="refuse our client certificate"):  # it verifies us
            asyncio.run(_roundtrip(uri, pki / "foreign-client"))
    finally:
        peer.stop()
    assert image.read_bytes()[:8192] == b"\xc3" * 8192


def test_client_refuses_a_server_without_tls(short_tmp: Path, pki: Path) -> None:
    backend = FileBackend(str(short_tmp / "d.img"), MiB)
    with ServerThread(StaticExports([Export("d", backend)]), None) as srv:
        with pytest.raises(BlockError, match="will not start TLS"):
            asyncio.run(_roundtrip(f"nbds://127.0.0.1:{srv.port}/d", pki / "pki"))
    asyncio.run(backend.close())


def test_tools_are_there() -> None:
    for tool in ("nbdinfo", "nbdcopy", "qemu-io", "qemu-nbd", "nbdkit", "openssl"):
        assert shutil.which(tool), f"{tool} is missing: run scripts/install-test-deps.sh"


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_read_longer_than_one_part_streams_over_tls(short_tmp: Path, pki: Path,
                                                      loop_kind: str) -> None:
    """A 40 MiB READ is sent in parts, each after the last left: over TLS too."""
    import nbd  # Debian's libnbd module (conftest adds its path)

    disk = short_tmp / "big.img"
    disk.write_bytes(os.urandom(48 * MiB))
    backend = FileBackend(str(disk), 48 * MiB)
    with ServerThread(StaticExports([Export("big", backend)]), None, loop_kind,
                      tls=server_context(pki / "pki")) as srv:
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)
        h.connect_uri(nbds(srv, pki / "pki" / "guests" / GUEST, "big"))
        data = h.pread(40 * MiB, 4096)
        h.shutdown()
    assert data == disk.read_bytes()[4096:4096 + 40 * MiB]
    asyncio.run(backend.close())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_tls_connection_is_not_left_waiting_for_room_after_its_replies_left(
        short_tmp: Path, pki: Path, loop_kind: str) -> None:
    """CI hung once in a READ streamed in parts over TLS: the server waited for its
    transport to drain, the client for data. With write buffer limits high=0, the TLS layer
    paused the connection after every write it had passed on whole (it pauses at size >=
    high), and only a later write, read or a full socket buffer resumed it: a stream that
    waits for the resume before its next part (or its end) could wait forever. Now no reply
    that left leaves the connection paused, and a READ of three parts (32 MiB, 32 MiB,
    4 KiB) over TLS arrives whole."""
    disk = short_tmp / "big.img"
    size = 72 * MiB
    disk.write_bytes(os.urandom(size))
    backend = FileBackend(str(disk), size)
    with ServerThread(StaticExports([Export("big", backend)]), None, loop_kind,
                      tls=server_context(pki / "pki")) as srv:
        c = RawClient(("127.0.0.1", srv.port), timeout=30)
        c.start()
        c.option(p.Opt.STARTTLS)
        assert c.option_reply()[1] == p.Rep.ACK
        c.sock = client_context(pki / "pki" / "guests" / GUEST).wrap_socket(
            c.sock, server_hostname="127.0.0.1")
        c.go("big", fresh=False)
        assert srv.server is not None
        (conn,) = srv.server.connections
        wait_for(lambda: not conn._transport_busy, 2,
                 "the connection to see its transport drained after the handshake")
        expected = disk.read_bytes()
        for cookie, (offset, length) in enumerate([(4096, 4096), (0, 1), (8192, 4096),
                                                  (4096, 64 * MiB + 4096)]):
            c.request(p.Cmd.READ, offset, length, cookie=cookie)
            assert c.simple_reply() == (0, cookie)
            got = bytearray(length)
            view, n = memoryview(got), 0
            while n < length:
                k = c.sock.recv_into(view[n:], min(length - n, MiB))
                assert k, f"closed after {n} of {length} bytes"
                n += k
            assert got == expected[offset:offset + length]
            wait_for(lambda: not conn._transport_busy, 2,
                     f"the connection to see its transport drained after reply {cookie}")
        c.close()
    asyncio.run(backend.close())


def test_a_tls_client_hanging_up_logs_no_asyncio_warning(
        tls_server: tuple[ServerThread, Refusals, Path], pki: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The server keeps a plain connection's side open after the client's EOF to write
    in-flight replies; a TLS transport cannot, and asyncio warned about it in the trusted
    domain's log at every TLS client's hang-up."""
    srv, _, _ = tls_server
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        size = run(["nbdinfo", "--size", nbds(srv, pki / "pki" / "guests" / GUEST)])
        assert size.returncode == 0, size.stderr
    wait_for(lambda: srv.server is not None and not srv.server.connections, 10,
             "the server to see the last hang-up")
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()], caplog.text
