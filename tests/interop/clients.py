"""The same battery of real NBD clients, run against any server URI."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.support import run


def libnbd():  # type: ignore[no-untyped-def]
    import nbd  # Debian's python3-libnbd (tests/conftest.py puts it on sys.path)

    return nbd


def qemu_io_patterns(uri: str) -> None:
    # qemu-io exits 1 on a pattern mismatch even if other commands passed.
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0xab 0 1M", "-c", "write -P 0x5c 1M 64k",
         "-c", "flush", "-c", "read -P 0xab 0 1M", "-c", "read -P 0x5c 1M 64k"])
    bad = run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0xcd 0 4k"], check=False)
    assert bad.returncode != 0 or "Pattern verification failed" in bad.stdout + bad.stderr


def qemu_img_roundtrip(uri: str, work: Path, size: int) -> None:
    src = work / "src.img"
    with open(src, "wb") as f:
        f.truncate(size)
        for off in range(0, size, size // 8):
            f.seek(off)
            f.write(os.urandom(65536))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri])
    # And a real difference is noticed: compare exits 1.
    with open(src, "r+b") as f:
        f.seek(size // 3)
        f.write(b"different")
    assert run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri], check=False).returncode == 1


def nbdcopy_both_ways(uri: str, work: Path, size: int) -> None:
    src, back = work / "copy-in.img", work / "copy-out.img"
    src.write_bytes(os.urandom(size))
    run(["nbdcopy", str(src), uri])
    run(["nbdcopy", uri, str(back)])  # the whole export comes back
    data = back.read_bytes()
    assert len(data) >= size
    assert data[:size] == src.read_bytes()


def nbdinfo_facts(uri: str, size: int) -> dict[str, object]:
    out = run(["nbdinfo", "--json", uri]).stdout
    info = json.loads(out)
    export = info["exports"][0]
    assert export["export-size"] == size
    assert export["block_size_minimum"] == 1
    assert export["block_size_maximum"] == 64 << 20
    assert export["block_size_preferred"] == 4096
    assert export["can_flush"] and export["can_fua"] and export["can_trim"] and export["can_zero"]
    assert not export["is_read_only"]
    return export  # type: ignore[no-any-return]


def fio_short(uri: str, size: str = "4m") -> None:
    # serialize_overlap: fio itself may otherwise read a block while its write is in flight.
    out = run(["fio", "--name=t", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--bs=4k",
               "--iodepth=16", f"--size={size}", "--serialize_overlap=1", "--runtime=2", "--time_based",
               "--verify=crc32c", "--verify_state_save=0",
               "--output-format=json"], timeout=120).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] > 0 and job["write"]["io_bytes"] > 0


def libnbd_requests(uri: str) -> None:
    nbd = libnbd()
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        block = os.urandom(4096)
        h.pwrite(block, 8192, nbd.CMD_FLAG_FUA)
        assert h.pread(4096, 8192) == block
        h.flush()
        h.trim(4096, 8192)
        assert h.pread(4096, 8192) == bytes(4096)
        h.pwrite(b"\xff" * 8192, 16384)
        h.zero(8192, 16384)
        assert h.pread(8192, 16384) == bytes(8192)
        # A 512-byte write inside a 4 KiB block keeps its neighbours (read-modify-write).
        h.pwrite(b"\x11" * 4096, 32768)
        h.pwrite(b"\x22" * 512, 32768 + 1024)
        expect = b"\x11" * 1024 + b"\x22" * 512 + b"\x11" * (4096 - 1536)
        assert h.pread(4096, 32768) == expect
        assert h.pread(512, 32768 + 1024) == b"\x22" * 512
        size = h.get_size()
        try:
            h.pread(4096, size)  # past the end
        except nbd.Error as exc:
            assert exc.errno in ("EINVAL", "EIO") or exc.errnum is not None
        else:
            raise AssertionError("read past the end succeeded")
    finally:
        h.shutdown()


def byte_sized_and_long_requests(uri: str) -> None:
    """1-, 3- and 513-byte reads and writes at odd offsets and a 40 MiB round trip, against a
    reference (the export must be at least 48 MiB)."""
    nbd = libnbd()
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        reference = bytearray(h.pread(48 << 20, 0))
        big = os.urandom(40 << 20)
        h.pwrite(big, 4097)
        reference[4097:4097 + len(big)] = big
        for offset, length in [(1, 1), (3, 3), (4095, 513), (8191, 2), ((40 << 20) + 5, 513)]:
            chunk = os.urandom(length)
            h.pwrite(chunk, offset)
            reference[offset:offset + length] = chunk
            assert h.pread(length, offset) == reference[offset:offset + length]
        h.flush()
        assert h.pread(48 << 20, 0) == reference
    finally:
        h.shutdown()
