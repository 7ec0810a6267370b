"""Write payload buffers are reused, but never while anything still refers to them."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import nbd
import pytest

from tests.nbd.helpers import ServerThread
from trustvbd.blocks.file import FileBackend
from trustvbd.nbd.buffer_pool import BufferPool
from trustvbd.nbd.exports import Export, StaticExports

KiB = 1024


def test_a_buffer_given_back_is_reused_once_nothing_refers_to_it() -> None:
    pool = BufferPool()
    buf = pool.get(256 * KiB)
    view = memoryview(buf)[100:]  # as the transport holds it until buffer_updated returns
    pool.give_back(buf)
    del buf
    other = pool.get(256 * KiB)
    assert pool.allocated == 2, "a buffer with a live view must not be handed out"
    view.release()
    ident = id(other)
    pool.give_back(other)
    del other
    assert id(pool.get(256 * KiB)) == ident and pool.allocated == 2  # given back, reused


def test_a_buffer_someone_keeps_is_never_handed_out_again() -> None:
    pool = BufferPool()
    kept = pool.get(64 * KiB)
    kept[:5] = b"keep!"
    pool.give_back(kept)  # e.g. a backend that held on to the payload
    fresh = [pool.get(64 * KiB) for _ in range(3)]
    assert all(f is not kept for f in fresh)
    for f in fresh:
        f[:5] = b"XXXXX"
        pool.give_back(f)
    del f, fresh
    again = [pool.get(64 * KiB) for _ in range(4)]
    assert all(a is not kept for a in again)
    assert bytes(kept[:5]) == b"keep!"


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_file_backend_served_inline_reuses_its_payload_buffers(
    short_tmp: Path, loop_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python serves a file's write inline, from inside buffer_updated, while the transport
    still holds the payload buffer: it used to allocate and zero a new one for every write.
    (An idle timeout keeps the connection from the native loop, nbd/file_serve.py, which
    has no payload buffers.)"""
    pools: list[BufferPool] = []
    real_init = BufferPool.__init__

    def tracked_init(self: BufferPool) -> None:
        real_init(self)
        pools.append(self)

    monkeypatch.setattr(BufferPool, "__init__", tracked_init)
    size, chunk = 16 * 1024 * KiB, 256 * KiB
    path = short_tmp / "d.img"
    backend = FileBackend(str(path), size)
    content = os.urandom(size)
    with ServerThread(StaticExports([Export("", backend)]), short_tmp / "s.sock", loop_kind,
                      idle_timeout=3600.0) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        for offset in range(0, size, chunk):  # one at a time: each is served inline
            h.pwrite(content[offset:offset + chunk], offset)
        h.flush()
        assert h.pread(size, 0) == content
        h.shutdown()
    asyncio.run(backend.close())
    assert path.read_bytes() == content
    allocated = sum(pool.allocated for pool in pools)
    assert 1 <= allocated <= 4, f"{allocated} payload buffers allocated for {size // chunk} writes"


def test_a_view_given_back_recycles_its_buffer_only_once_every_view_is_gone() -> None:
    """A received WRITE's payload is a view of a larger pool buffer (room for the next
    header): given back as a view, its buffer is reused, but not while a view lives."""
    pool = BufferPool()
    buf = pool.get(256 * KiB + 32)
    payload = memoryview(buf)[:256 * KiB]
    transport_view = memoryview(buf)[1000:]  # the read that ended the payload, still held
    ident = id(buf)
    del buf
    pool.give_back(payload)
    del payload
    other = pool.get(256 * KiB + 32)
    assert id(other) != ident and pool.allocated == 2
    transport_view.release()
    assert id(pool.get(256 * KiB + 32)) == ident and pool.allocated == 2  # kept, then reused
