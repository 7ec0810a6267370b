"""Opening an encrypted disk in the encryption domain: which key unlocks it, first-run set-up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustvbd.blockdev import Backend
from trustvbd.blocks.aead_pool import AeadPool
from trustvbd.blocks.crypt_layer import CryptDisk, Kek, create_disk_state
from trustvbd.blocks.disk_state import DiskState
from trustvbd.blocks.integrity import NameDisk
from trustvbd.blocks.leaf_pages import DEFAULT_CAPACITY
from trustvbd.blocks.replica_set import REPLICA_LAG
from trustvbd.crypt.keys import KEK_FILE, KEK_PASSPHRASE, KeyFileError, read_public
from trustvbd.domains.unlock import Unlock

DEFAULT_LEAF_CACHE = DEFAULT_CAPACITY * 4096  # bytes: [limits] leaf_cache


class PassphraseNeeded(Exception):
    """A disk is protected by a passphrase and none was given."""


def needs_passphrase(state_dir: Path, disk: str) -> bool:
    keys = DiskState(state_dir, disk).keys_path
    if not keys.exists():
        return False
    return read_public(keys.read_bytes(), f"disk {disk!r}")[2] == KEK_PASSPHRASE


def kek_for(state_dir: Path, disk: str, unlock: Unlock) -> Kek:
    """The disk's own kind of key, from what the launcher handed over (domains/unlock.py).

    A new disk is protected by the passphrase when one was given, else by the key file.
    """
    keys = DiskState(state_dir, disk).keys_path
    if keys.exists():
        by_passphrase = read_public(keys.read_bytes(), f"disk {disk!r}")[2] == KEK_PASSPHRASE
    else:
        by_passphrase = unlock.passphrase is not None
    if by_passphrase:
        if unlock.passphrase is None:
            raise PassphraseNeeded(
                f"disk {disk!r} is protected by a passphrase and this encryption domain was given"
                " none (the launcher forgets the passphrase once started, so a restarted"
                " encryption domain starts with it locked): run `trustvbd unlock -c CONFIG`")
        return Kek.from_passphrase(unlock.passphrase.decode("utf-8"))
    if unlock.key_file is None or len(unlock.key_file) != 32:
        raise KeyFileError(f"disk {disk!r} is protected by the state directory's key file"
                           " (kek.key), which the launcher did not hand over; check that it"
                           " exists and is readable by the user running `trustvbd up`")
    return Kek(KEK_FILE, bytes(unlock.key_file), "the state directory's key file (kek.key)")


async def open_crypt_disk(state_dir: Path, name: str, size: int, replicas: list[tuple[str, Backend]],
                          unlock: Unlock, on_event: Callable[[dict[str, Any]], None],
                          aead: AeadPool | None = None, kek: Kek | None = None,
                          leaf_cache: int = DEFAULT_LEAF_CACHE,
                          lag: float = REPLICA_LAG, shown_dir: Path | None = None,
                          name_disk: NameDisk | None = None) -> CryptDisk:
    """Open (or create) an encrypted disk; `kek`: one already checked (trustvbd unlock);
    `leaf_cache`: bytes of leaf pages it keeps in memory ([limits] leaf_cache); `lag`:
    [limits] replica_lag; `shown_dir`: the state directory as messages name it; `name_disk`:
    which of this system's disks a disk id is."""
    kek = kek or kek_for(state_dir, name, unlock)
    if not DiskState(state_dir, name).keys_path.exists():
        create_disk_state(state_dir, name, size, kek)
    disk = await CryptDisk.open_mirrored(state_dir, name, replicas, kek, on_integrity_event=on_event,
                                         aead=aead, leaf_cache_pages=leaf_cache // 4096, lag=lag,
                                         shown_dir=shown_dir, name_disk=name_disk)
    if disk.size != size:
        await disk.close()
        raise ValueError(
            f"disk {name!r} was created with {disk.size} bytes but the config says {size};"
            " resizing is not supported: put the old size back")
    return disk
