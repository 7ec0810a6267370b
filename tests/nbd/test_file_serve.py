"""A file export's connection served by the native loop on a thread of its own
(nbd/file_serve.py): it needs nothing of the event loop once the handshake is done."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import nbd  # Debian's python3-libnbd, put on sys.path by tests/conftest.py

from tests.nbd.helpers import ServerThread
from trustvbd.blocks.file import FileBackend
from trustvbd.nbd.exports import Export, StaticExports

MiB = 1 << 20


def test_a_file_export_is_served_while_the_event_loop_is_blocked(short_tmp: Path) -> None:
    # Once attached, WRITEs, FUA, FLUSH, READs, and the rare requests Python does (TRIM,
    # BLOCK_STATUS, called from the connection's own thread) all go on while the event loop
    # is stuck in a callback: no request waits for a loop turn.
    disk = short_tmp / "disk.img"
    fb = FileBackend(str(disk), 8 * MiB)
    data = os.urandom(MiB)
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop") as srv:
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(srv.uri())
        h.pwrite(b"\x01" * 4096, 0)
        blocked, release = threading.Event(), threading.Event()

        def stuck() -> None:
            blocked.set()
            release.wait(60)

        srv.loop.call_soon_threadsafe(stuck)
        assert blocked.wait(10)
        done = threading.Event()
        seen: dict[str, object] = {}

        def client() -> None:
            h.pwrite(data, MiB)
            h.pwrite(data[:4096], 4 * MiB, nbd.CMD_FLAG_FUA)
            h.flush()
            seen["read"] = h.pread(MiB, MiB) == data
            h.trim(3 * MiB, MiB + MiB // 2)
            extents: list[int] = []

            def extent(_context: str, _offset: int, entries: list[int], _err: object) -> int:
                extents.extend(entries)
                return 0

            h.block_status(4 * MiB, 0, extent)
            seen["status"] = extents
            done.set()

        worker = threading.Thread(target=client, daemon=True)
        worker.start()
        try:
            assert done.wait(30), "the connection waited for the blocked event loop"
        finally:
            release.set()
            worker.join(60)
        assert seen["read"] is True
        # 4 KiB of data, a hole, 512 KiB of data, then the trimmed hole.
        assert seen["status"] == [4096, 0, MiB - 4096, 3, MiB // 2, 0, 2 * MiB + MiB // 2, 3]
        h.shutdown()
    fb.close_now()
    content = disk.read_bytes()
    assert content[MiB:MiB + MiB // 2] == data[:MiB // 2]
    assert content[MiB + MiB // 2:4 * MiB] == bytes(3 * MiB - MiB // 2)


def _voluntary_switches(tid: int) -> int:
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for thread {tid}")


def test_a_qd1_read_wakes_the_serving_thread_once(short_tmp: Path) -> None:
    # The native loop sleeps in poll, not in read: a thread asleep in a Unix socket's read
    # is woken also when the client takes the reply (write space wakes every sleeper) and
    # sleeps again, a second wake-up per request. Counted: its voluntary context switches.
    fb = FileBackend(str(short_tmp / "disk.img"), 8 * MiB)
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        h.pwrite(os.urandom(MiB), 0)
        serving = [t for t in threading.enumerate() if t.name.startswith("nbd ")]
        assert len(serving) == 1 and serving[0].native_id is not None, "not served natively"
        tid = serving[0].native_id
        reads = 400
        before = _voluntary_switches(tid)
        for i in range(reads):
            h.pread(4096, (i * 37 % 256) * 4096)
        slept = _voluntary_switches(tid) - before
        h.shutdown()
    assert reads * 0.25 <= slept <= reads * 1.25, f"{slept} sleeps for {reads} reads: woken twice per request?"


def _write_calls(tid: int) -> int:
    for line in Path(f"/proc/self/task/{tid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError(f"no syscw for thread {tid}")


def test_a_big_write_is_pwritten_in_pieces_that_keep_page_cache_folios_small(
        short_tmp: Path) -> None:
    # The kernel sizes a page-cache folio by the write that makes it; a later 4 KiB write
    # into a large folio costs ext4 a walk over all its buffer heads (4-12 µs against 2-3
    # for a 32 KiB one: bench/README.md, session 19). So a WRITE's payload is pwritten in
    # pieces within 32 KiB-aligned spans of the file, not as it was received (~100 KiB and
    # more per receive). Counted: the serving thread's write system calls.
    disk = short_tmp / "disk.img"
    fb = FileBackend(str(disk), 8 * MiB)
    data = os.urandom(2 * MiB)
    with ServerThread(StaticExports([Export("", fb)]), short_tmp / "s.sock", "uvloop") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        h.pwrite(b"\x02" * 4096, 0)  # the connection is handed to the native loop
        serving = [t for t in threading.enumerate() if t.name.startswith("nbd ")]
        assert len(serving) == 1 and serving[0].native_id is not None, "not served natively"
        tid = serving[0].native_id
        before = _write_calls(tid)
        h.pwrite(data, 16 * 1024)  # starts mid-piece: 1 + 63 + 1 pieces
        calls = _write_calls(tid) - before
        h.shutdown()
    fb.close_now()
    assert calls >= 65 + 1, f"{calls} write calls for 2 MiB: pwritten in pieces of > 32 KiB?"
    assert disk.read_bytes()[16 * 1024:16 * 1024 + 2 * MiB] == data
