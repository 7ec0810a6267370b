"""Opening an encrypted disk in the encryption domain: which key unlocks it, first-run set-up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustvbd.blockdev import Backend
from trustvbd.blocks.aead_pool import AeadPool
from trustvbd.blocks.crypt_layer import CryptDisk, Kek, create_disk_state
from trustvbd.blocks.disk_state import DiskState
from trustvbd.crypt.keys import KEK_FILE, KEK_PASSPHRASE, KeyFileError, read_public
from trustvbd.crypt.superblock import Layout
from trustvbd.crypt.tree import HASH_SIZE
from trustvbd.domains.unlock import Unlock


def memory_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 if unknown: then nothing is refused)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_memory(name: str, size: int) -> None:
    """Refuse, in one clear line, a disk whose leaf table cannot fit in memory.

    Opening holds the whole leaf table (0.8 % of the disk size) and its tree; on-demand
    leaf pages are not implemented. Without this check such a disk would be opened
    until the kernel's out-of-memory killer ends the domain, or another process.
    """
    lay = Layout(size)
    need = lay.leaf_table_size + 3 * lay.leaf_pages * HASH_SIZE
    available = memory_available()
    if available and need > available * 3 // 4:
        raise MemoryError(
            f"disk {name!r} ({size} bytes) needs {need / 2**30:.1f} GiB of memory in the "
            f"encryption domain for its leaf table (0.8 % of its size), but only "
            f"{available / 2**30:.1f} GiB is available; use a smaller disk (on-demand leaf "
            "pages are not implemented yet)")


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
                          aead: AeadPool | None = None, kek: Kek | None = None) -> CryptDisk:
    """Open (or create) an encrypted disk; `kek`: one already checked (trustvbd unlock)."""
    check_memory(name, size)
    kek = kek or kek_for(state_dir, name, unlock)
    if not DiskState(state_dir, name).keys_path.exists():
        create_disk_state(state_dir, name, size, kek)
    disk = await CryptDisk.open_mirrored(state_dir, name, replicas, kek, on_integrity_event=on_event,
                                         aead=aead)
    if disk.size != size:
        await disk.close()
        raise ValueError(
            f"disk {name!r} was created with {disk.size} bytes but the config says {size};"
            " resizing is not supported: put the old size back")
    return disk
