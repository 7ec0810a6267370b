"""Crash consistency without a data journal, simulated at the layer level.

Each round opens the disk over a replica with a volatile write cache, runs a
random stream of writes, trims, zeroes, flushes and FUA writes, and crashes at
a random point: a replica operation (possibly forwarding only part of a
multi-block write, torn at 4 KiB) or a trusted-state step (anchor, intent log,
page hashes), which abandons the CryptDisk object mid-request or mid-commit.
Then a random subset of the replica's unflushed 4 KiB writes reaches "disk"
and the disk is reopened from those bytes and the trusted state directory:

- every write acknowledged before the last completed flush (or with FUA)
  reads back exactly;
- every other block reads as its old or one of its newer contents;
- never an integrity error;
- no version (GCM nonce) is ever used twice, across all rounds.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import pytest

from tests.crypt.helpers import BS, SimulatedReplica, new_state, run
from trustvbd.blockdev import BlockError
from trustvbd.blocks import crypt_commit
from trustvbd.blocks.crypt_layer import CryptDisk, physical_size
from trustvbd.blocks.disk_state import DiskState
from trustvbd.blocks.intent_log import IntentLog
from trustvbd.blocks.reconnect import ReplicaLink
from trustvbd.blocks.tree_file import TreeFile
from trustvbd.crypt.aead import BlockCipher

NBLOCKS = 300  # 3 leaf pages: commits write several
SIZE = NBLOCKS * BS
ROUNDS = 200


class Crash(Exception):
    """The simulated crash point was reached."""


class Clock:
    """Counts crash-eligible steps (replica ops and trusted-state writes)."""

    def __init__(self) -> None:
        self.step = 0
        self.crash_at: int | None = None
        self.dead = False
        self.rng = random.Random()
        self.links: list[ReplicaLink] = []  # every replica link made, for their counts

    def tick(self) -> bool:
        """True if this step is the crash point (the caller decides how it tears)."""
        if self.dead:
            raise Crash("already dead")
        self.step += 1
        if self.crash_at is not None and self.step >= self.crash_at:
            self.dead = True
            return True
        return False


class CachedReplica(SimulatedReplica):
    """A replica whose writes sit in a volatile cache until FLUSH."""

    def __init__(self, durable: bytearray, clock: Clock) -> None:
        self.durable = durable
        self.pending: list[tuple[int, bytes]] = []  # 4 KiB pieces, in write order
        self.clock = clock

    @property
    def size(self) -> int:
        return len(self.durable)

    def _pieces(self, offset: int, data: bytes) -> list[tuple[int, bytes]]:
        assert offset % BS == 0 and len(data) % BS == 0, "CryptDisk writes whole 4 KiB units"
        return [(offset + i, data[i:i + BS]) for i in range(0, len(data), BS)]

    async def pread(self, offset: int, length: int) -> bytes:
        if self.clock.tick():
            raise Crash("read")
        out = bytearray(self.durable[offset:offset + length])
        for o, piece in self.pending:
            if offset <= o < offset + length:
                out[o - offset:o - offset + BS] = piece
        return bytes(out)

    async def pwrite(self, offset: int, data: Any, fua: bool = False) -> None:
        pieces = self._pieces(offset, bytes(data))
        if self.clock.tick():
            rng = self.clock.rng
            self.pending += [p for p in pieces if rng.random() < 0.5]  # torn at 4 KiB
            raise Crash("write")
        if fua:  # this write is durable once answered, and only this one (NBD's FUA)
            for o, piece in pieces:
                self.durable[o:o + BS] = piece
            self.pending = [(o, p) for o, p in self.pending if not offset <= o < offset + len(data)]
        else:
            self.pending += pieces

    async def flush(self) -> None:
        if self.clock.tick():
            if self.clock.rng.random() < 0.5:
                self._persist_all()  # the flush happened; we died before hearing back
            raise Crash("flush")
        self._persist_all()

    def _persist_all(self) -> None:
        for o, piece in self.pending:
            self.durable[o:o + BS] = piece
        self.pending.clear()

    def power_cut(self, rng: random.Random) -> None:
        """A random subset of unflushed pieces reached the medium, in order."""
        for o, piece in self.pending:
            if rng.random() < 0.5:
                self.durable[o:o + BS] = piece
        self.pending.clear()


@pytest.fixture
def crashing_state(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Make trusted-state writes crash points too; record every version encrypted."""
    clock = Clock()

    def crashing(original: Any, tear: Any = None) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if clock.tick():
                how = clock.rng.random()
                if how < 0.4:
                    raise Crash(original.__name__ + " before")
                start = self.end if tear is not None else 0
                original(self, *args, **kwargs)
                if tear is not None and how < 0.7:
                    tear(self, start)
                raise Crash(original.__name__ + " after")
            return original(self, *args, **kwargs)
        return wrapper

    def tear_intent(log: IntentLog, start: int) -> None:
        end = log.end  # a torn last record (a flush mark is 20 bytes): its tail never landed
        cut = clock.rng.randrange(1, min(60, end - start))
        os.pwrite(log._fd, bytes(cut), end - cut)

    # Tiny counter reservations, so reserving (an anchor write) happens mid-stream.
    monkeypatch.setattr(crypt_commit, "RESERVE", 24)
    # Some FLUSHes commit, the others let the intent log stand for a commit (flush marks).
    monkeypatch.setattr(crypt_commit, "CHECKPOINT_BLOCKS", 12)
    monkeypatch.setattr(DiskState, "write_anchor", crashing(DiskState.write_anchor))
    monkeypatch.setattr(TreeFile, "write_back", crashing(TreeFile.write_back))
    monkeypatch.setattr(IntentLog, "reset", crashing(IntentLog.reset))
    # Every write of records (leaf records, held back ones together, tree records, marks).
    monkeypatch.setattr(IntentLog, "_put", crashing(IntentLog._put, tear_intent))

    versions: list[int] = []
    seal = BlockCipher.seal

    def recording(self: BlockCipher, first_block: int, first_version: int, plain: Any) -> tuple[bytes, bytes]:
        versions.extend(range(first_version, first_version + len(plain) // BS))
        return seal(self, first_block, first_version, plain)

    monkeypatch.setattr(BlockCipher, "seal", recording)
    clock.versions = versions  # type: ignore[attr-defined]
    return clock


class Model:
    """What each block may read as: its durable contents, or anything written since."""

    def __init__(self) -> None:
        self.cur = bytearray(SIZE)
        self.durable = bytearray(SIZE)
        self.since: dict[int, list[bytes]] = {}

    def apply(self, offset: int, data: bytes) -> None:
        self.cur[offset:offset + len(data)] = data
        for b in range(offset // BS, -(-(offset + len(data)) // BS)):
            self.since.setdefault(b, []).append(bytes(self.cur[b * BS:(b + 1) * BS]))

    def commit(self) -> None:
        self.durable[:] = self.cur
        self.since.clear()

    def allowed(self, b: int) -> list[bytes]:
        return [bytes(self.durable[b * BS:(b + 1) * BS]), *self.since.get(b, [])]


async def _session(tmp: Path, kek: Any, replicas: list[CachedReplica], model: Model,
                   rng: random.Random) -> None:
    """Open, then random requests until the crash (or the stream ends)."""
    disk = await CryptDisk.open_mirrored(tmp, "vm1", _named(replicas), kek)
    try:
        await _requests(disk, model, rng)
    except BlockError:
        # A write behind met the crash in the background; what waited for it saw EIO.
        if not replicas[0].clock.dead:
            raise
        raise Crash("a write behind died") from None
    finally:
        disk._state.close()  # abandoned, never closed: close() would commit
        disk._commits.tree.close()  # a dead process's files close with it
        if disk._behind._timer is not None:
            # A dead process's timers die with it; left armed, the gather timer fired
            # while asyncio.run shut down and made a send task that never ran.
            disk._behind._timer.cancel()


async def _requests(disk: CryptDisk, model: Model, rng: random.Random) -> None:
    for _ in range(rng.randrange(1, 25)):
        r = rng.random()
        if r < 0.12:
            await disk.flush()
            model.commit()
            continue
        if r < 0.22:  # read back: the open disk always returns the latest data
            b = rng.randrange(NBLOCKS)
            n = min(rng.choice([1, 4, 16]), NBLOCKS - b)
            assert bytes(await disk.pread(b * BS, n * BS)) == model.cur[b * BS:(b + n) * BS]
            continue
        fua = rng.random() < 0.15
        # A third of the requests on a few hot blocks, as a filesystem's metadata: rewrites
        # of blocks whose write behind is still held or in flight.
        b = rng.randrange(6) if rng.random() < 0.35 else rng.randrange(NBLOCKS)
        n = min(rng.choice([1, 1, 2, 3, 8, 40]), NBLOCKS - b)
        if r < 0.30:
            offset, length = b * BS + rng.randrange(BS), rng.randrange(1, n * BS)
            length = min(length, SIZE - offset)
            model.apply(offset, bytes(length))
            if r < 0.26:
                await disk.trim(offset, length, fua)
            else:
                await disk.zero(offset, length, fua)
        else:
            if rng.random() < 0.2:  # unaligned: read-modify-write
                offset = b * BS + rng.randrange(BS)
                data = rng.randbytes(min(rng.randrange(1, n * BS), SIZE - offset))
            else:
                offset, data = b * BS, rng.randbytes(n * BS)
            model.apply(offset, data)
            # As the NBD server does: inline where the disk takes it (write_inline), else
            # pwrite.
            if not disk.write_inline(offset, data, fua):
                await disk.pwrite(offset, data, fua)
        if fua:
            model.commit()
    await disk.settle()  # the domain lives on: writes answered early reach the replicas


async def settle(disk: CryptDisk) -> None:
    """Wait (bounded) until every replica is current again."""
    for _ in range(500):
        if len(disk.replicas.current) == len(disk.replicas.replicas):
            return
        if disk.replicas.joining():
            await disk.flush()
        await asyncio.sleep(0.002)
    raise AssertionError(f"replicas did not settle: {disk.replicas.status()}")


def open_under(path: Path) -> list[str]:
    """The files under `path` this process holds open."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own fd)
            continue
        if target.startswith(f"{path}/"):
            out.append(target)
    return out


def _named(replicas: list[CachedReplica]) -> list[tuple[str, Any]]:
    """Each replica behind the link the encryption domain keeps to a driver, which sends no
    FLUSH when every write since the last one went with FUA (reconnect.py)."""
    async def never() -> Any:
        raise ConnectionError("a simulated replica does not reconnect")
    out: list[tuple[str, Any]] = []
    for i, r in enumerate(replicas):
        link = ReplicaLink(r, f"r{i}", never, retry_window=0 if len(replicas) > 1 else 1)
        r.clock.links.append(link)
        out.append((f"r{i}", link))
    return out


@pytest.mark.parametrize("copies", [1, 2, 3])
def test_crash_anywhere_loses_nothing_acknowledged(tmp_path: Path, crashing_state: Clock,
                                                   copies: int) -> None:
    """With 2 and 3 replicas the crash point may fall between one replica's write,
    flush or superblock and another's: a commit that reached only some of them."""
    clock = crashing_state
    seed = int(os.environ.get("TRUSTVBD_CRASH_SEED", "20240611")) + copies - 1
    rng, clock.rng = random.Random(seed), random.Random(seed + 1)
    kek = new_state(tmp_path, size=SIZE)
    durables = [bytearray(physical_size(SIZE)) for _ in range(copies)]
    model = Model()
    crashes = {"open": 0, "session": 0, "none": 0}
    rounds = ROUNDS if copies == 1 else 60

    for _ in range(rounds):
        replicas = [CachedReplica(d, clock) for d in durables]
        clock.step, clock.dead = 0, False
        clock.crash_at = rng.randrange(1, 40 * copies)
        try:
            run(_session(tmp_path, kek, replicas, model, rng))
        except Crash:
            pass
        # A write answered before its replicas (write_behind.py) meets the crash in the
        # background, where it is not raised to the session: the clock knows.
        if clock.dead:
            crashes["open" if clock.step <= 12 * copies else "session"] += 1
        else:
            crashes["none"] += 1
        for replica in replicas:
            replica.power_cut(rng)

        # Reopen on what reached the media plus the trusted state: must always work.
        clock.crash_at, clock.step, clock.dead = None, 0, False
        replicas = [CachedReplica(d, clock) for d in durables]

        async def check(replicas: list[CachedReplica]) -> None:
            disk = await CryptDisk.open_mirrored(tmp_path, "vm1", _named(replicas), kek)
            got = bytes(await disk.pread(0, SIZE))  # raises on any integrity error
            for b in range(NBLOCKS):
                block = got[b * BS:(b + 1) * BS]
                assert block in model.allowed(b), f"block {b} reads as neither durable nor newer"
            assert disk.integrity_events == 0
            # Replicas left behind are resynced and rejoin at a commit.
            await settle(disk)
            # Every replica the disk serves from (in turn) holds exactly this.
            for _ in disk.replicas.current:
                for b0 in range(0, NBLOCKS, 50):
                    assert bytes(await disk.pread(b0 * BS, 50 * BS)) == got[b0 * BS:(b0 + 50) * BS]
            model.cur[:] = got  # what recovery chose is now committed
            model.commit()
            await disk.close()

        run(check(replicas))

    # Each abandoned disk's files are closed as a dead process's are: ~300 `tree` fds were
    # left open across the three runs, in the worker that ran them.
    assert not open_under(tmp_path), open_under(tmp_path)
    assert crashes["session"] > rounds // 5 and crashes["open"] > 3  # we did crash a lot
    assert sum(link.flushes_skipped for link in clock.links) > rounds // 10  # and skipped
    versions = clock.versions  # type: ignore[attr-defined]
    assert len(versions) > 500
    assert len(set(versions)) == len(versions), "a GCM nonce was used twice"
