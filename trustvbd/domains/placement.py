"""Which encryption domain holds which disk, and which guest socket reaches which domain.

One encryption domain per workload type: the STE type of a disk's resource label
(with the NULL policy, or a label the policy does not define, the label itself).
Each domain holds only its own disks' keys. A guest reaches a domain through a
socket of its own: `guests/GUEST.sock` goes to the domain of the first type (in
config order) among the disks the guest may use, and every further type gets
`guests/GUEST@TYPE.sock`. The URIs `up` prints say which socket serves which disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from trustvbd.acm.model import Policy
from trustvbd.config import MAX_SOCKET_PATH, Config

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def workload_type(policy: Policy | None, disk_label: str) -> str:
    if policy is None or policy.is_null:
        return disk_label
    resource = policy.resource_label(disk_label)
    return resource.ste if resource is not None else disk_label


def file_safe(name: str) -> str:
    """A type name usable in a file or domain name: unusual characters become '_'."""
    return _UNSAFE.sub("_", name) or "_"


def types_of(config: Config, policy: Policy | None) -> dict[str, list[str]]:
    """Workload type -> its disks, in config order (a config without disks: one empty domain)."""
    types: dict[str, list[str]] = {}
    for disk in config.disks.values():
        types.setdefault(workload_type(policy, disk.label), []).append(disk.name)
    seen: dict[str, str] = {}
    for t in types:
        other = seen.setdefault(file_safe(t), t)
        if other != t:
            raise ValueError(f'workload types "{other}" and "{t}" have the same file name'
                             f' "{file_safe(t)}"; rename one in the policy')
    return types or {"none": []}


@dataclass(frozen=True)
class GuestSocket:
    guest: str
    wtype: str
    path: Path
    primary: bool  # the guest's own GUEST.sock (and its TCP listener, if any)


def guest_sockets(config: Config, guest: str, reachable_types: list[str],
                  all_types: list[str]) -> list[GuestSocket]:
    """The sockets of one guest: its own for the first type it may use, one more per other type."""
    types = reachable_types or all_types[:1]  # a guest that may use nothing still gets its socket
    out = [GuestSocket(guest, types[0], config.guest_socket(guest), True)]
    return out + [further_socket(config, guest, t) for t in types[1:]]


def further_socket(config: Config, guest: str, wtype: str) -> GuestSocket:
    """A guest's socket for a workload type other than its first: `guests/GUEST@TYPE.sock`."""
    path = config.guest_socket(guest).with_name(f"{guest}@{file_safe(wtype)}.sock")
    if len(str(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"guest {guest!r}'s socket for workload type {wtype!r}, {path}, is longer"
                         f" than {MAX_SOCKET_PATH} bytes; choose a shorter state_dir")
    return GuestSocket(guest, wtype, path, False)
