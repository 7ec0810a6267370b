"""`nbdinfo --map`, `qemu-img map` and libnbd's block_status against `trustvbd up`'s
encryption domain: holes are blocks whose leaf says zeros (never written, trimmed)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support
from tests.interop import clients
from tests.support import System, run

MIB = 1 << 20
SIZE = 32 * MIB
HOLE_ZERO = 3

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    root = Path(tempfile.mkdtemp(prefix="tvb", dir="/tmp"))
    s = System(root, support.config(
        support.driver("drv-a", "StorageA", dir="backing/a"),
        support.disk("payroll", "PayrollData", ["drv-a"], size=SIZE, encrypt=True),
        support.guest("vm1", "Payroll")))
    s.start()
    yield s
    s.kill()
    shutil.rmtree(root, ignore_errors=True)


def nbdinfo_map(uri: str) -> list[tuple[int, int, int]]:
    out = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in out]


def test_map_shows_written_blocks_as_data_and_the_rest_as_holes(system: System) -> None:
    uri = system.uri("vm1", "payroll")
    assert nbdinfo_map(uri) == [(0, SIZE, HOLE_ZERO)]  # a new disk: nothing written
    # 100 bytes inside a block make the whole block data; a trimmed range is a hole again.
    run(["qemu-io", "-f", "raw", uri, "-c", f"write -P 0xab {MIB + 100} 100",
         "-c", f"write -P 0x5c {8 * MIB} {4 * MIB}", "-c", f"discard {9 * MIB} {MIB}",
         "-c", f"write -z {11 * MIB} 4k", "-c", "flush"])
    assert nbdinfo_map(uri) == [
        (0, MIB, HOLE_ZERO), (MIB, 4096, 0), (MIB + 4096, 7 * MIB - 4096, HOLE_ZERO),
        (8 * MIB, MIB, 0), (9 * MIB, MIB, HOLE_ZERO), (10 * MIB, MIB, 0),
        (11 * MIB, 4096, HOLE_ZERO), (11 * MIB + 4096, MIB - 4096, 0),
        (12 * MIB, SIZE - 12 * MIB, HOLE_ZERO)]
    totals = run(["nbdinfo", "--map", "--totals", "--json", uri]).stdout
    by_type = {t["type"]: t["size"] for t in json.loads(totals)}
    assert by_type == {0: 3 * MIB, HOLE_ZERO: SIZE - 3 * MIB}
    # qemu-img map (its own client) agrees; the data still reads back.
    mapped = json.loads(run(["qemu-img", "map", "-f", "raw", "--output=json", uri]).stdout)
    data = [(e["start"], e["length"]) for e in mapped if e["data"]]
    assert data == [(MIB, 4096), (8 * MIB, MIB), (10 * MIB, MIB), (11 * MIB + 4096, MIB - 4096)]
    run(["qemu-io", "-f", "raw", uri, "-c", f"read -P 0xab {MIB + 100} 100",
         "-c", f"read -P 0 {9 * MIB} {MIB}", "-c", f"read -P 0x5c {10 * MIB} {MIB}"])


def test_nbdcopy_skips_the_holes(system: System, short_tmp: Path) -> None:
    uri = system.uri("vm1", "payroll")
    run(["qemu-io", "-f", "raw", uri, "-c", f"write -P 0x3c {16 * MIB} {2 * MIB}"])
    out, blind = short_tmp / "copy.img", short_tmp / "blind.img"
    # --sparse=0: nbdcopy does not look for zeros in the data itself, so only the
    # server's extents can keep it from writing the holes.
    run(["nbdcopy", "--sparse=0", uri, str(out)])
    run(["nbdcopy", "--sparse=0", "--no-extents", uri, str(blind)])
    assert out.stat().st_size == SIZE
    assert out.stat().st_blocks * 512 < 8 * MIB  # only the data extents were written
    assert blind.stat().st_blocks * 512 == SIZE  # without them: everything
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(out), uri])


def test_libnbd_block_status_with_req_one_and_past_the_end(system: System) -> None:
    nbd = clients.libnbd()
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(system.uri("vm1", "payroll"))
    h.pwrite(b"\x77" * 8192, 20 * MIB)
    got: list[int] = []

    def extent(context: str, offset: int, entries: list[int], err: object) -> int:
        got.extend(entries)
        return 0

    h.block_status(MIB, 20 * MIB - 4096, extent, nbd.CMD_FLAG_REQ_ONE)
    assert got == [4096, HOLE_ZERO]  # one extent, though more follow
    got.clear()
    h.block_status(MIB, 20 * MIB - 4096, extent)
    assert got == [4096, HOLE_ZERO, 8192, 0, MIB - 12288, HOLE_ZERO]
    with pytest.raises(nbd.Error):
        h.block_status(8192, SIZE - 4096, extent)
    assert h.pread(8192, 20 * MIB) == b"\x77" * 8192  # the connection goes on
    h.shutdown()
