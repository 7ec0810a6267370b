"""The config (trustvbd's TOML file): what it describes, and how a mistake in it is told.

Read and checked by config_file.py (the file as a whole) with config_sections.py (each
[section] and [[table]]): every mistake stops `trustvbd up` before anything starts, with
the file, the key and what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

BLOCK_SIZE = 4096
MAX_REPLICAS = 8
MAX_CONFIG = 4 << 20  # bytes of a config file: thousands of guests and disks fit
# Unix socket paths are limited to 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# Offsets are signed 64-bit (off_t, and the NBD size every client stores in one).
MAX_FILE_SIZE = (1 << 63) - 1
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1}
for _i, _p in enumerate("KMGTP", start=1):
    _UNITS[_p] = 1024**_i
    _UNITS[_p + "IB"] = 1024**_i
    _UNITS[_p + "B"] = 1000**_i


class ConfigError(Exception):
    """A config mistake: where it is and what to do about it."""

    def __init__(self, file: Path | str, key: str, message: str) -> None:
        self.file = str(file)
        self.key = key
        self.message = message
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class DriverConfig:
    """An untrusted driver domain: our own block server over `dir`, or any NBD server at `uri`."""

    name: str
    label: str
    dir: Path | None = None
    uri: str | None = None
    user: str | None = None  # run as this account (as root); default: a dynamic uid of its own


@dataclass(frozen=True)
class DiskConfig:
    name: str
    size: int
    label: str
    replicas: tuple[str, ...]
    encrypt: bool = True
    cpus: frozenset[int] | None = None  # `cpus` (else [placement]'s): its domain and drivers run there


@dataclass(frozen=True)
class GuestConfig:
    name: str
    label: str
    listen: tuple[str, int] | None = None
    tls: bool = True  # on the `listen` port; false only by the guest's own `tls = false`
    tls_name: str | None = None  # the client certificate's Common Name (default: name)
    uid: int | None = None  # `user`: only this uid (and root) may use the guest's socket

    @property
    def certificate_name(self) -> str:
        return self.tls_name or self.name


@dataclass(frozen=True)
class Limits:
    """How long and how much one guest may hold of the encryption domain (docs/limits.md)."""

    handshake_timeout: float = 30.0  # seconds from connect to the end of the handshake
    idle_timeout: float = 3600.0  # seconds without a request or a drained reply: closed
    memory: int = 256 * 1024 * 1024  # request and reply bytes held for all guests together
    decisions_per_second: float = 20.0  # per guest: GO/INFO asked of the access-control domain
    # A mirror's replica that leaves a request unanswered this long while another replica
    # answers is degraded instead of holding guests' writes until its request timeout.
    replica_lag: float = 5.0
    leaf_cache: int = 16 * 1024 * 1024  # per encrypted disk: leaf pages kept in memory
    connections: int = 64  # per guest socket and per TCP port: more are closed at once


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    policy: Path | None
    drivers: dict[str, DriverConfig] = field(default_factory=dict)
    disks: dict[str, DiskConfig] = field(default_factory=dict)
    guests: dict[str, GuestConfig] = field(default_factory=dict)
    tls_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    cpus: frozenset[int] | None = None  # [placement] cpus: every disk's without its own

    def disk_cpus(self, disks: list[str]) -> frozenset[int] | None:
        """The CPUs that the domain serving `disks` (an encryption domain, a driver) may run on:
        every CPU any of them is placed on; None (the scheduler decides) if one is not placed."""
        if not disks:
            return self.cpus
        out: set[int] = set()
        for disk in disks:
            cpus = self.disks[disk].cpus or self.cpus
            if cpus is None:
                return None
            out |= cpus
        return frozenset(out)

    def guest_socket(self, guest: str) -> Path:
        return self.state_dir / "guests" / f"{guest}.sock"

    def driver_socket(self, driver: str) -> Path:
        return self.state_dir / "drivers" / f"{driver}.sock"

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def acm_socket(self) -> Path:
        return self.state_dir / "acm.sock"

    @property
    def store_socket(self) -> Path:
        """The store's public XenStore socket (XENSTORED_PATH for xenstore-utils)."""
        return self.state_dir / "store.sock"

    def sockets(self) -> list[Path]:
        """Every Unix socket `up` creates, to check their lengths before starting."""
        paths = [self.control_socket, self.acm_socket, self.store_socket]
        paths += [self.guest_socket(g) for g in self.guests]
        paths += [self.driver_socket(d) for d, cfg in self.drivers.items() if cfg.dir]
        return paths


def parse_size(text: str | int) -> int:
    """'256MiB' -> 268435456. IEC (KiB, MiB, ...) and SI (KB, MB, ...) suffixes; K/M/G mean KiB/MiB/GiB.

    Suffixes are case-insensitive ("64mib" is 64 MiB, "64mb" 64,000,000 bytes), as README.md says.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f"size must be a string like \"256MiB\" or a number of bytes, not {text!r}")
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot read size {text!r}; write e.g. \"256MiB\", \"1GiB\" or \"4096\"")
    number, unit = match.groups()
    return int(number) * _UNITS[(unit or "").upper()]


def format_size(size: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
