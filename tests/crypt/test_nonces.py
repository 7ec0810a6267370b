"""A nonce is used once, whatever is restored.

Restoring the trusted state directory and a replica from the same backup replays
the version counter: the writes after the restore take the versions the lost
timeline had already used. Each open of a disk therefore encrypts under its own
random key id (docs/format.md 1.1-1.2). Keys and nonces here are rebuilt from the
format alone (the independent reader of test_format_doc), never from trustvbd.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.crypt.helpers import BS, RawMemory, new_state, open_disk, pattern, run
from tests.crypt.test_format_doc import _unwrap, doc_block_key, doc_leaf
from trustvbd.blocks.crypt_layer import Layout, physical_size

SIZE = 300 * BS
LAY = Layout(SIZE)


class Ciphertexts:
    """Every ciphertext a session sent, with the (key, nonce) the format says it used."""

    def __init__(self, state: Path) -> None:
        keys = (state / "disks" / "vm1" / "keys").read_bytes()
        kek = (state / "kek.key").read_bytes()
        self.disk_id, self.data_key = _unwrap(keys, kek, None)
        self.seen: list[tuple[bytes, bytes, str]] = []  # (block key, nonce, where)

    def note(self, raw: bytes, b: int, plain: bytes, where: str) -> None:
        version, tag, key_id = doc_leaf(raw, b)
        key = doc_block_key(self.data_key, self.disk_id, key_id)
        nonce = version.to_bytes(8, "big") + bytes(4)
        ct = raw[LAY.data_offset(b):LAY.data_offset(b) + BS]
        aad = self.disk_id + b.to_bytes(8, "big") + version.to_bytes(8, "big")
        assert AESGCM(key).decrypt(nonce, ct + tag, aad) == plain  # the key really is that one
        self.seen.append((key, nonce, where))


async def session(state: Path, replica: RawMemory, kek: object, tag: int, log: Ciphertexts,
                  where: str) -> None:
    """Write blocks 0-9 twice (two versions each), flushing after each round."""
    disk = await open_disk(state, replica, kek)  # type: ignore[arg-type]
    for round_ in range(2):
        for b in range(10):
            plain = pattern(b, tag * 10 + round_)
            await disk.pwrite(b * BS, plain)
            await disk.settle()  # answered before the replica took it (write_behind.py)
            # The leaf as it will be committed, and the ciphertext as the replica holds it.
            leaf = bytes(disk._leaves.get(b, b + 1))
            raw = bytearray(replica.raw)
            raw[LAY.leaf_offset(b):LAY.leaf_offset(b) + 32] = leaf
            log.note(bytes(raw), b, plain, f"{where} round {round_} block {b}")
        await disk.flush()
    await disk.close()


def test_restoring_state_and_replica_from_one_backup_never_repeats_a_key_nonce_pair(
        tmp_path: Path) -> None:
    state, backup = tmp_path / "state", tmp_path / "backup"
    kek = new_state(state, size=SIZE)
    replica = RawMemory(physical_size(SIZE))
    log = Ciphertexts(state)
    run(session(state, replica, kek, 1, log, "before the backup"))
    shutil.copytree(state, backup)
    image = bytes(replica.raw)

    run(session(state, replica, kek, 2, log, "timeline A"))
    shutil.rmtree(state)  # the host is restored from the backup: state and replica
    shutil.copytree(backup, state)
    replica.raw[:] = image
    run(session(state, replica, kek, 3, log, "timeline B (restored)"))
    shutil.rmtree(state)  # and once more, from the same backup
    shutil.copytree(backup, state)
    replica.raw[:] = image
    run(session(state, replica, kek, 4, log, "timeline C (restored again)"))

    first: dict[tuple[bytes, bytes], str] = {}
    for key, nonce, where in log.seen:
        pair = (key, nonce)
        assert pair not in first, f"(key, nonce) of {where} was already used by {first[pair]}"
        first[pair] = where
    assert len(log.seen) == 4 * 20
    # The restored timelines did replay the counter: same versions, different keys.
    versions = {tl: {n for _, n, w in log.seen if w.startswith(tl)} for tl in ("timeline A",
                                                                            "timeline B")}
    assert versions["timeline A"] == versions["timeline B"]


def test_leaves_written_before_key_ids_still_read(tmp_path: Path) -> None:
    """Key id 0 is the data key itself: a disk written by an earlier release opens and reads."""
    from trustvbd.crypt.aead import BlockCipher

    state = tmp_path / "state"
    kek = new_state(state, size=SIZE)
    replica = RawMemory(physical_size(SIZE))

    async def write_and_check() -> None:
        disk = await open_disk(state, replica, kek)
        await disk.pwrite(0, pattern(0))
        await disk.flush()
        await disk.close()
        # Rewrite block 5 as an old release did: key id 0, the data key, straight into the
        # leaf table through a fresh commit of the same disk (its leaf is in the table).
        disk = await open_disk(state, replica, kek)
        disk_id, data_key = _unwrap((state / "disks" / "vm1" / "keys").read_bytes(),
                                    (state / "kek.key").read_bytes(), None)
        old = BlockCipher(data_key, disk_id)  # key id 0
        assert old.key_id == 0
        version = disk._commits.take_versions(1)
        out, leaf = old.seal(5, version, pattern(5))
        assert leaf[24:] == bytes(8)
        await disk._leaves.hold(5, 6)  # its leaf page in memory (loaded on demand)
        disk._commits.note_leaves(5, bytes(disk._leaves.get(5, 6)), leaf)
        await replica.pwrite(LAY.data_offset(5), out)
        await disk.flush()
        await disk.close()
        disk = await open_disk(state, replica, kek)
        assert bytes(await disk.pread(0, BS)) == pattern(0)
        assert bytes(await disk.pread(5 * BS, BS)) == pattern(5)
        key_ids = {struct.unpack_from(">Q", replica.raw, LAY.leaf_offset(b) + 24)[0] for b in (0, 5)}
        assert 0 in key_ids and len(key_ids) == 2
        await disk.close()

    run(write_and_check())
