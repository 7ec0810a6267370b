"""Key files, passphrases, rekeying, and the trusted state directory's own failure modes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.crypt.helpers import BS, SIZE, RawMemory, new_state, open_disk, pattern, run
from trustvbd.blocks.crypt_layer import (
    CryptDisk,
    KeyFileError,
    TrustedStateError,
    WrongKeyError,
    create_disk_state,
    load_kek,
    physical_size,
    rekey,
)
from trustvbd.blocks.disk_state import Anchor, DiskState


def test_default_key_file_is_generated_private_and_reused(tmp_path: Path) -> None:
    kek = load_kek(tmp_path)
    path = tmp_path / "kek.key"
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_bytes()) == 32
    assert "kek.key" in repr(kek) and path.read_bytes().hex() not in repr(kek)
    create_disk_state(tmp_path, "vm1", SIZE, kek)
    assert load_kek(tmp_path)._secret == kek._secret
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_kek(tmp_path)
    os.chmod(path, 0o600)
    # A lost key file is never silently replaced while disks depend on it.
    path.unlink()
    with pytest.raises(WrongKeyError, match="restore it"):
        load_kek(tmp_path)
    assert not path.exists()


def test_wrong_key_file_and_wrong_passphrase_give_clear_errors(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        replica = RawMemory(physical_size(SIZE))
        disk = await open_disk(tmp_path, replica, kek)
        await disk.pwrite(0, pattern(0))
        await disk.close()
        other = load_kek(tmp_path, key_file=tmp_path / "other.key")
        with pytest.raises(WrongKeyError, match=r"does not unlock disk 'vm1'"):
            await open_disk(tmp_path, replica, other)
        with pytest.raises(WrongKeyError, match="protected by a key file"):
            await open_disk(tmp_path, replica, load_kek(tmp_path, passphrase="guess"))

        create_disk_state(tmp_path, "pw", SIZE, load_kek(tmp_path, passphrase="correct horse"))
        replica2 = RawMemory(physical_size(SIZE))
        with pytest.raises(WrongKeyError, match="wrong passphrase"):
            wrong = load_kek(tmp_path, passphrase="Correct horse")
            await open_disk(tmp_path, replica2, wrong, "pw")
        assert replica2.raw.count(0) == len(replica2.raw)  # nothing happened to the replica
        disk = await open_disk(tmp_path, replica2, load_kek(tmp_path, passphrase="correct horse"),
                               "pw")
        assert disk.integrity_events == 0
        await disk.close()

    run(go())


def test_rekey_keeps_data_and_retires_the_old_kek(tmp_path: Path) -> None:
    async def go() -> None:
        old = new_state(tmp_path)
        replica = RawMemory(physical_size(SIZE))
        disk = await open_disk(tmp_path, replica, old)
        await disk.pwrite(5 * BS, pattern(5))
        await disk.close()
        image = bytes(replica.raw)
        new = load_kek(tmp_path, passphrase="a long new passphrase")
        rekey(tmp_path, "vm1", old, new)
        assert bytes(replica.raw) == image  # no data was re-encrypted
        with pytest.raises(WrongKeyError):
            await open_disk(tmp_path, replica, old)
        with pytest.raises(WrongKeyError):
            rekey(tmp_path, "vm1", old, new)
        disk = await open_disk(tmp_path, replica, new)
        assert bytes(await disk.pread(5 * BS, BS)) == pattern(5)
        await disk.close()
        # And back to a (different) key file.
        newer = load_kek(tmp_path, key_file=tmp_path / "newer.key")
        rekey(tmp_path, "vm1", new, newer)
        disk = await open_disk(tmp_path, replica, newer)
        assert bytes(await disk.pread(5 * BS, BS)) == pattern(5)
        await disk.close()

    run(go())


def test_trusted_state_problems_are_named(tmp_path: Path) -> None:
    async def go() -> None:
        kek = new_state(tmp_path)
        replica = RawMemory(physical_size(SIZE))
        with pytest.raises(TrustedStateError, match="no disk 'nope'"):
            await CryptDisk.open(tmp_path, "nope", replica, "r0", kek)
        with pytest.raises(ValueError, match="disk name"):
            await CryptDisk.open(tmp_path, "../etc", replica, "r0", kek)
        with pytest.raises(TrustedStateError, match="already exists"):
            create_disk_state(tmp_path, "vm1", SIZE, kek)
        disk = await open_disk(tmp_path, replica, kek)
        await disk.pwrite(0, pattern(0))
        await disk.flush()
        await disk.close()
        state = DiskState(tmp_path, "vm1")
        good = state.anchor_path.read_bytes()
        # The state directory restored from an old backup: behind the replica.
        a = state.read_anchor()
        state.write_anchor(Anchor(a.disk_id, a.logical_size, a.epoch - 2, a.counter_high, a.root))
        state.close()
        with pytest.raises(TrustedStateError, match="older than the replica"):
            await open_disk(tmp_path, replica, kek)
        # One slot torn (a crash mid-write): the other, older one is used.
        flip = bytearray(good)
        newest = max((0, 1), key=lambda i: int.from_bytes(good[i * 512 + 12:i * 512 + 16], "big"))
        flip[newest * 512 + 50] ^= 1
        state.anchor_path.write_bytes(bytes(flip))
        assert state.read_anchor().epoch == a.epoch - 1
        flip[(1 - newest) * 512 + 50] ^= 1  # both slots bad: refused
        state.anchor_path.write_bytes(bytes(flip))
        with pytest.raises(TrustedStateError, match="corrupt"):
            await open_disk(tmp_path, replica, kek)
        state.anchor_path.write_bytes(good)
        disk = await open_disk(tmp_path, replica, kek)
        assert bytes(await disk.pread(0, BS)) == pattern(0)
        await disk.close()

    run(go())


def test_replica_too_small_is_refused(tmp_path: Path) -> None:
    from trustvbd.blocks.crypt_layer import ReplicaRefusedError

    async def go() -> None:
        kek = new_state(tmp_path)
        with pytest.raises(ReplicaRefusedError, match=f"needs {physical_size(SIZE)}"):
            await open_disk(tmp_path, RawMemory(SIZE), kek)

    run(go())


@pytest.mark.parametrize(("log_n", "r", "p"), [(0, 8, 1), (63, 8, 1), (64, 8, 1), (17, 1 << 20, 1),
                                               (21, 8, 1), (17, 8, 0), (20, 32, 1),
                                               (17, 1, 1)])  # N >= 2^(16 r): found by make fuzz
def test_hostile_scrypt_parameters_are_refused_before_scrypt_runs(
        log_n: int, r: int, p: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found while writing the keys fuzz target: scrypt cost fields went straight to the
    KDF, which then panicked (a BaseException), overflowed, or asked for terabytes."""
    import struct
    import time
    import zlib

    from trustvbd.crypt import keys

    monkeypatch.setattr(keys, "_SCRYPT_LOG_N", 4)  # a cheap, valid file to damage
    secrets = keys.DiskSecrets.generate()
    blob = bytearray(keys.seal_keys(secrets, keys.Kek.from_passphrase("pw")))
    assert keys.open_keys(bytes(blob), keys.Kek.from_passphrase("pw"), "disk x") == secrets
    struct.pack_into(">III", blob, 48, log_n, r, p)
    struct.pack_into(">I", blob, 216, zlib.crc32(blob[:216]))
    start = time.monotonic()
    with pytest.raises(keys.KeyFileError, match=r"disk x: keys file asks scrypt for N=2\^"):
        keys.open_keys(bytes(blob), keys.Kek.from_passphrase("pw"), "disk x")
    with pytest.raises(keys.KeyFileError):
        keys.read_public(bytes(blob), "disk x")
    assert time.monotonic() - start < 1


def test_key_file_kind_with_scrypt_fields_or_reserved_bytes_is_corrupt() -> None:
    import struct
    import zlib

    from trustvbd.crypt import keys

    kek = keys.Kek(keys.KEK_FILE, bytes(32), "key file k")
    good = keys.seal_keys(keys.DiskSecrets.generate(), kek)
    for offset, value in ((48, 17), (60, 1)):
        blob = bytearray(good)
        struct.pack_into(">I", blob, offset, value)
        struct.pack_into(">I", blob, 216, zlib.crc32(blob[:216]))
        with pytest.raises(keys.KeyFileError, match="disk y: keys file"):
            keys.open_keys(bytes(blob), kek, "disk y")


def test_a_key_file_that_is_a_fifo_or_a_device_is_refused_at_once(tmp_path: Path) -> None:
    """`kek.key` replaced by a FIFO held the caller in open() for good, and /dev/zero in its
    place was read until memory ran out: only a regular file of 32 bytes is a key file."""
    import subprocess
    import sys

    path = tmp_path / "kek.key"
    os.mkfifo(path, 0o600)
    probe = (f"from pathlib import Path; from trustvbd.blocks.crypt_layer import load_kek\n"
             f"try: load_kek(Path({str(tmp_path)!r}))\nexcept Exception as e: print(e)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert "is not a regular file" in out.stdout, out
    path.unlink()
    path.symlink_to("/dev/zero")
    with pytest.raises(KeyFileError, match="is not a regular file"):
        load_kek(tmp_path)
    path.unlink()
    path.write_bytes(os.urandom(40))
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="must hold exactly 32 bytes, it holds 40"):
        load_kek(tmp_path)
