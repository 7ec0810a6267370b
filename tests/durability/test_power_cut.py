"""Nothing flushed is lost on power loss: a power cut after every single step.

A seeded workload of writes, trims, zeroes, FUA writes and flushes runs on an
encrypted disk whose trusted state directory sits on PowerCutFiles and whose
replica logs every write. Afterwards, for every event (each write, sync and
rename of the trusted state, each replica write and flush), the disk is
reopened from what a power cut right after that event leaves: the trusted
files as of their last sync, and the replica either with every write its
driver acknowledged (the driver kept power) or only with what it had flushed.

- the disk opens (never "tampering" for what a power cut did);
- every block whose last write was acknowledged before a completed FLUSH, or
  with FUA, reads back exactly that;
- a block written after that reads as its flushed content or one of its contents
  since, never as an integrity error: no ciphertext (writes behind, FUA writes,
  writes a FLUSH is expected to follow, forwarded trims) reaches the replica before
  the intent record that explains it is durable, so the driver keeping a write whose
  record the cut lost cannot happen.

The audit log gets the same treatment: every record acknowledged before the
cut is there, and the log verifies and can be appended to.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.crypt.helpers import RawMemory, new_state, pattern, run
from tests.durability.powercut import (
    BS,
    NO_SYNC,
    Events,
    Guest,
    Model,
    PowerCutFiles,
    TracedReplica,
    Write,
    abandon,
    read_and_check,
)
from trustvbd.acm.audit import MAX_BATCH, AuditError, AuditLog
from trustvbd.acm.audit_format import head_path
from trustvbd.acm.audit_read import verify
from trustvbd.blockdev import Backend, BlockError
from trustvbd.blocks import crypt_commit, intent_log
from trustvbd.blocks.crypt_layer import CryptDisk, physical_size
from trustvbd.blocks.disk_state import DiskState
from trustvbd.blocks.reconnect import ReplicaLink
from trustvbd.fileops import OsFileOps

NBLOCKS = 260  # three leaf pages
SIZE = NBLOCKS * BS
STEPS = int(os.environ.get("TRUSTVBD_POWERCUT_STEPS", "24"))


async def workload(state: Path, kek: object, files: PowerCutFiles, replica: TracedReplica,
                   events: Events, seed: int) -> tuple[Model, int]:
    """(what the guest was promised, how many FLUSHes the replica link did not send)."""
    guest = Guest(random.Random(seed), events, NBLOCKS)
    # Behind the link the encryption domain keeps to a driver: it sends no FLUSH when every
    # write since the last one went with FUA (reconnect.py).
    link = ReplicaLink(replica, "r0", never)
    disk = await CryptDisk.open(state, "vm1", link, "r0", kek, files=files)  # type: ignore[arg-type]
    for _ in range(STEPS):
        await guest.step(disk)
    assert disk._behind.started > 5  # writes answered before the replica took them are cut too
    assert disk._behind.sends < disk._behind.started  # some gathered into one replica write
    assert any(fua for *_, fua in replica.writes)  # and some a FLUSH sent on with FUA
    assert link.flushes_skipped > 0  # and FLUSHes that had nothing left to flush are cut too
    await abandon(disk)
    return guest.model, link.flushes_skipped


async def never() -> Backend:
    raise ConnectionError("a simulated replica does not reconnect")


async def reopen_and_check(state: Path, kek: object, image: bytearray, model: Model,
                           cut: int, where: str) -> None:
    """Open what the cut left; check every block."""
    replica = RawMemory(len(image))
    replica.raw[:] = image
    try:
        disk = await CryptDisk.open(state, "vm1", replica, "r0", kek,  # type: ignore[arg-type]
                                    files=NO_SYNC)
    except Exception as exc:
        raise AssertionError(f"{where}: the disk does not open: {exc}") from exc
    try:
        await read_and_check(disk, [model.allowed(b, cut) for b in range(NBLOCKS)], where)
    finally:
        await disk.close()


def test_power_cut_at_every_step_loses_nothing_flushed(tmp_path: Path, cut_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypt_commit, "RESERVE", 16)  # counter reservations mid-stream too
    # Some FLUSHes commit, the others let the intent log stand for a commit.
    monkeypatch.setattr(crypt_commit, "CHECKPOINT_BLOCKS", 8)
    monkeypatch.setattr(intent_log, "LOG_ROOM", 256)  # the intent log's room grows mid-stream
    state = tmp_path / "state"
    kek = new_state(state, size=SIZE)
    events = Events()
    files = PowerCutFiles(state, events)
    replica = TracedReplica(physical_size(SIZE), events, trims=True)
    seed = int(os.environ.get("TRUSTVBD_POWERCUT_SEED", "3"))
    try:
        model, skipped = run(workload(state, kek, files, replica, events, seed))
    finally:
        files.close_all()
    assert len(model.flushes) >= 2 and events.count > 60, events.names
    commits = events.names.count("ftruncate intent.log")  # each commit resets the log
    flushes = events.names.count("replica flush") + skipped
    assert commits >= 3 and flushes > commits + 2  # and marks
    for cut in range(events.count + 1):
        for kept in (True, False):
            cut_state = files.state_at(cut, cut_dir)  # anew: reopening writes to it
            where = (f"power cut after event {cut} ({events.names[cut - 1] if cut else 'start'}),"
                     f" replica {'kept its writes' if kept else 'lost unflushed writes'}")
            run(reopen_and_check(cut_state, kek, replica.image_at(cut, kept), model, cut, where))
    print(f"{events.count} events, {2 * (events.count + 1)} power cuts")


def assert_every_cut_keeps_the_log(files: PowerCutFiles, events: Events,
                                   acked: list[tuple[int, int]], cut_dir: Path,
                                   promised: str) -> None:
    """A power cut after any event of an audit log that rotated keeps every record promised
    by then ((event count, seq) in `acked`), verifies, and reopens and goes on."""
    assert "rename audit.jsonl audit.jsonl.1" in events.names  # it rotated, too
    for cut in range(events.count + 1):
        left = files.state_at(cut, cut_dir)
        path = left / "audit.jsonl"
        if not path.exists() and not list(left.glob("audit.jsonl.*")):
            assert not [s for at, s in acked if at <= cut], f"cut {cut}: the whole log was lost"
            continue
        where = f"power cut after event {cut} ({events.names[cut - 1] if cut else 'start'})"
        assert verify(path) == [], where
        seqs = [r["seq"] for r in AuditLog.read(path) if r["kind"] == "decision"]
        must = [s for at, s in acked if at <= cut]
        assert set(must) <= set(seqs), f"{where}: {promised} records lost"
        reopened = AuditLog(path)  # and the log goes on from there
        reopened.append("decision", after="cut")
        reopened.close()
        assert verify(path) == [], where


def test_power_cut_at_every_step_keeps_every_acknowledged_audit_record(tmp_path: Path,
                                                                      cut_dir: Path) -> None:
    logdir = tmp_path / "audit"
    logdir.mkdir()
    events = Events()
    files = PowerCutFiles(logdir, events)
    acked: list[tuple[int, int]] = []  # (event count when acknowledged, seq)
    try:
        log = AuditLog(logdir / "audit.jsonl", ops=files, checkpoint_every=4, rotate_bytes=1500)
        for i in range(12):
            seq = log.append("decision", n=i, allowed=i % 3 == 0)["seq"]
            acked.append((events.count, seq))
        log.close()
    finally:
        files.close_all()
    assert_every_cut_keeps_the_log(files, events, acked, cut_dir, "acknowledged")



def test_power_cut_at_every_step_of_group_commits_keeps_every_acknowledged_audit_record(
        tmp_path: Path, cut_dir: Path) -> None:
    """The access-control domain adds the records of requests that arrived together and
    answers them after one commit (one fsync, one signed head): batches of every size up to
    past MAX_BATCH, with checkpoints and a rotation inside them. A power cut anywhere keeps
    every committed record, leaves a log that verifies (a head up to a batch behind), and
    one that reopens and goes on."""
    logdir = tmp_path / "audit"
    logdir.mkdir()
    events = Events()
    files = PowerCutFiles(logdir, events)
    acked: list[tuple[int, int]] = []  # (event count when committed, seq)
    try:
        log = AuditLog(logdir / "audit.jsonl", ops=files, checkpoint_every=16, rotate_bytes=12_000)
        for size in (1, 5, MAX_BATCH + 3, 2, 40):
            seqs = [log.add("decision", n=i, pad="x" * 20)["seq"] for i in range(size)]
            log.commit()
            acked += [(events.count, s) for s in seqs]
        log.close()
    finally:
        files.close_all()
    assert_every_cut_keeps_the_log(files, events, acked, cut_dir, "committed")
    # No power cut leaves the head further behind than a group: further is a cut (or records
    # added by someone else), and verify and a reopen both say so.
    path = cut_dir / "behind" / "audit.jsonl"
    path.parent.mkdir()
    log = AuditLog(path)
    log.append("decision", n=0)
    head = head_path(path).read_bytes()
    for i in range(MAX_BATCH + 1):
        log.add("decision", n=i + 1)
    log.close(checkpoint=False)
    head_path(path).write_bytes(head)
    assert any("says the log ends at seq 1" in p for p in verify(path)), verify(path)
    with pytest.raises(AuditError, match="records were cut off or edited"):
        AuditLog(path)


class DirSyncs(OsFileOps):
    def __init__(self) -> None:
        self.synced: list[Path] = []

    def fsync_dir(self, path: Path) -> None:
        self.synced.append(Path(path))
        super().fsync_dir(path)


def test_a_first_dirty_map_syncs_the_directory_it_creates(tmp_path: Path) -> None:
    """The map of what a degraded replica missed lives in a directory made on first use; that
    directory's own entry must be synced too, or a power cut loses the whole map. (The
    power-cut model above does not track new directories, so this checks the sync itself.)"""
    (tmp_path / "disks" / "d").mkdir(parents=True, mode=0o700)
    ops = DirSyncs()
    disk = DiskState(tmp_path, "d", ops)
    disk.write_dirty_map("drv-b", 7, 1024, {3, 900})
    assert disk.dir in ops.synced, ops.synced  # the entry of behind/ in the disk directory
    assert disk.dirty_map_path("drv-b").parent in ops.synced  # the map's entry in behind/
    got = DiskState(tmp_path, "d").read_dirty_map("drv-b", 1024)
    assert got is not None and got[0] == 7 and set(got[1]) == {3, 900}


def test_a_forwarded_trim_waits_for_its_intent_record(tmp_path: Path, cut_dir: Path) -> None:
    """A discard on a driver that offers TRIM: the trim reaches the driver only once the
    record of the blocks' new (zero) leaves is durable. Else a cut right after the trim,
    with the driver keeping it, leaves the old leaf over trimmed ciphertext: a block that
    was flushed with data reads as an integrity error instead of its data or zeros."""
    state = tmp_path / "state"
    kek = new_state(state, size=SIZE)
    events = Events()
    files = PowerCutFiles(state, events)
    replica = TracedReplica(physical_size(SIZE), events, trims=True)
    data = random.Random(5).randbytes(4 * BS)

    async def workload() -> int:
        link = ReplicaLink(replica, "r0", never)
        disk = await CryptDisk.open(state, "vm1", link, "r0", kek, files=files)  # type: ignore[arg-type]
        await disk.pwrite(8 * BS, data)
        await disk.flush()
        flushed = events.count
        await disk.trim(8 * BS, 4 * BS)
        await abandon(disk)
        return flushed

    try:
        flushed = run(workload())
    finally:
        files.close_all()
    trims = [at for at, offset, chunk, _ in replica.writes if at > flushed and not any(chunk)]
    assert trims, events.names[flushed:]  # the trim reached the driver (as zeros)
    model = Model()
    for i in range(4):
        model.wrote(8 + i, Write(data[i * BS:(i + 1) * BS], 0, 0, False))
        model.wrote(8 + i, Write(bytes(BS), flushed, flushed, False, 1))
    model.flushes.append(flushed)
    for cut in range(flushed, events.count + 1):
        where = f"power cut after event {cut} ({events.names[cut - 1]})"
        run(reopen_and_check(files.state_at(cut, cut_dir), kek, replica.image_at(cut, True),
                             model, cut, where))


@pytest.mark.parametrize("blocks", [40, 190])
def test_a_failed_log_sync_then_a_flush_loses_nothing_flushed(tmp_path: Path, cut_dir: Path,
                                                              blocks: int) -> None:
    """A write whose intent records fail to sync (EIO) is not sent, and the FLUSH after it
    stands on the intent log. Linux drops the pages a failed fdatasync could not write
    (marked clean) and a later one succeeds without them, unless they are written again:

    - 40 blocks: the failed records share a page with the later ones, so the kernel
      writes them after all. The failed write's blocks went back to their older leaf in
      memory (the replica holds it), but the log's last record of them named the failed
      leaf, and the flush mark after it had recovery take nothing older: after a cut,
      blocks that read fine before it were integrity errors.
    - 190 blocks: the failed records span pages no later write touches. The log then
      ended at that hole after a cut, and a flushed block written after the failure, its
      ciphertext on the replica but its record past the hole, was an integrity error."""
    state = tmp_path / "state"
    kek = new_state(state, size=SIZE)
    events = Events()
    files = PowerCutFiles(state, events)
    replica = TracedReplica(physical_size(SIZE), events)
    first, failed, last = pattern(1), random.Random(7).randbytes(blocks * BS), pattern(250)

    async def workload() -> int:
        link = ReplicaLink(replica, "r0", never)
        disk = await CryptDisk.open(state, "vm1", link, "r0", kek, files=files)  # type: ignore[arg-type]
        await disk.pwrite(1 * BS, first)
        await disk.flush()
        epoch = disk.epoch
        files.failing.add("intent.log")
        failed_from = events.count
        with pytest.raises(BlockError, match=r"cannot sync .*intent\.log"):
            await disk.pwrite(10 * BS, failed)
        with pytest.raises(BlockError, match=r"cannot sync .*intent\.log"):
            await disk.flush()
        assert "fdatasync intent.log fails" in events.names[failed_from:]
        files.failing.clear()
        assert bytes(await disk.pread(10 * BS, BS)) == bytes(BS)  # not sent
        await disk.pwrite(250 * BS, last)
        await disk.flush()
        assert disk.epoch == epoch, "the FLUSH stands on the intent log, no commit"
        flushed = events.count
        await abandon(disk)
        return flushed

    try:
        flushed = run(workload())
    finally:
        files.close_all()
    model = Model()
    for b, value in ((1, first), (250, last)):
        model.wrote(b, Write(value, 0, 0, False))
    model.flushes.append(0)
    for cut in range(flushed, events.count + 1):
        for kept in (True, False):
            where = (f"power cut after event {cut} ({events.names[cut - 1]}), replica "
                     f"{'kept its writes' if kept else 'lost unflushed writes'}")
            run(reopen_and_check(files.state_at(cut, cut_dir), kek, replica.image_at(cut, kept),
                                 model, cut, where))


class FailingSyncs(Guest):
    """A Guest whose intent-log syncs fail (EIO) now and then, as after a writeback error:
    a request or FLUSH that fails promises nothing, nor does any write since the last
    FLUSH that succeeded (the FLUSH that fails says they may be lost); a FLUSH is retried
    until one succeeds, then the disk is read back, so later partial writes merge with what
    it really holds."""

    def __init__(self, rng: random.Random, events: Events, nblocks: int,
                 files: PowerCutFiles) -> None:
        super().__init__(rng, events, nblocks)
        self.files = files
        self.failed = 0

    async def step(self, disk: Backend) -> None:
        failing = self.rng.random() < 0.3
        if failing:
            self.files.failing.add("intent.log")
        try:
            await super().step(disk)
            return
        except BlockError:
            self.failed += 1
        finally:
            self.files.failing.clear()
        for w in (w for ws in self.model.history.values() for w in ws):
            if w.flushes_before >= len(self.model.flushes):
                w.flushes_before = 1 << 62  # never promised
        for _ in range(3):
            try:
                await self.flush(disk)
                break
            except BlockError:  # the one that says the loss
                pass
        else:
            raise AssertionError("no FLUSH succeeds once the log syncs again")
        self.cur[:] = await disk.pread(0, self.nblocks * BS)


def test_power_cut_at_every_step_with_failing_log_syncs_loses_nothing_flushed(
        tmp_path: Path, cut_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seeded workload with the intent log's syncs failing now and then, and the pages
    they could not write dropped (PowerCutFiles): every FLUSH that succeeded still holds
    after a cut at any step, whatever failed before it."""
    monkeypatch.setattr(crypt_commit, "RESERVE", 16)
    monkeypatch.setattr(crypt_commit, "CHECKPOINT_BLOCKS", 8)
    monkeypatch.setattr(intent_log, "LOG_ROOM", 256)
    state = tmp_path / "state"
    kek = new_state(state, size=SIZE)
    events = Events()
    files = PowerCutFiles(state, events)
    replica = TracedReplica(physical_size(SIZE), events, trims=True)
    seed = int(os.environ.get("TRUSTVBD_POWERCUT_SEED", "3"))
    guest = FailingSyncs(random.Random(seed), events, NBLOCKS, files)

    async def workload() -> None:
        link = ReplicaLink(replica, "r0", never)
        disk = await CryptDisk.open(state, "vm1", link, "r0", kek, files=files)  # type: ignore[arg-type]
        for _ in range(STEPS * 3):
            await guest.step(disk)
        await abandon(disk)

    try:
        run(workload())
    finally:
        files.close_all()
    assert guest.failed >= 3 and len(guest.model.flushes) >= 4, (guest.failed, events.names)
    for cut in range(events.count + 1):
        for kept in (True, False):
            cut_state = files.state_at(cut, cut_dir)
            where = (f"power cut after event {cut} ({events.names[cut - 1] if cut else 'start'}),"
                     f" replica {'kept its writes' if kept else 'lost unflushed writes'}")
            run(reopen_and_check(cut_state, kek, replica.image_at(cut, kept), guest.model, cut,
                                 where))
