"""Opening an encrypted disk in the encryption domain: which key unlocks it, first-run set-up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustvbd.blockdev import Backend
from trustvbd.blocks.aead_pool import AeadPool
from trustvbd.blocks.crypt_layer import CryptDisk, Kek, create_disk_state, load_kek
from trustvbd.blocks.disk_state import DiskState
from trustvbd.crypt.keys import KEK_PASSPHRASE, read_public


class PassphraseNeeded(Exception):
    """A disk is protected by a passphrase and none was given."""


def needs_passphrase(state_dir: Path, disk: str) -> bool:
    keys = DiskState(state_dir, disk).keys_path
    if not keys.exists():
        return False
    return read_public(keys.read_bytes(), f"disk {disk!r}")[2] == KEK_PASSPHRASE


def kek_for(state_dir: Path, disk: str, passphrase: str | None) -> Kek:
    """The disk's own kind of key: its passphrase, or the state directory's key file.

    A new disk is protected by a passphrase when one is given, else by the key file.
    """
    keys = DiskState(state_dir, disk).keys_path
    if keys.exists():
        if read_public(keys.read_bytes(), f"disk {disk!r}")[2] == KEK_PASSPHRASE:
            if passphrase is None:
                raise PassphraseNeeded(
                    f"disk {disk!r} is protected by a passphrase: set TRUSTVBD_PASSPHRASE,"
                    " or start `trustvbd up` from a terminal to be asked for it")
            return load_kek(state_dir, passphrase=passphrase)
        return load_kek(state_dir)
    return load_kek(state_dir, passphrase=passphrase)


async def open_crypt_disk(state_dir: Path, name: str, size: int, replica: Backend, replica_name: str,
                          passphrase: str | None, on_event: Callable[[dict[str, Any]], None],
                          aead: AeadPool | None = None) -> CryptDisk:
    kek = kek_for(state_dir, name, passphrase)
    if not DiskState(state_dir, name).keys_path.exists():
        create_disk_state(state_dir, name, size, kek)
    disk = await CryptDisk.open(state_dir, name, replica, replica_name, kek, on_integrity_event=on_event,
                                aead=aead)
    if disk.size != size:
        await disk.close()
        raise ValueError(
            f"disk {name!r} was created with {disk.size} bytes but the config says {size};"
            " resizing is not supported: put the old size back")
    return disk
