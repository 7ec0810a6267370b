"""The config's sections, each table checked and made into its part of the model:
[tls], [limits], [placement], and each [[driver]], [[disk]] and [[guest]]. What holds
across tables (unique names, distinct backings) is config_file.py's."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

from trustvbd.config import (
    BLOCK_SIZE,
    MAX_FILE_SIZE,
    MAX_REPLICAS,
    DiskConfig,
    DriverConfig,
    GuestConfig,
    Limits,
    format_size,
    parse_size,
)
from trustvbd.config_table import Table
from trustvbd.crypt.superblock import Layout
from trustvbd.nbd.uri import parse_uri


def _listen(table: Table) -> tuple[str, int] | None:
    text = table.get("listen", str)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise table.error("listen", f"{text!r} is not HOST:PORT, e.g. \"127.0.0.1:10809\"")
    return host.strip("[]"), int(port)


def _user(table: Table) -> int | None:
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


def _check_driver_user(table: Table, user: str) -> None:
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


def parse_guest(file: Path, index: int, raw: Any, tls_dir: Path | None) -> GuestConfig:
    """One [[guest]]: its socket's user, and its TCP port (with TLS or on purpose without)."""
    table = Table(file, f"guest[{index}]", raw, {"name", "label", "listen", "tls", "tls_name",
                                                 "user"})
    name, label = table.name(), table.label()
    listen = _listen(table)
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
    return GuestConfig(name, label, listen, tls, tls_name, _user(table))


def _seconds(table: Table, key: str, default: float) -> float:
    value = table.data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
        raise table.error(key, f"must be a number of seconds between 0 and 86400, not {value!r}")
    return float(value)


def parse_limits(file: Path, raw: Any) -> Limits:
    """[limits]: what one guest may hold (docs/limits.md)."""
    t = Table(file, "limits", raw, {"handshake_timeout", "idle_timeout", "memory",
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


def _cpus(table: Table) -> frozenset[int] | None:
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


def parse_tls(file: Path, raw: Any, base: Path) -> Path:
    """[tls]: the directory of our certificates."""
    tls = Table(file, "tls", raw, {"dir"})
    tls_dir = tls.path("dir", base)
    if tls_dir is None:
        raise tls.error("dir", "is missing; add dir = \"pki\" (make it with `trustvbd tls"
                        " init pki`)")
    return tls_dir


def parse_placement(file: Path, raw: Any) -> frozenset[int] | None:
    """[placement]: the CPUs every disk without its own `cpus` runs on."""
    return _cpus(Table(file, "placement", raw, {"cpus"}))


def parse_driver(file: Path, index: int, raw: Any, base: Path, tls_dir: Path | None
                 ) -> DriverConfig:
    """One [[driver]]: a directory we serve, or an NBD server's URI."""
    t = Table(file, f"driver[{index}]", raw, {"name", "label", "dir", "uri", "user"})
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
    return DriverConfig(name, label, ddir, uri, user)


def parse_disk(file: Path, index: int, raw: Any, drivers: dict[str, DriverConfig]) -> DiskConfig:
    """One [[disk]]: its size and its replicas, among the `drivers` defined."""
    t = Table(file, f"disk[{index}]", raw, {"name", "size", "label", "replicas", "encrypt",
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
        if r not in drivers:
            known = ", ".join(sorted(drivers)) or "none defined"
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
    return DiskConfig(name, size, label, tuple(replicas), encrypt, _cpus(t))
