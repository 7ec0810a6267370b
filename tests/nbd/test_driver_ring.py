"""The ciphertext ring a driver maps read-only (docs/driver-ring.md), against a real
`trustvbd driver` process: the handshake's NBD_OPT_TRUSTVBD_RING passing the memfd by
SCM_RIGHTS, and RING_WRITE checked as a command of its own. The hostile cases speak
the wire by hand, so nothing of our client's checks stands in front of the driver's."""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import mmap
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import TRUSTVBD, read_lines_until
from trustvbd.nbd import protocol as p
from trustvbd.nbd.client import NbdClient
from trustvbd.nbd.ring import make_ring

SIZE = 8 << 20
RING = 1 << 20
OPT_MAGIC = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
EINVAL = 22


class Driver:
    def __init__(self, root: Path) -> None:
        self.file = root / "disk.img"
        self.sock = root / "d.sock"
        self.proc = subprocess.Popen(
            [*TRUSTVBD, "driver", "--file", str(self.file), "--size", str(SIZE), "--socket",
             str(self.sock)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        read_lines_until(self.proc, "ready", 30)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=30)


@pytest.fixture
def driver(short_tmp: Path) -> Iterator[Driver]:
    d = Driver(short_tmp)
    yield d
    if d.proc.poll() is None:
        d.stop()


class Raw:
    """A hand-spoken NBD client over a blocking Unix socket (simple replies)."""

    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(str(path))
        greeting = self.exact(18)
        assert greeting[:8] == b"NBDMAGIC"
        self.s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        self.cookie = 0

    def exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = self.s.recv(n - len(out))
            assert got, "the driver closed the connection"
            out += got
        return out

    def option(self, opt: int, data: bytes = b"") -> None:
        self.s.sendall(struct.pack(">QII", OPT_MAGIC, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, bytes]:
        magic, _opt, rep, n = struct.unpack(">QIII", self.exact(20))
        assert magic == REPLY_MAGIC
        return rep, self.exact(n)

    def offer_ring(self, fd: int | None, size: int = RING, fds: int = 1) -> tuple[int, bytes]:
        self.option(p.Opt.TRUSTVBD_RING, size.to_bytes(8, "big"))
        rep, _ = self.option_reply()
        assert rep == p.Rep.TRUSTVBD_RING_SEND
        carried = [] if fd is None else [fd] * fds
        self.s.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", carried))] if carried else [])
        return self.option_reply()

    def go(self) -> None:
        self.option(p.Opt.GO, struct.pack(">IH", 0, 0))
        while True:
            rep, _ = self.option_reply()
            if rep == p.Rep.ACK:
                return
            assert rep == p.Rep.INFO, rep

    def request(self, typ: int, offset: int, length: int, payload: bytes = b"",
                flags: int = 0) -> int:
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, typ, self.cookie, offset, length)
                       + payload)
        magic, error, cookie = struct.unpack(">IIQ", self.exact(16))
        assert magic == 0x67446698 and cookie == self.cookie
        return error

    def ring_write(self, offset: int, at: int, length: int, header_length: int | None = None
                   ) -> int:
        return self.request(p.Cmd.TRUSTVBD_RING_WRITE, offset,
                            length if header_length is None else header_length,
                            struct.pack(">QQ", at, length))

    def read(self, offset: int, length: int) -> bytes:
        assert self.request(p.Cmd.READ, offset, length) == 0
        return self.exact(length)


def _ring_with(data: bytes, at: int) -> tuple[int, int]:
    rw, ro = make_ring(RING)
    os.pwrite(rw, data, at)
    return rw, ro


def test_a_ring_write_is_pwritten_from_the_ring_and_checked_as_a_command_of_its_own(
        driver: Driver) -> None:
    data = os.urandom(256 << 10)
    rw, ro = _ring_with(data, 512 << 10)
    raw = Raw(driver.sock)
    rep, _ = raw.offer_ring(ro)
    assert rep == p.Rep.ACK
    raw.go()
    assert raw.ring_write(1 << 20, 512 << 10, len(data)) == 0
    assert raw.read(1 << 20, len(data)) == data
    # Outside the ring (its end, and an offset that wraps), a length that is not the
    # header's, past the export's end: each refused, and the connection goes on.
    assert raw.ring_write(0, RING - 4096, 8192) == EINVAL
    assert raw.ring_write(0, (1 << 64) - 4096, 8192) == EINVAL
    assert raw.ring_write(0, 0, 4096, header_length=8192) == EINVAL
    assert raw.ring_write(SIZE - 4096, 0, 8192) == 28  # ENOSPC, as a WRITE
    assert raw.read(0, 8192) == bytes(8192)  # none of them wrote
    assert raw.ring_write(0, 512 << 10, 4096, ) == 0
    assert raw.read(0, 4096) == data[:4096]
    os.close(rw)
    os.close(ro)
    assert driver.file.read_bytes()[1 << 20:(1 << 20) + len(data)] == data


def test_a_ring_write_on_a_connection_that_agreed_none_is_refused(driver: Driver) -> None:
    raw = Raw(driver.sock)
    raw.go()
    assert raw.ring_write(0, 0, 4096) == EINVAL
    assert raw.request(p.Cmd.WRITE, 0, 4, b"abcd") == 0  # the descriptor was read past
    assert raw.read(0, 4) == b"abcd"


@pytest.mark.parametrize("what", ["read-write", "unsealed", "wrong size", "no descriptor",
                                  "two descriptors"])
def test_a_ring_the_driver_could_write_or_see_resized_is_refused(driver: Driver, what: str
                                                                 ) -> None:
    rw, ro = make_ring(RING)
    fd = ro
    size = RING
    if what == "read-write":
        fd = rw
    elif what == "unsealed":
        fd = os.memfd_create("unsealed")
        os.ftruncate(fd, RING)
        fd_ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        os.close(fd)
        fd = fd_ro
    elif what == "wrong size":
        size = 2 * RING
    raw = Raw(driver.sock)
    rep, text = raw.offer_ring(None if what == "no descriptor" else fd, size,
                               fds=2 if what == "two descriptors" else 1)
    assert rep == p.Rep.ERR_INVALID, (rep, text)
    raw.go()
    assert raw.ring_write(0, 0, 4096) == EINVAL  # not agreed
    assert raw.read(0, 4) == bytes(4)


def test_the_ring_passed_cannot_be_mapped_writable_and_the_driver_maps_it_read_only(
        driver: Driver) -> None:
    rw, ro = make_ring(RING)
    with pytest.raises(PermissionError):
        mmap.mmap(ro, RING, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    assert fcntl.fcntl(ro, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    raw = Raw(driver.sock)
    assert raw.offer_ring(ro)[0] == p.Rep.ACK
    raw.go()
    assert raw.ring_write(0, 0, 4096) == 0  # the native loop has mapped it by now
    pid = driver.proc.pid
    workers = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    maps = [line for w in workers for line in Path(f"/proc/{w}/maps").read_text().splitlines()
            if "trustvbd-ring" in line]
    assert maps, "the driver did not map the ring"
    assert all(line.split()[1] == "r--s" for line in maps), maps
    raw.s.close()
    os.close(rw)
    os.close(ro)


def test_our_client_offers_the_ring_and_sends_ring_writes(driver: Driver) -> None:
    async def main() -> None:
        data = os.urandom(256 << 10)
        rw, ro = _ring_with(data, 0)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(driver.sock))
        client = await NbdClient.connect(sock, "", ring=(ro, RING))
        assert client.ring
        descriptor = struct.pack(">QQ", 0, len(data))
        future = client._send_writes([(4096, descriptor)], 0, (SIZE, 1, 32 << 20), True)
        assert future is not None
        assert await future == [None]
        assert await client.pread(4096, len(data)) == data
        await client.close()
        os.close(rw)
        os.close(ro)

    asyncio.run(main())


def test_our_client_without_a_ring_server_goes_on_without_it(short_tmp: Path) -> None:
    image = short_tmp / "q.img"
    image.write_bytes(bytes(SIZE))
    path = short_tmp / "q.sock"
    qemu = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(path), "-t", str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async def main() -> None:
            for _ in range(100):
                if path.exists():
                    break
                await asyncio.sleep(0.05)
            rw, ro = make_ring(RING)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
            client = await NbdClient.connect(sock, "", ring=(ro, RING))
            assert not client.ring  # NBD_REP_ERR_UNSUP: plain WRITEs
            await client.pwrite(0, b"x" * 4096)
            assert await client.pread(0, 4096) == b"x" * 4096
            await client.close()
            os.close(rw)
            os.close(ro)

        asyncio.run(main())
    finally:
        qemu.terminate()
        qemu.wait(30)


def test_make_ring_is_sealed_against_resizing() -> None:
    rw, ro = make_ring(RING)
    for size in (RING // 2, 2 * RING):
        with pytest.raises(PermissionError):
            os.ftruncate(rw, size)
    with pytest.raises(OSError) as exc:
        fcntl.fcntl(rw, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    assert exc.value.errno == errno.EPERM
    assert fcntl.fcntl(rw, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SEAL
    os.close(rw)
    os.close(ro)
