"""A mirrored disk, a replica down for a while, and a power cut after every single step.

The disk is created under the harness (so its new directories count too), then a
seeded guest runs on 2 or 3 replicas while one replica goes down (the set degrades
it: its dirty map goes to behind/R before the anchor says it is behind), comes
back (resync, joining commit, the map dropped), and later another goes down until
the end. For every event the disk is reopened from what a power cut right after it
leaves (the trusted files as of their syncs, each replica with or without its
unflushed writes), and:

- the disk opens (a cut inside `create` leaves a directory `create` can redo);
- a replica the anchor lists as behind has its dirty map (else it would be rebuilt
  whole);
- right after open, before any resync: every flushed block verifies on every
  replica the set calls current, and a block that does not verify on a replica
  that is not current is in that replica's dirty set (a replica that was behind
  is known to be behind, and for exactly what it lacks);
- every flushed block reads back exactly, and every other one as its flushed content
  or a later one, never as an integrity error (no ciphertext reached a replica
  before the intent record that explains it was durable);
- after the resync every replica is current and holds every written block.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from tests.crypt.helpers import RawMemory, run
from tests.durability.powercut import (
    BS,
    NO_SYNC,
    Events,
    Guest,
    Model,
    PowerCutFiles,
    Promised,
    TracedReplica,
    abandon,
    read_and_check,
)
from trustvbd.blockdev import Backend
from trustvbd.blocks import crypt_commit, replica_recovery
from trustvbd.blocks.crypt_layer import CryptDisk, physical_size
from trustvbd.blocks.disk_state import DiskState, Member, TrustedStateError, create_disk_state, load_kek
from trustvbd.blocks.reconnect import ReplicaLink
from trustvbd.blocks.replica import State
from trustvbd.crypt.superblock import Layout

NBLOCKS = 260  # three leaf pages
SIZE = NBLOCKS * BS
LAY = Layout(SIZE)
STEPS = int(os.environ.get("TRUSTVBD_POWERCUT_STEPS", "30"))


def schedule(copies: int) -> dict[int, tuple[int, int]]:
    """Replica index -> (step it goes down, step it comes back): the last one for a while,
    then another until the end."""
    return {copies - 1: (STEPS // 6, STEPS // 2), copies - 2: (2 * STEPS // 3, STEPS + 1)}


async def settle(disk: CryptDisk, guest: Guest | None, reachable: list[int],
                 where: str = "") -> None:
    """Let the set bring the reachable replicas back to current (bounded)."""
    for _ in range(5000):
        states = [disk.replicas.replicas[i].state for i in reachable]
        if all(s is State.CURRENT for s in states):
            return
        if disk.replicas.joining():
            await (guest.flush(disk) if guest is not None else disk.flush())
        await asyncio.sleep(0)
    raise AssertionError(f"{where}: replicas did not come back: {disk.replicas.status()}")


async def workload(state: Path, kek: object, files: PowerCutFiles, links: list[TracedReplica],
                   events: Events, seed: int) -> tuple[Model, int]:
    """(what the guest was promised, the event count when `create` returned)."""
    create_disk_state(state, "vm1", SIZE, kek, files)  # type: ignore[arg-type]
    created = events.count
    guest = Guest(random.Random(seed), events, NBLOCKS)
    # Each behind the link the encryption domain keeps to a driver: it sends no FLUSH when
    # every write since the last one went with FUA (reconnect.py).
    linked = [ReplicaLink(r, f"r{i}", never, retry_window=0) for i, r in enumerate(links)]
    disk = await CryptDisk.open_mirrored(state, "vm1", [(f"r{i}", r) for i, r in enumerate(linked)],
                                         kek, files=files)  # type: ignore[arg-type]
    plan = schedule(len(links))
    for step in range(STEPS):
        for i, (down, up) in plan.items():
            if step == down:
                # The one that went down first must be back before another goes: with
                # none current there is nothing to serve from.
                await settle(disk, guest, [j for j in range(len(links)) if not links[j].down])
                links[i].down = True
            elif step == up:
                links[i].down = False
        await guest.step(disk)
        await asyncio.sleep(0)  # the set's background work: bring-back, resync, joining commit
    assert disk._behind.started > 5  # writes answered before the replicas took them are cut too
    assert disk._behind.sends < disk._behind.started  # some gathered into one replica write
    await abandon(disk)
    return guest.model, created


async def never() -> Backend:
    raise ConnectionError("a simulated replica does not reconnect")


def leaf_pages_in_memory(disk: CryptDisk, raws: list[RawMemory]) -> None:
    """Leaf pages are loaded on demand (awaited); these checks run without awaiting, so
    put each page in the disk's cache from a replica whose copy the trusted tree accepts."""
    for p in range(LAY.leaf_pages):
        at = LAY.leaf_page_offset(p)
        assert any(disk._leaves.preload(p, bytes(raw.raw[at:at + BS])) for raw in raws), p


def holdings(disk: CryptDisk, raws: list[RawMemory]) -> list[set[int]]:
    """Per replica, the written blocks whose ciphertext on it verifies (each distinct
    ciphertext decrypted once)."""
    leaf_pages_in_memory(disk, raws)
    out: list[set[int]] = [set() for _ in raws]
    for b in range(NBLOCKS):
        if not disk.written(b):
            continue
        verdict: dict[bytes, bool] = {}
        for i, raw in enumerate(raws):
            ct = bytes(raw.raw[LAY.data_offset(b):LAY.data_offset(b) + BS])
            if ct not in verdict:
                verdict[ct] = not disk.bad_blocks(b, memoryview(ct))
            if verdict[ct]:
                out[i].add(b)
    return out


def knows_what_it_lacks(disk: CryptDisk, raws: list[RawMemory], promised: Promised,
                        where: str) -> None:
    """Synchronously after open, before any resync has run.

    A current replica may lack a block another holds only if that block was written
    after its last flush: the replica took the new ciphertext, the power cut took the
    unsynced intent record that named it, and reads repair it from the other."""
    leaf_pages_in_memory(disk, raws)
    written = {b for b in range(NBLOCKS) if disk.written(b)}
    replicas = disk.replicas.replicas
    for r in replicas:
        assert r.state is not State.FAILED, f"{where}: replica {r.name} refused: {r.last_error}"
    good = holdings(disk, raws)
    current = [i for i, r in enumerate(replicas) if r.state is State.CURRENT]
    assert current, f"{where}: no replica is current"
    held = set().union(*(good[i] for i in current))
    for i, r in enumerate(replicas):
        if r.state is State.CURRENT:
            lacking = {b for b in held - good[i] if not promised[b][1]}
            assert not lacking, (f"{where}: replica {r.name} is current but lacks blocks "
                                 f"{sorted(lacking)} another current replica holds")
        else:
            unknown = written - good[i] - set(r.dirty)
            assert not unknown, (f"{where}: replica {r.name} is {r.state.value} but does not know"
                                 f" it lacks blocks {sorted(unknown)}: a resync would not copy them")


async def reopen_and_check(state: Path, kek: object, images: list[bytearray], promised: Promised,
                           where: str) -> None:
    anchor = DiskState(state, "vm1").read_anchor()
    for i in range(len(images)):
        if anchor.member(f"r{i}") is Member.BEHIND:
            assert DiskState(state, "vm1").read_dirty_map(f"r{i}", NBLOCKS) is not None, (
                f"{where}: the anchor lists r{i} as behind, but its dirty map is lost")
    raws = []
    for image in images:
        raws.append(RawMemory(len(image)))
        raws[-1].raw[:] = image
    try:
        disk = await CryptDisk.open_mirrored(state, "vm1", [(f"r{i}", r) for i, r in enumerate(raws)],
                                             kek, files=NO_SYNC)  # type: ignore[arg-type]
    except Exception as exc:
        raise AssertionError(f"{where}: the disk does not open: {exc}") from exc
    try:
        knows_what_it_lacks(disk, raws, promised, where)
        await read_and_check(disk, promised, where)
        await settle(disk, None, list(range(len(raws))), where)
        await disk.scrub()  # repairs what one current replica lacks and another holds
        held = holdings(disk, raws)
        anywhere = set().union(*held)
        for r, blocks in zip(disk.replicas.replicas, held, strict=True):
            assert blocks == anywhere, (f"{where}: after the resync, {r.name} lacks blocks "
                                        f"{sorted(anywhere - blocks)}")
        await read_and_check(disk, promised, f"{where}, after the resync")
    finally:
        await disk.close()


def cut_images(links: list[TracedReplica], cut: int) -> list[tuple[str, list[bytearray]]]:
    """Every replica keeping its unflushed writes, none keeping them, and one alone losing
    them (each one with 2 replicas; with 3, the one that goes down first)."""
    n = len(links)
    ways = [tuple([True] * n), tuple([False] * n)]
    ways += [tuple(j != i for j in range(n)) for i in (range(n) if n == 2 else [n - 1])]
    return [(" ".join(f"r{i} {'kept' if k else 'lost'}" for i, k in enumerate(way)),
             [link.image_at(cut, k) for link, k in zip(links, way, strict=True)])
            for way in ways]


@pytest.mark.parametrize("copies", [2, 3])
def test_power_cut_at_every_step_of_a_degraded_mirror(tmp_path: Path, cut_dir: Path, copies: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypt_commit, "RESERVE", 16)  # counter reservations mid-stream too
    # Some FLUSHes commit, the others let the intent log stand for a commit.
    monkeypatch.setattr(crypt_commit, "CHECKPOINT_BLOCKS", 8)
    monkeypatch.setattr(replica_recovery, "RECONNECT_FIRST", 0.0)  # retries at once: deterministic
    state = tmp_path / "state"
    kek = load_kek(state)
    events = Events()
    files = PowerCutFiles(state, events)
    links = [TracedReplica(physical_size(SIZE), events) for _ in range(copies)]
    seed = int(os.environ.get("TRUSTVBD_POWERCUT_SEED", "4"))
    try:
        model, created = run(workload(state, kek, files, links, events, seed))
    finally:
        files.close_all()
    names = events.names
    assert len(model.flushes) >= 3, names
    assert any(n.startswith("mkdir behind") for n in names), "no replica was ever behind"
    assert any(n.startswith("unlink") for n in names), "no replica came back and joined"
    cuts = 0
    for cut in range(events.count + 1):
        cut_state = files.state_at(cut, cut_dir)
        label = f"power cut after event {cut} ({names[cut - 1] if cut else 'start'})"
        if not (cut_state / "disks" / "vm1" / "keys").exists():
            assert cut < created, f"{label}: the disk's keys are lost"
            create_disk_state(cut_state, "vm1", SIZE, kek)  # type: ignore[arg-type]
            continue  # `create` can be redone; nothing was written yet
        promised = [model.allowed(b, cut) for b in range(NBLOCKS)]
        for how, images in cut_images(links, cut):
            cut_state = files.state_at(cut, cut_dir)  # anew: reopening writes to it
            cuts += 1
            run(reopen_and_check(cut_state, kek, images, promised, f"{label}, {how}"))
    print(f"{copies} replicas: {events.count} events, {cuts} power cuts checked")


def test_a_new_directory_needs_its_parent_synced(tmp_path: Path) -> None:
    """The model itself: a file in a new directory is lost until the parent is synced."""
    events = Events()
    files = PowerCutFiles(tmp_path, events)
    try:
        files.mkdir(tmp_path / "new")
        fd = files.open(tmp_path / "new" / "f", os.O_WRONLY | os.O_CREAT)
        files.write(fd, b"data")
        files.fsync(fd)
        files.close(fd)
        files.fsync_dir(tmp_path / "new")
        assert "new" not in files.durable_at(events.count)
        files.fsync_dir(tmp_path)
        assert files.durable_at(events.count) == {"new": None, "new/f": b"data"}
        files.unlink(tmp_path / "new" / "f")
        assert "new/f" in files.durable_at(events.count), "a removal counts once synced"
        files.fsync_dir(tmp_path / "new")
        assert files.durable_at(events.count) == {"new": None}
    finally:
        files.close_all()


def test_a_dirty_map_directory_left_unsynced_by_a_dead_process_is_synced(tmp_path: Path) -> None:
    """A process that died between making behind/ and syncing its parent left a directory
    that looks made: the next map written in it must still sync that entry."""
    state = tmp_path / "state"
    kek = load_kek(state)
    create_disk_state(state, "vm1", SIZE, kek)
    events = Events()
    files = PowerCutFiles(state, events)
    try:
        (state / "disks" / "vm1" / "behind").mkdir(mode=0o700)  # the dead process's mkdir
        DiskState(state, "vm1", files).write_dirty_map("r1", 3, NBLOCKS, {5, 200})
        got = files.durable_at(events.count).get("disks/vm1/behind/r1")
    finally:
        files.close_all()
    assert got is not None, "the dirty map does not survive a power cut"
    cut = files.state_at(events.count, tmp_path / "cut")
    stored = DiskState(cut, "vm1").read_dirty_map("r1", NBLOCKS)
    assert stored is not None and stored[0] == 3 and set(stored[1]) == {5, 200}


def test_a_new_disk_survives_a_power_cut_once_created(tmp_path: Path) -> None:
    state = tmp_path / "state"
    kek = load_kek(state)
    events = Events()
    files = PowerCutFiles(state, events)
    try:
        create_disk_state(state, "vm1", SIZE, kek, files)
    finally:
        files.close_all()
    cut = files.state_at(events.count, tmp_path / "cut")
    assert DiskState(cut, "vm1").read_anchor().epoch == 0
    with pytest.raises(TrustedStateError, match="already exists"):
        create_disk_state(cut, "vm1", SIZE, kek)
