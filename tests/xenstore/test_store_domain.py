"""The store domain as a real process, driven by Debian's xenstore-utils and raw sockets."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import TRUSTVBD, read_lines_until, run
from trustvbd.domains import messages as m
from trustvbd.xenstore.client import XsClient, XsClosed
from trustvbd.xenstore.wire import HEADER, PAYLOAD_MAX, Decoder, Message, Op, XsError, encode


@dataclass
class StoreProcess:
    sock_path: Path
    control: socket.socket
    proc: subprocess.Popen[str]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "XENSTORED_PATH": str(self.sock_path)}

    def xs(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([f"xenstore-{tool}", *args], check=check, env=self.env, timeout=20)

    def ask(self, request: m.Message | dict) -> tuple[m.Message, list[int]]:
        """One request on the store's control channel, as the launcher sends it."""
        raw = request.encode() if isinstance(request, m.Message) else request
        socket.send_fds(self.control, [json.dumps({**raw, "id": 7}).encode()], [])
        data, fds, _, _ = socket.recv_fds(self.control, 65536, 4)
        reply = json.loads(data)
        assert reply.pop("reply_to") == 7
        return m.decode(reply), fds

    def connect_domain(self, domid: int, name: str = "", label: str = "L") -> socket.socket:
        """What the launcher does: ask the store for domain `domid`'s own connection."""
        reply, fds = self.ask(m.StoreConnect(domid, name or f"d{domid}", label))
        assert reply == m.StoreConnected(domid), reply
        (fd,) = fds
        return socket.socket(fileno=fd)


@pytest.fixture
def store(short_tmp: Path) -> Iterator[StoreProcess]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    path = short_tmp / "xs.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustvbd.domains.store", "--socket", str(path),
         "--control-fd", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    theirs.close()
    ours.settimeout(10)
    try:
        read_lines_until(proc, "ready", 20)
        yield StoreProcess(path, ours, proc)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
        ours.close()


def test_xenstore_utils_write_read_ls_rm(store: StoreProcess) -> None:
    store.xs("write", "/vm/1/name", "alpha", "/vm/1/memory", "512")
    assert store.xs("read", "/vm/1/name").stdout == "alpha\n"
    assert store.xs("ls", "/vm").stdout == '1 = ""\n name = "alpha"\n memory = "512"\n'
    assert store.xs("list", "/vm/1").stdout.split() == ["name", "memory"]
    missing = store.xs("read", "/vm/2/name", check=False)
    assert missing.returncode == 1 and "couldn't read path /vm/2/name" in missing.stderr
    store.xs("rm", "/vm/1/memory")
    assert store.xs("exists", "/vm/1/memory", check=False).returncode == 1
    assert store.xs("exists", "/vm/1/name").returncode == 0
    bad = store.xs("write", "/bad//path", "x", check=False)
    assert bad.returncode == 1  # EINVAL, and the store still serves
    assert store.xs("read", "/vm/1/name").stdout == "alpha\n"


def test_xenstore_watch_fires_on_the_path_and_its_children(store: StoreProcess) -> None:
    store.xs("write", "/w", "")
    watcher = subprocess.Popen(["xenstore-watch", "-n", "3", "/w"], env=store.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        read_lines_until(watcher, "/w", 10)  # the event every new watch gets at once
        store.xs("write", "/elsewhere", "not seen")
        store.xs("write", "/w/child/deep", "1")
        store.xs("rm", "/w/child")
        assert read_lines_until(watcher, "/w/child", 10) == ["/w/child/deep", "/w/child"]
        assert watcher.wait(10) == 0  # -n 3: exactly three events, then it exits
    finally:
        watcher.kill()
        watcher.communicate()


def test_transaction_with_a_conflicting_writer_gets_eagain(store: StoreProcess) -> None:
    async def scenario() -> None:
        a, b = await XsClient.connect(str(store.sock_path)), await XsClient.connect(str(store.sock_path))
        try:
            await a.write("/acct/balance", "100")
            tx = await a.transaction_start()
            balance = int(await a.read("/acct/balance", tx))
            await a.write("/acct/balance", str(balance - 30), tx)
            await b.write("/acct/balance", "500")  # lands between the read and the commit
            with pytest.raises(XsError) as info:
                await a.transaction_end(tx)
            assert info.value.code == "EAGAIN"
            assert await b.read("/acct/balance") == b"500"
            tx = await a.transaction_start()  # the retry a client does, now without a race
            balance = int(await a.read("/acct/balance", tx))
            await a.write("/acct/balance", str(balance - 30), tx)
            await a.transaction_end(tx)
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())
    assert store.xs("read", "/acct/balance").stdout == "470\n"


def test_chmod_then_a_domains_own_connection_is_denied(store: StoreProcess) -> None:
    store.xs("write", "/shared/secret", "s3cret")
    store.xs("chmod", "/shared/secret", "n0")
    dom5 = store.connect_domain(5)
    dom6 = store.connect_domain(6)

    async def scenario() -> None:
        d5, d6 = await XsClient.connect(sock=dom5), await XsClient.connect(sock=dom6)
        try:
            for attempt in (d5.read("/shared/secret"), d5.write("/shared/secret", "x"),
                            d5.write("/local/domain/6/evil", "x"), d6.directory("/local/domain/5"),
                            d5.rm("/shared")):
                with pytest.raises(XsError) as info:
                    await attempt
                assert info.value.code == "EACCES"
            await d5.write("device/vbd/1/state", "1")  # its own home is its own
            assert await d5.read("/local/domain/5/device/vbd/1/state") == b"1"
        finally:
            await d5.close()
            await d6.close()

    asyncio.run(scenario())
    store.xs("chmod", "/shared/secret", "n0", "r5")
    dom5 = store.connect_domain(5)

    async def now_readable() -> None:
        d5 = await XsClient.connect(sock=dom5)
        try:
            assert await d5.read("/shared/secret") == b"s3cret"
            with pytest.raises(XsError) as info:
                await d5.write("/shared/secret", "x")
            assert info.value.code == "EACCES"
        finally:
            await d5.close()

    asyncio.run(now_readable())
    listing = store.xs("ls", "-p", "/local/domain/5/device/vbd/1").stdout
    assert 'state = "1"' in listing and "(n5)" in listing
    assert store.xs("read", "/shared/secret").stdout == "s3cret\n"


def test_public_socket_refuses_other_users(store: StoreProcess) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a client under another uid")
    os.chmod(store.sock_path.parent, 0o711)
    os.chmod(store.sock_path, 0o666)  # past the file mode: SO_PEERCRED must still say no
    probe = "\n".join([
        "import socket, sys",
        "s = socket.socket(socket.AF_UNIX)",
        f"s.connect({str(store.sock_path)!r})",
        "s.settimeout(5)",
        "try:",
        "    s.sendall(bytes.fromhex('020000000100000000000000020000002f00'))",  # READ "/"
        "    print(repr(s.recv(100)))",
        "except (ConnectionResetError, BrokenPipeError):",
        "    print(repr(b''))",
    ])
    result = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", probe])
    assert result.stdout.strip() == "b''"  # hung up on, no reply
    assert store.xs("ls", "/").returncode == 0


def test_bad_messages_get_errors_or_a_disconnect_and_others_are_served(store: StoreProcess) -> None:
    def exchange(sock: socket.socket, data: bytes) -> Message | None:
        sock.sendall(data)
        decoder = Decoder()
        while (msg := decoder.next_message()) is None:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            decoder.feed(chunk)
        return msg

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(store.sock_path))
        for op, payload, code in ((99, b"", b"ENOSYS\0"), (Op.READ, b"/a//b\0", b"EINVAL\0"),
                                  (Op.READ, b"/unterminated", b"EINVAL\0"),
                                  (Op.READ, b"/missing\0", b"ENOENT\0")):
            reply = exchange(s, encode(Message(op, 7, 0, payload)))
            assert reply is not None and (reply.op, reply.req_id, reply.payload) == (Op.ERROR, 7, code)
        assert exchange(s, HEADER.pack(Op.WRITE, 8, 0, PAYLOAD_MAX + 1) + b"x" * 100) is None
    dom5 = store.connect_domain(5)

    async def hostile_domain() -> None:
        d5 = await XsClient.connect(sock=dom5)
        with pytest.raises(XsError):
            await d5.write("/local/domain/0/x", "x")
        d5.writer.write(HEADER.pack(Op.WRITE, 9, 0, 1 << 20))
        with pytest.raises(XsClosed):
            await d5.read("device")
        await d5.close()

    asyncio.run(hostile_domain())
    store.xs("write", "/still", "served")
    assert store.xs("read", "/still").stdout == "served\n"
    assert store.proc.poll() is None


def test_malformed_control_requests_are_refused_naming_message_and_field(
        store: StoreProcess) -> None:
    """The launcher's channel speaks typed messages only: anything else is refused with a
    code and where it is wrong, hands over nothing, and the store goes on."""
    cases: list[tuple[m.Message | dict[str, Any], m.ErrorCode, str]] = [
        ({"type": "store-connect", "domid": "3", "name": "d3", "label": "L"},
         m.ErrorCode.BAD_MESSAGE, "store-connect.domid: '3' is not int"),
        ({"type": "store-introduce", "domid": 3, "name": "d3"},
         m.ErrorCode.BAD_MESSAGE, "store-introduce: field 'label' is missing"),
        ({"op": "connect", "domid": 3, "name": "d3", "label": "L"},  # the old untyped form
         m.ErrorCode.BAD_MESSAGE, "unexpected message type None"),
        ({"type": "stop"}, m.ErrorCode.BAD_MESSAGE, "unexpected message type 'stop'"),
        (m.StoreConnect(0, "dom0", "L"), m.ErrorCode.INVALID,
         "store-connect: domid must be 1..65535, not 0"),
        (m.StoreRelease(70000), m.ErrorCode.INVALID, "domid must be 1..65535, not 70000"),
    ]
    for request, code, says in cases:
        reply, fds = store.ask(request)
        assert fds == [] and isinstance(reply, m.Failed), (request, reply)
        assert reply.code is code and says in reply.message, (request, reply)
    assert store.xs("exists", "/local/domain/3", check=False).returncode == 1  # nothing made
    assert store.ask(m.StoreIntroduce(3, "d3", "L"))[0] == m.Done()
    assert store.xs("exists", "/local/domain/3").returncode == 0
    assert store.proc.poll() is None


def test_store_path_and_serve_commands(short_tmp: Path) -> None:
    config = short_tmp / "c.toml"
    config.write_text(f'state_dir = "{short_tmp}/state"\n[[guest]]\nname = "g"\nlabel = "L"\n')
    out = run([*TRUSTVBD, "store", "path", "-c", str(config)]).stdout
    assert out == f"{short_tmp}/state/store.sock\n"
    sock = short_tmp / "alone.sock"
    proc = subprocess.Popen([*TRUSTVBD, "store", "serve", "--socket", str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        read_lines_until(proc, "ready", 20)
        env = {**os.environ, "XENSTORED_PATH": str(sock)}
        run(["xenstore-write", "/k", "v"], env=env)
        assert run(["xenstore-read", "/k"], env=env).stdout == "v\n"
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not sock.exists()
