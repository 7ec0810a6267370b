"""NbdServer driven by real NBD clients: qemu-io, nbdinfo, nbdcopy and libnbd."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd  # Debian's python3-libnbd, put on sys.path by tests/conftest.py; missing = failure, not skip
import pytest

from tests.nbd.helpers import ServerThread, wait_for
from trustvbd.blockdev import BlockError, Capabilities
from trustvbd.blocks.file import FileBackend, MemoryBackend
from trustvbd.blocks.layer import Layer
from trustvbd.nbd import messages as m
from trustvbd.nbd.exports import Export, ExportRefused, PeerInfo, StaticExports

MiB = 1 << 20


def appends(done: list[Any], tag: Any) -> Callable[[object], int]:
    """A libnbd completion callback that records `tag` in `done` and frees the command."""
    def completion(err: object) -> int:
        done.append(tag)
        return 1
    return completion


def errno_of(exc: pytest.ExceptionInfo[Exception]) -> int:
    """libnbd's Error.errno is the symbolic name; turn it into the number."""
    value = exc.value.errno  # type: ignore[attr-defined]
    return value if isinstance(value, int) else int(getattr(errno, value))


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and result.returncode:
        raise AssertionError(f"{cmd} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


class ScriptedBackend(Layer):
    """MemoryBackend with knobs: slow reads/writes, injected errors, a call log."""

    def __init__(self, size: int, caps: Capabilities | None = None) -> None:
        super().__init__(MemoryBackend(size))
        self.caps = caps or Capabilities(fast_zero=True)
        self.read_delay: dict[int, float] = {}
        self.write_delay = 0.0
        self.fail_read_at: dict[int, int] = {}
        self.log: list[tuple[str, ...]] = []

    @property
    def capabilities(self) -> Capabilities:
        return self.caps

    async def pread(self, offset: int, length: int) -> bytes:
        if offset in self.read_delay:
            await asyncio.sleep(self.read_delay[offset])
        if offset in self.fail_read_at:
            raise BlockError(self.fail_read_at[offset], f"injected failure at {offset}")
        return await self.next.pread(offset, length)  # type: ignore[return-value]

    async def pwrite(self, offset: int, data: object, fua: bool = False) -> None:
        if self.write_delay:
            await asyncio.sleep(self.write_delay)
        await self.next.pwrite(offset, data, fua)  # type: ignore[arg-type]
        self.log.append(("write", str(offset), str(fua)))

    async def flush(self) -> None:
        self.log.append(("flush",))

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.log.append(("trim", str(offset), str(length)))
        await self.next.trim(offset, length, fua)

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = False,
                   fast: bool = False) -> None:
        self.log.append(("zero", str(offset), str(length), str(may_trim), str(fast)))
        if fast:
            raise BlockError(errno.ENOTSUP, "zeroing is never fast here")
        await self.next.zero(offset, length, fua, may_trim, fast)

    async def cache(self, offset: int, length: int) -> None:
        self.log.append(("cache", str(offset), str(length)))


class PolicyProvider(StaticExports):
    """Refuses one export by policy, like the encryption domain's access check."""

    async def open_export(self, peer: PeerInfo, name: str) -> Export:
        if name == "secret":
            raise ExportRefused("policy", f"guest {peer.identity} may not attach disk 'secret'")
        return await super().open_export(peer, name)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend(16 * MiB)


@pytest.fixture
def server(short_tmp: Path, backend: ScriptedBackend, loop_kind: str) -> Iterator[ServerThread]:
    provider = PolicyProvider([Export("disk", backend, "scratch disk"),
                               Export("", MemoryBackend(MiB), "default")])
    with ServerThread(provider, short_tmp / "s.sock", loop_kind) as srv:
        yield srv


def test_qemu_io_pattern_write_and_read(server: ServerThread) -> None:
    uri = server.uri("disk")
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M",
         "-c", "write -P 0xcd 3M 512k", "-c", "flush", "-c", "read -P 0 1M 2M"])
    bad = run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0xcd 0 512k"], check=False)
    assert "Pattern verification failed" in bad.stdout + bad.stderr


def test_nbdinfo_shows_size_block_sizes_and_flags(server: ServerThread) -> None:
    out = run(["nbdinfo", server.uri("disk")]).stdout
    for line in ["export-size: 16777216", "description: scratch disk", "block_size_minimum: 1",
                 "block_size_preferred: 4096", "block_size_maximum: 67108864",
                 "can_multi_conn: true", "can_fast_zero: true", "can_trim: true",
                 "is_read_only: false", "can_cache: true"]:
        assert line in out, out
    listing = run(["nbdinfo", "--list", server.uri()]).stdout
    assert 'export="disk"' in listing and 'export=""' in listing


def test_read_only_backend_without_multi_conn(short_tmp: Path) -> None:
    caps = Capabilities(read_only=True, multi_conn=False, cache=False)
    ro = ScriptedBackend(MiB, caps)
    with ServerThread(StaticExports([Export("ro", ro)]), short_tmp / "r.sock") as srv:
        out = run(["nbdinfo", srv.uri("ro")]).stdout
        assert "is_read_only: true" in out and "can_multi_conn: false" in out
        assert "can_cache: false" in out and "can_trim: false" in out
        h = nbd.NBD()
        h.set_strict_mode(0)  # let the request reach the server
        h.connect_uri(srv.uri("ro"))
        with pytest.raises(nbd.Error) as err:
            h.pwrite(b"x" * 512, 0)
        assert errno_of(err) == errno.EPERM
        h.shutdown()


def test_refused_export_message_reaches_qemu_io_and_nbdinfo(server: ServerThread) -> None:
    want = "guest test-guest may not attach disk 'secret'"
    q = run(["qemu-io", "-f", "raw", server.uri("secret"), "-c", "read 0 512"], check=False)
    assert q.returncode != 0 and want in q.stderr, q.stderr
    # libnbd 1.14's nbdinfo prints the server's message only in its debug output.
    env = {**os.environ, "LIBNBD_DEBUG": "1"}
    i = subprocess.run(["nbdinfo", server.uri("secret")], capture_output=True, text=True,
                       env=env, timeout=30)
    assert i.returncode != 0 and f"server error message: {want}" in i.stderr, i.stderr
    i = subprocess.run(["nbdinfo", server.uri("nosuch")], capture_output=True, text=True,
                       env=env, timeout=30)
    assert i.returncode != 0 and "no export named 'nosuch'" in i.stderr, i.stderr


def test_nbdcopy_both_ways(short_tmp: Path, loop_kind: str) -> None:
    src, back, disk = short_tmp / "src.img", short_tmp / "back.img", short_tmp / "disk.img"
    src.write_bytes(os.urandom(24 * MiB))
    fb = FileBackend(str(disk), 24 * MiB)
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "c.sock", loop_kind) as srv:
        run(["nbdcopy", str(src), srv.uri()])
        run(["nbdcopy", "--request-size=1048576", srv.uri(), str(back)])
    assert disk.read_bytes() == src.read_bytes() == back.read_bytes()
    asyncio.run(fb.close())


def test_libnbd_commands_and_flags(server: ServerThread, backend: ScriptedBackend) -> None:
    h = nbd.NBD()
    h.connect_uri(server.uri("disk"))
    assert h.get_size() == 16 * MiB and h.can_multi_conn() and h.can_fast_zero()
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    h.pwrite(b"\x11" * 4096, 8192, nbd.CMD_FLAG_FUA)
    assert ("write", "8192", "True") in backend.log
    h.trim(4096, 8192)
    assert ("trim", "8192", "4096") in backend.log
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
    assert ("zero", "0", "4096", "False", "False") in backend.log
    with pytest.raises(nbd.Error) as err:
        h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert errno_of(err) == errno.ENOTSUP
    h.flush()
    assert ("flush",) in backend.log
    h.cache(MiB, 0)
    assert ("cache", "0", str(MiB)) in backend.log
    backend.fail_read_at[MiB] = errno.ENOSPC
    with pytest.raises(nbd.Error) as err:
        h.pread(512, MiB)
    assert errno_of(err) == errno.ENOSPC
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as err:
        h.pread(1024, 16 * MiB - 512)  # past the end
    assert errno_of(err) == errno.EINVAL
    with pytest.raises(nbd.Error) as err:
        h.pwrite(b"x" * 1024, 16 * MiB - 512)
    assert errno_of(err) == errno.ENOSPC
    h.shutdown()


@pytest.mark.parametrize("structured", [True, False])
def test_libnbd_long_and_byte_sized_requests(short_tmp: Path, loop_kind: str, structured: bool) -> None:
    """40 MiB requests (above the 32 MiB part) and 1-, 3- and 513-byte ones at odd offsets,
    against a reference; the backend never sees more than one part at once."""
    size = 48 * MiB
    lengths: list[int] = []

    class Recording(Layer):
        async def pread(self, offset: int, length: int) -> bytes:
            lengths.append(length)
            return await self.next.pread(offset, length)  # type: ignore[return-value]

        async def pwrite(self, offset: int, data: object, fua: bool = False) -> None:
            lengths.append(len(data))  # type: ignore[arg-type]
            await self.next.pwrite(offset, data, fua)  # type: ignore[arg-type]

    reference = bytearray(size)
    with ServerThread(StaticExports([Export("", Recording(MemoryBackend(size)))]),
                      short_tmp / "l.sock", loop_kind) as srv:
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        h.connect_uri(srv.uri())
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 64 * MiB
        big = os.urandom(40 * MiB)
        h.pwrite(big, 4097, nbd.CMD_FLAG_FUA)
        reference[4097:4097 + len(big)] = big
        for offset, length in [(1, 1), (3, 3), (4095, 513), (40 * MiB + 5, 3), (size - 1, 1)]:
            chunk = os.urandom(length)
            h.pwrite(chunk, offset)
            reference[offset:offset + length] = chunk
            assert h.pread(length, offset) == reference[offset:offset + length]
        assert h.pread(40 * MiB + 1, 4096) == reference[4096:4096 + 40 * MiB + 1]
        assert h.pread(size, 0) == reference
        h.shutdown()
    assert max(lengths) == 32 * MiB


@pytest.mark.parametrize("structured", [True, False])
def test_long_reads_are_framed_natively_and_fail_as_the_spec_says(
        short_tmp: Path, structured: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """READs over 32 MiB go out part by part, framed by the native framer like every other
    reply (messages.encode_parts frames none): small reads beside them come back right, a
    part failing ends a structured reply with an ERROR_OFFSET chunk (the connection goes
    on) and drops a simple one whose data began (the spec's only way out)."""
    in_python: list[str] = []
    encode_parts = m.encode_parts

    def spy(msg: m.Event, **kw: Any) -> list[Any]:
        if isinstance(msg, m.SimpleReply | m.OffsetData | m.OffsetHole | m.ErrorChunk | m.NoneChunk):
            in_python.append(type(msg).__name__)
        return encode_parts(msg, **kw)

    monkeypatch.setattr(m, "encode_parts", spy)
    size, part = 72 * MiB, 32 * MiB
    reference = os.urandom(size)
    backend = ScriptedBackend(size)

    def connect(srv: ServerThread) -> Any:
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        h.connect_uri(srv.uri())
        assert h.get_structured_replies_negotiated() == structured
        return h

    with ServerThread(StaticExports([Export("", backend)]), short_tmp / "r.sock") as srv:
        h = connect(srv)
        for at in range(0, size, part):
            h.pwrite(reference[at:at + part], at)
        # 40 MiB + 1 at an odd offset (two parts), small reads in flight beside it.
        big = nbd.Buffer(40 * MiB + 1)
        cookies = [(h.aio_pread(big, 4097), big, 4097)]
        for offset in (0, 50 * MiB + 3, size - 512):
            small = nbd.Buffer(512)
            cookies.append((h.aio_pread(small, offset), small, offset))
        while h.aio_in_flight():
            h.poll(-1)
        for cookie, buf, offset in cookies:
            assert h.aio_command_completed(cookie)
            assert buf.to_bytearray() == reference[offset:offset + len(buf)], offset
        assert h.pread(64 * MiB, 8 * MiB - 1) == reference[8 * MiB - 1:72 * MiB - 1]  # 32 + 32

        # The first part fails: an error reply in both kinds, and the connection goes on.
        backend.fail_read_at[4097] = errno.ENOSPC
        with pytest.raises(nbd.Error) as err:
            h.pread(40 * MiB, 4097)
        assert errno_of(err) == errno.ENOSPC
        assert h.pread(512, 0) == reference[:512]
        del backend.fail_read_at[4097]

        # The second part fails, after 32 MiB of data went out.
        backend.fail_read_at[4097 + part] = errno.ENOSPC
        with pytest.raises(nbd.Error) as err:
            h.pread(40 * MiB, 4097)
        if structured:  # ERROR_OFFSET ends the reply; the connection goes on
            assert errno_of(err) == errno.ENOSPC
            assert h.pread(512, 0) == reference[:512]
            h.shutdown()
        else:  # dropped: nothing more goes over this connection
            with pytest.raises(nbd.Error):
                h.pread(512, 0)
        del backend.fail_read_at[4097 + part]
        h = connect(srv)  # a new connection reads it all
        assert h.pread(40 * MiB, 4097) == reference[4097:4097 + 40 * MiB]
        h.shutdown()
    assert in_python == [], "replies framed by messages.encode_parts instead of the native framer"


def test_pipelined_reads_complete_out_of_order(server: ServerThread,
                                               backend: ScriptedBackend) -> None:
    backend.read_delay[0] = 0.3
    h = nbd.NBD()
    h.connect_uri(server.uri("disk"))
    done: list[int] = []
    bufs = [nbd.Buffer(4096) for _ in range(4)]
    for i in range(4):  # all four in flight at once; the first one is slow
        h.aio_pread(bufs[i], i * 4096, completion=appends(done, i))
    deadline = time.monotonic() + 5
    while len(done) < 4:
        assert time.monotonic() < deadline
        h.poll(100)
    assert done == [1, 2, 3, 0]  # replies came back out of order
    h.shutdown()


def test_flush_waits_for_writes_received_before_it(server: ServerThread,
                                                   backend: ScriptedBackend) -> None:
    backend.write_delay = 0.2
    h = nbd.NBD()
    h.connect_uri(server.uri("disk"))
    done: list[str] = []
    for i in range(3):
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(4096)), i * 4096,
                     completion=appends(done, "write"))
    h.aio_flush(completion=appends(done, "flush"))
    while len(done) < 4:
        h.poll(100)
    assert done == ["write"] * 3 + ["flush"]
    assert [e[0] for e in backend.log] == ["write"] * 3 + ["flush"]
    h.shutdown()


def test_several_connections_at_once(server: ServerThread) -> None:
    handles = []
    for i in range(6):
        h = nbd.NBD()
        h.connect_uri(server.uri("disk"))
        h.pwrite(bytes([i]) * 4096, i * 4096)
        handles.append(h)
    for i, h in enumerate(handles):
        assert h.pread(4096, i * 4096) == bytes([i]) * 4096
        h.shutdown()
    wait_for(lambda: server.connection_count() == 0, what="connections to close")


def test_kicking_a_connection(server: ServerThread) -> None:
    h = nbd.NBD()
    h.connect_uri(server.uri("disk"))
    srv = server.server
    assert srv is not None
    wait_for(lambda: any(c.export_name == "disk" for c in list(srv.connections)))
    [conn] = [c for c in list(srv.connections) if c.export_name == "disk"]
    assert conn.peer.identity == "test-guest" and "pid=" in conn.peer.address
    server.call(conn.close())
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    assert server.connection_count() == 0
