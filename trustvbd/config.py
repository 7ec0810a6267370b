"""The config file (TOML): model and validation.

Every mistake stops `trustvbd up` before anything starts, with the file, the key
and what to do. Relative paths are relative to the config file.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustvbd.crypt.superblock import Layout
from trustvbd.nbd.uri import parse_uri
from trustvbd.regular_file import NotRegularFile, read_regular

BLOCK_SIZE = 4096
MAX_REPLICAS = 8
MAX_CONFIG = 4 << 20  # bytes of a config file: thousands of guests and disks fit
# Unix socket paths are limited to 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# Offsets are signed 64-bit (off_t, and the NBD size every client stores in one).
MAX_FILE_SIZE = (1 << 63) - 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
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


class _Table:
    """A TOML table being validated: typed getters that name the file and key on error."""

    def __init__(self, file: Path, where: str, data: Any, allowed: set[str]) -> None:
        self.file, self.where = file, where
        if not isinstance(data, dict):
            section = f"[[{where.partition('[')[0]}]]" if where.endswith("]") else f"[{where}]"
            raise ConfigError(file, where, f"found {json.dumps(data, default=str)}, where a table is"
                              f" expected: write a {section} section with its keys")
        self.data = data
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(
                file, self._key(unknown[0]),
                f"unknown key; allowed keys here are: {', '.join(sorted(allowed))}",
            )

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, self._key(key), message)

    def get(self, key: str, kind: type, required: bool = False, default: Any = None) -> Any:
        if key not in self.data:
            if required:
                raise self.error(key, "is missing; add it")
            return default
        value = self.data[key]
        if kind is str and not isinstance(value, str):
            raise self.error(key, f"must be a string, not {value!r}")
        if kind is bool and not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        if kind is list and not isinstance(value, list):
            raise self.error(key, f"must be a list, not {value!r}")
        return value

    def name(self, key: str = "name") -> str:
        value = self.get(key, str, required=True)
        if not _NAME.match(value):
            raise self.error(
                key, f"{value!r} is not a valid name: use 1-64 letters, digits, '.', '_' or '-',"
                " starting with a letter or digit",
            )
        return value

    def path(self, key: str, base: Path) -> Path | None:
        value = self.get(key, str)
        if value is None:
            return None
        if not value:
            raise self.error(key, "is empty; give a path")
        if "\0" in value:  # the OS cannot take it: resolve() raised ValueError, a traceback
            raise self.error(key, f"{value!r} holds a NUL character (\\u0000), which no path "
                             "may hold; remove it")
        return (base / os.path.expanduser(value)).resolve()

    def label(self) -> str:
        """A policy label: what the access-control domain takes (refused there, it stopped
        `up` after the domains had started, with a message about the policy)."""
        value: str = self.get("label", str, required=True)
        if not value or len(value) > 256:
            raise self.error("label", f"{value!r} is {'empty' if not value else 'too long'}: give"
                             " a label of 1 to 256 characters, as the policy names it")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise self.error("label", f"{value!r} holds a control character; a label is a name "
                             "the policy gives (printed in logs and status): remove it")
        return value


def _parse_listen(table: _Table) -> tuple[str, int] | None:
    text = table.get("listen", str)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise table.error("listen", f"{text!r} is not HOST:PORT, e.g. \"127.0.0.1:10809\"")
    return host.strip("[]"), int(port)


def _parse_user(table: _Table) -> int | None:
    value = table.data.get("user")
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise table.error("user", f"uid {value} is negative")
        return value
    if not isinstance(value, str) or not value:
        raise table.error("user", f"must be a user name or a uid, not {value!r}")
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        if value.isdigit():
            return int(value)
        raise table.error("user", f"no user named {value!r} on this system; create it, or give"
                          " a uid") from None


def _check_driver_user(table: _Table, user: str) -> None:
    """The account a driver runs as (as root) exists and is not root (sandbox.named_user
    would refuse it only once the other domains had started)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise table.error("user", f"no user named {user!r} on this system; create it, or remove"
                          " `user` to get a dynamic uid") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise table.error("user", f"{user!r} is root or in group root; an untrusted driver needs"
                          " an unprivileged user (or remove `user` to get a dynamic uid)")


def _parse_guest(table: _Table, tls_dir: Path | None) -> GuestConfig:
    name, label = table.name(), table.label()
    listen = _parse_listen(table)
    tls = table.get("tls", bool, default=True)
    tls_name = table.get("tls_name", str)
    if tls_name is not None and not tls_name:
        raise table.error("tls_name", "is empty; give the Common Name of the guest's certificate")
    if listen is not None and tls and tls_dir is None:
        raise table.error(
            "listen", "a TCP port needs TLS, or anyone who reaches it can claim to be this guest:"
            " add a [tls] section with dir = \"pki\" (make one with `trustvbd tls init pki`),"
            " or set tls = false on this guest to serve it in plaintext on purpose")
    if (tls_name is not None or "tls" in table.data) and listen is None:
        key = "tls_name" if tls_name is not None else "tls"
        raise table.error(key, "applies to the guest's TCP port only; add listen = \"HOST:PORT\""
                          " or remove it")
    return GuestConfig(name, label, listen, tls, tls_name, _parse_user(table))


def _seconds(table: _Table, key: str, default: float) -> float:
    value = table.data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
        raise table.error(key, f"must be a number of seconds between 0 and 86400, not {value!r}")
    return float(value)


def _parse_limits(file: Path, raw: Any) -> Limits:
    t = _Table(file, "limits", raw, {"handshake_timeout", "idle_timeout", "memory",
                                     "decisions_per_second", "replica_lag", "leaf_cache",
                                     "connections"})
    base = Limits()
    try:
        memory = parse_size(t.data.get("memory", base.memory))
    except ValueError as exc:
        raise t.error("memory", str(exc)) from None
    if memory < 64 * 1024 * 1024:
        raise t.error("memory", f"{format_size(memory)} is too small; give at least 64MiB")
    try:
        leaf_cache = parse_size(t.data.get("leaf_cache", base.leaf_cache))
    except ValueError as exc:
        raise t.error("leaf_cache", str(exc)) from None
    if leaf_cache < 256 * 1024:
        raise t.error("leaf_cache", f"{format_size(leaf_cache)} is too small; give at least 256KiB")
    rate = t.data.get("decisions_per_second", base.decisions_per_second)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 10000:
        raise t.error("decisions_per_second", f"must be a number between 0 and 10000, not {rate!r}")
    connections = t.data.get("connections", base.connections)
    if isinstance(connections, bool) or not isinstance(connections, int) or not 1 <= connections <= 1024:
        raise t.error("connections", f"must be a whole number between 1 and 1024, not {connections!r}")
    return Limits(_seconds(t, "handshake_timeout", base.handshake_timeout),
                  _seconds(t, "idle_timeout", base.idle_timeout), memory, float(rate),
                  _seconds(t, "replica_lag", base.replica_lag), leaf_cache, connections)


def _cpu_ranges(cpus: set[int] | frozenset[int]) -> str:
    """{0, 1, 2, 5} -> "0-2,5" (as /proc's Cpus_allowed_list and taskset -c write them)."""
    out: list[str] = []
    for cpu in sorted(cpus):
        if out and out[-1].rpartition("-")[2] == str(cpu - 1):
            out[-1] = f"{out[-1].partition('-')[0]}-{cpu}"
        else:
            out.append(str(cpu))
    return ",".join(out)


def _parse_cpus(table: _Table) -> frozenset[int] | None:
    """`cpus = [0, 1]`: CPUs this process may run on now (os.sched_getaffinity), each once."""
    value = table.get("cpus", list)
    if value is None:
        return None
    if not value or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value):
        raise table.error("cpus", f"must be a non-empty list of CPU numbers like [0] or [0, 1],"
                          f" not {value!r}")
    if len(set(value)) != len(value):
        raise table.error("cpus", f"{value!r} names a CPU twice; list each once")
    allowed = os.sched_getaffinity(0)
    present = os.cpu_count() or len(allowed)
    for cpu in value:
        if cpu >= present:
            raise table.error("cpus", f"CPU {cpu} does not exist on this machine (it has {present}:"
                              f" 0-{present - 1}); pick from {_cpu_ranges(allowed)}, or remove"
                              " `cpus` to let the scheduler place the domains")
        if cpu not in allowed:
            raise table.error("cpus", f"CPU {cpu} is not one trustvbd may run on here (allowed:"
                              f" {_cpu_ranges(allowed)}; the others are offline or outside what"
                              " taskset, a cgroup cpuset or systemd's CPUAffinity= allow); pick"
                              " from those, or widen what trustvbd may use")
    return frozenset(value)


def _unique(file: Path, kind: str, items: list[Any]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for index, item in enumerate(items):
        if item.name in seen:
            raise ConfigError(
                file, f"{kind}[{index}].name", f"duplicate {kind} name {item.name!r}; names must be unique"
            )
        seen[item.name] = item
    return seen


def _backing(d: DriverConfig) -> tuple[str, ...]:
    """What a driver stores on: its directory, or the export its URI names (the same
    socket and export, or host, port and export, with or without TLS)."""
    if d.dir is not None:
        return ("dir", str(d.dir))
    assert d.uri is not None
    u = parse_uri(d.uri)
    if u.transport == "unix":
        assert u.socket_path is not None
        return ("unix", os.path.normpath(u.socket_path), u.export)
    assert u.host is not None
    return ("tcp", u.host.lower(), str(u.port), u.export)


def _distinct_backings(file: Path, drivers: list[DriverConfig], state_dir: Path) -> None:
    """Two drivers on one backing would be one replica counted twice: a mirror that
    believes it holds two copies holds one. A URI may also name the socket of one of
    our own drivers (`up` serves them under state_dir), which is that driver's directory."""
    seen: dict[tuple[str, ...], str] = {}
    ours = {os.path.normpath(state_dir / "drivers" / f"{d.name}.sock"): d.name
            for d in drivers if d.dir is not None}
    for i, d in enumerate(drivers):
        key = _backing(d)
        other = seen.get(key) or (ours.get(key[1]) if key[0] == "unix" else None)
        if other is not None:
            what = f"directory {d.dir}" if d.dir is not None else f"NBD export {d.uri}"
            raise ConfigError(file, f"driver[{i}].{'dir' if d.dir is not None else 'uri'}",
                              f"{what} is also the backing of driver {other!r}: two drivers on one "
                              "backing would be one replica counted twice; give each its own")
        seen[key] = d.name


def _array(file: Path, raw: dict[str, Any], kind: str) -> list[Any]:
    items = raw.get(kind, [])
    if not isinstance(items, list):
        raise ConfigError(file, kind, f"must be an array of tables: write [[{kind}]] sections")
    return items


def _read_config(file: Path) -> bytes:
    """A config file's bytes. Only a regular file of at most MAX_CONFIG bytes: a FIFO held
    `up` and every command in open() for good, /dev/zero read on until memory ran out."""
    try:
        data = read_regular(file, "a config", MAX_CONFIG)
    except NotRegularFile as exc:
        if stat.S_ISDIR(exc.mode):
            raise ConfigError(file, "", "is a directory; pass the config file with -c PATH") from None
        raise ConfigError(file, "", f"{exc.strerror}; pass the config file with -c PATH") from None
    if len(data) > MAX_CONFIG:
        raise ConfigError(file, "", f"larger than {MAX_CONFIG >> 20} MiB, so no config; pass"
                          " the config file with -c PATH")
    return data


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError naming the file and key."""
    file = Path(path).resolve()
    try:
        raw = tomllib.loads(_read_config(file).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(file, "", "no such file; pass the config with -c PATH") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror or exc}; check the path and"
                          " its permissions") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "", f"not UTF-8 text ({exc.reason} at byte {exc.start}); a"
                          " config is a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise ConfigError(file, "", "not valid TOML: arrays or tables nested too deeply"
                          ) from None
    base = file.parent
    top = _Table(file, "", raw, {"state_dir", "policy", "driver", "disk", "guest", "tls",
                                 "limits", "placement"})
    for section in ("tls", "limits", "placement"):  # a top-level key written below a [section] is in it
        table = raw.get(section)
        for key in ("state_dir", "policy"):
            if isinstance(table, dict) and key in table:
                raise ConfigError(file, f"{section}.{key}", f"is inside [{section}]: in TOML every "
                                  f"key after a [section] line belongs to it; move {key} above "
                                  "the first [section] or [[table]] line")
    state_dir = top.path("state_dir", base)
    if state_dir is None:
        raise top.error("state_dir", "is missing; add e.g. state_dir = \"state\"")
    policy = top.path("policy", base)
    if policy is not None and not os.access(policy, os.R_OK):
        raise top.error("policy", f"cannot read {policy}; check the path and its permissions")

    tls_dir = None
    if "tls" in raw:
        tls = _Table(file, "tls", raw["tls"], {"dir"})
        tls_dir = tls.path("dir", base)
        if tls_dir is None:
            raise tls.error("dir", "is missing; add dir = \"pki\" (make it with `trustvbd tls"
                            " init pki`)")
    limits = _parse_limits(file, raw.get("limits", {}))
    cpus = _parse_cpus(_Table(file, "placement", raw.get("placement", {}), {"cpus"}))

    drivers = []
    for i, item in enumerate(_array(file, raw, "driver")):
        t = _Table(file, f"driver[{i}]", item, {"name", "label", "dir", "uri", "user"})
        name, label = t.name(), t.label()
        ddir, uri, user = t.path("dir", base), t.get("uri", str), t.get("user", str)
        if (ddir is None) == (uri is None):
            raise t.error("dir", "give exactly one of dir (trustvbd's own driver) or uri (any NBD server)")
        if user is not None and (uri is not None or not user):
            raise t.error("user", "names the account trustvbd's own driver (dir) runs as; an NBD"
                          " server at uri runs as whoever started it" if user else "is empty")
        if user is not None:
            _check_driver_user(t, user)
        if uri is not None:
            try:
                parsed = parse_uri(uri)
            except ValueError as exc:
                raise t.error("uri", str(exc)) from None
            if parsed.tls and tls_dir is None:
                raise t.error("uri", "a TLS URI needs our client certificate: add a [tls] section"
                              " with dir = \"pki\" (client-cert.pem, client-key.pem, ca-cert.pem)")
            if parsed.tls_certificates is not None:
                raise t.error("uri", "tls-certificates= is not used here: the encryption domain"
                              " uses the [tls] dir's client certificate; remove it")
        drivers.append(DriverConfig(name, label, ddir, uri, user))
    driver_map = _unique(file, "driver", drivers)
    _distinct_backings(file, drivers, state_dir)

    disks = []
    for i, item in enumerate(_array(file, raw, "disk")):
        t = _Table(file, f"disk[{i}]", item, {"name", "size", "label", "replicas", "encrypt",
                                              "cpus"})
        name, label = t.name(), t.label()
        try:
            size = parse_size(t.get("size", object, required=True))
        except ValueError as exc:
            raise t.error("size", str(exc)) from None
        if size <= 0 or size % BLOCK_SIZE:
            raise t.error("size", f"{size} bytes is not a positive multiple of 4 KiB ({BLOCK_SIZE} bytes)")
        encrypt = t.get("encrypt", bool, default=True)
        replica_size = Layout(size).physical_size if encrypt else size
        if replica_size > MAX_FILE_SIZE:
            raise t.error("size", f"{format_size(size)} is too large: a replica of it would be "
                          f"{replica_size} bytes, past the {MAX_FILE_SIZE} a file or an NBD "
                          "export can address; give a smaller size")
        replicas = t.get("replicas", list, required=True)
        if not replicas:
            raise t.error("replicas", "is empty; name at least one [[driver]]")
        for r in replicas:
            if not isinstance(r, str):  # a list or a table cannot even be looked up
                raise t.error("replicas", f"must name drivers as strings, not {r!r}; write"
                              " replicas = [\"drv-a\", ...]")
            if r not in driver_map:
                known = ", ".join(sorted(driver_map)) or "none defined"
                raise t.error("replicas", f"unknown driver {r!r}; defined drivers: {known}")
        if len(set(replicas)) != len(replicas):
            raise t.error("replicas", "names a driver twice; each replica must be a different driver")
        if len(replicas) > MAX_REPLICAS:
            raise t.error("replicas", f"lists {len(replicas)} drivers; a disk has at most"
                          f" {MAX_REPLICAS} replicas")
        if len(replicas) > 1 and not encrypt:
            raise t.error(
                "replicas", "mirroring needs encrypt = true: reads from an unencrypted replica"
                " cannot be verified, so a lying driver could not be told from an honest one;"
                " list one driver or encrypt the disk",
            )
        disks.append(DiskConfig(name, size, label, tuple(replicas), encrypt, _parse_cpus(t)))
    disk_map = _unique(file, "disk", disks)

    # A driver given by URI is one export someone else serves: it can hold one disk only.
    users: dict[str, str] = {}
    for disk in disks:
        for r in disk.replicas:
            if driver_map[r].uri and r in users:
                raise ConfigError(
                    file, f"disk {disk.name!r}.replicas",
                    f"driver {r!r} is a single NBD export (uri) already used by disk {users[r]!r};"
                    " give each disk its own uri driver",
                )
            users[r] = disk.name

    guests = []
    for i, item in enumerate(_array(file, raw, "guest")):
        t = _Table(file, f"guest[{i}]", item, {"name", "label", "listen", "tls", "tls_name",
                                               "user"})
        guests.append(_parse_guest(t, tls_dir))
    guest_map = _unique(file, "guest", guests)

    names: dict[str, str] = {}
    for kind, group in (("driver", driver_map), ("disk", disk_map), ("guest", guest_map)):
        for n in group:
            if n in names:
                raise ConfigError(file, f"{kind} {n!r}", f"name is also used by a {names[n]}; pick another")
            names[n] = kind

    config = Config(file, state_dir, policy, driver_map, disk_map, guest_map, tls_dir, limits,
                    cpus)
    for sock in config.sockets():
        if len(str(sock).encode()) > MAX_SOCKET_PATH:
            raise ConfigError(
                file, "state_dir",
                f"socket path {sock} is {len(str(sock).encode())} bytes, over the Unix limit of"
                f" {MAX_SOCKET_PATH}; choose a shorter state_dir or shorter names",
            )
    return config


def check_paths(config: Config) -> None:
    """Check that the directories `up` writes to can be created and written (before starting)."""
    if config.tls_dir is not None and not config.tls_dir.is_dir():
        raise ConfigError(config.path, "tls.dir", f"{config.tls_dir} is not a directory; make it"
                          f" with `trustvbd tls init {config.tls_dir}`, or remove [tls]")
    targets = [("state_dir", config.state_dir, "the trusted state: keys, anchors, sockets")]
    targets += [(f"driver {d.name!r}.dir", d.dir, "one sparse file per disk")
                for d in config.drivers.values() if d.dir]
    for key, directory, holds in targets:
        if directory.exists() and not directory.is_dir():
            raise ConfigError(config.path, key, f"{directory} is a file, not a directory; name a"
                              f" directory (it holds {holds})")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(config.path, key, f"cannot create {directory}: {exc.strerror}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(config.path, key, f"{directory} is not writable; fix its permissions")
