"""The config file read and checked as a whole: the file itself (a regular file, UTF-8
TOML), its top-level keys, and what holds across its tables (unique names, one backing
per driver, a URI driver for one disk, socket paths within the Unix limit); each table
is config_sections.py's. Relative paths are relative to the config file."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from trustvbd.config import (
    MAX_CONFIG,
    MAX_SOCKET_PATH,
    Config,
    ConfigError,
    DiskConfig,
    DriverConfig,
)
from trustvbd.config_sections import (
    parse_disk,
    parse_driver,
    parse_guest,
    parse_limits,
    parse_placement,
    parse_tls,
)
from trustvbd.config_table import Table
from trustvbd.nbd.uri import parse_uri
from trustvbd.regular_file import NotRegularFile, read_regular


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


def _one_disk_per_uri_driver(file: Path, disks: list[DiskConfig],
                             drivers: dict[str, DriverConfig]) -> None:
    """A driver given by URI is one export someone else serves: it can hold one disk only."""
    users: dict[str, str] = {}
    for disk in disks:
        for r in disk.replicas:
            if drivers[r].uri and r in users:
                raise ConfigError(
                    file, f"disk {disk.name!r}.replicas",
                    f"driver {r!r} is a single NBD export (uri) already used by disk {users[r]!r};"
                    " give each disk its own uri driver",
                )
            users[r] = disk.name


def _distinct_names(file: Path, drivers: dict[str, Any], disks: dict[str, Any],
                    guests: dict[str, Any]) -> None:
    names: dict[str, str] = {}
    for kind, group in (("driver", drivers), ("disk", disks), ("guest", guests)):
        for n in group:
            if n in names:
                raise ConfigError(file, f"{kind} {n!r}", f"name is also used by a {names[n]}; pick another")
            names[n] = kind


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
    top = Table(file, "", raw, {"state_dir", "policy", "driver", "disk", "guest", "tls",
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

    tls_dir = parse_tls(file, raw["tls"], base) if "tls" in raw else None
    limits = parse_limits(file, raw.get("limits", {}))
    cpus = parse_placement(file, raw.get("placement", {}))

    drivers = [parse_driver(file, i, item, base, tls_dir)
               for i, item in enumerate(_array(file, raw, "driver"))]
    driver_map = _unique(file, "driver", drivers)
    _distinct_backings(file, drivers, state_dir)

    disks = [parse_disk(file, i, item, driver_map)
             for i, item in enumerate(_array(file, raw, "disk"))]
    disk_map = _unique(file, "disk", disks)

    _one_disk_per_uri_driver(file, disks, driver_map)

    guests = [parse_guest(file, i, item, tls_dir)
              for i, item in enumerate(_array(file, raw, "guest"))]
    guest_map = _unique(file, "guest", guests)

    _distinct_names(file, driver_map, disk_map, guest_map)

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
